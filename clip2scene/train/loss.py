"""Student losses. SCR (paper Eq. 1): class-level InfoNCE against the text embeddings.

For point i with MaskCLIP pseudo-label c:
    L_i = -log( exp(cos(f_i, t_c) / tau) / sum_k exp(cos(f_i, t_k) / tau) ),  tau = 0.5,
averaged over the points that have a pseudo-label (camera-visible ones). Points of one class
are never pushed apart, unlike pixel-point InfoNCE.

Every loss takes per-point features (N, D), or per-voxel features (V, D) with ``point2voxel``
(N,) when all points of a voxel share their voxel's output (the student's default). The second
form gives the same value and gradient (tested) without the (N, D) gather and its backward
scatter: the losses gather (N,) scalars or work on (voxel, cell) pairs with multiplicities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _norms(features: torch.Tensor) -> torch.Tensor:
    """(N, 1) row norms clamped as F.normalize does (eps 1e-12)."""
    return torch.linalg.vector_norm(features, dim=-1, keepdim=True).clamp_min(1e-12)


def text_logits(features: torch.Tensor, text: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """(N, D) point features, (C, D) text embeddings -> (N, C) cosine similarity / tau.

    = F.normalize(features) @ F.normalize(text).T / tau, with the division by the row norm done
    on the (N, C) product: no normalised (N, D) copy and no (N, D) division in the backward."""
    return (features @ F.normalize(text, dim=-1).T) / (_norms(features) * tau)


def scr_loss(features: torch.Tensor, text: torch.Tensor, target: torch.Tensor, tau: float = 0.5,
             point2voxel: torch.Tensor | None = None) -> torch.Tensor:
    """SCR loss. features (N, D) float, text (C, D) float, target (N,) int64 in 0..C-1 or -1 (no label).
    With point2voxel (N,) int64, features are (V, D) per voxel and point i has features[point2voxel[i]].

    Returns a scalar; zero (with a graph) when no point has a label.
    """
    mask = target >= 0
    if not bool(mask.any()):
        return features.sum() * 0.0
    if point2voxel is None:
        return F.cross_entropy(text_logits(features[mask], text, tau), target[mask])
    logp = F.log_softmax(text_logits(features, text, tau), dim=-1)  # (V, C)
    return -logp[point2voxel[mask], target[mask]].mean()


def scatter_softmax(scores: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Softmax of (E,) scores within each group (E,) int64 in 0..num_groups-1 (vectorised)."""
    gmax = torch.full((num_groups,), float("-inf"), dtype=scores.dtype, device=scores.device)
    gmax = gmax.scatter_reduce(0, group, scores, reduce="amax", include_self=True)
    e = torch.exp(scores - gmax[group])
    denom = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add_(0, group, e)
    return e / denom[group]


def grid_labels(grid: torch.Tensor, target: torch.Tensor, num_grids: int, num_classes: int) -> torch.Tensor:
    """Majority label per grid cell. grid (N,) int64 cell of each point, target (N,) int64 label or -1.

    Returns (num_grids,) int64 label of the most frequent label among the cell's labelled points
    (ties -> lower class index), -1 for cells with no labelled point.
    """
    lab = target >= 0
    counts = torch.zeros(num_grids * num_classes, dtype=torch.int64, device=grid.device)
    counts.index_add_(0, grid[lab] * num_classes + target[lab], torch.ones_like(target[lab]))
    counts = counts.view(num_grids, num_classes)
    best = counts.argmax(dim=1)
    return torch.where(counts.sum(dim=1) > 0, best, torch.full_like(best, -1))


def ssr_loss(point_features: torch.Tensor, grid: torch.Tensor, num_grids: int, target: torch.Tensor,
             pixel_features: torch.Tensor, pixel_point: torch.Tensor, text: torch.Tensor,
             lam: float = 1.0, point2voxel: torch.Tensor | None = None) -> torch.Tensor:
    """SSR (paper Eqs. 3-4): semantic-guided spatial-temporal consistency, fully vectorised.

    point_features (N, D) student features of every point of the merged keyframe + sweeps (or
    (V, D) per voxel with point2voxel (N,) int64, see the module docstring);
    grid (N,) int64 cell (0.1 m voxel) of each point; target (N,) int64 supervision label or -1;
    pixel_features (M, D) teacher features of the camera-visible points pixel_point (M,) int64;
    text (C, D). Each cell with a labelled point gets the text embedding t_k of its majority label.
    Every point feature and every pixel feature in the cell takes part in the fusion with weight
    a_i = softmax_i(cos(x_i, t_k) / lam) over the cell; the fused feature F_k = sum_i a_i x_i
    (unit-normalised inputs) is the target (no gradient) that each point feature of the cell is
    pulled to: L = mean_i (1 - cos(f_i, F_k)). Returns a scalar (0 with graph if no cell is labelled).
    """
    t = F.normalize(text, dim=-1)
    labels = grid_labels(grid, target, num_grids, t.shape[0])
    px_cell = grid[pixel_point]
    pt_ok = labels[grid] >= 0
    px_ok = labels[px_cell] >= 0
    n_ok = int(pt_ok.sum())
    if n_ok == 0:
        return point_features.sum() * 0.0
    # The point members of the fusion as (row of point_features, cell, multiplicity): one per
    # (voxel, cell) pair whose points share a feature (per-point features: every point is its own
    # "voxel", multiplicity 1). A member counted n times enters the softmax as score + log n
    # (n * exp(score)) and the loss with weight n.
    if point2voxel is None:
        point2voxel = torch.arange(len(grid), device=grid.device)
    key = point2voxel[pt_ok] * num_grids + grid[pt_ok]
    pairs, mult = torch.unique(key, return_counts=True)
    rows, cells_pt = pairs // num_grids, pairs % num_grids
    # Written to avoid (M, D) temporaries (on the CPU they cost more than the whole SPVCNN head):
    # scores come from (M, C) cosines with every class, weights are applied in place.
    with torch.no_grad():
        x = point_features.detach()[rows]
        fp = x.div_(_norms(x))  # (n, D) unit, a fresh copy
        fx = F.normalize(pixel_features[px_ok].float(), dim=-1)  # (m, D) unit
        cells_px = px_cell[px_ok]
        cells = torch.cat([cells_pt, cells_px])
        cos = torch.cat([fp @ t.T, fx @ t.T])  # (n + m, C)
        scores = cos.gather(1, labels[cells][:, None]).squeeze(1) / lam
        scores[: len(rows)] += torch.log(mult.to(scores.dtype))
        weights = scatter_softmax(scores, cells, num_grids)
        fused = torch.zeros(num_grids, fp.shape[1], dtype=fp.dtype, device=fp.device)
        fused.index_add_(0, cells_pt, fp.mul_(weights[: len(rows), None]))
        fused.index_add_(0, cells_px, fx.mul_(weights[len(rows):, None]))
        fused = F.normalize(fused, dim=-1)
    x = point_features[rows]  # cos(x, F) = x . F / |x| for unit F; no normalised (n, D) copy
    cos_pairs = (x * fused[cells_pt]).sum(dim=-1) / _norms(x).squeeze(1)
    return 1.0 - (cos_pairs * mult.to(cos_pairs.dtype)).sum() / n_ok


def kl_loss(point_features: torch.Tensor, text: torch.Tensor, pixel_logits: torch.Tensor,
            pixel_point: torch.Tensor, tau: float = 0.5, point2voxel: torch.Tensor | None = None) -> torch.Tensor:
    """KL(pixel || point) between class distributions (the paper's failing ablation).

    pixel_logits (M, C) cached teacher cosine logits at the visible points pixel_point (M,);
    both distributions are softmax(cos / tau). point_features (N, D), or (V, D) with point2voxel.
    """
    if pixel_point.numel() == 0:
        return point_features.sum() * 0.0
    rows = pixel_point if point2voxel is None else point2voxel[pixel_point]
    log_q = F.log_softmax(text_logits(point_features[rows], text, tau), dim=-1)
    p = F.softmax(pixel_logits.float() / tau, dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean")


def switch_targets(pseudo: torch.Tensor, predicted: torch.Tensor, mode: str, prob: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """S3, switchable self-training: replace MaskCLIP pseudo-labels by the network's own predictions.

    pseudo (N,) int64 (-1 = none), predicted (N,) int64. mode "point": each labelled point
    switches independently with probability `prob` (the paper); "batch": the whole batch switches
    with probability `prob` (the released code); "off": no switch. Returns (N,) int64.
    """
    if mode == "off":
        return pseudo
    device = pseudo.device
    if mode == "batch":
        flip = torch.rand((), generator=generator) < prob
        return torch.where(pseudo >= 0, predicted, pseudo) if bool(flip) else pseudo
    if mode == "point":
        flip = (torch.rand(pseudo.shape, generator=generator) < prob).to(device)
        return torch.where((pseudo >= 0) & flip, predicted, pseudo)
    raise ValueError(f"unknown self-training mode {mode!r} (point, batch, off)")
