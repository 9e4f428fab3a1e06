"""SemanticKITTI reader (official KITTI odometry layout), implementing `dataset.Dataset`.

Reads `<dataroot>/sequences/XX/` as the SemanticKITTI / KITTI odometry downloads unpack it:

    velodyne/NNNNNN.bin    float32 x 4 per point: x, y, z (metres, velodyne frame), remission
    labels/NNNNNN.label    uint32 per point: semantic id = lower 16 bits, instance id = upper 16
    image_2/NNNNNN.png     left colour camera
    calib.txt              `P0:` .. `P3:` (3x4 projections of the rectified cameras), `Tr:` (3x4
                           velodyne -> rectified camera-0 frame)
    poses.txt              one 3x4 row-major camera-0 pose per frame (camera -> world = camera 0
                           of frame 0)
    times.txt              seconds since the sequence start, one per frame

One scan = one frame, token "08/000123". Splits are the official ones (train 00-07, 09, 10; val
08; test 11-21); only sequences present on disk are listed. Labels go through the standard
19-class learning map (semantic-kitti.yaml `learning_map`, moving classes folded into their
static class), 0 = ignore.

    ds = SemanticKITTI("/data/semantickitti")
    for scan in ds.scans(split="val", sweeps=3):
        xyz, feat, sweep, n_key = ds.points(scan)      # keyframe + up to 2 previous frames
        labels = ds.labels(scan, n_key)                # (n_key,) uint8, 1..19, 0 = ignore
        (view,) = ds.views(scan)                       # image_2
        uv, visible = ds.project(scan, 0, xyz)

Sweeps are the previous frames j-1, j-2, ... of the sequence (fewer at its start; the chain
stops at the first missing file), moved into frame j's velodyne frame through the poses:
T = inv(Tr) @ inv(P_j) @ P_k @ Tr. Projection into image_2: x_cam = Tr @ [xyz, 1],
uvw = P2 @ [x_cam, 1], (u, v) = uvw[:2] / uvw[2] (pixel centres at integers); visible where
x_cam's depth z > 1 m and 1 < u < W-1, 1 < v < H-1 (strict, as the nuScenes devkit).

calib.txt is read when a sequence's scans are listed (and poses.txt too when sweeps > 1), so a
missing or malformed file fails early with a DataError naming it. Numpy + Pillow only.
"""

from __future__ import annotations

import copy

import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from clip2scene.classes import SEMANTICKITTI_CLASSES
from clip2scene.errors import ConfigError, DataError
from clip2scene.precompute.datasets.base import ScanRef, View
from clip2scene.precompute.datasets.points import read_labels, read_points

log = logging.getLogger(__name__)

CAMERA = "image_2"

# Official sequence splits (SemanticKITTI benchmark).
SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10"),
    "val": ("08",),
    "test": tuple(f"{i:02d}" for i in range(11, 22)),
}

# Raw SemanticKITTI semantic id -> evaluation class name (semantic-kitti.yaml `learning_map`);
# ids absent here (0 unlabeled, 1 outlier, 52 other-structure, 99 other-object, unknown) -> 0.
RAW_TO_CLASS: dict[int, str] = {
    10: "car", 11: "bicycle", 13: "other vehicle", 15: "motorcycle", 16: "other vehicle",
    18: "truck", 20: "other vehicle", 30: "person", 31: "bicyclist", 32: "motorcyclist",
    40: "road", 44: "parking", 48: "sidewalk", 49: "other ground", 50: "building", 51: "fence",
    60: "road", 70: "vegetation", 71: "trunk", 72: "terrain", 80: "pole", 81: "traffic sign",
    252: "car", 253: "bicyclist", 254: "person", 255: "motorcyclist", 256: "other vehicle",
    257: "other vehicle", 258: "truck", 259: "other vehicle",
}


def _learning_map() -> np.ndarray:
    lut = np.zeros(1 << 16, dtype=np.uint8)
    for raw, name in RAW_TO_CLASS.items():
        lut[raw] = SEMANTICKITTI_CLASSES.index(name) + 1
    return lut


# (65536,) uint8: semantic id (lower 16 bits of a .label entry) -> evaluation label 1..19, 0 = ignore.
LEARNING_MAP: np.ndarray = _learning_map()

_SEQUENCE = re.compile(r"^\d{2}$")
_FRAME = re.compile(r"^(\d{6})\.bin$")


@dataclass(frozen=True)
class KittiFrame:
    """The reader's record of one scan (ScanRef.native)."""

    sequence: str  # "08"
    frame: int  # frame index in the sequence
    sweeps: tuple[int, ...]  # previous frames used as sweeps, most recent first


@dataclass(frozen=True)
class Calibration:
    """calib.txt of one sequence."""

    p2: np.ndarray  # (3, 4) float64 projection of rectified camera 2 (image_2)
    tr: np.ndarray  # (4, 4) float64 velodyne -> rectified camera-0 frame


def sequence_split(sequence: str) -> str:
    """Official split of a sequence name ("08" -> "val"), or "unknown"."""
    for split, names in SPLITS.items():
        if sequence in names:
            return split
    return "unknown"


def load_scan(path: Path) -> np.ndarray:
    """Read a velodyne .bin: (N, 4) float32 [x, y, z, remission] (checks: `read_points`)."""
    return read_points(path, 4)


def load_calib(path: Path) -> Calibration:
    """Parse a KITTI odometry calib.txt (needs `P2:` and `Tr:`, 12 numbers each)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"calibration file not found: {path}") from None
    entries: dict[str, np.ndarray] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        key, sep, values = line.partition(":")
        if not sep:
            if line.strip():
                raise DataError(f"{path}: line {lineno} is not 'KEY: numbers'")
            continue
        try:
            entries[key.strip()] = np.array([float(x) for x in values.split()], dtype=np.float64)
        except ValueError:
            raise DataError(f"{path}: line {lineno} ({key.strip()}) has a value that is not a number") from None
    if "Tr" not in entries and "Tr_velo_to_cam" in entries:
        entries["Tr"] = entries["Tr_velo_to_cam"]
    mats = {}
    for key in ("P2", "Tr"):
        m = entries.get(key)
        if m is None:
            raise DataError(f"{path}: no '{key}:' line")
        if m.shape != (12,) or not np.all(np.isfinite(m)):
            raise DataError(f"{path}: '{key}:' needs 12 finite numbers, got {m.size}")
        mats[key] = m.reshape(3, 4)
    tr = np.eye(4)
    tr[:3] = mats["Tr"]
    if abs(np.linalg.det(tr[:3, :3])) < 1e-6:
        raise DataError(f"{path}: 'Tr:' rotation is singular")
    return Calibration(p2=mats["P2"], tr=tr)


def load_poses(path: Path) -> np.ndarray:
    """Parse a poses.txt: (N, 4, 4) float64 camera-0 -> world poses, one per frame."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"pose file not found: {path}") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values = [float(x) for x in line.split()]
        except ValueError:
            raise DataError(f"{path}: line {lineno} has a value that is not a number") from None
        if len(values) != 12 or not np.all(np.isfinite(values)):
            raise DataError(f"{path}: line {lineno} needs 12 finite numbers (3x4 row-major), got {len(values)}")
        rows.append(values)
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    if rows:
        poses[:, :3, :] = np.asarray(rows, dtype=np.float64).reshape(-1, 3, 4)
    return poses


def load_times(path: Path) -> np.ndarray:
    """Parse a times.txt: (N,) float64 seconds."""
    try:
        return np.atleast_1d(np.loadtxt(path, dtype=np.float64, ndmin=1))
    except ValueError as e:
        raise DataError(f"{path}: not one number per line ({e})") from None


class SemanticKITTI:
    """`Dataset` over the sequences of a SemanticKITTI dataroot."""

    name = "semantickitti"
    cameras: tuple[str, ...] = (CAMERA,)
    point_features: tuple[str, ...] = ("intensity",)
    voxel_size = 0.1

    def __init__(self, dataroot: str | Path, version: str = "semantickitti"):
        self.dataroot = Path(dataroot)
        self.version = version
        if not self.dataroot.is_dir():
            raise DataError(f"dataroot not found: {self.dataroot}")
        seq_root = self.dataroot / "sequences"
        if not seq_root.is_dir():
            raise DataError(f"no sequences folder: {seq_root}")
        # sequence -> sorted frame indices with a velodyne file
        self.frames: dict[str, list[int]] = {}
        for d in sorted(seq_root.iterdir()):
            if not (d.is_dir() and _SEQUENCE.match(d.name) and (d / "velodyne").is_dir()):
                continue
            ids = sorted(int(m.group(1)) for f in (d / "velodyne").iterdir() if (m := _FRAME.match(f.name)))
            if ids:
                self.frames[d.name] = ids
        if not self.frames:
            raise DataError(f"no sequences with velodyne/*.bin under {seq_root}")
        self._calib: dict[str, Calibration] = {}
        self._poses: dict[str, np.ndarray] = {}
        self._times: dict[str, np.ndarray | None] = {}
        log.debug("SemanticKITTI %s: sequences %s", self.dataroot, ", ".join(self.frames))

    # -- files ------------------------------------------------------------------------------
    def _seq_dir(self, sequence: str) -> Path:
        return self.dataroot / "sequences" / sequence

    def lidar_file(self, sequence: str, frame: int) -> Path:
        return self._seq_dir(sequence) / "velodyne" / f"{frame:06d}.bin"

    def label_file(self, sequence: str, frame: int) -> Path:
        return self._seq_dir(sequence) / "labels" / f"{frame:06d}.label"

    def image_file(self, sequence: str, frame: int) -> Path:
        return self._seq_dir(sequence) / CAMERA / f"{frame:06d}.png"

    def calib(self, sequence: str) -> Calibration:
        """The sequence's calib.txt (cached)."""
        if sequence not in self._calib:
            self._calib[sequence] = load_calib(self._seq_dir(sequence) / "calib.txt")
        return self._calib[sequence]

    def pose(self, sequence: str, frame: int) -> np.ndarray:
        """(4, 4) float64 camera-0 -> world pose of a frame, from poses.txt (cached)."""
        if sequence not in self._poses:
            self._poses[sequence] = load_poses(self._seq_dir(sequence) / "poses.txt")
        poses = self._poses[sequence]
        if frame >= len(poses):
            raise DataError(f"{self._seq_dir(sequence) / 'poses.txt'}: {len(poses)} poses, none for frame {frame}")
        return poses[frame]

    def _timestamp(self, sequence: str, frame: int) -> int:
        """Microseconds from times.txt, or the frame index when the sequence has no times.txt."""
        if sequence not in self._times:
            path = self._seq_dir(sequence) / "times.txt"
            if path.is_file():
                self._times[sequence] = load_times(path)
            else:
                log.debug("no %s: timestamps are frame indices", path)
                self._times[sequence] = None
        times = self._times[sequence]
        if times is None:
            return frame
        if frame >= len(times):
            raise DataError(f"{self._seq_dir(sequence) / 'times.txt'}: {len(times)} times, none for frame {frame}")
        return int(round(float(times[frame]) * 1e6))

    # -- Dataset protocol -------------------------------------------------------------------
    @cached_property
    def has_labels(self) -> bool:
        """True when every scan of the labelled (non-test) sequences on disk has its .label file
        and there is at least one such scan (checked once, on first use). Official test sequences
        11-21 have no labels and are not counted; labels() of a scan without its file raises
        DataError."""
        labelled = {s: ids for s, ids in self.frames.items() if sequence_split(s) != "test"}
        for seq, ids in labelled.items():
            folder = self._seq_dir(seq) / "labels"
            names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
            missing = [f for f in ids if f"{f:06d}.label" not in names]
            if missing:
                log.info("no labels: %d of %d scans of sequence %s lack a .label file (first: %s)",
                         len(missing), len(ids), seq, self.label_file(seq, missing[0]))
                return False
        return bool(labelled)

    def scans(self, split: str | None = None, sweeps: int = 1) -> list[ScanRef]:
        """Frames of `split` (None = all sequences), by sequence then frame index.

        sweeps: K = total lidar frames per scan (the frame + up to K-1 previous frames).
        Loads and checks calib.txt of each listed sequence (and poses.txt when sweeps > 1).
        """
        if sweeps > 256:
            raise ConfigError(f"sweeps must be at most 256 (uint8 sweep ids), got {sweeps}")
        out = []
        for seq, ids in self.frames.items():
            seq_split = sequence_split(seq)
            if split is not None and seq_split != split:
                continue
            self.calib(seq)
            present = set(ids)
            for frame in ids:
                prev = []
                k = frame - 1
                while len(prev) < sweeps - 1 and k in present:
                    prev.append(k)
                    k -= 1
                if prev:
                    self.pose(seq, frame)
                    self.pose(seq, prev[-1])
                out.append(
                    ScanRef(
                        token=f"{seq}/{frame:06d}",
                        scene=seq,
                        split=seq_split,
                        timestamp=self._timestamp(seq, frame),
                        lidar_path=str(self.lidar_file(seq, frame).relative_to(self.dataroot)),
                        native=KittiFrame(seq, frame, tuple(prev)),
                    )
                )
        return out

    def subset(self, scans: list[ScanRef]) -> tuple[SemanticKITTI, list[ScanRef]]:
        """This reader cut down to the sequences `scans` come from (their frame lists, calib,
        poses, times): a Dask task's payload, instead of every sequence's poses."""
        _ = self.has_labels  # decided once here, not again in every worker
        seqs = {s.native.sequence for s in scans}
        sub = copy.copy(self)
        sub.frames = {k: v for k, v in self.frames.items() if k in seqs}
        sub._calib = {k: v for k, v in self._calib.items() if k in seqs}
        sub._poses = {k: v for k, v in self._poses.items() if k in seqs}
        sub._times = {k: v for k, v in self._times.items() if k in seqs}
        return sub, list(scans)

    def sweep_transform(self, sequence: str, frame: int, other: int) -> np.ndarray:
        """(4, 4) float64 velodyne(other) -> velodyne(frame): inv(Tr) @ inv(P_frame) @ P_other @ Tr."""
        tr = self.calib(sequence).tr
        return np.linalg.inv(tr) @ np.linalg.inv(self.pose(sequence, frame)) @ self.pose(sequence, other) @ tr

    def points(self, scan: ScanRef) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """xyz (n, 3) float32 in the frame's velodyne frame, feat (n, 1) float32 remission, sweep
        (n,) uint8 (0 = the frame, i = its i-th previous frame), n_key: the frame's points first."""
        kf: KittiFrame = scan.native
        key = load_scan(self.lidar_file(kf.sequence, kf.frame))
        xyz, feat, sweep = [key[:, :3]], [key[:, 3:4]], [np.zeros(len(key), np.uint8)]
        for i, other in enumerate(kf.sweeps, 1):
            pts = load_scan(self.lidar_file(kf.sequence, other))
            t = self.sweep_transform(kf.sequence, kf.frame, other)
            moved = pts[:, :3].astype(np.float64) @ t[:3, :3].T + t[:3, 3]
            xyz.append(moved.astype(np.float32))
            feat.append(pts[:, 3:4])
            sweep.append(np.full(len(pts), i, np.uint8))
        return np.concatenate(xyz), np.concatenate(feat), np.concatenate(sweep), len(key)

    def labels(self, scan: ScanRef, n_key: int) -> np.ndarray:
        """(n_key,) uint8 evaluation labels 1..19 of the frame's points, 0 = ignore (instance bits
        are dropped: semantic id = lower 16 bits)."""
        kf: KittiFrame = scan.native
        path = self.label_file(kf.sequence, kf.frame)
        return LEARNING_MAP[read_labels(path, "<u4", n_key, self.lidar_file(kf.sequence, kf.frame)) & 0xFFFF]

    def views(self, scan: ScanRef) -> list[View]:
        """[image_2 of the frame]; width/height from the PNG header (not decoded)."""
        kf: KittiFrame = scan.native
        path = self.image_file(kf.sequence, kf.frame)
        try:
            with Image.open(path) as im:
                width, height = im.size
        except FileNotFoundError:
            raise DataError(f"image file not found: {path}") from None
        except OSError as e:
            raise DataError(f"{path}: not a readable image ({e})") from None
        return [View(name=CAMERA, path=path, width=width, height=height)]

    def project(self, scan: ScanRef, view: int, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project (n, 3) velodyne-frame points into image_2: uv (n, 2) float64 pixel coordinates
        (pixel centres at integers; meaningful where visible) and visible (n,) bool = camera-0
        depth > 1 m and 1 < u < W-1 and 1 < v < H-1."""
        views = self.views(scan)
        if not 0 <= view < len(views):
            raise ConfigError(f"view {view} out of range: scan {scan.token} has {len(views)} view(s)")
        v = views[view]
        calib = self.calib(scan.native.sequence)
        p = np.asarray(xyz, dtype=np.float64)[:, :3]
        cam = p @ calib.tr[:3, :3].T + calib.tr[:3, 3]
        uvw = cam @ calib.p2[:, :3].T + calib.p2[:, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = uvw[:, :2] / uvw[:, 2:3]
        visible = (
            (cam[:, 2] > 1.0)
            & (uv[:, 0] > 1) & (uv[:, 0] < v.width - 1)
            & (uv[:, 1] > 1) & (uv[:, 1] < v.height - 1)
        )
        return uv, visible
