"""Synthetic ScanNet dataroot generator: tiny, deterministic box rooms in the ScanNet v2 + 25k layout.

`make_scannet_sample(out, ScanNetSampleConfig(...))` builds, per scene, one axis-aligned room
(`room_layout`): floor, ceiling, four walls with a door, a window and a picture as labelled regions
of the wall planes, and furniture made of boxes (table with legs, two chairs, a bed or a sofa, a
cabinet, a bookshelf, a small object on the table). It writes, in the layout
`clip2scene.precompute.datasets.scannet.ScanNet` reads:

- `scans/<scene>/<scene>_vh_clean_2.ply`: mesh vertices on a regular grid (`spacing`) over every
  surface (cell centres; vertices inside another box, e.g. floor under the bed, are dropped),
  coloured with the class colour (`CLASS_COLOURS`) plus noise; two triangles per surface
  rectangle as faces. `<scene>_vh_clean_2.labels.ply`: the same vertices with `label` = NYU40 id.
- `scannet_frames_25k/<scene>/`: `frames` posed frames (ids 000000, 000100, ...) with the camera
  inside the room, 1.3-1.6 m high, looking across the room at walls and furniture; `color/*.jpg`
  ray-cast with the class colours (slight per-face shading, pixel noise), `depth/*.png` uint16 mm
  ray-cast at the depth resolution (a few zero "holes"), `pose/*.txt` camera -> world (OpenCV
  axes), `intrinsics_color.txt` for a 1296x968 sensor and `intrinsics_depth.txt` for 640x480 (as
  real ScanNet; images are smaller and the reader rescales). Frame `invalid_pose_frame` of each
  scene has an all -inf pose, as ScanNet marks tracking failures (its images are still written).
- `scannetv2_train.txt`, `scannetv2_val.txt`: the first `train_scenes` scenes, then the rest.

Pixel (col, row) of an image is the ray through K^-1 (col, row, 1) with K the file's intrinsics
rescaled by `scannet.scale_intrinsic`, so a vertex projected by the reader lands on the pixel
showing its surface. Deterministic given the seed (files are byte-identical).

Run: ``python -m clip2scene.samples.scannet OUT_DIR [--train-scenes 2 --seed 0]``.
Numpy + Pillow + plyfile only.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from clip2scene.precompute.datasets.scannet import (
    COLOR_INTRINSICS_SIZE, DEPTH_INTRINSICS_SIZE, DEPTH_SCALE, FRAMES_DIR, SPLIT_FILES, scale_intrinsic)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanNetSampleConfig:
    """What to generate. Defaults: 3 scenes (2 train + 1 val), 8 frames each, in about a second."""

    train_scenes: int = 2  # scenes listed in scannetv2_train.txt (scene0000_00, ...)
    val_scenes: int = 1  # scenes after those, listed in scannetv2_val.txt
    frames: int = 8  # posed frames per scene, ids 000000, 000100, ... (as the 25k subset)
    invalid_pose_frame: int = 3  # this frame's pose is written as -inf (-1 = none)
    image_width: int = 320  # colour jpg size; intrinsics_color.txt is for 1296x968
    image_height: int = 240
    depth_width: int = 160  # depth png size; intrinsics_depth.txt is for 640x480
    depth_height: int = 120
    spacing: float = 0.04  # metres between mesh vertices on every surface
    vertex_noise: float = 4.0  # std of the per-vertex colour noise (0..255 units)
    pixel_noise: float = 3.0  # std of the per-pixel colour noise (0..255 units)
    depth_noise: float = 0.002  # std of the depth noise in metres
    depth_holes: float = 0.005  # fraction of depth pixels without a value (0), as real sensors
    jpeg_quality: int = 92  # colour jpg quality
    seed: int = 0  # everything is deterministic given the seed


# NYU40 id -> name and RGB colour of the classes the rooms use (mesh vertices and images).
NYU40_NAMES: dict[int, str] = {
    1: "wall", 2: "floor", 3: "cabinet", 4: "bed", 5: "chair", 6: "sofa", 7: "table", 8: "door",
    9: "window", 10: "bookshelf", 11: "picture", 22: "ceiling", 40: "otherprop",
}
CLASS_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (190, 190, 170),  # wall: light beige
    2: (150, 100, 50),  # floor: wood brown
    3: (40, 90, 200),  # cabinet: blue
    4: (240, 230, 60),  # bed: yellow
    5: (220, 40, 40),  # chair: red
    6: (40, 170, 60),  # sofa: green
    7: (255, 140, 0),  # table: orange
    8: (110, 40, 140),  # door: purple
    9: (90, 210, 245),  # window: sky blue
    10: (0, 110, 100),  # bookshelf: teal
    11: (240, 80, 200),  # picture: magenta
    22: (250, 250, 250),  # ceiling: white (NYU40 22 is not evaluated: label 0)
    40: (25, 25, 25),  # otherprop: black (not evaluated: label 0)
}
# Native ScanNet intrinsics (scene0000_00), for the sensor sizes the reader assumes.
NATIVE_COLOR_K = np.array([[1170.187988, 0.0, 647.75], [0.0, 1170.187988, 483.75], [0.0, 0.0, 1.0]])
NATIVE_DEPTH_K = np.array([[577.590698, 0.0, 318.905426], [0.0, 578.729797, 242.683609], [0.0, 0.0, 1.0]])
# Brightness per hit face axis (x-, y-, z-facing): mild, so the class colour stays recognisable.
_SHADE = np.array([0.94, 0.9, 1.0])


@dataclass(frozen=True)
class Box:
    """A solid axis-aligned box of one class (world frame, metres)."""

    name: str
    nyu40: int
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]


@dataclass(frozen=True)
class Decal:
    """A labelled rectangle on a wall plane (door, window, picture): wall `axis` = `coord`
    (0: x, 1: y), spanning `lo`..`hi` in (the other horizontal axis, z)."""

    name: str
    nyu40: int
    axis: int
    coord: float
    lo: tuple[float, float]
    hi: tuple[float, float]


@dataclass(frozen=True)
class RoomLayout:
    """One scene: the room [0, W] x [0, D] x [0, H] (inside: floor 2, ceiling 22, walls 1)."""

    size: tuple[float, float, float]
    boxes: tuple[Box, ...]
    decals: tuple[Decal, ...]


def scene_names(config: ScanNetSampleConfig) -> tuple[list[str], list[str]]:
    """(train scene ids, val scene ids): scene0000_00, scene0001_00, ... in that order."""
    names = [f"scene{i:04d}_00" for i in range(config.train_scenes + config.val_scenes)]
    return names[: config.train_scenes], names[config.train_scenes :]


def _box(name: str, nyu: int, lo, hi) -> Box:
    return Box(name, nyu, tuple(float(v) for v in lo), tuple(float(v) for v in hi))


def room_layout(config: ScanNetSampleConfig, index: int) -> RoomLayout:
    """The room of scene `index` (deterministic given config.seed): sizes and furniture jittered,
    a bed in even scenes and a sofa in odd ones. No two boxes overlap."""
    rng = np.random.default_rng([config.seed, index, 1])
    w, d, h = rng.uniform(4.5, 5.5), rng.uniform(4.3, 4.9), rng.uniform(2.5, 2.7)
    tx, ty = 1.6 + rng.uniform(-0.15, 0.15), 1.6 + rng.uniform(-0.15, 0.15)
    boxes = [_box("table", 7, (tx - 0.6, ty - 0.4, 0.72), (tx + 0.6, ty + 0.4, 0.76))]
    for sx in (-1, 1):
        for sy in (-1, 1):
            lx, ly = tx + sx * 0.52, ty + sy * 0.32
            boxes.append(_box("table", 7, (lx - 0.025, ly - 0.025, 0.0), (lx + 0.025, ly + 0.025, 0.72)))
    boxes.append(_box("otherprop", 40, (tx - 0.1, ty - 0.15, 0.76), (tx + 0.15, ty + 0.05, 0.9)))
    for side in (-1, 1):  # chairs left and right of the table, backs away from it
        cx, cy = tx + side * 0.95, ty + rng.uniform(-0.1, 0.1)
        boxes.append(_box("chair", 5, (cx - 0.225, cy - 0.225, 0.0), (cx + 0.225, cy + 0.225, 0.45)))
        bx = cx + side * 0.225
        boxes.append(_box("chair", 5, (min(bx, bx - side * 0.06), cy - 0.225, 0.45),
                          (max(bx, bx - side * 0.06), cy + 0.225, 0.95)))
    if index % 2 == 0:
        boxes.append(_box("bed", 4, (w - 1.75, d - 2.0, 0.0), (w - 0.1, d - 0.12, 0.5)))
        boxes.append(_box("bed", 4, (w - 1.75, d - 0.12, 0.0), (w - 0.1, d - 0.04, 1.05)))
    else:
        x0 = w - 2.15
        boxes.append(_box("sofa", 6, (x0, d - 0.95, 0.0), (x0 + 2.0, d - 0.05, 0.42)))
        boxes.append(_box("sofa", 6, (x0, d - 0.25, 0.42), (x0 + 2.0, d - 0.05, 0.85)))
        boxes.append(_box("sofa", 6, (x0, d - 0.95, 0.42), (x0 + 0.2, d - 0.25, 0.62)))
        boxes.append(_box("sofa", 6, (x0 + 1.8, d - 0.95, 0.42), (x0 + 2.0, d - 0.25, 0.62)))
    cab_y = d - 1.0 + rng.uniform(-0.1, 0.1)
    boxes.append(_box("cabinet", 3, (0.03, cab_y, 0.0), (0.53, cab_y + 0.8, 1.0)))
    boxes.append(_box("bookshelf", 10, (0.3, 0.03, 0.0), (1.1, 0.38, 1.8)))
    decals = (
        Decal("door", 8, 1, 0.0, (w - 1.4, 0.0), (w - 0.5, 2.05)),
        Decal("window", 9, 0, float(w), (0.7, 0.9), (1.8, 1.9)),
        Decal("picture", 11, 0, 0.0, (1.2, 1.2), (2.0, 1.8)),
    )
    return RoomLayout((float(w), float(d), float(h)), tuple(boxes), decals)


# ------------------------------------------------------------------------------------------
# mesh
def _rectangles(layout: RoomLayout) -> list[tuple[int, float, np.ndarray, np.ndarray, int, int]]:
    """Every surface as (normal axis, coordinate, lo (2,), hi (2,) on the other two axes in
    increasing order, NYU40 id, owner box index or -1 for the room)."""
    w, d, h = layout.size
    out = [(2, 0.0, np.array([0, 0]), np.array([w, d]), 2, -1), (2, h, np.array([0, 0]), np.array([w, d]), 22, -1)]
    for axis, size in ((0, w), (1, d)):
        other = (d if axis == 0 else w)
        for coord in (0.0, size):
            out.append((axis, coord, np.array([0.0, 0.0]), np.array([other, h]), 1, -1))
    for b, box in enumerate(layout.boxes):
        lo, hi = np.array(box.lo), np.array(box.hi)
        for axis in range(3):
            rest = [a for a in range(3) if a != axis]
            for coord in (lo[axis], hi[axis]):
                if axis == 2 and coord == lo[2] and coord <= 1e-9:
                    continue  # resting on the floor: no bottom face
                out.append((axis, float(coord), lo[rest], hi[rest], box.nyu40, b))
    return out


def build_mesh(layout: RoomLayout, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices (n, 3) float32, NYU40 ids (n,) uint16, faces (f, 3) int32 of one room."""
    boxes_lo = np.array([b.lo for b in layout.boxes]) - 1e-3
    boxes_hi = np.array([b.hi for b in layout.boxes]) + 1e-3
    verts, labels, faces = [], [], []
    n = 0
    for axis, coord, lo, hi, nyu, owner in _rectangles(layout):
        rest = [a for a in range(3) if a != axis]
        counts = np.maximum(1, np.ceil((hi - lo) / spacing - 1e-9).astype(int))
        a = lo[0] + (np.arange(counts[0]) + 0.5) * (hi[0] - lo[0]) / counts[0]
        b = lo[1] + (np.arange(counts[1]) + 0.5) * (hi[1] - lo[1]) / counts[1]
        ga, gb = np.meshgrid(a, b, indexing="ij")
        p = np.empty((ga.size, 3))
        p[:, axis] = coord
        p[:, rest[0]] = ga.ravel()
        p[:, rest[1]] = gb.ravel()
        lab = np.full(len(p), nyu, np.uint16)
        if owner == -1 and nyu == 1:
            for dec in layout.decals:
                if dec.axis == axis and dec.coord == coord:
                    inside = ((p[:, rest[0]] >= dec.lo[0]) & (p[:, rest[0]] <= dec.hi[0])
                              & (p[:, 2] >= dec.lo[1]) & (p[:, 2] <= dec.hi[1]))
                    lab[inside] = dec.nyu40
        others = np.arange(len(layout.boxes)) != owner
        covered = np.any(np.all((p[:, None, :] >= boxes_lo[None, others]) & (p[:, None, :] <= boxes_hi[None, others]),
                                axis=2), axis=1)
        keep = ~covered
        index = np.full(len(p), -1, np.int64)
        index[keep] = n + np.arange(int(keep.sum()))
        grid = index.reshape(counts[0], counts[1])
        c00, c10, c01, c11 = grid[0, 0], grid[-1, 0], grid[0, -1], grid[-1, -1]
        if min(c00, c10, c01, c11) >= 0 and len({c00, c10, c01, c11}) == 4:
            faces += [(c00, c10, c11), (c00, c11, c01)]
        verts.append(p[keep])
        labels.append(lab[keep])
        n += int(keep.sum())
    return (np.concatenate(verts).astype(np.float32), np.concatenate(labels),
            np.array(faces, dtype=np.int32).reshape(-1, 3))


def _write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray, label: np.ndarray | None) -> None:
    from plyfile import PlyData, PlyElement

    fields_ = [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")]
    if label is not None:
        fields_.append(("label", "u2"))
    v = np.empty(len(xyz), dtype=fields_)
    v["x"], v["y"], v["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    v["red"], v["green"], v["blue"], v["alpha"] = rgb[:, 0], rgb[:, 1], rgb[:, 2], 255
    if label is not None:
        v["label"] = label
    f = np.empty(len(faces), dtype=[("vertex_indices", "i4", (3,))])
    f["vertex_indices"] = faces
    PlyData([PlyElement.describe(v, "vertex"), PlyElement.describe(f, "face")]).write(str(path))


# ------------------------------------------------------------------------------------------
# rendering
def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(4, 4) float64 camera -> world pose, OpenCV axes (x right, y down, z forward), z world up."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = eye
    return pose


def render(layout: RoomLayout, pose: np.ndarray, k: np.ndarray, width: int,
           height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast the room: per pixel (height, width) camera z-depth float64 (metres), NYU40 id
    int64 and the hit face's normal axis int64. Pixel (col, row) is the ray K^-1 (col, row, 1)."""
    rot, eye = pose[:3, :3], pose[:3, 3]
    cols, rows = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    yn = (rows - k[1, 2]) / k[1, 1]
    xn = (cols - k[0, 2] - k[0, 1] * yn) / k[0, 0]
    dirs = np.stack([xn, yn, np.ones_like(xn)], axis=-1) @ rot.T  # (H, W, 3) world, camera z = 1
    dirs = np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)
    size = np.array(layout.size)
    with np.errstate(divide="ignore"):
        exits = np.where(dirs > 0, (size - eye) / dirs, -eye / dirs)
    t = exits.min(axis=-1)
    axis = exits.argmin(axis=-1)
    positive = np.take_along_axis(dirs, axis[..., None], -1)[..., 0] > 0
    nyu = np.where(axis == 2, np.where(positive, 22, 2), 1)
    hit = eye + dirs * t[..., None]
    for dec in layout.decals:
        on = (axis == dec.axis) & (positive == (dec.coord > 0))
        other = 1 - dec.axis
        on &= (hit[..., other] >= dec.lo[0]) & (hit[..., other] <= dec.hi[0])
        on &= (hit[..., 2] >= dec.lo[1]) & (hit[..., 2] <= dec.hi[1])
        nyu = np.where(on, dec.nyu40, nyu)
    world_to_cam = np.linalg.inv(pose)
    for box in layout.boxes:
        lo, hi = np.array(box.lo), np.array(box.hi)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        cam = corners @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
        r0, r1, c0, c1 = 0, height, 0, width
        if np.all(cam[:, 2] > 0.05):  # in front: only the pixels of its projected bounding box
            u = k[0, 0] * cam[:, 0] / cam[:, 2] + k[0, 1] * cam[:, 1] / cam[:, 2] + k[0, 2]
            v = k[1, 1] * cam[:, 1] / cam[:, 2] + k[1, 2]
            c0, c1 = max(int(np.floor(u.min())) - 1, 0), min(int(np.ceil(u.max())) + 2, width)
            r0, r1 = max(int(np.floor(v.min())) - 1, 0), min(int(np.ceil(v.max())) + 2, height)
            if c0 >= c1 or r0 >= r1:
                continue
        elif np.all(cam[:, 2] <= 0.05):
            continue
        d = dirs[r0:r1, c0:c1]
        t1, t2 = (lo - eye) / d, (hi - eye) / d
        tmin = np.minimum(t1, t2)
        t_near = tmin.max(axis=-1)
        t_far = np.maximum(t1, t2).min(axis=-1)
        sub_t = t[r0:r1, c0:c1]
        better = (t_near <= t_far) & (t_near > 1e-6) & (t_near < sub_t)
        sub_t[better] = t_near[better]
        nyu[r0:r1, c0:c1][better] = box.nyu40
        axis[r0:r1, c0:c1][better] = tmin.argmax(axis=-1)[better]
    return t, nyu, axis


def camera_poses(layout: RoomLayout, frames: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`frames` camera -> world poses around the room centre, each looking across the room
    (downwards) at the far walls and furniture."""
    w, d, _ = layout.size
    centre = np.array([w / 2, d / 2])
    poses = []
    for i in range(frames):
        angle = 2 * np.pi * i / frames + rng.uniform(-0.2, 0.2)
        offset = np.array([0.3 * w * np.cos(angle), 0.3 * d * np.sin(angle)])
        eye = np.array([*(centre + offset), rng.uniform(1.3, 1.6)])
        target_xy = np.clip(centre - 1.3 * offset + rng.uniform(-0.3, 0.3, 2), [0.3, 0.3], [w - 0.3, d - 0.3])
        poses.append(look_at(eye, np.array([*target_xy, rng.uniform(0.4, 0.9)])))
    return poses


def _matrix_text(m: np.ndarray) -> str:
    return "".join(" ".join(f"{x:.6f}" if np.isfinite(x) else ("-inf" if x < 0 else "inf") for x in row) + "\n"
                   for row in m)


def _check(config: ScanNetSampleConfig) -> None:
    if config.train_scenes < 0 or config.val_scenes < 0 or config.train_scenes + config.val_scenes < 1:
        raise ValueError(f"need at least one scene, got train_scenes={config.train_scenes} "
                         f"val_scenes={config.val_scenes}")
    if config.frames < 1:
        raise ValueError(f"frames must be >= 1, got {config.frames}")
    if min(config.image_width, config.image_height, config.depth_width, config.depth_height) < 8:
        raise ValueError("image and depth sizes must be at least 8 pixels")
    if not 0.005 <= config.spacing <= 0.5:
        raise ValueError(f"spacing must be in [0.005, 0.5] m, got {config.spacing}")


def write_scene(root: Path, name: str, index: int, config: ScanNetSampleConfig) -> None:
    """Write the mesh, labels and posed frames of scene `index` (see the module docstring)."""
    rng = np.random.default_rng([config.seed, index, 2])
    layout = room_layout(config, index)
    xyz, nyu, faces = build_mesh(layout, config.spacing)
    palette = np.zeros((256, 3), np.float64)
    for cid, colour in CLASS_COLOURS.items():
        palette[cid] = colour
    rgb = np.clip(np.rint(palette[nyu] + rng.normal(0, config.vertex_noise, (len(nyu), 3))), 0, 255).astype(np.uint8)
    scan_dir = root / "scans" / name
    scan_dir.mkdir(parents=True)
    _write_ply(scan_dir / f"{name}_vh_clean_2.ply", xyz, rgb, faces, None)
    _write_ply(scan_dir / f"{name}_vh_clean_2.labels.ply", xyz, palette[nyu].astype(np.uint8), faces, nyu)

    frame_dir = root / FRAMES_DIR / name
    for sub in ("color", "depth", "pose"):
        (frame_dir / sub).mkdir(parents=True)
    for fname, k in (("intrinsics_color.txt", NATIVE_COLOR_K), ("intrinsics_depth.txt", NATIVE_DEPTH_K)):
        m = np.eye(4)
        m[:3, :3] = k
        (frame_dir / fname).write_text(_matrix_text(m))
    k_color = scale_intrinsic(NATIVE_COLOR_K, COLOR_INTRINSICS_SIZE, (config.image_width, config.image_height))
    k_depth = scale_intrinsic(NATIVE_DEPTH_K, DEPTH_INTRINSICS_SIZE, (config.depth_width, config.depth_height))
    for i, pose in enumerate(camera_poses(layout, config.frames, rng)):
        stem = f"{i * 100:06d}"
        _, cls, axis = render(layout, pose, k_color, config.image_width, config.image_height)
        image = palette[cls] * _SHADE[axis][..., None] + rng.normal(0, config.pixel_noise, cls.shape + (3,))
        Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8)).save(
            frame_dir / "color" / f"{stem}.jpg", quality=config.jpeg_quality)
        depth, _, _ = render(layout, pose, k_depth, config.depth_width, config.depth_height)
        depth = depth + rng.normal(0, config.depth_noise, depth.shape)
        mm = np.clip(np.rint(depth * DEPTH_SCALE), 0, 65535).astype(np.uint16)
        mm[rng.random(mm.shape) < config.depth_holes] = 0
        Image.fromarray(mm).save(frame_dir / "depth" / f"{stem}.png")
        written = np.full((4, 4), -np.inf) if i == config.invalid_pose_frame else pose
        (frame_dir / "pose" / f"{stem}.txt").write_text(_matrix_text(written))


def make_scannet_sample(out: str | Path, config: ScanNetSampleConfig = ScanNetSampleConfig()) -> Path:
    """Write a synthetic ScanNet dataroot at `out` and return it (layout: module docstring).

    Raises FileExistsError if `out` exists and is non-empty, ValueError for an invalid config.
    """
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty directory")
    _check(config)
    train, val = scene_names(config)
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(train + val):
        write_scene(root, name, i, config)
        log.info("synthetic ScanNet: wrote %s (%d/%d)", name, i + 1, len(train) + len(val))
    (root / SPLIT_FILES["train"]).write_text("".join(f"{n}\n" for n in train))
    (root / SPLIT_FILES["val"]).write_text("".join(f"{n}\n" for n in val))
    return root


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m clip2scene.samples.scannet OUT [--train-scenes 2 ... --seed 0]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    for field in fields(ScanNetSampleConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    make_scannet_sample(args.pop("out"), ScanNetSampleConfig(**args))


if __name__ == "__main__":
    main()
