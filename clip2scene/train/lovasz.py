"""Lovasz-softmax loss (Berman, Triki, Blaschko, CVPR 2018): a convex surrogate of per-class IoU.

For each class c present in the batch (the usual "present" variant), the errors
e_i = |1[y_i = c] - p_i(c)| are sorted in decreasing order and dotted with the gradient of the
Lovasz extension of the Jaccard loss at that order; the loss is the mean over classes.

    loss = lovasz_softmax(probs, labels, ignore=-1)   # probs (N, C) softmax, labels (N,) int64
"""

from __future__ import annotations

import torch


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors.

    gt_sorted: (P,) float 0/1 ground truth of one class, sorted by decreasing error. Returns (P,).
    """
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, ignore: int = -1) -> torch.Tensor:
    """Multi-class Lovasz-softmax over the classes present in `labels`.

    probs: (N, C) float class probabilities; labels: (N,) int64 in 0..C-1 or `ignore`.
    Returns a scalar (0 with a graph when nothing is labelled).
    """
    keep = labels != ignore
    probs, labels = probs[keep], labels[keep]
    if labels.numel() == 0:
        return probs.sum() * 0.0
    losses = []
    for c in torch.unique(labels).tolist():
        fg = (labels == c).float()
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[perm])))
    return torch.stack(losses).mean()
