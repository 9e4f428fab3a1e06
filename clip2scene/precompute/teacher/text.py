"""The text side of the teacher: class-name prompts -> unit-norm CLIP text embeddings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip2scene.precompute.teacher.prompts import prompt_name

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# text side
# --------------------------------------------------------------------------------------------


def encode_text(
    clip_model: nn.Module,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device,
) -> torch.Tensor:
    """Class text embeddings: per class, encode every template, L2-normalise each, mean, L2-normalise.

    Args:
        clip_model: open_clip CLIP model (``encode_text``), already on ``device``; run in eval mode
            for the call (its mode is restored afterwards).
        tokenizer: open_clip tokenizer (callable: list of str -> (N, context) int64 tokens).
        class_names: C class names, filled into templates via `prompt_name`.
        templates: T strings each with one ``{}``.
        device: where tokens and the computation go.

    Returns:
        (C, D) float32 on ``device``, rows of unit L2 norm. An ordinary tensor (not an inference
        tensor), so it can be used in autograd graphs, e.g. to classify student features.
    """
    if not class_names:
        raise ValueError("class_names is empty")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates must be a non-empty sequence of strings each containing '{}'")
    was_training = clip_model.training
    clip_model.eval()
    rows = []
    try:
        with torch.inference_mode():
            for name in class_names:
                texts = [t.format(prompt_name(name)) for t in templates]
                tokens = tokenizer(texts).to(device)
                emb = F.normalize(_encode_tokens(clip_model, tokens).float(), dim=-1)
                rows.append(F.normalize(emb.mean(dim=0), dim=0))
            out = torch.stack(rows)
    finally:
        clip_model.train(was_training)
    return out.clone()  # clone outside inference mode -> a normal tensor


def _encode_tokens(clip_model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``clip_model.encode_text(tokens)``, trimmed to the longest prompt when that is exact.

    For open_clip's standard ``CLIP`` text tower (causal attention mask, pooling at the EOT/EOS
    token) the pooled output only depends on positions up to the pooled one, so the context can be
    cut to ``max(pooled index) + 1`` tokens (prompts are ~10-20 of 77 tokens: ~5x less compute on
    CPU). Anything else falls back to ``encode_text``.

    Args:
        tokens: (N, context) int64 tokens on the model's device.

    Returns:
        (N, D) un-normalised text features, as ``encode_text``.
    """
    import open_clip

    pool = getattr(clip_model, "text_pool_type", None)
    mask = getattr(clip_model, "attn_mask", None)
    if (
        not isinstance(clip_model, open_clip.CLIP)
        or pool not in ("argmax", "eos")
        or mask is None
        or mask.shape[-1] != tokens.shape[1]
        or not torch.equal(mask, torch.full_like(mask, float("-inf")).triu(1))  # causal
    ):
        return clip_model.encode_text(tokens)
    if pool == "argmax":
        idx = tokens.argmax(dim=-1)
    else:
        idx = (tokens == clip_model.text_eos_id).int().argmax(dim=-1)
    n = int(idx.max()) + 1
    tokens = tokens[:, :n]
    # from here on: open_clip.model.CLIP.encode_text on the first n positions
    cast_dtype = clip_model.transformer.get_cast_dtype()
    x = clip_model.token_embedding(tokens).to(cast_dtype)
    x = x + clip_model.positional_embedding[:n].to(cast_dtype)
    x = clip_model.transformer(x, attn_mask=mask[:n, :n])
    x = clip_model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), idx]
    proj = clip_model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x
