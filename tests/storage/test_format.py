"""Pin the cache format: arrays, dtypes, shapes, chunk/shard geometry, codecs and attributes.

A change here is a format change: bump storage.schema.SCHEMA_VERSION and docs/cache-format.md.
"""

import json

import numpy as np
import pytest
import zarr

from clip2scene.errors import CacheError
from clip2scene.storage import CacheWriter, ScanRecord, open_cache, schema

C, D = 3, 8
META = dict(dataset=dict(name="nuscenes", version="v1.0-mini", dataroot="/d", split=None),
            teacher=dict(model="tiny", weights="none", weights_sha256="random", image_size=[32, 64],
                         class_names=["a", "b", "c"], templates_sha256="0" * 64, embed_dim=D, patch_size=16),
            class_names=["a", "b", "c"], eval_class_names=["a", "b", "c"], prompt_to_eval=[1, 2, 3], class_set="test",
            sweeps=1, cameras=["CAM_FRONT"], point_features=["intensity"], voxel_size=0.1)


def make_scan(rng, i, n, m, split="train"):
    return ScanRecord(
        token=f"tok{i}", scene=f"scene-{i:04d}", split=split, timestamp=1000 + i, lidar_path=f"samples/x{i}.bin",
        xyz=rng.normal(size=(n, 3)).astype(np.float32), feat=rng.random((n, 1)).astype(np.float32), sweep=(np.arange(n) % 2).astype(np.uint8),
        label=rng.integers(0, 17, n).astype(np.uint8),
        pair_point=np.sort(rng.choice(n, m, replace=False)).astype(np.int32),
        pair_camera=rng.integers(0, 6, m).astype(np.uint8), pair_uv=rng.random((m, 2)).astype(np.float32),
        pair_logits=rng.normal(size=(m, C)).astype(np.float16), pair_features=rng.normal(size=(m, D)).astype(np.float16))


def write_cache(path, scans, block_size=2):
    with CacheWriter(path, META, C, D, has_labels=True, block_size=block_size) as w:
        for s in scans:
            w.append(s)
        w.set_text_embeddings(np.eye(C, D, dtype=np.float32))
    return path


EXPECTED = {  # name inside a block: (dtype, trailing shape, chunk rows, shard rows)
    "points/xyz": ("float32", (3,), 65536, 1048576),
    "points/feat": ("float32", (1,), 65536, 1048576),
    "points/sweep": ("uint8", (), 65536, 1048576),
    "points/label": ("uint8", (), 65536, 1048576),
    "pairs/point": ("int32", (), 65536, 1048576),
    "pairs/camera": ("uint8", (), 65536, 1048576),
    "pairs/uv": ("float32", (2,), 65536, 1048576),
    "pairs/logits": ("float16", (C,), 16384, 262144),
    "pairs/features": ("float16", (D,), 2048, 32768),
}


def test_format_is_pinned(tmp_path):
    rng = np.random.default_rng(0)
    scans = [make_scan(rng, i, 100 + i, 40 + i, "train" if i < 2 else "val") for i in range(3)]
    path = write_cache(tmp_path / "c.zarr", scans)  # blocks of 2 scans: 000000 = scans 0-1, 000001 = scan 2
    root = json.loads((path / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    meta = root["attributes"]["clip2scene"]
    assert meta["format"] == "clip2scene-cache" and meta["schema_version"] == 4 == schema.SCHEMA_VERSION
    assert meta["status"] == "complete" and meta["num_blocks"] == 2 and meta["block_size"] == 2
    assert set(schema.REQUIRED_META) <= set(meta)
    assert (meta["num_scans"], meta["num_points"], meta["num_pairs"]) == (3, 303, 123)
    for b, (points, pairs) in enumerate([(201, 81), (102, 42)]):
        for name, (dtype, trailing, chunk, shard) in EXPECTED.items():
            am = json.loads((path / "blocks" / f"{b:06d}" / name / "zarr.json").read_text())
            rows = points if name.startswith("points/") else pairs
            assert am["data_type"] == dtype, name
            assert tuple(am["shape"]) == (rows,) + trailing, name
            assert tuple(am["chunk_grid"]["configuration"]["chunk_shape"]) == (min(shard, rows),) + trailing, name
            (codec,) = am["codecs"]
            assert codec["name"] == "sharding_indexed", name
            assert tuple(codec["configuration"]["chunk_shape"]) == (min(chunk, rows),) + trailing, name
            assert [c["name"] for c in codec["configuration"]["codecs"]] == ["bytes", "zstd"], name
            assert codec["configuration"]["codecs"][1]["configuration"]["level"] == 3
            assert codec["configuration"]["codecs"][1]["configuration"]["checksum"] is True  # corrupt chunks fail
            assert [c["name"] for c in codec["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    for name, dtype in [("scans/block", "int32"), ("scans/point_start", "int64"), ("scans/point_count", "int64"),
                        ("scans/pair_start", "int64"), ("scans/pair_count", "int64"),
                        ("scans/timestamp", "int64"), ("scans/token", "string"), ("scans/scene", "string"),
                        ("scans/split", "string"), ("scans/lidar_path", "string"), ("text/embeddings", "float32")]:
        am = json.loads((path / name / "zarr.json").read_text())
        assert am["data_type"] == dtype, name
    g = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(g["scans/block"][...], [0, 0, 1])
    np.testing.assert_array_equal(g["scans/point_start"][...], [0, 100, 0])
    np.testing.assert_array_equal(g["scans/point_count"][...], [100, 101, 102])
    np.testing.assert_array_equal(g["scans/pair_start"][...], [0, 40, 0])
    assert list(g["scans/split"][...]) == ["train", "train", "val"]
    assert sorted(k for k, _ in g.groups()) == ["blocks", "scans", "text"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] and [b["scans"] for b in manifest["blocks"]] == [2, 1]
    stored = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    bookkeeping = {f for f in stored if f == "manifest.json" or f.startswith("manifest/")}
    assert set(manifest["sha256"]) == stored - bookkeeping  # every stored file has a checksum
    assert not (path / "writer.lock").exists()


def test_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    scans = [make_scan(rng, i, 50 * (i + 1), 20 * (i + 1)) for i in range(4)]
    cache = open_cache(write_cache(tmp_path / "c.zarr", scans))
    assert cache.num_scans == 4 and cache.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(cache.indices("train"), [0, 1, 2, 3])
    for i, s in enumerate(scans):
        r = cache.read_scan(i, features=True)
        assert r.token == s.token and r.scene == s.scene
        for f in ("xyz", "feat", "sweep", "label", "pair_point", "pair_camera", "pair_uv", "pair_logits", "pair_features"):
            np.testing.assert_array_equal(getattr(r, f), getattr(s, f))
    assert cache.read_scan(0).pair_features is None
    info = cache.info()
    assert info["bytes_per_point"] > 0 and info["splits"] == {"train": 4}


def test_many_shards_roundtrip(tmp_path, monkeypatch):
    """Shrink shards so a small cache spans many of them; the data must come back intact."""
    small = tuple(schema.ArraySpec(s.name, s.dtype, s.trailing, 16, 64, s.axis)
                  for s in schema.POINT_ARRAYS + schema.PAIR_ARRAYS)
    monkeypatch.setattr(schema, "BLOCK_ARRAYS", small)
    rng = np.random.default_rng(2)
    scans = [make_scan(rng, i, int(rng.integers(30, 200)), 25) for i in range(7)]
    cache = open_cache(write_cache(tmp_path / "c.zarr", scans, block_size=4))
    xyz = np.concatenate([s.xyz for s in scans[:4]])
    np.testing.assert_array_equal(cache.group["blocks/000000/points/xyz"][...], xyz)
    assert len(list((tmp_path / "c.zarr" / "blocks" / "000000" / "points" / "xyz" / "c").iterdir())) == -(-len(xyz) // 64)
    for i in (0, 3, 6):
        np.testing.assert_array_equal(cache.read_scan(i).xyz, scans[i].xyz)
        np.testing.assert_array_equal(cache.read_scan(i).feat, scans[i].feat)


def test_second_writer_is_refused_and_resume_keeps_blocks(tmp_path):
    rng = np.random.default_rng(4)
    scans = [make_scan(rng, i, 60, 20) for i in range(5)]
    key = dict(dataset="x", sweeps=1)
    w = CacheWriter(tmp_path / "c.zarr", META, C, D, has_labels=True, block_size=2, resume_key=key)
    for s in scans[:4]:
        w.append(s)  # two blocks written and recorded; then the process "dies" (no commit)
    with pytest.raises(CacheError, match="being written by"):
        CacheWriter(tmp_path / "c.zarr", META, C, D, has_labels=True, block_size=2, resume_key=key)
    w.lock.release()  # as if the first process were gone
    with pytest.raises(CacheError, match="not complete"):
        open_cache(tmp_path / "c.zarr")
    with pytest.raises(CacheError, match="sweeps was 1, now 3"):
        CacheWriter(tmp_path / "c.zarr", META, C, D, has_labels=True, block_size=2, resume_key=dict(key, sweeps=3))
    w2 = CacheWriter(tmp_path / "c.zarr", META, C, D, has_labels=True, block_size=2, resume_key=key)
    assert w2.resumed and sorted(w2.done_blocks()) == [0, 1]
    w2.append(scans[4])
    w2.set_text_embeddings(np.eye(C, D, dtype=np.float32))
    w2.commit()
    ref = open_cache(write_cache(tmp_path / "ref.zarr", scans))
    got = open_cache(tmp_path / "c.zarr")
    for i in range(5):
        a, b = got.read_scan(i, features=True), ref.read_scan(i, features=True)
        for f in ("xyz", "feat", "label", "pair_point", "pair_logits", "pair_features"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_labels_only_cache(tmp_path):
    """feature_dim=None: no teacher arrays, no text; points, labels and (empty) pairs read back."""
    rng = np.random.default_rng(3)
    meta = dict(META, teacher=None, point_features=["red", "green", "blue"], voxel_size=0.05)
    scans = []
    for i in range(2):
        n = 30 + i
        scans.append(ScanRecord(token=f"t{i}", scene="s", split="train", timestamp=i, lidar_path="x",
                                xyz=rng.normal(size=(n, 3)).astype(np.float32), feat=rng.random((n, 3)).astype(np.float32),
                                sweep=np.zeros(n, np.uint8), label=rng.integers(0, 4, n).astype(np.uint8),
                                pair_point=np.zeros(0, np.int32), pair_camera=np.zeros(0, np.uint8),
                                pair_uv=np.zeros((0, 2), np.float32)))
    with CacheWriter(tmp_path / "l.zarr", meta, C, None, has_labels=True) as w:
        for s in scans:
            w.append(s)
        with pytest.raises(ValueError, match="labels-only"):
            w.set_text_embeddings(np.eye(C, D, dtype=np.float32))
    root = json.loads((tmp_path / "l.zarr" / "zarr.json").read_text())["attributes"]["clip2scene"]
    assert root["has_teacher"] is False and root["teacher"] is None
    for name in schema.TEACHER_ARRAYS:
        assert not list((tmp_path / "l.zarr").rglob(name)), name
    am = json.loads((tmp_path / "l.zarr" / "blocks" / "000000" / "points" / "feat" / "zarr.json").read_text())
    assert tuple(am["shape"]) == (61, 3)
    cache = open_cache(tmp_path / "l.zarr")
    assert not cache.has_teacher and cache.text_embeddings is None and cache.voxel_size == 0.05
    r = cache.read_scan(1, features=True)
    np.testing.assert_array_equal(r.feat, scans[1].feat)
    assert r.pair_logits is None and r.pair_features is None and len(r.pair_point) == 0


def test_int8_features_roundtrip(tmp_path):
    """feature_dtype int8: pairs/features int8 + pairs/feature_scale float16; reads dequantise with
    cosine >= 0.999 to the float16 input (unit-norm 512-d features, as the teacher writes)."""
    rng = np.random.default_rng(5)
    d = 512
    scans = []
    for i in range(2):
        s = make_scan(rng, i, 80, 50)
        f = rng.normal(size=(50, d)).astype(np.float32)
        s.pair_features = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float16)
        scans.append(s)
    meta = dict(META, teacher=dict(META["teacher"], embed_dim=d))
    with CacheWriter(tmp_path / "q.zarr", meta, C, d, has_labels=True, feature_dtype="int8") as w:
        for s in scans:
            w.append(s)
        w.set_text_embeddings(np.eye(C, d, dtype=np.float32))
    am = json.loads((tmp_path / "q.zarr" / "blocks" / "000000" / "pairs" / "features" / "zarr.json").read_text())
    assert am["data_type"] == "int8" and tuple(am["shape"]) == (100, d)
    am = json.loads((tmp_path / "q.zarr" / "blocks" / "000000" / "pairs" / "feature_scale" / "zarr.json").read_text())
    assert am["data_type"] == "float16" and tuple(am["shape"]) == (100,)
    cache = open_cache(tmp_path / "q.zarr")
    assert cache.meta["feature_dtype"] == "int8"
    for i, s in enumerate(scans):
        got = cache.read_scan(i, features=True).pair_features.astype(np.float32)
        ref = s.pair_features.astype(np.float32)
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.999, cos.min()
        assert got.dtype == np.float32 and cache.read_scan(i, features=True).pair_features.dtype == np.float16
    with pytest.raises(ValueError, match="feature_dtype 'int4'"):
        CacheWriter(tmp_path / "bad.zarr", META, C, D, has_labels=True, feature_dtype="int4")
