"""`TeacherConfig` (which CLIP, which dense variant, which refinements, which resolution) and the
name -> `DenseVariant` dict `TEACHERS` of training-free dense-CLIP methods."""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass

from clip2scene.validation import opt


logger = logging.getLogger(__name__)

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
# clip2scene.precompute.teacher.simulated (built by the pipeline, SPECIAL_TEACHERS).
OTHER_TEACHERS = ("simulated",)


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

    model: str = opt("ViT-B-16", "open_clip ViT backbone (ViT-B-16, ViT-L-14, ViT-B-16-quickgelu, ...), or none: "
                                 "cache points and labels only (no teacher).", flag="--clip-model")
    weights: str = opt("openai", "open_clip tag, checkpoint file, local-dir:DIR, or none (random).",
                       flag="--clip-weights")
    image_size: tuple[int, int] = opt((224, 416), "Teacher input size HxW (default per dataset: nuscenes 224x416, "
                                      "semantickitti 128x416, scannet 240x320; with --window the full camera "
                                      "resolution, nuscenes 896x1600, semantickitti 384x1248, scannet 480x640; "
                                      "rounded to the patch size).", parse="hw")
    seed: int = opt(0, "Torch seed of a random teacher (--clip-weights none).", cli=False)
    key_smoothing: bool = opt(False, "MaskCLIP key smoothing of the class scores.")
    prompt_denoising: bool = opt(False, "MaskCLIP prompt denoising (drop classes absent from an image).")
    denoise_threshold: float = opt(0.5, "Prompt-denoising threshold on a class's max probability.")
    smoothing_threshold: float = opt(1.0, "Key smoothing only where a patch's top class probability is below this.",
                                     cli=False)
    teacher: str = opt("maskclip", "Dense-CLIP method: maskclip (the paper's), sclip, clearclip, naclip (docs: "
                                   "Choosing a teacher); or simulated: make-sample data only, MaskCLIP-shaped outputs "
                                   "with CLIP-like errors from the sample's class maps, no weights "
                                   "(--clip-model/--clip-weights ignored; docs/simulated-teacher.md).")
    window: tuple[int, int] | None = opt(None, "Sliding-window inference: window N or HxW pixels of the teacher input "
                                               "(e.g. 448), logits averaged on overlaps; default: the whole image at "
                                               "once.", parse="window")
    stride: tuple[int, int] | None = opt(None, "Sliding-window stride N or HxW pixels (default half the window, in "
                                               "whole patches).", parse="window")
    pamr: bool = opt(False, "PAMR refinement of the class scores on the teacher-input pixels (NACLIP's "
                            "post-processing).")

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
