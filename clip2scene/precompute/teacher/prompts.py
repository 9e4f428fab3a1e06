"""Prompt templates and class-name handling for the MaskCLIP text side.

CLIP2Scene builds one text embedding per class from 85 prompt templates: the 80 standard CLIP
ImageNet templates (from the CLIP paper's notebook, identical to open_clip's
``OPENAI_IMAGENET_TEMPLATES``) followed by 5 scene templates (method.md section 2). Each template
holds one ``{}`` that ``str.format`` fills with the class name.

Usage::

    from clip2scene.precompute.teacher.prompts import TEMPLATES, prompt_name, templates_sha256
    texts = [t.format(prompt_name("traffic_cone")) for t in TEMPLATES]   # 85 strings
    templates_sha256(TEMPLATES)   # goes into the teacher fingerprint / cache metadata

Pure Python (no torch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "IMAGENET_TEMPLATES",
    "SCENE_TEMPLATES",
    "TEMPLATES",
    "prompt_name",
    "templates_sha256",
]

# The 80 CLIP ImageNet prompt templates, in the order of the CLIP notebook / open_clip.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 5 scene templates CLIP2Scene adds (method.md section 2).
SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

# All 85 templates, ImageNet ones first.
TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + SCENE_TEMPLATES


def templates_sha256(templates: Sequence[str]) -> str:
    """Hex sha256 of ``"\\n".join(templates)`` encoded as UTF-8 (order-sensitive)."""
    return hashlib.sha256("\n".join(templates).encode("utf-8")).hexdigest()


def prompt_name(class_name: str) -> str:
    """Text put into a template for a class: the name verbatim.

    Names are kept exactly as in the CLIP2Scene release, underscores included (``"traffic_cone"``
    stays ``"traffic_cone"``); cleaner names are a class-set decision made in
    ``clip2scene.classes``, not here.
    """
    return class_name
