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
from clip2scene.train.checkpoint import check_compatible, load_checkpoint, model_config_of
from clip2scene.train.data import ScanDataset, collate
from clip2scene.train.loss import text_logits
from clip2scene.train.metrics import ConfusionMatrix
from clip2scene.train.nets import build_model
from clip2scene.devices import resolve_device
from clip2scene.train.trainer import forward_points

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
        log.info("--limit %d: evaluating %d of the split's %d scans", limit, limit, len(indices))
        return indices[:limit]
    return indices


def _num(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def _iou_dict(names: list[str], iou: np.ndarray) -> dict:
    """Per evaluation class (labels 1..C) IoU; None where undefined (absent from truth and prediction)."""
    return {name: _num(v) for name, v in zip(names, iou[1:])}


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
    model_config = model_config_of(ckpt)
    model = build_model(model_config, device)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    text = ckpt["text_embeddings"].to(device)
    names = cache.eval_class_names
    to_eval = torch.tensor(cache.prompt_to_eval, dtype=torch.int64)  # prompt class -> eval label (0 = none)
    unmapped = (to_eval == 0).to(device)
    if bool(unmapped.all()):
        raise CacheError(f"cache {cache.path}: no prompt class maps to an evaluation class")
    num = len(names) + 1  # label 0 = ignore
    student, teacher = ConfusionMatrix(num, 0), ConfusionMatrix(num, 0)
    loader = DataLoader(ScanDataset(cache, indices, augment=False), batch_size=config.batch_size,
                        shuffle=False, collate_fn=collate)
    points = 0
    for batch in tqdm(loader, desc=f"evaluate {config.split}", unit="batch", disable=not progress):
        feats = forward_points(model, batch, ckpt["train_config"]["voxel_size"], device)
        # argmax over the prompt classes that map to an evaluation class, then map
        pred = to_eval[text_logits(feats, text).masked_fill(unmapped, float("-inf")).argmax(dim=1).cpu()]
        label = batch["label"].numpy()
        student.update(label, pred.numpy())
        pair_logits = batch["pair_logits"].float().masked_fill(unmapped.cpu(), float("-inf"))
        teacher.update(label[batch["pair_point"].numpy()], to_eval[pair_logits.argmax(dim=1)].numpy())
        points += len(label)
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
