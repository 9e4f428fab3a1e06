"""Guard rails shared by `train`, `finetune` and `linear-probe`: linear warm-up into the cosine
schedule, learning rates that follow the global batch size, gradient-norm clipping (the norm is
measured and logged every step, clipped only when asked), and a divergence monitor that flags a
loss far above its running level.

    from clip2scene.train.stability import (DivergenceMonitor, clip_gradients, lr_scale,
                                            resolve_warmup, warmup_cosine)
    scale = lr_scale(batch_size=4, reference_batch=8, rule="linear")     # 0.5
    warmup = resolve_warmup(None, steps_per_epoch=36)                      # auto: 18
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, warmup))
    norm = clip_gradients(model.parameters(), max_norm=None)               # measured, not clipped
    monitor = DivergenceMonitor(window=50, factor=10.0)
    if monitor.update(loss): ...                                           # loss > 10x median

Pure torch / numpy; no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Iterable

import numpy as np
import torch

from clip2scene.errors import Clip2SceneError
from clip2scene.validation import check_choice, check_float, check_int

LR_SCALING = ("linear", "sqrt", "none")  # how the learning rates follow batch_size / reference_batch
WARMUP_MAX_STEPS = 300  # auto warm-up: half the first epoch, at most this many steps


class TrainingDiverged(Clip2SceneError):
    """Raised by `--stop-on-divergence` runs; the message names the step, the loss, the running
    median and the checkpoint that was kept."""


def lr_scale(batch_size: int, reference_batch: int, rule: str) -> float:
    """Factor applied to every learning rate: batch_size / reference_batch ("linear", Goyal et al.
    2017, the rule for SGD), its square root ("sqrt") or 1 ("none")."""
    check_choice("lr_scaling", rule, LR_SCALING)
    ratio = batch_size / reference_batch
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def resolve_warmup(warmup_steps: int | None, steps_per_epoch: int) -> int:
    """Warm-up length in optimiser steps: `warmup_steps` when given (0 = off), else half the
    first epoch, at most WARMUP_MAX_STEPS (a few hundred on nuScenes, where an epoch is
    thousands of steps; a few steps on a tiny split)."""
    if warmup_steps is not None:
        return int(warmup_steps)
    return int(min(WARMUP_MAX_STEPS, max(1, math.ceil(steps_per_epoch / 2))))


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LambdaLR factor of step s: linear from 1/(W+1) to 1 over the first W steps, then the cosine
    from 1 to 0 over the remaining steps (W = 0: the plain cosine over all steps)."""
    total = max(int(total_steps), 1)
    warm = max(0, min(int(warmup_steps), total - 1))

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        t = min(s - warm, total - warm) / max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * t))

    return factor


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float | None) -> float:
    """Total L2 norm of the gradients (before clipping), clipping them to `max_norm` when given.
    Returns a Python float (inf/nan when a gradient is not finite)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    limit = float("inf") if not max_norm else float(max_norm)
    return float(torch.nn.utils.clip_grad_norm_(params, limit, error_if_nonfinite=False))


class DivergenceMonitor:
    """Flags a step whose loss exceeds `factor` x the median of the last `window` accepted losses.

    A flagged loss is not added to the window (a burst of bad steps keeps being compared with the
    level before it). No step is flagged before `min_history` losses are in the window. Non-finite
    losses are flagged too (a separate guard may stop on them first)."""

    def __init__(self, window: int = 50, factor: float = 10.0, min_history: int = 5):
        self.window = deque(maxlen=int(window))
        self.factor = float(factor)
        self.min_history = min(int(min_history), int(window))
        self.events = 0

    @property
    def median(self) -> float:
        """Median of the accepted losses in the window (nan when empty)."""
        return float(np.median(self.window)) if self.window else float("nan")

    def update(self, loss: float) -> bool:
        """Record one step's loss; True when it is a divergence."""
        loss = float(loss)
        bad = not math.isfinite(loss) or (len(self.window) >= self.min_history and loss > self.factor * self.median)
        if bad:
            self.events += 1
        else:
            self.window.append(loss)
        return bad


def validate(*, warmup_steps, clip_grad_norm, lr_scaling, reference_batch, divergence_factor,
             divergence_window) -> None:
    """ConfigError (one line naming the option) for a bad value of any guard-rail option."""
    check_int("warmup_steps", warmup_steps, 0, allow_none=True)  # None = auto, 0 = off
    check_float("clip_grad_norm", clip_grad_norm, 0, low_open=True, allow_none=True)  # None = no clipping
    check_choice("lr_scaling", lr_scaling, LR_SCALING)
    check_int("reference_batch", reference_batch, 1)
    check_float("divergence_factor", divergence_factor, 1, low_open=True)
    check_int("divergence_window", divergence_window, 1)
