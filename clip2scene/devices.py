"""`--device` handling shared by both stages: parse a device string, refuse absent CUDA."""

from __future__ import annotations

import torch

from clip2scene.errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """torch.device for a --device value; ConfigError if it is malformed or CUDA is asked for but absent."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return dev
