"""The whole pipeline on SemanticKITTI and ScanNet: precompute -> train -> finetune -> evaluate.

Synthetic samples in the exact on-disk formats (synthetic_kitti, synthetic_scannet); the teacher
is the tiny randomly initialised CLIP (no weights offline), so pseudo-label quality is not
measured here, only that every stage runs on the format and stores what the reader gives.
"""

import json

import numpy as np
import pytest
import torch

from clip2scene.classes import SCANNET_CLASSES, SEMANTICKITTI_CLASSES
from clip2scene.precompute.teacher.config import TeacherConfig
from clip2scene.precompute.pipeline import PrecomputeConfig, open_dataset, run_precompute
from clip2scene.storage import open_cache
from clip2scene.train.finetune import FinetuneConfig, finetune
from clip2scene.train.evaluate import EvalConfig, evaluate
from clip2scene.train.nets import ModelConfig
from clip2scene.train.trainer import TrainConfig, train

SMALL = ModelConfig(channels=(8, 8, 16, 16, 32, 32, 16, 8, 8), blocks_per_stage=1)


def _sample(fmt, root):
    if fmt == "semantickitti":
        from clip2scene.samples.semantickitti import KittiSampleConfig, make_semantickitti_sample

        return make_semantickitti_sample(root, KittiSampleConfig(frames=3, lidar_azimuth_steps=256))
    from clip2scene.samples.scannet import ScanNetSampleConfig, make_scannet_sample

    return make_scannet_sample(root, ScanNetSampleConfig(frames=4, spacing=0.08))


@pytest.fixture(scope="module", params=["semantickitti", "scannet"])
def fmt(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    root = _sample(request.param, tmp / "root")
    size = (64, 208) if request.param == "semantickitti" else (96, 128)
    teacher = TeacherConfig(model="clip2scene-tiny", weights="none", image_size=size)
    run_precompute(PrecomputeConfig(dataroot=root, out=tmp / "cache.zarr", dataset=request.param, sweeps=2,
                                    class_set=request.param, teacher=teacher), progress=False)
    return request.param, root, tmp


def test_cache_matches_reader(fmt):
    name, root, tmp = fmt
    ds = open_dataset(name, root)
    cache = open_cache(tmp / "cache.zarr")
    scans = ds.scans(sweeps=2)
    assert cache.num_scans == len(scans) and cache.has_teacher and cache.has_labels
    assert cache.eval_class_names == list(SEMANTICKITTI_CLASSES if name == "semantickitti" else SCANNET_CLASSES)
    assert cache.point_features == list(ds.point_features) and cache.voxel_size == ds.voxel_size
    visible_any = 0
    for i, scan in enumerate(scans):
        r = cache.read_scan(i)
        xyz, feat, sweep, n_key = ds.points(scan)
        np.testing.assert_array_equal(r.xyz, xyz)
        np.testing.assert_array_equal(r.feat, feat)
        np.testing.assert_array_equal(r.label[:n_key], ds.labels(scan, n_key))
        assert r.feat.shape[1] == (3 if name == "scannet" else 1)
        assert r.feat.min() >= 0 and r.feat.max() <= 1
        if name == "semantickitti" and i % 3:  # a frame after the first carries a sweep
            assert sweep.max() == 1
        # every stored pair is visible in the view it names, at the stored uv
        for v in np.unique(r.pair_camera):
            rows = r.pair_camera == v
            uv, vis = ds.project(scan, int(v), xyz[r.pair_point[rows]])
            assert vis.all()
            w = ds.views(scan)[int(v)].width
            np.testing.assert_allclose(uv, r.pair_uv[rows], atol=max(w, ds.views(scan)[int(v)].height) / 65536)
        visible_any += len(r.pair_point)
        assert r.pair_logits.shape == (len(r.pair_point), len(cache.class_names))
    assert visible_any > 0


def test_train_finetune_evaluate(fmt):
    name, root, tmp = fmt
    cache = tmp / "cache.zarr"
    train(TrainConfig(cache=str(cache), out=str(tmp / "pre"), epochs=1, batch_size=2, model=SMALL), progress=False)
    ckpt = torch.load(tmp / "pre" / "checkpoint.pt", weights_only=False)
    assert ckpt["model_config"]["in_channels"] == (3 if name == "scannet" else 1)
    assert ckpt["train_config"]["voxel_size"] == (0.05 if name == "scannet" else 0.1)
    ev = evaluate(EvalConfig(checkpoint=str(tmp / "pre" / "checkpoint.pt"), cache=str(cache), split="val"), progress=False)
    assert ev["scans"] == len(open_cache(cache).indices("val")) and ev["miou"] is not None
    r = finetune(FinetuneConfig(cache=str(cache), out=str(tmp / "ft"), checkpoint=str(tmp / "pre" / "checkpoint.pt"),
                                epochs=2, batch_size=2), progress=False)
    assert r["init"] == "pretrained" and r["miou"] is not None
    assert json.loads((tmp / "ft" / "result.json").read_text())["eval_split"] == "val"


def test_labels_only_precompute_then_finetune(fmt):
    name, root, tmp = fmt
    out = tmp / "labels.zarr"
    meta = run_precompute(PrecomputeConfig(dataroot=root, out=out, dataset=name, sweeps=1, class_set=name,
                                           teacher=None), progress=False)
    assert meta["has_teacher"] is False and meta["num_pairs"] == 0
    r = finetune(FinetuneConfig(cache=str(out), out=str(tmp / "ft0"), checkpoint=None, epochs=1, batch_size=2,
                                model=SMALL), progress=False)
    assert r["init"] == "random" and r["labelled_scans"] == len(open_cache(out).indices("train"))
