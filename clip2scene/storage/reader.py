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
from clip2scene.storage.store import Location, remote_error

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
            if remote_error(self.path, e) is not None:
                raise remote_error(self.path, e) from None
            raise CacheError(_not_a_cache(self.loc, e)) from None
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
        self._files: list[str] | None = None  # manifest.json's file list, read on first block access

    # Zarr handles are reopened lazily in DataLoader worker processes.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_group"] = None
        state["_blocks"] = {}
        return state

    def block_group(self, b: int) -> zarr.Group:
        if b not in self._blocks:
            prefix = schema.block_path(b)
            # zarr reads an absent shard as zeros: check the block's files against the manifest
            # once per process (one listing) so a lost file is an error, not silent zeros
            listed = [f for f in self._manifest_files() if f.startswith(prefix + "/")]
            missing = sorted(set(listed) - set(self.loc.list_files(prefix)))
            if missing:
                raise CacheError(f"{self.path}: {missing[0]} is missing ({len(missing)} file(s) of block {b}); run "
                                 f"`clip2scene cache verify {self.path}`, and rebuild the cache or restore the files")
            with self._damage(prefix):
                self._blocks[b] = self.group[prefix]
        return self._blocks[b]

    def _manifest_files(self) -> list[str]:
        if self._files is None:
            self._files = sorted(self.manifest().get("sha256", {}))
        return self._files

    def _damage(self, what: str):
        """Context: a failure decoding stored bytes (zstd checksum, crc32c, torn metadata)
        becomes a CacheError naming the file, never a silent or anonymous failure."""
        return _Damage(self.path, what)

    def _rows(self, b: int, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of blocks/NNNNNN/<name>; CacheError naming the shard file if it is corrupt."""
        g = self.block_group(b)
        where = f"{schema.block_path(b)}/{name}"
        with self._damage(where):
            arr = g[name]
        try:
            return arr[lo:hi]
        except Exception as e:
            if remote_error(self.path, e) is not None:
                raise
            step = (arr.shards or arr.chunks)[0]
            keys = [arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
                    for i in range(lo // step, max(hi - 1, lo) // step + 1)]
            files = ", ".join(f"{where}/{k}" for k in keys)
            raise CacheError(f"{self.path}: {files} is corrupt ({_first_line(e)}); run `clip2scene cache verify "
                             f"{self.path}`, and rebuild the cache or restore that file") from None

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
        b = int(self.block[i])
        p0 = int(self.point_start[i])
        p1 = p0 + int(self.point_count[i])
        q0 = int(self.pair_start[i])
        q1 = q0 + int(self.pair_count[i])
        scan = ScanData(
            index=i,
            token=str(self.token[i]),
            scene=str(self.scene[i]),
            split=str(self.split[i]),
            xyz=self._rows(b, "points/xyz", p0, p1),
            feat=self._rows(b, "points/feat", p0, p1),
            sweep=self._rows(b, "points/sweep", p0, p1),
            label=self._rows(b, "points/label", p0, p1) if self.has_labels else None,
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
        point = self._rows(b, "pairs/point", q0, q1)
        image = self._rows(b, "pairs/image", q0, q1)
        size = self._rows(b, "images/size", i0, i1)
        uvn, uv = writer.decode_uv(self._rows(b, "pairs/uv", q0, q1), size[image] if len(image) else np.zeros((0, 2), np.uint16))
        scan.view_point, scan.view_image, scan.view_uv = point, image, uv
        scan.image_view, scan.image_size = self._rows(b, "images/view", i0, i1), size
        scan.image_logits = self._rows(b, "images/logits", i0, i1)
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
            q = self._rows(b, "images/features", i0, i1)
            scale = self._rows(b, "images/feature_scale", i0, i1) if self.feature_dtype == "int8" else None
            feats = sampling.normalize(sampling.sample(q, image[rows], uvn[rows], scale))
            if views == "mean":
                feats = sampling.normalize(sampling.fuse(feats, point))
            scan.pair_features = feats.astype(np.float16)
            scan.image_features = writer.dequantize_features(q, scale) if scale is not None else q
        return scan

    def visible_count(self, i: int) -> int:
        """Camera-visible points of scan `i` (distinct points among its pairs)."""
        q0 = int(self.pair_start[i])
        point = self._rows(int(self.block[i]), "pairs/point", q0, q0 + int(self.pair_count[i]))
        return int(sampling.first_of_point(point).sum())

    def manifest(self) -> dict:
        """manifest.json: blocks, skipped samples, sha256 per stored file."""
        return self.loc.read_json(schema.MANIFEST)

    def array_info(self) -> list[dict]:
        """Per array name (summed over blocks): shape, dtype, chunk and shard shape, stored bytes.

        Stored bytes come from one listing of the cache's objects and each array is opened once
        (in the first block holding it), so this costs one listing plus a handful of reads
        whatever the number of blocks (a per-block open took minutes at trainval's ~2,100 blocks)."""
        root = self.loc.key("").rstrip("/") + "/"
        stored: dict[str, int] = {}
        for path, entry in self.loc.fs.find(self.loc.key(""), detail=True).items():
            rel = path[len(root):] if path.startswith(root) else path.split(root, 1)[-1]
            parts = rel.split("/")
            if parts[0] == schema.BLOCK_PREFIX and len(parts) >= 4:
                name = "/".join(parts[2:4])
            elif parts[0] in ("scans", "text") and len(parts) >= 2:
                name = "/".join(parts[:2])
            else:
                continue
            stored[name] = stored.get(name, 0) + int(entry.get("size") or 0)
        rows = {"points": int(self.point_count.sum()), "pairs": int(self.pair_count.sum()), "scans": self.num_scans}
        blocks = sorted(set(self.block.tolist()))
        out = []
        for spec in schema.ALL_ARRAYS:
            if spec.name not in stored:
                continue
            if spec.axis in ("points", "pairs"):
                first = next((b for b in blocks if f"{schema.block_path(b)}/{spec.name}" in self.group), None)
                if first is None:
                    continue
                arr = self.group[f"{schema.block_path(first)}/{spec.name}"]
                n = rows[spec.axis]
            else:
                if spec.name not in self.group:
                    continue
                arr = self.group[spec.name]
                n = int(arr.shape[0])
            out.append(dict(name=spec.name, shape=[n] + list(arr.shape[1:]), dtype=str(arr.dtype),
                            chunks=list(arr.chunks), shards=list(arr.shards) if arr.shards else None,
                            stored_bytes=stored[spec.name]))
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
            bytes_per_visible_point=total / max(int(self.meta["num_visible"]), 1),
            bytes_per_pair=total / m,
            skipped=self.manifest().get("skipped", []),
        )


# files or folders at the top of a dataset root, per format
_DATAROOT_SIGNS = {"nuScenes": ("samples", "sweeps", "v1.0-mini", "v1.0-trainval", "v1.0-test"),
                   "SemanticKITTI": ("sequences",), "ScanNet": ("scans", "scannetv2-labels.combined.tsv")}


def _not_a_cache(loc: Location, e: Exception) -> str:
    """Why `loc` is not a cache: a dataset root (say so: run precompute) or some other folder."""
    try:
        names = {f.rstrip("/").rsplit("/", 1)[-1] for f in loc.fs.ls(loc.root, detail=False)}
    except Exception:
        names = set()
    for fmt, signs in _DATAROOT_SIGNS.items():
        if names & set(signs):
            dataset = "" if fmt == "nuScenes" else f" --dataset {fmt.lower()}"
            return (f"{loc.url}: this looks like a {fmt} dataset root, not a cache; build a cache from it first: "
                    f"clip2scene precompute{dataset} --dataroot {loc.url} --out CACHE.zarr, then pass --cache CACHE.zarr")
    return f"{loc.url}: not a clip2scene cache (no Zarr group here: {type(e).__name__})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class _Damage:
    """See `Cache._damage`."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (CacheError, KeyboardInterrupt, MemoryError)):
            return False
        if not isinstance(exc, Exception) or remote_error(self.path, exc) is not None:
            return False
        if isinstance(exc, KeyError):
            raise CacheError(f"{self.path}: {self.what} is missing; run `clip2scene cache verify {self.path}`") from None
        raise CacheError(f"{self.path}: {self.what}/zarr.json is corrupt ({_first_line(exc)}); run "
                         f"`clip2scene cache verify {self.path}`") from None


def open_cache(path: str | Path, storage_options: dict | None = None) -> Cache:
    """Open a complete cache (local path or fsspec URL) for reading (CacheError with the reason otherwise)."""
    return Cache(path, storage_options)
