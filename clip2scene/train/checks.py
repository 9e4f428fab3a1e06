"""Validation of training options (used by the config dataclasses' ``__post_init__``) and the
run-time guards of the training loops: non-finite losses and weights, and run folders.

Every check raises :class:`~clip2scene.errors.ConfigError` (or ``TrainingError``) with one line
that names the option as the CLI spells it (``--lr``) and the offending value, so the config
dataclasses are the single place where an option's valid range is written down.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import torch

from clip2scene.errors import ConfigError, TrainingError


def option(name: str) -> str:
    """The CLI spelling of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    """`value` is an int >= `minimum` (or None when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{option(name)} {value!r}: must be an integer >= {minimum}")


def check_float(name: str, value, low: float, high: float | None = None, low_open: bool = False,
                high_open: bool = False, allow_none: bool = False) -> None:
    """`value` is a finite number in the interval [low, high] (open ends where asked), or None
    when allowed. NaN and +-inf are always refused."""
    if value is None and allow_none:
        return
    ok = _is_number(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
    if not ok:
        if high is None:
            rule = f"> {low:g}" if low_open else f">= {low:g}"
        else:
            rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{option(name)} {value!r}: must be a finite number {rule}")


def check_choice(name: str, value, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{option(name)} {value!r}: expected one of {', '.join(choices)}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{option(name)} {value!r}: expected true or false")


def paths_to_text(config, *names: str) -> None:
    """In a frozen dataclass's __post_init__: os.PathLike values of `names` become str (the
    fields are declared str; config.json and checkpoints store them as text)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, os.PathLike):
            object.__setattr__(config, name, os.fspath(value))


def check_text(name: str, value, allow_none: bool = False) -> None:
    """A non-empty string (paths, split names)."""
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{option(name)} {value!r}: expected a non-empty string")


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
             "eval_*.json", "confusion_*.png", "training_curves.png")  # what --overwrite removes


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
