"""Teacher compute precision: ``auto`` -> float16 on CUDA, bfloat16 or float32 on CPU."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def cpu_has_amx() -> bool:
    """True if this CPU has AMX tiles (bfloat16 matmuls ~5x the float32 rate through oneDNN)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The teacher compute precision for ``precision`` on ``device``.

    ``"auto"`` is ``"float16"`` (autocast) on CUDA, ``"bfloat16"`` on a CPU with AMX and
    ``"float32"`` on other CPUs (bfloat16 without AMX is emulated and slower than float32).
    Teacher features in bfloat16 agree with float32 to a cosine of 0.9999 (tested; measured on
    ViT-B/16 in docs/benchmarks.md); the cache stores them as float16 either way.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown teacher precision {precision!r} (expected {', '.join(PRECISIONS)})")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "float16"
    return "bfloat16" if cpu_has_amx() else "float32"
