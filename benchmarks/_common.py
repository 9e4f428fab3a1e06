"""Pieces the benchmark scripts share: data choice (real fixture or synthetic fallback), cache
building, the student training step, per-variant subprocesses with a clean peak RSS, tables.

Not part of the package; imported by the scripts in this folder through
`sys.path.insert(0, <this folder>)`. The per-point reference path of the teacher (schema 4's
`assign_cameras` / `sample_maps`, also the tests' oracle) lives in tests/helpers.py: `reference()`.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REAL_ROOT = REPO.parent / "shared" / "data" / "nuscenes-real-0916"
RESULT_TAG = "BENCH_RESULT "
TRAINVAL_KEYFRAMES = 34149  # nuScenes v1.0-trainval samples (keyframes)
RANDOM_WEIGHTS_NOTE = ("teacher: MaskCLIP on open_clip ViT-B-16 with RANDOM weights (TeacherConfig(model='ViT-B-16', "
                       "weights='none'); no CLIP weights offline): the architecture and its cost are real, "
                       "the features and pseudo-labels are meaningless")


# ----------------------------------------------------------------------------- data and caches
@dataclass
class Data:
    root: Path  # nuScenes-layout dataroot
    version: str  # version folder (v1.0-mini)
    real: bool  # the real nuScenes fixture, or the synthetic generator's sample
    note: str  # one line saying which data, for the table notes


def real_available() -> bool:
    return (REAL_ROOT / "v1.0-mini" / "sample.json").is_file()


def pick_data(kind: str, tmp: Path, keyframes: int, sweeps: int, size: tuple[int, int] = (1600, 900)) -> Data:
    """kind 'auto' (real if present, else synthetic), 'real' or 'synthetic'. The synthetic
    sample has one scene of `keyframes` keyframes, K-1 = sweeps-1 lidar sweeps before each, and
    cameras of size (W, H)."""
    if kind not in ("auto", "real", "synthetic"):
        raise SystemExit(f"--data {kind!r}: expected auto, real or synthetic")
    if kind in ("auto", "real") and real_available():
        return Data(REAL_ROOT, "v1.0-mini", True,
                    f"data: real nuScenes keyframes of scene-0916 ({REAL_ROOT}), 1600x900 JPEGs; the fixture "
                    "ships no lidar sweep files, so its scans hold keyframe points only (K>1 adds no points)")
    if kind == "real":
        raise SystemExit(f"--data real: {REAL_ROOT} is missing")
    from clip2scene.samples.nuscenes import SampleConfig, make_sample

    w, h = size
    why = "" if kind == "synthetic" else f" (real fixture {REAL_ROOT} not found: synthetic fallback)"
    root = make_sample(tmp / f"synthetic-{w}x{h}-k{keyframes}-s{sweeps}",
                       SampleConfig(scenes=1, keyframes=keyframes, sweeps=max(sweeps - 1, 0), image_width=w,
                                    image_height=h))
    return Data(root, "v1.0-mini", False,
                f"data: synthetic nuScenes sample{why}: 1 scene x {keyframes} keyframes, {max(sweeps - 1, 0)} "
                f"sweeps before each, cameras {w}x{h}")


def teacher_config(weights: str = "none", model: str = "ViT-B-16"):
    from clip2scene.precompute.teacher.config import TeacherConfig

    return TeacherConfig(model=model, weights=weights)


def precompute_config(data: Data, out: Path | str, sweeps: int, limit: int | None, weights: str = "none",
                      device: str = "cpu", feature_dtype: str | None = None, **extra):
    from clip2scene.precompute.pipeline import PrecomputeConfig

    kw = dict(dataroot=data.root, out=str(out), dataset="nuscenes", version=data.version, sweeps=sweeps,
              teacher=teacher_config(weights), device=device, overwrite=True, limit=limit, **extra)
    if feature_dtype is not None:
        kw["feature_dtype"] = feature_dtype
    return PrecomputeConfig(**kw)


def build_cache(data: Data, out: Path | str, sweeps: int, limit: int | None, weights: str = "none",
                device: str = "cpu", feature_dtype: str | None = None, **extra) -> tuple[dict, object]:
    """run_precompute into `out`; returns (its result dict, the PrecomputeConfig); `extra` are
    further PrecomputeConfig fields."""
    from clip2scene.precompute.pipeline import run_precompute

    cfg = precompute_config(data, out, sweeps, limit, weights, device, feature_dtype, **extra)
    return run_precompute(cfg, progress=False), cfg


def process_teacher(cfg):
    """The MaskCLIP that run_precompute loaded in this process (pipeline keeps one per process)."""
    from clip2scene.classes import get_class_set
    from clip2scene.devices import resolve_device
    from clip2scene.precompute import pipeline

    return pipeline._teacher(cfg, get_class_set(cfg.class_set), resolve_device(cfg.device))


def reference():
    """tests/helpers.py, the module holding the per-point reference path (`assign_cameras`,
    `sample_maps`: schema 4's camera choice and stage-one sampling)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests import helpers

    return helpers


# ----------------------------------------------------------------------------- student step
def parse_channels(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    ch = tuple(int(c) for c in text.split(","))
    if len(ch) != 9:
        raise SystemExit(f"--channels needs 9 comma-separated widths, got {text!r}")
    return ch


class StudentStep:
    """One training step of the SPVCNN student exactly as `train` runs it: the loop's `Stepper`
    with the trainer's `Distillation` task (voxelize, per-voxel forward, SCR + SSR, backward, SGD
    step; autocast only on CUDA with amp)."""

    def __init__(self, text: np.ndarray, in_channels: int, voxel_size: float, device: str = "cpu",
                 channels: tuple[int, ...] | None = None, workdir: str = "/tmp", sweeps: int | None = None):
        import torch

        from clip2scene.train.loop import Stepper, build_optimizer
        from clip2scene.train.nets import ModelConfig, build_model, count_parameters
        from clip2scene.train.trainer import Distillation, TrainConfig

        self.device = torch.device(device)
        mc = dict(arch="spvcnn", in_channels=in_channels, out_channels=int(text.shape[1]))
        if channels:
            mc["channels"] = channels
        torch.manual_seed(0)
        model_config = ModelConfig(**mc)
        self.model = build_model(model_config, self.device)
        self.parameters = count_parameters(self.model)
        self.config = TrainConfig(cache="unused", out=workdir, voxel_size=voxel_size, sweeps=sweeps, device=device)
        optimizer, scheduler = build_optimizer(self.model, self.config, total_steps=10_000, steps_per_epoch=1_000)
        text = torch.from_numpy(np.asarray(text, np.float32)).to(self.device)
        task = Distillation(self.config, self.model, model_config, text)
        task.begin_epoch(0)
        self.step = Stepper(task, optimizer, scheduler, self.device, voxel_size, amp=self.config.amp)

    def __call__(self, batch: dict) -> float:
        loss, _, _ = self.step(batch, 0)
        return float(loss.detach())

    def num_voxels(self, batch: dict) -> int:
        from clip2scene.train.voxelize import voxelize

        return int(voxelize(batch["xyz"].to(self.device), batch["batch"].to(self.device),
                            self.config.voxel_size).num_voxels)


def scan_dataset(cache, indices, augment: bool = True, features: bool = True, sweeps: int | None = None):
    from clip2scene.train.data import ScanDataset

    return ScanDataset(cache, np.asarray(indices, np.int64), augment=augment, seed=0, features=features, sweeps=sweeps)


def train_loader(dataset, batch_size: int, workers: int, device: str = "cpu"):
    """The DataLoader `train` builds (`clip2scene.train.loop.make_loader`: EpochSampler, spawned
    persistent workers with epoch-tagged items)."""
    import torch

    from clip2scene.train.data import EpochSampler
    from clip2scene.train.loop import make_loader

    sampler = EpochSampler(len(dataset), seed=0, tag_epoch=workers > 0)
    return make_loader(dataset, sampler, batch_size, workers, torch.device(device))


# ----------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB: VmHWM of /proc/self/status.

    Not ru_maxrss: Linux carries the parent's peak into a child's ru_maxrss across fork + exec
    (a variant started by a parent holding a 2 GB teacher would report >= 2 GB). VmHWM belongs to
    the process's own address space, fresh at exec. ru_maxrss is the fallback off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_peak_mb(device: str) -> float | None:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 1024**2
    return None


def reset_gpu_peak(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def median(xs) -> float:
    return float(statistics.median(xs)) if len(xs) else float("nan")


def emit(result: dict) -> None:
    """A child's result: one tagged JSON line on stdout (the parent reads the last one)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(script: str | Path, args: list[str], timeout: float | None = None) -> dict:
    """Re-invoke `script` with `args` in a fresh interpreter (clean peak RSS); its emitted result."""
    cmd = [sys.executable, str(script), *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if p.returncode != 0 or not lines:
        tail = "\n".join((p.stdout + "\n" + p.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"variant failed (rc {p.returncode}): {' '.join(cmd)}\n{tail}")
    out = json.loads(lines[-1][len(RESULT_TAG):])
    out["_wall_s"] = time.perf_counter() - t0
    return out


def table(headers: list[str], rows: list[list]) -> list[str]:
    """A markdown table (also readable as plain text)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return out


def setup_process() -> None:
    """Set a benchmark process up as the CLI would (glibc malloc tuning, unless
    CLIP2SCENE_MALLOC=default) and keep library INFO logs and warnings (random-weights WARNING
    included) off the table output."""
    import logging
    import warnings

    from clip2scene.runtime import tune_malloc

    tune_malloc()

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
