"""The one training loop of `train`, `finetune` and `linear-probe` (and of the DDP emulation test
and the benchmarks, which run its `Stepper`).

What a step computes is a small *task* object (`Task`): distillation losses for `train`
(trainer.Distillation), cross-entropy + Lovasz for fine-tuning and the linear probe
(finetune.Segmentation). Everything else is here, once:

* the schedule: SGD with momentum and weight decay at the batch-scaled learning rate, linear
  warm-up then cosine to 0 (`schedule_info`, `build_optimizer`; train/stability.py);
* the loader: `EpochSampler` (per-(seed, epoch) order, sharded over DDP ranks) and spawned,
  persistent workers (`make_loader`);
* the step (`Stepper`): voxelise, forward (float16 autocast on CUDA with AMP), the task's loss,
  backward (gradient scaling under AMP; DDP averages the gradients), gradient norm / clipping,
  SGD step, schedule step;
* per step: the loss terms all-reduced over the ranks, the non-finite stop (train/checks.py),
  the divergence monitor (`--stop-on-divergence`), one `metrics.jsonl` row, the progress bar;
* per epoch: precise BatchNorm after the last one, the non-finite weight check, validation
  with `best.pt` when due, the checkpoint (every epoch, or only at the end), and on Ctrl-C the
  hint of what `--resume` continues from;
* what a practitioner watches (train/tracking.py, hooked in here once): TensorBoard / wandb
  scalars per step and epoch, the whole run's ETA in the progress bar and the epoch log line,
  `max_steps` for smoke runs (the schedule stays the full run's).

    task = Distillation(config, model, model_config, text, cache)      # trainer.py
    optimizer, scheduler = build_optimizer(model, config, total_steps, steps_per_epoch)
    result = run_loop(task, LoopConfig.of(config), dataset, optimizer, scheduler, device=device,
                      watch=RunWatch(...))                              # result.epoch_losses, .steps, ...
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clip2scene.errors import Interrupted
from clip2scene.runtime import worker_init
from clip2scene.train.checks import check_finite_loss, check_finite_model
from clip2scene.train.data import EpochSampler, ScanDataset, collate
from clip2scene.train.distributed import DistEnv, all_reduce_sum, broadcast_buffers
from clip2scene.train.predict import forward_points
from clip2scene.train.stability import (DivergenceMonitor, TrainingDiverged, clip_gradients, lr_scale,
                                        resolve_warmup, warmup_cosine)
from clip2scene.train.tracking import copy_checkpoint
from clip2scene.train.voxelize import voxelize

log = logging.getLogger(__name__)


class Task(Protocol):
    """What one training step computes, and how the trained model is saved.

    Attributes:
        name: progress-bar label of an epoch ("epoch", "finetune", "linear").
        model: the network whose weights are trained, checked for NaN/Inf and saved.
        net: the module whose ``forward(vox, feat)`` a step runs (DDP wraps this one).
        nothing_kept: what is on disk before the first checkpoint (for error messages).
    """

    name: str
    model: torch.nn.Module
    net: torch.nn.Module
    nothing_kept: str

    def begin_epoch(self, epoch: int) -> None:
        """Set train/eval modes and the epoch's random draws (called before each epoch)."""

    def loss(self, out: torch.Tensor, vox, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss, per-term floats) of one batch from the net's float32 output."""

    def save(self, path: Path, epoch: int, optimizer, scheduler, extra: dict) -> None:
        """Write the checkpoint after `epoch` epochs (1-based) to `path` (atomically); `extra`:
        step, the BestKeeper state and `partial_epoch` (the step of a mid-epoch --max-steps stop)."""

    def row(self, optimizer) -> dict:
        """Extra metrics.jsonl columns of a step (e.g. the classifier's learning rate)."""


class StepForward(torch.nn.Module):
    """``forward(vox, feat)`` = ``model.<method>(vox, feat)``: DDP only hooks ``forward``."""

    def __init__(self, model: torch.nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, vox, feat: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(vox, feat)


@dataclass(frozen=True)
class LoopConfig:
    """The options of a training run that the loop itself uses (`LoopConfig.of` picks them from
    a TrainConfig / FinetuneConfig by name)."""

    out: Path  # run folder: metrics.jsonl, checkpoint.pt
    epochs: int  # last epoch (1-based count)
    batch_size: int  # global batch (split evenly over the ranks)
    voxel_size: float  # metres
    seed: int = 0  # data order (EpochSampler)
    workers: int = 0  # DataLoader worker processes (spawned, persistent)
    amp: bool = False  # float16 autocast + gradient scaling on CUDA (ignored elsewhere)
    clip_grad_norm: float | None = None  # clip the gradient norm to this (None: measured only)
    divergence_factor: float = 10.0
    divergence_window: int = 50
    stop_on_divergence: bool = False
    precise_bn_batches: int = 0  # after the last epoch (0 = off)
    keep_checkpoints: bool = False  # also checkpoint_epoch{K}.pt
    save_every_epoch: bool = True  # False: only at the end (and per epoch with stop_on_divergence)
    resumable: bool = True  # Ctrl-C names the checkpoint `--resume` continues from
    max_steps: int | None = None  # stop after this many steps of the run (the schedule stays the full run's)

    @classmethod
    def of(cls, config, **overrides) -> "LoopConfig":
        """The fields of `config` (a run config dataclass) that this class has, then `overrides`."""
        picked = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        picked.update(overrides)
        picked["out"] = Path(picked["out"])
        return cls(**picked)


@dataclass
class LoopResult:
    epoch_losses: list[float] = field(default_factory=list)  # mean step loss of each epoch run here
    steps: int = 0  # global step count at the end (resumed runs: including the earlier steps)
    scans: int = 0  # scans processed here (all ranks)
    seconds: float = 0.0
    divergences: int = 0  # steps flagged by the divergence monitor
    last_good: tuple[str, int] | None = None  # (checkpoint, epoch) written last
    stopped: bool = False  # stopped early at max_steps


# ------------------------------------------------------------------------------ schedule and loader
def schedule_info(config, steps_per_epoch: int, total_steps: int) -> dict:
    """The learning-rate schedule a TrainConfig / FinetuneConfig resolves to (config.json, logs)."""
    scale = lr_scale(config.batch_size, config.reference_batch, config.lr_scaling)
    return dict(lr=config.lr, lr_scale=scale, effective_lr=config.lr * scale, batch_size=config.batch_size,
                reference_batch=config.reference_batch, lr_scaling=config.lr_scaling,
                warmup_steps=resolve_warmup(config.warmup_steps, steps_per_epoch), total_steps=total_steps,
                steps_per_epoch=steps_per_epoch, clip_grad_norm=config.clip_grad_norm)


def build_optimizer(params, config, total_steps: int, steps_per_epoch: int):
    """SGD with momentum and weight decay at the batch-scaled learning rate (`schedule_info`),
    linear warm-up then the cosine schedule to 0 over `total_steps` optimiser steps; returns
    (optimizer, scheduler).

    params: a module (all its parameters at that rate) or a list of (parameters, multiplier)
    pairs, one parameter group each at multiplier x the rate (fine-tuning's new head)."""
    info = schedule_info(config, steps_per_epoch, total_steps)  # the automatic warm-up is a fraction of one epoch
    lr = info["effective_lr"]
    if isinstance(params, torch.nn.Module):
        params = [(params.parameters(), 1.0)]
    groups = [dict(params=list(p), lr=lr * mult) for p, mult in params]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, info["warmup_steps"]))
    return optimizer, scheduler


def make_loader(dataset: ScanDataset, sampler: EpochSampler, batch_size: int, workers: int,
                device: torch.device) -> DataLoader:
    """Workers (spawned) persist across epochs and prefetch 4 batches each; the sampler tags every
    item with its epoch (`EpochSampler(tag_epoch=True)`) so their dataset copies augment by the
    right one."""
    use = workers > 0
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=workers, multiprocessing_context="spawn" if use else None,
                      persistent_workers=use, prefetch_factor=4 if use else None,
                      pin_memory=device.type == "cuda", worker_init_fn=worker_init if use else None)


@torch.no_grad()
def precise_batchnorm(model: torch.nn.Module, loader, num_batches: int, voxel_size: float, device: torch.device) -> int:
    """Recompute every BatchNorm's running mean/var as an exact average over `num_batches` batches
    with the final weights (the EMA of a short or fast-moving run lags behind them). Returns the
    number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or num_batches <= 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average = exact mean over the batches seen
    model.train()
    used = 0
    for batch in loader:
        if used >= num_batches:
            break
        forward_points(model, batch, voxel_size, device)
        used += 1
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    return used


def final_batchnorm(model: torch.nn.Module, dataset: ScanDataset, lc: LoopConfig, env: DistEnv,
                    device: torch.device, epoch: int) -> None:
    """After the last epoch: precise BN on rank 0 over the first global batches of the epoch's
    order (exactly what one process does), then every rank takes rank 0's buffers."""
    if lc.precise_bn_batches > 0 and env.is_main:
        sampler = EpochSampler(len(dataset), seed=lc.seed)
        sampler.set_epoch(epoch)
        loader = make_loader(dataset, sampler, lc.batch_size, lc.workers, device)
        used = precise_batchnorm(model, loader, lc.precise_bn_batches, lc.voxel_size, device)
        log.info("BatchNorm statistics re-estimated on %d batches", used)
    broadcast_buffers(model, env)


# ------------------------------------------------------------------------------ the step
class Stepper:
    """One optimiser step of a task: `__call__(batch, epoch)` = zero the gradients, `forward_loss`,
    `backward`, `update`. The parts are public so that the DDP emulation test can accumulate
    several ranks' sub-batches into one step exactly as DDP does."""

    def __init__(self, task: Task, optimizer, scheduler, device: torch.device, voxel_size: float,
                 amp: bool = False, clip_grad_norm: float | None = None, net: torch.nn.Module | None = None):
        self.task = task
        self.net = task.net if net is None else net  # DDP-wrapped under torchrun
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.voxel_size = voxel_size
        self.amp = bool(amp) and device.type == "cuda"
        self.clip_grad_norm = clip_grad_norm
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)  # a no-op pass-through when disabled

    def forward_loss(self, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Voxelise the batch, run the net (autocast under AMP), the task's loss on float32."""
        vox = voxelize(batch["xyz"].to(self.device), batch["batch"].to(self.device), self.voxel_size)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.amp):
            out = self.net(vox, batch["feat"].to(self.device))
        return self.task.loss(out.float(), vox, batch, epoch)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()  # DDP: gradients averaged over the ranks here

    def update(self) -> float | None:
        """Unscale, measure (and clip) the gradient norm, SGD step, schedule step. Returns the
        norm before clipping (None when not finite: an AMP overflow skips the step)."""
        self.scaler.unscale_(self.optimizer)  # true gradients for the norm (a no-op without AMP)
        grad_norm = clip_gradients(self.task.model.parameters(), self.clip_grad_norm)  # the same on every rank
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return grad_norm if math.isfinite(grad_norm) else None  # strict JSON

    def __call__(self, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, float], float | None]:
        """One step; returns (loss, per-term floats, gradient norm)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, terms = self.forward_loss(batch, epoch)
        self.backward(loss)
        return loss, terms, self.update()


# ------------------------------------------------------------------------------ the loop
def run_loop(task: Task, lc: LoopConfig, dataset: ScanDataset, optimizer, scheduler, *, device: torch.device,
             env: DistEnv = DistEnv(), progress: bool = True, start_epoch: int = 0,
             last_good: tuple[str, int] | None = None, watch=None) -> LoopResult:
    """Train `task.model` from `start_epoch` to `lc.epochs` (see the module docstring).

    Rank 0 appends to `lc.out`/metrics.jsonl and writes the checkpoints; every rank returns the
    same result. Raises TrainingError at the first non-finite loss or weights, TrainingDiverged
    at a divergence with `stop_on_divergence` (nothing written for that epoch), and on Ctrl-C
    `Interrupted` naming the checkpoint to resume from (`lc.resumable`; else the
    KeyboardInterrupt itself).

    watch: rank 0's `tracking.RunWatch` (TensorBoard / wandb scalars, ETA, validation when due
    on the model as it is saved, after precise BatchNorm at the end, and `best.pt`); closed here."""
    main = env.is_main
    out = lc.out
    steps_per_epoch = math.ceil(len(dataset) / lc.batch_size)
    total = steps_per_epoch * lc.epochs
    run_steps = min(total, lc.max_steps or total)  # what this run does in all
    sampler = EpochSampler(len(dataset), seed=lc.seed, rank=env.rank, world_size=env.world_size,
                           tag_epoch=lc.workers > 0)
    loader = make_loader(dataset, sampler, lc.batch_size // env.world_size, lc.workers, device)
    net = task.net
    if env.distributed:
        # Every parameter reaches the loss (each term keeps a `feats.sum() * 0.0` graph), so DDP
        # needs no unused-parameter search. DDP's default buffer sync broadcasts rank 0's
        # BatchNorm statistics before every forward. device_ids=None: inputs are already on the
        # rank's device (DDP's input mover does not know Voxels).
        net = DistributedDataParallel(net, device_ids=None, find_unused_parameters=False)
    stepper = Stepper(task, optimizer, scheduler, device, lc.voxel_size, lc.amp, lc.clip_grad_norm, net=net)
    monitor = DivergenceMonitor(lc.divergence_window, lc.divergence_factor)
    result = LoopResult(steps=start_epoch * steps_per_epoch, last_good=last_good)
    eta = "?"  # the whole run's, from `watch`

    def kept() -> str:
        good = result.last_good
        return f"the last good checkpoint {good[0]} (epoch {good[1]}) is kept" if good else task.nothing_kept

    t0 = time.perf_counter()
    epoch = start_epoch
    mf = (out / "metrics.jsonl").open("a") if main else None
    try:
        for epoch in range(start_epoch, lc.epochs):
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            task.begin_epoch(epoch)
            bar = tqdm(loader, desc=f"{task.name} {epoch + 1}/{lc.epochs}", unit="step", disable=not (progress and main))
            epoch_losses = []
            for batch in bar:
                ts = time.perf_counter()
                loss, terms, grad_norm = stepper(batch, epoch)
                result.steps += 1
                step = result.steps
                keys = list(terms)  # the same keys on every rank
                sums = all_reduce_sum([float(loss.detach()), *(terms[k] for k in keys), len(batch["index"]),
                                       int(batch["xyz"].shape[0])], env, device)
                value = sums[0] / env.world_size
                terms = {k: v / env.world_size for k, v in zip(keys, sums[1:-2])}
                check_finite_loss(step, epoch + 1, value, terms, kept())  # the same values on every rank
                n_scans, n_points = int(sums[-2]), int(sums[-1])
                result.scans += n_scans
                dt = time.perf_counter() - ts
                epoch_losses.append(value)
                level = monitor.median
                diverged = monitor.update(value)  # the all-reduced loss: every rank decides alike
                lr = optimizer.param_groups[0]["lr"]
                row = dict(step=step, epoch=epoch + 1, loss=value, **terms, lr=lr, **task.row(optimizer),
                           grad_norm=grad_norm, points=n_points, seconds=dt, scans_per_s=n_scans / max(dt, 1e-9))
                if diverged:
                    row.update(diverged=True, loss_median=level)
                    if main:
                        log.warning("step %d: loss %.4g is above %g x the median %.4g of the last %d steps (divergence)",
                                    step, value, lc.divergence_factor, level, len(monitor.window))
                if mf is not None:
                    mf.write(json.dumps(row, allow_nan=False) + "\n")
                if watch is not None:
                    eta = watch.step(step, row)
                if diverged and lc.stop_on_divergence:
                    if mf is not None:
                        mf.flush()
                    raise TrainingDiverged(f"{out}: loss {value:.4g} at step {step} is above {lc.divergence_factor:g} x "
                                           f"the running median {level:.4g} (--stop-on-divergence): stopped; {kept()}")
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.4f}", eta=eta)
                if run_steps <= step < total:  # --max-steps
                    result.stopped = True
                    break
            if mf is not None:
                mf.flush()
            result.epoch_losses.append(float(np.mean(epoch_losses)))
            done = epoch + 1
            last = done == lc.epochs or result.stopped
            if last:
                final_batchnorm(task.model, dataset, lc, env, device, epoch)
            save = last or lc.save_every_epoch or lc.stop_on_divergence
            if save:
                check_finite_model(task.model, result.steps, done, kept())  # identical weights on every rank
            if main:
                if watch is not None:  # logs the epoch; validates when due
                    improved = watch.epoch_end(task.model, result.steps, done, last, result.epoch_losses[-1])
                else:
                    improved = False
                    log.info("epoch %d: mean loss %.4f", done, result.epoch_losses[-1])
                partial = result.steps if result.stopped and result.steps % steps_per_epoch else None
                extra = dict(step=result.steps, best=watch.best_state() if watch else None, partial_epoch=partial)
                if save:
                    paths = [out / "checkpoint.pt"] + ([out / f"checkpoint_epoch{done}.pt"] if lc.keep_checkpoints else [])
                    for path in paths:
                        task.save(path, done, optimizer, scheduler, extra)
                if improved:
                    if save:
                        copy_checkpoint(out / "checkpoint.pt", watch.best_path)
                    else:
                        task.save(watch.best_path, done, optimizer, scheduler, extra)
            if save:
                result.last_good = (str(out / "checkpoint.pt"), done)
            if result.stopped:
                if main:
                    log.info("stopped at --max-steps %d (step %d of %d)", lc.max_steps, result.steps, total)
                break
    except KeyboardInterrupt:
        if not lc.resumable:
            raise
        if result.last_good:
            hint = f"`--resume {result.last_good[0]}` continues from epoch {result.last_good[1]}"
        else:
            hint = "no checkpoint was written yet: start again (with --overwrite)"
        raise Interrupted(f"interrupted in epoch {epoch + 1} of {lc.epochs}; {hint}") from None
    finally:
        if mf is not None:
            mf.close()
        if watch is not None:
            watch.close()
    result.seconds = time.perf_counter() - t0
    result.divergences = monitor.events
    return result
