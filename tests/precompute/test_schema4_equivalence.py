"""Schema 5 (per-image maps, sampled in the loader) against schema 4's per-point computation.

The reference is computed independently of the cache: the teacher's dense float32 maps of every
camera, the schema-4 camera choice (`assign_cameras`: per point the view farthest from the
border) and torch `grid_sample` of the full-precision maps at the float32 pixel (`sample_maps`,
schema 4's stage-one sampling). The cache instead stores float16/int8 maps and uint16 uv and
samples them in numpy at read time.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene.precompute.teacher.config import TeacherConfig
from clip2scene.precompute.teacher.maskclip import load_teacher
from clip2scene.precompute.datasets.nuscenes import NuScenes
from clip2scene.precompute.pipeline import (PrecomputeConfig, assign_cameras, decode_image, prepare_batch,
                                            run_precompute, sample_maps)
from clip2scene.storage import open_cache

TINY = TeacherConfig(model="clip2scene-tiny", weights="none", image_size=(64, 112))
pytestmark = pytest.mark.slow  # two precompute runs end to end


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from clip2scene.samples.nuscenes import SampleConfig, make_sample

    tmp = tmp_path_factory.mktemp("eq")
    root = make_sample(tmp / "root", SampleConfig(scenes=1, keyframes=1, sweeps=1, image_width=320, image_height=180))
    caches = {}
    for dtype in ("float16", "int8"):
        run_precompute(PrecomputeConfig(dataroot=root, out=tmp / f"{dtype}.zarr", version="v1.0-mini", sweeps=2,
                                        teacher=TINY, teacher_precision="float32", feature_dtype=dtype), progress=False)
        caches[dtype] = open_cache(tmp / f"{dtype}.zarr")
    return root, caches


def schema4_reference(root, cache, i):
    """Schema 4's per-point outputs of scan i: (point, camera, logits (m, C), features (m, D)),
    plus the per-view samples of every visible point for the mean rule."""
    ds = NuScenes(root, "v1.0-mini")
    scan = next(s for s in ds.scans(sweeps=2) if s.token == cache.token[i])
    xyz = cache.read_scan(i).xyz
    idx, cams, uv = assign_cameras(xyz, ds, scan)
    teacher = load_teacher(TINY, cache.class_names)
    views = ds.views(scan)
    with torch.inference_mode():
        batch = prepare_batch([decode_image(v.path, v.width, v.height) for v in views], (64, 112))
        dense, dense_logits = teacher.dense_outputs(batch)
    sizes = [(v.width, v.height) for v in views]
    feats = F.normalize(sample_maps(dense, cams, uv, sizes), dim=-1).numpy()
    logits = sample_maps(dense_logits, cams, uv, sizes).numpy()
    per_view = []  # every (point, view): (point, logits, unit feature)
    for c, v in enumerate(views):
        uvc, vis = ds.project(scan, c, xyz)
        rows = np.flatnonzero(vis)
        cc = np.zeros(len(rows), np.int64)
        f = F.normalize(sample_maps(dense[c:c + 1], cc, uvc[rows].astype(np.float32), [sizes[c]]), dim=-1).numpy()
        per_view.append((rows, sample_maps(dense_logits[c:c + 1], cc, uvc[rows].astype(np.float32), [sizes[c]]).numpy(), f))
    return idx, cams, logits, feats, per_view


def cosine(a, b):
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_border_views_equal_schema_4(built):
    root, caches = built
    n_multi = 0
    for i in range(caches["float16"].num_scans):
        idx, cams, logits, feats, _ = schema4_reference(root, caches["float16"], i)
        for dtype, cache in caches.items():
            r = cache.read_scan(i, features=True)
            np.testing.assert_array_equal(r.pair_point, idx)  # same pairs
            np.testing.assert_array_equal(r.pair_camera, cams)  # same view per point
            assert np.abs(r.pair_logits.astype(np.float32) - logits).max() <= 2e-3
            # schema 4 stored float16 features: compare to them as stored
            cos = cosine(r.pair_features, feats.astype(np.float16))
            assert cos.min() >= (0.9999 if dtype == "float16" else 0.999), (dtype, cos.min())
        n_multi += len(r.view_point) - len(r.pair_point)
    assert n_multi > 0, "the sample should have points seen by two cameras"


def test_mean_views_average_every_view(built):
    root, caches = built
    cache = caches["float16"]
    for i in range(cache.num_scans):
        idx, _, _, _, per_view = schema4_reference(root, cache, i)
        sum_l = np.zeros((len(cache.read_scan(i).xyz), len(cache.class_names)))
        sum_f = np.zeros((len(sum_l), cache.text_embeddings.shape[1]))
        count = np.zeros(len(sum_l))
        for rows, lg, f in per_view:
            sum_l[rows] += lg
            sum_f[rows] += f
            count[rows] += 1
        mean_l = sum_l[idx] / count[idx, None]
        mean_f = sum_f[idx] / count[idx, None]
        r = cache.read_scan(i, features=True, views="mean")
        np.testing.assert_array_equal(r.pair_point, idx)
        assert np.abs(r.pair_logits.astype(np.float32) - mean_l).max() <= 2e-3
        assert cosine(r.pair_features, mean_f).min() >= 0.9999
