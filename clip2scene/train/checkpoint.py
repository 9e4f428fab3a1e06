"""Checkpoints that carry their configuration and the teacher they were distilled from.

A checkpoint is a torch file (read with ``weights_only=True``: tensors and plain data, no
pickle) holding a dict. A distillation checkpoint (`clip2scene train`) has: format, model_config,
train_config, teacher fingerprint, class_names, text_embeddings (C, D) float32, the dataset
description, epoch, model state and optimiser/scheduler state. A fine-tuned / linear-probed one
(``kind == "segmenter"``, `clip2scene finetune`) has the classifier's evaluation classes and
voxel size instead of the teacher's text side. `check_compatible` refuses a cache built by
another teacher or with other classes, naming the field that differs.

`Checkpoint` (what `load_checkpoint` returns) is the one way a model is rebuilt from a file:

    ckpt = load_checkpoint("runs/exp1/checkpoint.pt")   # refuses a file with NaN/Inf, naming it
    model = ckpt.load_model("cpu")                      # the network, eval mode
    labels = predict_labels(forward_points(model, batch, ckpt.voxel_size, dev), ckpt.text_on(dev),
                            ckpt.label_table(cache.prompt_to_eval))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from clip2scene.errors import CacheError, ConfigError
from clip2scene.storage import Cache
from clip2scene.train.checks import count_tensors, nonfinite_tensors
from clip2scene.train.nets import ModelConfig, build_model
from clip2scene.train.nets.segmenter import SEGMENTER_KIND, Segmenter

CHECKPOINT_FORMAT = "clip2scene-checkpoint"
CHECKPOINT_VERSION = 1
# Teacher fingerprint fields that must match between a checkpoint and a cache.
FINGERPRINT_FIELDS = ("model", "weights_sha256", "quick_gelu", "image_size", "class_names", "templates_sha256",
                      "embed_dim", "key_smoothing", "prompt_denoising", "denoise_threshold", "smoothing_threshold",
                      "teacher", "window", "stride", "pamr")
# Value of a field that caches/checkpoints written before it existed lack (the paper's MaskCLIP,
# whole image, no PAMR).
FINGERPRINT_DEFAULTS = {"teacher": "maskclip", "window": None, "stride": None, "pamr": False}
DISTILL_KIND = "distill"  # Checkpoint.kind of a `clip2scene train` checkpoint (the file has no "kind")


class Checkpoint(Mapping):
    """A loaded checkpoint: the file's dict (read-only mapping access: ``ckpt["epoch"]``) plus
    what every consumer needs to rebuild and read the model. CPU tensors."""

    def __init__(self, path: str | Path, data: dict):
        self.path = Path(path)
        self.data = data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, kind={self.kind!r}, epoch={self.data.get('epoch')})"

    @property
    def kind(self) -> str:
        """"distill" (text-space features) or "segmenter" (K-way classifier)."""
        return self.data.get("kind") or DISTILL_KIND

    @property
    def model_config(self) -> ModelConfig:
        """The student's ModelConfig (the backbone's, for a segmenter)."""
        return model_config_of(self.data)

    @property
    def voxel_size(self) -> float:
        """Metres, as trained."""
        if self.kind == SEGMENTER_KIND:
            return float(self.data["voxel_size"])
        return float(self.data["train_config"]["voxel_size"])

    def text_on(self, device: torch.device | str) -> torch.Tensor | None:
        """(C, D) float32 prompt-class text embeddings on `device` (None for a segmenter);
        ConfigError naming the file when a distillation checkpoint lacks them."""
        if self.kind == SEGMENTER_KIND:
            return None
        text = self.data.get("text_embeddings")
        if text is None:
            raise ConfigError(f"{self.path}: distillation checkpoint without text embeddings")
        return text.float().to(device)

    def label_table(self, prompt_to_eval: Sequence[int] | None = None) -> torch.Tensor:
        """(C,) int64 evaluation label of each output class for `predict_labels`: the cache's
        `prompt_to_eval` for a distillation student (ConfigError when not given), 1..K for a
        segmenter (`prompt_to_eval` ignored)."""
        if self.kind == SEGMENTER_KIND:
            return torch.arange(1, int(self.data["num_classes"]) + 1, dtype=torch.int64)
        if prompt_to_eval is None:
            raise ConfigError("a distillation student needs the prompt -> evaluation class mapping")
        return torch.as_tensor(list(prompt_to_eval), dtype=torch.int64)

    def load_model(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The network with the checkpoint's weights on `device`, in eval mode: the student
        (`build_model`) or, for a segmenter, `Segmenter(student, K)`."""
        device = torch.device(device)
        model = build_model(self.model_config, device)
        if self.kind == SEGMENTER_KIND:  # checkpoints written before head_input: raw
            model = Segmenter(model, int(self.data["num_classes"]), self.data.get("head_input", "raw")).to(device)
        model.load_state_dict(self.data["state_dict"])
        return model.eval()


def save_checkpoint(path: Path, *, model: torch.nn.Module, model_config: ModelConfig, train_config: dict,
                    cache: Cache, epoch: int, optimizer=None, scheduler=None, extra: dict | None = None) -> None:
    """Write a distillation checkpoint atomically (`write_checkpoint`)."""
    state = dict(
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
    write_checkpoint(path, state)


def write_checkpoint(path: Path, state: dict) -> None:
    """Write `state` (plus format and version) atomically: a temp file, then a rename."""
    state = dict(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, **state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, check_finite: bool = True) -> Checkpoint:
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
    return Checkpoint(path, ckpt)


def model_config_of(ckpt: Mapping) -> ModelConfig:
    """The ModelConfig stored in a checkpoint."""
    cfg = dict(ckpt["model_config"])
    cfg["channels"] = tuple(cfg["channels"])
    return ModelConfig(**cfg)


def check_compatible(ckpt: Mapping, cache: Cache, ckpt_path: str | Path = "checkpoint") -> None:
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
