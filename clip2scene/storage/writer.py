"""CacheWriter: append scans, write whole shards only, commit the metadata last.

    with CacheWriter(path, meta, num_classes=16, feature_dim=512, has_labels=True) as w:
        for scan in scans:
            w.append(scan)          # a ScanRecord
        w.set_text_embeddings(text) # (C, D) float32
    # feature_dim=None writes a labels-only cache (no teacher: no logits, features or text).
    # leaving the block commits: status "complete" and the counts. An exception instead marks
    # the cache "failed" with the reason, so a half-written cache never looks complete.

Rows are buffered per array and written one full shard at a time (a shard is written exactly
once, by one writer); the last, partial shard of each array is written at commit. The writer is
the single coordinator that creates and resizes arrays.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import logging
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from clip2scene import __version__
from clip2scene.errors import CacheError
from clip2scene.storage import schema

log = logging.getLogger(__name__)


@dataclass
class ScanRecord:
    """Everything the cache keeps for one scan (keyframe + its sweeps, merged).

    n = points of the scan, m = camera-visible points (one row per visible point).
    """

    token: str  # sample token
    scene: str  # scene name
    split: str  # "train" / "val" / ...
    timestamp: int  # keyframe timestamp, microseconds
    lidar_path: str  # keyframe lidar file, relative to the dataroot
    xyz: np.ndarray  # (n, 3) float32: x, y, z in the scan's frame (keyframe lidar / scene)
    feat: np.ndarray  # (n, F) float32 input channels, meta point_features (intensity / r, g, b)
    sweep: np.ndarray  # (n,) uint8: 0 = keyframe, k = k-th previous sweep
    label: np.ndarray | None  # (n,) uint8 evaluation label, 0 = ignore; None when unlabelled
    pair_point: np.ndarray  # (m,) int32 index into the scan's points, ascending
    pair_camera: np.ndarray  # (m,) uint8 view index (meta cameras order; per-scan frame order for ScanNet)
    pair_uv: np.ndarray  # (m, 2) float32 pixel coordinates in the original image
    pair_logits: np.ndarray | None = None  # (m, C) float16 cosine logits over the prompt classes (None: no teacher)
    pair_features: np.ndarray | None = None  # (m, D) float16 L2-normalised teacher features (None: no teacher)


def _check(name: str, arr: np.ndarray | None, dtype: str, shape: tuple) -> None:
    if arr is None:
        raise ValueError(f"ScanRecord.{name} is missing")
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"ScanRecord.{name}: dtype {arr.dtype}, expected {dtype}")
    if len(arr.shape) != len(shape) or any(s is not None and a != s for a, s in zip(arr.shape, shape)):
        raise ValueError(f"ScanRecord.{name}: shape {arr.shape}, expected {shape}")


class _ShardedAppender:
    """Buffers rows of one array and writes them a whole shard at a time."""

    def __init__(self, array: zarr.Array, shard_rows: int):
        self.array = array
        self.shard_rows = shard_rows
        self.written = 0
        self._parts: list[np.ndarray] = []
        self._buffered = 0

    def append(self, rows: np.ndarray) -> None:
        if len(rows):
            self._parts.append(rows)
            self._buffered += len(rows)
        while self._buffered >= self.shard_rows:
            block = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
            self._write(block[: self.shard_rows])
            rest = block[self.shard_rows:]
            self._parts = [rest] if len(rest) else []
            self._buffered = len(rest)

    def _write(self, block: np.ndarray) -> None:
        end = self.written + len(block)
        self.array.resize((end,) + self.array.shape[1:])
        self.array[self.written:end] = block
        self.written = end

    def finish(self) -> int:
        if self._buffered:
            self._write(np.concatenate(self._parts))
            self._parts, self._buffered = [], 0
        return self.written


class CacheWriter:
    """Create a cache at `path` and append scans to it (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        meta: dict,
        num_classes: int,
        feature_dim: int | None,
        has_labels: bool,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        if self.path.exists():
            if not overwrite:
                raise CacheError(f"cache already exists: {self.path} (pass --overwrite to replace it)")
            shutil.rmtree(self.path)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.has_teacher = feature_dim is not None
        self.has_labels = has_labels
        self.point_channels = len(meta.get("point_features", ()))
        if self.point_channels < 1:
            raise ValueError("cache metadata needs point_features (the input channel names)")
        self.meta = dict(meta)
        self.meta.update(
            format=schema.FORMAT_NAME,
            schema_version=schema.SCHEMA_VERSION,
            status=schema.STATUS_WRITING,
            tool_version=__version__,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            created_by=f"{getpass.getuser()}@{platform.node()}",
            has_labels=has_labels,
            has_teacher=self.has_teacher,
            num_scans=0,
            num_points=0,
            num_pairs=0,
        )
        missing = [k for k in schema.REQUIRED_META if k not in self.meta]
        if missing:
            raise ValueError(f"cache metadata lacks {', '.join(missing)}")
        if len(self.meta["prompt_to_eval"]) != num_classes:
            raise ValueError(f"prompt_to_eval has {len(self.meta['prompt_to_eval'])} entries for {num_classes} classes")
        self.group = zarr.open_group(str(self.path), mode="w-")
        self.group.attrs[schema.ATTR_KEY] = self.meta
        self._appenders: dict[str, _ShardedAppender] = {}
        for spec in schema.POINT_ARRAYS + schema.PAIR_ARRAYS:
            if spec.name == "points/label" and not has_labels:
                continue
            if spec.name in schema.TEACHER_ARRAYS and not self.has_teacher:
                continue
            trailing = schema.resolve_trailing(spec, num_classes, feature_dim or 0, self.point_channels)
            arr = self.group.create_array(
                spec.name,
                shape=(0,) + trailing,
                dtype=spec.dtype,
                chunks=(spec.chunk_rows,) + trailing,
                shards=(spec.shard_rows,) + trailing,
                compressors=ZstdCodec(level=3),
                fill_value=0,
            )
            self._appenders[spec.name] = _ShardedAppender(arr, spec.shard_rows)
        self._scans: dict[str, list] = {k: [] for k in ("token", "scene", "split", "timestamp", "lidar_path")}
        self._point_offsets = [0]
        self._pair_offsets = [0]
        self._text: np.ndarray | None = None
        self._closed = False

    def append(self, scan: ScanRecord) -> None:
        """Append one scan; shapes and dtypes are checked (ValueError names the field)."""
        n = scan.xyz.shape[0]
        m = scan.pair_point.shape[0]
        _check("xyz", scan.xyz, "float32", (n, 3))
        _check("feat", scan.feat, "float32", (n, self.point_channels))
        _check("sweep", scan.sweep, "uint8", (n,))
        if self.has_labels:
            _check("label", scan.label, "uint8", (n,))
        _check("pair_point", scan.pair_point, "int32", (m,))
        _check("pair_camera", scan.pair_camera, "uint8", (m,))
        _check("pair_uv", scan.pair_uv, "float32", (m, 2))
        if self.has_teacher:
            _check("pair_logits", scan.pair_logits, "float16", (m, self.num_classes))
            _check("pair_features", scan.pair_features, "float16", (m, self.feature_dim))
        if m and (scan.pair_point.min() < 0 or scan.pair_point.max() >= n):
            raise ValueError(f"ScanRecord.pair_point out of range for scan {scan.token} with {n} points")
        rows = {
            "points/xyz": scan.xyz, "points/feat": scan.feat, "points/sweep": scan.sweep,
            "pairs/point": scan.pair_point, "pairs/camera": scan.pair_camera, "pairs/uv": scan.pair_uv,
        }
        if self.has_teacher:
            rows.update({"pairs/logits": scan.pair_logits, "pairs/features": scan.pair_features})
        if self.has_labels:
            rows["points/label"] = scan.label
        for name, data in rows.items():
            self._appenders[name].append(data)
        for key in self._scans:
            self._scans[key].append(getattr(scan, key))
        self._point_offsets.append(self._point_offsets[-1] + n)
        self._pair_offsets.append(self._pair_offsets[-1] + m)

    def set_text_embeddings(self, text: np.ndarray) -> None:
        """(C, D) float32 text embeddings of the prompt classes (rows L2-normalised)."""
        if not self.has_teacher:
            raise ValueError("a labels-only cache (feature_dim=None) has no text embeddings")
        text = np.asarray(text, dtype=np.float32)
        if text.shape != (self.num_classes, self.feature_dim):
            raise ValueError(f"text embeddings shape {text.shape}, expected {(self.num_classes, self.feature_dim)}")
        self._text = text

    @property
    def num_scans(self) -> int:
        return len(self._point_offsets) - 1

    def _write_whole(self, name: str, data: np.ndarray, dtype: str) -> None:
        spec = next(s for s in schema.ALL_ARRAYS if s.name == name)
        trailing = data.shape[1:]
        rows = max(len(data), 1)
        self.group.create_array(
            name,
            shape=data.shape,
            dtype=dtype,
            chunks=(min(spec.chunk_rows, rows),) + trailing,
            shards=(min(spec.shard_rows, rows),) + trailing,
            compressors=ZstdCodec(level=3) if dtype != "string" else "auto",
            fill_value=0 if dtype != "string" else "",
        )[...] = data

    def commit(self) -> dict:
        """Write the tails, per-scan tables and text; mark the cache complete. Returns the metadata."""
        if self._closed:
            return self.meta
        if self.num_scans == 0:
            raise CacheError(f"{self.path}: no scans were written")
        if self.has_teacher and self._text is None:
            raise CacheError(f"{self.path}: text embeddings were not set")
        for app in self._appenders.values():
            app.finish()
        self._write_whole("scans/point_offset", np.asarray(self._point_offsets, dtype=np.int64), "int64")
        self._write_whole("scans/pair_offset", np.asarray(self._pair_offsets, dtype=np.int64), "int64")
        self._write_whole("scans/timestamp", np.asarray(self._scans["timestamp"], dtype=np.int64), "int64")
        for key in ("token", "scene", "split", "lidar_path"):
            self._write_whole(f"scans/{key}", np.asarray(self._scans[key], dtype=object), "string")
        if self.has_teacher:
            self._write_whole("text/embeddings", self._text, "float32")
        self.meta.update(
            status=schema.STATUS_COMPLETE,
            num_scans=self.num_scans,
            num_points=int(self._point_offsets[-1]),
            num_pairs=int(self._pair_offsets[-1]),
        )
        self.group.attrs[schema.ATTR_KEY] = self.meta
        self._closed = True
        log.info("cache committed: %s (%d scans, %d points)", self.path, self.num_scans, self.meta["num_points"])
        return self.meta

    def fail(self, reason: str) -> None:
        """Mark the cache failed (never complete) with a reason."""
        self.meta.update(status=schema.STATUS_FAILED, error=reason)
        self.group.attrs[schema.ATTR_KEY] = self.meta
        self._closed = True

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        elif not self._closed:
            self.fail(f"{exc_type.__name__}: {exc}")
