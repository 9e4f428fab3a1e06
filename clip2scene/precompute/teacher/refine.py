"""Refinements of the teacher's class scores: MaskCLIP key smoothing and prompt denoising
(`refine_scores`), NACLIP's neighbourhood bias and PAMR."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# CLIP's logit scale (exp of OpenAI CLIP's learned temperature, 100): MaskCLIP's refinements
# turn cosine scores into class probabilities with softmax(100 * cosine) over the classes.
REFINE_LOGIT_SCALE = 100.0
# Score given to classes removed by prompt denoising. The cached logits are float16 cosine-like
# scores in about [-1.1, 1.1]; -2.0 is exactly representable in float16 and below any of them,
# so a removed class can never be the argmax (pseudo-label).
DENOISED_SCORE = -2.0

# PAMR as NACLIP's release runs it (pamr_steps=10, pamr_stride=(8, 16)).
PAMR_STEPS = 10
PAMR_DILATIONS = (8, 16)


def _check_refinements(denoise_threshold: float, smoothing_threshold: float) -> None:
    """ValueError for refinement thresholds out of range (they are always validated)."""
    if not (0.0 <= float(denoise_threshold) <= 1.0):
        raise ValueError(f"denoise_threshold must be in [0, 1], got {denoise_threshold!r}")
    if not (float(smoothing_threshold) > 0.0 and float(smoothing_threshold) < float("inf")):
        raise ValueError(f"smoothing_threshold must be a finite number > 0, got {smoothing_threshold!r}")


def denoised_classes(scores: torch.Tensor, denoise_threshold: float = 0.5,
                     logit_scale: float = REFINE_LOGIT_SCALE) -> torch.Tensor:
    """MaskCLIP prompt denoising's decision: which classes an image lacks.

    Args:
        scores: (B, C, N) cosine scores of N patches.

    Returns:
        (B, C) bool on ``scores``' device: True where the class's highest probability
        (softmax over classes of ``logit_scale * scores``) over the patches is below
        ``denoise_threshold``, except each image's most confident class (see `refine_scores`).
    """
    s = scores.double()
    class_max = torch.softmax(logit_scale * s, dim=1).amax(dim=2)  # (B, C)
    removed = class_max < denoise_threshold
    removed[torch.arange(s.shape[0], device=s.device), class_max.argmax(dim=1)] = False
    return removed


def refine_scores(
    scores: torch.Tensor,
    keys: torch.Tensor | None = None,
    *,
    key_smoothing: bool = False,
    prompt_denoising: bool = False,
    denoise_threshold: float = 0.5,
    smoothing_threshold: float = 1.0,
    logit_scale: float = REFINE_LOGIT_SCALE,
    removed: torch.Tensor | None = None,
) -> torch.Tensor:
    """MaskCLIP's training-free refinements of per-patch class scores (prompt denoising, key smoothing).

    Follows MaskCLIP (Zhou et al., ECCV 2022, sec. 3.2 "key smoothing" / "prompt denoising") and
    its official head ``MaskClipHead.refine_output`` (github.com/chongzhou96/MaskCLIP, copied
    unchanged but never called into the CLIP2Scene release, ``model/maskclip_model.py``), in that
    code's order: denoising is decided on the raw scores, then the kept classes are smoothed.
    With ``p = softmax(logit_scale * scores)`` over the classes, per image:

    1. Prompt denoising: ``m_c = max over patches of p[c]``; class c is removed when
       ``m_c < denoise_threshold``, except the class with the largest ``m_c`` (the argmax class of
       the image's most confident patch), which is always kept. (The official code can remove
       every class; this guard keeps at least one.) Removed classes get probability 0 below and
       score `DENOISED_SCORE` in the output.
    2. Key smoothing: keys ``k_i`` (one per patch, the last block's key projection of its
       ln_1 input) are L2-normalised; ``A_ij = max(k_i . k_j, 0)`` (cosine affinity, diagonal
       1) and ``W = A / A.sum(-1)`` (rows sum to 1). Smoothed probabilities ``p'_i = sum_j W_ij
       p_j`` (over the kept classes), used at patches whose ``max_c p_i[c] < smoothing_threshold``;
       other patches keep their scores. The smoothed probabilities are returned as cosine-like
       scores ``s'_i[c] = (log p'_i[c] + logsumexp_c(logit_scale * s_i)) / logit_scale``, i.e.
       ``softmax(logit_scale * s'_i) == p'_i`` and ``s'_i == s_i`` when ``p'_i == p_i``;
       ``s'_i[c] >= s_i[c] - log(N) / logit_scale`` (N = patches), so scores stay within about
       [-1.1, 1.1].

    Differences from the official code, on purpose: it uses raw signed, unnormalised cosine
    weights (row normalisation is a positive rescale and leaves the argmax unchanged; the clamp at
    0 only matters for patch pairs with negative key cosine, which it would push apart), it
    L2-normalises keys along the patch axis (``F.normalize(k)`` on a (B, N, width) tensor) rather
    than per key, and its keys pass through the attention output projection; here keys are the
    raw key projection normalised per patch, as the paper's "key similarity" describes. The
    official code returns probabilities; here scores stay on the cosine scale.

    Args:
        scores: (B, C, N) cosine scores of N patches (any float dtype).
        keys: (B, N, K) per-patch keys; required when ``key_smoothing``.
        key_smoothing, prompt_denoising: which refinements to apply (none: scores returned as
            float32).
        denoise_threshold: in [0, 1], see 1.
        smoothing_threshold: > 0, see 2.
        logit_scale: softmax temperature inverse (CLIP's 100).
        removed: (B, C) bool, classes already removed by a denoising decision taken elsewhere
            (`denoised_classes` on a whole image whose windows are refined one by one); given,
            it replaces step 1 (``prompt_denoising`` is then ignored).

    Returns:
        (B, C, N) float32 on ``scores``' device. Computed in float64 internally.
    """
    _check_refinements(denoise_threshold, smoothing_threshold)
    if scores.ndim != 3:
        raise ValueError(f"scores must be (B, C, N), got {tuple(scores.shape)}")
    if not (key_smoothing or prompt_denoising or removed is not None):
        return scores.float()
    b, c, n = scores.shape
    s = scores.double()
    z = logit_scale * s
    if removed is not None:
        if tuple(removed.shape) != (b, c):
            raise ValueError(f"removed must be ({b}, {c}), got {tuple(removed.shape)}")
        removed = removed.to(device=s.device, dtype=torch.bool)
    elif prompt_denoising:
        removed = denoised_classes(s, denoise_threshold, logit_scale)
    else:
        removed = torch.zeros(b, c, dtype=torch.bool, device=s.device)
    if bool(removed.any()):
        z = z.masked_fill(removed[:, :, None], float("-inf"))
    out = s
    if key_smoothing:
        if keys is None or keys.ndim != 3 or keys.shape[0] != b or keys.shape[1] != n:
            got = None if keys is None else tuple(keys.shape)
            raise ValueError(f"key smoothing needs keys of shape ({b}, {n}, K), got {got}")
        lse = torch.logsumexp(z, dim=1, keepdim=True)  # (B, 1, N), over the kept classes
        logp = z - lse  # (B, C, N); -inf for removed classes
        k = F.normalize(keys.to(device=s.device, dtype=torch.float64), dim=-1)
        aff = (k @ k.transpose(1, 2)).clamp_min(0.0)  # (B, N, N)
        aff.diagonal(dim1=1, dim2=2).fill_(1.0)  # cos(k_i, k_i) = 1 (also for a zero key)
        w = aff / aff.sum(dim=-1, keepdim=True)
        # p'[c, i] = sum_j w[i, j] p[c, j], shifted per class by max_j log p[c, j] so that nothing
        # underflows: log p >= -(2 * logit_scale + log C) for cosine scores, far inside float64.
        shift = logp.amax(dim=2, keepdim=True).masked_fill(removed[:, :, None], 0.0)  # (B, C, 1)
        smoothed_p = torch.exp(logp - shift) @ w.transpose(1, 2)  # (B, C, N); 0 for removed
        smoothed = (torch.log(smoothed_p) + shift + lse) / logit_scale
        smooth_here = logp.exp().amax(dim=1) < smoothing_threshold  # (B, N)
        out = torch.where(smooth_here[:, None, :], smoothed, s)
    out = out.masked_fill(removed[:, :, None], DENOISED_SCORE)
    return out.float()


def neighbourhood_bias(grid: tuple[int, int], std: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """NACLIP's Gaussian attention bias for a ViT with a class token.

    Returns (1 + h*w, 1 + h*w): 0 on the class token's row and column; between patches i and j
    (row-major on the (h, w) grid) ``exp(-|p_i - p_j|^2 / (2 std^2))`` with p the patch's
    (row, column).
    """
    h, w = grid
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    d2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    out = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.float64)
    out[1:, 1:] = torch.exp(-d2 / (2.0 * std * std))
    return out.to(device=device, dtype=dtype)


def _shifts(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, 8, H, W): the 8 neighbours at ``dilation`` pixels, borders replicated.

    Order: the 3 x 3 ring row by row without the centre (up-left, up, up-right, left, right,
    down-left, down, down-right).
    """
    h, w = x.shape[-2:]
    d = dilation
    pad = F.pad(x, (d, d, d, d), mode="replicate")
    out = [pad[..., d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w]
           for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return torch.stack(out, dim=2)


def pamr(image: torch.Tensor, scores: torch.Tensor, steps: int = PAMR_STEPS,
         dilations: Sequence[int] = PAMR_DILATIONS) -> torch.Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as NACLIP post-processes.

    Each pixel's scores become, ``steps`` times, a weighted mean of its 8 neighbours' at every
    dilation; the weights are a softmax over those neighbours of ``-mean_channels(|I_p - I_q| /
    (1e-8 + 0.1 * sigma_p))``, with sigma_p the per-channel standard deviation (unbiased) of the
    image over the pixel and its neighbours at all dilations (the centre counted once per
    dilation). Borders replicate.

    Args:
        image: (B, K, H, W) float image (CLIP-normalised RGB in NACLIP).
        scores: (B, C, h, w) class scores; resized to (H, W) bilinearly (align_corners=True, as
            PAMR does) when their size differs.

    Returns:
        (B, C, H, W) float32 refined scores.
    """
    image = image.float()
    scores = scores.float()
    if tuple(scores.shape[-2:]) != tuple(image.shape[-2:]):
        scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=True)
    if steps <= 0:
        return scores
    neigh = torch.cat([_shifts(image, d) for d in dilations], dim=2)  # (B, K, 8n, H, W)
    centre = image.unsqueeze(2).expand(-1, -1, len(dilations), -1, -1)
    sigma = torch.cat([neigh, centre], dim=2).std(dim=2, keepdim=True)  # (B, K, 1, H, W)
    aff = -(neigh - image.unsqueeze(2)).abs() / (1e-8 + 0.1 * sigma)
    weights = torch.softmax(aff.mean(dim=1, keepdim=True), dim=2)  # (B, 1, 8n, H, W)
    for _ in range(steps):
        scores = (torch.cat([_shifts(scores, d) for d in dilations], dim=2) * weights).sum(dim=2)
    return scores
