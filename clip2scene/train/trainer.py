"""Stage two: train the spconv student from the cache alone (no teacher on the device).

Losses (method.md section 4): SCR (paper Eq. 1, InfoNCE against the cached text embeddings with
MaskCLIP pseudo-labels on camera-visible points), SSR (Eqs. 3-4, spatial-temporal consistency in
0.1 m cells of the merged keyframe + sweeps, fusing cached pixel features and point features),
S3 (switchable self-training: from `switch_epoch` on, each labelled point's target is, with
probability 0.5, the network's own prediction), and the KL ablation. SGD with momentum, cosine
schedule over all steps. The loop itself (schedule, loader, step, metrics, checkpoints) is
`clip2scene.train.loop.run_loop`; this module supplies the `Distillation` task and the resume rules.
Each epoch writes `checkpoint.pt` (model + optimiser + scheduler + config + teacher fingerprint;
also `checkpoint_epoch{K}.pt` with `keep_checkpoints`) and appends per-step metrics to
`metrics.jsonl` in the run folder, and the same scalars to TensorBoard event files there (and wandb
with `wandb`); `val_every` validates on `val_split` and keeps `best.pt` (train/tracking.py).
`max_steps` stops a smoke run early (the schedule stays the full run's).

Reproducibility: the data order (`EpochSampler`), the augmentation (ScanDataset) and the S3 draws
depend only on (seed, epoch, scan), so `resume` from the checkpoint of epoch k continues exactly
as the uninterrupted run (model, SGD momentum, LR schedule are in the checkpoint), and the draws
do not depend on how many processes train.

Multi-process (DDP): launched by torchrun, `train` joins the process group (see
`clip2scene.train.distributed`), shards the scans over the ranks, and averages gradients.
`batch_size` is the global batch: each of the N ranks processes batch_size / N scans per step,
and each rank's loss is the mean over its own sub-batch (DDP averages the N gradients;
BatchNorm normalises each sub-batch on its own rank). Only rank 0 writes the run folder and
logs; every rank returns the same summary.

    from clip2scene.train.trainer import TrainConfig, train
    summary = train(TrainConfig(cache="cache.zarr", out="runs/exp1", epochs=20))

CLI: `clip2scene train --cache ./zarr --out runs/NAME`;
`torchrun --nproc-per-node 2 -m clip2scene.cli train --cache ./zarr --out runs/NAME`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Collection

import numpy as np
import torch

from clip2scene.devices import resolve_device
from clip2scene.errors import ConfigError
from clip2scene.storage import Cache, open_cache
from clip2scene.storage.sampling import VIEW_RULES
from clip2scene.train.checks import refuse_existing_run, remove_run
from clip2scene.validation import (CLIP_HELP, DIV_FACTOR_HELP, DIV_WINDOW_HELP, SCALING_HELP, STOP_HELP, STORAGE_HELP,
                                   WARMUP_HELP, check_bool, check_choice, check_float, check_installed, check_int,
                                   check_text, opt, option, paths_to_text)
from clip2scene.train.checkpoint import check_compatible, load_checkpoint, model_config_of, save_checkpoint
from clip2scene.train.data import ScanDataset
from clip2scene.train.distributed import DistEnv, broadcast_object, detect_env, process_group
from clip2scene.train.evaluate import limit_scans
from clip2scene.train.loop import LoopConfig, StepForward, build_optimizer, run_loop, schedule_info
from clip2scene.train.loss import kl_loss, scr_loss, ssr_loss, switch_targets, text_logits
from clip2scene.train.nets import ModelConfig, build_model, count_parameters
from clip2scene.train.stability import validate as validate_guard_rails
from clip2scene.train.tracking import VAL_FILE, RunWatch, Validator
from clip2scene.train.voxelize import voxelize

log = logging.getLogger(__name__)

SELF_TRAINING = ("point", "batch", "off")  # S3 switch modes (see `_switch`)


@dataclass(frozen=True)
class TrainConfig:
    cache: str = opt(help="Cache written by precompute (folder or URL).")
    out: str = opt(help="Run folder (checkpoint.pt, metrics.jsonl, config.json).")
    split: str = opt("train", "Cached split to train on.")
    epochs: int = opt(20, "Epochs (passes over the training scans).")
    batch_size: int = opt(4, "Scans per step (global: split evenly over the ranks under torchrun).")
    lr: float = opt(0.1, "SGD learning rate at --reference-batch (momentum 0.9, weight decay 1e-4, cosine schedule).")
    momentum: float = opt(0.9, "SGD momentum.", cli=False)
    weight_decay: float = opt(1e-4, "SGD weight decay.", cli=False)
    tau: float = opt(0.5, "SCR temperature.")
    voxel_size: float | None = opt(None, "Voxel size in metres (default: the dataset's, 0.1 outdoor, 0.05 ScanNet).")
    augment: bool = opt(True, "Random z-rotation and flips.")
    device: str = opt("cpu", "cpu or cuda[:i].")
    workers: int = opt(0, "DataLoader workers (spawned processes).")
    seed: int = opt(0, "Random seed (model init, shuffling, augmentation).")
    resume: str | None = opt(None, "Checkpoint to continue from: options not given are the run's own (model, lr, ...); "
                                   "a larger --epochs extends the run.")
    precise_bn_batches: int = opt(16, "Re-estimate BatchNorm statistics on N batches at the end (0 = off).")
    keep_checkpoints: bool = opt(False, "Also keep checkpoint_epochK.pt of every epoch (resume points).")
    storage_options: dict = opt(default_factory=dict, help=STORAGE_HELP, flag="--storage-option")
    amp: bool = opt(True, "Mixed precision (float16 autocast + gradient scaling) on CUDA; ignored on CPU.", cli=False)
    sweeps: int | None = opt(None, "Use the first K cached lidar frames per scan (default all).")
    scr_weight: float = opt(1.0, "SCR loss weight (0 = off).")
    ssr_weight: float = opt(1.0, "SSR loss weight (0 = off).")
    kl_weight: float = opt(0.0, "KL loss weight (the paper's failing ablation).")
    ssr_lambda: float = opt(1.0, "SSR attention temperature lambda.")
    ssr_grid: float = opt(0.1, "SSR grid cell in metres.")
    self_training: str = opt("point", "S3 switch: point (paper), batch (released code) or off.")
    switch_epoch: int | None = opt(None, "First epoch (0-based) of S3 switching (default epochs // 2).")
    switch_prob: float = opt(0.5, "S3 probability of the network's own prediction.")
    model: ModelConfig = opt(default_factory=lambda: ModelConfig(arch="spvcnn"), help="Student architecture.")
    views: str = opt("border", "Teacher view of a point seen by several cameras: border (farthest from the image "
                               "border) or mean (average over all, OpenScene-style).")
    overwrite: bool = opt(False, "Replace a previous run in --out (its run files are removed).")
    # guard rails (train/stability.py); `lr` is the rate at `reference_batch`, scaled by `lr_scaling`
    warmup_steps: int | None = opt(None, WARMUP_HELP)
    clip_grad_norm: float | None = opt(None, CLIP_HELP)
    lr_scaling: str = opt("linear", SCALING_HELP)
    reference_batch: int = opt(4, "The recipe's global batch that --lr is given for (method.md section 5: "
                                  "pre-training batch 4).")
    divergence_factor: float = opt(10.0, DIV_FACTOR_HELP)
    divergence_window: int = opt(50, DIV_WINDOW_HELP)
    stop_on_divergence: bool = opt(False, STOP_HELP)
    # watching a run (train/tracking.py); TensorBoard event files are always written to `out`
    val_every: int = opt(0, "Validate every N epochs and after the last one, keeping best.pt by the score (0 = off).")
    val_split: str = opt("val", "Cached split to validate on: ground-truth mIoU where the cache has labels, else "
                                "agreement with the teacher.")
    max_steps: int | None = opt(None, "Stop after this many optimiser steps of the run (a smoke run; the schedule "
                                      "stays the full run's).")
    wandb: bool = opt(False, "Also log to Weights & Biases (the wandb package must be installed; project from "
                             "WANDB_PROJECT, default clip2scene).")
    limit: int | None = opt(None, "Train on only the first N scans of the split, in cache order (a smoke run).")


    def __post_init__(self) -> None:
        """Every option's valid range, checked before any work: ConfigError naming the option
        (as the CLI spells it) and the value. What depends on the cache (--sweeps beyond the
        cached frames) or the environment (CUDA, torchrun size) is checked when they are known."""
        paths_to_text(self, "cache", "out", "resume")
        check_text("cache", self.cache)
        check_text("out", self.out)
        check_text("split", self.split)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_float("lr", self.lr, 0.0, low_open=True)
        check_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("tau", self.tau, 0.0, low_open=True)
        check_float("voxel_size", self.voxel_size, 0.0, low_open=True, allow_none=True)
        check_bool("augment", self.augment)
        check_text("device", self.device)
        check_int("workers", self.workers, 0)
        check_int("seed", self.seed, 0)
        check_text("resume", self.resume, allow_none=True)
        check_int("precise_bn_batches", self.precise_bn_batches, 0)
        check_bool("keep_checkpoints", self.keep_checkpoints)
        if not isinstance(self.storage_options, dict):
            raise ConfigError(f"storage_options {self.storage_options!r}: expected a dict")
        check_bool("amp", self.amp)
        check_int("sweeps", self.sweeps, 1, allow_none=True)
        for name in ("scr_weight", "ssr_weight", "kl_weight"):
            check_float(name, getattr(self, name), 0.0)
        if not (self.scr_weight or self.ssr_weight or self.kl_weight):
            raise ConfigError("--scr-weight, --ssr-weight and --kl-weight are all 0: nothing to train")
        check_float("ssr_lambda", self.ssr_lambda, 0.0, low_open=True)
        check_float("ssr_grid", self.ssr_grid, 0.0, low_open=True)
        check_choice("self_training", self.self_training, SELF_TRAINING)
        check_choice("views", self.views, VIEW_RULES)
        check_int("switch_epoch", self.switch_epoch, 0, allow_none=True)
        check_float("switch_prob", self.switch_prob, 0.0, 1.0)
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"model {self.model!r}: expected a ModelConfig")
        check_bool("overwrite", self.overwrite)
        if self.overwrite and self.resume and Path(self.resume).resolve().parent == Path(self.out).resolve():
            raise ConfigError(f"--overwrite would delete {self.resume}, the checkpoint --resume continues from: "
                              "leave --overwrite out to continue the run in place")
        _validate_guard_rails(self)
        check_int("val_every", self.val_every, 0, note=" (0 = off)")
        check_text("val_split", self.val_split)
        check_int("max_steps", self.max_steps, 1, allow_none=True)
        check_int("limit", self.limit, 1, allow_none=True)
        check_installed("wandb", self.wandb, "wandb")


def _validate_guard_rails(config) -> None:
    """Validate the guard-rail options of a TrainConfig / FinetuneConfig (one-line ConfigError)."""
    validate_guard_rails(warmup_steps=config.warmup_steps, clip_grad_norm=config.clip_grad_norm,
                         lr_scaling=config.lr_scaling, reference_batch=config.reference_batch,
                         divergence_factor=config.divergence_factor, divergence_window=config.divergence_window)


def _scan_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """S3 generator of one scan in one epoch: independent of batch composition and rank count."""
    state = np.random.SeedSequence([seed, epoch, index, 7919]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _switch(config: TrainConfig, target: torch.Tensor, predicted: torch.Tensor, batch: dict, epoch: int,
            generator: torch.Generator) -> torch.Tensor:
    """S3 targets. "point": each scan's coin flips come from its own (seed, epoch, scan)
    generator; "batch": one coin per step from `generator` (per-epoch, the same on every rank)."""
    if config.self_training != "point":
        return switch_targets(target, predicted, config.self_training, config.switch_prob, generator)
    counts = torch.bincount(batch["batch"], minlength=len(batch["index"])).tolist()
    parts = [switch_targets(t, p, "point", config.switch_prob, _scan_generator(config.seed, epoch, int(i)))
             for t, p, i in zip(target.split(counts), predicted.split(counts), batch["index"].tolist())]
    return torch.cat(parts)


def compute_loss(config: TrainConfig, feats: torch.Tensor, vox, batch: dict, text: torch.Tensor,
                 epoch: int, generator: torch.Generator, per_voxel: bool = False) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the configured losses for one batch; returns (loss, per-term floats).

    feats: (N, D) per-point student outputs, or with `per_voxel` (V, D) per-voxel ones
    (`forward_voxels`; point i has feats[vox.point2voxel[i]]): both give the same losses
    (tests/train/test_loss.py), the second without gathering (N, D). `generator` drives the
    "batch" S3 coin; "point" draws are keyed per scan (`_scan_generator`)."""
    device = feats.device
    target = batch["target"].to(device)
    p2v = vox.point2voxel if per_voxel else None
    switch_epoch = config.epochs // 2 if config.switch_epoch is None else config.switch_epoch
    terms: dict[str, float] = {}
    if config.self_training != "off" and epoch >= switch_epoch:
        with torch.no_grad():
            predicted = text_logits(feats.detach(), text).argmax(dim=1)
            predicted = predicted[p2v] if per_voxel else predicted
        switched = _switch(config, target, predicted, batch, epoch, generator)
        terms["switched"] = float(((switched != target) & (target >= 0)).float().mean())
        target = switched
    loss = feats.sum() * 0.0
    if config.scr_weight:
        scr = scr_loss(feats, text, target, config.tau, point2voxel=p2v)
        terms["scr"] = float(scr.detach())
        loss = loss + config.scr_weight * scr
    if config.ssr_weight:
        if abs(config.ssr_grid - config.voxel_size) < 1e-9:
            grid, cells = vox.point2voxel, vox.num_voxels
        else:
            g = voxelize(batch["xyz"].to(device), batch["batch"].to(device), config.ssr_grid)
            grid, cells = g.point2voxel, g.num_voxels
        ssr = ssr_loss(feats, grid, cells, target, batch["pair_features"].to(device),
                       batch["pair_point"].to(device), text, config.ssr_lambda, point2voxel=p2v)
        terms["ssr"] = float(ssr.detach())
        loss = loss + config.ssr_weight * ssr
    if config.kl_weight:
        kl = kl_loss(feats, text, batch["pair_logits"].to(device), batch["pair_point"].to(device), config.tau,
                     point2voxel=p2v)
        terms["kl"] = float(kl.detach())
        loss = loss + config.kl_weight * kl
    return loss, terms


def _train_config_dict(config: TrainConfig) -> dict:
    d = asdict(config)
    d["model"]["channels"] = list(d["model"]["channels"])
    return d


# Options that may differ between a run and its resume: where and how it runs, not what it
# computes. `epochs` may grow (the run is extended; see `_continue_schedule`). wandb and --max-steps
# (which only cuts the run short: the schedule is the full run's) change no step.
RESUME_FREE = ("cache", "out", "resume", "epochs", "device", "workers", "keep_checkpoints", "amp",
               "storage_options", "precise_bn_batches", "overwrite", "divergence_factor", "divergence_window",
               "stop_on_divergence", "max_steps", "wandb")
# Options that may differ too but, when not given, continue as the run had them (validation:
# best.pt stays comparable across the resume).
RESUME_INHERITED = ("val_every", "val_split")
_MODEL_FIELDS = ("arch", "channels", "blocks_per_stage")  # what defines the student (in/out come from the cache)


def resumed_config(config: TrainConfig, ckpt: dict, given: Collection[str] | None = None,
                   path: str | Path = "checkpoint") -> TrainConfig:
    """The config that continues the run saved in `ckpt` (a loaded checkpoint).

    Every run-defining option (all but RESUME_FREE) and the model (arch, channels,
    blocks_per_stage) that is not `given` takes the saved run's value; a given one that differs
    is a ConfigError naming the option; RESUME_INHERITED options not given take the saved run's
    value, given ones are used as they are. `given` holds TrainConfig field names and "arch" /
    "channels" / "blocks_per_stage" (what the user typed); None (library use) counts every
    option whose value is not None as given. `epochs` not given: the saved run's."""
    if ckpt.get("kind") == "segmenter":
        raise ConfigError(f"{path} is a fine-tuned model: --resume takes a checkpoint of `clip2scene train`")
    partial = (ckpt.get("extra") or {}).get("partial_epoch")
    if partial:
        raise ConfigError(f"{path} was written by a --max-steps run in the middle of epoch {ckpt.get('epoch')} "
                          f"(step {partial}): it cannot be resumed; start the run again")
    saved = dict(ckpt.get("train_config") or {})
    changes: dict = {}

    def is_given(name: str, value) -> bool:
        return value is not None if given is None else name in given

    for f in fields(TrainConfig):
        name = f.name
        if name == "model" or name not in saved or (name in RESUME_FREE and name != "epochs"):
            continue
        value = getattr(config, name)
        if not is_given(name, value):
            changes[name] = saved[name]
        elif name in RESUME_INHERITED:
            continue
        elif name != "epochs" and value != saved[name]:
            raise ConfigError(f"{option(name)} {value!r} differs from the run being resumed ({path} has "
                              f"{saved[name]!r}): leave {option(name)} out to continue that run")
    theirs = model_config_of(ckpt)
    for name in _MODEL_FIELDS:
        value, old = getattr(config.model, name), getattr(theirs, name)
        if (given is None or name in given) and value != old:
            shown = ",".join(map(str, value)) if name == "channels" else value
            was = ",".join(map(str, old)) if name == "channels" else old
            raise ConfigError(f"{option(name)} {shown} differs from the run being resumed ({path} has {was}): "
                              f"leave {option(name)} out to continue that run")
    changes["model"] = replace(config.model, **{k: getattr(theirs, k) for k in _MODEL_FIELDS})
    return replace(config, **changes)


def _continue_schedule(optimizer, scheduler, saved_epochs: int, epochs: int) -> str | None:
    """After loading the optimiser and scheduler of a resumed run: set the learning rate of the
    next step from the schedule of *this* run. Unchanged `epochs`: exactly the saved rate (the
    resume equals the uninterrupted run). More epochs: the cosine is stretched over the new
    total, so the rate jumps to the stretched curve's value; returns a line saying so."""
    step = scheduler.last_epoch
    before = optimizer.param_groups[0]["lr"]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(step)  # LambdaLR's own formula: bitwise the saved rate when unchanged
    after = optimizer.param_groups[0]["lr"]
    if epochs == saved_epochs:
        return None
    return (f"extended from {saved_epochs} to {epochs} epochs: the cosine schedule now runs over {epochs} epochs, "
            f"so the learning rate continues at {after:.4g} (it was {before:.4g} at step {step} on the "
            f"{saved_epochs}-epoch schedule)")


def _truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the lines of metrics.jsonl up to `last_step` (a run resumed in place continues after its
    checkpoint; steps of an interrupted epoch would otherwise appear twice). Returns lines dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a torn last line of a killed run
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)
    return len(lines) - len(keep)


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train per `config`; returns a summary dict (losses, timings, parameter count, paths).

    Refuses an `out` that already holds a run unless `config.overwrite` or `config.resume` is a
    checkpoint of that run. A resume of a finished run returns at once with
    `nothing_to_do=True`. Raises TrainingError at the first non-finite loss (no checkpoint
    written for that epoch) and `Interrupted` (a KeyboardInterrupt naming the checkpoint to
    resume from) on Ctrl-C.

    Under torchrun (WORLD_SIZE > 1) every rank calls this with the same config: DDP training
    with `batch_size` as the global batch (see the module docstring); all ranks return rank 0's
    summary and the process group is destroyed on return."""
    device = resolve_device(config.device)
    env = detect_env()
    if config.batch_size % env.world_size:
        raise ConfigError(f"--batch-size {config.batch_size} is the global batch: it must be a multiple of "
                          f"the {env.world_size} torchrun processes")
    if not config.overwrite:
        refuse_existing_run(config.out, config.resume)
    with process_group(env, device) as rank_device:
        return _train(config, env, rank_device, progress)


def _train(config: TrainConfig, env: DistEnv, device: torch.device, progress: bool) -> dict:
    main = env.is_main
    out = Path(config.out)
    ckpt = None
    start_epoch = 0
    best_state = None  # the resumed run's BestKeeper state
    if config.resume:
        ckpt = load_checkpoint(config.resume)  # refuses a non-finite checkpoint
        config = resumed_config(config, ckpt, None, config.resume)
        start_epoch = int(ckpt["epoch"])
        best_state = (ckpt.get("extra") or {}).get("best")
        if start_epoch > config.epochs:
            raise ConfigError(f"--epochs {config.epochs}: {config.resume} is already at epoch {start_epoch}")
        if start_epoch == config.epochs:
            done = dict(run=str(out), checkpoint=str(config.resume), nothing_to_do=True, epoch=start_epoch,
                        epochs=config.epochs, epoch_losses=[], steps=0, processes=env.world_size)
            return broadcast_object(done, env)
    cache = open_cache(config.cache, config.storage_options)
    if not cache.has_teacher:
        raise ConfigError(f"cache {cache.path} has no teacher outputs (built with --clip-model none): "
                          "distillation needs them; use `clip2scene finetune` on it")
    cached_sweeps = int(cache.meta.get("sweeps") or 1)
    if config.sweeps is not None and config.sweeps > cached_sweeps:
        raise ConfigError(f"--sweeps {config.sweeps}: cache {cache.path} holds {cached_sweeps} lidar frame(s) per scan")
    config = replace(config, voxel_size=config.voxel_size or cache.voxel_size,
                     switch_epoch=config.epochs // 2 if config.switch_epoch is None else config.switch_epoch)
    indices = cache.indices(config.split)
    if len(indices) == 0:
        counts = ", ".join(f"{k}={int((cache.split == k).sum())}" for k in sorted(set(cache.split.tolist())))
        raise ConfigError(f"cache {cache.path} has no scans in split {config.split!r} (it has {counts})")
    indices = limit_scans(indices, config.limit)
    model_config = replace(config.model, out_channels=cache.text_embeddings.shape[1],
                           in_channels=len(cache.point_features))

    torch.manual_seed(config.seed)
    model = build_model(model_config, device)
    steps_per_epoch = math.ceil(len(indices) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None and config.max_steps <= start_epoch * steps_per_epoch:
        raise ConfigError(f"--max-steps {config.max_steps}: {config.resume} is already at step "
                          f"{start_epoch * steps_per_epoch}")
    optimizer, scheduler = build_optimizer(model, config, total_steps, steps_per_epoch)
    schedule = schedule_info(config, steps_per_epoch, total_steps)
    schedule_note = None
    last_good = None  # (checkpoint path, epoch) that --resume would continue from
    if ckpt is not None:
        check_compatible(ckpt, cache, config.resume)
        model.load_state_dict(ckpt["state_dict"])
        if ckpt.get("optimizer"):
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
            schedule_note = _continue_schedule(optimizer, scheduler, int(ckpt["train_config"]["epochs"]), config.epochs)
        last_good = (config.resume, start_epoch)
        del ckpt
        if main:
            log.info("resumed from epoch %d (%s)", start_epoch, config.resume)
            if schedule_note:
                log.info("%s", schedule_note)

    text = torch.from_numpy(cache.text_embeddings).to(device)
    validator = (Validator(cache, config.val_split, config.val_every, "distill", config.voxel_size, device, text=text,
                           views=config.views) if config.val_every else None)  # refuses an empty split here
    dataset = ScanDataset(cache, indices, augment=config.augment, seed=config.seed,
                          features=bool(config.ssr_weight), sweeps=config.sweeps, views=config.views)
    metrics_path = out / "metrics.jsonl"
    params = count_parameters(model)
    step = start_epoch * steps_per_epoch
    run_steps = min(total_steps, config.max_steps or total_steps)  # what this run will do in all
    watch = None  # rank 0's tracking hooks (train/tracking.py)
    if main:
        if config.overwrite:
            removed = remove_run(out)
            if removed:
                log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), out)
        elif config.resume and Path(config.resume).resolve().parent == out.resolve():
            dropped = _truncate_metrics(metrics_path, start_epoch * steps_per_epoch)
            if dropped:
                log.info("dropped %d metrics lines after step %d (the interrupted part of the run)", dropped, step)
            _truncate_metrics(out / VAL_FILE, step)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dict(_train_config_dict(config), schedule=schedule), indent=2))
        log.info("training %s (%.2fM params) on %d scans, %d steps, %d process(es)", model_config.arch,
                 params / 1e6, len(indices), total_steps, env.world_size)
        log.info("lr %g at reference batch %d x %.4g (%s scaling to batch %d) = %g; warm-up %d steps; clip %s",
                 config.lr, config.reference_batch, schedule["lr_scale"], config.lr_scaling, config.batch_size,
                 schedule["effective_lr"], schedule["warmup_steps"], config.clip_grad_norm or "off")
        watch = RunWatch(out, _train_config_dict(config), wandb=config.wandb, validator=validator,
                         total_steps=run_steps, start_step=step, best_state=best_state)

    task = Distillation(config, model, model_config, text, cache)
    run = run_loop(task, LoopConfig.of(config), dataset, optimizer, scheduler, device=device, env=env,
                   progress=progress, start_epoch=start_epoch, last_good=last_good, watch=watch)
    summary = dict(
        run=str(out),
        checkpoint=str(out / "checkpoint.pt"),
        arch=model_config.arch,
        parameters=params,
        train_scans=int(len(indices)),
        epochs=config.epochs,
        start_epoch=start_epoch,
        steps=run.steps,
        epoch_losses=run.epoch_losses,
        seconds=run.seconds,
        scans_per_second=run.scans / max(run.seconds, 1e-9),
        device=str(device),
        processes=env.world_size,
        schedule=schedule,
        divergences=run.divergences,
        teacher_weights_sha256=cache.fingerprint.get("weights_sha256"),
        schedule_note=schedule_note,
        stopped_at_max_steps=run.stopped,
        val=watch.last_val if watch else None,
        best=watch.best_state() if watch else None,
    )
    return broadcast_object(summary, env)


class Distillation:
    """The training task of `train` (a `clip2scene.train.loop.Task`): the student's per-voxel
    text-space features and `compute_loss` (SCR / SSR / KL, S3 switching); checkpoints with the
    teacher fingerprint, optimiser and scheduler (resumable)."""

    name = "epoch"
    nothing_kept = "no checkpoint was written"

    def __init__(self, config: TrainConfig, model: torch.nn.Module, model_config: ModelConfig,
                 text: torch.Tensor, cache: Cache | None = None):
        self.config = config  # voxel_size and switch_epoch resolved
        self.model = model
        self.net = StepForward(model, "forward_voxels")  # per-voxel features: the losses gather nothing
        self.model_config = model_config
        self.text = text  # (C, D) float32 on the model's device
        self.cache = cache  # for the checkpoint's teacher fingerprint and classes
        self.generator = torch.Generator()

    def begin_epoch(self, epoch: int) -> None:
        self.model.train()
        self.generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch + 7919)  # S3 "batch" coins

    def loss(self, out: torch.Tensor, vox, batch: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        return compute_loss(self.config, out, vox, batch, self.text, epoch, self.generator, per_voxel=True)

    def save(self, path: Path, epoch: int, optimizer, scheduler, extra: dict) -> None:
        save_checkpoint(path, model=self.model, model_config=self.model_config,
                        train_config=_train_config_dict(self.config), cache=self.cache, epoch=epoch,
                        optimizer=optimizer, scheduler=scheduler, extra=extra)

    def row(self, optimizer) -> dict:
        return {}
