"""Stage one end to end on the synthetic sample (tiny random teacher) and on the real keyframes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene.errors import CacheError, ConfigError, DataError
from clip2scene.precompute.datasets.geometry import project_points
from clip2scene.precompute.teacher.config import TeacherConfig
from clip2scene.precompute.teacher.maskclip import load_teacher
from clip2scene.precompute.datasets.nuscenes import NuScenes, load_points
from clip2scene.precompute.pipeline import PrecomputeConfig, images_to_tensor, load_image, run_precompute
from clip2scene.storage import open_cache

TINY = TeacherConfig(model="clip2scene-tiny", weights="none", image_size=(64, 112))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from clip2scene.samples.nuscenes import SampleConfig, make_sample

    return make_sample(tmp_path_factory.mktemp("s") / "root", SampleConfig(scenes=2, keyframes=2, sweeps=2))


@pytest.fixture(scope="module")
def cache_path(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "cache.zarr"
    # float32: these tests check the pipeline's arithmetic against a float32 reference by hand
    # (bfloat16 vs float32 agreement is tests/precompute/test_precision.py), with float16 feature
    # maps (int8 vs float16 is tests/storage/test_format.py and tests/precompute/test_schema4_equivalence.py)
    run_precompute(PrecomputeConfig(dataroot=sample, out=out, version="v1.0-mini", sweeps=3, teacher=TINY,
                                    teacher_precision="float32", feature_dtype="float16"), progress=False)
    return out


def test_cache_contents_match_dataset(sample, cache_path):
    ds = NuScenes(sample, "v1.0-mini")
    kfs = ds.keyframes(sweeps=3)
    cache = open_cache(cache_path)
    assert cache.num_scans == len(kfs) == 4
    assert cache.meta["sweeps"] == 3 and cache.meta["teacher"]["weights_sha256"] == "random"
    assert sorted(cache.split.tolist()) == ["train", "train", "val", "val"]
    text = torch.from_numpy(cache.text_embeddings)
    for i, kf in enumerate(kfs):
        scan = cache.read_scan(i, features=True)
        assert scan.token == kf.sample_token
        key = load_points(kf.lidar.path)
        n_key = len(key)
        np.testing.assert_array_equal(scan.xyz[:n_key], key[:, :3])  # keyframe points unchanged
        np.testing.assert_allclose(scan.feat[:n_key, 0], key[:, 3] / 255.0, rtol=1e-6)
        n_sweeps = sum(len(load_points(s.path)) for s in kf.sweeps)
        assert len(scan.xyz) == n_key + n_sweeps
        assert np.bincount(scan.sweep).tolist()[0] == n_key and scan.sweep.max() == 2
        np.testing.assert_array_equal(scan.label[:n_key], ds.load_labels(kf, n_key))
        assert not scan.label[n_key:].any()
        # every pair is a point visible in its camera, at the devkit pixel
        assert np.all(np.diff(scan.pair_point) > 0)
        for c, cam in enumerate(kf.cameras):
            rows = scan.pair_camera == c
            uv, _, vis = project_points(scan.xyz, kf.lidar.calib, kf.lidar.ego, cam.ego, cam.calib,
                                        cam.intrinsic, cam.width, cam.height)
            assert vis[scan.pair_point[rows]].all()
            # stored as round((u + 0.5) / W * 2^16): within W / 2^16 pixels
            np.testing.assert_allclose(scan.pair_uv[rows], uv[scan.pair_point[rows]], atol=cam.width / 65536)
            # every (point, view) pair is kept, not only the chosen view
            in_view = scan.image_view[scan.view_image] == c
            np.testing.assert_array_equal(np.sort(scan.view_point[in_view]), np.flatnonzero(vis))
        # a point with no pair is visible in no camera
        unpaired = np.setdiff1d(np.arange(len(scan.xyz)), scan.pair_point)
        for cam in kf.cameras:
            _, _, vis = project_points(scan.xyz[unpaired], kf.lidar.calib, kf.lidar.ego, cam.ego, cam.calib,
                                       cam.intrinsic, cam.width, cam.height)
            assert not vis.any()
        feats = torch.from_numpy(scan.pair_features.astype(np.float32))
        np.testing.assert_allclose(feats.norm(dim=1), 1.0, atol=2e-3)
        # logits are sampled from the dense logit map, so they agree with the features' argmax mostly
        agree = (scan.pair_logits.astype(np.float32).argmax(1) == (feats @ text.T).numpy().argmax(1)).mean()
        assert agree > 0.8, agree


def test_features_are_teacher_output_at_the_pixel(sample, cache_path):
    """Recompute the dense map of one camera and sample it by hand at a few cached points."""
    ds = NuScenes(sample, "v1.0-mini")
    kf = ds.keyframes(sweeps=3)[1]
    cache = open_cache(cache_path)
    scan = cache.read_scan(1, features=True)
    teacher = load_teacher(TINY, cache.class_names)
    c = int(np.bincount(scan.pair_camera).argmax())
    cam = kf.cameras[c]
    dense, dense_logits = teacher.dense_outputs(images_to_tensor([load_image(cam.path, cam.width, cam.height)], (64, 112)))
    dense, dense_logits = dense[0], dense_logits[0]
    d, h, w = dense.shape
    rows = np.flatnonzero(scan.pair_camera == c)[::97][:20]
    for r in rows:
        u, v = scan.pair_uv[r]
        # continuous patch-grid coordinate of the pixel centre, then bilinear by hand (border clamp)
        x = (u + 0.5) / cam.width * w - 0.5
        y = (v + 0.5) / cam.height * h - 0.5
        x, y = min(max(x, 0), w - 1), min(max(y, 0), h - 1)
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
        ax, ay = x - x0, y - y0
        def bilinear(m):
            return ((1 - ax) * (1 - ay) * m[:, y0, x0] + ax * (1 - ay) * m[:, y0, x1]
                    + (1 - ax) * ay * m[:, y1, x0] + ax * ay * m[:, y1, x1])

        f = F.normalize(bilinear(dense), dim=0).numpy()
        np.testing.assert_allclose(scan.pair_features[r].astype(np.float32), f, atol=3e-3)
        np.testing.assert_allclose(scan.pair_logits[r].astype(np.float32), bilinear(dense_logits).numpy(), atol=3e-3)


def test_one_camera_per_point_farthest_from_border(sample, cache_path):
    ds = NuScenes(sample, "v1.0-mini")
    kf = ds.keyframes(sweeps=3)[0]
    scan = open_cache(cache_path).read_scan(0)
    margins = []
    for cam in kf.cameras:
        uv, _, vis = project_points(scan.xyz, kf.lidar.calib, kf.lidar.ego, cam.ego, cam.calib,
                                    cam.intrinsic, cam.width, cam.height)
        m = np.minimum.reduce([uv[:, 0] - 1, cam.width - 1 - uv[:, 0], uv[:, 1] - 1, cam.height - 1 - uv[:, 1]])
        margins.append(np.where(vis, m, -np.inf))
    margins = np.stack(margins, 1)[scan.pair_point]
    assert ((margins > -np.inf).sum(1) > 1).any(), "sample should have points seen by two cameras"
    np.testing.assert_array_equal(scan.pair_camera, margins.argmax(1))


def test_bad_input_leaves_no_complete_cache(sample, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(sample, root)
    kf = NuScenes(root, "v1.0-mini").keyframes()[1]
    kf.cameras[3].path.unlink()
    out = tmp_path / "c.zarr"
    with pytest.raises(DataError, match="camera image not found: .*CAM_BACK"):
        run_precompute(PrecomputeConfig(dataroot=root, out=out, version="v1.0-mini", teacher=TINY), progress=False)
    with pytest.raises(CacheError, match="failed"):
        open_cache(out)
    kf.cameras[3].path.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match="cannot decode image"):
        run_precompute(PrecomputeConfig(dataroot=root, out=out, version="v1.0-mini", teacher=TINY, overwrite=True),
                       progress=False)
    # --on-error skip: the bad sample is left out, named in the manifest and in `cache info`
    skip = tmp_path / "skip.zarr"
    meta = run_precompute(PrecomputeConfig(dataroot=root, out=skip, version="v1.0-mini", teacher=TINY, on_error="skip",
                                           block_size=2), progress=False)
    assert meta["num_skipped"] == 1 and meta["num_scans"] == 3
    (skipped,) = open_cache(skip).info()["skipped"]
    assert skipped["token"] == kf.sample_token and "cannot decode image" in skipped["reason"]
    assert kf.sample_token not in open_cache(skip).token.tolist()
    with pytest.raises(CacheError, match="already exists"):
        run_precompute(PrecomputeConfig(dataroot=root, out=skip, version="v1.0-mini", teacher=TINY), progress=False)
    with pytest.raises(ConfigError, match="--dataset 'kitti': unknown dataset"):
        run_precompute(PrecomputeConfig(dataroot=root, out=tmp_path / "x", dataset="kitti", teacher=TINY))
    with pytest.raises(ConfigError, match="unknown class set 'coco'"):
        run_precompute(PrecomputeConfig(dataroot=root, out=tmp_path / "x", class_set="coco", teacher=TINY))
    with pytest.raises(ConfigError, match="image-size"):
        run_precompute(PrecomputeConfig(dataroot=sample, out=tmp_path / "y", version="v1.0-mini",
                                        teacher=TeacherConfig(model="clip2scene-tiny", weights="none",
                                                              image_size=(65, 64))), progress=False)
    assert not (tmp_path / "x").exists()


def test_real_keyframes_precompute(real_root, tmp_path):
    out = tmp_path / "real.zarr"
    meta = run_precompute(PrecomputeConfig(dataroot=real_root, out=out, version="v1.0-mini", teacher=TINY,
                                           limit=3), progress=False)
    cache = open_cache(out)
    info = cache.info()
    assert meta["num_scans"] == 3 and info["splits"] == {"val": 3}
    ds = NuScenes(real_root, "v1.0-mini")
    n = sum(len(load_points(k.lidar.path)) for k in ds.keyframes()[:3])
    assert cache.meta["num_points"] == n
    assert 0.2 * n < cache.meta["num_pairs"] < n
    scan = cache.read_scan(0)
    assert scan.label.max() > 0 and (scan.pair_uv[:, 0] < 1599).all() and (scan.pair_uv[:, 1] < 899).all()


def test_fast_decode_matches_pil(sample):
    """torchvision.io decode + antialiased torch resize (the precompute path) agree with PIL."""
    from clip2scene.precompute.pipeline import decode_image, prepare_batch

    kf = NuScenes(sample, "v1.0-mini").keyframes()[0]
    cam = kf.cameras[0]
    fast = decode_image(cam.path, cam.width, cam.height)
    pil = torch.from_numpy(np.asarray(load_image(cam.path, cam.width, cam.height))).permute(2, 0, 1)
    assert fast.dtype == torch.uint8 and fast.shape == pil.shape
    assert (fast.int() - pil.int()).abs().float().mean() < 1.0  # same JPEG decoder family, tiny IDCT differences
    a = prepare_batch([fast], (64, 112))
    b = images_to_tensor([load_image(cam.path, cam.width, cam.height)], (64, 112))
    assert a.shape == b.shape == (1, 3, 64, 112)
    assert (a - b).abs().mean() < 0.01 and (a - b).abs().max() < 0.1
    with pytest.raises(DataError, match="image is"):
        decode_image(cam.path, cam.width + 1, cam.height)


@pytest.mark.slow
def test_teacher_variant_and_window_cache(sample, cache_path, tmp_path):
    """SCLIP with sliding windows on a 2x finer input: the fingerprint records variant, backbone and
    window; cached values are the windowed dense maps sampled at the points; resume, merge and
    evaluate refuse a cache of another teacher naming the field."""
    import shutil

    from clip2scene.storage.tools import merge
    from clip2scene.train.checkpoint import check_compatible

    windowed = TeacherConfig(model="clip2scene-tiny", weights="none", image_size=(128, 224), teacher="sclip",
                             window=(64, 112), stride=(32, 48))
    out = tmp_path / "sclip.zarr"
    run_precompute(PrecomputeConfig(dataroot=sample, out=out, version="v1.0-mini", sweeps=1, teacher=windowed, limit=2,
                                    teacher_precision="float32"), progress=False)
    cache = open_cache(out)
    fp = cache.fingerprint
    assert (fp["teacher"], fp["model"], fp["window"], fp["stride"], fp["pamr"]) == \
        ("sclip", "clip2scene-tiny", [64, 112], [32, 48], False)
    # the cached logits of one camera are its windowed dense logits (8 x 14 grid) sampled at the points
    kf = NuScenes(sample, "v1.0-mini").keyframes(sweeps=3)[0]
    scan = cache.read_scan(0)
    c = int(np.bincount(scan.pair_camera).argmax())
    cam = kf.cameras[c]
    teacher = load_teacher(windowed, cache.class_names)
    from clip2scene.precompute.pipeline import decode_image, prepare_batch, sample_maps

    _, dense_logits = teacher.dense_outputs(prepare_batch([decode_image(cam.path, cam.width, cam.height)], (128, 224)))
    assert dense_logits.shape[-2:] == (8, 14)

    rows = np.flatnonzero(scan.pair_camera == c)
    want = sample_maps(dense_logits, np.zeros(len(rows), np.uint8), scan.pair_uv[rows], [(cam.width, cam.height)])
    np.testing.assert_allclose(scan.pair_logits[rows].astype(np.float32), want.numpy(), atol=1e-3)  # float16

    # evaluate: a checkpoint distilled from the MaskCLIP cache does not fit the SCLIP cache
    base = open_cache(cache_path)
    with pytest.raises(CacheError, match="teacher fingerprint field 'image_size'|teacher fingerprint field 'teacher'"):
        check_compatible(dict(class_names=base.class_names, teacher=base.fingerprint), cache)
    same_size = dict(base.fingerprint, image_size=[128, 224])
    with pytest.raises(CacheError, match="field 'teacher' differs: checkpoint has 'maskclip'"):
        check_compatible(dict(class_names=base.class_names, teacher=same_size), cache)
    old = {k: v for k, v in fp.items() if k not in ("teacher", "window", "stride", "pamr")}
    check_compatible(dict(class_names=base.class_names, teacher=dict(old, image_size=[64, 112])), base)  # pre-16 checkpoint
    # merge: names the differing fingerprint field
    with pytest.raises(CacheError, match=r"teacher\.image_size differs|teacher\.teacher differs"):
        merge([str(cache_path), str(out)], str(tmp_path / "m.zarr"))
    # resume: an interrupted SCLIP run is not resumed as ClearCLIP
    root = tmp_path / "root"
    shutil.copytree(sample, root)
    NuScenes(root, "v1.0-mini").keyframes()[2].cameras[0].path.unlink()
    part = tmp_path / "part.zarr"
    with pytest.raises(DataError):
        run_precompute(PrecomputeConfig(dataroot=root, out=part, version="v1.0-mini", teacher=windowed, block_size=1, limit=3),
                       progress=False)
    clear = TeacherConfig(model="clip2scene-tiny", weights="none", image_size=(128, 224), teacher="clearclip",
                          window=(64, 112), stride=(32, 48))
    with pytest.raises(CacheError, match="cannot resume .*teacher.teacher was 'sclip', now 'clearclip'"):
        run_precompute(PrecomputeConfig(dataroot=root, out=part, version="v1.0-mini", teacher=clear, block_size=1, limit=3),
                       progress=False)
    unwindowed = TeacherConfig(model="clip2scene-tiny", weights="none", image_size=(128, 224), teacher="sclip")
    with pytest.raises(CacheError, match="cannot resume .*teacher.stride was \\[32, 48\\], now None"):
        run_precompute(PrecomputeConfig(dataroot=root, out=part, version="v1.0-mini", teacher=unwindowed, block_size=1, limit=3),
                       progress=False)
