"""The fine-tuned / linear-probed model: a student backbone with a linear classifier over the
dataset's evaluation classes (`clip2scene finetune`, `clip2scene linear-probe`).

    model = Segmenter(build_model(model_config), num_classes=16)
    logits = model.forward_points(vox, feat)    # (N, 16) float32; label k + 1 = column k
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip2scene.errors import ConfigError

SEGMENTER_KIND = "segmenter"  # checkpoint["kind"] of a fine-tuned / linear-probed model
HEAD_INPUTS = ("l2", "raw")


class Segmenter(nn.Module):
    """A student backbone with a linear classifier over K evaluation classes on its point features.

    head_input "l2" (default): the classifier sees the point features scaled to unit L2 norm.
    The backbone's concatenated multi-scale features (sums of BatchNorm + ReLU outputs, all >= 0)
    have a squared norm of ~1.7e3 (median; up to ~1.5e5) on real nuScenes scans at init, and the
    curvature of the cross-entropy in the classifier's weights grows with it: SGD with momentum
    0.9 on the raw features is stable only below a head lr of ~2e-3 there, so the recipe's head
    lr (0.02 x 100 = 2) diverges and even 0.02 spikes (docs/benchmarks.md, issue 18). On unit-norm
    features the curvature is <= 0.5 and the recipe's rate is stable. "raw" = the classifier on
    the features as they are (checkpoints written before this option)."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_input: str = "l2"):
        super().__init__()
        if head_input not in HEAD_INPUTS:
            raise ConfigError(f"head input {head_input!r}: expected one of {', '.join(HEAD_INPUTS)}")
        self.backbone = backbone
        self.head_input = head_input
        self.classifier = nn.Linear(backbone.embed_channels, num_classes)

    def forward_points(self, vox, point_features: torch.Tensor) -> torch.Tensor:
        """(N, K) float32 class logits of every point (label k + 1 = logit column k)."""
        emb = self.backbone.embed_points(vox, point_features)
        if self.head_input == "l2":
            emb = F.normalize(emb, dim=1)
        return self.classifier(emb)
