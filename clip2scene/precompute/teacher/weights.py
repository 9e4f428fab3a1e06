"""CLIP weights lookup and model building (never touches the network): open_clip tags in the local
caches, local checkpoint files, ``local-dir:DIR``, ``none``; the tiny test model. See
:mod:`clip2scene.precompute.teacher`."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip2scene.precompute.teacher.config import TeacherConfig

logger = logging.getLogger(__name__)

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
