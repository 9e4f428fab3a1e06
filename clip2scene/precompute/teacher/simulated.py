"""A simulated teacher for the synthetic samples: MaskCLIP-shaped outputs with CLIP-like errors.

No CLIP weights can be had offline, and a randomly initialised ViT gives meaningless
pseudo-labels, so nothing downstream of it can be judged. The synthetic samples, though, know
what every camera pixel shows (`clip2scene.precompute.teacher.classmaps`, written by `make-sample`). The
simulated teacher turns those per-pixel class maps into exactly what MaskCLIP hands the
pipeline, with errors shaped like CLIP's, so that everything after the teacher (projection,
sampling, cache, loader, student, losses, evaluation) runs the real code path on pseudo-labels
of a known, realistic quality. It is selected with `precompute --teacher simulated` and refuses
data without class maps (real nuScenes / KITTI / ScanNet have none). Every output says
"simulated teacher" (fingerprint ``model = "simulated"``, `cache info`, summaries, pictures).

Outputs (as `MaskCLIP.dense_outputs`)
    features (V, D, h, w) float32, unit norm, and logits (V, C, h, w) float32 = cosine of the
    features with the class embeddings, on the patch grid of a ViT with 16-pixel patches at the
    teacher input size (e.g. 14 x 26 for 224 x 416): the whole image is resized to the input size
    and cut into 16 x 16 patches, as MaskCLIP does, so boundaries have patch resolution.

Embedding space
    Class ("text") embeddings are deterministic pseudo-text embeddings, one per prompt class
    name: a unit Gaussian vector seeded by the name's sha256, optionally plus a shared component
    per group of look-alike classes (vehicles, flat ground, nature, ...; weight `group_weight`, 0
    by default) that brings look-alike classes closer, as in CLIP's text space. Any
    text gets an embedding (`pseudo_text_embeddings`; "a car", "cars" and "car" map to the class
    "car"), which is what `clip2scene query` uses. A patch feature is a noisy mixture of the
    class embeddings: ``normalize(gain * sum_c w_c t_c + noise)``, with ``w`` the class
    fractions of the patch after the errors below. SCR, SSR, S3, KL and query therefore work
    unchanged.

Model of errors (knobs in `SimulatedConfig`, per image, deterministic given `seed` and the
image's path):
    1. Object confusions (things, whole objects): each object (instance) of a class with
       look-alikes is relabelled as a look-alike with the probability in `confusions`
       (car -> truck / bus, truck -> car / bus, bus -> truck, pedestrian -> manmade, ...; no
       look-alike takes a majority, so the truth stays the most frequent label of each class).
    2. Region confusions (stuff): for ground / vegetation classes, a smooth random field over the
       image (`region_cells` cells across, bilinearly interpolated) picks connected regions,
       covering on average the `confusions` probability of the class's pixels, that are relabelled
       (sidewalk <-> driveable surface, terrain <-> vegetation).
    3. Misses of small and far objects: an object covering less than `small_area` patches is
       missed with probability `miss_small`, one whose mean distance exceeds `far_distance`
       metres with probability `miss_far`; a missed object's pixels take the classes around it.
    4. Patch-resolution soft scores: ``w`` holds each class's fraction of the patch's pixels, so
       thin and small things blur into their surroundings.
    5. Per-patch noise: an isotropic Gaussian vector in the embedding space of norm about
       ``noise * sqrt(D) * (1 + distance / noise_distance)``; its projection on each class
       embedding is per-patch, per-class score noise that grows with distance.

The defaults give pseudo-labels of about 37-47% mIoU on the camera-visible points of the demo's
sample (docs/simulated-teacher.md has the measurements).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clip2scene.classes import get_eval_classes
from clip2scene.precompute.teacher.classmaps import find_class_map_root, read_class_map

log = logging.getLogger(__name__)

SIMULATED_NAME = "simulated"
PATCH = 16  # the simulated ViT's patch size (as ViT-B/16)
# Look-alike groups: classes of a group share a component of their pseudo-text embedding.
GROUPS: dict[str, tuple[str, ...]] = {
    "vehicle": ("car", "truck", "bus", "construction vehicle", "trailer", "other vehicle", "train"),
    "two-wheeler": ("bicycle", "motorcycle", "bicyclist", "motorcyclist", "rider"),
    "flat": ("driveable surface", "sidewalk", "other_flat", "road", "parking", "other ground"),
    "nature": ("terrain", "vegetation", "trunk"),
    "structure": ("manmade", "building", "wall", "fence", "pole", "traffic sign", "traffic light", "barrier",
                  "traffic_cone"),
    "person": ("pedestrian", "person"),
}
_GROUP_OF = {name: g for g, names in GROUPS.items() for name in names}
# (true class, confused with, probability); things per object, stuff per region.
DEFAULT_CONFUSIONS: tuple[tuple[str, str, float], ...] = (
    ("car", "truck", 0.15), ("car", "bus", 0.05),
    ("truck", "car", 0.20), ("truck", "bus", 0.15),
    ("bus", "truck", 0.25), ("bus", "car", 0.10),
    ("pedestrian", "manmade", 0.20),
    ("barrier", "manmade", 0.25), ("traffic_cone", "barrier", 0.20),
    ("sidewalk", "driveable surface", 0.20), ("driveable surface", "sidewalk", 0.08),
    ("terrain", "vegetation", 0.20), ("vegetation", "terrain", 0.10),
)


@dataclass(frozen=True)
class SimulatedConfig:
    """Knobs of the simulated teacher's model of errors (see the module docstring)."""

    embed_dim: int = 64  # D of features and class embeddings (ViT-B/16's is 512; D changes nothing in the labels)
    seed: int = 0  # errors are deterministic given the seed and the image path
    confusions: tuple[tuple[str, str, float], ...] = DEFAULT_CONFUSIONS  # (class, look-alike, probability)
    region_cells: int = 4  # stuff confusions: smooth-field cells across the image width
    small_area: float = 1.0  # objects covering fewer patches than this count as small
    miss_small: float = 0.5  # probability that a small object is missed
    far_distance: float = 35.0  # metres; objects farther than this (mean depth) count as far
    miss_far: float = 0.4  # probability that a far object is missed
    gain: float = 1.0  # weight of the class mixture in a patch feature
    noise: float = 0.045  # per-dimension std of the per-patch feature noise, near the camera
    noise_distance: float = 40.0  # metres at which the noise std has doubled
    group_weight: float = 0.0  # weight of a shared component of look-alike class embeddings (0.5: cosine ~0.2; off by default, see docs)

    def __post_init__(self) -> None:
        if self.embed_dim < 8:
            raise ValueError(f"embed_dim must be >= 8, got {self.embed_dim}")
        for name in ("miss_small", "miss_far"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for src, dst, p in self.confusions:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"confusion {src} -> {dst}: probability {p} not in [0, 1]")
        for name in ("noise", "gain", "small_area", "far_distance", "noise_distance", "group_weight"):
            if getattr(self, name) < 0 or (name in ("far_distance", "noise_distance") and getattr(self, name) == 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.region_cells < 1:
            raise ValueError(f"region_cells must be >= 1, got {self.region_cells}")


def _seeded(*parts: Any) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def canonical_text(text: str) -> str:
    """A query or class name reduced to a class name where it is one: lower case, no article or
    'a photo of', '_' as space, no final '.', plural 's' dropped when that names a known class."""
    t = text.strip().lower().rstrip(".").replace("_", " ")
    t = re.sub(r"\s+", " ", t)
    for prefix in ("a photo of ", "a picture of ", "there is ", "this is "):
        if t.startswith(prefix):
            t = t[len(prefix):]
    for art in ("a ", "an ", "the "):
        if t.startswith(art):
            t = t[len(art):]
    known = {n.replace("_", " ") for n in _GROUP_OF}
    if t not in known and t.endswith("s") and t[:-1] in known:
        t = t[:-1]
    return t


def pseudo_text_embeddings(texts: Sequence[str], embed_dim: int = 64, group_weight: float = 0.0) -> torch.Tensor:
    """(len(texts), embed_dim) float32 unit rows: the simulated teacher's "text" embedding of each
    text (deterministic; equal for texts with the same `canonical_text`)."""
    groups = {g.replace("_", " "): g for g in GROUPS}
    group_of = {n.replace("_", " "): g for n, g in _GROUP_OF.items()}
    rows = []
    for text in texts:
        t = canonical_text(text)
        v = _seeded("clip2scene-simulated-text", t).standard_normal(embed_dim)
        g = group_of.get(t)
        if g is not None:
            v = v + group_weight * _seeded("clip2scene-simulated-group", groups.get(g, g)).standard_normal(embed_dim)
        rows.append(v / np.linalg.norm(v))
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def _resize_nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    rows = np.minimum(((np.arange(h) + 0.5) * a.shape[0] / h).astype(np.int64), a.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * a.shape[1] / w).astype(np.int64), a.shape[1] - 1)
    return a[rows[:, None], cols[None, :]]


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) standardised smooth random field: Gaussian values on a coarse grid, bilinear."""
    cw = cells + 1
    ch = max(1, int(round(cells * h / w))) + 1
    coarse = torch.from_numpy(rng.standard_normal((1, 1, ch, cw)).astype(np.float32))
    f = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0, 0].numpy()
    return (f - f.mean()) / max(float(f.std()), 1e-6)


class SimulatedTeacher:
    """MaskCLIP's interface for the pipeline, computed from the synthetic sample's class maps.

    Attributes (as `MaskCLIP`): embed_dim, patch_size (16, 16), image_size (H, W), class_names,
    text_embeddings (C, D) float32 unit rows, fingerprint (``model = "simulated"``,
    ``weights_sha256 = "simulated-<hash of the knobs>"``, the knobs under ``simulated``),
    precision "float32". `reads_class_maps` tells the pipeline to call `dense_outputs_for_views`
    (the views' class maps) instead of decoding the images.
    """

    reads_class_maps = True
    precision = "float32"

    def __init__(self, class_names: Sequence[str], image_size: tuple[int, int] = (224, 416),
                 config: SimulatedConfig = SimulatedConfig(), device: str | torch.device = "cpu") -> None:
        if not class_names:
            raise ValueError("class_names is empty")
        h, w = (int(v) for v in image_size)
        if h <= 0 or w <= 0 or h % PATCH or w % PATCH:
            raise ValueError(f"image_size {tuple(image_size)} must be positive multiples of the patch size {PATCH}")
        self.config = config
        self.class_names = list(class_names)
        self.image_size = (h, w)
        self.patch_size = (PATCH, PATCH)
        self.embed_dim = config.embed_dim
        self._device = torch.device(device)
        self.text_embeddings = pseudo_text_embeddings(self.class_names, config.embed_dim, config.group_weight).to(self._device)
        self._canon = [canonical_text(n) for n in self.class_names]
        knobs = json.loads(json.dumps(asdict(config)))
        digest = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()
        self.fingerprint = {
            "model": SIMULATED_NAME, "weights": "none (simulated teacher)",
            "weights_sha256": f"simulated-{digest[:16]}", "quick_gelu": None,
            "image_size": [h, w], "class_names": list(class_names),
            "templates_sha256": "simulated (pseudo-text embeddings)", "embed_dim": config.embed_dim,
            "patch_size": PATCH, "key_smoothing": False, "prompt_denoising": False,
            "denoise_threshold": 0.5, "smoothing_threshold": 1.0, "teacher": SIMULATED_NAME,
            "simulated": knobs,
        }
        log.info("simulated teacher ready: %d classes, image %dx%d -> grid %dx%d, D=%d", len(self.class_names), h, w,
                 *self.grid_size, self.embed_dim)

    # -- the pieces of MaskCLIP's interface the pipeline uses ------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // PATCH, self.image_size[1] // PATCH)

    def set_precision(self, precision: str) -> SimulatedTeacher:
        """Accepts any precision; the simulation always computes in float32."""
        return self

    def autocast(self):
        return contextlib.nullcontext()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(..., D) unit features -> (..., C) cosines with the class embeddings (float32)."""
        te = self.text_embeddings
        return features.to(device=te.device, dtype=te.dtype) @ te.t()

    # -- the simulation ---------------------------------------------------------------------
    def _class_index(self, eval_set: str) -> np.ndarray:
        """(K + 1,) prompt class per evaluation label (label 0 and unprompted classes: -1)."""
        out = np.full(len(get_eval_classes(eval_set)) + 1, -1, np.int64)
        for i, name in enumerate(get_eval_classes(eval_set)):
            c = canonical_text(name)
            if c in self._canon:
                out[i + 1] = self._canon.index(c)
        return out

    def simulate(self, label: np.ndarray, depth: np.ndarray, instance: np.ndarray, eval_set: str,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One image: class maps at the teacher input size (h_img, w_img) -> (class weights (C, gh, gw)
        float32 after the errors, patch distance (gh, gw) float32 metres, inf = none)."""
        cfg = self.config
        names = get_eval_classes(eval_set)
        idx = {canonical_text(n): i + 1 for i, n in enumerate(names)}
        lab = label.astype(np.int64).copy()
        h, w = lab.shape
        gh, gw = self.grid_size
        patch_area = PATCH * PATCH
        missed = np.zeros(lab.shape, bool)
        table: dict[int, list[tuple[int, float]]] = {}
        for src, dst, p in cfg.confusions:
            s, d = idx.get(canonical_text(src)), idx.get(canonical_text(dst))
            if s is not None and d is not None and p > 0:
                table.setdefault(s, []).append((d, p))
        # 1 + 3: objects (things): confusions of whole objects, misses of small and far ones
        thing = instance >= 0
        objs, inv = np.unique(instance[thing], return_inverse=True)
        if len(objs):
            k = len(names) + 1
            lab_t = label[thing].astype(np.int64)
            cls = np.bincount(inv * k + lab_t, minlength=len(objs) * k).reshape(len(objs), k).argmax(1)
            area = np.bincount(inv, minlength=len(objs)) / patch_area
            dep = depth[thing]
            fin = np.isfinite(dep)
            dist = (np.bincount(inv[fin], weights=dep[fin], minlength=len(objs))
                    / np.maximum(np.bincount(inv[fin], minlength=len(objs)), 1))
            u = rng.random((len(objs), 3))
            miss = ((area < cfg.small_area) & (u[:, 0] < cfg.miss_small)) | ((dist > cfg.far_distance) & (u[:, 1] < cfg.miss_far))
            target = np.full(len(objs), -1, np.int64)
            for c in np.unique(cls):
                acc = np.zeros(len(objs))
                for d, p in table.get(int(c), []):
                    pick = (cls == c) & (target < 0) & (u[:, 2] >= acc) & (u[:, 2] < acc + p)
                    target[pick] = d
                    acc = acc + p
            t_pix = target[inv]
            new = np.where((t_pix >= 0) & (lab_t == cls[inv]), t_pix, lab_t)
            lab[thing] = new
            missed[thing] = miss[inv]
        # 2: stuff: smooth regions relabelled as a look-alike
        stuff = instance < 0
        for s, targets in table.items():
            here = stuff & (label == s)
            if not here.any():
                continue
            field_ = _smooth_field(rng, h, w, cfg.region_cells)  # one field per class, an interval per look-alike
            acc = 0.0
            for d, p in targets:
                lo = NormalDist().inv_cdf(acc) if acc > 0 else -np.inf
                hi = NormalDist().inv_cdf(acc + p) if acc + p < 1 else np.inf
                lab[here & (field_ > lo) & (field_ <= hi)] = d
                acc += p
        # 4: class fractions per patch (missed pixels excluded, their patch filled from around)
        prompt_of = self._class_index(eval_set)
        c = len(self.class_names)
        onehot = np.zeros((c + 1, h, w), np.float32)
        pc = np.where(missed, -1, prompt_of[lab])
        valid = pc >= 0
        rows, cols = np.nonzero(valid)
        onehot[pc[rows, cols], rows, cols] = 1.0
        onehot[c][~valid & ~missed] = 1.0  # unprompted / unlabelled pixels: part of the patch, no class
        t = torch.from_numpy(onehot)[None]
        counts = F.avg_pool2d(t, PATCH)[0]  # (C + 1, gh, gw), missed pixels count nowhere
        total = counts.sum(0, keepdim=True)
        frac = counts / total.clamp_min(1e-6)
        empty = total[0] < 1e-6
        for _ in range(gh + gw):  # a patch wholly covered by a missed object: the mean of its filled neighbours
            if not bool(empty.any()):
                break
            full = (~empty).float()[None, None]
            num = F.avg_pool2d(frac[None] * full, 3, stride=1, padding=1)[0]
            den = F.avg_pool2d(full, 3, stride=1, padding=1)[0]
            grow = empty & (den[0] > 0)
            frac = torch.where(grow[None], num / den.clamp_min(1e-6), frac)
            empty = empty & ~grow
        d = torch.from_numpy(np.where(np.isfinite(depth), depth, np.nan).astype(np.float32))[None, None]
        dist = torch.nan_to_num(F.avg_pool2d(torch.nan_to_num(d, nan=0.0), PATCH)[0, 0]
                                / F.avg_pool2d((~torch.isnan(d)).float(), PATCH)[0, 0].clamp_min(1e-6), nan=0.0)
        return frac[:c].numpy(), dist.numpy()

    @torch.no_grad()
    def dense_outputs_for_views(self, views: Sequence, eval_set: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense features (V, D, gh, gw) and logits (V, C, gh, gw) float32 for `views` (objects with
        .path, .width, .height: `precompute.datasets.base.View`), from their class maps; `eval_set` is
        the dataset's evaluation label space (the maps' labels). DataError if a map is missing."""
        cfg = self.config
        h, w = self.image_size
        feats = []
        te = self.text_embeddings.cpu().numpy()
        for v in views:
            cm = read_class_map(v.path, v.width, v.height)
            root = find_class_map_root(v.path)
            rel = str(v.path.resolve().relative_to(root)) if root is not None else str(v.path)
            rng = _seeded("clip2scene-simulated-image", cfg.seed, rel)
            lab = _resize_nearest(cm.label, h, w)
            dep = _resize_nearest(cm.depth, h, w)
            ins = _resize_nearest(cm.instance, h, w)
            weights, dist = self.simulate(lab, dep, ins, eval_set, rng)  # (C, gh, gw), (gh, gw)
            gh, gw = dist.shape
            mix = cfg.gain * np.einsum("chw,cd->dhw", weights, te)
            std = cfg.noise * (1.0 + dist / cfg.noise_distance)
            noise = rng.standard_normal((cfg.embed_dim, gh, gw)).astype(np.float32) * std[None]
            feats.append(mix + noise)
        f = F.normalize(torch.from_numpy(np.stack(feats).astype(np.float32)), dim=1).to(self._device)
        logits = torch.einsum("vdhw,cd->vchw", f, self.text_embeddings)
        return f, logits.contiguous()


def load_simulated_teacher(class_names: Sequence[str], image_size: tuple[int, int] = (224, 416),
                           config: SimulatedConfig = SimulatedConfig(),
                           device: str | torch.device = "cpu") -> SimulatedTeacher:
    """The simulated teacher for `class_names` at teacher input size `image_size` (H, W)."""
    return SimulatedTeacher(class_names, image_size, config, device)


__all__ = ["GROUPS", "SIMULATED_NAME", "SimulatedConfig", "SimulatedTeacher", "canonical_text",
           "load_simulated_teacher", "pseudo_text_embeddings"]
