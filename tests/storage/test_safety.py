"""Crash safety, one writer per cache, integrity checks and merging, on real precompute runs.

- kill -9 a precompute at 10 random moments, rerun: the final cache is byte-identical, file by
  file (sha256 in manifest.json), to an uninterrupted run; no scan lost or duplicated.
- a second precompute on a cache being written refuses with a one-line message.
- `cache verify` finds 100 random single-byte corruptions, each naming the damaged file.
- `cache merge` of caches built on different scenes equals one built on all; another teacher is
  refused naming the field.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clip2scene.errors import CacheError
from clip2scene.precompute.teacher.config import TeacherConfig
from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
from clip2scene.storage import open_cache
from clip2scene.storage.tools import merge, verify

TINY = TeacherConfig(model="clip2scene-tiny", weights="none", image_size=(64, 112))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from clip2scene.samples.nuscenes import SampleConfig, make_sample

    return make_sample(tmp_path_factory.mktemp("s") / "root",
                       SampleConfig(scenes=2, keyframes=4, sweeps=1, image_width=160, image_height=90))


@pytest.fixture(scope="module")
def reference(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_precompute(PrecomputeConfig(dataroot=sample, out=out, version="v1.0-mini", sweeps=2, teacher=TINY,
                                    block_size=1), progress=False)
    return out


def _files(path):
    return {k: v for k, v in json.loads((path / "manifest.json").read_text())["sha256"].items() if k != "zarr.json"}


def _cli(sample, out):
    return [sys.executable, "-m", "clip2scene.cli", "precompute", "--dataroot", str(sample), "--version", "v1.0-mini",
            "--out", str(out), "--sweeps", "2", "--clip-model", "clip2scene-tiny", "--clip-weights", "none",
            "--image-size", "64x112", "--block-size", "1"]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_same_cache(sample, reference, tmp_path):
    out = tmp_path / "c.zarr"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    rng = random.Random(0)
    kills = 0
    refused = False
    while kills < 10:
        proc = subprocess.Popen(_cli(sample, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not refused:  # while it runs, a second writer must be refused
            deadline = time.time() + 60
            while not (out / "writer.lock").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                with pytest.raises(CacheError, match="is being written by"):
                    run_precompute(PrecomputeConfig(dataroot=sample, out=out, version="v1.0-mini", sweeps=2,
                                                    teacher=TINY, block_size=1), progress=False)
                refused = True
        time.sleep(rng.uniform(0.0, 2.5))
        if proc.poll() is not None:  # finished before the kill: start again from scratch to keep killing
            assert proc.returncode == 0, proc.stderr.read().decode()
            _files(out)  # complete
            subprocess.run(["rm", "-rf", str(out)], check=True)
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert refused
    final = subprocess.run(_cli(sample, out), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert _files(out) == _files(reference)  # every block and table byte-identical
    got, ref = open_cache(out), open_cache(reference)
    assert got.token.tolist() == ref.token.tolist() and len(set(got.token.tolist())) == got.num_scans
    assert verify(str(out)) == []


@pytest.mark.slow
def test_verify_finds_every_flipped_byte(reference, tmp_path):
    import shutil

    path = tmp_path / "v.zarr"
    shutil.copytree(reference, path)
    assert verify(str(path)) == []
    files = sorted(json.loads((path / "manifest.json").read_text())["sha256"])
    rng = random.Random(1)
    for _ in range(100):
        rel = rng.choice(files)
        f = path / rel
        data = bytearray(f.read_bytes())
        pos = rng.randrange(len(data))
        old = data[pos]
        data[pos] = old ^ (1 << rng.randrange(8))  # one flipped bit
        f.write_bytes(bytes(data))
        assert verify(str(path)) == [f"corrupt: {rel} (sha256 differs from the manifest)"]
        data[pos] = old
        f.write_bytes(bytes(data))
    (path / files[0]).unlink()
    assert verify(str(path)) == [f"missing: {files[0]}"]


@pytest.mark.slow
def test_merge_caches_of_different_scenes(sample, reference, tmp_path):
    parts = []
    for split in ("train", "val"):
        out = tmp_path / f"{split}.zarr"
        run_precompute(PrecomputeConfig(dataroot=sample, out=out, version="v1.0-mini", sweeps=2, teacher=TINY,
                                        split=split, block_size=1), progress=False)
        parts.append(str(out))
    meta = merge(parts, str(tmp_path / "m.zarr"))
    ref, got = open_cache(reference), open_cache(tmp_path / "m.zarr")
    assert meta["num_scans"] == ref.num_scans and sorted(got.token.tolist()) == sorted(ref.token.tolist())
    for i, t in enumerate(got.token.tolist()):
        j = ref.token.tolist().index(t)
        a, b = got.read_scan(i, features=True), ref.read_scan(j, features=True)
        for f in ("xyz", "feat", "label", "pair_point", "pair_logits", "pair_features"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert verify(str(tmp_path / "m.zarr")) == []
    assert [s["path"] for s in got.meta["merged_from"]] == parts
    with pytest.raises(CacheError, match="scan .* is in both"):
        merge([parts[0], parts[0]], str(tmp_path / "dup.zarr"))
    other = tmp_path / "other.zarr"
    run_precompute(PrecomputeConfig(dataroot=sample, out=other, version="v1.0-mini", sweeps=2, split="val",
                                    teacher=TeacherConfig(model="clip2scene-tiny", weights="none", image_size=(64, 128))),
                   progress=False)
    with pytest.raises(CacheError, match=r"teacher.image_size differs \(\[64, 112\] vs \[64, 128\]\)"):
        merge([parts[0], str(other)], str(tmp_path / "bad.zarr"))
