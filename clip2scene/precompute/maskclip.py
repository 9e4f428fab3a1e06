"""The MaskCLIP teacher: dense, training-free CLIP features from an open_clip ViT (method.md §2).

MaskCLIP turns CLIP's image encoder into a dense one without any training: all transformer
blocks but the last run as usual; in the last block the query-key attention is skipped and each
token keeps only its own value projection (``x + out_proj(v(ln_1(x)))``, then the block's MLP),
followed by ``ln_post`` and the visual projection. Every patch token thus becomes a feature in
CLIP's joint image-text space and can be compared with class text embeddings (cosine
similarity) to give per-pixel pseudo-labels.

Usage::

    from clip2scene.classes import NUSCENES_CLASSES
    from clip2scene.precompute.maskclip import TeacherConfig, load_teacher

    cfg = TeacherConfig()                              # ViT-B-16, OpenAI weights, 224 x 416
    teacher = load_teacher(cfg, NUSCENES_CLASSES, device="cuda")
    images = F.interpolate(rgb01, size=cfg.image_size, mode="bilinear")   # caller resizes
    feats = teacher.dense_features(images)             # (B, 512, 14, 26), unit norm along dim 1
    logits = teacher.logits(feats.movedim(1, -1))      # (B, 14, 26, 16) cosine similarities
    feats, logits = teacher.dense_outputs(images)      # (B, 512, 14, 26), (B, 16, 14, 26), with the
                                                       # optional MaskCLIP refinements applied
    teacher.fingerprint                                # what to store next to cached outputs

Other training-free dense-CLIP teachers replace MaskCLIP's last block (`TeacherConfig.teacher`,
the name -> `DenseVariant` dict `TEACHERS`): SCLIP (q-q + k-k attention, residual and FFN kept),
ClearCLIP (q-q attention, residual and FFN dropped), NACLIP (k-k attention with a Gaussian
neighbourhood bias, residual and FFN dropped; PAMR optional via `TeacherConfig.pamr`).
`TeacherConfig.window`/`stride` run any of them on sliding windows of the input, averaging on
overlaps (`MaskCLIP.dense_outputs`). The class keeps its name `MaskCLIP` for all of them; see
docs/teachers.md.

Optional MaskCLIP refinements of the logits (`TeacherConfig.key_smoothing`,
`TeacherConfig.prompt_denoising`; off by default as in the MaskCLIP and CLIP2Scene releases) are
implemented by `refine_scores` and applied by `MaskCLIP.dense_outputs` on the patch grid.

Weights never come from the network. ``TeacherConfig.weights`` is one of

* an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``, ...): looked up only in the
  local caches open_clip itself would fill, i.e. the Hugging Face hub cache
  (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) and, for OpenAI tags, open_clip's URL
  cache ``~/.cache/clip/<name>.pt`` (e.g. ``~/.cache/clip/ViT-B-16.pt``);
* a local checkpoint file (``.bin``/``.pt``/``.pth``/``.safetensors``; an open_clip state dict or
  an OpenAI JIT archive) loaded into the architecture named by ``TeacherConfig.model``;
* ``"local-dir:DIR"``: a Hugging Face style folder with ``open_clip_config.json`` and weights;
* ``"none"``: seeded random initialisation, for tests and smoke runs only (pseudo-labels are
  meaningless; a WARNING says so).

A missing file raises `WeightsNotFoundError` naming every place that was looked at. The model is
built with the activation its weights were trained with (QuickGELU for OpenAI weights).

For tests, `register_tiny_model` adds a tiny ViT config (``"clip2scene-tiny"``) to open_clip's
model registry; `load_teacher` registers it on demand.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import numbers
import os
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip2scene.precompute.prompts import TEMPLATES, prompt_name, templates_sha256

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DENOISED_SCORE",
    "REFINE_LOGIT_SCALE",
    "TINY_MODEL_NAME",
    "MaskCLIP",
    "PAMR_DILATIONS",
    "PAMR_STEPS",
    "PRECISIONS",
    "TEACHERS",
    "DenseVariant",
    "TeacherConfig",
    "WeightsNotFoundError",
    "denoised_classes",
    "encode_text",
    "file_sha256",
    "load_teacher",
    "pamr",
    "refine_scores",
    "window_starts",
    "resolve_precision",
    "register_tiny_model",
    "resize_positional_embedding",
]

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIP's logit scale (exp of OpenAI CLIP's learned temperature, 100): MaskCLIP's refinements
# turn cosine scores into class probabilities with softmax(100 * cosine) over the classes.
REFINE_LOGIT_SCALE = 100.0
# Score given to classes removed by prompt denoising. The cached logits are float16 cosine-like
# scores in about [-1.1, 1.1]; -2.0 is exactly representable in float16 and below any of them,
# so a removed class can never be the argmax (pseudo-label).
DENOISED_SCORE = -2.0

TINY_MODEL_NAME = "clip2scene-tiny"
_TINY_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

_LOCAL_DIR_PREFIX = "local-dir:"
_HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
_HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
_CLIP_WEIGHTS_HINT = "--clip-weights /path/to/open_clip_pytorch_model.bin"


@dataclass(frozen=True)
class DenseVariant:
    """How a training-free dense-CLIP method rewrites CLIP's last transformer block.

    All earlier blocks run unchanged. In the last block the attention weights become
    ``attention`` (all tokens, class token included, per head, scale ``head_dim ** -0.5``):

    * ``"value"``: identity, each token keeps its own value (MaskCLIP);
    * ``"qq+kk"``: ``softmax(q q^T) + softmax(k k^T)`` (SCLIP's correlative self-attention);
    * ``"qq"``: ``softmax(q q^T)`` (ClearCLIP);
    * ``"kk+gauss"``: ``softmax(k k^T + G)`` with G the Gaussian neighbourhood bias
      ``exp(-|p_i - p_j|^2 / (2 * gaussian_std^2))`` between patch positions (0 on the class
      token's row and column) (NACLIP).

    The attention output goes through ``out_proj`` (and the block's layer scale ``ls_1``, the
    identity in every released CLIP); ``residual`` adds it to the block input, otherwise it
    replaces it; ``ffn`` then adds the block's MLP branch. ``ln_post`` and the projection follow.
    """

    attention: str
    residual: bool
    ffn: bool
    source: str  # paper and official code
    gaussian_std: float = 0.0


# name -> method; `TeacherConfig.teacher` picks one.
TEACHERS: dict[str, DenseVariant] = {
    "maskclip": DenseVariant("value", True, True, "Zhou et al., ECCV 2022; github.com/chongzhou96/MaskCLIP"),
    "sclip": DenseVariant("qq+kk", True, True, "Wang et al., ECCV 2024; github.com/wangf3014/SCLIP"),
    "clearclip": DenseVariant("qq", False, False, "Lan et al., ECCV 2024; github.com/mc-lan/ClearCLIP"),
    "naclip": DenseVariant("kk+gauss", False, False, "Hajimiri et al., WACV 2025; github.com/sinahmr/NACLIP",
                           gaussian_std=5.0),
}

# Teachers that are not a MaskCLIP-style variant (`TeacherConfig.teacher`): the simulated teacher of
# clip2scene.precompute.simulated (built by the pipeline, SPECIAL_TEACHERS).
OTHER_TEACHERS = ("simulated",)

# PAMR as NACLIP's release runs it (pamr_steps=10, pamr_stride=(8, 16)).
PAMR_STEPS = 10
PAMR_DILATIONS = (8, 16)


def _hw_text(value) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, (tuple, list)) else repr(value)


@dataclass(frozen=True)
class TeacherConfig:
    """Which CLIP to use as the teacher and at which input resolution.

    Attributes:
        model: open_clip model name with a native ViT image tower (``"ViT-B-16"``, ``"ViT-L-14"``,
            ``"clip2scene-tiny"``, ...).
        weights: open_clip pretrained tag, local checkpoint file, ``"local-dir:DIR"`` or ``"none"``
            (see the module docstring).
        image_size: (H, W) the caller resizes images to before `MaskCLIP.dense_features`; both
            must be multiples of the patch size.
        seed: torch seed for ``weights="none"``.
        key_smoothing: MaskCLIP key smoothing of the class scores (`MaskCLIP.dense_outputs`;
            see `refine_scores`). Off by default, as in the MaskCLIP and CLIP2Scene releases.
        prompt_denoising: MaskCLIP prompt denoising: per image, classes whose highest
            probability over all patches is below ``denoise_threshold`` are removed (their
            scores set to `DENOISED_SCORE`). Off by default.
        denoise_threshold: prompt-denoising threshold on the per-class maximum probability
            (softmax over classes of ``100 * cosine``), in [0, 1]; MaskCLIP's ``pd_thresh``
            (0.5 in the MaskCLIP paper and the CLIP2Scene release).
        smoothing_threshold: key smoothing replaces a patch's scores only where its highest
            class probability is below this value (MaskCLIP's ``ks_thresh``; 1.0 in the
            CLIP2Scene release = every patch that is not already saturated at probability 1).
            Must be > 0; a value above 1 smooths every patch.

        teacher: which training-free dense-CLIP method rewrites the last block, a key of
            `TEACHERS`: ``"maskclip"`` (the paper's), ``"sclip"``, ``"clearclip"``, ``"naclip"``.
        window: (h, w) pixels of sliding-window inference, or None (the whole image in one
            pass). Windows tile the ``image_size`` input; both must be multiples of the patch
            size (checked by `load_teacher`). See `MaskCLIP.dense_outputs`.
        stride: (h, w) pixels between windows (<= window); None = half the window rounded down
            to the patch size (SCLIP/NACLIP evaluate with 224/112, ClearCLIP with 448/224).
        pamr: refine the class scores with PAMR (10 iterations, dilations 8 and 16, as NACLIP's
            release) on the teacher-input pixel grid; off by default. The logits of
            `MaskCLIP.dense_outputs` are then (B, C, H, W) pixel maps instead of patch maps.

    The four refinement fields only change the logits of `MaskCLIP.dense_outputs` (never the
    features) and are recorded in `MaskCLIP.fingerprint`, as are teacher, window, stride and pamr.
    Raises ConfigError (a ValueError) naming the option for a value out of range, an unknown
    teacher or a malformed window/stride.
    """

    model: str = "ViT-B-16"
    weights: str = "openai"
    image_size: tuple[int, int] = (224, 416)
    seed: int = 0
    key_smoothing: bool = False
    prompt_denoising: bool = False
    denoise_threshold: float = 0.5
    smoothing_threshold: float = 1.0
    teacher: str = "maskclip"  # a TEACHERS variant, or "simulated" (synthetic samples only; see precompute.simulated)
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    pamr: bool = False

    def __post_init__(self) -> None:
        """ConfigError naming the option and value for anything out of range (image_size is
        normalised to a tuple of two ints; multiples of the patch size are checked at load)."""
        from clip2scene.errors import ConfigError

        for name in ("model", "weights"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"--clip-{name} {getattr(self, name)!r}: expected a non-empty name")
        size = tuple(self.image_size) if isinstance(self.image_size, (tuple, list)) else ()
        if len(size) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in size):
            shown = "x".join(map(str, size)) if len(size) == 2 else repr(self.image_size)
            raise ConfigError(f"--image-size {shown}: expected two positive integers HxW, e.g. 224x416")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        for name in ("key_smoothing", "prompt_denoising"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} {getattr(self, name)!r}: expected True or False")
        d = self.denoise_threshold
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ConfigError(f"--denoise-threshold {d!r}: must lie in [0, 1] (denoise_threshold)")
        k = self.smoothing_threshold
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < k < float("inf"):
            raise ConfigError(f"smoothing_threshold {k!r}: must be a finite number > 0")
        if self.teacher not in TEACHERS and self.teacher not in OTHER_TEACHERS:
            raise ConfigError(f"--teacher {self.teacher!r}: unknown teacher; expected one of "
                              f"{', '.join((*TEACHERS, *OTHER_TEACHERS))}")
        if self.window is None and self.stride is not None:
            raise ConfigError(f"--stride {_hw_text(self.stride)}: given without a window (--window)")
        for name in ("window", "stride"):
            value = getattr(self, name)
            if value is None:
                continue
            if (not isinstance(value, (tuple, list)) or len(value) != 2
                    or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in value)):
                raise ConfigError(f"--{name} {value!r}: {name} must be two positive integers (H, W)")
            object.__setattr__(self, name, (int(value[0]), int(value[1])))
        if self.window is not None and self.stride is not None:
            if self.stride[0] > self.window[0] or self.stride[1] > self.window[1]:
                raise ConfigError(f"--stride {_hw_text(self.stride)} is larger than the window {_hw_text(self.window)}: "
                                  "windows would leave gaps")
        if not isinstance(self.pamr, bool):
            raise ConfigError(f"pamr {self.pamr!r}: expected True or False")


class WeightsNotFoundError(RuntimeError):
    """CLIP weights are not available locally; the message says which file to put where."""


# --------------------------------------------------------------------------------------------
# open_clip model registry helpers
# --------------------------------------------------------------------------------------------


def register_tiny_model(name: str = TINY_MODEL_NAME) -> str:
    """Add a tiny ViT CLIP config to open_clip's model registry (idempotent); return its name.

    The tiny model: joint dim 64; vision ViT width 64, 2 layers, 2 heads, patch 16, 64 x 64
    pretrained grid (4 x 4 patches); text width 64, 2 layers, 2 heads, context 77, CLIP's BPE
    vocabulary (49408). Meant for tests: builds and runs in milliseconds on a CPU.
    """
    import open_clip.factory as oc_factory

    oc_factory._MODEL_CONFIGS[name] = json.loads(json.dumps(_TINY_MODEL_CONFIG))
    return name


def _model_config(model_name: str) -> dict[str, Any]:
    """open_clip config dict of a registered model name; ValueError with close matches if unknown."""
    import open_clip

    if model_name == TINY_MODEL_NAME:
        register_tiny_model()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
        hint = f"; did you mean one of {close}?" if close else "; see open_clip.list_models()"
        raise ValueError(f"unknown open_clip model {model_name!r}{hint}")
    return cfg


def _check_dense_capable(model_name: str, model_cfg: dict[str, Any]) -> None:
    """Fail early for architectures the MaskCLIP ViT dense path does not support."""
    vision_cfg = model_cfg.get("vision_cfg", {})
    if vision_cfg.get("timm_model_name"):
        raise NotImplementedError(
            f"model {model_name!r} uses a timm image tower ({vision_cfg['timm_model_name']}); the "
            "MaskCLIP dense path supports open_clip's native VisionTransformer only"
        )
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise NotImplementedError(
            f"model {model_name!r} has a ResNet image tower; only the ViT MaskCLIP path is implemented"
        )
    if vision_cfg.get("attentional_pool"):
        raise NotImplementedError(f"model {model_name!r} uses an attentional pooler; not supported")
    if vision_cfg.get("pool_type", "tok") != "tok" or vision_cfg.get("final_ln_after_pool"):
        raise NotImplementedError(
            f"model {model_name!r} pools its tokens ({vision_cfg.get('pool_type', 'tok')}, ln_post after pooling) "
            "instead of projecting the class token; the dense teachers need class-token CLIP ViTs"
        )
    custom_keys = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
    if vision_cfg.get("block_type") == "custom" or any(vision_cfg.get(k) for k in custom_keys):
        raise NotImplementedError(
            f"model {model_name!r} uses open_clip's custom attention blocks; only the standard "
            "ResidualAttentionBlock (nn.MultiheadAttention) is supported"
        )


def _check_tokenizer_offline(model_name: str, model_cfg: dict[str, Any]) -> None:
    """Refuse tokenizers that open_clip would fetch from the Hugging Face hub."""
    hf_tok = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if hf_tok or "siglip" in model_name.lower():
        raise NotImplementedError(
            f"model {model_name!r} needs the Hugging Face tokenizer {hf_tok or '(SigLIP)'} which would be "
            "fetched from the hub; only models using open_clip's bundled CLIP BPE tokenizer are supported "
            "offline"
        )


@contextlib.contextmanager
def _quiet_open_clip_random_init() -> Iterator[None]:
    """Drop open_clip's root-logger 'initialized randomly' warning while we load weights ourselves."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    f = _Drop()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


# --------------------------------------------------------------------------------------------
# weight resolution and loading (never touches the network)
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in ``chunk_size`` chunks (streaming, constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _hf_hub_cache_dir() -> str:
    """The Hugging Face hub cache dir, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _clip_url_cache_dir() -> str:
    """open_clip's cache for URL downloads (OpenAI JIT archives)."""
    return os.path.expanduser("~/.cache/clip")


def _hf_cached_file(repo_id: str, filename: str, cache_dir: str) -> str | None:
    """Path of ``filename`` of ``repo_id`` in the local HF cache, or None; no network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return None
    found = try_to_load_from_cache(repo_id=repo_id, filename=filename, cache_dir=cache_dir)
    if isinstance(found, str) and os.path.isfile(found):
        return found
    return None


def _resolve_pretrained_tag(model_name: str, tag: str, pcfg: dict[str, Any]) -> str:
    """Local file for an open_clip pretrained tag, looked up where open_clip would cache it.

    Order: the HF hub cache (``open_clip_model.safetensors`` then the ``.bin`` of the tag's repo),
    then ``~/.cache/clip/<basename of the tag's URL>``. Raises `WeightsNotFoundError` listing every
    looked-at path.
    """
    looked: list[str] = []
    if pcfg.get("file"):
        if os.path.isfile(pcfg["file"]):
            return pcfg["file"]
        looked.append(os.path.abspath(pcfg["file"]))
    hf_hub = pcfg.get("hf_hub", "")
    repo_id = ""
    if hf_hub:
        repo_id, filename = os.path.split(hf_hub)
        candidates = [filename] if filename else [_HF_SAFE_WEIGHTS_NAME, _HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        cache_dir = _hf_hub_cache_dir()
        for fn in candidates:
            found = _hf_cached_file(repo_id, fn, cache_dir)
            if found:
                return found
        repo_dir = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
        looked.append(os.path.join(repo_dir, "snapshots", "<revision>", candidates[-1]))
    url = pcfg.get("url", "")
    if url:
        path = os.path.join(_clip_url_cache_dir(), os.path.basename(url))
        if os.path.isfile(path):
            return path
        looked.append(path)
    where = " and ".join(looked) if looked else "(no download location known for this tag)"
    fixes = []
    # a bare file given as weights is assumed to hold OpenAI weights (see _quick_gelu_for_file);
    # only suggest that route when the assumption gives this tag's activation.
    file_route_ok = _default_file_quick_gelu(model_name) == bool(pcfg.get("quick_gelu", False))
    if repo_id and file_route_ok:
        fixes.append(
            f"copy https://huggingface.co/{repo_id}/resolve/main/{_HF_WEIGHTS_NAME} to this machine and pass "
            f"{_CLIP_WEIGHTS_HINT}"
        )
    elif repo_id:
        fixes.append(
            f"copy open_clip_config.json and {_HF_WEIGHTS_NAME} from https://huggingface.co/{repo_id} into one "
            "folder DIR on this machine and use weights='local-dir:DIR'"
        )
    else:
        fixes.append(f"pass {_CLIP_WEIGHTS_HINT}")
    if url:
        fixes.append(f"put {url} at {os.path.join(_clip_url_cache_dir(), os.path.basename(url))}")
    if repo_id:
        fixes.append(f"fill the HF cache with `huggingface-cli download {repo_id}` (HF_HUB_CACHE={_hf_hub_cache_dir()})")
    raise WeightsNotFoundError(
        f"CLIP weights for model {model_name!r} pretrained={tag!r} not found locally (downloads are never "
        f"attempted); looked for {where}. Fix: " + "; or ".join(fixes)
    )


def _expected_sha256_prefix(pcfg: dict[str, Any], path: str) -> str:
    """sha256 prefix open_clip encodes in OpenAI URLs, when ``path`` came from the URL cache."""
    url = pcfg.get("url", "")
    if url and "openaipublic" in url and os.path.basename(path) == os.path.basename(url):
        if os.path.dirname(os.path.abspath(path)) == os.path.abspath(_clip_url_cache_dir()):
            return url.split("/")[-2]
    return ""


def _is_torchscript_archive(path: str) -> bool:
    """True for a TorchScript (``torch.jit.save``) zip archive such as OpenAI's ``ViT-B-16.pt``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/__torch__" in n for n in zf.namelist())


def _sibling_quick_gelu(path: str) -> bool | None:
    """Explicit ``quick_gelu`` of an ``open_clip_config.json`` beside the checkpoint, else None."""
    cfg_path = Path(path).parent / "open_clip_config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_cfg = cfg.get("model_cfg", cfg)
    return bool(model_cfg["quick_gelu"]) if "quick_gelu" in model_cfg else None


def _hf_cache_tag_quick_gelu(model_name: str, path: str) -> bool | None:
    """quick_gelu of the open_clip tag whose HF repo holds ``path`` (``.../models--ORG--NAME/...``)."""
    import open_clip

    repo = next((p[len("models--"):].replace("--", "/") for p in Path(path).parts if p.startswith("models--")), None)
    if repo is None:
        return None
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        pcfg = open_clip.get_pretrained_cfg(model_name, tag)
        if pcfg.get("hf_hub", "").rstrip("/").split("/")[:2] == repo.split("/")[:2]:
            return bool(pcfg.get("quick_gelu", False))
    return None


def _default_file_quick_gelu(model_name: str) -> bool:
    """Activation assumed for a bare checkpoint file: that of the architecture's OpenAI weights."""
    import open_clip

    return bool(open_clip.get_pretrained_cfg(model_name, "openai").get("quick_gelu", False))


def _quick_gelu_for_file(model_name: str, model_cfg: dict[str, Any], path: str, is_jit: bool) -> bool:
    """Activation a local checkpoint needs (weights do not record it). First match wins:

    1. the model config's own flag (e.g. ``"ViT-B-16-quickgelu"``) -> QuickGELU;
    2. an OpenAI JIT archive -> QuickGELU (all OpenAI releases use it);
    3. a file inside the HF hub cache of a known open_clip tag -> that tag's setting;
    4. an explicit ``quick_gelu`` in an ``open_clip_config.json`` beside the file;
    5. otherwise the file is assumed to hold the architecture's OpenAI weights (the paper's
       teacher): QuickGELU when open_clip's ``openai`` tag for it uses QuickGELU (logged).
    """
    if model_cfg.get("quick_gelu", False):
        return True
    if is_jit:
        return True
    for decided in (_hf_cache_tag_quick_gelu(model_name, path), _sibling_quick_gelu(path)):
        if decided is not None:
            return decided
    assumed = _default_file_quick_gelu(model_name)
    if assumed:
        logger.warning(
            "local checkpoint %s for %s: assuming OpenAI-trained weights and building with QuickGELU; for "
            "other weights (e.g. LAION) put the file in a folder with its open_clip_config.json and use "
            "weights='local-dir:DIR'",
            path,
            model_name,
        )
    return assumed


def _load_checkpoint_file(clip_model: nn.Module, path: str, is_jit: bool) -> None:
    """Load a local checkpoint into an open_clip model (strict), like ``open_clip.load_checkpoint``."""
    import open_clip

    if not is_jit:
        open_clip.load_checkpoint(clip_model, path, strict=True, weights_only=True, device="cpu")
        return
    from open_clip.convert import convert_state_dict
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated upstream
        archive = torch.jit.load(path, map_location="cpu")
    state_dict = {k: v for k, v in archive.state_dict().items()}
    for key in ("input_resolution", "context_length", "vocab_size"):
        state_dict.pop(key, None)
    # TorchScript keeps non-persistent buffers (open_clip's text attn_mask) in its state dict.
    persistent = set(clip_model.state_dict())
    for key, _ in clip_model.named_buffers():
        if key not in persistent:
            state_dict.pop(key, None)
    state_dict = convert_state_dict(clip_model, state_dict)
    if "logit_scale" in state_dict and clip_model.logit_scale.ndim != state_dict["logit_scale"].ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(clip_model.logit_scale.shape)
    resize_pos_embed(state_dict, clip_model)
    resize_text_pos_embed(state_dict, clip_model)
    clip_model.load_state_dict(state_dict, strict=True)


def _uses_quick_gelu(clip_model: nn.Module) -> bool:
    """Whether the built image tower's MLPs use QuickGELU (recorded in the fingerprint)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in clip_model.visual.modules())


def _build_clip(config: TeacherConfig) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Build the open_clip model + tokenizer on CPU in eval mode; return also fingerprint fields."""
    import open_clip

    weights = config.weights
    model_name = config.model.replace("/", "-")

    if weights.startswith(_LOCAL_DIR_PREFIX):
        folder = Path(weights[len(_LOCAL_DIR_PREFIX):]).expanduser()
        cfg_path = folder / "open_clip_config.json"
        if not cfg_path.is_file():
            raise WeightsNotFoundError(
                f"weights {weights!r}: expected an open_clip config at {cfg_path.absolute()} (and weights "
                f"such as {folder.absolute() / _HF_WEIGHTS_NAME}); or pass {_CLIP_WEIGHTS_HINT}"
            )
        from open_clip.factory import _find_checkpoint_in_dir

        ckpt = _find_checkpoint_in_dir(folder)
        if ckpt is None:
            raise WeightsNotFoundError(
                f"weights {weights!r}: no checkpoint (*.safetensors, *.bin, *.pth) in {folder.absolute()}; "
                f"put {_HF_WEIGHTS_NAME} there or pass {_CLIP_WEIGHTS_HINT}"
            )
        local_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        model_cfg = local_cfg.get("model_cfg", local_cfg)
        _check_dense_capable(weights, model_cfg)  # an HF tokenizer would load from DIR itself
        sha = file_sha256(ckpt)
        clip_model = open_clip.create_model(f"{_LOCAL_DIR_PREFIX}{folder}", device="cpu")
        tokenizer = open_clip.get_tokenizer(f"{_LOCAL_DIR_PREFIX}{folder}")
        info = {"model": model_name, "weights_sha256": sha, "quick_gelu": _uses_quick_gelu(clip_model)}
        logger.info("loaded CLIP %s from %s (sha256 %s)", model_name, ckpt, sha[:12])
        return clip_model.eval(), tokenizer, info

    model_cfg = _model_config(model_name)
    _check_dense_capable(model_name, model_cfg)
    _check_tokenizer_offline(model_name, model_cfg)

    if weights == "none":
        quick_gelu = bool(model_cfg.get("quick_gelu", False))
        logger.warning(
            "MaskCLIP teacher %s with RANDOM weights (weights='none', seed=%d): pseudo-labels will be "
            "meaningless; use this for tests and smoke runs only",
            model_name,
            config.seed,
        )
        with torch.random.fork_rng(devices=[]), _quiet_open_clip_random_init():
            torch.manual_seed(config.seed)
            clip_model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        sha = "random"
    else:
        pcfg = open_clip.get_pretrained_cfg(model_name, weights)
        if pcfg:
            path = _resolve_pretrained_tag(model_name, weights, pcfg)
            tag_qg = bool(pcfg.get("quick_gelu", False))
            if bool(model_cfg.get("quick_gelu", False)) != tag_qg:
                logger.warning("model %s config and tag %r disagree on QuickGELU; using the tag's (%s)",
                               model_name, weights, tag_qg)
            quick_gelu = tag_qg
        else:
            path = os.path.expanduser(weights)
            if not os.path.isfile(path):
                tags = open_clip.list_pretrained_tags_by_model(model_name)
                raise WeightsNotFoundError(
                    f"weights {weights!r} for model {model_name!r} is neither an existing checkpoint file "
                    f"({os.path.abspath(path)} does not exist) nor a known open_clip pretrained tag "
                    f"(known: {', '.join(tags) if tags else 'none'}), nor 'local-dir:DIR' or 'none'"
                )
            quick_gelu = None  # decided below, needs is_jit
        is_jit = _is_torchscript_archive(path)
        if quick_gelu is None:
            quick_gelu = _quick_gelu_for_file(model_name, model_cfg, path, is_jit)
        sha = file_sha256(path)
        expected = _expected_sha256_prefix(pcfg, path) if pcfg else ""
        if expected and not sha.startswith(expected):
            raise WeightsNotFoundError(
                f"{path} has sha256 {sha}, expected a prefix {expected} (corrupt or partial download); "
                f"replace that file or pass {_CLIP_WEIGHTS_HINT}"
            )
        with _quiet_open_clip_random_init():
            clip_model = open_clip.create_model(
                model_name, pretrained=None, device="cpu", force_quick_gelu=quick_gelu
            )
        _load_checkpoint_file(clip_model, path, is_jit)
        logger.info("loaded CLIP %s weights from %s (sha256 %s, quick_gelu=%s)", model_name, path, sha[:12], quick_gelu)

    tokenizer = open_clip.get_tokenizer(model_name)
    info = {"model": model_name, "weights_sha256": sha, "quick_gelu": _uses_quick_gelu(clip_model)}
    return clip_model.eval(), tokenizer, info


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


# --------------------------------------------------------------------------------------------
# dense image side
# --------------------------------------------------------------------------------------------


def resize_positional_embedding(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize a ViT positional embedding to a new patch grid, keeping the class-token row.

    Args:
        pos_embed: (1 + gh*gw, W) class-token row then patch rows in row-major grid order.
        old_grid: (gh, gw) the grid ``pos_embed`` was trained for.
        new_grid: (h, w) target grid.

    Returns:
        (1 + h*w, W) in ``pos_embed``'s dtype; the patch part is resized bicubically
        (``align_corners=False``, as MaskCLIP does); returned unchanged when the grids match.
    """
    gh, gw = old_grid
    h, w = new_grid
    if pos_embed.shape[0] != 1 + gh * gw:
        raise ValueError(f"pos_embed has {pos_embed.shape[0]} rows, expected 1 + {gh}*{gw}")
    if (gh, gw) == (h, w):
        return pos_embed
    width = pos_embed.shape[1]
    cls_pos, patch_pos = pos_embed[:1], pos_embed[1:]
    patch_pos = patch_pos.reshape(1, gh, gw, width).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(h * w, width).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


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


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """First pixel of each sliding window along one axis of ``size`` pixels.

    The windows of SCLIP/ClearCLIP/NACLIP (mmseg's ``slide_inference``): starts at 0, stride,
    2*stride, ... while the window would end inside the image, then one last window flush with
    the image's end; a window larger than the image covers the whole axis (start 0, clipped).
    With ``size``, ``window`` and ``stride`` multiples of the patch size every window starts on a
    patch boundary. Every pixel is covered when ``stride <= window``.
    """
    if size <= 0 or window <= 0 or stride <= 0:
        raise ValueError(f"size, window and stride must be positive, got {size}, {window}, {stride}")
    n = max(size - window + stride - 1, 0) // stride + 1
    starts = []
    for i in range(n):
        end = min(i * stride + window, size)
        starts.append(max(end - window, 0))
    return starts


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


class MaskCLIP(nn.Module):
    """Frozen dense-CLIP teacher (MaskCLIP or another `TEACHERS` variant): dense ViT features and
    class text embeddings.

    Build it with `load_teacher` (or `MaskCLIP.from_clip` from an open_clip model in memory). It
    keeps only the image tower (``self.visual``); the text tower is used once to compute
    ``text_embeddings`` and then dropped. The module stays in eval mode (``train()`` is a no-op)
    and its parameters do not require grad.

    Attributes:
        embed_dim: D, the joint embedding dim (512 for ViT-B-16).
        patch_size: (ph, pw) of the ViT.
        image_size: (H, W) the caller should resize images to (from `TeacherConfig`).
        class_names: the C class names, in text-embedding row order.
        text_embeddings: buffer (C, D) float32, rows L2-normalised.
        fingerprint: JSON-able dict identifying the teacher outputs: ``model``, ``weights`` (as
            given), ``weights_sha256`` (hex or ``"random"``), ``quick_gelu``, ``image_size``
            [H, W], ``class_names``, ``templates_sha256``, ``embed_dim``, ``patch_size`` (int, or
            [ph, pw] if not square), and the logit refinements ``key_smoothing``,
            ``prompt_denoising`` (bools), ``denoise_threshold``, ``smoothing_threshold`` (floats,
            recorded as given even when their refinement is off), ``teacher`` (a `TEACHERS` key),
            ``window`` and ``stride`` ([h, w] pixels or None), ``pamr`` (bool).
        teacher, variant: the `TEACHERS` name and its `DenseVariant` (the last block's rewrite).
        window, stride: sliding windows (h, w) in pixels, or None (whole image); see `dense_outputs`.
        pamr: whether `dense_outputs` refines the logits with `pamr`.
        key_smoothing, prompt_denoising, denoise_threshold, smoothing_threshold: the logit
            refinements of `dense_outputs` (see `TeacherConfig` and `refine_scores`).
    """

    text_embeddings: torch.Tensor

    def __init__(
        self,
        visual: nn.Module,
        text_embeddings: torch.Tensor,
        class_names: Sequence[str],
        image_size: tuple[int, int],
        fingerprint: dict[str, Any],
        *,
        key_smoothing: bool = False,
        prompt_denoising: bool = False,
        denoise_threshold: float = 0.5,
        smoothing_threshold: float = 1.0,
        teacher: str = "maskclip",
        window: tuple[int, int] | None = None,
        stride: tuple[int, int] | None = None,
        pamr: bool = False,
    ) -> None:
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        if teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {teacher!r}; expected one of {', '.join(TEACHERS)}")

        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(f"MaskCLIP needs an open_clip VisionTransformer, got {type(visual).__name__}")
        if visual.attn_pool is not None or visual.proj is None:
            raise NotImplementedError("MaskCLIP needs a ViT with class-token pooling and a visual projection")
        if not all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks):
            raise NotImplementedError("MaskCLIP needs standard ResidualAttentionBlocks")
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] != len(class_names):
            raise ValueError(f"text_embeddings {tuple(text_embeddings.shape)} do not match {len(class_names)} classes")
        self.visual = visual.eval().requires_grad_(False)
        self.register_buffer("text_embeddings", text_embeddings.detach().float().contiguous())
        self.register_buffer("_mean", torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.embed_dim = int(text_embeddings.shape[1])
        if int(visual.proj.shape[1]) != self.embed_dim:
            raise ValueError(f"visual projection gives {visual.proj.shape[1]}-d features, text {self.embed_dim}-d")
        self.patch_size = tuple(int(p) for p in visual.patch_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.class_names = list(class_names)
        _check_refinements(denoise_threshold, smoothing_threshold)
        self.key_smoothing = bool(key_smoothing)
        self.prompt_denoising = bool(prompt_denoising)
        self.denoise_threshold = float(denoise_threshold)
        self.smoothing_threshold = float(smoothing_threshold)
        self.teacher = teacher
        self.variant = TEACHERS[teacher]
        if self.variant.attention != "value" and any(b.attn.in_proj_weight is None for b in visual.transformer.resblocks[-1:]):
            raise NotImplementedError(f"teacher {teacher!r} needs a packed q/k/v projection (in_proj_weight)")
        if stride is not None and window is None:
            raise ValueError("a stride needs a window")
        self.window = None if window is None else (int(window[0]), int(window[1]))
        if self.window is not None and stride is None:  # half the window, in whole patches
            stride = tuple(max(p, w // 2 // p * p) for w, p in zip(self.window, self.patch_size))
        self.stride = None if stride is None else (int(stride[0]), int(stride[1]))
        for name, value in (("window", self.window), ("stride", self.stride)):
            if value is not None and (value[0] % self.patch_size[0] or value[1] % self.patch_size[1] or min(value) <= 0):
                raise ValueError(f"{name} {_hw_text(value)} must be positive multiples of the patch size "
                                 f"{_hw_text(self.patch_size)}")
        if self.window is not None and (self.stride[0] > self.window[0] or self.stride[1] > self.window[1]):
            raise ValueError(f"stride {_hw_text(self.stride)} is larger than the window {_hw_text(self.window)}")
        self.pamr = bool(pamr)
        self._bias_cache: dict[tuple, torch.Tensor] = {}
        self.fingerprint = dict(fingerprint)
        self.fingerprint.update(
            {
                "key_smoothing": self.key_smoothing,
                "prompt_denoising": self.prompt_denoising,
                "denoise_threshold": self.denoise_threshold,
                "smoothing_threshold": self.smoothing_threshold,
                "teacher": self.teacher,
                "window": None if self.window is None else list(self.window),
                "stride": None if self.stride is None else list(self.stride),
                "pamr": self.pamr,
            }
        )
        super().train(False)

    @classmethod
    def from_clip(
        cls,
        clip_model: nn.Module,
        tokenizer: Any,
        class_names: Sequence[str],
        *,
        templates: Sequence[str] = TEMPLATES,
        image_size: tuple[int, int] = (224, 416),
        device: str | torch.device = "cpu",
        fingerprint: dict[str, Any] | None = None,
        key_smoothing: bool = False,
        prompt_denoising: bool = False,
        denoise_threshold: float = 0.5,
        smoothing_threshold: float = 1.0,
        teacher: str = "maskclip",
        window: tuple[int, int] | None = None,
        stride: tuple[int, int] | None = None,
        pamr: bool = False,
    ) -> MaskCLIP:
        """Wrap an open_clip CLIP model already in memory (moved to ``device``, eval mode).

        ``fingerprint`` supplies ``model``/``weights``/``weights_sha256``/``quick_gelu`` (defaults:
        ``"unknown"``); the shape/prompt fields are filled in here, the refinement fields by
        ``__init__`` from the refinement arguments (see `TeacherConfig`).
        """
        clip_model = clip_model.to(device).eval()
        text = encode_text(clip_model, tokenizer, class_names, templates, device)
        ps = tuple(int(p) for p in clip_model.visual.patch_size)
        fp = {"model": "unknown", "weights": "unknown", "weights_sha256": "unknown", "quick_gelu": None}
        fp.update(fingerprint or {})
        fp.update(
            {
                "image_size": [int(image_size[0]), int(image_size[1])],
                "class_names": list(class_names),
                "templates_sha256": templates_sha256(templates),
                "embed_dim": int(text.shape[1]),
                "patch_size": ps[0] if ps[0] == ps[1] else list(ps),
            }
        )
        return cls(
            clip_model.visual, text, class_names, image_size, fp, key_smoothing=key_smoothing,
            prompt_denoising=prompt_denoising, denoise_threshold=denoise_threshold,
            smoothing_threshold=smoothing_threshold, teacher=teacher, window=window, stride=stride, pamr=pamr,
        )

    # -- module plumbing ------------------------------------------------------------------
    precision: str = "float32"  # compute precision of the image tower (see set_precision)

    def set_precision(self, precision: str) -> MaskCLIP:
        """Choose the image tower's compute precision: ``"float32"``, ``"bfloat16"``, ``"float16"``
        or ``"auto"`` (`resolve_precision`). Call after moving the teacher to its device.

        On CUDA the weights stay float32 and `autocast` runs the tower in the half type. On the
        CPU, ``"bfloat16"`` casts the tower's weights to bfloat16 (oneDNN runs them on AMX tiles
        where the CPU has them; autocast on the CPU sends nn.MultiheadAttention down a slow
        broadcasting path, casting the weights keeps its fused kernel); ``"float16"`` on the CPU is
        refused (no fast kernels), and so is going back from bfloat16 weights to float32 (the cast
        is lossy: load the teacher again). Outputs stay float32 either way. Returns self.
        """
        dev = self.device
        precision = resolve_precision(precision, dev)
        if dev.type == "cpu" and precision == "float16":
            raise ValueError("teacher precision float16 needs a CUDA device; use bfloat16 or float32 on the CPU")
        want = torch.bfloat16 if (dev.type == "cpu" and precision == "bfloat16") else torch.float32
        have = self.visual.conv1.weight.dtype
        if have != want and have != torch.float32:
            raise ValueError(f"the image tower's weights were cast to {str(have)[6:]}; load the teacher again for {precision}")
        if have != want:
            self.visual.to(want)
        self.precision = precision
        return self

    def autocast(self):
        """Context manager for a forward pass at `precision` (autocast on CUDA, nothing on CPU,
        where `set_precision` already cast the weights)."""
        dev = self.device
        half = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.precision)
        return torch.autocast(device_type="cuda", dtype=half or torch.float16, enabled=dev.type == "cuda" and half is not None)

    def train(self, mode: bool = True) -> MaskCLIP:
        """No-op: the teacher is frozen and always in eval mode (no patch dropout, no dropout)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the teacher's weights."""
        return self.text_embeddings.device

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) patch grid of `dense_features` for images of ``image_size``."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    # -- image side ----------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP mean/std normalisation.

        Args:
            images: (B, 3, H, W) floating point RGB in [0, 1] (any device; moved to the teacher's).

        Returns:
            (B, 3, H, W) float32 on the teacher's device, ``(images - CLIP_MEAN) / CLIP_STD``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
        images = images.to(device=self.device, dtype=torch.float32)
        return (images - self._mean) / self._std

    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1 + h*w, width) positional embedding for a (h, w) patch grid (class row kept)."""
        v = self.visual
        return resize_positional_embedding(v.positional_embedding.float(), tuple(v.grid_size), grid)

    @torch.no_grad()
    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """Dense patch features of the configured teacher (`TEACHERS`), whole-image or windowed.

        Args:
            images: (B, 3, H, W) float RGB in [0, 1]. Resizing to ``image_size`` is the caller's
                job; H and W need not equal it (the positional embedding is resized to the
                patch grid), and trailing rows/columns that do not fill a whole patch are dropped
                (grid = floor(H/ph) x floor(W/pw)). Patch (i, j) covers pixels
                [i*ph, (i+1)*ph) x [j*pw, (j+1)*pw), also with sliding windows.

        Returns:
            (B, D, H // ph, W // pw) float32 on the teacher's device, L2-normalised along D.
            With sliding windows, the mean over the windows covering a patch, normalised again.
            Computed under ``torch.no_grad`` (an ordinary tensor, not an inference tensor).
        """
        return self._dense(images, scores=False)[0]

    @torch.no_grad()
    def dense_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense features and class logits, with the configured refinements.

        Args:
            images: (B, 3, H, W) float RGB in [0, 1], as for `dense_features`.

        Returns:
            ``(features, logits)``: features (B, D, h, w) float32, L2-normalised along D, equal
            to ``dense_features(images)``; logits (B, C, h, w) float32 on the teacher's device,
            class order ``class_names``. Without refinements (the default) logits are the cosines
            of each window's features with ``text_embeddings``, averaged over the windows covering
            a patch (SCLIP/ClearCLIP/NACLIP average logits on overlaps; one window = the whole
            image without ``window``). With ``prompt_denoising`` and/or ``key_smoothing`` they are
            `refine_scores` of those cosines: denoising is decided per image on the averaged
            scores (`denoised_classes`), key smoothing runs per window with that window's keys
            and the windows' results are averaged; removed classes score `DENOISED_SCORE`. With
            ``pamr`` the logits are upsampled bilinearly to the (H', W') = (h*ph, w*pw) input
            pixels (align_corners=False) and refined by `pamr`: (B, C, H', W'), pixel (i, j)
            centred at (i + 0.5, j + 0.5) of the input. Sample or upsample these logits (not the
            features) to use the refinements.
        """
        return self._dense(images, scores=True)

    def _windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(y, x, h, w) pixel boxes of the windows over a (height, width) input (one without window)."""
        if self.window is None:
            return [(0, 0, height, width)]
        ys = window_starts(height, self.window[0], self.stride[0])
        xs = window_starts(width, self.window[1], self.stride[1])
        h, w = min(self.window[0], height), min(self.window[1], width)
        return [(y, x, h, w) for y in ys for x in xs]

    def _dense(self, images: torch.Tensor, scores: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (B, D, h, w) and, if ``scores``, refined logits; see `dense_outputs`."""
        ph, pw = self.patch_size
        gh, gw = images.shape[-2] // ph, images.shape[-1] // pw
        if gh == 0 or gw == 0:
            raise ValueError(f"images {tuple(images.shape[-2:])} smaller than one patch {self.patch_size}")
        images = images[..., : gh * ph, : gw * pw]
        windows = self._windows(gh * ph, gw * pw)
        smooth = scores and self.key_smoothing
        feat_sum = score_sum = None
        count = torch.zeros(gh, gw, device=self.device)
        per_window = []  # (grid slice, raw scores, keys) for key smoothing
        for y, x, h, w in windows:
            tokens, grid = self._last_block_input(images[..., y:y + h, x:x + w])
            f = self._dense_head(tokens, grid)  # (B, D, h/ph, w/pw)
            cell = (slice(None), slice(None), slice(y // ph, y // ph + grid[0]), slice(x // pw, x // pw + grid[1]))
            if len(windows) == 1:
                feat_sum = f
            else:
                feat_sum = torch.zeros(f.shape[0], f.shape[1], gh, gw, device=f.device) if feat_sum is None else feat_sum
                feat_sum[cell] += f
            count[cell[2:]] += 1
            if scores:
                sc = self.logits(f.movedim(1, -1)).movedim(-1, 1).contiguous()  # (B, C, h/ph, w/pw)
                if len(windows) == 1:
                    score_sum = sc
                else:
                    score_sum = torch.zeros(sc.shape[0], sc.shape[1], gh, gw, device=sc.device) if score_sum is None else score_sum
                    score_sum[cell] += sc
                if smooth:
                    per_window.append((cell, sc, self._last_block_keys(tokens)))
        if len(windows) == 1:
            feats = feat_sum
        else:
            feats = F.normalize(feat_sum / count, dim=1)
        if not scores:
            return feats, None
        out = score_sum if len(windows) == 1 else score_sum / count
        if self.prompt_denoising or self.key_smoothing:
            b, c = out.shape[:2]
            if self.prompt_denoising:
                removed = denoised_classes(out.reshape(b, c, -1), self.denoise_threshold)
            else:
                removed = torch.zeros(b, c, dtype=torch.bool, device=out.device)
            if smooth:
                smoothed = torch.zeros_like(out)
                for cell, sc, keys in per_window:
                    r = refine_scores(sc.reshape(b, c, -1), keys, key_smoothing=True, removed=removed,
                                      smoothing_threshold=self.smoothing_threshold)
                    smoothed[cell] += r.reshape(sc.shape)
                out = smoothed if len(windows) == 1 else smoothed / count
            out = out.masked_fill(removed[:, :, None, None], DENOISED_SCORE)
        if self.pamr:
            rgb = self.normalize(images)
            out = F.interpolate(out, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
            out = pamr(rgb, out)
        return feats, out

    def _last_block_input(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Run the ViT up to the last block: ((B, 1 + h*w, width) batch-first tokens, (h, w))."""
        v = self.visual
        x = self.normalize(images)
        x = v.conv1(x.to(v.conv1.weight.dtype))  # (B, width, h, w)
        b, width, h, w = x.shape
        if h == 0 or w == 0:
            raise ValueError(f"images {tuple(images.shape[-2:])} smaller than one patch {self.patch_size}")
        x = x.reshape(b, width, h * w).permute(0, 2, 1)  # (B, h*w, width)
        cls_tok = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
        x = torch.cat([cls_tok, x], dim=1)  # (B, 1 + h*w, width)
        x = x + self.positional_embedding((h, w)).to(x.dtype)
        # patch dropout is the identity in eval mode and is skipped: every patch is needed.
        x = v.ln_pre(x)

        transformer = v.transformer
        blocks = transformer.resblocks
        if not transformer.batch_first:
            x = x.transpose(0, 1).contiguous()  # NLD -> LND, as Transformer.forward
        for blk in blocks[:-1]:
            x = blk(x, attn_mask=None)
        if not transformer.batch_first:
            x = x.transpose(0, 1)  # LND -> NLD
        return x, (h, w)

    def _dense_head(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The teacher's last block, ln_post, projection: (B, 1 + h*w, width) -> (B, D, h, w) unit norm."""
        v = self.visual
        h, w = grid
        x = self._last_block(v.transformer.resblocks[-1], x, grid)  # (B, 1 + h*w, width)
        x = v.ln_post(x[:, 1:])  # patch tokens only
        x = x @ v.proj  # (B, h*w, D)
        x = x.float().permute(0, 2, 1).reshape(x.shape[0], -1, h, w)
        return F.normalize(x, dim=1)

    def _last_block(self, blk: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The last block as `variant` rewrites it (see `DenseVariant`).

        ``x``: (B, N = 1 + h*w, width) batch-first; returns the same shape. Attention runs per head
        through ``scaled_dot_product_attention`` (default scale ``head_dim ** -0.5``): q-q and k-k
        attention are SDPA with the query as its own key; SCLIP's sum of two attention maps times
        v is the sum of two SDPA outputs.
        """
        spec = self.variant
        if spec.attention == "value":
            return self._value_only_block(blk, x)
        attn = blk.attn
        b, n, width = x.shape
        heads = attn.num_heads
        y = blk.ln_1(x)
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3 width)
        q, k, v = qkv.view(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
        if spec.attention == "qq+kk":
            o = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        elif spec.attention == "qq":
            o = F.scaled_dot_product_attention(q, q, v)
        elif spec.attention == "kk+gauss":
            key = (grid, str(k.device), k.dtype)  # k's dtype: the autocast dtype on CUDA
            if key not in self._bias_cache:
                self._bias_cache[key] = neighbourhood_bias(grid, spec.gaussian_std, device=k.device, dtype=k.dtype)
            o = F.scaled_dot_product_attention(k, k, v, attn_mask=self._bias_cache[key])
        else:  # pragma: no cover - TEACHERS is fixed
            raise NotImplementedError(spec.attention)
        branch = blk.ls_1(attn.out_proj(o.transpose(1, 2).reshape(b, n, width)))
        x = x + branch if spec.residual else branch
        if spec.ffn:
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return x

    def _last_block_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of the patch tokens in the last block: ``k(ln_1 x)``, (B, h*w, width) float32.

        ``x``: (B, 1 + h*w, width) batch-first input of the last block. The key projection is
        the middle slice of ``attn.in_proj_weight``/``in_proj_bias`` (or ``k_proj_weight``).
        """
        blk = self.visual.transformer.resblocks[-1]
        attn = blk.attn
        width = x.shape[-1]
        y = blk.ln_1(x[:, 1:])
        if attn.in_proj_weight is not None:
            w_k = attn.in_proj_weight[width:2 * width]
        else:  # separate projections (kdim/vdim != embed_dim)
            w_k = attn.k_proj_weight
        b_k = attn.in_proj_bias[width:2 * width] if attn.in_proj_bias is not None else None
        return F.linear(y, w_k, b_k).float()

    @staticmethod
    def _value_only_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Last block with query-key attention skipped: ``x + out_proj(v(ln_1 x))`` then the MLP.

        ``x``: (B, N, width) batch-first. Honours the block's layer-scale modules ``ls_1``/``ls_2``.
        """
        attn = blk.attn
        width = x.shape[-1]
        y = blk.ln_1(x)
        if attn.in_proj_weight is not None:
            w_v = attn.in_proj_weight[2 * width:]
        else:  # separate projections (kdim/vdim != embed_dim)
            w_v = attn.v_proj_weight
        b_v = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
        v = F.linear(y, w_v, b_v)
        x = x + blk.ls_1(attn.out_proj(v))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return x

    # -- text side -----------------------------------------------------------------------
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of features with the class text embeddings.

        Args:
            features: (..., D) L2-normalised features (e.g. ``dense_features(x).movedim(1, -1)``
                or features sampled at projected points), any float dtype.

        Returns:
            (..., C) float32 in [-1, 1] (up to rounding). Differentiable in ``features``.
        """
        if features.shape[-1] != self.embed_dim:
            raise ValueError(f"features last dim {features.shape[-1]} != embed_dim {self.embed_dim}")
        te = self.text_embeddings
        return features.to(device=te.device, dtype=te.dtype) @ te.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Alias of `dense_features`."""
        return self.dense_features(images)


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


def load_teacher(
    config: TeacherConfig,
    class_names: Sequence[str],
    device: str | torch.device = "cpu",
    templates: Sequence[str] = TEMPLATES,
) -> MaskCLIP:
    """Build the frozen MaskCLIP teacher described by ``config`` on ``device``.

    Weights are resolved locally only (see the module docstring); the model is built on CPU with
    the activation the weights need, loaded strictly, moved to ``device``; text embeddings for
    ``class_names`` x ``templates`` are computed there; the text tower is then dropped.

    Raises:
        WeightsNotFoundError: weights not available locally (message names the expected path).
        ValueError: unknown model name, empty class list, image_size not a multiple of the patch,
            refinement threshold out of range.
        NotImplementedError: image tower other than open_clip's standard ViT, or a tokenizer
            that would need the Hugging Face hub.
    """
    if not class_names:
        raise ValueError("class_names is empty")
    if len(config.image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {config.image_size!r}")
    _check_refinements(config.denoise_threshold, config.smoothing_threshold)
    clip_model, tokenizer, info = _build_clip(config)
    ps = tuple(int(p) for p in clip_model.visual.patch_size)
    h, w = (int(s) for s in config.image_size)
    if h % ps[0] or w % ps[1] or h <= 0 or w <= 0:
        raise ValueError(f"image_size {config.image_size} must be positive multiples of the patch size {ps}")
    for name, value in (("window", config.window), ("stride", config.stride)):
        if value is not None and (value[0] % ps[0] or value[1] % ps[1]):
            raise ValueError(f"{name} {_hw_text(value)} must be a multiple of the patch size {_hw_text(ps)}")
    fingerprint = {"model": info["model"], "weights": config.weights, "weights_sha256": info["weights_sha256"],
                   "quick_gelu": info["quick_gelu"]}
    teacher = MaskCLIP.from_clip(
        clip_model, tokenizer, class_names, templates=templates, image_size=(h, w), device=device,
        fingerprint=fingerprint, key_smoothing=config.key_smoothing, prompt_denoising=config.prompt_denoising,
        denoise_threshold=config.denoise_threshold, smoothing_threshold=config.smoothing_threshold,
        teacher=config.teacher, window=config.window, stride=config.stride, pamr=config.pamr,
    )
    logger.info(
        "%s teacher ready: %s (%s), %d classes x %d templates, image %dx%d -> grid %dx%d, D=%d, window %s, on %s",
        config.teacher, info["model"], config.weights, len(class_names), len(templates), h, w, *teacher.grid_size,
        teacher.embed_dim, "none" if teacher.window is None else
        f"{_hw_text(teacher.window)} stride {_hw_text(teacher.stride)}", teacher.device,
    )
    if config.key_smoothing or config.prompt_denoising:
        logger.info(
            "MaskCLIP logit refinements: key_smoothing=%s (threshold %g), prompt_denoising=%s (threshold %g)",
            config.key_smoothing, config.smoothing_threshold, config.prompt_denoising, config.denoise_threshold,
        )
    return teacher
