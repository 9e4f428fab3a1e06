"""Synthetic nuScenes dataroot generator: a small, deterministic, fully labelled stand-in for nuScenes.

`make_sample(out, SampleConfig(...))` builds, per scene, one consistent 3D street world (road along
the ego's path, sidewalks, terrain, buildings, poles, trees, parked and moving cars and trucks,
pedestrians, barriers, traffic cones) and renders it two ways from the same ego trajectory:

- LIDAR_TOP: an HDL-32E-like spinning lidar ray-cast at every keyframe (2 Hz) and at `sweeps`
  non-keyframe sweeps (20 Hz) before each keyframe, each at its own timestamp and ego pose, with
  moving objects moved. Every keyframe point gets its fine nuScenes-lidarseg class in
  `lidarseg/<version>/<sample_data_token>_lidarseg.bin`.
- Six cameras (real nuScenes extrinsics and intrinsics scaled to the image size) ray-cast per
  pixel at their own timestamps (tens of ms from the lidar's) and ego poses; each surface shows its
  class colour (`NUSCENES_CATEGORY_COLOURS`, the devkit's colour map) with sun shading, shadows, texture, noise.

The on-disk layout and every JSON table follow the nuScenes format (v1.0-mini for <= 10 scenes with
the official mini scene names, else v1.0-trainval with official train/val names, about 4:1), so
the devkit projection chain (lidar -> ego -> global -> ego(cam time) -> camera) maps a lidar point
onto the pixel showing the same surface. Deterministic given the seed (files are byte-identical).

Conventions a reader should know:
- Sweeps: the `sweeps` LIDAR_TOP records 50 ms apart before keyframe k (also before the first
  one) are stored under `sweeps/`, is_key_frame false, sample_token = keyframe k's sample. The
  LIDAR_TOP prev/next chain runs through sweeps and keyframes in time order; each camera channel
  has keyframe images only, chained per channel. Only keyframes have lidarseg labels.
- Points: float32 (x, y, z, intensity 0..255 integer-valued, ring 0 = lowest beam) in the
  LIDAR_TOP frame, azimuth-major like nuScenes; a whole sweep is ray-cast at its timestamp (no
  rolling shutter); no return = no point; labels never 0 (noise) or 31 (ego).
- Images: pixel (col, row) is the ray through K^-1 (col, row, 1): pixel centres on the integer
  grid, so sample the image at round(u), round(v) (or bilinearly with align_corners=True).
- Boxes: sample_annotation is the object's exact geometry grown by 5 cm a side, bottom 5 cm above
  the ground; num_lidar_pts is the devkit points-in-box count; visibility is the lidar-visible
  fraction of the object (binned like nuScenes). Logs are vehicle n015 in singapore-onenorth
  (traffic keeps left); the map record points at a placeholder PNG.
- Class maps: beside the official layout, `clip2scene-classmaps/samples/CAM_*/<image>.npz` holds
  each image's per-pixel evaluation class, depth and object id (`clip2scene.precompute.teacher.classmaps`),
  for the simulated teacher (`precompute --teacher simulated`). The nuScenes folders are untouched.

Run: ``python -m clip2scene.samples.nuscenes OUT_DIR [--scenes 2 --keyframes 4 --seed 0]``.
Numpy + Pillow only; ray casting lives in `clip2scene.samples.render`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clip2scene.classes import FINE_TO_COARSE, NUSCENES_CATEGORIES, NUSCENES_CATEGORY_COLOURS, NUSCENES_CLASSES
from clip2scene.precompute.datasets import splits
from clip2scene.precompute.teacher.classmaps import write_class_map
from clip2scene.samples.render import (
    Prims, matrix_to_quat, quat_to_matrix, raycast_lidar, render_camera, rotation_matrix)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleConfig:
    """What to generate. Defaults give 2 scenes (one mini_train, one mini_val) in a few seconds."""

    scenes: int = 2             # number of scenes
    keyframes: int = 4          # keyframes (samples, 2 Hz) per scene
    sweeps: int = 3             # non-keyframe LIDAR_TOP sweeps (0.05 s apart) before each keyframe
    image_width: int = 400      # camera image width (1600 / 4); intrinsics scaled to match
    image_height: int = 225     # camera image height (900 / 4); fy, cy scaled by image_height/900
    lidar_beams: int = 32       # rings, elevations spread like the HDL-32E (-30.67 .. +10.67 deg)
    lidar_azimuth_steps: int = 1024  # rays per ring per revolution
    seed: int = 0               # everything is deterministic given the seed


PED, BARRIER, CONE, CAR, TRUCK = 2, 9, 12, 17, 23
ROAD, SIDEWALK, TERRAIN, MANMADE, VEGETATION = 24, 26, 27, 28, 30

# Lidar intensity (mean, std) per fine class; others get (20, 8).
_INTENSITY = {ROAD: (9, 3), SIDEWALK: (22, 6), TERRAIN: (14, 5), MANMADE: (38, 18),
              VEGETATION: (24, 10), CAR: (18, 14), TRUCK: (28, 15), PED: (12, 5),
              BARRIER: (45, 20), CONE: (70, 25)}

ATTRIBUTES = (  # official nuScenes attribute tokens
    ("cb5118da1ab342aa947717dc53544259", "vehicle.moving", "Vehicle is moving."),
    ("c3246a1e22a14fcb878aa61e69ae3329", "vehicle.stopped", "Vehicle, with a driver/rider in/on it, is currently stationary but has an intent to move."),
    ("58aa28b1c2a54dc88e169808c07331e3", "vehicle.parked", "Vehicle is stationary (usually for longer duration) with no immediate intent to move."),
    ("a14936d865eb4216b396adae8cb3939c", "cycle.with_rider", "There is a rider on the bicycle or motorcycle."),
    ("5a655f9751944309a277276b8f473452", "cycle.without_rider", "There is NO rider on the bicycle or motorcycle."),
    ("03aa62109bf043afafdea7d875dd4f43", "pedestrian.sitting_lying_down", "The human is sitting or lying down."),
    ("4d8821270b4a47e3a8a300cbec48188e", "pedestrian.standing", "The human is standing."),
    ("ab83627ff28b465b85c427162dec722f", "pedestrian.moving", "The human is moving."),
)
_ATTR_TOKEN = {name: tok for tok, name, _ in ATTRIBUTES}

# Real nuScenes calibration of vehicle n015 (singapore): channel -> (sensor token, translation,
# rotation [w, x, y, z], fx = fy, cx, cy at 1600 x 900). Cameras clockwise from CAM_FRONT.
SENSORS: dict[str, tuple[str, list[float], list[float], float, float, float]] = {
    "CAM_FRONT": (
        "725903f5b62f56118f4094b46a4470d8", [1.70079118954, 0.0159456324149, 1.51095763913],
        [0.4998015430569128, -0.5030316162024876, 0.4997798114386805, -0.49737083824542755],
        1266.417203046554, 816.2670197447984, 491.50706579294757),
    "CAM_FRONT_RIGHT": (
        "2f7ad058f1ac5557bf321c7543758f43", [1.5508477543, -0.493404796419, 1.49574800619],
        [0.2060347966337182, -0.2026940577919598, 0.6824507824531167, -0.6713610884174485],
        1260.8474446004698, 807.968244525554, 495.3344268742088),
    "CAM_BACK_RIGHT": (
        "ca7dba2ec9f95951bbe67246f7f2c3f7", [1.0148780988, -0.480568219723, 1.56239545128],
        [0.12280980120078765, -0.132400842670559, -0.7004305821388234, 0.690496031265798],
        1259.5137405846733, 807.2529053838625, 501.19579884916527),
    "CAM_BACK": (
        "ce89d4f3050b5892b33b3d328c5e82a3", [0.0283260309358, 0.00345136761476, 1.57910346144],
        [0.5037872666382278, -0.49740249788611096, -0.4941850223835201, 0.5045496097725578],
        809.2209905677063, 829.2196003259838, 481.77842384512485),
    "CAM_BACK_LEFT": (
        "a89643a5de885c6486df2232dc954da2", [1.03569100218, 0.484795032713, 1.59097014818],
        [0.6924185592174665, -0.7031619420114925, -0.11648342771943819, 0.11203317912370753],
        1256.7414812095406, 792.1125740759628, 492.7757465151356),
    "CAM_FRONT_LEFT": (
        "ec4b5d41840a509984f7ec36419d4c09", [1.52387798135, 0.494631336551, 1.50932822144],
        [0.6757265034669446, -0.6736266522251881, 0.21214015046209478, -0.21122827103904068],
        1272.5979470598488, 826.6154927353808, 479.75165386361925),
    "LIDAR_TOP": (
        "dc8b396651c05aedbb9cdaae573bb567", [0.943713, 0.0, 1.84023],
        [0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817],
        0.0, 0.0, 0.0),
}
CAMERAS = tuple(c for c in SENSORS if c.startswith("CAM"))
# Camera firing time relative to the LIDAR_TOP timestamp (us), as in nuScenes (lidar sweeps past).
_CAM_OFFSET_US = {"CAM_FRONT_LEFT": -42412, "CAM_FRONT": -34788, "CAM_FRONT_RIGHT": -26920,
                  "CAM_BACK_RIGHT": -19366, "CAM_BACK": -9734, "CAM_BACK_LEFT": 164}
MINI_SCENES = ("scene-0061", "scene-0103", "scene-0553", "scene-0916", "scene-0655", "scene-0757",
               "scene-0796", "scene-1077", "scene-1094", "scene-1100")
LIDAR_RANGE = 70.0   # metres
LANE = 3.5           # lane width, metres
LOCATION = "singapore-onenorth"
KEEP = 1             # side of the road traffic keeps to: +1 = left (Singapore), -1 = right
_EGO_BOX = (-1.0, 3.9, 0.95, 2.0)  # ego footprint in the ego frame: x min, x max, |y| max, z max


def _token(seed: int, *parts) -> str:
    """32 lowercase hex chars, deterministic in the seed and a descriptive path."""
    return hashlib.md5("/".join(["clip2scene-synthetic", str(seed), *map(str, parts)]).encode()).hexdigest()


def scene_names(n: int) -> tuple[str, list[str]]:
    """(version, names) for n scenes: mini names for n <= 10, else trainval names at ~4 train : 1 val."""
    if n <= len(MINI_SCENES):
        return "v1.0-mini", list(MINI_SCENES[:n])
    n_val = min(n // 5, len(splits.VAL))
    if n - n_val > len(splits.TRAIN):
        raise ValueError(f"at most {len(splits.TRAIN) + len(splits.VAL)} scenes, got {n}")
    names, it, iv = [], 0, 0
    for i in range(n):
        if i % 5 == 4 and iv < n_val:
            names.append(splits.VAL[iv]); iv += 1
        else:
            names.append(splits.TRAIN[it]); it += 1
    return "v1.0-trainval", names


# ----------------------------------------------------------------------------------------------
# the world
# ----------------------------------------------------------------------------------------------
class _Road:
    """Road centreline: an arc (curvature kappa, 0 = straight) from p0 with heading h0. A point is
    (s, d): arc length s along the centreline, signed lateral offset d (left positive)."""

    def __init__(self, p0, h0: float, kappa: float):
        self.p0, self.h0, self.k = np.asarray(p0, float), float(h0), float(kappa)

    def heading(self, s):
        return self.h0 + self.k * np.asarray(s, float)

    def point(self, s, d) -> np.ndarray:
        """(n, 2) global xy of road coordinates s (n,), d (n,)."""
        s, d = np.broadcast_arrays(np.asarray(s, float), np.asarray(d, float))
        h = self.heading(s)
        if self.k == 0.0:
            c = self.p0 + s[..., None] * np.stack([np.cos(h), np.sin(h)], -1)
        else:
            c = self.p0 + np.stack([np.sin(h) - np.sin(self.h0), np.cos(self.h0) - np.cos(h)], -1) / self.k
        return c + d[..., None] * np.stack([-np.sin(h), np.cos(h)], -1)

    def lateral(self, xy: np.ndarray) -> np.ndarray:
        """(n,) signed lateral offset d of global points xy (n, 2)."""
        n0 = np.array([-np.sin(self.h0), np.cos(self.h0)])
        if self.k == 0.0:
            return (xy - self.p0) @ n0
        q = self.p0 + n0 / self.k
        return 1.0 / self.k - np.sign(self.k) * np.linalg.norm(xy - q, axis=1)


class _World:
    """One scene's world: road layout, ego trajectory and objects moving along the road."""

    def __init__(self, rng: np.random.Generator, duration: float):
        self.road = _Road(rng.uniform([300.0, 1000.0], [1500.0, 2200.0]), rng.uniform(-np.pi, np.pi),
                          0.0 if rng.random() < 0.5 else rng.choice([-1.0, 1.0]) / rng.uniform(250, 600))
        self.lanes = int(rng.integers(1, 3))
        self.park = {side: bool(rng.random() < 0.75) for side in (1, -1)}
        self.half = {side: LANE * self.lanes + (2.5 if self.park[side] else 0.5) for side in (1, -1)}
        self.walk = {side: float(rng.uniform(2.5, 4.0)) for side in (1, -1)}
        self.strip = {side: float(rng.uniform(1.5, 8.0)) for side in (1, -1)}
        self.speed = float(rng.uniform(5.0, 10.0))
        self.sway = (float(rng.uniform(0.05, 0.2)), float(rng.uniform(0, 2 * np.pi)))
        self.tilt = rng.uniform(0, 2 * np.pi, 2)
        self.boxes: list[dict] = []
        self.ells: list[dict] = []
        self._populate(rng, -120.0, self.speed * duration + 150.0)

    # -- ego ----------------------------------------------------------------------------------
    def ego_pose(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Ego pose at scene time t (s): rotation (3, 3) ego->global, translation (3,)."""
        amp, ph = self.sway
        s, w = self.speed * t, 2 * np.pi / 7.0
        d = KEEP * LANE / 2 + amp * np.sin(w * t + ph)
        yaw = float(self.road.heading(s)) + np.arctan2(amp * w * np.cos(w * t + ph), self.speed)
        pitch = np.radians(0.3) * np.sin(1.3 * t + self.tilt[0])
        roll = np.radians(0.2) * np.sin(0.9 * t + self.tilt[1])
        xy = self.road.point(s, d)
        return rotation_matrix(yaw, pitch, roll), np.array([xy[0], xy[1], 0.0])

    def ground_labels(self, xy: np.ndarray) -> np.ndarray:
        """(n,) uint8 class of the ground at global xy (n, 2): road, sidewalk or terrain."""
        d = self.road.lateral(xy)
        side = np.where(d >= 0, 1, -1)
        half = np.where(side > 0, self.half[1], self.half[-1])
        walk = np.where(side > 0, self.walk[1], self.walk[-1])
        ad = np.abs(d)
        return np.where(ad < half, ROAD, np.where(ad < half + walk, SIDEWALK, TERRAIN)).astype(np.uint8)

    # -- objects ------------------------------------------------------------------------------
    def _box(self, label, size, s, d, speed=0.0, flip=False, z=0.0, annotate=False, attr=None):
        self.boxes.append(dict(label=label, size=tuple(float(v) for v in size), s=float(s), d=float(d),
                               speed=float(speed), flip=bool(flip), z=float(z), annotate=annotate,
                               attr=attr, obj=len(self.boxes)))

    def _vehicle(self, rng, s_start, d, speed, flip, attr) -> float:
        """Add a car (80%) or truck spanning [s_start, s_start + length] along the road; return length."""
        if rng.random() < 0.2:
            label, size = TRUCK, (rng.uniform(6.0, 8.5), rng.uniform(2.3, 2.55), rng.uniform(2.8, 3.5))
        else:
            label, size = CAR, (rng.uniform(4.1, 4.9), rng.uniform(1.75, 2.0), rng.uniform(1.45, 1.8))
        self._box(label, size, s_start + size[0] / 2, d, speed, flip, annotate=True, attr=attr)
        return size[0]

    def _populate(self, rng: np.random.Generator, s_lo: float, s_hi: float) -> None:
        u = rng.uniform
        # construction zone (cones + barriers) ahead of the ego, on a parking side if any
        zone_side = 1 if self.park[1] else (-1 if self.park[-1] else 0)
        zone = (u(15, 45), 0.0) if zone_side else (0.0, -1.0)
        zone = (zone[0], zone[0] + 14.0) if zone_side else zone
        in_zone = lambda s, side: side == zone_side and zone[0] - 4 < s < zone[1] + 4  # noqa: E731
        for side in (1, -1):
            half, walk, strip = self.half[side], self.walk[side], self.strip[side]
            if self.park[side]:  # parked vehicles
                s = s_lo
                while s < s_hi:
                    if rng.random() < 0.7 and not (in_zone(s, side) or in_zone(s + 9.0, side)):
                        s += self._vehicle(rng, s, side * (LANE * self.lanes + 1.25), 0.0,
                                           rng.random() < 0.5, "vehicle.parked")
                    else:
                        s += u(4.0, 7.0)
                    s += u(1.0, 3.0)
            s = s_lo + u(0, 20)
            while s < s_hi:  # poles at the kerb
                if not in_zone(s, side):
                    self._box(MANMADE, (0.25, 0.25, u(6, 9)), s, side * (half + 0.45))
                s += u(18, 40)
            for _ in range(rng.poisson((s_hi - s_lo) / 100 * u(3, 9))):  # pedestrians
                walking = rng.random() < 0.5
                v = u(0.8, 1.6) * rng.choice([-1, 1]) if walking else 0.0
                self._box(PED, (u(0.45, 0.65), u(0.5, 0.7), u(1.55, 1.9)), u(s_lo, s_hi),
                          side * (half + u(1.2, walk - 0.9)), v, v < 0 or (not walking and rng.random() < 0.5),
                          annotate=True, attr="pedestrian.moving" if walking else "pedestrian.standing")
            s = s_lo + u(0, 10)
            while s < s_hi:  # trees in the terrain strip, hedges behind them
                if rng.random() < 0.7:
                    th, rz = u(2.2, 3.5), u(1.3, 2.4)
                    d = side * (half + walk + max(strip / 2, 0.8))
                    self._box(VEGETATION, (0.35, 0.35, th), s, d)
                    self.ells.append(dict(label=VEGETATION, radii=(u(1.4, 2.8),) * 2 + (rz,), s=s, d=d,
                                          z=th + 0.6 * rz, obj=self.boxes[-1]["obj"]))
                elif strip >= 4.0:
                    self._box(VEGETATION, (u(3, 10), u(0.8, 1.5), u(0.8, 1.6)), s,
                              side * (half + walk + strip - 0.9))
                s += u(7, 18)
            s = s_lo
            while s < s_hi:  # buildings
                length, depth = u(8, 30), u(8, 20)
                if rng.random() < 0.85:
                    self._box(MANMADE, (length, depth, u(4, 25)), s + length / 2,
                              side * (half + walk + strip + u(0, 3) + depth / 2))
                s += length + u(1, 10)
        if zone_side:  # cones along the lane edge, barriers behind them
            for s in np.arange(zone[0], zone[1], 3.0):
                self._box(CONE, (0.4, 0.4, 0.7), s, zone_side * (LANE * self.lanes + 0.4), annotate=True)
            for s in np.arange(zone[0] + 1, zone[1] - 1, 2.3):
                self._box(BARRIER, (2.0, 0.5, 1.0), s, zone_side * (LANE * self.lanes + 1.6), annotate=True)
        # moving traffic: one speed per lane (no overtaking inside a lane); the ego lane gets a
        # leader no slower than the ego and a follower no faster, so nothing ever meets the ego.
        for side in (1, -1):
            for lane in range(self.lanes):
                d = side * (LANE / 2 + LANE * lane)
                if side == KEEP and lane == 0:
                    if rng.random() < 0.85:
                        self._vehicle(rng, u(10, 30), d, self.speed + u(0.0, 2.0), False, "vehicle.moving")
                    if rng.random() < 0.5:  # placed, then shifted back by its own length
                        length = self._vehicle(rng, -u(14, 30), d, self.speed - u(0.0, 1.5), False,
                                               "vehicle.moving")
                        self.boxes[-1]["s"] -= length
                    continue
                v = u(5.0, 12.0) * (1 if side == KEEP else -1)
                s = s_lo - 40 + u(0, 20)
                while s < s_hi + 40:
                    if rng.random() < 0.75:
                        s += self._vehicle(rng, s, d, v, v < 0, "vehicle.moving")
                    s += u(6, 30)

    def prims_at(self, t: float) -> Prims:
        """All primitives at scene time t (s), global frame."""
        b = self.boxes
        s = np.array([o["s"] + o["speed"] * t for o in b])
        xy = self.road.point(s, np.array([o["d"] for o in b]))
        yaw = self.road.heading(s) + np.pi * np.array([o["flip"] for o in b])
        size = np.array([o["size"] for o in b])
        centre = np.column_stack([xy, np.array([o["z"] for o in b]) + size[:, 2] / 2])
        e = self.ells
        es = np.array([o["s"] for o in e], float)
        exy = self.road.point(es, np.array([o["d"] for o in e], float)).reshape(-1, 2)
        return Prims(centre, yaw, size / 2, np.array([o["label"] for o in b], np.uint8),
                     np.array([o["obj"] for o in b]),
                     np.column_stack([exy, [o["z"] for o in e]]).reshape(-1, 3),
                     np.array([o["radii"] for o in e], float).reshape(-1, 3),
                     np.array([o["label"] for o in e], np.uint8), np.array([o["obj"] for o in e], np.int64))

    def describe(self) -> str:
        def n(lab: int, moving: bool) -> int:
            return sum(o["label"] == lab and (o["speed"] != 0) == moving for o in self.boxes)

        shape = "straight" if self.road.k == 0 else "curved"
        return (f"Synthetic {shape} road, {self.lanes} lane(s) each way, parked cars ({n(CAR, False)}), "
                f"moving cars ({n(CAR, True)}) and trucks ({n(TRUCK, True)}), peds, trees, buildings")


# ----------------------------------------------------------------------------------------------
# writing a dataroot
# ----------------------------------------------------------------------------------------------
def _check(config: SampleConfig) -> None:
    if config.scenes < 1 or config.keyframes < 1:
        raise ValueError(f"need scenes >= 1 and keyframes >= 1, got {config}")
    if not 0 <= config.sweeps <= 9:
        raise ValueError(f"sweeps must be in 0..9 (20 Hz sweeps between 2 Hz keyframes), got {config.sweeps}")
    if config.image_width < 16 or config.image_height < 16:
        raise ValueError(f"images must be at least 16 x 16, got {config.image_width} x {config.image_height}")
    if config.lidar_beams < 1 or config.lidar_azimuth_steps < 8:
        raise ValueError(f"need lidar_beams >= 1 and lidar_azimuth_steps >= 8, got {config}")


def _pose_record(token: str, ts: int, rot: np.ndarray, trans: np.ndarray):
    """ego_pose record plus the exact (rotation, translation) it encodes."""
    q = matrix_to_quat(rot)
    tr = [float(v) for v in trans]
    return {"token": token, "timestamp": ts, "rotation": q, "translation": tr}, quat_to_matrix(q), np.array(tr)


def _box_quat(yaw: float) -> list[float]:
    yaw = float(np.angle(np.exp(1j * yaw)))
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def _points_in_box(points: np.ndarray, centre, size_wlh, yaw: float) -> np.ndarray:
    """(n,) bool: global points (n, 3) inside a box given as nuScenes centre, [w, l, h], yaw."""
    c, s = np.cos(yaw), np.sin(yaw)
    rel = points - np.asarray(centre)
    x = rel[:, 0] * c + rel[:, 1] * s
    y = -rel[:, 0] * s + rel[:, 1] * c
    w, l, h = size_wlh
    return (np.abs(x) <= l / 2) & (np.abs(y) <= w / 2) & (np.abs(rel[:, 2]) <= h / 2)


class _SceneWriter:
    """Generates one scene's world, renders it and appends its records to the shared tables."""

    def __init__(self, root: Path, version: str, config: SampleConfig, tables: dict[str, list]):
        self.root, self.version, self.cfg, self.tables = root, version, config, tables
        self.colours = np.array([NUSCENES_CATEGORY_COLOURS[i] for i in range(32)], float)
        self.int_mean = np.full(32, 20.0)
        self.int_std = np.full(32, 8.0)
        for lab, (m, sd) in _INTENSITY.items():
            self.int_mean[lab], self.int_std[lab] = m, sd
        lo, hi = np.radians(-30.67), np.radians(10.67)
        self.elev = np.linspace(lo, hi, config.lidar_beams) if config.lidar_beams > 1 else np.zeros(1)

    def tok(self, *parts) -> str:
        return _token(self.cfg.seed, self.scene, *parts)

    def write(self, index: int, scene: str) -> None:
        """Generate scene number `index` (named `scene`): files on disk, records into the tables."""
        cfg, self.scene = self.cfg, scene
        rng = np.random.default_rng([cfg.seed, index])
        self.world = world = _World(rng, (cfg.keyframes - 1) * 0.5 + 0.1)
        # scene start somewhere in 2018, in microseconds
        base = int(rng.integers(1514851200, 1546214400)) * 10**6 + int(rng.integers(0, 10**6))
        start = _dt.datetime.fromtimestamp(base // 10**6 - int(rng.integers(60, 900)), _dt.timezone.utc)
        local = start + _dt.timedelta(hours=8)
        self.logfile = f"n015-{local:%Y-%m-%d-%H-%M-%S}+0800"
        log_token = self.tok("log")
        self.tables["log"].append({"token": log_token, "logfile": self.logfile, "vehicle": "n015",
                                   "date_captured": f"{local:%Y-%m-%d}", "location": LOCATION})
        self._calibrate(rng)
        kf_ts = [base + 500000 * k + (int(rng.integers(-400, 400)) if k else 0)
                 for k in range(cfg.keyframes)]
        samples = [self.tok("sample", k) for k in range(cfg.keyframes)]
        for k, ts in enumerate(kf_ts):
            self.tables["sample"].append({"token": samples[k], "timestamp": ts,
                                          "prev": samples[k - 1] if k else "",
                                          "next": samples[k + 1] if k + 1 < cfg.keyframes else "",
                                          "scene_token": self.tok("scene")})
        self.chains: dict[str, list[dict]] = {ch: [] for ch in SENSORS}
        self.instances: dict[int, list[dict]] = {}
        for k, ts in enumerate(kf_ts):
            for j in range(cfg.sweeps, 0, -1):
                self._lidar(samples[k], ts - 50000 * j + int(rng.integers(-150, 150)), base, rng, None)
            self._lidar(samples[k], ts, base, rng, k)
            for ch in CAMERAS:
                cam_ts = ts + _CAM_OFFSET_US[ch] + int(rng.integers(-60, 60))
                self._camera(ch, samples[k], cam_ts, base, rng)
        for chain in self.chains.values():  # prev/next per channel, in time order
            chain.sort(key=lambda r: r["timestamp"])
            for a, b in zip(chain[:-1], chain[1:]):
                a["next"], b["prev"] = b["token"], a["token"]
            self.tables["sample_data"].extend(chain)
        self._instances()
        self.tables["scene"].append({"token": self.tok("scene"), "log_token": log_token,
                                     "nbr_samples": cfg.keyframes, "first_sample_token": samples[0],
                                     "last_sample_token": samples[-1], "name": scene,
                                     "description": world.describe()})

    def _calibrate(self, rng: np.random.Generator) -> None:
        """One calibrated_sensor per channel and scene: real n015 calibration + tiny jitter."""
        w, h = self.cfg.image_width, self.cfg.image_height
        self.calib: dict[str, tuple[str, np.ndarray, np.ndarray, np.ndarray]] = {}
        for ch, (sensor_tok, trans, quat, fx, cx, cy) in SENSORS.items():
            jitter = rotation_matrix(*np.radians(rng.normal(0.0, 0.1, 3)))
            q = matrix_to_quat(jitter @ quat_to_matrix(quat))
            t = [float(v) for v in np.round(np.array(trans) + rng.normal(0.0, 0.005, 3), 6)]
            k = np.zeros((0, 0))
            if ch != "LIDAR_TOP":
                sx, sy = w / 1600, h / 900  # intrinsics of the 1600 x 900 camera, scaled
                k = np.array([[fx * sx, 0.0, cx * sx], [0.0, fx * sy, cy * sy], [0.0, 0.0, 1.0]])
            token = self.tok("calibrated_sensor", ch)
            self.tables["calibrated_sensor"].append({"token": token, "sensor_token": sensor_tok,
                                                     "translation": t, "rotation": q,
                                                     "camera_intrinsic": k.tolist()})
            self.calib[ch] = (token, quat_to_matrix(q), np.array(t), k)

    def _sample_data(self, ch: str, sample: str, ts: int, key: bool, filename: str, base: int, wh=(0, 0)):
        """Append the sample_data + ego_pose records; return (token, ego rotation, ego translation, t)."""
        token = self.tok("sample_data", ch, ts)
        t = (ts - base) / 1e6
        rec, r_e, t_e = _pose_record(token, ts, *self.world.ego_pose(t))
        self.tables["ego_pose"].append(rec)
        self.chains[ch].append({"token": token, "sample_token": sample, "ego_pose_token": token,
                                "calibrated_sensor_token": self.calib[ch][0], "timestamp": ts,
                                "fileformat": "pcd" if ch == "LIDAR_TOP" else "jpg", "is_key_frame": key,
                                "height": wh[1], "width": wh[0], "filename": filename, "prev": "", "next": ""})
        return token, r_e, t_e, t

    def _lidar(self, sample: str, ts: int, base: int, rng: np.random.Generator, key: int | None) -> None:
        """Ray-cast one LIDAR_TOP sweep at `ts` (us); keyframe `key` also writes lidarseg + boxes.

        Writes an (N, 5) float32 .pcd.bin; for keyframes an (N,) uint8 lidarseg file in the same
        point order.
        """
        folder = "samples" if key is not None else "sweeps"
        filename = f"{folder}/LIDAR_TOP/{self.logfile}__LIDAR_TOP__{ts}.pcd.bin"
        token, r_e, t_e, t = self._sample_data("LIDAR_TOP", sample, ts, key is not None, filename, base)
        _, r_l, t_l, _ = self.calib["LIDAR_TOP"]
        n_az = self.cfg.lidar_azimuth_steps
        step = 2 * np.pi / n_az
        az = np.pi - step * np.arange(n_az) - rng.uniform(0.0, step)
        prims = self.world.prims_at(t)
        hits = raycast_lidar(prims, self.world.ground_labels, r_e @ t_l + t_e, r_e @ r_l, az,
                             self.elev, LIDAR_RANGE)
        noise = rng.normal(0.0, 0.01, hits.t.shape)  # 1 cm range noise
        pts = np.where(np.isfinite(hits.t), hits.t + noise, 0.0)[..., None] * hits.dirs  # (A, R, 3)
        ego = pts @ r_l.T + t_l
        x0, x1, ymax, zmax = _EGO_BOX
        in_ego = ((ego[..., 0] > x0) & (ego[..., 0] < x1) & (np.abs(ego[..., 1]) < ymax)
                  & (ego[..., 2] < zmax))
        keep = np.isfinite(hits.t) & (hits.t >= 1.0) & ~in_ego  # (A, R), azimuth-major like nuScenes
        lab = hits.label[keep]
        inten = self.int_mean[lab] + self.int_std[lab] * rng.standard_normal(len(lab))
        inten = np.clip(np.rint(inten), 0, 255)
        ring = np.broadcast_to(np.arange(len(self.elev), dtype=np.float64), keep.shape)[keep]
        cloud = np.column_stack([pts[keep], inten, ring]).astype(np.float32)
        path = self.root / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        cloud.tofile(path)
        if key is None:
            return
        seg = f"lidarseg/{self.version}/{token}_lidarseg.bin"
        (self.root / seg).parent.mkdir(parents=True, exist_ok=True)
        lab.astype(np.uint8).tofile(self.root / seg)
        self.tables["lidarseg"].append({"token": token, "sample_data_token": token, "filename": seg})
        glob = (cloud[:, :3].astype(np.float64) @ r_l.T + t_l) @ r_e.T + t_e
        self._annotate(sample, prims, hits, glob, t_e)

    def _annotate(self, sample: str, prims: Prims, hits, glob: np.ndarray, ego_t: np.ndarray) -> None:
        """sample_annotation records for every thing within range of the ego at this keyframe."""
        counts = np.bincount(hits.obj[hits.obj >= 0], minlength=prims.box_obj.max() + 1)
        for k, obj in enumerate(self.world.boxes):
            c = prims.box_centre[k]
            if not obj["annotate"] or np.linalg.norm(c[:2] - ego_t[:2]) > LIDAR_RANGE:
                continue
            l, w, h = obj["size"]
            # the object's geometry grown by 5 cm a side (lidar range noise is 1 cm), bottom 5 cm
            # above the ground so that ground returns next to the object stay outside
            size = [round(w + 0.1, 3), round(l + 0.1, 3), round(h, 3)]
            centre = [round(float(c[0]), 3), round(float(c[1]), 3), round(0.05 + h / 2, 3)]
            yaw = float(prims.box_yaw[k])
            n_pts = int(_points_in_box(glob, centre, size, yaw).sum())
            ratio = counts[obj["obj"]] / hits.self_hits[k] if hits.self_hits[k] else 0.0
            vis = "1" if ratio <= 0.4 else "2" if ratio <= 0.6 else "3" if ratio <= 0.8 else "4"
            rec = {"token": self.tok("sample_annotation", obj["obj"], sample), "sample_token": sample,
                   "instance_token": self.tok("instance", obj["obj"]), "visibility_token": vis,
                   "attribute_tokens": [_ATTR_TOKEN[obj["attr"]]] if obj["attr"] else [],
                   "translation": centre, "size": size, "rotation": _box_quat(yaw),
                   "prev": "", "next": "", "num_lidar_pts": n_pts, "num_radar_pts": 0}
            self.instances.setdefault(obj["obj"], []).append(rec)

    def _instances(self) -> None:
        cat_tok = {i: _category_token(name) for i, (name, _) in enumerate(NUSCENES_CATEGORIES)}
        for obj, anns in sorted(self.instances.items()):
            for a, b in zip(anns[:-1], anns[1:]):
                a["next"], b["prev"] = b["token"], a["token"]
            self.tables["sample_annotation"].extend(anns)
            self.tables["instance"].append({
                "token": anns[0]["instance_token"],
                "category_token": cat_tok[self.world.boxes[obj]["label"]],
                "nbr_annotations": len(anns), "first_annotation_token": anns[0]["token"],
                "last_annotation_token": anns[-1]["token"]})

    def _camera(self, ch: str, sample: str, ts: int, base: int, rng: np.random.Generator) -> None:
        """Render camera `ch` at `ts` (us) from the ego pose at that time; write the JPEG."""
        w, h = self.cfg.image_width, self.cfg.image_height
        filename = f"samples/{ch}/{self.logfile}__{ch}__{ts}.jpg"
        _, r_e, t_e, t = self._sample_data(ch, sample, ts, True, filename, base, (w, h))
        _, r_c, t_c, k = self.calib[ch]
        maps: dict = {}
        img = render_camera(self.world.prims_at(t), self.world.ground_labels, self.colours,
                            r_e @ t_c + t_e, r_e @ r_c, k, w, h, rng, maps=maps)
        path = self.root / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, format="JPEG", quality=92)
        write_class_map(self.root, filename, EVAL_LABEL[maps["label"]], maps["depth"], maps["instance"])


# Fine category index -> nuScenes-lidarseg evaluation label 1..16 (0 = ignore or sky).
EVAL_LABEL = np.zeros(256, np.uint8)
for _i, (_name, _) in enumerate(NUSCENES_CATEGORIES):
    if _name in FINE_TO_COARSE:
        EVAL_LABEL[_i] = NUSCENES_CLASSES.index(FINE_TO_COARSE[_name]) + 1


def _category_token(name: str) -> str:
    return hashlib.md5(f"nuscenes-lidarseg-category/{name}".encode()).hexdigest()


TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "lidarseg", "log",
          "map", "sample", "sample_annotation", "sample_data", "scene", "sensor", "visibility")


def make_sample(out: str | Path, config: SampleConfig = SampleConfig()) -> Path:
    """Write a synthetic nuScenes dataroot at `out` and return it.

    Layout: `<out>/<version>/*.json` (the 14 tables in `TABLES`), `samples/LIDAR_TOP/*.pcd.bin`
    (float32 x 5: x, y, z, intensity, ring), `sweeps/LIDAR_TOP/*.pcd.bin`, `samples/CAM_*/*.jpg`
    (uint8 RGB, image_height x image_width), `lidarseg/<version>/<sd_token>_lidarseg.bin` (uint8
    per keyframe point), `maps/<token>.png` (placeholder); outside the nuScenes layout, one
    per-pixel class map per camera image under `clip2scene-classmaps/` (see
    `clip2scene.precompute.teacher.classmaps`; the simulated teacher reads them). Raises FileExistsError if `out` exists
    and is non-empty, ValueError for an invalid config.
    """
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty directory")
    _check(config)
    version, names = scene_names(config.scenes)
    root.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list] = {name: [] for name in TABLES}
    tables["category"] = [{"token": _category_token(n), "name": n, "description": d, "index": i}
                          for i, (n, d) in enumerate(NUSCENES_CATEGORIES)]
    tables["attribute"] = [{"token": t, "name": n, "description": d} for t, n, d in ATTRIBUTES]
    tables["visibility"] = [{"description": f"visibility of whole object is between {a} and {b}%",
                             "token": str(i + 1), "level": f"v{a}-{b}"}
                            for i, (a, b) in enumerate([(0, 40), (40, 60), (60, 80), (80, 100)])]
    tables["sensor"] = [{"token": v[0], "channel": ch, "modality": "lidar" if ch == "LIDAR_TOP" else "camera"}
                        for ch, v in SENSORS.items()]
    writer = _SceneWriter(root, version, config, tables)
    for i, name in enumerate(names):
        writer.write(i, name)
        log.info("synthetic nuScenes: wrote %s (%d/%d)", name, i + 1, len(names))
    map_token = _token(config.seed, "map", LOCATION)
    map_file = f"maps/{map_token}.png"
    (root / "maps").mkdir(exist_ok=True)
    Image.new("L", (8, 8), 0).save(root / map_file, format="PNG")
    tables["map"] = [{"category": "semantic_prior", "token": map_token, "filename": map_file,
                      "log_tokens": [r["token"] for r in tables["log"]]}]
    (root / version).mkdir(exist_ok=True)
    for name, records in tables.items():
        (root / version / f"{name}.json").write_text(json.dumps(records, indent=0))
    log.info("synthetic nuScenes %s: %d scenes, %d samples, %d sample_data at %s", version, len(names),
             len(tables["sample"]), len(tables["sample_data"]), root)
    return root


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m clip2scene.samples.nuscenes OUT [--scenes N --keyframes K ... --seed S]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    for field, default in SampleConfig.__dataclass_fields__.items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=default.default)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    make_sample(args.pop("out"), SampleConfig(**args))


if __name__ == "__main__":
    main()
