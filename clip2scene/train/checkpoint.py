"""Checkpoints that carry their configuration and the teacher they were distilled from.

A checkpoint is a torch file with: format, model_config, train_config, teacher fingerprint,
class_names, text_embeddings (C, D) float32, the dataset description, epoch, model state and
optimiser/scheduler state. `check_compatible` refuses a cache built by another teacher or with
other classes, naming the field that differs.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from clip2scene.errors import CacheError, ConfigError
from clip2scene.storage import Cache
from clip2scene.train.checks import count_tensors, nonfinite_tensors
from clip2scene.train.nets import ModelConfig

CHECKPOINT_FORMAT = "clip2scene-checkpoint"
CHECKPOINT_VERSION = 1
# Teacher fingerprint fields that must match between a checkpoint and a cache.
FINGERPRINT_FIELDS = ("model", "weights_sha256", "quick_gelu", "image_size", "class_names", "templates_sha256",
                      "embed_dim", "key_smoothing", "prompt_denoising", "denoise_threshold", "smoothing_threshold",
                      "teacher", "window", "stride", "pamr")
# Value of a field that caches/checkpoints written before it existed lack (the paper's MaskCLIP,
# whole image, no PAMR).
FINGERPRINT_DEFAULTS = {"teacher": "maskclip", "window": None, "stride": None, "pamr": False}


def save_checkpoint(path: Path, *, model: torch.nn.Module, model_config: ModelConfig, train_config: dict,
                    cache: Cache, epoch: int, optimizer=None, scheduler=None, extra: dict | None = None) -> None:
    """Write a checkpoint atomically (temp file then rename)."""
    state = dict(
        format=CHECKPOINT_FORMAT,
        version=CHECKPOINT_VERSION,
        model_config=asdict(model_config),
        train_config=train_config,
        teacher=cache.fingerprint,
        class_names=cache.class_names,
        text_embeddings=torch.from_numpy(cache.text_embeddings) if cache.text_embeddings is not None else None,
        dataset=cache.meta.get("dataset"),
        epoch=epoch,
        state_dict=model.state_dict(),
        optimizer=optimizer.state_dict() if optimizer is not None else None,
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        extra=extra or {},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, check_finite: bool = True) -> dict:
    """Load a checkpoint on CPU; ConfigError names the file if it is missing, not ours, or (with
    `check_finite`) holds a NaN/Inf in its weights, buffers, optimiser state or text embeddings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no pickle: tensors and plain data only
    except Exception as e:  # torch raises many types for a bad file
        raise ConfigError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: not a clip2scene checkpoint")
    if check_finite:
        tensors = {k: ckpt.get(k) for k in ("state_dict", "optimizer", "text_embeddings")}
        bad = nonfinite_tensors(tensors)
        if bad:
            raise ConfigError(f"{path}: {len(bad)} of {count_tensors(tensors)} tensors hold NaN/Inf (first {bad[0]}): "
                              "the run that wrote it diverged; use an earlier checkpoint")
    return ckpt


def model_config_of(ckpt: dict) -> ModelConfig:
    """The ModelConfig stored in a checkpoint."""
    cfg = dict(ckpt["model_config"])
    cfg["channels"] = tuple(cfg["channels"])
    return ModelConfig(**cfg)


def check_compatible(ckpt: dict, cache: Cache, ckpt_path: str | Path = "checkpoint") -> None:
    """Raise CacheError if the cache's teacher fingerprint or classes differ from the checkpoint's."""
    if list(ckpt["class_names"]) != cache.class_names:
        raise CacheError(
            f"class names differ: {ckpt_path} has {list(ckpt['class_names'])}, cache {cache.path} has {cache.class_names}"
        )
    theirs, ours = ckpt["teacher"], cache.fingerprint
    for key in FINGERPRINT_FIELDS:
        a, b = theirs.get(key, FINGERPRINT_DEFAULTS.get(key)), ours.get(key, FINGERPRINT_DEFAULTS.get(key))
        if a != b:
            raise CacheError(
                f"teacher fingerprint field {key!r} differs: {ckpt_path} has {a!r}, cache {cache.path} has {b!r}"
            )
