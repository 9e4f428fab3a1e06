"""The CLI end to end on a small synthetic sample, and its one-line errors."""

import json

import pytest
from typer.testing import CliRunner

from clip2scene.cli import app
from tests.helpers import TINY_NET_ARGS as SMALL_NET
from tests.helpers import TINY_TEACHER_ARGS as TINY
from tests.helpers import assert_one_line_error

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "root"
    r = run("make-sample", "--out", out, "--scenes", 2, "--keyframes", 2, "--sweeps", 1)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow
def test_pipeline_through_the_cli(sample, tmp_path):
    cache = tmp_path / "cache.zarr"
    r = run("precompute", "--dataset", "nuscenes", "--dataroot", sample, "--version", "v1.0-mini", "--out", cache,
            "--sweeps", 2, *TINY)
    assert r.exit_code == 0, r.output
    assert "scans 4" in r.output and "randomly initialised" in r.output
    r = run("cache", "info", cache)
    assert r.exit_code == 0, r.output
    assert "scans 4 (train=2, val=2), sweeps per scan 2" in r.output and "B/point" in r.output
    info = json.loads(run("cache", "info", cache, "--json").output)
    assert info["meta"]["num_scans"] == 4 and info["meta"]["teacher"]["model"] == "clip2scene-tiny"
    r = run("train", "--cache", cache, "--out", tmp_path / "run", "--epochs", 2, "--batch-size", 2, *SMALL_NET)
    assert r.exit_code == 0, r.output
    assert "2 scans x 2 epochs = 2 steps" in r.output
    r = run("evaluate", "--checkpoint", tmp_path / "run" / "checkpoint.pt", "--cache", cache, "--split", "val")
    assert r.exit_code == 0, r.output
    assert "mIoU" in r.output and "car" in r.output and "not meaningful" in r.output
    assert json.loads((tmp_path / "run" / "eval_val.json").read_text())["scans"] == 2


def test_bad_inputs_are_one_line_errors(sample, tmp_path):
    import shutil

    assert_one_line_error(run("precompute", "--dataroot", tmp_path / "nope", "--out", tmp_path / "c1", *TINY),
                          "dataroot not found", "nope")
    assert_one_line_error(run("precompute", "--dataset", "waymo", "--dataroot", sample, "--out", tmp_path / "c2", *TINY),
                          "--dataset 'waymo'")
    assert_one_line_error(run("precompute", "--dataroot", sample, "--version", "v1.0-mini", "--class-set", "coco",
                              "--out", tmp_path / "c3", *TINY), "unknown class set 'coco'")
    assert_one_line_error(run("precompute", "--dataroot", sample, "--version", "v1.0-mini", "--out", tmp_path / "c3",
                              "--image-size", "64by112"), "--image-size")
    root = tmp_path / "bad"
    shutil.copytree(sample, root)
    pcd = sorted((root / "samples" / "LIDAR_TOP").glob("*.pcd.bin"))[1]
    pcd.write_bytes(pcd.read_bytes()[:-4])
    r = run("precompute", "--dataroot", root, "--version", "v1.0-mini", "--out", tmp_path / "c4", *TINY)
    assert_one_line_error(r, pcd.name, "not a multiple of 20")
    info = run("cache", "info", tmp_path / "c4")  # a failed cache is shown, with its error
    assert info.exit_code == 0 and "FAILED: not usable for training" in info.output, info.output
    assert "not a multiple of 20" in info.output and "rerun the same" in info.output
    assert_one_line_error(run("train", "--cache", tmp_path / "c4", "--out", tmp_path / "r4"), "not complete")
    (root / "v1.0-mini" / "ego_pose.json").unlink()
    assert_one_line_error(run("precompute", "--dataroot", root, "--version", "v1.0-mini", "--out", tmp_path / "c5", *TINY),
                          "ego_pose.json")
    assert_one_line_error(run("cache", "info", tmp_path / "nothing"), "cache not found")
    assert_one_line_error(run("train", "--cache", tmp_path / "nothing", "--out", tmp_path / "r"), "cache not found")
    assert_one_line_error(run("make-sample", "--out", sample), "")
    assert_one_line_error(run("train", "--cache", tmp_path / "nothing", "--out", tmp_path / "r", "--views", "max"),
                          "--views 'max'", "border, mean")
    assert_one_line_error(run("precompute", "--dataroot", sample, "--version", "v1.0-mini", "--out", tmp_path / "c6",
                              "--feature-dtype", "int4", *TINY), "--feature-dtype 'int4'")


def test_missing_clip_weights_names_the_file(sample, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run("precompute", "--dataroot", sample, "--version", "v1.0-mini", "--out", tmp_path / "c",
            "--clip-model", "ViT-B-16", "--clip-weights", "openai")
    assert_one_line_error(r, "--clip-weights", str(tmp_path))
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_teacher_variant_through_the_cli(sample, tmp_path):
    cache = tmp_path / "c.zarr"
    r = run("precompute", "--dataroot", sample, "--version", "v1.0-mini", "--out", cache, "--limit", 1, "--sweeps", 1,
            "--teacher", "clearclip", "--window", "32x48", "--stride", "16", *TINY)
    assert r.exit_code == 0, r.output
    assert "teacher clearclip on clip2scene-tiny" in r.output and "window 32x48 stride 16x16" in r.output
    r = run("cache", "info", cache)
    assert r.exit_code == 0 and "teacher clearclip on clip2scene-tiny" in r.output, r.output


@pytest.mark.parametrize("args,fragments", [
    (["--cache", "nope"], ["--cache 'nope': expected NAME=PATH"]),
    (["--cache", "a=x.zarr", "--cache", "a=y.zarr"], ["row name 'a' given twice"]),
    (["--cache", "a=missing.zarr"], ["cache not found"]),
])
def test_compare_teachers_hostile(tmp_path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    r = run("compare-teachers", "--out", tmp_path / "cmp", *args)
    assert_one_line_error(r, *fragments)
    assert not (tmp_path / "cmp").exists()
