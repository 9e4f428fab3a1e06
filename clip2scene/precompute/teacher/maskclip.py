"""The MaskCLIP teacher: dense, training-free CLIP features from an open_clip ViT (method.md §2).

MaskCLIP turns CLIP's image encoder into a dense one without any training: all transformer
blocks but the last run as usual; in the last block the query-key attention is skipped and each
token keeps only its own value projection (``x + out_proj(v(ln_1(x)))``, then the block's MLP),
followed by ``ln_post`` and the visual projection. Every patch token thus becomes a feature in
CLIP's joint image-text space and can be compared with class text embeddings (cosine
similarity) to give per-pixel pseudo-labels.

Usage::

    from clip2scene.classes import NUSCENES_CLASSES
    from clip2scene.precompute.teacher import TeacherConfig, load_teacher

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

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip2scene.precompute.teacher.config import TEACHERS, TeacherConfig, _hw_text
from clip2scene.precompute.teacher.precision import resolve_precision
from clip2scene.precompute.teacher.prompts import TEMPLATES, templates_sha256
from clip2scene.precompute.teacher.refine import (DENOISED_SCORE, _check_refinements, denoised_classes, neighbourhood_bias, pamr,
                                                 refine_scores)
from clip2scene.precompute.teacher.text import encode_text
from clip2scene.precompute.teacher.weights import _build_clip

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
