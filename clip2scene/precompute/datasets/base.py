"""What stage one needs from a dataset reader: the `Dataset` protocol every format implements.

`clip2scene.precompute.pipeline` is written against this protocol only; the readers are
`nuscenes.NuScenesDataset`, `semantickitti.SemanticKITTI` and `scannet.ScanNet`. A "scan" is
one training sample of the cache: a nuScenes keyframe, a SemanticKITTI frame, a ScanNet scene.

    ds = open_dataset("semantickitti", "/data/semantickitti")
    for scan in ds.scans(split="train", sweeps=3):
        xyz, feat, sweep, n_key = ds.points(scan)      # merged keyframe + K-1 sweeps
        labels = ds.labels(scan, n_key)                # (n_key,) uint8 eval labels, 0 = ignore
        for v, view in enumerate(ds.views(scan)):      # images the teacher looks at
            uv, visible = ds.project(scan, v, xyz)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ScanRef:
    """Identity of one scan, as the cache records it."""

    token: str  # unique id (nuScenes sample token, "08/000123", "scene0000_00")
    scene: str  # scene / sequence name
    split: str  # official split of the scene: train / val / test / mini_train / ...
    timestamp: int  # microseconds (or frame index where the format has no clock)
    lidar_path: str  # the point file, relative to the dataroot
    native: Any = None  # the reader's own record (nuScenes Keyframe, ...)


@dataclass(frozen=True)
class View:
    """One image of a scan that the teacher sees."""

    name: str  # camera channel or frame id
    path: Path  # image file
    width: int  # pixels, as stored on disk
    height: int


class Dataset(Protocol):
    name: str  # "nuscenes" | "semantickitti" | "scannet" (= its clip2scene.classes eval set)
    dataroot: Path
    version: str  # format version / layout tag recorded in the cache
    has_labels: bool  # whether labels(...) returns ground truth
    cameras: tuple[str, ...]  # fixed camera names (pair_camera indexes views(scan)); () if per-scan
    point_features: tuple[str, ...]  # input channels: ("intensity",) or ("red", "green", "blue")
    voxel_size: float  # the field's training voxel size in metres (0.1 outdoor, 0.05 ScanNet)

    def scans(self, split: str | None = None, sweeps: int = 1) -> list[ScanRef]:
        """Scans of `split` (None = all) in a deterministic order; sweeps = K lidar frames."""

    def points(self, scan: ScanRef) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """xyz (n, 3) float32 in the scan's frame, feat (n, F) float32 scaled to 0..1 (nuScenes
        intensity / 255, KITTI remission as stored, RGB / 255), sweep (n,) uint8 (0 =
        keyframe, j = j-th previous sweep), n_key: the keyframe points come first."""

    def labels(self, scan: ScanRef, n_key: int) -> np.ndarray:
        """(n_key,) uint8 evaluation labels 1..K of the keyframe points, 0 = ignore."""

    def views(self, scan: ScanRef) -> list[View]:
        """The images of this scan (at most 255)."""

    def project(self, scan: ScanRef, view: int, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project (n, 3) float32 scan-frame points into views(scan)[view]: uv (n, 2) float64
        pixel coordinates (pixel centres at integers) and visible (n,) bool."""
