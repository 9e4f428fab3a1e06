"""Annotation-free evaluation: predict each point's class by cosine argmax against the text
embeddings and score with the devkit's mIoU (one global confusion matrix, nanmean).

Alongside the student it scores the cached MaskCLIP pseudo-labels on the camera-visible points
(the teacher's own quality, the ceiling the distillation starts from).

    from clip2scene.train.evaluate import EvalConfig, evaluate
    result = evaluate(EvalConfig(checkpoint="runs/exp1/checkpoint.pt", cache="cache.zarr", split="val"))

CLI: `clip2scene evaluate --checkpoint C --cache Z --split val` (table on screen, JSON on disk).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clip2scene.errors import CacheError, ConfigError
from clip2scene.storage import open_cache
from clip2scene.validation import STORAGE_HELP, check_int, check_text, opt, paths_to_text
from clip2scene.train.checkpoint import check_compatible, load_checkpoint
from clip2scene.train.data import ScanDataset, collate
from clip2scene.train.metrics import ConfusionMatrix
from clip2scene.devices import resolve_device
from clip2scene.train.predict import eval_labels, forward_points, predict_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str = opt(help="checkpoint.pt from train, finetune or linear-probe.")
    cache: str = opt(help="Cache with ground-truth labels (folder or URL).")
    split: str = opt("val", "Cached split to evaluate.")
    out: str | None = opt(None, "JSON result path (default <checkpoint folder>/eval_<split>.json).")
    device: str = opt("cpu", "cpu or cuda[:i].")
    batch_size: int = opt(1, "Scans per forward pass.", cli=False)
    storage_options: dict = opt(default_factory=dict, help=STORAGE_HELP, flag="--storage-option")
    limit: int | None = opt(None, "Evaluate only the first N scans of the split, in cache order (a smoke run; "
                                  "None = all).")

    def __post_init__(self) -> None:
        """ConfigError naming the option and value, before any work."""
        paths_to_text(self, "checkpoint", "cache", "out")
        check_text("checkpoint", self.checkpoint)
        check_text("cache", self.cache)
        check_text("split", self.split)
        check_text("out", self.out, allow_none=True)
        check_text("device", self.device)
        check_int("batch_size", self.batch_size, 1)
        check_int("limit", self.limit, 1, allow_none=True)
        if not isinstance(self.storage_options, dict):
            raise ConfigError(f"storage_options {self.storage_options!r}: expected a dict")


def limit_scans(indices: np.ndarray, limit: int | None) -> np.ndarray:
    """The first `limit` of a split's scan indices (cache order: scene, then time); all when None."""
    if limit is not None and limit < len(indices):
        log.info("--limit %d: %d of the split's %d scans", limit, limit, len(indices))
        return indices[:limit]
    return indices


def _num(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def _iou_dict(names: list[str], iou: np.ndarray) -> dict:
    """Per evaluation class (labels 1..C) IoU; None where undefined (absent from truth and prediction)."""
    return {name: _num(v) for name, v in zip(names, iou[1:])}


@torch.no_grad()
def score_split(model: torch.nn.Module, voxel_size: float, text: torch.Tensor | None, table: torch.Tensor,
                cache, indices: np.ndarray, device: torch.device, batch_size: int = 1, teacher: bool = False,
                desc: str = "evaluate", progress: bool = True):
    """Confusion matrices of a model's predictions (`predict_labels` with `text` / `table`) on the
    cached scans `indices` (no augmentation) against their ground-truth labels.

    Returns (student ConfusionMatrix, teacher ConfusionMatrix or None, points scored); with
    `teacher` the cached MaskCLIP pseudo-labels of the camera-visible points are scored too,
    through the same `table` (the teacher's quality on the same points)."""
    num = len(cache.eval_class_names) + 1  # label 0 = ignore
    student, teacher_cm = ConfusionMatrix(num, 0), (ConfusionMatrix(num, 0) if teacher else None)
    loader = DataLoader(ScanDataset(cache, indices, augment=False), batch_size=batch_size, shuffle=False,
                        collate_fn=collate)
    points = 0
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        # argmax over the classes that map to an evaluation class, then map
        pred = predict_labels(forward_points(model, batch, voxel_size, device), text, table)
        label = batch["label"].numpy()
        student.update(label, pred.numpy())
        if teacher_cm is not None:
            teacher_cm.update(label[batch["pair_point"].numpy()], eval_labels(batch["pair_logits"], table).numpy())
        points += len(label)
    return student, teacher_cm, points


@torch.inference_mode()
def evaluate(config: EvalConfig, progress: bool = True) -> dict:
    """Evaluate a checkpoint on a cache split; writes and returns the result dict."""
    device = resolve_device(config.device)
    ckpt = load_checkpoint(config.checkpoint)
    cache = open_cache(config.cache, config.storage_options)
    check_compatible(ckpt, cache, config.checkpoint)
    if not cache.has_labels:
        raise CacheError(f"cache {cache.path} has no ground-truth labels to evaluate against")
    indices = cache.indices(config.split)
    if len(indices) == 0:
        raise ConfigError(f"cache {cache.path} has no scans in split {config.split!r}")
    split_scans = len(indices)
    indices = limit_scans(indices, config.limit)
    model = ckpt.load_model(device)
    text = ckpt.text_on(device)
    names = cache.eval_class_names
    table = ckpt.label_table(cache.prompt_to_eval)  # prompt class -> eval label (0 = none)
    if not bool(table.any()):
        raise CacheError(f"cache {cache.path}: no prompt class maps to an evaluation class")
    student, teacher, points = score_split(model, ckpt.voxel_size, text, table, cache, indices, device,
                                           batch_size=config.batch_size, teacher=True,
                                           desc=f"evaluate {config.split}", progress=progress)
    s_iou, t_iou = student.per_class_iou(), teacher.per_class_iou()
    result = dict(
        checkpoint=str(config.checkpoint),
        cache=str(cache.path),
        split=config.split,
        scans=int(len(indices)),
        split_scans=int(split_scans),
        limit=config.limit,
        points=int(points),
        class_names=names,
        miou=_num(student.miou()),
        per_class_iou=_iou_dict(names, s_iou),
        teacher_miou_visible=_num(teacher.miou()),
        teacher_per_class_iou_visible=_iou_dict(names, t_iou),
        confusion_matrix=student.matrix.tolist(),
        teacher_weights=ckpt["teacher"].get("weights_sha256"),
        teacher_model=ckpt["teacher"].get("model"),
    )
    out = Path(config.out) if config.out else Path(config.checkpoint).parent / f"eval_{config.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=False))
    result["json"] = str(out)
    return result
