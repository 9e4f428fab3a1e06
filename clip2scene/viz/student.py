"""Run a trained student on one scan's points, for pictures (no DataLoader, no augmentation).

Two kinds of checkpoint are understood:

* a distillation checkpoint (`clip2scene train`): per-point features in the teacher's text space;
  a class prediction is the cosine argmax over the checkpoint's prompt-class text embeddings,
  restricted to the prompt classes that map to an evaluation class, then mapped to that class
  (exactly as `clip2scene.train.evaluate.evaluate`);
* a fine-tuned / linear-probed checkpoint (``kind == "segmenter"``, `clip2scene finetune`): the
  argmax of its K classifier outputs is evaluation label k + 1
  (`clip2scene.train.finetune.evaluate_segmenter`).

    student = load_student("runs/exp1/checkpoint.pt")
    feats = student.point_features(xyz, feat)          # (n, D) float32, distillation only
    labels = student.predict(xyz, feat, cache.prompt_to_eval)   # (n,) int64 in 0..K
    teacher = teacher_labels(scan.pair_logits, cache.prompt_to_eval)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clip2scene.devices import resolve_device
from clip2scene.errors import CacheError, ConfigError
from clip2scene.storage import Cache
from clip2scene.train.checkpoint import DISTILL_KIND, Checkpoint, load_checkpoint
from clip2scene.train.predict import eval_labels, forward_points, predict_labels
from clip2scene.train.nets.segmenter import SEGMENTER_KIND

log = logging.getLogger(__name__)


@dataclass
class Student:
    """A loaded student network and what is needed to read its output.

    Attributes:
        path: the checkpoint file.
        kind: "distill" (text-space features) or "segmenter" (K-way classifier).
        model: the network in eval mode on `device`.
        device: torch device it runs on.
        voxel_size: metres, as trained.
        in_channels: input channels per point (1 = intensity, 3 = RGB).
        text: (C, D) float32 prompt-class text embeddings on `device` (distill; None otherwise).
        class_names: the C prompt class names (distill) or the K evaluation class names (segmenter).
        eval_class_names: the K evaluation class names of a segmenter (None for distill).
        teacher: the teacher fingerprint the student was distilled from ({} for a segmenter).
        epoch: epochs trained.
        ckpt: the loaded checkpoint (CPU tensors).
    """

    path: Path
    kind: str
    model: torch.nn.Module
    device: torch.device
    voxel_size: float
    in_channels: int
    text: torch.Tensor | None
    class_names: list[str]
    eval_class_names: list[str] | None
    teacher: dict
    epoch: int
    ckpt: Checkpoint

    @torch.inference_mode()
    def _forward(self, xyz: np.ndarray, feat: np.ndarray) -> torch.Tensor:
        xyz = np.ascontiguousarray(xyz, dtype=np.float32)
        feat = np.ascontiguousarray(feat, dtype=np.float32)
        if feat.ndim != 2 or feat.shape[1] != self.in_channels:
            raise ConfigError(f"{self.path} takes {self.in_channels} input channel(s) per point, "
                              f"the points have {feat.shape[1] if feat.ndim == 2 else feat.shape}")
        if len(xyz) == 0:
            raise ConfigError("no points to run the student on")
        batch = dict(xyz=torch.from_numpy(xyz), feat=torch.from_numpy(feat),
                     batch=torch.zeros(len(xyz), dtype=torch.int64))
        return forward_points(self.model, batch, self.voxel_size, self.device)

    def point_features(self, xyz: np.ndarray, feat: np.ndarray) -> torch.Tensor:
        """Text-space features of a distillation student.

        Args:
            xyz: (n, 3) float32 metres, the scan's frame.
            feat: (n, F) float32 input channels (intensity in 0..1, or RGB in 0..1).

        Returns:
            (n, D) float32 on the CPU, not normalised (cosine scores normalise both sides).
        """
        if self.kind != DISTILL_KIND:
            raise ConfigError(f"{self.path} is a fine-tuned classifier: it has no text-space features "
                              "(use a `clip2scene train` checkpoint)")
        return self._forward(xyz, feat).float().cpu()

    def predict(self, xyz: np.ndarray, feat: np.ndarray, prompt_to_eval: list[int] | None = None) -> np.ndarray:
        """Evaluation label of every point: (n,) int64 in 0..K (0 only when nothing maps).

        `prompt_to_eval` (C,) maps prompt class -> evaluation label (required for a distillation
        student, see `clip2scene.classes.prompt_to_eval`; ignored for a segmenter).
        """
        table = self.ckpt.label_table(prompt_to_eval)
        return predict_labels(self._forward(xyz, feat), self.text, table).numpy()

    def describe(self) -> str:
        """One line for figure titles: kind, architecture, epoch."""
        arch = self.ckpt.get("model_config", {}).get("arch", "?")
        what = "student" if self.kind == DISTILL_KIND else "fine-tuned"
        if (self.teacher or {}).get("model") == "simulated":
            what += " of the SIMULATED teacher"
        return f"{what} ({arch}, epoch {self.epoch})"


def load_student(checkpoint: str | Path, device: str = "cpu") -> Student:
    """Load a distillation or fine-tuned checkpoint onto `device` in eval mode.

    ConfigError when the file is missing or not a clip2scene checkpoint (see `load_checkpoint`),
    or a distillation checkpoint carries no text embeddings.
    """
    path = Path(checkpoint)
    dev = resolve_device(device)
    ckpt = load_checkpoint(path)
    text = ckpt.text_on(dev)  # ConfigError for a distillation checkpoint without text embeddings
    model = ckpt.load_model(dev)
    kind, voxel_size, model_config = ckpt.kind, ckpt.voxel_size, ckpt.model_config
    if kind == SEGMENTER_KIND:
        names = eval_names = list(ckpt["eval_class_names"])
    else:
        names, eval_names = list(ckpt["class_names"]), None
    log.info("loaded %s checkpoint %s (epoch %s, voxel %.3g m)", kind, path, ckpt.get("epoch"), voxel_size)
    return Student(path=path, kind=kind, model=model, device=dev, voxel_size=voxel_size,
                   in_channels=int(model_config.in_channels), text=text, class_names=names,
                   eval_class_names=eval_names, teacher=dict(ckpt.get("teacher") or {}),
                   epoch=int(ckpt.get("epoch") or 0), ckpt=ckpt)


def check_student_fits(student: Student, cache: Cache) -> None:
    """CacheError / ConfigError when the student's classes or inputs do not fit the cache."""
    if student.kind == SEGMENTER_KIND:
        if student.eval_class_names != cache.eval_class_names:
            raise CacheError(f"evaluation classes differ: {student.path} has {student.eval_class_names}, "
                             f"cache {cache.path} has {cache.eval_class_names}")
    elif student.class_names != cache.class_names:
        raise CacheError(f"class names differ: {student.path} has {student.class_names}, "
                         f"cache {cache.path} has {cache.class_names}")
    if student.in_channels != len(cache.point_features):
        raise ConfigError(f"{student.path} takes {student.in_channels} input channel(s), cache {cache.path} has "
                          f"{len(cache.point_features)} ({', '.join(cache.point_features)})")


def teacher_labels(pair_logits: np.ndarray, prompt_to_eval: list[int]) -> np.ndarray:
    """MaskCLIP pseudo-labels as evaluation labels.

    Args:
        pair_logits: (m, C) float16/float32 cached teacher scores of the camera-visible points.
        prompt_to_eval: (C,) evaluation label of each prompt class (0 = none).

    Returns:
        (m,) int64 in 0..K: argmax over the prompt classes that map to an evaluation class, mapped
        (all 0 when no prompt class maps), as `clip2scene.train.evaluate` scores the teacher.
    """
    return eval_labels(pair_logits, prompt_to_eval).numpy()
