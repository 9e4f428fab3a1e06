"""Hostile input to precompute / cache / storage commands: one line, exit code 2, no traceback,
nothing half-written marked complete (issue 12). The training side is tests/train/test_hostile_cli.py.

`CASES` is the table: command line (placeholders filled from fixtures), the fragment the one
error line must contain, and what must hold on disk afterwards. Add a row for every option added.
Stateful cases (a live writer, a full disk, a corrupt chunk, Ctrl-C) follow as their own tests.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from typer.testing import CliRunner

from clip2scene.cli import app
from clip2scene.precompute import pipeline
from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
from clip2scene.storage import open_cache
from clip2scene.storage.tools import verify
from tests.helpers import TINY_NET_ARGS as SMALL_NET
from tests.helpers import TINY_TEACHER as TINY_CFG
from tests.helpers import TINY_TEACHER_ARGS as TINY
from tests.helpers import assert_one_line_error

runner = CliRunner()
DEAD_S3 = ["--storage-option", "client_kwargs.endpoint_url=http://127.0.0.1:1",
           "--storage-option", "config_kwargs.retries.max_attempts=1"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def sample(small_sample):
    """conftest's 4-scan sample (2 scenes x 2 keyframes, 160x90 cameras); never changed here."""
    return small_sample


@pytest.fixture(scope="module")
def cache(small_cache):
    """Its precomputed cache: 4 scans, one block each; copied before it is damaged."""
    return small_cache


@pytest.fixture
def s3_env(monkeypatch):
    """Dummy credentials, no instance metadata lookups, no cached s3fs instances."""
    s3fs = pytest.importorskip("s3fs")
    for k, v in dict(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_DEFAULT_REGION="us-east-1",
                     AWS_EC2_METADATA_DISABLED="true").items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


PRE = ["precompute", "--dataroot", "{root}", "--version", "v1.0-mini", "--out", "{out}", "--sweeps", "1"]

# (id, command line, fragment of the error line, what holds on disk: "absent" = --out was not
# created; "same" = the given cache is untouched and still complete)
CASES = [
    ("limit-negative", PRE + ["--limit", "-1"] + TINY, "--limit -1: must be an integer >= 1", "absent"),
    ("limit-zero", PRE + ["--limit", "0"] + TINY, "--limit 0", "absent"),
    ("workers-negative", PRE + ["--workers", "-2"] + TINY, "--workers -2: must be an integer >= 0", "absent"),
    ("block-size-zero", PRE + ["--block-size", "0"] + TINY, "--block-size 0", "absent"),
    ("sweeps-zero", PRE[:-1] + ["0"] + TINY, "--sweeps 0: must be an integer between 1 and 10", "absent"),
    ("sweeps-eleven", PRE[:-1] + ["11"] + TINY, "--sweeps 11", "absent"),
    ("denoise-threshold", PRE + TINY + ["--denoise-threshold", "1.5"], "--denoise-threshold 1.5: must lie in [0, 1]",
     "absent"),
    ("denoise-threshold-nan", PRE + TINY + ["--denoise-threshold", "nan"], "--denoise-threshold nan", "absent"),
    ("feature-dtype", PRE + TINY + ["--feature-dtype", "bfloat16"], "--feature-dtype 'bfloat16'", "absent"),
    ("teacher-precision", PRE + TINY + ["--teacher-precision", "half"], "--teacher-precision 'half'", "absent"),
    ("teacher-precision-fp16-cpu", PRE + TINY + ["--teacher-precision", "float16"], "float16 is for CUDA only",
     "absent"),
    ("on-error", PRE + TINY + ["--on-error", "ignore"], "--on-error 'ignore'", "absent"),
    ("image-size-zero", PRE + ["--clip-model", "clip2scene-tiny", "--clip-weights", "none", "--image-size", "0x64"],
     "--image-size 0x64", "absent"),
    ("image-size-format", PRE + ["--clip-model", "clip2scene-tiny", "--image-size", "64by112"], "--image-size", "absent"),
    ("dataset", PRE + TINY + ["--dataset", "waymo"], "--dataset 'waymo': unknown dataset", "absent"),
    ("class-set", PRE + TINY + ["--class-set", "coco"], "unknown class set 'coco'", "absent"),
    ("device", PRE + TINY + ["--device", "tpu:0"], "--device 'tpu:0'", "absent"),
    ("workers-and-scheduler", PRE + TINY + ["--workers", "1", "--scheduler", "tcp://127.0.0.1:1"],
     "give one of them", "absent"),
    ("scheduler-dead", PRE + TINY + ["--scheduler", "tcp://127.0.0.1:1"],
     "--scheduler tcp://127.0.0.1:1: cannot connect", "absent"),
    ("scheduler-malformed", PRE + TINY + ["--scheduler", "tcp://nohost"], "expected tcp://HOST:PORT", "absent"),
    ("version-of-another-dataset", PRE + TINY + ["--dataset", "scannet"], "unknown ScanNet version 'v1.0-mini'",
     "absent"),
    ("version-missing", ["precompute", "--dataroot", "{root}", "--out", "{out}"] + TINY,
     "this dataroot has v1.0-mini: pass --version v1.0-mini", "absent"),
    ("dataroot-missing", ["precompute", "--dataroot", "{tmp}/nope", "--out", "{out}"] + TINY, "dataroot not found",
     "absent"),
    ("storage-option-format", PRE + TINY + ["--storage-option", "novalue"], "--storage-option 'novalue'", "absent"),
    # teachers, backbones, sliding windows (issue 16)
    ("teacher-unknown", PRE + TINY + ["--teacher", "dino"], "--teacher 'dino': unknown teacher; expected one of "
     "maskclip, sclip, clearclip, naclip", "absent"),
    ("teacher-empty", PRE + TINY + ["--teacher", ""], "--teacher ''", "absent"),
    # the simulated teacher and the demo (issue 15); no class maps: tests/precompute/test_simulated.py
    ("teacher-simulated-image-size", PRE + ["--teacher", "simulated", "--image-size", "64x100"],
     "--teacher simulated --image-size 64x100", "absent"),
    ("demo-epochs-zero", ["demo", "--workdir", "{out}", "--epochs", "0"], "--epochs must be >= 1", "absent"),
    ("window-zero", PRE + TINY + ["--window", "0"], "--window '0': expected a positive size", "absent"),
    ("window-word", PRE + TINY + ["--window", "big"], "--window 'big'", "absent"),
    ("window-three-sides", PRE + TINY + ["--window", "32x32x32"], "--window '32x32x32'", "absent"),
    ("window-not-patch-multiple", PRE + TINY + ["--window", "40"], "window 40x40 must be a multiple of the patch size",
     "absent"),
    ("stride-negative", PRE + TINY + ["--window", "32", "--stride", "-16"], "--stride '-16'", "absent"),
    ("stride-not-patch-multiple", PRE + TINY + ["--window", "32", "--stride", "8"],
     "stride 8x8 must be a multiple of the patch size", "absent"),
    ("stride-over-window", PRE + TINY + ["--window", "32", "--stride", "48"], "--stride 48x48 is larger than the window",
     "absent"),
    ("stride-without-window", PRE + TINY + ["--stride", "32"], "--stride 32x32: given without a window", "absent"),
    ("backbone-eva", PRE + ["--clip-model", "EVA02-B-16", "--clip-weights", "none"],
     "'EVA02-B-16' uses a timm image tower", "absent"),
    ("backbone-siglip", PRE + ["--clip-model", "ViT-B-16-SigLIP", "--clip-weights", "none"],
     "'ViT-B-16-SigLIP' uses a timm image tower", "absent"),
    ("backbone-resnet", PRE + ["--clip-model", "RN50", "--clip-weights", "none"], "'RN50' has a ResNet image tower",
     "absent"),
    ("backbone-pooled", PRE + ["--clip-model", "ViT-L-14-CLIPA", "--clip-weights", "none"],
     "'ViT-L-14-CLIPA' pools its tokens", "absent"),
    ("backbone-unknown", PRE + ["--clip-model", "ViT-Q-99", "--clip-weights", "none"],
     "unknown open_clip model 'ViT-Q-99'", "absent"),
    ("train-on-dataroot", ["train", "--cache", "{root}", "--out", "{out}"],
     "looks like a nuScenes dataset root, not a cache; build a cache from it first: clip2scene precompute", "absent"),
    ("cache-info-on-dataroot", ["cache", "info", "{root}"], "looks like a nuScenes dataset root", None),
    ("overwrite-complete-needs-flag", ["precompute", "--dataroot", "{root}", "--version", "v1.0-mini", "--out",
                                       "{cache}", "--sweeps", "2"] + TINY, "already exists", "same"),
    ("overwrite-a-dataroot", ["precompute", "--dataroot", "{root}", "--version", "v1.0-mini", "--out", "{root}",
                              "--overwrite"] + TINY, "is not a clip2scene cache: --overwrite only replaces caches",
     "root-intact"),
    ("query-labels-value", ["query", "--checkpoint", "{tmp}/none.pt", "--labels", "yes", "a car"],
     "looks like a value for --labels, which is a flag", None),
    ("s3-dead-endpoint-precompute", PRE[:6] + ["s3://bucket/c.zarr"] + TINY + DEAD_S3,
     "s3://bucket/c.zarr: cannot reach the storage", None),
    ("s3-dead-endpoint-cache-info", ["cache", "info", "s3://bucket/c.zarr"] + DEAD_S3,
     "s3://bucket/c.zarr: cannot reach the storage", None),
    ("s3-dead-endpoint-train", ["train", "--cache", "s3://bucket/c.zarr", "--out", "{out}"] + DEAD_S3,
     "s3://bucket/c.zarr: cannot reach the storage", "absent"),
    ("s3-bad-storage-option", ["cache", "info", "s3://bucket/c.zarr", "--storage-option", "retries=1"],
     "bad --storage-option", None),
]


@pytest.mark.parametrize("args,fragment,disk", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_cli(args, fragment, disk, sample, cache, tmp_path, request):
    if "s3://" in " ".join(args):
        request.getfixturevalue("s3_env")
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    before = verify(str(cache)) if disk == "same" else None
    out = tmp_path / "out"
    filled = [a.format(root=sample, out=out, cache=cache, tmp=tmp_path) for a in args]
    t0 = time.perf_counter()
    assert_one_line_error(run(*filled), fragment)
    if disk == "absent":
        assert not out.exists(), sorted(p.name for p in out.iterdir())
    if disk == "same":
        assert before == [] and verify(str(cache)) == [] and open_cache(cache).num_scans == 4
        assert not (cache / "writer.lock").exists()
    if disk == "root-intact":
        assert (sample / "v1.0-mini" / "sample.json").is_file() and not (sample / "writer.lock").exists()
    assert time.perf_counter() - t0 < 120  # refused up front, never a hang


# precompute --config FILE: (id, file name, file text, extra command line, fragment of the error line);
# every row leaves --out absent
CONFIG_CASES = [
    ("config-missing", None, None, [], "--config {tmp}/none.toml: file not found"),
    ("config-bad-toml", "p.toml", "sweeps = [", [], "{tmp}/p.toml: not valid TOML"),
    ("config-unknown-key", "p.toml", "sweep = 2", [], "{tmp}/p.toml: unknown key 'sweep'"),
    ("config-unknown-teacher-key", "p.toml", "[teacher]\nclip_model = 'x'", [],
     "{tmp}/p.toml: unknown key 'teacher.clip_model'"),
    ("config-wrong-type", "p.toml", "sweeps = '2'", [], "{tmp}/p.toml: sweeps = \"2\": expected an integer"),
    ("config-teacher-not-a-table", "p.toml", "teacher = 'sclip'", [], "{tmp}/p.toml: teacher = 'sclip': expected a table"),
    ("config-image-size-text", "p.toml", "[teacher]\nimage_size = '64by112'", [],
     "{tmp}/p.toml: teacher.image_size '64by112': expected HxW"),
    ("config-image-size-list", "p.toml", "[teacher]\nimage_size = [0, 64]", PRE[1:] + TINY[:4],
     "--image-size 0x64: expected two positive integers HxW, e.g. 224x416 (set by teacher.image_size in {tmp}/p.toml)"),
    ("config-sweeps-range", "p.toml", "sweeps = 11", [], "--sweeps 11: must be an integer between 1 and 10 "
     "(set by sweeps in {tmp}/p.toml)"),
    ("config-simulated-knob", "p.toml", "[simulated]\nmiss_far = 2.0", [], "miss_far must lie in [0, 1], got 2.0"),
    ("config-without-dataroot", "p.toml", "sweeps = 1", ["--out", "{out}"],
     "missing option --dataroot: give it or set dataroot in {tmp}/p.toml"),
]


@pytest.mark.parametrize("name,text,extra,fragment", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_hostile_precompute_config(name, text, extra, fragment, sample, tmp_path):
    out = tmp_path / "out"
    path = tmp_path / (name or "none.toml")
    if text is not None:
        path.write_text(text)
    args = extra if extra else ["--dataroot", str(sample), "--version", "v1.0-mini", "--out", str(out), *TINY]
    filled = [a.format(tmp=tmp_path, out=out, root=sample) for a in args]
    assert_one_line_error(run("precompute", "--config", path, *filled), fragment.format(tmp=tmp_path))
    assert not out.exists()


def test_s3_without_credentials_is_one_line(s3_env):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        s3_env.delenv(k, raising=False)
    s3_env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    s3_env.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    assert_one_line_error(run("cache", "info", "s3://bucket/c.zarr", *DEAD_S3), "s3://bucket/c.zarr: no credentials")


def test_version_flags_and_help():
    r = run("--version")
    assert r.exit_code == 0 and r.output.startswith("clip2scene ")
    r = run("precompute", "--help")
    assert r.exit_code == 0 and "<bool>" not in r.output
    assert "--overwrite / --no-overwrite" in r.output and "--key-smoothing / --no-key-smoothing" in r.output
    assert "--labels / --no-labels" in run("query", "--help").output


def test_dask_logs_only_errors_without_verbose(tmp_path, monkeypatch):
    import logging

    monkeypatch.delenv("DASK_LOGGING__DISTRIBUTED", raising=False)
    monkeypatch.setattr(logging.getLogger("distributed"), "level", logging.NOTSET)
    assert_one_line_error(run("cache", "info", tmp_path / "nothing"), "cache not found")
    # Dask workers inherit the environment and configure their loggers from it
    assert os.environ["DASK_LOGGING__DISTRIBUTED"] == "error"
    assert logging.getLogger("distributed").level == logging.ERROR


def test_live_writer_is_refused_before_any_work_and_overwrite_never_removes_it(sample, tmp_path, monkeypatch):
    """Two overlapping runs, the second with --overwrite: exactly one writes."""
    out = tmp_path / "c.zarr"
    writing, go = threading.Event(), threading.Event()
    real_write_block = pipeline.write_block

    def slow_write_block(loc, index, *a, **k):
        writing.set()
        assert go.wait(120)
        return real_write_block(loc, index, *a, **k)

    monkeypatch.setattr(pipeline, "write_block", slow_write_block)
    result = {}

    def first():
        try:
            result["meta"] = run_precompute(PrecomputeConfig(dataroot=sample, out=out, version="v1.0-mini", sweeps=1,
                                                             teacher=TINY_CFG, block_size=2), progress=False)
        except BaseException as e:  # pragma: no cover - reported below
            result["error"] = e

    a = threading.Thread(target=first)
    a.start()
    try:
        assert writing.wait(120), result
        lock = (out / "writer.lock").read_text()

        def no_loading(*args, **kwargs):
            raise AssertionError("the second run loaded a dataset or teacher before checking the lock")

        monkeypatch.setattr(pipeline, "open_dataset", no_loading)
        monkeypatch.setattr(pipeline, "load_teacher", no_loading)
        for extra in ([], ["--overwrite"]):
            r = run(*[a.format(root=sample, out=out) for a in PRE], *TINY, *extra)
            assert_one_line_error(r, "is being written by", f"pid {os.getpid()}")
            assert (out / "writer.lock").read_text() == lock and (out / "manifest" / "key.json").exists()
    finally:
        go.set()
        a.join(300)
    assert "error" not in result and result["meta"]["num_scans"] == 4
    assert verify(str(out)) == [] and not (out / "writer.lock").exists()


def test_disk_full_leaves_a_resumable_cache(sample, tmp_path, monkeypatch):
    out = tmp_path / "c.zarr"
    real_write_block = pipeline.write_block

    def full_after_first(loc, index, *a, **k):
        if index == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "blocks" / "000001"))
        return real_write_block(loc, index, *a, **k)

    monkeypatch.setattr(pipeline, "write_block", full_after_first)
    args = [a.format(root=sample, out=out) for a in PRE] + TINY + ["--block-size", "1"]
    err = assert_one_line_error(run(*args), "no space left on the device", "000001",
                                "rerun the same command to resume")
    assert "not marked complete" in err
    meta = json.loads((out / "zarr.json").read_text())["attributes"]["clip2scene"]
    assert meta["status"] == "failed" and not (out / "manifest.json").exists() and not (out / "writer.lock").exists()
    assert sorted(p.name for p in (out / "manifest" / "blocks").glob("*.json")) == ["000000.json"]
    info = run("cache", "info", out)
    assert info.exit_code == 0 and "FAILED" in info.output and "done so far: 1 blocks" in info.output
    monkeypatch.setattr(pipeline, "write_block", real_write_block)
    # the same command resumes; another --image-size is refused naming only that field
    r = run(*[a.format(root=sample, out=out) for a in PRE], "--clip-model", "clip2scene-tiny", "--clip-weights", "none",
            "--image-size", "64x128", "--block-size", "1")
    err = assert_one_line_error(r, "cannot resume", "teacher.image_size was [64, 112], now [64, 128]")
    assert "weights_sha256" not in err  # not two whole fingerprints
    r = run(*args)
    assert r.exit_code == 0 and "resumed: 1 of 4 blocks were already done" in r.output, r.output
    assert verify(str(out)) == []
    r = run(*args)  # complete: nothing to do, said plainly
    assert r.exit_code == 0 and "already complete for these settings" in r.output and "nan" not in r.output


def test_corrupt_or_missing_chunk_fails_naming_the_file(cache, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(cache, bad)
    shard = "blocks/000001/points/xyz/c/0/0"
    data = bytearray((bad / shard).read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit inside the compressed chunk
    (bad / shard).write_bytes(bytes(data))
    c = open_cache(bad)
    c.read_scan(0)  # another block: fine
    from clip2scene.errors import CacheError

    with pytest.raises(CacheError, match=f"{shard} is corrupt .*Zstd.*cache verify"):
        c.read_scan(1)
    r = run("train", "--cache", bad, "--out", tmp_path / "run", "--epochs", 1, "--batch-size", 2, *SMALL_NET)
    assert_one_line_error(r, shard, "is corrupt")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # a lost shard file would read as zeros: refused naming it
    gone = "blocks/000002/pairs/uv/c/0/0"
    (bad / gone).unlink()
    with pytest.raises(CacheError, match=f"{gone} is missing"):
        open_cache(bad).read_scan(2)


def test_random_teacher_and_failed_cache_are_said_plainly(cache):
    r = run("cache", "info", cache)
    assert r.exit_code == 0 and "teacher was randomly initialised" in r.output


def test_zero_byte_jpeg_and_control_character_json(sample, tmp_path):
    from clip2scene.precompute.datasets.nuscenes import NuScenes

    root = shutil.copytree(sample, tmp_path / "root")
    view = NuScenes(root, "v1.0-mini").views(NuScenes(root, "v1.0-mini").scans()[0])[1]
    view.path.write_bytes(b"")
    out = tmp_path / "c.zarr"
    r = run(*[a.format(root=root, out=out) for a in PRE], *TINY)
    assert_one_line_error(r, str(view.path), "camera image file is empty (0 bytes)")
    assert not (out / "manifest.json").exists()
    table = root / "v1.0-mini" / "scene.json"
    table.write_text('[{"name": "a\tb"}]')  # a raw tab inside a string
    err = assert_one_line_error(run(*[a.format(root=root, out=tmp_path / "c2.zarr") for a in PRE], *TINY),
                                str(table), "not valid JSON (Invalid control character at: line 1 column")
    assert "at at" not in err


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_nothing_else(sample, tmp_path):
    out = tmp_path / "c.zarr"
    cmd = [sys.executable, "-m", "clip2scene.cli", *[a.format(root=sample, out=out) for a in PRE], *TINY,
           "--block-size", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    for _ in range(3):  # a run that finished before the signal proves nothing: again from scratch
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while proc.poll() is None and not list((out / "manifest" / "blocks").glob("*.json")) and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
        shutil.rmtree(out)
    assert proc.returncode == 130, stderr
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("precompute:")
             and "RANDOM weights" not in ln]
    assert lines == ["interrupted: precompute stopped: the blocks finished so far are kept; rerun the same command "
                     "to resume"], stderr
    assert "Traceback" not in stderr and "Task was destroyed" not in stderr
    meta = json.loads((out / "zarr.json").read_text())["attributes"]["clip2scene"]
    assert meta["status"] == "failed" and not (out / "writer.lock").exists()
    r = run("cache", "info", out)
    assert r.exit_code == 0 and "KeyboardInterrupt" in r.output
