"""The cache format, pinned: array names, dtypes, trailing shapes and shard geometry.

Point and pair arrays live per block (`blocks/NNNNNN/points/xyz`, ...): a block is a run of
consecutive scans written by one task, whole, once; the scan tables (`scans/...`) and the text
embeddings sit at the root and are written by the coordinator at commit. Every array of a
cache is listed here; docs/cache-format.md explains each one and
tests/storage/test_format.py pins it. Change this file only with a SCHEMA_VERSION bump.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 4
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

BLOCK_PREFIX = "blocks"  # blocks/{index:06d}/points/..., blocks/{index:06d}/pairs/...
MANIFEST = "manifest.json"  # written last at commit: blocks, per-file sha256, skipped samples
BLOCK_RECORDS = "manifest/blocks"  # manifest/blocks/{index:06d}.json: a block is done when this exists


def block_path(index: int) -> str:
    return f"{BLOCK_PREFIX}/{index:06d}"


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
    ArraySpec("pairs/features", "float16", ("D",), 2048, 32768, "pairs"),  # only with a teacher; int8 if feature_dtype int8
    ArraySpec("pairs/feature_scale", "float16", (), 65536, 1048576, "pairs"),  # only with int8 features
)
FEATURE_DTYPES = ("float16", "int8")  # meta feature_dtype: how pairs/features is stored
SCAN_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("scans/block", "int32", (), 4096, 65536, "scans"),  # block holding the scan's rows
    ArraySpec("scans/point_start", "int64", (), 4096, 65536, "scans"),  # first point row within the block
    ArraySpec("scans/point_count", "int64", (), 4096, 65536, "scans"),
    ArraySpec("scans/pair_start", "int64", (), 4096, 65536, "scans"),  # first pair row within the block
    ArraySpec("scans/pair_count", "int64", (), 4096, 65536, "scans"),
    ArraySpec("scans/timestamp", "int64", (), 4096, 65536, "scans"),
    ArraySpec("scans/token", "string", (), 4096, 65536, "scans"),
    ArraySpec("scans/scene", "string", (), 4096, 65536, "scans"),
    ArraySpec("scans/split", "string", (), 4096, 65536, "scans"),
    ArraySpec("scans/lidar_path", "string", (), 4096, 65536, "scans"),
)
TEXT_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("text/embeddings", "float32", ("D",), 4096, 4096, "classes"),  # only with a teacher
)
TEACHER_ARRAYS = ("pairs/logits", "pairs/features", "pairs/feature_scale", "text/embeddings")  # absent when has_teacher is false
BLOCK_ARRAYS: tuple[ArraySpec, ...] = POINT_ARRAYS + PAIR_ARRAYS  # names relative to blocks/NNNNNN/
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
# Meta fields two caches must share to be merged (and a resumed precompute must match).
COMPATIBLE_META = ("schema_version", "teacher", "feature_dtype", "class_names", "class_set", "eval_class_names", "prompt_to_eval",
                   "has_labels", "has_teacher", "sweeps", "cameras", "point_features", "voxel_size")
