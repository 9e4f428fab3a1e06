"""The cache format, pinned: array names, dtypes, trailing shapes, shard geometry and attributes.

Schema 5 stores the teacher's outputs where they are born: per image (a view of a scan: a
nuScenes keyframe x camera, a KITTI image_2, a ScanNet frame) its dense feature map and
class-score map on the teacher's patch grid (`images/...`), and per (point, view) pair the
point, the image and the pixel position (`pairs/...`). Stage two samples the maps at the
pairs' positions (clip2scene.storage.sampling). Point, pair and image arrays live per block
(`blocks/NNNNNN/points/xyz`, ...): a block is a run of consecutive scans written by one task,
whole, once; the scan tables (`scans/...`) and the text embeddings sit at the root and are
written by the coordinator at commit. Every array and every attribute of a cache is listed
here; docs/cache-format.md explains each one and tests/storage/test_format.py pins it. Change
this file only with a SCHEMA_VERSION bump.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

SCHEMA_VERSION = 5
ATTR_KEY = "clip2scene"  # group attribute holding all our metadata
FORMAT_NAME = "clip2scene-cache"

STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"

UV_SCALE = 65536  # pairs/uv stores round((u + 0.5) / W * UV_SCALE) (same for v with H) as uint16
PAIR_ORDER = "point-then-border"  # pairs of a point are contiguous, farthest-from-border view first
SAMPLING = dict(mode="bilinear", align_corners=False, padding="border", x="(u + 0.5) / W * 2 - 1",
                y="(v + 0.5) / H * 2 - 1", features="L2-normalised on the grid and after sampling")


@dataclass(frozen=True)
class ArraySpec:
    """One per-row array: name inside the group, dtype, trailing shape, chunk and shard rows."""

    name: str
    dtype: str
    trailing: tuple[str | int, ...]  # symbolic sizes: "C" classes, "D" feature dim, "F" input channels, "h"/"w" grid
    chunk_rows: int
    shard_rows: int
    axis: str  # "points" (row per point), "pairs" (row per (point, view)), "images", "scans", "classes"


BLOCK_PREFIX = "blocks"  # blocks/{index:06d}/points/..., blocks/{index:06d}/pairs/..., .../images/...
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
    ArraySpec("pairs/image", "uint8", (), 65536, 1048576, "pairs"),  # into the scan's images
    ArraySpec("pairs/uv", "uint16", (2,), 65536, 1048576, "pairs"),  # (u + 0.5) / W * UV_SCALE, rounded
)
IMAGE_ARRAYS: tuple[ArraySpec, ...] = (  # only with a teacher
    ArraySpec("images/view", "uint8", (), 4096, 65536, "images"),  # view index (meta cameras / ScanNet frame)
    ArraySpec("images/size", "uint16", (2,), 4096, 65536, "images"),  # original (W, H) in pixels
    ArraySpec("images/logits", "float16", ("h", "w", "C"), 1, 256, "images"),
    ArraySpec("images/features", "int8", ("h", "w", "D"), 1, 256, "images"),  # float16 if feature_dtype float16
    ArraySpec("images/feature_scale", "float16", ("h", "w"), 1, 256, "images"),  # only with int8 features
)
FEATURE_DTYPES = ("int8", "float16")  # meta feature_dtype: how images/features is stored (int8 default)
SCAN_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("scans/block", "int32", (), 4096, 65536, "scans"),  # block holding the scan's rows
    ArraySpec("scans/point_start", "int64", (), 4096, 65536, "scans"),  # first point row within the block
    ArraySpec("scans/point_count", "int64", (), 4096, 65536, "scans"),
    ArraySpec("scans/pair_start", "int64", (), 4096, 65536, "scans"),  # first pair row within the block
    ArraySpec("scans/pair_count", "int64", (), 4096, 65536, "scans"),
    ArraySpec("scans/image_start", "int64", (), 4096, 65536, "scans"),  # first image row within the block
    ArraySpec("scans/image_count", "int64", (), 4096, 65536, "scans"),
    ArraySpec("scans/timestamp", "int64", (), 4096, 65536, "scans"),
    ArraySpec("scans/token", "string", (), 4096, 65536, "scans"),
    ArraySpec("scans/scene", "string", (), 4096, 65536, "scans"),
    ArraySpec("scans/split", "string", (), 4096, 65536, "scans"),
    ArraySpec("scans/lidar_path", "string", (), 4096, 65536, "scans"),
)
TEXT_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("text/embeddings", "float32", ("D",), 4096, 4096, "classes"),  # only with a teacher
)
TEACHER_ARRAYS = tuple(s.name for s in IMAGE_ARRAYS) + ("text/embeddings",)  # absent when has_teacher is false
BLOCK_ARRAYS: tuple[ArraySpec, ...] = POINT_ARRAYS + PAIR_ARRAYS + IMAGE_ARRAYS  # names relative to blocks/NNNNNN/
ALL_ARRAYS: tuple[ArraySpec, ...] = BLOCK_ARRAYS + SCAN_ARRAYS + TEXT_ARRAYS


def resolve_trailing(spec: ArraySpec, num_classes: int, feature_dim: int, point_channels: int = 1,
                     grid: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    """Concrete trailing shape of `spec` for a cache with C classes, D-dim features, F input
    channels and an (h, w) teacher patch grid."""
    sizes = {"C": num_classes, "D": feature_dim, "F": point_channels, "h": grid[0], "w": grid[1]}
    return tuple(sizes[t] if isinstance(t, str) else t for t in spec.trailing)


# --------------------------------------------------------------------------- attributes
READ = "read"  # every cache carries it; a reader needs it
MATCH = "match"  # required, and two caches must agree on it to be merged (and a resume must match)
INFO = "info"  # informational: written by the tool, not needed to read


def _f(role: str, doc: str):
    return field(default=None, metadata=dict(role=role, doc=doc))


@dataclass(frozen=True)
class CacheMeta:
    """Every attribute of a cache (group attribute ATTR_KEY), named once, with its role:
    READ (needed to read), MATCH (needed, and equal across caches that are merged or resumed),
    INFO (informational). `CacheMeta.keys(role)` lists them; `missing` and `difference` are the
    checks the writer, reader, merge and resume use."""

    format: str = _f(READ, 'always "clip2scene-cache"')
    schema_version: int = _f(MATCH, "SCHEMA_VERSION of the writer")
    status: str = _f(READ, '"writing", "complete" or "failed"')
    tool_version: str = _f(READ, "clip2scene version that wrote it")
    created: str = _f(READ, "UTC ISO time")
    dataset: dict = _f(READ, "{name, version, dataroot, split}")
    teacher: dict = _f(MATCH, "teacher fingerprint (null: labels-only cache)")
    class_names: list = _f(MATCH, "prompt classes (C)")
    class_set: str = _f(MATCH, "name of the prompt class set")
    eval_class_names: list = _f(MATCH, "ground-truth label names 1..K")
    prompt_to_eval: list = _f(MATCH, "per prompt class its evaluation label, 0 for none")
    has_labels: bool = _f(MATCH, "points/label present")
    has_teacher: bool = _f(MATCH, "images/* and text/embeddings present")
    sweeps: int = _f(MATCH, "lidar frames merged per scan")
    cameras: list = _f(MATCH, "view names indexed by images/view ([] for ScanNet)")
    point_features: list = _f(MATCH, "names of the F columns of points/feat")
    voxel_size: float = _f(MATCH, "usual training voxel size in metres")
    feature_dtype: str = _f(MATCH, "images/features storage: int8 (x images/feature_scale) or float16")
    uv_scale: int = _f(MATCH, "pairs/uv = round((u + 0.5) / W * uv_scale)")
    pair_order: str = _f(MATCH, "pairs of a point are contiguous, the farthest-from-border view first")
    sampling: dict = _f(MATCH, "how stage two samples the maps at (u, v)")
    grid: list = _f(READ, "teacher patch grid [h, w] of images/* (null without a teacher)")
    num_scans: int = _f(READ, "scans (filled at commit)")
    num_points: int = _f(READ, "points")
    num_pairs: int = _f(READ, "(point, view) pairs")
    num_visible: int = _f(READ, "camera-visible points (points with at least one pair)")
    num_images: int = _f(READ, "images")
    created_by: str = _f(INFO, "user@host")
    block_size: int = _f(INFO, "scans per block")
    num_blocks: int = _f(INFO, "blocks")
    resume_key: dict = _f(INFO, "what was built (as manifest/key.json)")
    on_error: str = _f(INFO, "stop or skip")
    num_skipped: int = _f(INFO, "bad samples skipped (listed in manifest.json)")
    merged_from: list = _f(INFO, "sources of a merged cache")
    teacher_precision: str = _f(INFO, "coordinator's teacher compute precision")
    error: str = _f(INFO, "why a failed cache failed")

    @classmethod
    def keys(cls, *roles: str) -> tuple[str, ...]:
        """Attribute names with one of `roles` (all of them when none given)."""
        return tuple(f.name for f in fields(cls) if not roles or f.metadata["role"] in roles)

    @classmethod
    def missing(cls, meta: dict) -> list[str]:
        """READ and MATCH attributes absent from `meta`."""
        return [k for k in cls.keys(READ, MATCH) if k not in meta]

    @classmethod
    def difference(cls, a: dict, b: dict) -> tuple[str, object, object] | None:
        """The first MATCH attribute where `a` and `b` differ, as (name, a's, b's) with a dict
        attribute narrowed to its first differing sub-field ("teacher.image_size"); None when
        they agree."""
        for key in cls.keys(MATCH):
            x, y = a.get(key), b.get(key)
            if x != y:
                if isinstance(x, dict) and isinstance(y, dict):
                    sub = next(k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k))
                    return f"{key}.{sub}", x.get(sub), y.get(sub)
                return key, x, y
        return None
