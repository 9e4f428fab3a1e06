"""Stage two: train the spconv student from the cache alone (no teacher on the device).

Losses (method.md section 4): SCR (paper Eq. 1, InfoNCE against the cached text embeddings with
MaskCLIP pseudo-labels on camera-visible points), SSR (Eqs. 3-4, spatial-temporal consistency in
0.1 m cells of the merged keyframe + sweeps, fusing cached pixel features and point features),
S3 (switchable self-training: from `switch_epoch` on, each labelled point's target is, with
probability 0.5, the network's own prediction), and the KL ablation. SGD with momentum, cosine
schedule over all steps.
Each epoch writes `checkpoint.pt` (model + optimiser + scheduler + config + teacher fingerprint;
also `checkpoint_epoch{K}.pt` with `keep_checkpoints`) and appends per-step metrics to
`metrics.jsonl` in the run folder.

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
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clip2scene.devices import resolve_device
from clip2scene.errors import ConfigError
from clip2scene.runtime import worker_init
from clip2scene.storage import Cache, open_cache
from clip2scene.train.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from clip2scene.train.data import EpochSampler, ScanDataset, collate
from clip2scene.train.distributed import (DistEnv, all_reduce_sum, broadcast_buffers, broadcast_object,
                                          detect_env, process_group)
from clip2scene.train.loss import kl_loss, scr_loss, ssr_loss, switch_targets, text_logits
from clip2scene.train.model import ModelConfig, build_model, count_parameters
from clip2scene.train.stability import (DivergenceMonitor, TrainingDiverged, clip_gradients, lr_scale,
                                        resolve_warmup, validate as validate_guard_rails, warmup_cosine)
from clip2scene.train.voxelize import voxelize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    cache: str  # cache folder written by `clip2scene precompute`
    out: str  # run folder: checkpoint.pt, metrics.jsonl, config.json
    split: str = "train"  # which cached scans to train on
    epochs: int = 20  # passes over the training scans
    batch_size: int = 4  # scans per step (global: split evenly over the ranks under torchrun)
    lr: float = 0.1  # SGD learning rate (cosine-annealed to 0 over all steps)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    tau: float = 0.5  # SCR temperature
    voxel_size: float | None = None  # metres; None = the cache's dataset default (0.1 outdoor, 0.05 ScanNet)
    augment: bool = True  # random z-rotation and x/y flips
    device: str = "cpu"  # "cpu" or "cuda[:i]"
    workers: int = 0  # DataLoader worker processes
    seed: int = 0  # model init, shuffling and augmentation
    resume: str | None = None  # checkpoint to continue from (must match the cache's teacher)
    precise_bn_batches: int = 16  # after the last epoch, re-estimate BatchNorm statistics on this many batches (0 = off)
    keep_checkpoints: bool = False  # also keep checkpoint_epoch{K}.pt of every epoch (resume points)
    storage_options: dict = field(default_factory=dict)  # fsspec options when `cache` is a URL (s3://...)
    amp: bool = True  # mixed precision (float16 autocast + gradient scaling) on CUDA; ignored on CPU
    sweeps: int | None = None  # use the first K cached lidar frames per scan (None = all cached)
    scr_weight: float = 1.0  # weight of SCR (0 = off)
    ssr_weight: float = 1.0  # weight of SSR (0 = off)
    kl_weight: float = 0.0  # weight of the KL ablation loss (0 = off)
    ssr_lambda: float = 1.0  # SSR attention temperature lambda
    ssr_grid: float = 0.1  # SSR cell size in metres
    self_training: str = "point"  # S3 switch: "point" (paper), "batch" (released code) or "off"
    switch_epoch: int | None = None  # first epoch (0-based) with S3 switching; None = epochs // 2
    switch_prob: float = 0.5  # probability of using the network's own prediction
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="spvcnn"))  # student architecture
    # guard rails (train/stability.py); `lr` is the rate at `reference_batch`, scaled by `lr_scaling`
    warmup_steps: int | None = None  # linear warm-up steps (None = auto: half the first epoch, <= 300; 0 = off)
    clip_grad_norm: float | None = None  # clip the total gradient L2 norm to this (None = off; the norm is logged anyway)
    lr_scaling: str = "linear"  # lr x batch_size / reference_batch: linear, sqrt or none
    reference_batch: int = 4  # the recipe's global batch (method.md section 5: pre-training batch 4)
    divergence_factor: float = 10.0  # a step's loss above this x the running median is a divergence
    divergence_window: int = 50  # steps in the running median
    stop_on_divergence: bool = False  # stop at the first divergence, keeping the last epoch's checkpoint

    def __post_init__(self):
        _validate_guard_rails(self)


def _validate_guard_rails(config) -> None:
    """Validate the guard-rail options of a TrainConfig / FinetuneConfig (one-line ConfigError)."""
    validate_guard_rails(warmup_steps=config.warmup_steps, clip_grad_norm=config.clip_grad_norm,
                         lr_scaling=config.lr_scaling, reference_batch=config.reference_batch,
                         divergence_factor=config.divergence_factor, divergence_window=config.divergence_window)


def forward_points(model: torch.nn.Module, batch: dict, voxel_size: float, device: torch.device,
                   return_voxels: bool = False):
    """Run the student on a collated batch; returns per-point features (N, D) on `device`
    (and the Voxels when `return_voxels`)."""
    xyz = batch["xyz"].to(device)
    vox = voxelize(xyz, batch["batch"].to(device), voxel_size)
    out = model.forward_points(vox, batch["feat"].to(device))
    return (out, vox) if return_voxels else out


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


def _train_config_dict(config: TrainConfig) -> dict:
    d = asdict(config)
    d["model"]["channels"] = list(d["model"]["channels"])
    return d


class _VoxelForward(torch.nn.Module):
    """`forward(vox, feat)` = `net.forward_voxels(vox, feat)`: DDP only hooks `forward`."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, vox, feat: torch.Tensor) -> torch.Tensor:
        return self.net.forward_voxels(vox, feat)


def schedule_info(config, steps_per_epoch: int, total_steps: int) -> dict:
    """The learning-rate schedule a TrainConfig / FinetuneConfig resolves to (config.json, logs)."""
    scale = lr_scale(config.batch_size, config.reference_batch, config.lr_scaling)
    return dict(lr=config.lr, lr_scale=scale, effective_lr=config.lr * scale, batch_size=config.batch_size,
                reference_batch=config.reference_batch, lr_scaling=config.lr_scaling,
                warmup_steps=resolve_warmup(config.warmup_steps, steps_per_epoch), total_steps=total_steps,
                steps_per_epoch=steps_per_epoch, clip_grad_norm=config.clip_grad_norm)


def build_optimizer(model: torch.nn.Module, config: TrainConfig, total_steps: int, steps_per_epoch: int | None = None):
    """SGD with momentum and weight decay at the batch-scaled learning rate (`schedule_info`),
    linear warm-up then the cosine schedule to 0 over `total_steps` optimiser steps; returns
    (optimizer, scheduler)."""
    info = schedule_info(config, steps_per_epoch or total_steps, total_steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=info["effective_lr"], momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, info["warmup_steps"]))
    return optimizer, scheduler


def _loader(dataset: ScanDataset, sampler: EpochSampler, batch_size: int, config: TrainConfig,
            device: torch.device) -> DataLoader:
    """Workers (spawned) persist across epochs and prefetch 4 batches each; the sampler tags every
    item with its epoch so their dataset copies augment by the right one."""
    workers = config.workers > 0
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=config.workers, multiprocessing_context="spawn" if workers else None,
                      persistent_workers=workers, prefetch_factor=4 if workers else None,
                      pin_memory=device.type == "cuda", worker_init_fn=worker_init if workers else None)


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train per `config`; returns a summary dict (losses, timings, parameter count, paths).

    Under torchrun (WORLD_SIZE > 1) every rank calls this with the same config: DDP training
    with `batch_size` as the global batch (see the module docstring); all ranks return rank 0's
    summary and the process group is destroyed on return."""
    device = resolve_device(config.device)
    if config.epochs < 1 or config.batch_size < 1:
        raise ConfigError(f"--epochs and --batch-size must be >= 1 (got {config.epochs}, {config.batch_size})")
    env = detect_env()
    if config.batch_size % env.world_size:
        raise ConfigError(f"--batch-size {config.batch_size} is the global batch: it must be a multiple of "
                          f"the {env.world_size} torchrun processes")
    with process_group(env, device) as rank_device:
        return _train(config, env, rank_device, progress)


def _train(config: TrainConfig, env: DistEnv, device: torch.device, progress: bool) -> dict:
    main = env.is_main
    cache = open_cache(config.cache, config.storage_options)
    if not cache.has_teacher:
        raise ConfigError(f"cache {cache.path} has no teacher outputs (built with --clip-model none): "
                          "distillation needs them; use `clip2scene finetune` on it")
    if config.voxel_size is None:
        config = replace(config, voxel_size=cache.voxel_size)
    indices = cache.indices(config.split)
    if len(indices) == 0:
        counts = ", ".join(f"{k}={int((cache.split == k).sum())}" for k in sorted(set(cache.split.tolist())))
        raise ConfigError(f"cache {cache.path} has no scans in split {config.split!r} (it has {counts})")
    model_config = replace(config.model, out_channels=cache.text_embeddings.shape[1],
                           in_channels=len(cache.point_features))

    torch.manual_seed(config.seed)
    model = build_model(model_config, device)
    steps_per_epoch = math.ceil(len(indices) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer, scheduler = build_optimizer(model, config, total_steps, steps_per_epoch)
    schedule = schedule_info(config, steps_per_epoch, total_steps)
    start_epoch = 0
    if config.resume:
        ckpt = load_checkpoint(config.resume)
        check_compatible(ckpt, cache, config.resume)
        model.load_state_dict(ckpt["state_dict"])
        if ckpt.get("optimizer"):
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"])
        if main:
            log.info("resumed from %s at epoch %d", config.resume, start_epoch)

    text = torch.from_numpy(cache.text_embeddings).to(device)
    if config.self_training not in ("point", "batch", "off"):
        raise ConfigError(f"--self-training {config.self_training!r}: expected point, batch or off")
    if not (config.scr_weight or config.ssr_weight or config.kl_weight):
        raise ConfigError("all loss weights are 0: nothing to train")
    dataset = ScanDataset(cache, indices, augment=config.augment, seed=config.seed,
                          features=bool(config.ssr_weight), sweeps=config.sweeps)
    sampler = EpochSampler(len(dataset), seed=config.seed, rank=env.rank, world_size=env.world_size,
                           tag_epoch=config.workers > 0)
    loader = _loader(dataset, sampler, config.batch_size // env.world_size, config, device)
    step_model: torch.nn.Module = _VoxelForward(model)
    if env.distributed:
        # Every parameter reaches the loss (each term keeps a `feats.sum() * 0.0` graph), so DDP
        # needs no unused-parameter search. DDP's default buffer sync broadcasts rank 0's
        # BatchNorm statistics before every forward. device_ids=None: inputs are already on the
        # rank's device (DDP's input mover does not know Voxels).
        step_model = DistributedDataParallel(step_model, device_ids=None, find_unused_parameters=False)
    out = Path(config.out)
    metrics_path = out / "metrics.jsonl"
    params = count_parameters(model)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dict(_train_config_dict(config), schedule=schedule), indent=2))
        log.info("training %s (%.2fM params) on %d scans, %d steps, %d process(es)", model_config.arch,
                 params / 1e6, len(indices), total_steps, env.world_size)
        log.info("lr %g at reference batch %d x %.4g (%s scaling to batch %d) = %g; warm-up %d steps; clip %s",
                 config.lr, config.reference_batch, schedule["lr_scale"], config.lr_scaling, config.batch_size,
                 schedule["effective_lr"], schedule["warmup_steps"], config.clip_grad_norm or "off")

    t0 = time.perf_counter()
    losses: list[float] = []
    scans_done = 0
    step = start_epoch * steps_per_epoch
    mf = metrics_path.open("a") if main else None
    monitor = DivergenceMonitor(config.divergence_window, config.divergence_factor)
    last_good_epoch = start_epoch
    try:
        amp = config.amp and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=amp)  # a no-op pass-through when disabled
        for epoch in range(start_epoch, config.epochs):
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            generator = torch.Generator().manual_seed(config.seed * 1000 + epoch + 7919)  # S3 "batch" coins
            model.train()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", disable=not (progress and main))
            epoch_losses = []
            for batch in bar:
                ts = time.perf_counter()
                vox = voxelize(batch["xyz"].to(device), batch["batch"].to(device), config.voxel_size)
                with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
                    feats = step_model(vox, batch["feat"].to(device))
                loss, terms = compute_loss(config, feats.float(), vox, batch, text, epoch, generator, per_voxel=True)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # DDP: gradients averaged over the ranks here
                scaler.unscale_(optimizer)  # true gradients for the norm (a no-op without AMP)
                grad_norm = clip_gradients(model.parameters(), config.clip_grad_norm)  # the same on every rank
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                keys = list(terms)  # the same keys on every rank
                sums = all_reduce_sum([float(loss.detach()), *(terms[k] for k in keys), len(batch["index"]),
                                       int(batch["xyz"].shape[0])], env, device)
                value = sums[0] / env.world_size
                terms = {k: v / env.world_size for k, v in zip(keys, sums[1:-2])}
                n_scans, n_points = int(sums[-2]), int(sums[-1])
                scans_done += n_scans
                dt = time.perf_counter() - ts
                epoch_losses.append(value)
                level = monitor.median
                diverged = monitor.update(value)  # the all-reduced loss: every rank decides alike
                row = dict(step=step, epoch=epoch + 1, loss=value, **terms, lr=optimizer.param_groups[0]["lr"],
                           grad_norm=grad_norm, points=n_points, seconds=dt, scans_per_s=n_scans / max(dt, 1e-9))
                if diverged:
                    row.update(diverged=True, loss_median=level)
                    if main:
                        log.warning("step %d: loss %.4g is above %g x the median %.4g of the last %d steps (divergence)",
                                    step, value, config.divergence_factor, level, len(monitor.window))
                if mf is not None:
                    mf.write(json.dumps(row) + "\n")
                if diverged and config.stop_on_divergence:
                    if mf is not None:
                        mf.flush()
                    kept = (f"{out / 'checkpoint.pt'} (epoch {last_good_epoch})" if last_good_epoch > 0
                            else "none (no epoch finished)")
                    raise TrainingDiverged(f"{out}: loss {value:.4g} at step {step} is above {config.divergence_factor:g} x "
                                           f"the running median {level:.4g} (--stop-on-divergence): stopped; "
                                           f"last good checkpoint: {kept}")
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}")
            if mf is not None:
                mf.flush()
            losses.append(float(np.mean(epoch_losses)))
            if epoch + 1 == config.epochs:
                _final_batchnorm(model, dataset, config, env, device, epoch)
            if main:
                paths = [out / "checkpoint.pt"] + ([out / f"checkpoint_epoch{epoch + 1}.pt"] if config.keep_checkpoints else [])
                for path in paths:
                    save_checkpoint(path, model=model, model_config=model_config,
                                    train_config=_train_config_dict(config), cache=cache, epoch=epoch + 1,
                                    optimizer=optimizer, scheduler=scheduler)
                log.info("epoch %d: mean loss %.4f", epoch + 1, losses[-1])
            last_good_epoch = epoch + 1
    finally:
        if mf is not None:
            mf.close()
    seconds = time.perf_counter() - t0
    summary = dict(
        run=str(out),
        checkpoint=str(out / "checkpoint.pt"),
        arch=model_config.arch,
        parameters=params,
        train_scans=int(len(indices)),
        epochs=config.epochs,
        steps=step,
        epoch_losses=losses,
        seconds=seconds,
        scans_per_second=scans_done / max(seconds, 1e-9),
        device=str(device),
        processes=env.world_size,
        schedule=schedule,
        divergences=monitor.events,
    )
    return broadcast_object(summary, env)


def _final_batchnorm(model: torch.nn.Module, dataset: ScanDataset, config: TrainConfig, env: DistEnv,
                     device: torch.device, epoch: int) -> None:
    """After the last epoch: precise BatchNorm on rank 0 over the first global batches of the
    epoch's order (exactly what one process does), then every rank takes rank 0's buffers."""
    if config.precise_bn_batches > 0 and env.is_main:
        sampler = EpochSampler(len(dataset), seed=config.seed)
        sampler.set_epoch(epoch)
        loader = _loader(dataset, sampler, config.batch_size, config, device)
        used = precise_batchnorm(model, loader, config.precise_bn_batches, config.voxel_size, device)
        log.info("BatchNorm statistics re-estimated on %d batches", used)
    broadcast_buffers(model, env)
