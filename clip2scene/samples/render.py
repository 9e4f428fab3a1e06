"""Vectorised ray casting for the synthetic nuScenes generator (numpy only).

The synthetic world (see `clip2scene.samples.nuscenes`) is made of three kinds of surface, all
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

from dataclasses import dataclass
from typing import Callable

import numpy as np

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


def intersect_prim(prims: Prims, k: int, origin: np.ndarray, dirs: np.ndarray, normals: bool = True):
    """Ray-primitive intersection for primitive k (boxes first, then spheroids).

    origin: (3,) or (3, n) float64 ray origins (global); dirs: (3, n) unit directions, float32 or
    float64 (components in rows, so every operation runs on contiguous rows).
    Returns t (n,) entry distance in the dtype of `dirs` (inf where missed or the origin is
    inside) and the outward unit normal (3, n) at the entry point (None unless `normals`).
    """
    one = origin.ndim == 1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if k < prims.n_box:
            c, s = float(np.cos(prims.box_yaw[k])), float(np.sin(prims.box_yaw[k]))
            rel = origin - (prims.box_centre[k] if one else prims.box_centre[k][:, None])
            o = (c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2])
            if one:
                o = tuple(float(v) for v in o)
            d = (c * dirs[0] + s * dirs[1], -s * dirs[0] + c * dirs[1], dirs[2])
            near, far = [], []
            for axis in range(3):
                inv = 1.0 / d[axis]
                h = float(prims.box_half[k, axis])
                t1, t2 = (-h - o[axis]) * inv, (h - o[axis]) * inv
                near.append(np.minimum(t1, t2))
                far.append(np.maximum(t1, t2))
            tmin = np.maximum(np.maximum(near[0], near[1]), near[2])
            tmax = np.minimum(np.minimum(far[0], far[1]), far[2])
            t = np.where((tmax >= tmin) & (tmin > 0.0), tmin, np.inf)
            if not normals:
                return t, None
            mx = near[0] >= tmin
            my = (near[1] >= tmin) & ~mx
            mz = ~(mx | my)
            nx, ny, nz = -np.sign(d[0]) * mx, -np.sign(d[1]) * my, -np.sign(d[2]) * mz
            return t, np.stack([c * nx - s * ny, s * nx + c * ny, nz]).astype(dirs.dtype)
        e = k - prims.n_box
        radii = prims.ell_radii[e]
        rel = origin - (prims.ell_centre[e] if one else prims.ell_centre[e][:, None])
        o = [rel[i] / radii[i] for i in range(3)]
        if one:
            o = [float(v) for v in o]
        d = [dirs[i] * float(1.0 / radii[i]) for i in range(3)]
        a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        b = o[0] * d[0] + o[1] * d[1] + o[2] * d[2]
        cc = o[0] * o[0] + o[1] * o[1] + o[2] * o[2] - 1.0
        disc = b * b - a * cc
        t0 = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        hit = (disc >= 0.0) & (t0 > 0.0)
        t = np.where(hit, t0, np.inf)
        if not normals:
            return t, None
        tt = np.where(hit, t0, 0.0)
        n = np.stack([(o[i] + tt * d[i]) / radii[i] for i in range(3)])
        n /= np.maximum(np.sqrt((n * n).sum(0)), 1e-12)
        return t, n.astype(dirs.dtype)


def _ground_t(origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """(...) distance to the plane z = 0 along rays dirs (3, ...) from origin (3,); inf if none."""
    dz = dirs[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = float(-origin[2]) / dz
    return np.where((dz < -1e-9) & (t > 0), t, np.inf).astype(dirs.dtype)


# ----------------------------------------------------------------------------------------------
# lidar
# ----------------------------------------------------------------------------------------------
@dataclass
class LidarHits:
    """Nearest hit per ray on an (A azimuth columns, R rings) grid.

    t (A, R) float64 range (inf = no hit), label (A, R) uint8, obj (A, R) int64 (-1 = ground),
    self_hits (P,) int64: rays that would hit primitive p were nothing else there (within range),
    dirs (A, R, 3) float64 unit ray directions in the sensor frame.
    """

    t: np.ndarray
    label: np.ndarray
    obj: np.ndarray
    self_hits: np.ndarray
    dirs: np.ndarray


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
    dirs = np.ascontiguousarray(np.moveaxis(d_sensor @ r_sensor.T, -1, 0))  # (3, A, R) global
    t_best = _ground_t(origin, dirs)
    t_best[t_best > max_range] = np.inf
    ground = np.isfinite(t_best)
    label = np.zeros((n_az, n_el), np.uint8)
    if ground.any():
        label[ground] = ground_fn(origin[:2] + t_best[ground][:, None] * dirs[:2, ground].T)
    obj = np.full((n_az, n_el), -1, np.int64)

    n_prim = prims.n_box + len(prims.ell_radii)
    self_hits = np.zeros(n_prim, np.int64)
    if n_prim == 0:
        return LidarHits(t_best, label, obj, self_hits, d_sensor)
    # Conservative (azimuth columns x ring slice) window of every primitive, vectorised. Azimuth
    # extremes of a convex body lie at its corners; elevation extremes are bounded with the nearest
    # and farthest possible horizontal distance.
    corners = (prims.corners() - origin) @ r_sensor  # sensor frame, (P, 8, 3)
    cen = corners.mean(1)
    r_xy = np.linalg.norm(corners[..., :2] - cen[:, None, :2], axis=-1).max(1)
    dist_xy = np.linalg.norm(cen[:, :2], axis=1)
    lower = np.linalg.norm(cen, axis=1) - np.linalg.norm(corners - cen[:, None], axis=-1).max(1)
    d_min, d_max = np.maximum(dist_xy - r_xy, 1e-3), dist_xy + r_xy
    zmin, zmax = corners[..., 2].min(1), corners[..., 2].max(1)
    el_hi = np.where(zmax >= 0, np.arctan2(zmax, d_min), np.arctan2(zmax, d_max)) + 1e-4
    el_lo = np.where(zmin <= 0, np.arctan2(zmin, d_min), np.arctan2(zmin, d_max)) - 1e-4
    ring0 = np.searchsorted(elevations, el_lo, side="left")
    ring1 = np.searchsorted(elevations, el_hi, side="right")
    az_c = np.arctan2(cen[:, 1], cen[:, 0])
    rel = np.angle(np.exp(1j * (np.arctan2(corners[..., 1], corners[..., 0]) - az_c[:, None])))
    step = 2 * np.pi / n_az
    j0 = np.floor((azimuths[0] - az_c - rel.max(1)) / step).astype(np.int64) - 1
    j1 = np.ceil((azimuths[0] - az_c - rel.min(1)) / step).astype(np.int64) + 1
    around = (dist_xy <= r_xy * 1.01) | (j1 - j0 + 1 >= n_az)  # sensor axis inside the footprint
    labels_all = np.concatenate([prims.box_label, prims.ell_label])
    objs_all = np.concatenate([prims.box_obj, prims.ell_obj])
    todo = np.flatnonzero((lower < max_range) & (ring1 > ring0))
    for k in todo[np.argsort(lower[todo], kind="stable")]:  # front to back
        cols = np.arange(n_az) if around[k] else np.arange(j0[k], j1[k] + 1) % n_az
        r0, r1 = int(ring0[k]), int(ring1[k])
        sub = t_best[cols, r0:r1]
        if lower[k] > sub.max():  # everything in the window is already nearer: occluded
            continue
        t, _ = intersect_prim(prims, k, origin, dirs[:, cols, r0:r1].reshape(3, -1), normals=False)
        t = t.reshape(sub.shape)
        t[t > max_range] = np.inf
        self_hits[k] = int(np.isfinite(t).sum())
        better = t < sub
        if better.any():
            sub[better] = t[better]
            t_best[cols, r0:r1] = sub
            lab = label[cols, r0:r1]
            lab[better] = labels_all[k]
            label[cols, r0:r1] = lab
            ob = obj[cols, r0:r1]
            ob[better] = objs_all[k]
            obj[cols, r0:r1] = ob
    return LidarHits(t_best, label, obj, self_hits, d_sensor)


# ----------------------------------------------------------------------------------------------
# camera
# ----------------------------------------------------------------------------------------------
def _texture(points: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(n,) mild multiplicative texture in [~0.9, ~1.1] at world points (3, n), view-independent."""
    x, y, z = points
    phase = label.astype(np.float64) * 1.7
    return (1.0 + 0.05 * np.sin(1.9 * x + 0.7 * y + phase) * np.sin(1.3 * y - 0.4 * x + 2.1 * z)
            + 0.03 * np.sin(6.1 * x - 5.3 * y + 5.2 * z + phase))


def _shadow(prims: Prims, points: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """(n,) bool: is each of `points` (3, n) float64 shadowed from the sun by a primitive in `cand`?"""
    shadow = np.zeros(points.shape[1], bool)
    if points.shape[1] == 0 or len(cand) == 0:
        return shadow
    corners = prims.corners()[cand]
    # Shadow footprint of each primitive: its corners and their projection onto z = 0 along the sun.
    foot = corners[..., :2] - (corners[..., 2:3] / SUN_DIRECTION[2]) * SUN_DIRECTION[:2]
    lo = np.minimum(foot.min(1), corners[..., :2].min(1))
    hi = np.maximum(foot.max(1), corners[..., :2].max(1))
    top = corners[..., 2].max(1)
    order = np.argsort(points[0], kind="stable")
    xs = points[0, order]
    i0 = np.searchsorted(xs, lo[:, 0], side="left")
    i1 = np.searchsorted(xs, hi[:, 0], side="right")
    sun = SUN_DIRECTION[:, None]
    for c, k in enumerate(cand):
        if i1[c] <= i0[c]:
            continue
        idx = order[i0[c]:i1[c]]
        p = points[:, idx]
        idx = idx[(p[1] >= lo[c, 1]) & (p[1] <= hi[c, 1]) & (p[2] < top[c]) & ~shadow[idx]]
        if len(idx) == 0:
            continue
        t, _ = intersect_prim(prims, k, points[:, idx] + 0.02 * sun, sun, normals=False)
        shadow[idx[np.isfinite(t)]] = True
    return shadow


_EDGES = np.array([(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1])


def _image_rects(corners_c: np.ndarray, intrinsic: np.ndarray, width: int, height: int, near: float):
    """Pixel rectangle [r0, r1) x [c0, c1) covering each primitive's projection (vectorised).

    corners_c: (P, 8, 3) corners in the camera frame. The box is clipped against the plane
    z = near (corners in front plus edge crossings of the plane), so primitives straddling the
    camera plane get a finite rectangle. Returns four (P,) int arrays; empty where r0 >= r1.
    """
    z = corners_c[..., 2]
    ea, eb = corners_c[:, _EDGES[:, 0]], corners_c[:, _EDGES[:, 1]]  # (P, 12, 3)
    za, zb = ea[..., 2], eb[..., 2]
    cross = (za > near) != (zb > near)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(cross, (near - za) / (zb - za), 0.0)
    xing = ea + f[..., None] * (eb - ea)
    pts = np.concatenate([corners_c, xing], 1)  # (P, 20, 3)
    valid = np.concatenate([z > near, cross], 1)
    zz = np.where(valid, np.maximum(pts[..., 2], near), 1.0)
    u = intrinsic[0, 0] * pts[..., 0] / zz + intrinsic[0, 2]
    v = intrinsic[1, 1] * pts[..., 1] / zz + intrinsic[1, 2]
    big = 1e9
    c0 = np.floor(np.where(valid, u, big).min(1)) - 1
    c1 = np.ceil(np.where(valid, u, -big).max(1)) + 2
    r0 = np.floor(np.where(valid, v, big).min(1)) - 1
    r1 = np.ceil(np.where(valid, v, -big).max(1)) + 2
    clip = lambda a, hi: np.clip(a, 0, hi).astype(np.int64)  # noqa: E731
    return clip(r0, height), clip(r1, height), clip(c0, width), clip(c1, width)


_RAY_CACHE: dict[bytes, np.ndarray] = {}


def _camera_rays(intrinsic: np.ndarray, width: int, height: int) -> np.ndarray:
    """(3, H*W) float64 unit ray directions in the camera frame through the pixel centres (cached)."""
    key = np.asarray(intrinsic, np.float64).tobytes() + np.array([width, height]).tobytes()
    if key not in _RAY_CACHE:
        if len(_RAY_CACHE) > 64:
            _RAY_CACHE.clear()
        u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
        d = np.linalg.inv(intrinsic) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
        _RAY_CACHE[key] = d / np.linalg.norm(d, axis=0, keepdims=True)
    return _RAY_CACHE[key]


def render_camera(prims: Prims, ground_fn: GroundFn, colours: np.ndarray, origin: np.ndarray,
                  r_cam: np.ndarray, intrinsic: np.ndarray, width: int, height: int,
                  rng: np.random.Generator, max_distance: float = 250.0, maps: dict | None = None) -> np.ndarray:
    """Render one camera image of the world.

    origin: (3,) camera centre (global); r_cam: (3, 3) camera-to-global rotation of the optical
    frame (x right, y down, z forward); intrinsic: (3, 3) K. Pixel (col, row) is the ray through
    image coordinates (u, v) = (col, row) (pixel centres on the integer grid).
    colours: (32, 3) float RGB per fine class. Returns (height, width, 3) uint8 RGB.
    maps: if a dict is given, it receives the per-pixel ground truth of the image: "label"
    (H, W) uint8 fine class (0 = sky), "depth" (H, W) float32 ray length in metres (inf = sky),
    "instance" (H, W) int64 object id (-1 = ground or sky). The image itself is unchanged.
    """
    dirs = (r_cam @ _camera_rays(intrinsic, width, height)).astype(np.float32).reshape(3, height, width)
    t_best = _ground_t(origin, dirs)  # (H, W) float32
    label = np.zeros((height, width), np.uint8)
    normal = np.zeros((3, height, width), np.float32)
    normal[2] = 1.0
    ground = np.isfinite(t_best)
    if ground.any():
        label[ground] = ground_fn(origin[:2] + t_best[ground][:, None].astype(np.float64) * dirs[:2, ground].T)

    n_prim = prims.n_box + len(prims.ell_radii)
    labels_all = np.concatenate([prims.box_label, prims.ell_label])
    objs_all = np.concatenate([prims.box_obj, prims.ell_obj]).astype(np.int64)
    instance = np.full((height, width), -1, np.int64) if maps is not None else None
    cand = np.zeros(0, np.int64)
    if n_prim:
        corners = prims.corners()
        cen = corners.mean(1)
        lower = np.linalg.norm(cen - origin, axis=1) - np.linalg.norm(corners - cen[:, None], axis=-1).max(1)
        cand = np.flatnonzero(lower < max_distance)
        r0, r1, c0, c1 = _image_rects((corners - origin) @ r_cam, intrinsic, width, height, 0.05)
        seen = cand[(r1[cand] > r0[cand]) & (c1[cand] > c0[cand])]
        for k in seen[np.argsort(lower[seen], kind="stable")]:  # front to back
            rs, cs = slice(r0[k], r1[k]), slice(c0[k], c1[k])
            sub_t = t_best[rs, cs]
            if lower[k] > sub_t.max():  # fully behind what is already drawn
                continue
            t, n = intersect_prim(prims, k, origin, dirs[:, rs, cs].reshape(3, -1))
            t = t.reshape(sub_t.shape)
            better = t < sub_t
            if better.any():
                sub_t[better] = t[better]
                label[rs, cs][better] = labels_all[k]
                if instance is not None:
                    instance[rs, cs][better] = objs_all[k]
                normal[:, rs, cs][:, better] = n.reshape(3, *sub_t.shape)[:, better]

    hit = np.isfinite(t_best)
    if maps is not None:
        maps.update(label=label.copy(), depth=t_best.astype(np.float32), instance=instance)
    img = np.empty((height, width, 3), np.float32)
    # sky: gradient with the elevation of the ray
    sky = ~hit
    elev = np.clip(dirs[2][sky], 0.0, 1.0) ** 0.6
    img[sky] = SKY_HORIZON * (1 - elev[:, None]) + SKY_ZENITH * elev[:, None]
    if hit.any():
        th = t_best[hit].astype(np.float64)
        pts = origin[:, None] + th * dirs[:, hit]  # (3, m) float64
        lab = label[hit]
        nrm = normal[:, hit]
        lambert = np.clip(SUN_DIRECTION @ nrm, 0.0, 1.0)
        test = np.flatnonzero((lambert > 0) & (th < 150.0))
        lambert[test[_shadow(prims, pts[:, test], cand)]] = 0.0
        shade = AMBIENT + (1.0 - AMBIENT) * lambert
        haze = 1.0 - np.exp(-th / HAZE_DISTANCE)
        img[hit] = (colours[lab] * ((shade * _texture(pts, lab)) * (1 - haze))[:, None]
                    + HAZE_COLOUR * haze[:, None])
    img += 2.5 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
