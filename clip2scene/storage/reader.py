"""Cache: read a complete cache, scan by scan, without loading it whole.

    cache = open_cache("./zarr")              # or "s3://bucket/c.zarr", storage_options={...}
    idx = cache.indices("train")              # (S_train,) int64 scan indices
    scan = cache.read_scan(int(idx[0]))       # ScanData with numpy arrays
    cache.text_embeddings                     # (C, D) float32

Per-scan tables are loaded once (small); a scan's points and pairs are sliced from its block's
sharded arrays, so a scan read touches only the chunks it needs (streamed, never the whole
cache in memory). CacheError if missing, incomplete (no manifest.json) or of another schema.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from clip2scene.errors import CacheError
from clip2scene.storage import sampling, schema, writer
from clip2scene.storage.store import Location

log = logging.getLogger(__name__)


@dataclass
class ScanData:
    """One scan read from the cache: n points, m camera-visible points (one kept pair each), p
    (point, view) pairs, I images with (h, w)-grid teacher maps.

    The pair_* fields hold one row per visible point: the view chosen by the `views` rule of
    `read_scan` (camera and uv of that view; for "mean" the first = farthest-from-border view's),
    and the teacher outputs sampled there (for "mean": averaged over all the point's views).
    The view_* fields are every (point, view) pair as stored; the image_* fields the maps.
    """

    index: int
    token: str
    scene: str
    split: str
    xyz: np.ndarray  # (n, 3) float32
    feat: np.ndarray  # (n, F) float32 input channels (Cache.point_features)
    sweep: np.ndarray  # (n,) uint8
    label: np.ndarray | None  # (n,) uint8, 0 = ignore
    pair_point: np.ndarray  # (m,) int32 into the scan's points, ascending
    pair_camera: np.ndarray  # (m,) uint8 view index of the kept pair
    pair_uv: np.ndarray  # (m, 2) float32 pixel coordinates of the kept pair
    pair_logits: np.ndarray | None  # (m, C) float16 sampled class scores, None for a labels-only cache
    pair_features: np.ndarray | None  # (m, D) float16 sampled L2-normalised features, None unless requested
    view_point: np.ndarray | None = None  # (p,) int32 every (point, view) pair: point
    view_image: np.ndarray | None = None  # (p,) uint8 index into the image_* rows
    view_uv: np.ndarray | None = None  # (p, 2) float32 pixel coordinates
    image_view: np.ndarray | None = None  # (I,) uint8 view index of each image
    image_size: np.ndarray | None = None  # (I, 2) uint16 original (W, H)
    image_logits: np.ndarray | None = None  # (I, h, w, C) float16 class-score maps
    image_features: np.ndarray | None = None  # (I, h, w, D) float16 feature maps (dequantised), when requested


class Cache:
    """A complete clip2scene cache opened for reading (local folder or fsspec URL)."""

    def __init__(self, path: str | Path, storage_options: dict | None = None):
        self.loc = Location.parse(path, storage_options)
        self.path = self.loc.url
        if not self.loc.exists(""):
            raise CacheError(f"cache not found: {self.path}")
        try:
            group = zarr.open_group(self.loc.zarr_store(read_only=True), mode="r")
        except Exception as e:  # zarr raises several types for a non-group folder
            raise CacheError(f"{self.path}: not a Zarr group ({type(e).__name__})") from None
        meta = dict(group.attrs).get(schema.ATTR_KEY)
        if not isinstance(meta, dict) or meta.get("format") != schema.FORMAT_NAME:
            raise CacheError(f"{self.path}: not a clip2scene cache (no '{schema.ATTR_KEY}' attributes)")
        if meta.get("schema_version") != schema.SCHEMA_VERSION:
            old = meta.get("schema_version")
            how = ("rebuild it with `clip2scene precompute`" if isinstance(old, int) and old < schema.SCHEMA_VERSION
                   else "upgrade clip2scene to read it")
            raise CacheError(f"{self.path}: cache schema version {old}, this clip2scene reads {schema.SCHEMA_VERSION}: {how}")
        if meta.get("status") != schema.STATUS_COMPLETE or not self.loc.exists(schema.MANIFEST):
            why = f": {meta['error']}" if meta.get("error") else ""
            raise CacheError(f"{self.path}: cache is {meta.get('status')!r}, not complete{why}; rerun precompute to finish it")
        missing = schema.CacheMeta.missing(meta)
        if missing:
            raise CacheError(f"{self.path}: cache attributes lack {', '.join(missing)}")
        self.meta = meta
        self._group: zarr.Group | None = group
        self.block = group["scans/block"][...]
        self.point_start = group["scans/point_start"][...]
        self.point_count = group["scans/point_count"][...]
        self.pair_start = group["scans/pair_start"][...]
        self.pair_count = group["scans/pair_count"][...]
        self.image_start = group["scans/image_start"][...]
        self.image_count = group["scans/image_count"][...]
        self.timestamp = group["scans/timestamp"][...]
        self.token = np.asarray(group["scans/token"][...], dtype=object)
        self.scene = np.asarray(group["scans/scene"][...], dtype=object)
        self.split = np.asarray(group["scans/split"][...], dtype=object)
        self.lidar_path = np.asarray(group["scans/lidar_path"][...], dtype=object)
        self.text_embeddings = (np.asarray(group["text/embeddings"][...], dtype=np.float32)
                                if self.has_teacher else None)  # (C, D) float32, None without a teacher
        self._blocks: dict[int, zarr.Group] = {}

    # Zarr handles are reopened lazily in DataLoader worker processes.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_group"] = None
        state["_blocks"] = {}
        return state

    def block_group(self, b: int) -> zarr.Group:
        if b not in self._blocks:
            self._blocks[b] = self.group[schema.block_path(b)]
        return self._blocks[b]

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(self.loc.zarr_store(read_only=True), mode="r")
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

    @property
    def grid(self) -> tuple[int, int] | None:
        """(h, w) patch grid of the teacher maps (None without a teacher or images)."""
        return tuple(self.meta["grid"]) if self.meta.get("grid") else None

    @property
    def feature_dtype(self) -> str:
        """How images/features is stored: int8 (x images/feature_scale) or float16."""
        return str(self.meta["feature_dtype"])

    def read_scan(self, i: int, features: bool = False, views: str = "border") -> ScanData:
        """Read scan `i` and sample its teacher maps at its pairs (storage.sampling): class
        scores always, features (the larger maps) only when `features`. `views`: "border" keeps
        each point's farthest-from-border view, "mean" averages over all views that see it."""
        if not 0 <= i < self.num_scans:
            raise IndexError(f"scan index {i} out of range 0..{self.num_scans - 1}")
        if views not in sampling.VIEW_RULES:
            raise ValueError(f"views {views!r}: expected one of {', '.join(sampling.VIEW_RULES)}")
        g = self.block_group(int(self.block[i]))
        p0 = int(self.point_start[i])
        p1 = p0 + int(self.point_count[i])
        q0 = int(self.pair_start[i])
        q1 = q0 + int(self.pair_count[i])
        scan = ScanData(
            index=i,
            token=str(self.token[i]),
            scene=str(self.scene[i]),
            split=str(self.split[i]),
            xyz=g["points/xyz"][p0:p1],
            feat=g["points/feat"][p0:p1],
            sweep=g["points/sweep"][p0:p1],
            label=g["points/label"][p0:p1] if self.has_labels else None,
            pair_point=np.zeros(0, np.int32),
            pair_camera=np.zeros(0, np.uint8),
            pair_uv=np.zeros((0, 2), np.float32),
            pair_logits=None,
            pair_features=None,
        )
        if not self.has_teacher:
            return scan
        i0 = int(self.image_start[i])
        i1 = i0 + int(self.image_count[i])
        point = g["pairs/point"][q0:q1]
        image = g["pairs/image"][q0:q1]
        size = g["images/size"][i0:i1]
        uvn, uv = writer.decode_uv(g["pairs/uv"][q0:q1], size[image] if len(image) else np.zeros((0, 2), np.uint16))
        scan.view_point, scan.view_image, scan.view_uv = point, image, uv
        scan.image_view, scan.image_size = g["images/view"][i0:i1], size
        scan.image_logits = g["images/logits"][i0:i1]
        keep = sampling.first_of_point(point)
        rows = np.flatnonzero(keep) if views == "border" else np.arange(len(point))
        scan.pair_point = point[keep]
        scan.pair_camera = scan.image_view[image[keep]]
        scan.pair_uv = uv[keep]
        logits = sampling.sample(scan.image_logits, image[rows], uvn[rows])
        if views == "mean":
            logits = sampling.fuse(logits, point)
        scan.pair_logits = logits.astype(np.float16)
        if features:
            q = g["images/features"][i0:i1]
            scale = g["images/feature_scale"][i0:i1] if self.feature_dtype == "int8" else None
            feats = sampling.normalize(sampling.sample(q, image[rows], uvn[rows], scale))
            if views == "mean":
                feats = sampling.normalize(sampling.fuse(feats, point))
            scan.pair_features = feats.astype(np.float16)
            scan.image_features = writer.dequantize_features(q, scale) if scale is not None else q
        return scan

    def visible_count(self, i: int) -> int:
        """Camera-visible points of scan `i` (distinct points among its pairs)."""
        q0 = int(self.pair_start[i])
        point = self.block_group(int(self.block[i]))["pairs/point"][q0:q0 + int(self.pair_count[i])]
        return int(sampling.first_of_point(point).sum())

    def manifest(self) -> dict:
        """manifest.json: blocks, skipped samples, sha256 per stored file."""
        return self.loc.read_json(schema.MANIFEST)

    def array_info(self) -> list[dict]:
        """Per array name (summed over blocks): shape, dtype, chunk and shard shape, stored bytes."""
        out: dict[str, dict] = {}
        names = [(spec, schema.block_path(b) + "/" + spec.name) for b in sorted(set(self.block.tolist()))
                 for spec in schema.BLOCK_ARRAYS]
        names += [(spec, spec.name) for spec in schema.SCAN_ARRAYS + schema.TEXT_ARRAYS]
        for spec, path in names:
            if path not in self.group:
                continue
            arr = self.group[path]
            row = out.setdefault(spec.name, dict(name=spec.name, shape=[0] + list(arr.shape[1:]), dtype=str(arr.dtype),
                                                 chunks=list(arr.chunks), shards=list(arr.shards) if arr.shards else None,
                                                 stored_bytes=0))
            row["shape"][0] += int(arr.shape[0])
            row["stored_bytes"] += int(arr.nbytes_stored())
        return list(out.values())

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
            bytes_per_visible_point=total / max(int(self.meta["num_visible"]), 1),
            bytes_per_pair=total / m,
            skipped=self.manifest().get("skipped", []),
        )


def open_cache(path: str | Path, storage_options: dict | None = None) -> Cache:
    """Open a complete cache (local path or fsspec URL) for reading (CacheError with the reason otherwise)."""
    return Cache(path, storage_options)
