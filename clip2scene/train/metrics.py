"""mIoU exactly as the nuScenes-lidarseg devkit computes it (method.md section 6).

One global confusion matrix (rows = ground truth, columns = prediction) accumulated over every
point of every evaluated scan; the ignore class's row and column are zeroed; IoU per class =
TP / (TP + FP + FN); mIoU = nanmean over classes (a class absent from both ground truth and
prediction has IoU NaN and drops out; the ignore class is always NaN).

    cm = ConfusionMatrix(num_classes=17, ignore_index=0)
    cm.update(gt, pred)          # (N,) int arrays
    cm.per_class_iou(), cm.miou()
"""

from __future__ import annotations

import numpy as np


class ConfusionMatrix:
    """Global confusion matrix over labels 0..num_classes-1 with one ignore label."""

    def __init__(self, num_classes: int, ignore_index: int | None = 0):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Accumulate (N,) integer ground truth and predictions."""
        gt = np.asarray(gt).astype(np.int64).ravel()
        pred = np.asarray(pred).astype(np.int64).ravel()
        if gt.shape != pred.shape:
            raise ValueError(f"gt {gt.shape} and pred {pred.shape} differ in length")
        for name, a in (("gt", gt), ("pred", pred)):
            if a.size and (a.min() < 0 or a.max() >= self.num_classes):
                raise ValueError(f"{name} labels must lie in 0..{self.num_classes - 1}")
        cm = np.bincount(self.num_classes * gt + pred, minlength=self.num_classes**2)
        cm = cm.reshape(self.num_classes, self.num_classes)
        if self.ignore_index is not None:
            cm[self.ignore_index, :] = 0
            cm[:, self.ignore_index] = 0
        self.matrix += cm

    def per_class_iou(self) -> np.ndarray:
        """(num_classes,) float64 IoU, NaN where a class has no ground truth and no prediction."""
        tp = np.diagonal(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=1) + self.matrix.sum(axis=0) - np.diagonal(self.matrix)
        with np.errstate(divide="ignore", invalid="ignore"):
            return tp / union.astype(np.float32)

    def miou(self) -> float:
        """nanmean of the per-class IoU (NaN if no class is defined)."""
        iou = self.per_class_iou()
        if np.all(np.isnan(iou)):
            return float("nan")
        return float(np.nanmean(iou))
