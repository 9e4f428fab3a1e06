"""Cache maintenance: verify every stored byte against manifest.json, merge caches without recompute.

    problems = verify("s3://bucket/c.zarr", storage_options)   # [] when intact
    merge(["a.zarr", "b.zarr"], "c.zarr")                       # same teacher fingerprint required

CLI: `clip2scene cache verify PATH`, `clip2scene cache merge A B --out C`.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from clip2scene.errors import CacheError
from clip2scene.storage import schema
from clip2scene.storage.reader import Cache, open_cache
from clip2scene.storage.store import Location
from clip2scene.storage.writer import CacheWriter

log = logging.getLogger(__name__)


def verify(path: str, storage_options: dict | None = None, progress=None, on_estimate=None) -> list[str]:
    """Re-hash every file the manifest lists; returns one line per problem (corrupt, missing,
    unlisted file), naming the file (a shard of `blocks/NNNNNN/<array>` or a table).

    Before the full pass, about 2% of the files (at least 17), spread evenly over the sorted
    list, are checked and timed (all but the first), and `on_estimate(files, seconds)` is called
    with the projected total time, so a caller can say how long it will take before it does
    (within ~10% on a 27,789-file cache). `progress` wraps the iterable of the remaining files
    (e.g. a tqdm factory)."""
    loc = Location.parse(path, storage_options)
    if not loc.exists(schema.MANIFEST):
        raise CacheError(f"{path}: no {schema.MANIFEST} (not a complete cache)")
    manifest = loc.read_json(schema.MANIFEST)
    expected: dict[str, str] = manifest.get("sha256", {})
    present = set(loc.list_files(""))
    items = sorted(expected.items())
    found: dict[str, str] = {}

    def check(rel: str, digest: str) -> None:
        if rel not in present:
            found[rel] = f"missing: {rel}"
        elif hashlib.sha256(loc.read_bytes(rel)).hexdigest() != digest:
            found[rel] = f"corrupt: {rel} (sha256 differs from the manifest)"

    k = min(len(items), max(17, len(items) // 50))  # ~2% of the files, at least 17
    sample = sorted({round(i * (len(items) - 1) / max(k - 1, 1)) for i in range(k)}) if k else []
    if sample:
        check(*items[sample[0]])  # warm-up (first open of the store), not timed
    t0 = time.perf_counter()
    for i in sample[1:]:
        check(*items[i])
    if on_estimate is not None:
        on_estimate(len(items), (time.perf_counter() - t0) * len(items) / max(len(sample) - 1, 1))
    taken = set(sample)
    rest = [it for i, it in enumerate(items) if i not in taken]
    for rel, digest in (progress(rest) if progress else rest):
        check(rel, digest)
    problems = [found[rel] for rel, _ in items if rel in found]
    bookkeeping = (schema.MANIFEST, "manifest/", "writer.lock", ".writer.lock")
    for rel in sorted(present - set(expected)):
        if not rel.startswith(bookkeeping):
            problems.append(f"unlisted: {rel} (not written by precompute)")
    return problems


def partial_info(path: str, storage_options: dict | None = None) -> dict | None:
    """What an unfinished cache holds (status "writing" or "failed"): its metadata with the error,
    the blocks and scans recorded so far, skipped samples and the writer lock's holder. None when
    `path` holds no clip2scene metadata at all (`open_cache` explains why)."""
    import zarr

    loc = Location.parse(path, storage_options)
    if not loc.exists(""):
        return None
    try:
        meta = dict(zarr.open_group(loc.zarr_store(read_only=True), mode="r").attrs).get(schema.ATTR_KEY)
    except Exception:  # no or torn root metadata
        return None
    if not isinstance(meta, dict) or meta.get("format") != schema.FORMAT_NAME:
        return None
    blocks = []
    for f in loc.list_files(schema.BLOCK_RECORDS):
        if f.endswith(".json"):
            try:
                blocks.append(loc.read_json(f))
            except CacheError:
                continue
    holder = None
    if loc.exists("writer.lock"):
        try:
            import json as _json

            holder = _json.loads(loc.read_bytes("writer.lock"))
        except (CacheError, ValueError):
            holder = {}
    return dict(path=str(path), meta=meta, status=meta.get("status"), error=meta.get("error"),
                blocks_done=len(blocks), scans_done=sum(len(b.get("scans", [])) for b in blocks),
                points_done=sum(s.get("points", 0) for b in blocks for s in b.get("scans", [])),
                skipped=[s for b in blocks for s in b.get("skipped", [])], writer=holder)


def _rows_of_block(c: Cache) -> dict[int, np.ndarray]:
    """Scan rows per block of a cache in one pass (linear in the scans, not blocks x scans)."""
    order = np.argsort(c.block, kind="stable")
    blocks, starts = np.unique(c.block[order], return_index=True)
    return dict(zip(blocks.tolist(), np.split(order, starts[1:])))


def merge(paths: list[str], out: str, storage_options: dict | None = None, overwrite: bool = False,
          progress=None) -> dict:
    """Combine complete caches built with the same teacher and settings into one, copying their
    blocks byte for byte (checksums carry over). Scans must not repeat. Returns the new metadata.
    `progress`: optional wrapper of the (cache, block) iterable, e.g. a tqdm factory."""
    if len(paths) < 2:
        raise CacheError("cache merge needs at least two caches")
    caches: list[Cache] = [open_cache(p, storage_options) for p in paths]
    first = caches[0]
    for other in caches[1:]:
        diff = schema.CacheMeta.difference(first.meta, other.meta)
        if diff is not None:
            key, x, y = diff
            raise CacheError(f"cannot merge {first.path} and {other.path}: {key} differs ({x!r} vs {y!r})")
    seen: dict[str, str] = {}
    for c in caches:
        for t in c.token.tolist():
            if t in seen:
                raise CacheError(f"cannot merge: scan {t} is in both {seen[t]} and {c.path}")
            seen[t] = c.path
    meta = {k: first.meta[k] for k in schema.CacheMeta.keys(schema.MATCH) + ("dataset",) if k in first.meta}
    meta["dataset"] = dict(first.meta["dataset"], dataroot=None, split=None)
    meta["merged_from"] = [dict(path=c.path, created=c.meta.get("created"), created_by=c.meta.get("created_by"),
                                dataset=c.meta.get("dataset"), num_scans=c.num_scans) for c in caches]
    num_classes = len(first.class_names)
    dim = first.text_embeddings.shape[1] if first.has_teacher else None
    writer = CacheWriter(out, meta, num_classes, dim, first.has_labels, overwrite=overwrite,
                         storage_options=storage_options, block_size=int(first.meta.get("block_size", 16)),
                         feature_dtype=first.feature_dtype)
    with writer:
        dst = writer.loc
        new_index = 0
        work = [(c, b) for c in caches for b in sorted(set(c.block.tolist()))]
        manifests = {id(c): c.manifest() for c in caches}
        rows_of = {id(c): _rows_of_block(c) for c in caches}
        for c, b in (progress(work) if progress else work):
            manifest, src = manifests[id(c)], c.loc
            prefix = schema.block_path(b)
            files = {}
            for rel in src.list_files(prefix):
                data = src.read_bytes(rel)
                target = schema.block_path(new_index) + rel[len(prefix):]
                dst.write_bytes(target, data)
                files[target] = manifest["sha256"].get(rel) or hashlib.sha256(data).hexdigest()
            scans = [dict(token=str(c.token[i]), scene=str(c.scene[i]), split=str(c.split[i]),
                          timestamp=int(c.timestamp[i]), lidar_path=str(c.lidar_path[i]),
                          points=int(c.point_count[i]), pairs=int(c.pair_count[i]),
                          images=int(c.image_count[i]), visible=int(c.visible_count(i))) for i in rows_of[id(c)][b]]
            writer.record_block(dict(index=new_index, scans=scans, grid=c.meta.get("grid") if len(scans) else None,
                                     files=files, skipped=[]))
            new_index += 1
        skipped = [s for c in caches for s in c.manifest().get("skipped", [])]
        if skipped:  # keep the sources' skipped samples on record (listed with the first block)
            first_block = writer.done_blocks()[0]
            first_block["skipped"] = skipped
            writer.record_block(first_block)
        if first.has_teacher:
            writer.set_text_embeddings(first.text_embeddings)
        return writer.commit(num_blocks=new_index)
