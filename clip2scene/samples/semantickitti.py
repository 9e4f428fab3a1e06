"""Synthetic SemanticKITTI generator: a small, deterministic, fully labelled stand-in in the official layout.

`make_semantickitti_sample(out, KittiSampleConfig(...))` builds, per sequence, one 3D street world
in a z-up map frame (metres): a ground plane striped into road (with a dashed lane marking),
sidewalks, a parking strip and terrain; buildings along both sides and one across the road ahead
(a wall facing the ego car); trees (trunk box + vegetation crown), bushes, fences, poles with
traffic signs, parked cars, pedestrians, and one oncoming car that moves (raw id 252
moving-car). It then drives an ego car through it at 10 Hz and renders every frame two ways:

- velodyne: an HDL-64E-like spinning lidar (elevations +2 .. -24.8 deg, 1.73 m above ground)
  ray-cast at the frame's time; each point gets the raw SemanticKITTI id of the surface it hit
  (lower 16 bits) and an instance id for cars and people (upper 16 bits). Remission is a per-class
  value plus noise, in [0, 1). No return = no point.
- image_2: the left colour camera ray-cast once per pixel through P2 at the same time, each surface
  in its class colour (`PALETTE`, the semantic-kitti.yaml colour map as RGB), sky elsewhere. Pixel
  (col, row) is the ray through the integer pixel centre, so a lidar point projected with
  Tr and P2 lands on a pixel of its own class colour (up to edges and the lidar/camera parallax).

Files per sequence (`<out>/sequences/XX/`): velodyne/NNNNNN.bin (float32 x 4: x, y, z,
remission), labels/NNNNNN.label (uint32; only for non-test sequences, like the real download),
image_2/NNNNNN.png (RGB uint8), calib.txt (P0..P3, Tr with KITTI-like values, intrinsics scaled to
the image size), poses.txt (camera-0 poses relative to frame 0, consistent with the ego motion:
gentle yaw, small pitch/roll), times.txt (0.1 s steps). Deterministic given the seed (files are
byte-identical); the default (2 sequences x 4 frames) takes well under 2 s.

Run: ``python -m clip2scene.samples.semantickitti OUT_DIR [--sequences 00 08 --frames 4 --seed 0]``.
Numpy + Pillow only; self-contained (imports no other clip2scene module).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from clip2scene.samples.render import rotation_matrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KittiSampleConfig:
    """What to generate. Defaults: sequences 00 (train) and 08 (val), 4 frames each, in < 2 s."""

    sequences: tuple[str, ...] = ("00", "08")  # two-digit sequence folders (00-07,09,10 train; 08 val; 11-21 test)
    frames: int = 4                 # frames per sequence, 0.1 s apart
    image_width: int = 320          # image_2 width (KITTI 1241 scaled down); fx, cx scaled to match
    image_height: int = 96          # image_2 height (KITTI 376 scaled down); fy, cy scaled to match
    lidar_beams: int = 32           # rings, elevations evenly spread over +2 .. -24.8 deg (HDL-64E span)
    lidar_azimuth_steps: int = 512  # rays per ring per revolution
    seed: int = 0                   # everything is deterministic given the seed


TEST_SEQUENCES = tuple(f"{i:02d}" for i in range(11, 22))  # official test split: no labels written

# Raw SemanticKITTI id -> RGB colour (semantic-kitti.yaml `color_map`, which lists BGR).
PALETTE: dict[int, tuple[int, int, int]] = {
    10: (100, 150, 245),   # car
    252: (100, 150, 245),  # moving-car
    30: (255, 30, 30),     # person
    40: (255, 0, 255),     # road
    44: (255, 150, 255),   # parking
    48: (75, 0, 75),       # sidewalk
    50: (255, 200, 0),     # building
    51: (255, 120, 50),    # fence
    60: (150, 255, 170),   # lane-marking
    70: (0, 175, 0),       # vegetation
    71: (135, 60, 0),      # trunk
    72: (150, 240, 80),    # terrain
    80: (255, 240, 150),   # pole
    81: (255, 0, 0),       # traffic-sign
}
SKY = (120, 170, 230)

# Raw id -> mean remission (noise sd REMISSION_NOISE added per point, clipped to [0, 0.99]).
REMISSION: dict[int, float] = {
    10: 0.30, 252: 0.30, 30: 0.25, 40: 0.22, 44: 0.26, 48: 0.30, 50: 0.35, 51: 0.40,
    60: 0.65, 70: 0.15, 71: 0.20, 72: 0.18, 80: 0.45, 81: 0.90,
}
REMISSION_NOISE = 0.03

LIDAR_HEIGHT = 1.73  # m above the ground
LIDAR_ELEVATION = (2.0, -24.8)  # degrees, top and bottom beam
LIDAR_MAX_RANGE = 80.0
CAMERA_MAX_RANGE = 500.0
EGO_LANE_Y = -1.75  # the ego car drives in the right lane; road is |y| < ROAD_HALF
ROAD_HALF, SIDEWALK_HALF = 5.0, 7.5

# KITTI odometry camera geometry (sequence 00 values), scaled to the image size.
KITTI_SIZE = (1241, 376)
KITTI_F, KITTI_CX, KITTI_CY = 718.856, 607.1928, 185.2157
# P_i = K [I | b_i]: offset of rectified camera i in the camera-0 frame (m).
CAMERA_OFFSETS = {
    "P0": (0.0, 0.0, 0.0),
    "P1": (-0.5372, 0.0, 0.0),
    "P2": (0.05985, -0.000358, 0.002746),
    "P3": (-0.4731, 0.0023, 0.003689),
}
# Tr: velodyne (x fwd, y left, z up) -> camera (x right, y down, z fwd), plus a small misalignment.
VELO_TO_CAM = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
TR_MISALIGNMENT = (4.0e-4, 7.2e-3, -8.1e-3)  # yaw, pitch, roll in the velodyne frame (rad)
TR_TRANSLATION = (-0.0120, -0.0540, -0.2922)  # camera-frame position of the velodyne origin


def _as_written(m: np.ndarray) -> np.ndarray:
    """The matrix as the text files store it (%.12e), so the generator uses what a reader parses."""
    return np.array([float(f"{x:.12e}") for x in np.ravel(m)]).reshape(np.shape(m))


def _row(m: np.ndarray) -> str:
    return " ".join(f"{x:.12e}" for x in np.ravel(m))


def calibration(width: int, height: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """KITTI-like calibration for an image of width x height: ({"P0".."P3": (3, 4)}, Tr (4, 4)),
    float64, already rounded to the digits calib.txt stores."""
    sx, sy = width / KITTI_SIZE[0], height / KITTI_SIZE[1]
    k = np.array([[KITTI_F * sx, 0.0, KITTI_CX * sx], [0.0, KITTI_F * sy, KITTI_CY * sy], [0.0, 0.0, 1.0]])
    proj = {name: _as_written(k @ np.hstack([np.eye(3), np.asarray(b)[:, None]])) for name, b in CAMERA_OFFSETS.items()}
    tr = np.eye(4)
    tr[:3, :3] = VELO_TO_CAM @ rotation_matrix(*TR_MISALIGNMENT)
    tr[:3, 3] = TR_TRANSLATION
    tr[:3] = _as_written(tr[:3])
    return proj, tr


# ----------------------------------------------------------------------------------------------
# world
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """One sequence's scene in the map frame (z up). Labels are uint32 raw | instance << 16."""

    box_centre: np.ndarray  # (B, 3) float64 at t = 0
    box_velocity: np.ndarray  # (B, 3) float64 m/s
    box_yaw: np.ndarray  # (B,) float64 rad about z
    box_half: np.ndarray  # (B, 3) float64 half extents along the box's x, y, z
    box_label: np.ndarray  # (B,) uint32
    ell_centre: np.ndarray  # (E, 3) float64 spheroid centres
    ell_radii: np.ndarray  # (E, 3) float64
    ell_label: np.ndarray  # (E,) uint32
    parking_x: tuple[float, float]  # x range of the parking strip (left side, 5 < y < 7.5)

    def ground_label(self, xy: np.ndarray) -> np.ndarray:
        """(n, 2) map xy on the ground -> (n,) uint32 raw id."""
        x, y = xy[:, 0], xy[:, 1]
        ay = np.abs(y)
        lab = np.full(len(xy), 72, np.uint32)  # terrain
        lab[ay < SIDEWALK_HALF] = 48
        lab[(y > ROAD_HALF) & (y < SIDEWALK_HALF) & (x > self.parking_x[0]) & (x < self.parking_x[1])] = 44
        lab[ay < ROAD_HALF] = 40
        lab[(ay < 0.12) & (np.mod(x, 6.0) < 3.0)] = 60
        return lab


def build_world(rng: np.random.Generator) -> World:
    """A random street (see module docstring); ego starts near (0, EGO_LANE_Y) heading +x."""
    boxes: list[tuple] = []  # (label, centre, half, yaw, velocity)
    ells: list[tuple] = []
    next_instance = [1]

    def thing(raw: int) -> int:
        inst = next_instance[0]
        next_instance[0] += 1
        return raw | (inst << 16)

    def box(label, centre, half, yaw=0.0, vel=(0.0, 0.0, 0.0)):
        boxes.append((label, centre, half, yaw, vel))

    def car(label, x, y, yaw=0.0, vel=(0.0, 0.0, 0.0)):
        box(label, (x, y, 0.75), (2.2, 0.9, 0.55), yaw, vel)  # body 0.2 .. 1.3 m
        box(label, (x - 0.3, y, 1.6), (1.2, 0.8, 0.3), yaw, vel)  # cabin
        box(label, (x, y, 0.1), (1.9, 0.85, 0.1), yaw, vel)  # underbody to the ground

    for side in (-1.0, 1.0):
        x = -45.0 + rng.uniform(0.0, 3.0)
        while x < 24.0:
            x1 = min(x + rng.uniform(8.0, 14.0), 26.0)
            face, depth, h = 11.0 + rng.uniform(0.0, 1.5), rng.uniform(5.0, 8.0), rng.uniform(5.0, 10.0)
            box(50, ((x + x1) / 2, side * (face + depth / 2), h / 2), ((x1 - x) / 2, depth / 2, h / 2))
            x = x1 + rng.uniform(2.0, 5.0)
        fx = rng.uniform(-30.0, 10.0)
        box(51, (fx, side * 10.3, 0.6), (rng.uniform(3.0, 6.0), 0.04, 0.6))
        for tx in np.sort(rng.uniform(-35.0, 22.0, 3)):
            box(71, (tx, side * 9.2, 1.3), (0.18, 0.18, 1.3))
            ells.append((70, (tx, side * 9.2, 3.6), (1.5, 1.5, 1.4)))
        for bx in rng.uniform(-35.0, 22.0, 2):
            ells.append((70, (bx, side * 8.3, 0.2), (1.0, 0.7, 0.7)))
        for i, px in enumerate(np.arange(-40.0, 25.0, 12.0) + rng.uniform(0.0, 4.0)):
            box(80, (px, side * 7.2, 2.5), (0.1, 0.1, 2.5))
            if i % 2 == 0:
                box(81, (px - 0.15, side * 7.2, 3.6), (0.04, 0.4, 0.35))
        for cx in (rng.uniform(-32.0, -8.0), rng.uniform(7.0, 22.0)):
            car(thing(10), cx, side * 4.1, yaw=rng.uniform(-0.05, 0.05))
        box(thing(30), (rng.uniform(4.0, 18.0), side * 6.0, 0.87), (0.25, 0.3, 0.87), yaw=rng.uniform(0, np.pi))
    xe = rng.uniform(28.0, 32.0)
    box(50, (xe + 5.0, 0.0, 3.0), (5.0, 30.0, 3.0))  # building across the road ahead (its face: a wall)
    car(thing(252), rng.uniform(14.0, 20.0), 1.75, yaw=np.pi, vel=(-rng.uniform(6.0, 9.0), 0.0, 0.0))
    px0 = rng.uniform(-25.0, -5.0)

    lab, cen, half, yaw, vel = zip(*boxes)
    elab, ecen, erad = zip(*ells)
    return World(
        box_centre=np.asarray(cen, np.float64), box_velocity=np.asarray(vel, np.float64),
        box_yaw=np.asarray(yaw, np.float64), box_half=np.asarray(half, np.float64),
        box_label=np.asarray(lab, np.uint32), ell_centre=np.asarray(ecen, np.float64),
        ell_radii=np.asarray(erad, np.float64), ell_label=np.asarray(elab, np.uint32),
        parking_x=(px0, px0 + 12.0),
    )


def _near_rays(origin: np.ndarray, dirs: np.ndarray, centre: np.ndarray, radius: float, best: np.ndarray
               ) -> np.ndarray:
    """Indices of the rays that pass within `radius` of `centre` before their current best hit."""
    rel = centre - origin
    along = dirs @ rel
    perp2 = rel @ rel - along * along
    return np.flatnonzero((perp2 < radius * radius) & (along > -radius) & (along - radius < best))


def raycast(world: World, origin: np.ndarray, dirs: np.ndarray, t: float, max_range: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of rays origin + s * dirs (dirs (n, 3) unit, origin (3,)) with the world at time
    t: distance (n,) float64 (max_range where nothing is hit) and label (n,) uint32 (0 = no hit)."""
    n = len(dirs)
    best = np.full(n, float(max_range))
    label = np.zeros(n, np.uint32)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = -origin[2] / dirs[:, 2]
    hit = (dirs[:, 2] < -1e-9) & (s < best)
    best[hit] = s[hit]
    label[hit] = world.ground_label(origin[:2] + s[hit, None] * dirs[hit, :2])
    centres = world.box_centre + world.box_velocity * t
    for c, yaw, h, lab in zip(centres, world.box_yaw, world.box_half, world.box_label):
        cand = _near_rays(origin, dirs, c, float(np.linalg.norm(h)), best)
        if cand.size == 0:
            continue
        d = dirs[cand]
        cy, sy = np.cos(yaw), np.sin(yaw)
        rel = origin - c
        o = (cy * rel[0] + sy * rel[1], -sy * rel[0] + cy * rel[1], rel[2])  # origin in the box frame
        local = (cy * d[:, 0] + sy * d[:, 1], -sy * d[:, 0] + cy * d[:, 1], d[:, 2])
        near = np.full(len(cand), -np.inf)
        far = np.full(len(cand), np.inf)
        for dd, oo, hh in zip(local, o, h):  # slab test, one axis at a time
            dd = np.where(np.abs(dd) < 1e-12, 1e-12, dd)
            t1, t2 = (-hh - oo) / dd, (hh - oo) / dd
            near = np.maximum(near, np.minimum(t1, t2))
            far = np.minimum(far, np.maximum(t1, t2))
        hit = (near <= far) & (near > 1e-6) & (near < best[cand])
        best[cand[hit]] = near[hit]
        label[cand[hit]] = lab
    for c, r, lab in zip(world.ell_centre, world.ell_radii, world.ell_label):
        cand = _near_rays(origin, dirs, c, float(r.max()), best)
        if cand.size == 0:
            continue
        o, d = (origin - c) / r, dirs[cand] / r
        a = np.einsum("ij,ij->i", d, d)
        b = 2.0 * (d @ o)
        disc = b * b - 4.0 * a * (o @ o - 1.0)
        with np.errstate(invalid="ignore"):
            s = (-b - np.sqrt(disc)) / (2.0 * a)
        hit = (disc >= 0) & (s > 1e-6) & (s < best[cand])
        best[cand[hit]] = s[hit]
        label[cand[hit]] = lab
    return best, label


def ego_poses(rng: np.random.Generator, frames: int) -> np.ndarray:
    """(frames, 4, 4) float64 velodyne -> map poses at t = 0.1 k: constant speed and yaw rate,
    lidar LIDAR_HEIGHT above the ground, small pitch/roll oscillation."""
    v, w = rng.uniform(7.0, 9.0), rng.choice([-1.0, 1.0]) * rng.uniform(0.05, 0.12)
    phase = rng.uniform(0.0, 2 * np.pi)
    out = np.tile(np.eye(4), (frames, 1, 1))
    for k in range(frames):
        t = 0.1 * k
        out[k, :3, :3] = rotation_matrix(w * t, 0.004 * np.sin(3.0 * t + phase), 0.003 * np.cos(2.0 * t + phase))
        out[k, :3, 3] = (v / w * np.sin(w * t), EGO_LANE_Y + v / w * (1.0 - np.cos(w * t)), LIDAR_HEIGHT)
    return out


def lidar_directions(beams: int, steps: int) -> np.ndarray:
    """(steps * beams, 3) float64 unit ray directions in the velodyne frame, azimuth-major."""
    elev = np.deg2rad(np.linspace(LIDAR_ELEVATION[0], LIDAR_ELEVATION[1], beams))
    az = 2.0 * np.pi * np.arange(steps) / steps
    az, elev = np.meshgrid(az, elev, indexing="ij")
    return np.stack([np.cos(elev) * np.cos(az), np.cos(elev) * np.sin(az), np.sin(elev)], -1).reshape(-1, 3)


def render_lidar(world: World, pose: np.ndarray, t: float, dirs: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One scan: points (n, 4) float32 [x, y, z, remission] in the velodyne frame, labels (n,) uint32."""
    dist, label = raycast(world, pose[:3, 3], dirs @ pose[:3, :3].T, t, LIDAR_MAX_RANGE)
    hit = label != 0
    xyz = dist[hit, None] * dirs[hit]
    lab = label[hit]
    base = np.zeros(1 << 16)
    for raw, r in REMISSION.items():
        base[raw] = r
    rem = np.clip(base[lab & 0xFFFF] + rng.normal(0.0, REMISSION_NOISE, len(lab)), 0.0, 0.99)
    return np.column_stack([xyz, rem]).astype("<f4"), lab.astype("<u4")


def render_image(world: World, cam0_pose: np.ndarray, p2: np.ndarray, t: float, width: int, height: int
                 ) -> np.ndarray:
    """(height, width, 3) uint8 image_2: class colours ray-cast through P2 = K [I | b] from the
    camera-2 centre (-b in the camera-0 frame); cam0_pose: camera-0 -> map (4, 4)."""
    k = p2[:, :3]
    b = np.linalg.solve(k, p2[:, 3])
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], 1)
    d_cam = pix @ np.linalg.inv(k).T
    d_map = d_cam @ cam0_pose[:3, :3].T
    d_map /= np.linalg.norm(d_map, axis=1, keepdims=True)
    origin = cam0_pose[:3, :3] @ (-b) + cam0_pose[:3, 3]
    _, label = raycast(world, origin, d_map, t, CAMERA_MAX_RANGE)
    lut = np.zeros((1 << 16, 3), np.uint8)
    lut[0] = SKY
    for raw, rgb in PALETTE.items():
        lut[raw] = rgb
    return lut[label & 0xFFFF].reshape(height, width, 3)


# ----------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------
def _check(config: KittiSampleConfig) -> None:
    seqs = config.sequences
    if not seqs or any(not (len(s) == 2 and s.isdigit()) for s in seqs) or len(set(seqs)) != len(seqs):
        raise ValueError(f"sequences must be distinct two-digit names like '08', got {seqs!r}")
    if config.frames < 1:
        raise ValueError(f"frames must be >= 1, got {config.frames}")
    if config.image_width < 8 or config.image_height < 8:
        raise ValueError(f"image must be at least 8x8, got {config.image_width}x{config.image_height}")
    if config.lidar_beams < 1 or config.lidar_azimuth_steps < 8:
        raise ValueError(f"need lidar_beams >= 1 and lidar_azimuth_steps >= 8, got "
                         f"{config.lidar_beams}, {config.lidar_azimuth_steps}")


def make_semantickitti_sample(out: str | Path, config: KittiSampleConfig = KittiSampleConfig()) -> Path:
    """Write a synthetic SemanticKITTI dataroot at `out` and return it.

    Layout: `<out>/sequences/XX/{velodyne/NNNNNN.bin, labels/NNNNNN.label, image_2/NNNNNN.png,
    calib.txt, poses.txt, times.txt}` for each of config.sequences (labels only for sequences
    outside the test split 11-21). Raises FileExistsError if `out` exists and is non-empty,
    ValueError for an invalid config.
    """
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty directory")
    _check(config)
    proj, tr = calibration(config.image_width, config.image_height)
    tr_inv = np.linalg.inv(tr)
    dirs = lidar_directions(config.lidar_beams, config.lidar_azimuth_steps)
    for seq in config.sequences:
        rng = np.random.default_rng([config.seed, int(seq)])
        world = build_world(rng)
        velo = ego_poses(rng, config.frames)
        cam0 = velo @ tr_inv  # camera-0 -> map
        poses = np.linalg.inv(cam0[0]) @ cam0  # camera-0 -> camera 0 of frame 0 (KITTI poses.txt)
        poses[0] = np.eye(4)
        d = root / "sequences" / seq
        labelled = seq not in TEST_SEQUENCES
        for sub in ("velodyne", "image_2") + (("labels",) if labelled else ()):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "calib.txt").write_text("".join(f"{n}: {_row(m)}\n" for n, m in proj.items()) + f"Tr: {_row(tr[:3])}\n")
        (d / "poses.txt").write_text("".join(_row(p[:3]) + "\n" for p in poses))
        (d / "times.txt").write_text("".join(f"{0.1 * k:.6e}\n" for k in range(config.frames)))
        n_points = 0
        for k in range(config.frames):
            t = 0.1 * k
            pts, lab = render_lidar(world, velo[k], t, dirs, np.random.default_rng([config.seed, int(seq), k]))
            pts.tofile(d / "velodyne" / f"{k:06d}.bin")
            if labelled:
                lab.tofile(d / "labels" / f"{k:06d}.label")
            img = render_image(world, cam0[k], proj["P2"], t, config.image_width, config.image_height)
            Image.fromarray(img).save(d / "image_2" / f"{k:06d}.png", format="PNG")
            n_points += len(pts)
        log.info("synthetic SemanticKITTI: sequence %s, %d frames, %d points", seq, config.frames, n_points)
    return root


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m clip2scene.samples.semantickitti OUT [--sequences 00 08 --frames 4 ... --seed 0]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    for f in fields(KittiSampleConfig):
        if f.name == "sequences":
            parser.add_argument("--sequences", nargs="+", default=list(f.default))
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    args = vars(parser.parse_args(argv))
    args["sequences"] = tuple(args["sequences"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    make_semantickitti_sample(args.pop("out"), KittiSampleConfig(**args))


if __name__ == "__main__":
    main()
