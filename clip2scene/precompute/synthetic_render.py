"""Vectorised ray casting for the synthetic nuScenes generator (numpy only).

The synthetic world (see `clip2scene.precompute.synthetic`) is made of three kinds of surface, all
in the nuScenes *global* frame (metres, z up):

- the ground plane z = 0, whose class at a point is given by a callback (road / sidewalk / terrain);
- upright boxes (`Prims.box_*`): centre, yaw about z, half extents (half length along the box's
  local x, half width along y, half height along z);
- vertical spheroids (`Prims.ell_*`): centre and radii (rx = ry, rz), used for tree crowns.

Two sensors ray-cast the same primitives:

- `raycast_lidar`: a spinning multi-beam lidar, rays on an (azimuth, ring) grid, with per-primitive
  azimuth culling so each primitive is only tested against the columns it can cover;
- `render_camera`: a pinhole camera, one ray per pixel, with per-primitive image-rectangle culling;
  the hit class is shaded (Lambertian sun + ambient, cast shadows, world-space texture, haze, sky).

There is no Python loop over rays or pixels; loops run over primitives only. Rotation helpers use
nuScenes' quaternion convention [w, x, y, z].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

GroundFn = Callable[[np.ndarray], np.ndarray]  # (n, 2) float64 global xy -> (n,) uint8 class index

SUN_DIRECTION = np.array([0.45, -0.30, 0.84]) / np.linalg.norm([0.45, -0.30, 0.84])
AMBIENT = 0.48
SKY_HORIZON = np.array([196.0, 214.0, 232.0])
SKY_ZENITH = np.array([92.0, 140.0, 205.0])
HAZE_COLOUR = np.array([200.0, 208.0, 218.0])
HAZE_DISTANCE = 450.0  # metres; haze weight = 1 - exp(-distance / HAZE_DISTANCE)


# ----------------------------------------------------------------------------------------------
# rotations
# ----------------------------------------------------------------------------------------------
def rotation_matrix(yaw: float, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """(3, 3) float64 rotation R = Rz(yaw) @ Ry(pitch) @ Rx(roll), angles in radians."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    rz = np.array([[cy, -sy, 0.0], [sy, cy, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cp, 0.0, sp], [0.0, 1.0, 0.0], [-sp, 0.0, cp]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cr, -sr], [0.0, sr, cr]])
    return rz @ ry @ rx


def quat_to_matrix(q) -> np.ndarray:
    """Quaternion [w, x, y, z] (any norm) -> (3, 3) float64 rotation matrix."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quat(r: np.ndarray) -> list[float]:
    """(3, 3) rotation matrix -> unit quaternion [w, x, y, z] as Python floats, with w >= 0."""
    m = np.asarray(r, dtype=np.float64)
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.asarray(q) / np.linalg.norm(q)
    if q[0] < 0:
        q = -q
    return [float(v) for v in q]


# ----------------------------------------------------------------------------------------------
# primitives
# ----------------------------------------------------------------------------------------------
@dataclass
class Prims:
    """The world's solid primitives at one instant, global frame, float64.

    box_centre (B, 3), box_yaw (B,), box_half (B, 3) = half (length, width, height),
    box_label (B,) uint8 fine class index, box_obj (B,) int64 object id;
    ell_centre (E, 3), ell_radii (E, 3), ell_label (E,), ell_obj (E,).
    """

    box_centre: np.ndarray
    box_yaw: np.ndarray
    box_half: np.ndarray
    box_label: np.ndarray
    box_obj: np.ndarray
    ell_centre: np.ndarray
    ell_radii: np.ndarray
    ell_label: np.ndarray
    ell_obj: np.ndarray

    @property
    def n_box(self) -> int:
        return len(self.box_yaw)

    def corners(self) -> np.ndarray:
        """(B + E, 8, 3) corners of every box, then of every spheroid's bounding box."""
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
        c, s = np.cos(self.box_yaw), np.sin(self.box_yaw)
        local = signs[None] * self.box_half[:, None]  # (B, 8, 3)
        bx = np.stack([c[:, None] * local[..., 0] - s[:, None] * local[..., 1],
                       s[:, None] * local[..., 0] + c[:, None] * local[..., 1],
                       local[..., 2]], -1) + self.box_centre[:, None]
        ex = signs[None] * self.ell_radii[:, None] + self.ell_centre[:, None]
        return np.concatenate([bx, ex], 0)

    def radius(self) -> np.ndarray:
        """(B + E,) bounding-sphere radius of every primitive."""
        return np.concatenate([np.linalg.norm(self.box_half, axis=1), self.ell_radii.max(1)])

    def centres(self) -> np.ndarray:
        """(B + E, 3) centres of every primitive."""
        return np.concatenate([self.box_centre, self.ell_centre], 0)


def intersect_prim(prims: Prims, k: int, origin: np.ndarray, dirs: np.ndarray):
    """Ray-primitive intersection for primitive k (boxes first, then spheroids).

    origin: (3,) or (n, 3) ray origins; dirs: (n, 3) unit directions (global frame).
    Returns t (n,) float64 entry distance (inf where missed or the origin is inside) and
    normal (n, 3) outward unit normal at the entry point.
    """
    if k < prims.n_box:
        c, s = np.cos(prims.box_yaw[k]), np.sin(prims.box_yaw[k])
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])  # local -> global
        o_l = (origin - prims.box_centre[k]) @ rot
        d_l = dirs @ rot
        d_l = np.where(np.abs(d_l) < 1e-12, 1e-12, d_l)
        half = prims.box_half[k]
        t1 = (-half - o_l) / d_l
        t2 = (half - o_l) / d_l
        tnear = np.minimum(t1, t2)
        tmin = tnear.max(1)
        tmax = np.maximum(t1, t2).min(1)
        hit = (tmax >= tmin) & (tmin > 0.0)
        t = np.where(hit, tmin, np.inf)
        axis = tnear.argmax(1)
        n_l = np.zeros_like(d_l)
        rows = np.arange(len(d_l))
        n_l[rows, axis] = -np.sign(d_l[rows, axis])
        return t, n_l @ rot.T
    e = k - prims.n_box
    radii = prims.ell_radii[e]
    o_s = (origin - prims.ell_centre[e]) / radii
    d_s = dirs / radii
    a = (d_s * d_s).sum(-1)
    b = (o_s * d_s).sum(-1) if o_s.ndim == 2 else d_s @ o_s
    cc = (o_s * o_s).sum(-1) - 1.0
    disc = b * b - a * cc
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0 = (-b - sq) / a
    hit = (disc >= 0.0) & (t0 > 0.0)
    t = np.where(hit, t0, np.inf)
    p = origin + np.where(hit, t0, 0.0)[:, None] * dirs - prims.ell_centre[e]
    n = p / (radii * radii)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return t, n


def _ground_t(origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """(n,) distance to the plane z = 0 along each ray (inf if the ray does not go down)."""
    dz = dirs[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -origin[2] / dz
    return np.where((dz < -1e-9) & (t > 0), t, np.inf)


# ----------------------------------------------------------------------------------------------
# lidar
# ----------------------------------------------------------------------------------------------
@dataclass
class LidarHits:
    """Nearest hit per ray on an (A azimuth columns, R rings) grid.

    t (A, R) float64 range (inf = no hit), label (A, R) uint8, obj (A, R) int64 (-1 = ground),
    self_hits (P,) int64: rays that would hit primitive p were nothing else there (within range).
    """

    t: np.ndarray
    label: np.ndarray
    obj: np.ndarray
    self_hits: np.ndarray


def raycast_lidar(prims: Prims, ground_fn: GroundFn, origin: np.ndarray, r_sensor: np.ndarray,
                  azimuths: np.ndarray, elevations: np.ndarray, max_range: float) -> LidarHits:
    """Cast the lidar's rays into the world.

    origin: (3,) sensor position (global); r_sensor: (3, 3) sensor-to-global rotation;
    azimuths: (A,) radians in the sensor frame, strictly decreasing by 2*pi/A per column;
    elevations: (R,) radians. Ray (a, e) has sensor-frame direction
    (cos e cos a, cos e sin a, sin e).
    """
    n_az, n_el = len(azimuths), len(elevations)
    ce, se = np.cos(elevations), np.sin(elevations)
    d_sensor = np.stack([np.cos(azimuths)[:, None] * ce[None], np.sin(azimuths)[:, None] * ce[None],
                         np.broadcast_to(se[None], (n_az, n_el))], -1)  # (A, R, 3)
    dirs = d_sensor @ r_sensor.T
    flat = dirs.reshape(-1, 3)
    t_best = _ground_t(origin, flat).reshape(n_az, n_el)
    t_best[t_best > max_range] = np.inf
    ground = np.isfinite(t_best)
    label = np.zeros((n_az, n_el), np.uint8)
    if ground.any():
        pts = origin[:2] + t_best[ground][:, None] * dirs[ground][:, :2]
        label[ground] = ground_fn(pts)
    obj = np.full((n_az, n_el), -1, np.int64)

    n_prim = prims.n_box + len(prims.ell_radii)
    self_hits = np.zeros(n_prim, np.int64)
    if n_prim == 0:
        return LidarHits(t_best, label, obj, self_hits)
    centres, radius = prims.centres(), prims.radius()
    near = np.linalg.norm(centres - origin, axis=1) - radius < max_range
    corners_s = (prims.corners() - origin) @ r_sensor  # sensor frame, (P, 8, 3)
    step = 2 * np.pi / n_az
    a0 = azimuths[0]
    labels_all = np.concatenate([prims.box_label, prims.ell_label])
    objs_all = np.concatenate([prims.box_obj, prims.ell_obj])
    for k in np.flatnonzero(near):
        cxy = corners_s[k, :, :2]
        if np.linalg.norm(centres[k, :2] - origin[:2]) <= radius[k] * 1.01:
            cols = np.arange(n_az)
        else:
            cen = np.arctan2(cxy[:, 1].mean(), cxy[:, 0].mean())
            rel = np.angle(np.exp(1j * (np.arctan2(cxy[:, 1], cxy[:, 0]) - cen)))
            lo, hi = cen + rel.min(), cen + rel.max()
            j0 = int(np.floor((a0 - hi) / step)) - 1
            j1 = int(np.ceil((a0 - lo) / step)) + 1
            cols = np.arange(j0, j1 + 1) % n_az if j1 - j0 + 1 < n_az else np.arange(n_az)
        t, _ = intersect_prim(prims, k, origin, dirs[cols].reshape(-1, 3))
        t = t.reshape(len(cols), n_el)
        t[t > max_range] = np.inf
        self_hits[k] = int(np.isfinite(t).sum())
        sub = t_best[cols]
        better = t < sub
        if better.any():
            sub[better] = t[better]
            t_best[cols] = sub
            lab = label[cols]
            lab[better] = labels_all[k]
            label[cols] = lab
            ob = obj[cols]
            ob[better] = objs_all[k]
            obj[cols] = ob
    return LidarHits(t_best, label, obj, self_hits)


# ----------------------------------------------------------------------------------------------
# camera
# ----------------------------------------------------------------------------------------------
def _texture(points: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(n,) mild multiplicative texture in [~0.9, ~1.1] from world position (view-independent)."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    phase = label.astype(np.float64) * 1.7
    tex = (0.045 * np.sin(1.9 * x + 0.7 * y + phase) * np.sin(1.3 * y - 0.4 * x + 2.1 * z)
           + 0.03 * np.sin(7.1 * x + phase) * np.sin(6.3 * y + 5.2 * z)
           + 0.025 * np.sin(0.23 * x + 0.31 * y + 0.5 * z + phase))
    return 1.0 + tex


def _shadow(prims: Prims, points: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """(n,) bool: is each of `points` (n, 3) shadowed from the sun by a primitive in `cand`?"""
    shadow = np.zeros(len(points), bool)
    if len(points) == 0:
        return shadow
    origin = points + 0.02 * SUN_DIRECTION
    corners = prims.corners()
    # Project every primitive's corners onto the ground along the sun: the footprint of its shadow.
    lift = corners[..., 2:3] / SUN_DIRECTION[2]
    foot = corners[..., :2] - lift * SUN_DIRECTION[:2]
    lo = np.minimum(foot.min(1), corners[..., :2].min(1))
    hi = np.maximum(foot.max(1), corners[..., :2].max(1))
    top = corners[..., 2].max(1)
    for k in cand:
        m = ((points[:, 0] >= lo[k, 0]) & (points[:, 0] <= hi[k, 0]) & (points[:, 1] >= lo[k, 1])
             & (points[:, 1] <= hi[k, 1]) & (points[:, 2] < top[k]) & ~shadow)
        if not m.any():
            continue
        idx = np.flatnonzero(m)
        t, _ = intersect_prim(prims, k, origin[idx], np.broadcast_to(SUN_DIRECTION, (len(idx), 3)))
        shadow[idx[np.isfinite(t)]] = True
    return shadow


def render_camera(prims: Prims, ground_fn: GroundFn, colours: np.ndarray, origin: np.ndarray,
                  r_cam: np.ndarray, intrinsic: np.ndarray, width: int, height: int,
                  rng: np.random.Generator, max_distance: float = 250.0) -> np.ndarray:
    """Render one camera image of the world.

    origin: (3,) camera centre (global); r_cam: (3, 3) camera-to-global rotation of the optical
    frame (x right, y down, z forward); intrinsic: (3, 3) K. Pixel (col, row) is the ray through
    image coordinates (u, v) = (col, row) (pixel centres on the integer grid).
    colours: (32, 3) float RGB per fine class. Returns (height, width, 3) uint8 RGB.
    """
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    kinv = np.linalg.inv(intrinsic)
    d_cam = np.stack([u, v, np.ones_like(u)], -1) @ kinv.T
    d_cam /= np.linalg.norm(d_cam, axis=-1, keepdims=True)
    dirs = d_cam @ r_cam.T  # (H, W, 3)
    flat = dirs.reshape(-1, 3)
    t_best = _ground_t(origin, flat).reshape(height, width)
    label = np.zeros((height, width), np.uint8)
    normal = np.zeros((height, width, 3))
    normal[..., 2] = 1.0
    ground = np.isfinite(t_best)
    if ground.any():
        label[ground] = ground_fn(origin[:2] + t_best[ground][:, None] * dirs[ground][:, :2])

    n_prim = prims.n_box + len(prims.ell_radii)
    labels_all = np.concatenate([prims.box_label, prims.ell_label])
    if n_prim:
        centres, radius = prims.centres(), prims.radius()
        cand = np.flatnonzero(np.linalg.norm(centres - origin, axis=1) - radius < max_distance)
        corners_c = (prims.corners() - origin) @ r_cam  # camera frame (P, 8, 3)
        for k in cand:
            z = corners_c[k, :, 2]
            if (z <= 0.05).all():
                continue
            if (z > 0.05).all():
                uv = corners_c[k, :, :2] / z[:, None] * intrinsic[[0, 1], [0, 1]] + intrinsic[[0, 1], 2]
                c0, r0 = np.floor(uv.min(0)).astype(int) - 1
                c1, r1 = np.ceil(uv.max(0)).astype(int) + 2
                c0, r0 = max(c0, 0), max(r0, 0)
                c1, r1 = min(c1, width), min(r1, height)
                if c0 >= c1 or r0 >= r1:
                    continue
            else:
                r0, r1, c0, c1 = 0, height, 0, width
            sub_d = dirs[r0:r1, c0:c1].reshape(-1, 3)
            t, n = intersect_prim(prims, k, origin, sub_d)
            t = t.reshape(r1 - r0, c1 - c0)
            sub_t = t_best[r0:r1, c0:c1]
            better = t < sub_t
            if better.any():
                sub_t[better] = t[better]
                label[r0:r1, c0:c1][better] = labels_all[k]
                normal[r0:r1, c0:c1][better] = n.reshape(r1 - r0, c1 - c0, 3)[better]
    else:
        cand = np.zeros(0, np.int64)

    hit = np.isfinite(t_best)
    img = np.empty((height, width, 3))
    # sky: gradient with elevation of the ray
    elev = np.clip(dirs[..., 2], 0.0, 1.0) ** 0.6
    sky = SKY_HORIZON * (1 - elev[..., None]) + SKY_ZENITH * elev[..., None]
    img[~hit] = sky[~hit]
    if hit.any():
        th = t_best[hit]
        pts = origin + th[:, None] * dirs[hit]
        lab = label[hit]
        nrm = normal[hit]
        lambert = np.clip(nrm @ SUN_DIRECTION, 0.0, 1.0)
        lit = ~_shadow(prims, pts, cand) if len(cand) else np.ones(len(pts), bool)
        shade = AMBIENT + (1.0 - AMBIENT) * lambert * lit
        col = colours[lab] * (shade * _texture(pts, lab))[:, None]
        haze = 1.0 - np.exp(-th / HAZE_DISTANCE)
        img[hit] = col * (1 - haze[:, None]) + HAZE_COLOUR * haze[:, None]
    img += rng.normal(0.0, 2.5, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
