"""The simulated teacher (clip2scene.precompute.teacher.simulated) and the class maps it reads."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clip2scene.classes import NUSCENES_CLASSES
from clip2scene.cli import app
from clip2scene.precompute.teacher.classmaps import CLASSMAP_DIR, read_class_map, write_class_map
from clip2scene.precompute.teacher.simulated import SimulatedConfig, SimulatedTeacher, pseudo_text_embeddings
from clip2scene.samples.nuscenes import SampleConfig, make_sample

CAR, TRUCK, ROAD, SIDEWALK = (NUSCENES_CLASSES.index(n) + 1 for n in ("car", "truck", "driveable surface", "sidewalk"))
QUIET = SimulatedConfig(embed_dim=64, confusions=(), miss_small=0.0, miss_far=0.0, noise=0.0)


def scene(h=64, w=128):
    """Road below a sidewalk, one car (object 0) of 4 x 2 patches on the road."""
    label = np.full((h, w), SIDEWALK, np.uint8)
    label[h // 2:] = ROAD
    instance = np.full((h, w), -1, np.int32)
    label[32:64, 32:64] = CAR
    instance[32:64, 32:64] = 0
    depth = np.full((h, w), 10.0, np.float32)
    return label, depth, instance


def write_views(tmp_path, n=1):
    views = []
    label, depth, instance = scene()
    for k in range(n):
        img = tmp_path / "root" / "samples" / "CAM_FRONT" / f"im{k}.jpg"
        img.parent.mkdir(parents=True, exist_ok=True)
        img.write_bytes(b"")
        write_class_map(tmp_path / "root", f"samples/CAM_FRONT/im{k}.jpg", label, depth, instance)
        views.append(SimpleNamespace(path=img, width=128, height=64))
    return views


def test_class_map_round_trip(tmp_path):
    label, depth, instance = scene()
    depth[0, 0] = np.inf
    write_class_map(tmp_path, "samples/CAM_FRONT/a.jpg", label, depth, instance)
    assert (tmp_path / CLASSMAP_DIR / "samples" / "CAM_FRONT" / "a.label.png").is_file()
    img = tmp_path / "samples" / "CAM_FRONT" / "a.jpg"
    img.parent.mkdir(parents=True)
    cm = read_class_map(img, 128, 64)
    assert np.array_equal(cm.label, label) and np.array_equal(cm.instance, instance)
    assert np.isinf(cm.depth[0, 0]) and np.allclose(cm.depth[1:], 10.0, atol=0.005)  # stored in cm
    with pytest.raises(Exception, match="class map is 128x64"):
        read_class_map(img, 100, 64)


def test_pseudo_text_embeddings():
    e = pseudo_text_embeddings(["car", "a car", "Cars.", "truck", "vegetation", "a red balloon"], 256, group_weight=0.5)
    assert torch.allclose(e.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.equal(e[0], e[1]) and torch.equal(e[0], e[2])
    cos = e @ e.T
    assert cos[0, 3] > cos[0, 4] + 0.1  # look-alikes (vehicles) share a group component
    assert torch.equal(pseudo_text_embeddings(["car"], 256, group_weight=0.5)[0], e[0])  # deterministic


def test_outputs_are_maskclip_shaped_with_patch_resolution(tmp_path):
    views = write_views(tmp_path, 2)
    t = SimulatedTeacher(NUSCENES_CLASSES, (64, 128), QUIET)
    feats, logits = t.dense_outputs_for_views(views, "nuscenes")
    assert feats.shape == (2, 64, 4, 8) and logits.shape == (2, 16, 4, 8)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2, 4, 8), atol=1e-5)
    assert torch.allclose(logits, torch.einsum("vdhw,cd->vchw", feats, t.text_embeddings), atol=1e-5)
    pseudo = logits[0].argmax(0) + 1  # no errors: the majority class of each 16 x 16 patch
    expected = np.full((4, 8), SIDEWALK)
    expected[2:] = ROAD
    expected[2:, 2:4] = CAR
    assert np.array_equal(pseudo.numpy(), expected)
    assert t.fingerprint["model"] == "simulated" and t.fingerprint["weights_sha256"].startswith("simulated-")
    assert SimulatedTeacher(NUSCENES_CLASSES, (64, 128), replace(QUIET, noise=0.1)).fingerprint["weights_sha256"] \
        != t.fingerprint["weights_sha256"]


def test_errors_are_region_level_and_deterministic(tmp_path):
    views = write_views(tmp_path)
    always = replace(QUIET, confusions=(("car", "truck", 1.0),))
    _, logits = SimulatedTeacher(NUSCENES_CLASSES, (64, 128), always).dense_outputs_for_views(views, "nuscenes")
    pseudo = logits[0].argmax(0) + 1
    assert (pseudo[2:, 2:4] == TRUCK).all()  # the whole car, not single patches
    missed = replace(QUIET, miss_small=1.0, small_area=100.0)
    _, logits = SimulatedTeacher(NUSCENES_CLASSES, (64, 128), missed).dense_outputs_for_views(views, "nuscenes")
    around = logits[0].argmax(0)[2:, 2:4] + 1  # a missed object takes the classes around it
    assert ((around == ROAD) | (around == SIDEWALK)).all() and (around[1] == ROAD).all()
    noisy = replace(QUIET, noise=0.2)
    a = SimulatedTeacher(NUSCENES_CLASSES, (64, 128), noisy).dense_outputs_for_views(views, "nuscenes")[0]
    b = SimulatedTeacher(NUSCENES_CLASSES, (64, 128), noisy).dense_outputs_for_views(views, "nuscenes")[0]
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim") / "root"
    return make_sample(root, SampleConfig(scenes=2, keyframes=1, sweeps=1, image_width=96, image_height=54,
                                          lidar_beams=8, lidar_azimuth_steps=128))


def test_precompute_cli_says_simulated_and_needs_class_maps(small_sample, tmp_path):
    runner = CliRunner()
    cache = tmp_path / "c.zarr"
    r = runner.invoke(app, ["precompute", "--dataroot", str(small_sample), "--version", "v1.0-mini", "--out", str(cache),
                            "--teacher", "simulated", "--image-size", "64x112", "--sweeps", "1"])
    assert r.exit_code == 0, r.output
    assert "SIMULATED teacher" in r.output
    r = runner.invoke(app, ["cache", "info", str(cache)])
    assert r.exit_code == 0 and "SIMULATED teacher" in r.output, r.output
    info = json.loads(runner.invoke(app, ["cache", "info", str(cache), "--json"]).output)
    assert info["meta"]["teacher"]["model"] == "simulated" and info["meta"]["teacher"]["embed_dim"] == 64
    bare = tmp_path / "bare"
    shutil.copytree(small_sample, bare)
    shutil.rmtree(bare / CLASSMAP_DIR)
    r = runner.invoke(app, ["precompute", "--dataroot", str(bare), "--version", "v1.0-mini", "--out",
                            str(tmp_path / "c2.zarr"), "--teacher", "simulated", "--image-size", "64x112"])
    assert r.exit_code == 2 and "no per-pixel class maps" in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["precompute", "--dataroot", str(small_sample), "--version", "v1.0-mini", "--out",
                            str(tmp_path / "c3.zarr"), "--teacher", "dino"])
    assert r.exit_code == 2 and "--teacher 'dino'" in r.output, r.output
