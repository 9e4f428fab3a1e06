"""Annotation-efficient learning: fine-tuning and linear probing with ground-truth labels.

`finetune` starts from a distillation checkpoint (`clip2scene train`) or from random weights
(`checkpoint=None`, the baseline), replaces the text-space head by a linear classifier over the
dataset's evaluation classes, and trains on a fraction of the labelled training scans with
cross-entropy + Lovasz-softmax (method.md section 5: SGD lr 0.02, the new head at 100x the
learning rate, 24 epochs, cosine). `mode="linear"` is the linear probe: the backbone is frozen
(weights and BatchNorm statistics) and only the classifier trains. At the end the model is
evaluated on the evaluation split with the devkit mIoU and `result.json` is written for
`clip2scene report` (train/report.py). Training runs the shared loop (`clip2scene.train.loop`)
with the `Segmentation` task; the model is `clip2scene.train.nets.segmenter.Segmenter`. Per-step
scalars go to `metrics.jsonl` and TensorBoard event files in the run folder; `val_every`
validates on `val_split` during training and keeps `best.pt` (train/tracking.py); `max_steps`
stops a smoke run early.

The label fraction follows SLidR: the 1% split is every 100th training scan (in cache order:
scene, then time), so it is the same on every run and machine.

    from clip2scene.train.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(cache="cache.zarr", out="runs/ft1", checkpoint="runs/pre/checkpoint.pt",
                                     label_fraction=0.01))

CLI: `clip2scene finetune --checkpoint PRE|none --cache Z --label-fraction 0.01`,
`clip2scene linear-probe --checkpoint PRE --cache Z`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clip2scene.devices import resolve_device
from clip2scene.errors import CacheError, ConfigError, Interrupted
from clip2scene.storage import Cache, open_cache
from clip2scene.train.checks import refuse_existing_run, remove_run
from clip2scene.validation import (CLIP_HELP, DIV_FACTOR_HELP, DIV_WINDOW_HELP, SCALING_HELP, STOP_HELP, STORAGE_HELP,
                                   WARMUP_HELP, check_bool, check_choice, check_float, check_installed, check_int,
                                   check_text, opt, paths_to_text)
from clip2scene.train.checkpoint import load_checkpoint, write_checkpoint
from clip2scene.train.data import ScanDataset
from clip2scene.train.evaluate import _iou_dict, _num, limit_scans, score_split
from clip2scene.train.loop import LoopConfig, StepForward, build_optimizer, run_loop, schedule_info
from clip2scene.train.lovasz import lovasz_softmax
from clip2scene.train.nets import ModelConfig, build_model, count_parameters
from clip2scene.train.nets.segmenter import HEAD_INPUTS, SEGMENTER_KIND, Segmenter
from clip2scene.train.tracking import RunWatch, Validator
from clip2scene.train.trainer import _validate_guard_rails

log = logging.getLogger(__name__)

MODES = ("finetune", "linear")  # all weights / frozen backbone with a linear head


@dataclass(frozen=True)
class FinetuneConfig:
    cache: str = opt(help="Cache with labels, folder or URL (a labels-only cache from --clip-model none works).")
    out: str = opt(help="Run folder (checkpoint.pt, metrics.jsonl, result.json).")
    checkpoint: str | None = opt(None, "Pre-trained checkpoint.pt from train, or none (random init baseline; "
                                       "finetune only).", none="none")
    mode: str = opt("finetune", "finetune (all weights) or linear (frozen backbone, linear head): set by the command.",
                    cli=False)
    label_fraction: float = opt(1.0, "Labelled fraction of the training scans: 0.01 = every 100th scan.")
    split: str = opt("train", "Cached split to train on.", cli=False)
    eval_split: str | None = opt("val", "Split to evaluate at the end (none = skip).", none="none")
    epochs: int = opt(24, "Epochs (passes over the labelled scans).")
    batch_size: int = opt(8, "Scans per step.")
    lr: float = opt(0.02, "Backbone SGD learning rate at --reference-batch (cosine); the head trains at lr x "
                          "--head-lr-mult.")
    head_lr_mult: float = opt(100.0, "Classifier learning rate = lr x this.")
    momentum: float = opt(0.9, "SGD momentum.", cli=False)
    weight_decay: float = opt(1e-4, "SGD weight decay.", cli=False)
    lovasz_weight: float = opt(1.0, "Weight of Lovasz-softmax next to cross-entropy.")
    voxel_size: float | None = opt(None, "Voxel size in metres (default: the checkpoint's, else the dataset's).")
    augment: bool = opt(True, "Random z-rotation and flips.")
    device: str = opt("cpu", "cpu or cuda[:i].")
    workers: int = opt(0, "DataLoader workers (spawned processes).")
    seed: int = opt(0, "Random seed (head init, random backbone init, shuffling, augmentation).")
    precise_bn_batches: int = opt(16, "Re-estimate BatchNorm statistics on N batches after training (finetune mode).",
                                  cli=False)
    model: ModelConfig = opt(default_factory=lambda: ModelConfig(arch="spvcnn"),
                             help="Architecture for random init (--checkpoint none) only.")
    storage_options: dict = opt(default_factory=dict, help=STORAGE_HELP, flag="--storage-option")
    overwrite: bool = opt(False, "Replace a previous run in --out (its run files are removed).")
    head_input: str = opt("l2", "Classifier input: l2 (unit-norm point features; the recipe's head lr is stable on "
                                "them) or raw.")
    # guard rails (train/stability.py); `lr` is the backbone rate at `reference_batch`, scaled by `lr_scaling`
    warmup_steps: int | None = opt(None, WARMUP_HELP)
    clip_grad_norm: float | None = opt(None, CLIP_HELP)
    lr_scaling: str = opt("linear", SCALING_HELP)
    reference_batch: int = opt(8, "The recipe's batch that --lr is given for (method.md section 5: released "
                                  "fine-tuning config, batch 8).")
    divergence_factor: float = opt(10.0, DIV_FACTOR_HELP)
    divergence_window: int = opt(50, DIV_WINDOW_HELP)
    stop_on_divergence: bool = opt(False, STOP_HELP)
    # watching a run (train/tracking.py); TensorBoard event files are always written to `out`
    val_every: int = opt(0, "Validate (ground-truth mIoU) every N epochs and after the last one, keeping best.pt by "
                            "it (0 = off).")
    val_split: str = opt("val", "Cached split to validate on during training.")
    max_steps: int | None = opt(None, "Stop after this many optimiser steps (a smoke run; the schedule stays the full "
                                      "run's).")
    wandb: bool = opt(False, "Also log to Weights & Biases (the wandb package must be installed; project from "
                             "WANDB_PROJECT, default clip2scene).")
    limit: int | None = opt(None, "Train on only the first N labelled scans, in cache order (a smoke run; the "
                                  "evaluation is not limited).")


    def __post_init__(self) -> None:
        """Every option's valid range, checked before any work: ConfigError naming the option."""
        paths_to_text(self, "cache", "out", "checkpoint")
        check_text("cache", self.cache)
        check_text("out", self.out)
        check_text("checkpoint", self.checkpoint, allow_none=True)
        check_choice("mode", self.mode, MODES)
        if self.mode == "linear" and self.checkpoint is None:
            raise ConfigError("a linear probe of a random backbone measures nothing: give --checkpoint")
        check_float("label_fraction", self.label_fraction, 0.0, 1.0, low_open=True)
        check_text("split", self.split)
        check_text("eval_split", self.eval_split, allow_none=True)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_float("lr", self.lr, 0.0, low_open=True)
        check_float("head_lr_mult", self.head_lr_mult, 0.0, low_open=True)
        check_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("lovasz_weight", self.lovasz_weight, 0.0)
        check_float("voxel_size", self.voxel_size, 0.0, low_open=True, allow_none=True)
        check_bool("augment", self.augment)
        check_text("device", self.device)
        check_int("workers", self.workers, 0)
        check_int("seed", self.seed, 0)
        check_int("precise_bn_batches", self.precise_bn_batches, 0)
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"model {self.model!r}: expected a ModelConfig")
        if not isinstance(self.storage_options, dict):
            raise ConfigError(f"storage_options {self.storage_options!r}: expected a dict")
        check_bool("overwrite", self.overwrite)
        if self.head_input not in HEAD_INPUTS:
            raise ConfigError(f"--head-input {self.head_input!r}: expected one of {', '.join(HEAD_INPUTS)}")
        _validate_guard_rails(self)
        check_int("val_every", self.val_every, 0, note=" (0 = off)")
        check_text("val_split", self.val_split)
        check_int("max_steps", self.max_steps, 1, allow_none=True)
        check_int("limit", self.limit, 1, allow_none=True)
        check_installed("wandb", self.wandb, "wandb")


def label_subset(indices: np.ndarray, fraction: float) -> np.ndarray:
    """The labelled training scans: every round(1 / fraction)-th of `indices` (SLidR: 1% = every
    100th), starting with the first. (S,) int64 -> (S',) int64; `fraction` in (0, 1] (checked by
    FinetuneConfig)."""
    step = max(1, round(1.0 / fraction))
    return np.asarray(indices, dtype=np.int64)[::step]


def _segmenter_from(config: FinetuneConfig, cache: Cache, device: torch.device) -> tuple[Segmenter, dict]:
    """Build the backbone (pretrained or random) and a fresh classifier; returns (model, init info)."""
    in_channels = len(cache.point_features)
    num_classes = len(cache.eval_class_names)
    torch.manual_seed(config.seed)
    if config.checkpoint is None:
        model_config = replace(config.model, in_channels=in_channels)
        backbone = build_model(model_config, device)
        init = dict(init="random", checkpoint=None, voxel_size=None)
    else:
        ckpt = load_checkpoint(config.checkpoint)
        if ckpt.kind == SEGMENTER_KIND:
            raise ConfigError(f"{config.checkpoint} is already a fine-tuned model; start from a `clip2scene train` checkpoint")
        model_config = ckpt.model_config
        if model_config.in_channels != in_channels:
            raise ConfigError(f"{config.checkpoint} takes {model_config.in_channels} input channel(s), cache "
                              f"{cache.path} has {in_channels} ({', '.join(cache.point_features)})")
        backbone = ckpt.load_model(device)
        init = dict(init="pretrained", checkpoint=str(config.checkpoint),
                    voxel_size=ckpt["train_config"].get("voxel_size"), teacher=ckpt.get("teacher"))
    model = Segmenter(backbone, num_classes, config.head_input).to(device)
    init["model_config"] = asdict(model_config)
    return model, init


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor, lovasz_weight: float) -> tuple[torch.Tensor, dict]:
    """Cross-entropy + lovasz_weight * Lovasz-softmax. logits (N, K), label (N,) int64 in 0..K (0 = ignore)."""
    target = label - 1  # -1 = ignore
    if not bool((target >= 0).any()):
        zero = logits.sum() * 0.0
        return zero, dict(ce=0.0, lovasz=0.0)
    ce = F.cross_entropy(logits, target, ignore_index=-1)
    lov = lovasz_softmax(F.softmax(logits, dim=1), target, ignore=-1) if lovasz_weight else logits.sum() * 0.0
    return ce + lovasz_weight * lov, dict(ce=float(ce.detach()), lovasz=float(lov.detach()))


def finetune(config: FinetuneConfig, progress: bool = True) -> dict:
    """Train per `config`, save the model, evaluate on `eval_split`; returns (and writes) result.json.

    Refuses an `out` that already holds a run unless `config.overwrite`. Raises TrainingError at
    the first non-finite loss (nothing is saved) and `Interrupted` on Ctrl-C."""
    try:
        return _finetune(config, progress)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {config.mode} has no --resume; start it again with --overwrite") from None


def _finetune(config: FinetuneConfig, progress: bool) -> dict:
    device = resolve_device(config.device)
    if not config.overwrite:
        refuse_existing_run(config.out, command=config.mode)
    cache = open_cache(config.cache, config.storage_options)
    if not cache.has_labels:
        raise CacheError(f"cache {cache.path} has no ground-truth labels: fine-tuning needs them")
    all_train = cache.indices(config.split)
    if len(all_train) == 0:
        raise ConfigError(f"cache {cache.path} has no scans in split {config.split!r}")
    indices = limit_scans(label_subset(all_train, config.label_fraction), config.limit)
    model, init = _segmenter_from(config, cache, device)
    voxel_size = config.voxel_size or init.get("voxel_size") or cache.voxel_size
    config = replace(config, voxel_size=voxel_size)
    validator = (Validator(cache, config.val_split, config.val_every, "segmenter", voxel_size, device)
                 if config.val_every else None)  # refuses an empty split before any work

    steps_per_epoch = math.ceil(len(indices) / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = schedule_info(config, steps_per_epoch, total)
    lr = schedule["effective_lr"]
    schedule["head_lr"] = lr * config.head_lr_mult
    head = (model.classifier.parameters(), config.head_lr_mult)
    if config.mode == "linear":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        optimizer, scheduler = build_optimizer([head], config, total, steps_per_epoch)
    else:
        optimizer, scheduler = build_optimizer([(model.backbone.parameters(), 1.0), head], config, total, steps_per_epoch)

    out = Path(config.out)
    if config.overwrite:
        removed = remove_run(out)
        if removed:
            log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = asdict(config)
    cfg_dict["model"]["channels"] = list(cfg_dict["model"]["channels"])
    (out / "config.json").write_text(json.dumps(dict(cfg_dict, schedule=schedule), indent=2))
    dataset = ScanDataset(cache, indices, augment=config.augment, seed=config.seed)
    log.info("%s: %d of %d training scans labelled (fraction %g), %d steps, init %s",
             config.mode, len(indices), len(all_train), config.label_fraction, total, init["init"])
    log.info("lr %g at reference batch %d x %.4g (%s scaling to batch %d) = %g, head %g; warm-up %d steps; clip %s",
             config.lr, config.reference_batch, schedule["lr_scale"], config.lr_scaling, config.batch_size, lr,
             schedule["head_lr"], schedule["warmup_steps"], config.clip_grad_norm or "off")

    task = Segmentation(config, model, init, cache, cfg_dict)
    loop = LoopConfig.of(config, save_every_epoch=False, resumable=False,
                         precise_bn_batches=config.precise_bn_batches if config.mode == "finetune" else 0)
    watch = RunWatch(out, cfg_dict, wandb=config.wandb, validator=validator,
                     total_steps=min(total, config.max_steps or total))  # tracking.py
    run = run_loop(task, loop, dataset, optimizer, scheduler, device=device, progress=progress, watch=watch)
    ckpt_path = out / "checkpoint.pt"
    result = dict(run=str(out), checkpoint=str(ckpt_path), mode=config.mode, init=init["init"],
                  pretrained=init["checkpoint"], label_fraction=config.label_fraction,
                  labelled_scans=int(len(indices)), train_scans=int(len(all_train)), epochs=config.epochs,
                  epoch_losses=run.epoch_losses, seconds=run.seconds, schedule=schedule, divergences=run.divergences,
                  trainable_parameters=count_parameters(model, trainable_only=True), steps=run.steps,
                  stopped_at_max_steps=run.stopped, val=watch.last_val, best=watch.best_state(),
                  dataset=(cache.meta.get("dataset") or {}).get("name"))
    if config.eval_split is not None:
        ev = evaluate_segmenter(ckpt_path, cache, config.eval_split, device=config.device, progress=progress)
        result.update(eval_split=config.eval_split, miou=ev["miou"], per_class_iou=ev["per_class_iou"],
                      eval_scans=ev["scans"], eval_points=ev["points"])
    (out / "result.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    result["json"] = str(out / "result.json")
    return result


class Segmentation:
    """The training task of `finetune` / `linear-probe` (a `clip2scene.train.loop.Task`): per-point
    classifier logits, cross-entropy + Lovasz (`segmentation_loss`); the linear probe keeps the
    frozen backbone's BatchNorm in eval mode. Saves the model only (no optimiser: not resumable)."""

    nothing_kept = "nothing was saved (fine-tuning saves at the end)"

    def __init__(self, config: FinetuneConfig, model: Segmenter, init: dict, cache: Cache, cfg_dict: dict):
        self.name = config.mode
        self.config = config  # voxel_size resolved
        self.model = model
        self.net = StepForward(model, "forward_points")
        self.init = init
        self.cache = cache
        self.cfg_dict = cfg_dict

    def begin_epoch(self, epoch: int) -> None:
        self.model.train()
        if self.config.mode == "linear":
            self.model.backbone.eval()  # frozen: BatchNorm keeps its pre-trained statistics

    def loss(self, out: torch.Tensor, vox, batch: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        return segmentation_loss(out, batch["label"].to(out.device), self.config.lovasz_weight)

    def save(self, path: Path, epoch: int, optimizer, scheduler, extra: dict) -> None:
        cache, init = self.cache, self.init
        write_checkpoint(path, dict(
            kind=SEGMENTER_KIND, model_config=init["model_config"], num_classes=len(cache.eval_class_names),
            eval_class_names=cache.eval_class_names, point_features=cache.point_features,
            voxel_size=self.config.voxel_size, train_config=self.cfg_dict, init=init["init"],
            pretrained=init["checkpoint"], dataset=cache.meta.get("dataset"), head_input=self.config.head_input,
            epoch=epoch, step=extra["step"], state_dict=self.model.state_dict()))

    def row(self, optimizer) -> dict:
        return dict(head_lr=optimizer.param_groups[-1]["lr"])


@torch.inference_mode()
def evaluate_segmenter(checkpoint: str | Path, cache: Cache | str, split: str, device: str = "cpu",
                       progress: bool = True, limit: int | None = None) -> dict:
    """Devkit mIoU of a fine-tuned model (argmax over the K classifier outputs) on a cache split
    (its first `limit` scans when given)."""
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.kind != SEGMENTER_KIND:
        raise ConfigError(f"{checkpoint} is not a fine-tuned model (use `clip2scene evaluate` for distillation checkpoints)")
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if not cache.has_labels:
        raise CacheError(f"cache {cache.path} has no ground-truth labels to evaluate against")
    if list(ckpt["eval_class_names"]) != cache.eval_class_names:
        raise CacheError(f"evaluation classes differ: {checkpoint} has {len(ckpt['eval_class_names'])}, "
                         f"cache {cache.path} has {len(cache.eval_class_names)} ({cache.meta['dataset']['name']})")
    indices = cache.indices(split)
    if len(indices) == 0:
        raise ConfigError(f"cache {cache.path} has no scans in split {split!r}")
    split_scans = len(indices)
    indices = limit_scans(indices, limit)
    cm, _, points = score_split(ckpt.load_model(dev), ckpt.voxel_size, None, ckpt.label_table(), cache, indices, dev,
                                desc=f"evaluate {split}", progress=progress)
    names = cache.eval_class_names
    iou = cm.per_class_iou()
    miou = cm.miou()
    return dict(checkpoint=str(checkpoint), cache=str(cache.path), split=split, scans=int(len(indices)),
                split_scans=int(split_scans), limit=limit, points=int(points), class_names=names,
                miou=_num(miou), per_class_iou=_iou_dict(names, iou),
                confusion_matrix=cm.matrix.tolist())
