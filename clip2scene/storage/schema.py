"""The cache format, pinned: array names, dtypes, trailing shapes and shard geometry.

Every array of a cache is listed here; docs/cache-format.md explains each one and
tests/storage/test_format.py pins it. Change this file only with a SCHEMA_VERSION bump.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 3
ATTR_KEY = "clip2scene"  # group attribute holding all our metadata
FORMAT_NAME = "clip2scene-cache"

STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"


@dataclass(frozen=True)
class ArraySpec:
    """One per-row array: name inside the group, dtype, trailing shape, chunk and shard rows."""

    name: str
    dtype: str
    trailing: tuple[str | int, ...]  # symbolic sizes: "C" classes, "D" feature dim, "F" input channels
    chunk_rows: int
    shard_rows: int
    axis: str  # "points" (row per point), "pairs" (row per camera-visible point), "scans", "classes"


POINT_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("points/xyz", "float32", (3,), 65536, 1048576, "points"),
    ArraySpec("points/feat", "float32", ("F",), 65536, 1048576, "points"),  # input channels (meta point_features)
    ArraySpec("points/sweep", "uint8", (), 65536, 1048576, "points"),
    ArraySpec("points/label", "uint8", (), 65536, 1048576, "points"),  # only when labelled
)
PAIR_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("pairs/point", "int32", (), 65536, 1048576, "pairs"),
    ArraySpec("pairs/camera", "uint8", (), 65536, 1048576, "pairs"),
    ArraySpec("pairs/uv", "float32", (2,), 65536, 1048576, "pairs"),
    ArraySpec("pairs/logits", "float16", ("C",), 16384, 262144, "pairs"),  # only with a teacher
    ArraySpec("pairs/features", "float16", ("D",), 2048, 32768, "pairs"),  # only with a teacher
)
SCAN_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("scans/point_offset", "int64", (), 4096, 65536, "scans+1"),
    ArraySpec("scans/pair_offset", "int64", (), 4096, 65536, "scans+1"),
    ArraySpec("scans/timestamp", "int64", (), 4096, 65536, "scans"),
    ArraySpec("scans/token", "string", (), 4096, 65536, "scans"),
    ArraySpec("scans/scene", "string", (), 4096, 65536, "scans"),
    ArraySpec("scans/split", "string", (), 4096, 65536, "scans"),
    ArraySpec("scans/lidar_path", "string", (), 4096, 65536, "scans"),
)
TEXT_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("text/embeddings", "float32", ("D",), 4096, 4096, "classes"),  # only with a teacher
)
TEACHER_ARRAYS = ("pairs/logits", "pairs/features", "text/embeddings")  # absent when has_teacher is false
ALL_ARRAYS: tuple[ArraySpec, ...] = POINT_ARRAYS + PAIR_ARRAYS + SCAN_ARRAYS + TEXT_ARRAYS


def resolve_trailing(spec: ArraySpec, num_classes: int, feature_dim: int, point_channels: int = 1) -> tuple[int, ...]:
    """Concrete trailing shape of `spec` for a cache with C classes, D-dim features, F input channels."""
    sizes = {"C": num_classes, "D": feature_dim, "F": point_channels}
    return tuple(sizes[t] if isinstance(t, str) else t for t in spec.trailing)


# Keys every cache's metadata carries (group attribute ATTR_KEY).
REQUIRED_META = (
    "format", "schema_version", "status", "tool_version", "created", "dataset", "teacher",
    "class_names", "eval_class_names", "prompt_to_eval", "num_scans", "num_points", "num_pairs",
    "has_labels", "has_teacher", "sweeps", "cameras", "point_features", "voxel_size",
)
