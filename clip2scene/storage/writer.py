"""Writing a cache: blocks of scans written whole by one task each, committed by one coordinator.

    with CacheWriter(path, meta, num_classes=16, feature_dim=512, has_labels=True) as w:
        for scan in scans:
            w.append(scan)          # a ScanRecord; every `block_size` scans become one block
        w.set_text_embeddings(text) # (C, D) float32
    # leaving the block commits: scan tables, text, manifest.json with a sha256 per stored file,
    # status "complete". An exception instead marks the cache "failed" (resumable), never complete.
    # feature_dim=None writes a labels-only cache (no teacher: no logits, features or text).

Distributed precompute uses the two halves separately: any process calls `write_block(loc,
index, records, layout)` for the blocks it is given (it owns every object under
`blocks/NNNNNN/`, so no two writers ever touch one shard), and the coordinator
(`CacheWriter`) records each returned block summary with `record_block` (an atomic
`manifest/blocks/NNNNNN.json`; a block without one is redone on resume) and finally `commit`s.
A `Lock` keeps a second coordinator off the cache.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from clip2scene import __version__
from clip2scene.errors import CacheError
from clip2scene.storage import schema
from clip2scene.storage.store import Location, Lock, first_difference, node_name

log = logging.getLogger(__name__)


@dataclass
class ScanRecord:
    """Everything the cache keeps for one scan (keyframe + its sweeps, merged).

    n = points of the scan, p = (point, view) pairs (one row for every view that sees a point),
    I = images (views with at least one pair) whose teacher maps are stored, (h, w) = the
    teacher's patch grid (the maps' own shape; it may differ between teacher configurations).
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
    pair_point: np.ndarray  # (p,) int32 index into the scan's points, ascending; a point's pairs
    #   are contiguous, the view where it lies farthest from the image border first (ties: lower view)
    pair_image: np.ndarray  # (p,) uint8 index into this record's images
    pair_uv: np.ndarray  # (p, 2) float32 pixel coordinates (u, v) in the original image
    image_view: np.ndarray | None = None  # (I,) uint8 view index (meta cameras order; ScanNet frame order)
    image_size: np.ndarray | None = None  # (I, 2) uint16 original image (W, H) in pixels
    image_logits: np.ndarray | None = None  # (I, h, w, C) float16 refined class scores (None: no teacher)
    image_features: np.ndarray | None = None  # (I, h, w, D) float16/float32 L2-normalised features

    @property
    def grid(self) -> tuple[int, int] | None:
        """(h, w) of the teacher maps, None without images."""
        if self.image_logits is None or len(self.image_logits) == 0:
            return None
        return tuple(int(x) for x in self.image_logits.shape[1:3])


@dataclass(frozen=True)
class Layout:
    """Array sizes of one cache: classes C, teacher feature dim D (None = no teacher), input channels F."""

    num_classes: int
    feature_dim: int | None
    point_channels: int
    has_labels: bool
    feature_dtype: str = "int8"  # "int8": features stored as int8 x per-patch float16 scale; or "float16"

    @property
    def has_teacher(self) -> bool:
        return self.feature_dim is not None

    def arrays(self, grid: tuple[int, int] = (0, 0)) -> list[tuple[schema.ArraySpec, tuple[int, ...]]]:
        """The block arrays of this layout with their concrete trailing shapes ((h, w) = grid)."""
        out = []
        for spec in schema.BLOCK_ARRAYS:
            if spec.name == "points/label" and not self.has_labels:
                continue
            if spec.name in schema.TEACHER_ARRAYS and not self.has_teacher:
                continue
            if spec.name == "images/feature_scale" and self.feature_dtype != "int8":
                continue
            if spec.name == "images/features":
                spec = schema.ArraySpec(spec.name, self.feature_dtype, spec.trailing, spec.chunk_rows,
                                        spec.shard_rows, spec.axis)
            out.append((spec, schema.resolve_trailing(spec, self.num_classes, self.feature_dim or 0,
                                                      self.point_channels, grid)))
        return out


def _check(name: str, arr: np.ndarray | None, dtype: str | tuple, shape: tuple) -> None:
    if arr is None:
        raise ValueError(f"ScanRecord.{name} is missing")
    dtypes = (dtype,) if isinstance(dtype, str) else dtype
    if arr.dtype not in [np.dtype(d) for d in dtypes]:
        raise ValueError(f"ScanRecord.{name}: dtype {arr.dtype}, expected {' or '.join(dtypes)}")
    if len(arr.shape) != len(shape) or any(s is not None and a != s for a, s in zip(arr.shape, shape)):
        raise ValueError(f"ScanRecord.{name}: shape {arr.shape}, expected {shape}")


def check_record(rec: ScanRecord, layout: Layout) -> None:
    """Shapes and dtypes of a record against the cache layout (ValueError names the field)."""
    n, p = rec.xyz.shape[0], rec.pair_point.shape[0]
    _check("xyz", rec.xyz, "float32", (n, 3))
    _check("feat", rec.feat, "float32", (n, layout.point_channels))
    _check("sweep", rec.sweep, "uint8", (n,))
    if layout.has_labels:
        _check("label", rec.label, "uint8", (n,))
    _check("pair_point", rec.pair_point, "int32", (p,))
    _check("pair_image", rec.pair_image, "uint8", (p,))
    _check("pair_uv", rec.pair_uv, "float32", (p, 2))
    if layout.has_teacher:
        n_img = 0 if rec.image_logits is None else len(rec.image_logits)
        _check("image_view", rec.image_view, "uint8", (n_img,))
        _check("image_size", rec.image_size, "uint16", (n_img, 2))
        _check("image_logits", rec.image_logits, "float16", (n_img, None, None, layout.num_classes))
        _check("image_features", rec.image_features, ("float16", "float32"), (n_img,) + rec.image_logits.shape[1:3]
               + (layout.feature_dim,))
        if p and rec.pair_image.max() >= n_img:
            raise ValueError(f"ScanRecord.pair_image out of range for scan {rec.token} with {n_img} images")
    elif p:
        raise ValueError(f"ScanRecord of scan {rec.token}: pairs without a teacher")
    if p and (rec.pair_point.min() < 0 or rec.pair_point.max() >= n):
        raise ValueError(f"ScanRecord.pair_point out of range for scan {rec.token} with {n} points")
    if p > 1 and (np.diff(rec.pair_point) < 0).any():
        raise ValueError(f"ScanRecord.pair_point of scan {rec.token} is not ascending")


def _geometry(rows: int, chunk_rows: int, shard_rows: int) -> tuple[int, int]:
    """(chunk, shard) rows for an array of `rows`: the spec's sizes, shrunk for small arrays; the
    shard stays a multiple of the chunk."""
    chunk = min(chunk_rows, max(rows, 1))
    return chunk, min(shard_rows, -(-max(rows, 1) // chunk) * chunk)


def quantize_features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., D) float -> int8 (..., D) and float16 (...) scale with x ~= q * scale (per-vector
    max-abs scaling, round to nearest). Cosine to the original is about 0.9999 for D = 512."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float16)
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_features(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 (..., D), float16 (...) -> float16 (..., D)."""
    return (q.astype(np.float32) * scale.astype(np.float32)[..., None]).astype(np.float16)


def encode_uv(uv: np.ndarray, size: np.ndarray) -> np.ndarray:
    """(p, 2) float pixel (u, v) in images of (W, H) = size (p, 2) -> uint16 (p, 2)
    round((u + 0.5) / W * UV_SCALE), clipped to 0..65535 (resolution W / 65536 pixels)."""
    f = (uv.astype(np.float64) + 0.5) / size.astype(np.float64) * schema.UV_SCALE
    return np.clip(np.rint(f), 0, 65535).astype(np.uint16)


def decode_uv(q: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint16 (p, 2) and (W, H) (p, 2) -> (normalised (p, 2) float32 = (u + 0.5) / W, pixel (p, 2) float32)."""
    uvn = q.astype(np.float32) / np.float32(schema.UV_SCALE)
    return uvn, (uvn * size.astype(np.float32) - np.float32(0.5)).astype(np.float32)


def _block_data(records: list[ScanRecord], layout: Layout) -> tuple[dict[str, np.ndarray], tuple[int, int] | None]:
    """Concatenated block arrays by name, and the block's grid (None without images)."""
    grids = {r.grid for r in records if r.grid is not None}
    if len(grids) > 1:
        raise ValueError(f"teacher maps of one block have different grids {sorted(grids)}")
    grid = grids.pop() if grids else None

    def cat(attr, empty_shape, dtype):
        parts = [getattr(r, attr) for r in records if getattr(r, attr) is not None and len(getattr(r, attr))]
        return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype)

    data = {"points/xyz": cat("xyz", (0, 3), np.float32), "points/feat": cat("feat", (0, layout.point_channels), np.float32),
            "points/sweep": cat("sweep", (0,), np.uint8), "pairs/point": cat("pair_point", (0,), np.int32),
            "pairs/image": cat("pair_image", (0,), np.uint8)}
    if layout.has_labels:
        data["points/label"] = cat("label", (0,), np.uint8)
    sizes = [r.image_size[r.pair_image] for r in records if len(r.pair_point)]
    uv = cat("pair_uv", (0, 2), np.float32)
    data["pairs/uv"] = encode_uv(uv, np.concatenate(sizes)) if sizes else np.zeros((0, 2), np.uint16)
    if layout.has_teacher:
        h, w = grid or (0, 0)
        data["images/view"] = cat("image_view", (0,), np.uint8)
        data["images/size"] = cat("image_size", (0, 2), np.uint16)
        data["images/logits"] = cat("image_logits", (0, h, w, layout.num_classes), np.float16)
        feats = cat("image_features", (0, h, w, layout.feature_dim), np.float32).astype(np.float32)
        norm = np.linalg.norm(feats, axis=-1, keepdims=True)  # L2-normalised on the grid
        feats = feats / np.maximum(norm, 1e-12)
        if layout.feature_dtype == "int8":
            data["images/features"], data["images/feature_scale"] = quantize_features(feats)
        else:
            data["images/features"] = feats.astype(np.float16)
    return data, grid


def write_block(loc: Location, index: int, records: list[ScanRecord], layout: Layout,
                skipped: list[dict] | None = None) -> dict:
    """Write one block (whole arrays, each shard once) under blocks/NNNNNN/, replacing any partial
    earlier attempt. Returns the block summary the coordinator records: per scan its identity and
    row counts, the block's teacher grid, and the sha256 of every object written."""
    for rec in records:
        check_record(rec, layout)
    data, grid = _block_data(records, layout)
    prefix = schema.block_path(index)
    loc.remove(prefix)  # a crashed earlier attempt of this block
    group = zarr.open_group(loc.zarr_store(), path=prefix, mode="w")
    for spec, trailing in layout.arrays(grid or (0, 0)):
        arr_data = data[spec.name]
        chunk, shard = _geometry(len(arr_data), spec.chunk_rows, spec.shard_rows)
        arr = group.create_array(spec.name, shape=arr_data.shape, dtype=spec.dtype,
                                 chunks=(chunk,) + trailing, shards=(shard,) + trailing,
                                 compressors=ZstdCodec(level=3, checksum=True), fill_value=0)
        if len(arr_data):
            arr[...] = arr_data
    scans = [dict(token=r.token, scene=r.scene, split=r.split, timestamp=int(r.timestamp), lidar_path=r.lidar_path,
                  points=int(len(r.xyz)), pairs=int(len(r.pair_point)),
                  visible=int(np.count_nonzero(np.diff(r.pair_point)) + 1) if len(r.pair_point) else 0,
                  images=int(len(r.image_logits)) if r.image_logits is not None else 0) for r in records]
    return dict(index=index, scans=scans, grid=list(grid) if grid else None, files=loc.checksums(prefix),
                skipped=list(skipped or []))


class CacheWriter:
    """The coordinator: creates (or resumes) a cache, records blocks, commits (see module docstring).

    `resume_key`: a dict describing what is being built (dataset, teacher, options); an existing
    unfinished cache with the same key is resumed (its recorded blocks are kept), one with a
    different key is refused naming the field. Without a key an existing cache needs `overwrite`.
    """

    def __init__(self, path, meta: dict, num_classes: int, feature_dim: int | None, has_labels: bool,
                 overwrite: bool = False, storage_options: dict | None = None, block_size: int = 16,
                 resume_key: dict | None = None, feature_dtype: str = "int8"):
        self.loc = Location.parse(path, storage_options)
        self.path = self.loc.url
        resume_key = json.loads(json.dumps(resume_key)) if resume_key is not None else None  # as stored
        self.block_size = block_size
        if feature_dtype not in schema.FEATURE_DTYPES:
            raise ValueError(f"feature_dtype {feature_dtype!r}: expected one of {schema.FEATURE_DTYPES}")
        self.layout = Layout(num_classes, feature_dim, len(meta.get("point_features", ())), has_labels, feature_dtype)
        if self.layout.point_channels < 1:
            raise ValueError("cache metadata needs point_features (the input channel names)")
        self.meta = dict(meta)
        self.meta.update(
            format=schema.FORMAT_NAME, schema_version=schema.SCHEMA_VERSION, status=schema.STATUS_WRITING,
            tool_version=__version__, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            created_by=node_name(), has_labels=has_labels, has_teacher=self.layout.has_teacher,
            num_scans=0, num_points=0, num_pairs=0, num_visible=0, num_images=0, resume_key=resume_key, block_size=block_size,
            feature_dtype=feature_dtype, uv_scale=schema.UV_SCALE, pair_order=schema.PAIR_ORDER,
            sampling=dict(schema.SAMPLING), grid=None,
        )
        unknown = sorted(set(self.meta) - set(schema.CacheMeta.keys()))
        if unknown:
            raise ValueError(f"cache metadata has unknown attributes {', '.join(unknown)} (see schema.CacheMeta)")
        missing = schema.CacheMeta.missing(self.meta)
        if missing:
            raise ValueError(f"cache metadata lacks {', '.join(missing)}")
        if len(self.meta["prompt_to_eval"]) != num_classes:
            raise ValueError(f"prompt_to_eval has {len(self.meta['prompt_to_eval'])} entries for {num_classes} classes")
        self.lock = Lock(self.loc)
        self.lock.acquire()
        try:
            self.resumed = self._open_or_create(overwrite, resume_key)
        except BaseException:
            self.lock.release()
            raise
        self._pending: list[ScanRecord] = []
        self._next_block = len(self.done_blocks()) if self.resumed else 0
        self._text: np.ndarray | None = None
        self._closed = False

    # -- creation / resume ---------------------------------------------------------------------
    def _existing_meta(self) -> dict | None:
        try:
            return dict(zarr.open_group(self.loc.zarr_store(read_only=True), mode="r").attrs).get(schema.ATTR_KEY)
        except Exception:  # a torn or absent root zarr.json
            return None

    def _open_or_create(self, overwrite: bool, resume_key: dict | None) -> bool:
        existing = [f for f in self.loc.list_files("") if Lock.NAME not in f]  # the lock and its temp file
        if existing and overwrite and self._existing_meta() is None and self._recorded_key() is None:
            raise CacheError(f"{self.path} holds {len(existing)} file(s) but is not a clip2scene cache: --overwrite "
                             "only replaces caches; choose another --out (or remove that folder yourself)")
        if existing and overwrite:
            for f in self.loc.fs.ls(self.loc.root, detail=False):
                if Lock.NAME not in f.rstrip("/").rsplit("/", 1)[-1]:
                    self.loc.fs.rm(f, recursive=True)
        elif existing:
            old = self._existing_meta()
            if old is not None and old.get("status") == schema.STATUS_COMPLETE and self.loc.exists(schema.MANIFEST):
                raise CacheError(f"cache already exists: {self.path} (pass --overwrite to replace it)")
            recorded = self._recorded_key()
            if resume_key is None or recorded is None:
                raise CacheError(f"{self.path} exists and is not a complete cache (pass --overwrite to replace it)")
            if recorded != resume_key:
                k, was, now = first_difference("settings", recorded, resume_key)
                raise CacheError(f"cannot resume {self.path}: {k.removeprefix('settings.')} was {was!r}, now "
                                 f"{now!r} (rerun with the earlier settings to finish it, or pass --overwrite to start again)")
            diff = schema.CacheMeta.difference(old, self.meta) if old is not None else None
            if diff is not None:  # the attributes that must match (schema.CacheMeta, role MATCH)
                raise CacheError(f"cannot resume {self.path}: {diff[0]} was {diff[1]!r}, now {diff[2]!r} "
                                 "(pass --overwrite to start again)")
            self._write_root()
            log.info("resuming %s: %d blocks already done", self.path, len(self.done_blocks()))
            return True
        self.loc.write_json("manifest/key.json", dict(resume_key=resume_key))
        self._write_root()
        return False

    def _recorded_key(self) -> dict | None:
        try:
            return self.loc.read_json("manifest/key.json").get("resume_key")
        except CacheError:
            return None

    def _write_root(self) -> None:
        store = self.loc.zarr_store()
        try:
            group = zarr.open_group(store, mode="a")
        except Exception:  # torn root metadata from a crash: rewrite it
            self.loc.remove("zarr.json")
            group = zarr.open_group(store, mode="a")
        group.attrs[schema.ATTR_KEY] = self.meta
        zarr.open_group(store, path=schema.BLOCK_PREFIX, mode="a")

    # -- blocks --------------------------------------------------------------------------------
    def done_blocks(self) -> dict[int, dict]:
        """Recorded block summaries by index."""
        out = {}
        for f in self.loc.list_files(schema.BLOCK_RECORDS):
            if f.endswith(".json"):
                rec = self.loc.read_json(f)
                out[int(rec["index"])] = rec
        return out

    def record_block(self, summary: dict) -> None:
        """Mark a written block done (atomic object write)."""
        self.loc.write_json(f"{schema.BLOCK_RECORDS}/{summary['index']:06d}.json", summary)

    def append(self, scan: ScanRecord) -> None:
        """Queue one scan; every `block_size` scans are written as one block."""
        check_record(scan, self.layout)
        self._pending.append(scan)
        if len(self._pending) >= self.block_size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self.record_block(write_block(self.loc, self._next_block, self._pending, self.layout))
            self._next_block += 1
            self._pending = []

    def set_text_embeddings(self, text: np.ndarray) -> None:
        """(C, D) float32 text embeddings of the prompt classes (rows L2-normalised)."""
        if not self.layout.has_teacher:
            raise ValueError("a labels-only cache (feature_dim=None) has no text embeddings")
        text = np.asarray(text, dtype=np.float32)
        want = (self.layout.num_classes, self.layout.feature_dim)
        if text.shape != want:
            raise ValueError(f"text embeddings shape {text.shape}, expected {want}")
        self._text = text

    @property
    def num_scans(self) -> int:
        return sum(len(b["scans"]) for b in self.done_blocks().values()) + len(self._pending)

    # -- commit --------------------------------------------------------------------------------
    def _write_table(self, group: zarr.Group, name: str, data: np.ndarray, dtype: str) -> None:
        chunk, shard = _geometry(len(data), 4096, 65536)
        trailing = data.shape[1:]
        arr = group.create_array(name, shape=data.shape, dtype=dtype, chunks=(chunk,) + trailing,
                                 shards=(shard,) + trailing,
                                 compressors=ZstdCodec(level=3, checksum=True) if dtype != "string" else "auto",
                                 fill_value=0 if dtype != "string" else "", overwrite=True)
        if len(data):
            arr[...] = data

    def commit(self, num_blocks: int | None = None) -> dict:
        """Write scan tables, text and manifest.json; mark complete. `num_blocks`: blocks 0..n-1
        must all be recorded (default: those written through `append`)."""
        if self._closed:
            return self.meta
        self._flush()
        blocks = self.done_blocks()
        n = self._next_block if num_blocks is None else num_blocks
        missing = [i for i in range(n) if i not in blocks]
        if missing:
            raise CacheError(f"{self.path}: blocks {missing[:5]} were never written")
        ordered = [blocks[i] for i in range(n)]
        scans = [(b["index"], s) for b in ordered for s in b["scans"]]
        if not scans:
            raise CacheError(f"{self.path}: no scans were written")
        if self.layout.has_teacher and self._text is None:
            raise CacheError(f"{self.path}: text embeddings were not set")
        group = zarr.open_group(self.loc.zarr_store(), mode="a")
        for prefix in ("scans", "text"):
            self.loc.remove(prefix)
        block_idx = np.array([b for b, _ in scans], np.int32)
        pts = np.array([s["points"] for _, s in scans], np.int64)
        prs = np.array([s["pairs"] for _, s in scans], np.int64)
        ims = np.array([s.get("images", 0) for _, s in scans], np.int64)
        grids = {tuple(b["grid"]) for b in ordered if b.get("grid")}
        if len(grids) > 1:
            raise CacheError(f"{self.path}: blocks hold teacher maps of different grids {sorted(grids)}")
        starts = {}
        first = np.flatnonzero(np.r_[True, block_idx[1:] != block_idx[:-1]])  # scans come block by block
        for name, counts in (("point", pts), ("pair", prs), ("image", ims)):
            before = np.cumsum(counts) - counts  # rows before each scan, over the whole cache
            starts[name] = before - np.repeat(before[first], np.diff(np.r_[first, len(counts)]))  # within its block
        self._write_table(group, "scans/block", block_idx, "int32")
        self._write_table(group, "scans/point_start", starts["point"], "int64")
        self._write_table(group, "scans/point_count", pts, "int64")
        self._write_table(group, "scans/pair_start", starts["pair"], "int64")
        self._write_table(group, "scans/pair_count", prs, "int64")
        self._write_table(group, "scans/image_start", starts["image"], "int64")
        self._write_table(group, "scans/image_count", ims, "int64")
        self._write_table(group, "scans/timestamp", np.array([s["timestamp"] for _, s in scans], np.int64), "int64")
        for key in ("token", "scene", "split", "lidar_path"):
            self._write_table(group, f"scans/{key}", np.array([s[key] for _, s in scans], dtype=object), "string")
        if self.layout.has_teacher:
            self._write_table(group, "text/embeddings", self._text, "float32")
        skipped = [s for b in ordered for s in b.get("skipped", [])]
        self.meta.update(status=schema.STATUS_COMPLETE, num_scans=len(scans), num_points=int(pts.sum()),
                         num_pairs=int(prs.sum()), num_images=int(ims.sum()),
                         num_visible=sum(int(s.get("visible", 0)) for _, s in scans), num_blocks=n, num_skipped=len(skipped),
                         grid=list(grids.pop()) if grids else None)
        self.meta.pop("error", None)
        group.attrs[schema.ATTR_KEY] = self.meta
        files = {}
        for b in ordered:
            files.update(b["files"])
        for prefix in ("scans", "text"):
            files.update(self.loc.checksums(prefix))
        for f in ("zarr.json", f"{schema.BLOCK_PREFIX}/zarr.json"):
            files.update({f: self.loc.checksums(f)[f]})
        manifest = dict(format=schema.FORMAT_NAME, schema_version=schema.SCHEMA_VERSION, complete=True,
                        blocks=[dict(index=b["index"], scans=len(b["scans"]),
                                     points=sum(s["points"] for s in b["scans"])) for b in ordered],
                        skipped=skipped, sha256=files)
        self.loc.write_json(schema.MANIFEST, manifest)  # last: the cache is complete from here on
        self._closed = True
        self.lock.release()
        log.info("cache committed: %s (%d scans, %d points)", self.path, len(scans), self.meta["num_points"])
        return self.meta

    def fail(self, reason: str) -> None:
        """Mark the cache failed (never complete) with a reason; blocks done so far stay for a resume."""
        self.meta.update(status=schema.STATUS_FAILED, error=reason)
        try:
            zarr.open_group(self.loc.zarr_store(), mode="a").attrs[schema.ATTR_KEY] = self.meta
        finally:
            self._closed = True
            self.lock.release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        elif not self._closed:
            try:
                self.fail(f"{exc_type.__name__}: {exc}")
            except Exception as e:  # e.g. the disk is full: the original error matters, the lock is released
                log.warning("%s: could not record the failed status (%s)", self.path, e)
