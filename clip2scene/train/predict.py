"""The one prediction rule: per-point class scores -> evaluation labels.

A distillation student scores the C prompt classes (cosine logits against the text embeddings);
a prediction is the argmax over the prompt classes that map to an evaluation class, mapped to
that class (`Cache.prompt_to_eval`, 0 = none). The cached MaskCLIP logits are read the same way,
and a fine-tuned model is the special case of K classes mapped to labels 1..K. Used by
`evaluate`, finetune's evaluation and the pictures (viz/student.py).

    out = forward_points(model, batch, voxel_size, device)   # (N, D) or (N, K) per point
    labels = predict_labels(out, text, table)        # student output -> (N,) int64
    teacher = eval_labels(pair_logits, table)        # cached (M, C) scores -> (M,) int64
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from clip2scene.train.loss import text_logits
from clip2scene.train.voxelize import voxelize


def forward_points(model: torch.nn.Module, batch: dict, voxel_size: float, device: torch.device) -> torch.Tensor:
    """Run a student (or a Segmenter) on a collated batch (xyz, batch, feat); returns its
    per-point output, (N, D) features or (N, K) logits, float32 on `device`."""
    vox = voxelize(batch["xyz"].to(device), batch["batch"].to(device), voxel_size)
    return model.forward_points(vox, batch["feat"].to(device))


def eval_labels(scores: torch.Tensor | np.ndarray, table: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Evaluation label of every row of `scores`.

    Args:
        scores: (N, C) float16/float32 class scores (tensor on any device, or a numpy array).
        table: (C,) int, the evaluation label of each class (0 = none).

    Returns:
        (N,) int64 on the CPU: table[argmax over the classes with a nonzero entry] (ties: the
        first class); all 0 when no class maps.
    """
    scores = torch.as_tensor(scores)
    table = torch.as_tensor(table, dtype=torch.int64).cpu()
    unmapped = (table == 0).to(scores.device)
    best = scores.float().masked_fill(unmapped, float("-inf")).argmax(dim=1)
    return table[best.cpu()]


def predict_labels(out: torch.Tensor, text: torch.Tensor | None, table: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Evaluation labels from a student's per-point output.

    out: (N, D) text-space features of a distillation student (`text` (C, D) its prompt-class
    embeddings, on the same device), or (N, K) classifier logits of a fine-tuned model
    (`text` None). table: (C,) or (K,) as in `eval_labels`. Returns (N,) int64 on the CPU."""
    return eval_labels(out if text is None else text_logits(out, text), table)
