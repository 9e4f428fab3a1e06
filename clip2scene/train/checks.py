"""Run-time guards of the training loops: non-finite losses and weights, and run folders (the
option range checks of the config dataclasses are in clip2scene/validation.py).

Every guard raises :class:`~clip2scene.errors.ConfigError` or ``TrainingError`` with one line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from clip2scene.errors import ConfigError, TrainingError


# ------------------------------------------------------------------------------ non-finite guards
def check_finite_loss(step: int, epoch: int, loss: float, terms: dict[str, float], kept: str) -> None:
    """Stop training at the first non-finite loss: TrainingError naming the step (1-based, global),
    the epoch (1-based) and every non-finite term. `kept` says what is on disk (e.g. which
    checkpoint is the last good one); the caller writes nothing for this step."""
    values = {"loss": loss, **terms}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise TrainingError(f"non-finite loss at step {step} (epoch {epoch}): {shown}; training stopped, {kept} "
                            "(lower --lr or raise --tau)")


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors in a (possibly nested) dict that hold NaN or Inf."""
    bad = []

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                bad.append(prefix)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    walk("", tensors)
    return bad


def count_tensors(tensors: dict) -> int:
    """Number of floating-point tensors in a (possibly nested) dict."""
    if isinstance(tensors, torch.Tensor):
        return int(tensors.is_floating_point())
    if isinstance(tensors, dict):
        return sum(count_tensors(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(count_tensors(v) for v in tensors)
    return 0


def check_finite_model(model: torch.nn.Module, step: int, epoch: int, kept: str) -> None:
    """TrainingError when the model's weights or buffers became non-finite (checked before every
    checkpoint is written, so a non-finite model never replaces a good checkpoint)."""
    state = model.state_dict()
    bad = nonfinite_tensors(state)
    if bad:
        raise TrainingError(f"non-finite weights after step {step} (epoch {epoch}): {len(bad)} of "
                            f"{count_tensors(state)} tensors hold NaN/Inf (first {bad[0]}); training stopped, {kept} "
                            "(lower --lr)")


# ------------------------------------------------------------------------------ run folders
RUN_MARKERS = ("checkpoint.pt", "metrics.jsonl")  # a folder holding one of these holds a run
RUN_FILES = ("checkpoint.pt", "checkpoint_epoch*.pt", "*.pt.tmp", "metrics.jsonl", "config.json", "result.json",
             "eval_*.json", "confusion_*.png", "training_curves.png", "best.pt", "val.jsonl",
             "events.out.tfevents.*")  # what --overwrite removes


def existing_run(out: str | os.PathLike) -> list[str]:
    """The run files (RUN_MARKERS or per-epoch checkpoints) already in `out`."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [name for name in RUN_MARKERS if (out / name).exists()]
    return found + sorted(p.name for p in out.glob("checkpoint_epoch*.pt"))


def refuse_existing_run(out: str | os.PathLike, resume: str | None = None, command: str = "train") -> None:
    """ConfigError when `out` already holds a run, unless `resume` is a checkpoint inside `out`
    (the run continues in place). `--overwrite` is the caller's way around it."""
    found = existing_run(out)
    if not found:
        return
    if resume is not None and Path(resume).resolve().parent == Path(out).resolve():
        return
    how = "--resume one of its checkpoints to continue it, " if command == "train" else ""
    raise ConfigError(f"--out {out} already holds a run ({', '.join(found)}): {how}give --overwrite to replace it, "
                      "or choose another --out")


def remove_run(out: str | os.PathLike) -> list[str]:
    """Delete the files a previous run left in `out` (RUN_FILES only: nothing else in the folder
    is touched). Returns the removed names."""
    out = Path(out)
    removed = []
    if out.is_dir():
        for pattern in RUN_FILES:
            for p in sorted(out.glob(pattern)):
                if p.is_file():
                    p.unlink()
                    removed.append(p.name)
    return removed
