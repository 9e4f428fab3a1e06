"""Teacher compute precision: bfloat16 on the CPU (AMX) agrees with float32; `auto` picks by hardware;
the pipeline records what it used and refuses float16 on the CPU."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene.errors import ConfigError
from clip2scene.precompute.teacher.config import TeacherConfig
from clip2scene.precompute.teacher.precision import cpu_has_amx, resolve_precision
from clip2scene.precompute.teacher.maskclip import load_teacher
from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
from clip2scene.storage import open_cache

TINY = TeacherConfig(model="clip2scene-tiny", weights="none", image_size=(64, 112))
CLASSES = ("car", "road", "tree")


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == ("bfloat16" if cpu_has_amx() else "float32")
    assert resolve_precision("auto", "cuda") == "float16"
    for p in ("float32", "bfloat16", "float16"):
        assert resolve_precision(p, "cpu") == p
    with pytest.raises(ValueError, match="fp8"):
        resolve_precision("fp8", "cpu")


def test_bfloat16_teacher_agrees_with_float32():
    ref = load_teacher(TINY, CLASSES, device="cpu").set_precision("float32")
    low = load_teacher(TINY, CLASSES, device="cpu").set_precision("bfloat16")
    assert ref.visual.conv1.weight.dtype == torch.float32 and low.visual.conv1.weight.dtype == torch.bfloat16
    images = torch.rand(3, 3, 64, 112, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with ref.autocast():
            f32, l32 = ref.dense_outputs(images)
        with low.autocast():
            fbf, lbf = low.dense_outputs(images)
    assert fbf.dtype == lbf.dtype == torch.float32 and fbf.shape == f32.shape
    cos = F.cosine_similarity(f32, fbf, dim=1)
    assert float(cos.mean()) > 0.999 and float(cos.min()) > 0.99
    assert float((fbf - f32).abs().max()) > 0  # really computed in a different precision
    # the cast is lossy: going back to float32 is refused rather than silently worse
    with pytest.raises(ValueError, match="load the teacher again"):
        low.set_precision("float32")
    assert low.set_precision("bfloat16").precision == "bfloat16"


def test_float16_on_cpu_is_refused():
    t = load_teacher(TINY, CLASSES, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        t.set_precision("float16")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from clip2scene.samples.nuscenes import SampleConfig, make_sample

    return make_sample(tmp_path_factory.mktemp("s") / "root", SampleConfig(scenes=1, keyframes=2, sweeps=0))


def test_pipeline_records_precision_and_bfloat16_cache_matches_float32(sample, tmp_path):
    caches = {}
    for p in ("float32", "bfloat16"):
        out = tmp_path / f"{p}.zarr"
        meta = run_precompute(PrecomputeConfig(dataroot=sample, out=out, version="v1.0-mini", sweeps=1, teacher=TINY,
                                               teacher_precision=p), progress=False)
        assert meta["teacher_precision"] == p
        cache = open_cache(out)
        assert cache.meta["teacher_precision"] == p
        records = sorted((out / "manifest" / "blocks").glob("*.json"))
        assert records and {json.loads(r.read_text())["teacher_precision"] for r in records} == {p}
        caches[p] = cache
    for i in range(caches["float32"].num_scans):
        a, b = (caches[p].read_scan(i, features=True) for p in ("float32", "bfloat16"))
        np.testing.assert_array_equal(a.pair_point, b.pair_point)
        fa, fb = a.pair_features.astype(np.float32), b.pair_features.astype(np.float32)
        cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
        assert cos.mean() > 0.999


def test_pipeline_refuses_float16_on_cpu_and_unknown_precision(sample, tmp_path):
    for p, msg in (("float16", "CUDA"), ("half", "unknown teacher precision")):
        with pytest.raises(ConfigError, match=msg):
            run_precompute(PrecomputeConfig(dataroot=sample, out=tmp_path / f"{p}.zarr", version="v1.0-mini",
                                            sweeps=1, teacher=TINY, teacher_precision=p), progress=False)
        assert not (tmp_path / f"{p}.zarr").exists()
