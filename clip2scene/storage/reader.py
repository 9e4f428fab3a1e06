"""Cache: read a complete cache, scan by scan, without loading it whole.

    cache = open_cache("./zarr")              # CacheError if missing, incomplete or of another schema
    idx = cache.indices("train")              # (S_train,) int64 scan indices
    scan = cache.read_scan(int(idx[0]))       # ScanData with numpy arrays
    cache.text_embeddings                     # (C, D) float32

Per-scan offsets are loaded once (small); points and pairs are sliced from the sharded arrays,
so a scan read touches only the chunks it needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from clip2scene.errors import CacheError
from clip2scene.storage import schema

log = logging.getLogger(__name__)


@dataclass
class ScanData:
    """One scan read from the cache (n points, m camera-visible points)."""

    index: int
    token: str
    scene: str
    split: str
    xyz: np.ndarray  # (n, 3) float32
    feat: np.ndarray  # (n, F) float32 input channels (Cache.point_features)
    sweep: np.ndarray  # (n,) uint8
    label: np.ndarray | None  # (n,) uint8, 0 = ignore
    pair_point: np.ndarray  # (m,) int32 into the scan's points
    pair_camera: np.ndarray  # (m,) uint8
    pair_uv: np.ndarray  # (m, 2) float32
    pair_logits: np.ndarray | None  # (m, C) float16, None for a labels-only cache
    pair_features: np.ndarray | None  # (m, D) float16, None unless requested (and a teacher exists)


class Cache:
    """A complete clip2scene cache opened for reading."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"cache not found: {self.path}")
        try:
            group = zarr.open_group(str(self.path), mode="r")
        except Exception as e:  # zarr raises several types for a non-group folder
            raise CacheError(f"{self.path}: not a Zarr group ({type(e).__name__})") from None
        meta = dict(group.attrs).get(schema.ATTR_KEY)
        if not isinstance(meta, dict) or meta.get("format") != schema.FORMAT_NAME:
            raise CacheError(f"{self.path}: not a clip2scene cache (no '{schema.ATTR_KEY}' attributes)")
        if meta.get("schema_version") != schema.SCHEMA_VERSION:
            raise CacheError(
                f"{self.path}: cache schema version {meta.get('schema_version')} but this clip2scene reads {schema.SCHEMA_VERSION}"
            )
        if meta.get("status") != schema.STATUS_COMPLETE:
            why = f": {meta['error']}" if meta.get("error") else ""
            raise CacheError(f"{self.path}: cache is {meta.get('status')!r}, not complete{why}; rerun precompute")
        self.meta = meta
        self._group: zarr.Group | None = group
        self.point_offset = group["scans/point_offset"][...]
        self.pair_offset = group["scans/pair_offset"][...]
        self.timestamp = group["scans/timestamp"][...]
        self.token = np.asarray(group["scans/token"][...], dtype=object)
        self.scene = np.asarray(group["scans/scene"][...], dtype=object)
        self.split = np.asarray(group["scans/split"][...], dtype=object)
        self.lidar_path = np.asarray(group["scans/lidar_path"][...], dtype=object)
        self.text_embeddings = (np.asarray(group["text/embeddings"][...], dtype=np.float32)
                                if self.has_teacher else None)  # (C, D) float32, None without a teacher

    # Zarr handles are reopened lazily in DataLoader worker processes.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_group"] = None
        return state

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(str(self.path), mode="r")
        return self._group

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def eval_class_names(self) -> list[str]:
        """Names of the ground-truth labels 1..K."""
        return list(self.meta["eval_class_names"])

    @property
    def prompt_to_eval(self) -> list[int]:
        """Per prompt class, the evaluation label 1..K it maps to, 0 for none."""
        return [int(v) for v in self.meta["prompt_to_eval"]]

    @property
    def fingerprint(self) -> dict:
        return dict(self.meta["teacher"] or {})

    @property
    def has_teacher(self) -> bool:
        """False for a labels-only cache (precompute --teacher none)."""
        return bool(self.meta.get("has_teacher", True))

    @property
    def point_features(self) -> list[str]:
        """Names of the input channels stored in points/feat."""
        return list(self.meta["point_features"])

    @property
    def voxel_size(self) -> float:
        """The dataset's usual training voxel size in metres."""
        return float(self.meta["voxel_size"])

    @property
    def num_scans(self) -> int:
        return int(self.meta["num_scans"])

    @property
    def has_labels(self) -> bool:
        return bool(self.meta["has_labels"])

    def indices(self, split: str | None = None) -> np.ndarray:
        """(S,) int64 indices of the scans in `split` (all scans for None)."""
        if split is None:
            return np.arange(self.num_scans, dtype=np.int64)
        return np.flatnonzero(self.split == split).astype(np.int64)

    def read_scan(self, i: int, features: bool = False) -> ScanData:
        """Read scan `i`; teacher features (the largest array) only when `features`."""
        if not 0 <= i < self.num_scans:
            raise IndexError(f"scan index {i} out of range 0..{self.num_scans - 1}")
        g = self.group
        p0, p1 = int(self.point_offset[i]), int(self.point_offset[i + 1])
        q0, q1 = int(self.pair_offset[i]), int(self.pair_offset[i + 1])
        return ScanData(
            index=i,
            token=str(self.token[i]),
            scene=str(self.scene[i]),
            split=str(self.split[i]),
            xyz=g["points/xyz"][p0:p1],
            feat=g["points/feat"][p0:p1],
            sweep=g["points/sweep"][p0:p1],
            label=g["points/label"][p0:p1] if self.has_labels else None,
            pair_point=g["pairs/point"][q0:q1],
            pair_camera=g["pairs/camera"][q0:q1],
            pair_uv=g["pairs/uv"][q0:q1],
            pair_logits=g["pairs/logits"][q0:q1] if self.has_teacher else None,
            pair_features=g["pairs/features"][q0:q1] if features and self.has_teacher else None,
        )

    def array_info(self) -> list[dict]:
        """Per array: name, shape, dtype, chunk and shard shape, stored bytes."""
        out = []
        for spec in schema.ALL_ARRAYS:
            if spec.name not in self.group:
                continue
            arr = self.group[spec.name]
            out.append(
                dict(
                    name=spec.name,
                    shape=list(arr.shape),
                    dtype=spec.dtype,
                    chunks=list(arr.chunks),
                    shards=list(arr.shards) if arr.shards else None,
                    stored_bytes=int(arr.nbytes_stored()),
                )
            )
        return out

    def info(self) -> dict:
        """Metadata plus counts, per-split scan counts and bytes per point."""
        arrays = self.array_info()
        total = sum(a["stored_bytes"] for a in arrays)
        n = max(int(self.meta["num_points"]), 1)
        m = max(int(self.meta["num_pairs"]), 1)
        splits = {str(s): int((self.split == s).sum()) for s in sorted(set(self.split.tolist()))}
        return dict(
            path=str(self.path),
            meta=self.meta,
            splits=splits,
            arrays=arrays,
            stored_bytes=total,
            bytes_per_point=total / n,
            bytes_per_visible_point=total / m,
        )


def open_cache(path: str | Path) -> Cache:
    """Open a complete cache for reading (CacheError with the reason otherwise)."""
    return Cache(path)
