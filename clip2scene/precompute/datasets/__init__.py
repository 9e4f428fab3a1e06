"""Dataset readers: each turns a dataset on disk into scans (points, labels) and camera views
(image path, calibration) for the pipeline (the `Dataset` protocol of :mod:`.base`).

    from clip2scene.precompute.datasets import DATASETS, open_dataset

    ds = open_dataset("nuscenes", "/data/nuscenes", "v1.0-mini")
    DATASETS["nuscenes"].image_size          # (224, 416): the teacher input when none is given

Files: ``base.py`` (protocol, ScanRef, View), ``points.py`` (point and label files), ``geometry.py``
(poses, camera matrices, projection shared by the readers), ``splits.py`` (official nuScenes
scene splits), one reader per format (``nuscenes.py``, ``semantickitti.py``, ``scannet.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clip2scene.errors import ConfigError
from clip2scene.precompute.datasets.base import Dataset, ScanRef, View
from clip2scene.precompute.datasets.nuscenes import NuScenes
from clip2scene.precompute.datasets.scannet import ScanNet
from clip2scene.precompute.datasets.semantickitti import SemanticKITTI

__all__ = ["DATASETS", "DatasetSpec", "Dataset", "ScanRef", "View", "open_dataset"]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset format and its defaults."""

    reader: type  # reader class, called as reader(dataroot, version)
    version: str  # version opened when none is given
    image_size: tuple[int, int]  # teacher input (H, W): multiples of 16 close to the cameras' aspect ratio
    full_size: tuple[int, int]  # full camera resolution (H, W), the input sliding windows tile


# format name -> reader and defaults (`precompute --dataset`); image sizes: nuScenes 1600x900,
# KITTI image_2 1241x376, ScanNet 25k colour 640x480.
DATASETS: dict[str, DatasetSpec] = {
    "nuscenes": DatasetSpec(NuScenes, "v1.0-trainval", (224, 416), (900, 1600)),
    "semantickitti": DatasetSpec(SemanticKITTI, "semantickitti", (128, 416), (376, 1241)),
    "scannet": DatasetSpec(ScanNet, "scannet-25k", (240, 320), (480, 640)),
}


def open_dataset(name: str, dataroot: Path | str, version: str | None = None) -> Dataset:
    """Open a dataset reader by format name (ConfigError for an unknown name)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; supported: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    return spec.reader(dataroot, version or spec.version)
