"""Stage two: train the spconv student from the cache alone (no teacher on the device).

Losses (method.md section 4): SCR (paper Eq. 1, InfoNCE against the cached text embeddings with
MaskCLIP pseudo-labels on camera-visible points), SSR (Eqs. 3-4, spatial-temporal consistency in
0.1 m cells of the merged keyframe + sweeps, fusing cached pixel features and point features),
S3 (switchable self-training: from `switch_epoch` on, each labelled point's target is, with
probability 0.5, the network's own prediction), and the KL ablation. SGD with momentum, cosine
schedule over all steps.
Each epoch writes `checkpoint.pt` (model + optimiser + scheduler + config + teacher fingerprint)
and appends per-step metrics to `metrics.jsonl` in the run folder.

    from clip2scene.train.trainer import TrainConfig, train
    summary = train(TrainConfig(cache="cache.zarr", out="runs/exp1", epochs=20))

CLI: `clip2scene train --cache ./zarr --out runs/NAME`.
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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clip2scene.devices import resolve_device
from clip2scene.errors import ConfigError
from clip2scene.storage import Cache, open_cache
from clip2scene.train.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from clip2scene.train.data import ScanDataset, collate
from clip2scene.train.loss import kl_loss, scr_loss, ssr_loss, switch_targets, text_logits
from clip2scene.train.model import ModelConfig, build_model, count_parameters
from clip2scene.train.voxelize import voxelize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    cache: str  # cache folder written by `clip2scene precompute`
    out: str  # run folder: checkpoint.pt, metrics.jsonl, config.json
    split: str = "train"  # which cached scans to train on
    epochs: int = 20  # passes over the training scans
    batch_size: int = 4  # scans per step
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


def forward_points(model: torch.nn.Module, batch: dict, voxel_size: float, device: torch.device,
                   return_voxels: bool = False):
    """Run the student on a collated batch; returns per-point features (N, D) on `device`
    (and the Voxels when `return_voxels`)."""
    xyz = batch["xyz"].to(device)
    vox = voxelize(xyz, batch["batch"].to(device), voxel_size)
    out = model.forward_points(vox, batch["feat"].to(device))
    return (out, vox) if return_voxels else out


def compute_loss(config: TrainConfig, feats: torch.Tensor, vox, batch: dict, text: torch.Tensor,
                 epoch: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the configured losses for one batch; returns (loss, per-term floats)."""
    device = feats.device
    target = batch["target"].to(device)
    switch_epoch = config.epochs // 2 if config.switch_epoch is None else config.switch_epoch
    terms: dict[str, float] = {}
    if config.self_training != "off" and epoch >= switch_epoch:
        with torch.no_grad():
            predicted = text_logits(feats.detach(), text).argmax(dim=1)
        switched = switch_targets(target, predicted, config.self_training, config.switch_prob, generator)
        terms["switched"] = float(((switched != target) & (target >= 0)).float().mean())
        target = switched
    loss = feats.sum() * 0.0
    if config.scr_weight:
        scr = scr_loss(feats, text, target, config.tau)
        terms["scr"] = float(scr.detach())
        loss = loss + config.scr_weight * scr
    if config.ssr_weight:
        if abs(config.ssr_grid - config.voxel_size) < 1e-9:
            grid, cells = vox.point2voxel, vox.num_voxels
        else:
            g = voxelize(batch["xyz"].to(device), batch["batch"].to(device), config.ssr_grid)
            grid, cells = g.point2voxel, g.num_voxels
        ssr = ssr_loss(feats, grid, cells, target, batch["pair_features"].to(device),
                       batch["pair_point"].to(device), text, config.ssr_lambda)
        terms["ssr"] = float(ssr.detach())
        loss = loss + config.ssr_weight * ssr
    if config.kl_weight:
        kl = kl_loss(feats, text, batch["pair_logits"].to(device), batch["pair_point"].to(device), config.tau)
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


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train per `config`; returns a summary dict (losses, timings, parameter count, paths)."""
    device = resolve_device(config.device)
    if config.epochs < 1 or config.batch_size < 1:
        raise ConfigError(f"--epochs and --batch-size must be >= 1 (got {config.epochs}, {config.batch_size})")
    cache = open_cache(config.cache)
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
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(indices) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
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
        log.info("resumed from %s at epoch %d", config.resume, start_epoch)

    text = torch.from_numpy(cache.text_embeddings).to(device)
    if config.self_training not in ("point", "batch", "off"):
        raise ConfigError(f"--self-training {config.self_training!r}: expected point, batch or off")
    if not (config.scr_weight or config.ssr_weight or config.kl_weight):
        raise ConfigError("all loss weights are 0: nothing to train")
    dataset = ScanDataset(cache, indices, augment=config.augment, seed=config.seed,
                          features=bool(config.ssr_weight), sweeps=config.sweeps)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_train_config_dict(config), indent=2))
    metrics_path = out / "metrics.jsonl"
    params = count_parameters(model)
    log.info("training %s (%.2fM params) on %d scans, %d steps", model_config.arch, params / 1e6, len(indices), total_steps)

    t0 = time.perf_counter()
    losses: list[float] = []
    scans_done = 0
    step = start_epoch * steps_per_epoch
    with metrics_path.open("a") as mf:
        for epoch in range(start_epoch, config.epochs):
            dataset.set_epoch(epoch)
            generator = torch.Generator().manual_seed(config.seed * 1000 + epoch + 7919)  # S3 draws
            gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
            loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=gen,
                                collate_fn=collate, num_workers=config.workers,
                                multiprocessing_context="spawn" if config.workers > 0 else None,
                                pin_memory=device.type == "cuda")
            model.train()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", disable=not progress)
            epoch_losses = []
            for batch in bar:
                ts = time.perf_counter()
                feats, vox = forward_points(model, batch, config.voxel_size, device, return_voxels=True)
                loss, terms = compute_loss(config, feats, vox, batch, text, epoch, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                n_scans = len(batch["index"])
                scans_done += n_scans
                dt = time.perf_counter() - ts
                value = float(loss.detach())
                epoch_losses.append(value)
                mf.write(json.dumps(dict(step=step, epoch=epoch + 1, loss=value, **terms, lr=optimizer.param_groups[0]["lr"],
                                         points=int(batch["xyz"].shape[0]), seconds=dt,
                                         scans_per_s=n_scans / max(dt, 1e-9))) + "\n")
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}")
            mf.flush()
            losses.append(float(np.mean(epoch_losses)))
            if epoch + 1 == config.epochs and config.precise_bn_batches > 0:
                used = precise_batchnorm(model, loader, config.precise_bn_batches, config.voxel_size, device)
                log.info("BatchNorm statistics re-estimated on %d batches", used)
            save_checkpoint(out / "checkpoint.pt", model=model, model_config=model_config,
                            train_config=_train_config_dict(config), cache=cache, epoch=epoch + 1,
                            optimizer=optimizer, scheduler=scheduler)
            log.info("epoch %d: mean loss %.4f", epoch + 1, losses[-1])
    seconds = time.perf_counter() - t0
    return dict(
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
    )
