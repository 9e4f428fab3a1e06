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


GRID = (2, 4)  # (h, w) patch grid of the teacher maps; images of 64 x 32 pixels


def make_scan(rng, i, n, m, split="train", n_img=2):
    """n points, m visible ones: each seen by one image, every third also by a second one."""
    visible = np.sort(rng.choice(n, m, replace=False)).astype(np.int32)
    point = np.repeat(visible, np.where(np.arange(m) % 3 == 0, 2, 1)).astype(np.int32)
    h, w = GRID
    return ScanRecord(
        token=f"tok{i}", scene=f"scene-{i:04d}", split=split, timestamp=1000 + i, lidar_path=f"samples/x{i}.bin",
        xyz=rng.normal(size=(n, 3)).astype(np.float32), feat=rng.random((n, 1)).astype(np.float32), sweep=(np.arange(n) % 2).astype(np.uint8),
        label=rng.integers(0, 17, n).astype(np.uint8),
        pair_point=point, pair_image=(np.arange(len(point)) % n_img).astype(np.uint8),
        pair_uv=(rng.random((len(point), 2)) * [63, 31]).astype(np.float32),
        image_view=np.arange(n_img, dtype=np.uint8) + 1, image_size=np.tile(np.array([[64, 32]], np.uint16), (n_img, 1)),
        image_logits=rng.normal(size=(n_img, h, w, C)).astype(np.float16),
        image_features=rng.normal(size=(n_img, h, w, D)).astype(np.float16))


def write_cache(path, scans, block_size=2, feature_dtype="int8"):
    with CacheWriter(path, META, C, D, has_labels=True, block_size=block_size, feature_dtype=feature_dtype) as w:
        for s in scans:
            w.append(s)
        w.set_text_embeddings(np.eye(C, D, dtype=np.float32))
    return path


EXPECTED = {  # name inside a block: (dtype, trailing shape, chunk rows, shard rows, axis)
    "points/xyz": ("float32", (3,), 65536, 1048576, "points"),
    "points/feat": ("float32", (1,), 65536, 1048576, "points"),
    "points/sweep": ("uint8", (), 65536, 1048576, "points"),
    "points/label": ("uint8", (), 65536, 1048576, "points"),
    "pairs/point": ("int32", (), 65536, 1048576, "pairs"),
    "pairs/image": ("uint8", (), 65536, 1048576, "pairs"),
    "pairs/uv": ("uint16", (2,), 65536, 1048576, "pairs"),
    "images/view": ("uint8", (), 4096, 65536, "images"),
    "images/size": ("uint16", (2,), 4096, 65536, "images"),
    "images/logits": ("float16", GRID + (C,), 1, 256, "images"),
}
FEATURES = {  # feature_dtype: the feature arrays it writes (dtype, trailing shape)
    "int8": {"images/features": ("int8", GRID + (D,)), "images/feature_scale": ("float16", GRID)},
    "float16": {"images/features": ("float16", GRID + (D,))},
}


def _check_array(path, name, rows, dtype, trailing, chunk, shard):
    am = json.loads((path / name / "zarr.json").read_text())
    assert am["data_type"] == dtype, name
    assert tuple(am["shape"]) == (rows,) + trailing, name
    c = min(chunk, max(rows, 1))
    assert tuple(am["chunk_grid"]["configuration"]["chunk_shape"]) == (min(shard, -(-rows // c) * c),) + trailing, name
    (codec,) = am["codecs"]
    assert codec["name"] == "sharding_indexed", name
    assert tuple(codec["configuration"]["chunk_shape"]) == (c,) + trailing, name
    assert [c["name"] for c in codec["configuration"]["codecs"]] == ["bytes", "zstd"], name
    assert codec["configuration"]["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
    assert codec["configuration"]["codecs"][1]["configuration"]["level"] == 3
    assert codec["configuration"]["codecs"][1]["configuration"]["checksum"] is True  # corrupt chunks fail
    assert [c["name"] for c in codec["configuration"]["index_codecs"]] == ["bytes", "crc32c"]


@pytest.mark.parametrize("feature_dtype", ["int8", "float16"])
def test_format_is_pinned(tmp_path, feature_dtype):
    rng = np.random.default_rng(0)
    scans = [make_scan(rng, i, 100 + i, 40 + i, "train" if i < 2 else "val", n_img=2 + i) for i in range(3)]
    path = write_cache(tmp_path / "c.zarr", scans, feature_dtype=feature_dtype)  # blocks 000000 = scans 0-1, 000001 = 2
    root = json.loads((path / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    meta = root["attributes"]["clip2scene"]
    assert meta["format"] == "clip2scene-cache" and meta["schema_version"] == 5 == schema.SCHEMA_VERSION
    assert meta["status"] == "complete" and meta["num_blocks"] == 2 and meta["block_size"] == 2
    assert set(meta) <= set(schema.CacheMeta.keys()) and not schema.CacheMeta.missing(meta)
    assert meta["feature_dtype"] == feature_dtype and meta["grid"] == list(GRID) and meta["uv_scale"] == 65536
    assert meta["pair_order"] == "point-then-border" and meta["sampling"]["align_corners"] is False
    pairs = [len(s.pair_point) for s in scans]
    assert (meta["num_scans"], meta["num_points"], meta["num_pairs"], meta["num_visible"], meta["num_images"]) == (
        3, 303, sum(pairs), 123, 9)
    for b, (points, prs, imgs) in enumerate([(201, pairs[0] + pairs[1], 5), (102, pairs[2], 4)]):
        rows = dict(points=points, pairs=prs, images=imgs)
        expected = {**EXPECTED, **{k: v + (1, 256, "images") for k, v in FEATURES[feature_dtype].items()}}
        for name, (dtype, trailing, chunk, shard, axis) in expected.items():
            _check_array(path / "blocks" / f"{b:06d}", name, rows[axis], dtype, trailing, chunk, shard)
        present = {f"{g.name}/{a.name}" for g in (path / "blocks" / f"{b:06d}").iterdir() if g.is_dir()
                   for a in g.iterdir() if a.is_dir()}
        assert present == set(expected), present ^ set(expected)
    for name, dtype in [("scans/block", "int32"), ("scans/point_start", "int64"), ("scans/point_count", "int64"),
                        ("scans/pair_start", "int64"), ("scans/pair_count", "int64"), ("scans/image_start", "int64"),
                        ("scans/image_count", "int64"), ("scans/timestamp", "int64"), ("scans/token", "string"),
                        ("scans/scene", "string"), ("scans/split", "string"), ("scans/lidar_path", "string"),
                        ("text/embeddings", "float32")]:
        am = json.loads((path / name / "zarr.json").read_text())
        assert am["data_type"] == dtype, name
    g = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(g["scans/block"][...], [0, 0, 1])
    np.testing.assert_array_equal(g["scans/point_start"][...], [0, 100, 0])
    np.testing.assert_array_equal(g["scans/point_count"][...], [100, 101, 102])
    np.testing.assert_array_equal(g["scans/pair_start"][...], [0, pairs[0], 0])
    np.testing.assert_array_equal(g["scans/image_start"][...], [0, 2, 0])
    np.testing.assert_array_equal(g["scans/image_count"][...], [2, 3, 4])
    # uv as stored: round((u + 0.5) / W * 65536)
    np.testing.assert_array_equal(g["blocks/000001/pairs/uv"][...],
                                  np.rint((scans[2].pair_uv + 0.5) / [64, 32] * 65536).astype(np.uint16))
    # features: L2-normalised on the grid, then stored as float16 or int8 x per-patch float16 scale
    unit = scans[2].image_features.astype(np.float32)
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    if feature_dtype == "int8":
        q, scale = g["blocks/000001/images/features"][...], g["blocks/000001/images/feature_scale"][...]
        assert q.dtype == np.int8 and scale.dtype == np.float16 and np.abs(q).max() == 127
        np.testing.assert_allclose(q * scale[..., None].astype(np.float32), unit, atol=0.5 * float(scale.max()) + 1e-3)
    else:
        np.testing.assert_array_equal(g["blocks/000001/images/features"][...], unit.astype(np.float16))
    assert list(g["scans/split"][...]) == ["train", "train", "val"]
    assert sorted(k for k, _ in g.groups()) == ["blocks", "scans", "text"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] and [b["scans"] for b in manifest["blocks"]] == [2, 1]
    stored = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    bookkeeping = {f for f in stored if f == "manifest.json" or f.startswith("manifest/")}
    assert set(manifest["sha256"]) == stored - bookkeeping  # every stored file has a checksum
    assert not (path / "writer.lock").exists()
    cache = open_cache(path)  # reads return float16 samples, whatever the stored dtype
    r = cache.read_scan(2, features=True)
    assert r.pair_features.dtype == r.pair_logits.dtype == r.image_features.dtype == np.float16
    assert r.image_features.shape == (4,) + GRID + (D,)


def bilinear_reference(maps, image, uv, size):
    """torch grid_sample, the convention the format doc states: (p, K) float32."""
    import torch
    import torch.nn.functional as F

    out = []
    for k, (u, v) in zip(image, uv):
        w, h = size[k]
        grid = torch.tensor([[[[(u + 0.5) / w * 2 - 1, (v + 0.5) / h * 2 - 1]]]], dtype=torch.float32)
        m = torch.from_numpy(maps[k].astype(np.float32)).permute(2, 0, 1)[None]
        out.append(F.grid_sample(m, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0, 0])
    return torch.stack(out).numpy()


def test_roundtrip_and_sampling(tmp_path):
    """Points and pairs come back as written; pair_logits / pair_features are the maps sampled
    with torch's grid_sample at the stored (quantised) uv, for both view rules."""
    rng = np.random.default_rng(1)
    scans = [make_scan(rng, i, 50 * (i + 1), 20 * (i + 1)) for i in range(4)]
    cache = open_cache(write_cache(tmp_path / "c.zarr", scans, feature_dtype="float16"))
    assert cache.num_scans == 4 and cache.class_names == ["a", "b", "c"] and cache.grid == GRID
    np.testing.assert_array_equal(cache.indices("train"), [0, 1, 2, 3])
    for i, s in enumerate(scans):
        r = cache.read_scan(i, features=True)
        assert r.token == s.token and r.scene == s.scene
        for f in ("xyz", "feat", "sweep", "label"):
            np.testing.assert_array_equal(getattr(r, f), getattr(s, f))
        np.testing.assert_array_equal(r.view_point, s.pair_point)
        np.testing.assert_array_equal(r.view_image, s.pair_image)
        np.testing.assert_allclose(r.view_uv, s.pair_uv, atol=64 / 65536)  # quantisation: W / 2^16 px
        np.testing.assert_array_equal(r.image_logits, s.image_logits)
        first = np.r_[True, s.pair_point[1:] != s.pair_point[:-1]]
        np.testing.assert_array_equal(r.pair_point, s.pair_point[first])
        np.testing.assert_array_equal(r.pair_camera, s.image_view[s.pair_image[first]])
        unit = s.image_features.astype(np.float32) / np.linalg.norm(s.image_features.astype(np.float32), axis=-1,
                                                                    keepdims=True)
        ref_l = bilinear_reference(s.image_logits, s.pair_image, r.view_uv, s.image_size)
        ref_f = bilinear_reference(unit.astype(np.float16), s.pair_image, r.view_uv, s.image_size)
        ref_f /= np.linalg.norm(ref_f, axis=1, keepdims=True)
        np.testing.assert_allclose(r.pair_logits.astype(np.float32), ref_l[first], atol=2e-3)
        np.testing.assert_allclose(r.pair_features.astype(np.float32), ref_f[first], atol=2e-3)
        m = cache.read_scan(i, features=True, views="mean")
        np.testing.assert_array_equal(m.pair_point, r.pair_point)
        groups = np.cumsum(first) - 1
        mean_l = np.stack([ref_l[groups == k].mean(0) for k in range(first.sum())])
        mean_f = np.stack([ref_f[groups == k].mean(0) for k in range(first.sum())])
        mean_f /= np.linalg.norm(mean_f, axis=1, keepdims=True)
        np.testing.assert_allclose(m.pair_logits.astype(np.float32), mean_l, atol=2e-3)
        np.testing.assert_allclose(m.pair_features.astype(np.float32), mean_f, atol=2e-3)
        assert not np.allclose(m.pair_logits, r.pair_logits, atol=1e-3)  # some points have two views
    assert cache.read_scan(0).pair_features is None and cache.read_scan(0).image_features is None
    with pytest.raises(ValueError, match="views 'max'"):
        cache.read_scan(0, views="max")
    info = cache.info()
    assert info["bytes_per_point"] > 0 and info["splits"] == {"train": 4}


def test_meta_roles_name_every_attribute_once():
    keys = schema.CacheMeta.keys()
    assert len(keys) == len(set(keys))
    assert set(schema.CacheMeta.keys(schema.MATCH)) >= {"schema_version", "teacher", "feature_dtype", "class_names",
                                                       "has_teacher", "sweeps", "voxel_size"}
    assert "num_scans" in schema.CacheMeta.keys(schema.READ) and "created_by" in schema.CacheMeta.keys(schema.INFO)
    a = dict(teacher=dict(model="x", image_size=[64, 112]), feature_dtype="int8")
    assert schema.CacheMeta.difference(a, dict(a, feature_dtype="float16")) == ("feature_dtype", "int8", "float16")
    assert schema.CacheMeta.difference(a, dict(a, teacher=dict(model="x", image_size=[64, 128]))) == (
        "teacher.image_size", [64, 112], [64, 128])
    assert schema.CacheMeta.difference(a, dict(a)) is None
    with pytest.raises(ValueError, match="unknown attributes camera_choice"):
        CacheWriter("/nonexistent/never", dict(META, camera_choice="x"), C, D, has_labels=True)


def test_schema_4_cache_is_refused_with_rebuild_hint(tmp_path):
    rng = np.random.default_rng(7)
    path = write_cache(tmp_path / "c.zarr", [make_scan(rng, 0, 30, 10)])
    g = zarr.open_group(str(path), mode="a")
    g.attrs["clip2scene"] = dict(g.attrs["clip2scene"], schema_version=4)
    with pytest.raises(CacheError, match=r"schema version 4, this clip2scene reads 5: rebuild it with `clip2scene precompute`"):
        open_cache(path)


def test_many_shards_roundtrip(tmp_path, monkeypatch):
    """Shrink shards so a small cache spans many of them; the data must come back intact."""
    small = tuple(schema.ArraySpec(s.name, s.dtype, s.trailing, 16, 64, s.axis)
                  for s in schema.POINT_ARRAYS + schema.PAIR_ARRAYS) + schema.IMAGE_ARRAYS
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
    with pytest.raises(CacheError, match="cannot resume .*voxel_size was 0.1, now 0.2"):  # a MATCH attribute
        CacheWriter(tmp_path / "c.zarr", dict(META, voxel_size=0.2), C, D, has_labels=True, block_size=2, resume_key=key)
    w2 = CacheWriter(tmp_path / "c.zarr", META, C, D, has_labels=True, block_size=2, resume_key=key)
    assert w2.resumed and sorted(w2.done_blocks()) == [0, 1]
    w2.append(scans[4])
    w2.set_text_embeddings(np.eye(C, D, dtype=np.float32))
    w2.commit()
    ref = open_cache(write_cache(tmp_path / "ref.zarr", scans))
    got = open_cache(tmp_path / "c.zarr")
    for i in range(5):
        a, b = got.read_scan(i, features=True), ref.read_scan(i, features=True)
        for f in ("xyz", "feat", "label", "pair_point", "pair_logits", "pair_features", "image_features"):
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
                                pair_point=np.zeros(0, np.int32), pair_image=np.zeros(0, np.uint8),
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
    """feature_dtype int8 (the default): images/features int8 + images/feature_scale float16 per
    patch; sampled features have cosine >= 0.999 to those of the float16 cache (unit-norm
    512-d maps, as the teacher writes)."""
    rng = np.random.default_rng(5)
    d = 512
    scans = []
    for i in range(2):
        s = make_scan(rng, i, 80, 50)
        f = rng.normal(size=s.image_features.shape[:3] + (d,)).astype(np.float32)
        s.image_features = (f / np.linalg.norm(f, axis=-1, keepdims=True)).astype(np.float16)
        scans.append(s)
    meta = dict(META, teacher=dict(META["teacher"], embed_dim=d))
    caches = {}
    for dtype in ("int8", "float16"):
        with CacheWriter(tmp_path / f"{dtype}.zarr", meta, C, d, has_labels=True, feature_dtype=dtype) as w:
            for s in scans:
                w.append(s)
            w.set_text_embeddings(np.eye(C, d, dtype=np.float32))
        caches[dtype] = open_cache(tmp_path / f"{dtype}.zarr")
    assert caches["int8"].meta["feature_dtype"] == "int8" and caches["float16"].feature_dtype == "float16"
    for i in range(2):
        got = caches["int8"].read_scan(i, features=True).pair_features.astype(np.float32)
        ref = caches["float16"].read_scan(i, features=True).pair_features.astype(np.float32)
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.999, cos.min()
        assert np.abs(got).max() < 1.0  # dequantised, never raw int8
    with pytest.raises(ValueError, match="feature_dtype 'int4'"):
        CacheWriter(tmp_path / "bad.zarr", META, C, D, has_labels=True, feature_dtype="int4")


@pytest.mark.parametrize("feature_dtype", ["int8", "float16"])
def test_merge_keeps_the_feature_dtype(tmp_path, feature_dtype):
    """`cache merge` writes the sources' feature_dtype (it once wrote float16 over int8 blocks,
    and reads returned raw int8 values); merged reads equal the sources' reads."""
    from clip2scene.storage.tools import merge

    rng = np.random.default_rng(6)
    scans = [make_scan(rng, i, 60, 20) for i in range(3)]
    a = write_cache(tmp_path / "a.zarr", scans[:2], feature_dtype=feature_dtype)
    b = write_cache(tmp_path / "b.zarr", scans[2:], feature_dtype=feature_dtype)
    meta = merge([str(a), str(b)], str(tmp_path / "m.zarr"))
    assert meta["feature_dtype"] == feature_dtype and meta["grid"] == list(GRID) and meta["num_images"] == 6
    got = open_cache(tmp_path / "m.zarr")
    am = json.loads((tmp_path / "m.zarr" / "blocks" / "000000" / "images" / "features" / "zarr.json").read_text())
    assert am["data_type"] == feature_dtype
    for i in range(3):
        src = open_cache(a if i < 2 else b).read_scan(i if i < 2 else 0, features=True)
        r = got.read_scan(i, features=True)
        for f in ("xyz", "pair_point", "pair_logits", "pair_features", "image_features"):
            np.testing.assert_array_equal(getattr(r, f), getattr(src, f))
        assert np.abs(r.pair_features.astype(np.float32)).max() <= 1.0
    other = write_cache(tmp_path / "o.zarr", [make_scan(rng, 9, 60, 20)],
                        feature_dtype="float16" if feature_dtype == "int8" else "int8")
    with pytest.raises(CacheError, match="feature_dtype differs"):
        merge([str(a), str(other)], str(tmp_path / "bad.zarr"))
