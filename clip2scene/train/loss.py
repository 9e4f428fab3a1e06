"""Student losses. SCR (paper Eq. 1): class-level InfoNCE against the text embeddings.

For point i with MaskCLIP pseudo-label c:
    L_i = -log( exp(cos(f_i, t_c) / tau) / sum_k exp(cos(f_i, t_k) / tau) ),  tau = 0.5,
averaged over the points that have a pseudo-label (camera-visible ones). Points of one class
are never pushed apart, unlike pixel-point InfoNCE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_logits(features: torch.Tensor, text: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """(N, D) point features, (C, D) text embeddings -> (N, C) cosine similarity / tau."""
    return F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T / tau


def scr_loss(features: torch.Tensor, text: torch.Tensor, target: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """SCR loss. features (N, D) float, text (C, D) float, target (N,) int64 in 0..C-1 or -1 (no label).

    Returns a scalar; zero (with a graph) when no point has a label.
    """
    mask = target >= 0
    if not bool(mask.any()):
        return features.sum() * 0.0
    return F.cross_entropy(text_logits(features[mask], text, tau), target[mask])
