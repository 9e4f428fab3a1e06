"""Helpers the tests share (one module; test modules import from here, never from each other).

- Synthetic data: `SAMPLE` / `SMALL_SAMPLE` (the configs of conftest's session samples),
  `write_cache` (a labelled cache with a known per-point "teacher", written through the storage
  API: three classes in three x-bands, logits = one-hot labels), `make_scan`, `teacher_meta`,
  `images_from_point_values`.
- Tiny models: `TINY` (student ModelConfig), `TINY_TEACHER` (random-weight MaskCLIP config) and
  `TINY_TEACHER_ARGS` (the same on the command line).
- References computed independently of the code under test: `CATEGORY_NAMES` (nuScenes),
  `load_image` / `images_to_tensor` (PIL decode and resize), `assign_cameras` / `sample_maps`
  (schema 4's per-point camera choice and stage-one sampling), `reference_last_block_input`
  (CLIP's tokens entering the last block, by hand), `png_size`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clip2scene.samples.nuscenes import SampleConfig
from clip2scene.storage import CacheWriter, ScanRecord

# ------------------------------------------------------------------------------------ samples
# conftest's session fixtures `sample` and `small_sample` (read-only: copy before damaging them)
SAMPLE = SampleConfig(scenes=2, keyframes=2, sweeps=2)  # 400x225 cameras, 4 keyframes (2 train, 2 val)
SMALL_SAMPLE = SampleConfig(scenes=2, keyframes=2, sweeps=1, image_width=160, image_height=90)

# ------------------------------------------------------------------------------------ tiny models
TINY_TEACHER_ARGS = ["--clip-model", "clip2scene-tiny", "--clip-weights", "none", "--image-size", "64x112"]
TINY_CHANNELS = (8, 8, 16, 16, 32, 32, 16, 8, 8)  # the widths of `TINY`
TINY_NET_ARGS = ["--channels", ",".join(map(str, TINY_CHANNELS))]


def _tiny_teacher():
    from clip2scene.precompute.teacher.config import TeacherConfig

    return TeacherConfig(model="clip2scene-tiny", weights="none", image_size=(64, 112))


def _tiny_model():
    from clip2scene.train.nets import ModelConfig

    return ModelConfig(channels=TINY_CHANNELS, blocks_per_stage=1)


def __getattr__(name):  # TINY and TINY_TEACHER import the stage they belong to only when used
    if name == "TINY":
        return _tiny_model()
    if name == "TINY_TEACHER":
        return _tiny_teacher()
    raise AttributeError(name)


def assert_one_line_error(result, *fragments) -> str:
    """A CliRunner result failed as the CLI must on bad input: exit code 2, no traceback, exactly
    one `error:` line on stderr, the last (progress bars may precede it), holding every fragment.
    Returns that line."""
    assert result.exit_code == 2, result.output
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in result.output, result.output
    assert sum(ln.startswith("error:") for ln in result.stderr.splitlines()) == 1, result.stderr
    for f in fragments:
        assert f in err, err
    return err


# ------------------------------------------------------------------------------------ caches from values
C, D = 3, 16  # classes and feature dim of `write_cache`'s caches


def teacher_meta(sha="random"):
    names = ["road", "car", "tree"]
    return dict(dataset=dict(name="nuscenes", version="v1.0-mini", dataroot="/x", split=None),
                teacher=dict(model="tiny", weights="none", weights_sha256=sha, quick_gelu=False, image_size=[64, 112],
                             class_names=names, templates_sha256="t" * 64, embed_dim=D, patch_size=16),
                class_names=names, eval_class_names=names, prompt_to_eval=[1, 2, 3], class_set="test",
                sweeps=1, cameras=["CAM_FRONT"], point_features=["intensity"], voxel_size=0.1)


def images_from_point_values(logits: np.ndarray, features: np.ndarray, grid: tuple[int, int] = (32, 32),
                             patch: int = 16) -> dict:
    """ScanRecord pair and image fields that hand every pair exactly the given per-point values:
    each value becomes one patch of a (h, w) grid of images of (w * patch) x (h * patch) pixels,
    and its pair sits at the patch centre. logits (m, C), features (m, D) -> dict(pair_image,
    pair_uv, image_view, image_size, image_logits, image_features); the points' pair_point stays
    the caller's. With powers of two for h and w the stored uv is exact, so `read_scan` returns
    the values (up to the feature_dtype's rounding)."""
    h, w = grid
    m = len(logits)
    per = h * w
    n_img = -(-m // per)
    if n_img > 255:
        raise ValueError(f"{m} points need {n_img} images, at most 255 per scan")
    slot = np.arange(m)
    image = (slot // per).astype(np.uint8)
    cell = slot % per
    uv = np.stack([(cell % w) * patch + (patch - 1) / 2, (cell // w) * patch + (patch - 1) / 2], 1).astype(np.float32)
    maps_l = np.zeros((n_img * per, logits.shape[1]), np.float16)
    maps_l[:m] = logits
    maps_f = np.zeros((n_img * per, features.shape[1]), np.float32)
    maps_f[:m] = features
    return dict(pair_image=image, pair_uv=uv, image_view=np.zeros(n_img, np.uint8),
                image_size=np.tile(np.array([[w * patch, h * patch]], np.uint16), (n_img, 1)),
                image_logits=maps_l.reshape(n_img, h, w, logits.shape[1]),
                image_features=maps_f.reshape(n_img, h, w, features.shape[1]))


def make_scan(rng, i, split, n=3000):
    """Three classes in three x-bands; intensity tells them apart; logits = one-hot true labels."""
    xyz = rng.uniform([0, 0, 0], [9, 6, 2], size=(n, 3)).astype(np.float32)
    cls = np.minimum((xyz[:, 0] // 3).astype(np.int64), 2)
    inten = (cls * 80 + rng.uniform(0, 30, n)).astype(np.float32)
    vis = np.sort(rng.choice(n, n // 2, replace=False)).astype(np.int32)
    logits = np.eye(C, dtype=np.float16)[cls[vis]]
    return ScanRecord(token=f"t{i}", scene=f"scene-{i}", split=split, timestamp=i, lidar_path=f"x{i}",
                      xyz=xyz, feat=inten[:, None] / np.float32(255.0), sweep=np.zeros(n, np.uint8),
                      label=(cls + 1).astype(np.uint8), pair_point=vis,
                      **images_from_point_values(logits, np.zeros((len(vis), D), np.float16)))


def write_cache(path, sha="random", splits=("train", "train", "train", "val"), n=3000):
    """A complete cache at `path`: one scan per entry of `splits`, n points each (see make_scan)."""
    rng = np.random.default_rng(0)
    text = np.linalg.qr(rng.normal(size=(D, D)))[0][:C].astype(np.float32)
    with CacheWriter(path, teacher_meta(sha), C, D, has_labels=True) as w:
        for i, s in enumerate(splits):
            w.append(make_scan(rng, i, s, n))
        w.set_text_embeddings(text)
    return path


# ------------------------------------------------------------------------------------ references
# nuScenes-lidarseg fine categories in official `index` order (category.json of v1.0).
CATEGORY_NAMES = (
    "noise", "animal", "human.pedestrian.adult", "human.pedestrian.child",
    "human.pedestrian.construction_worker", "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer", "human.pedestrian.stroller", "human.pedestrian.wheelchair",
    "movable_object.barrier", "movable_object.debris", "movable_object.pushable_pullable",
    "movable_object.trafficcone", "static_object.bicycle_rack", "vehicle.bicycle", "vehicle.bus.bendy",
    "vehicle.bus.rigid", "vehicle.car", "vehicle.construction", "vehicle.emergency.ambulance",
    "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer", "vehicle.truck",
    "flat.driveable_surface", "flat.other", "flat.sidewalk", "flat.terrain", "static.manmade",
    "static.other", "static.vegetation", "vehicle.ego",
)

# NYU40 id -> name of the classes the synthetic ScanNet rooms use (samples/scannet.py CLASS_COLOURS).
NYU40_NAMES = {
    1: "wall", 2: "floor", 3: "cabinet", 4: "bed", 5: "chair", 6: "sofa", 7: "table", 8: "door",
    9: "window", 10: "bookshelf", 11: "picture", 22: "ceiling", 40: "otherprop",
}


def load_image(path: Path, width: int, height: int):
    """PIL decode of a camera image (RGB), the reference for the pipeline's torchvision decode."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        img = im.convert("RGB")
    assert img.size == (width, height), (path, img.size)
    return img


def images_to_tensor(images: list, size: tuple[int, int]):
    """Resize PIL images to size (H, W) with PIL's bilinear filter and stack: (B, 3, H, W) float32 in [0, 1]."""
    import torch
    from PIL import Image

    h, w = size
    arrays = [np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


def assign_cameras(xyz: np.ndarray, ds, scan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Schema 4's camera choice: per visible point the one view where it lies farthest from the
    image border. xyz: (n, 3) float32 in the scan's frame. Returns point index (m,) int32
    ascending, view (m,) uint8 (ties -> lower view index), uv (m, 2) float32 pixel coordinates."""
    n = len(xyz)
    best_margin = np.full(n, -np.inf)
    best_cam = np.zeros(n, np.uint8)
    best_uv = np.zeros((n, 2), np.float64)
    for c, view in enumerate(ds.views(scan)):
        uv, vis = ds.project(scan, c, xyz)
        margin = np.minimum.reduce([uv[:, 0] - 1, view.width - 1 - uv[:, 0], uv[:, 1] - 1, view.height - 1 - uv[:, 1]])
        margin = np.where(vis, margin, -np.inf)
        better = margin > best_margin
        best_margin[better] = margin[better]
        best_cam[better] = c
        best_uv[better] = uv[better]
    idx = np.flatnonzero(np.isfinite(best_margin)).astype(np.int32)
    return idx, best_cam[idx], best_uv[idx].astype(np.float32)


def sample_maps(dense, cams: np.ndarray, uv: np.ndarray, sizes: list[tuple[int, int]]):
    """Schema 4's stage-one sampling: torch grid_sample of dense (B, K, h, w) maps at the float
    pixel positions uv (m, 2) of camera cams (m,), whose original image is sizes[c] = (W, H);
    x_norm = (u + 0.5) / W * 2 - 1 (align_corners=False), borders clamp. Returns (m, K) float32."""
    import torch
    import torch.nn.functional as F

    out = torch.zeros(len(cams), dense.shape[1], dtype=torch.float32, device=dense.device)
    for c in np.unique(cams):
        rows = np.flatnonzero(cams == c)
        w, h = sizes[c]
        g = torch.from_numpy(uv[rows]).to(dense.device, torch.float32)
        grid = torch.stack([(g[:, 0] + 0.5) / w * 2 - 1, (g[:, 1] + 0.5) / h * 2 - 1], dim=-1)
        s = F.grid_sample(dense[c : c + 1].float(), grid.view(1, 1, -1, 2), mode="bilinear",
                          padding_mode="border", align_corners=False)  # (1, K, 1, k)
        out.index_copy_(0, torch.from_numpy(rows).to(dense.device), s[0, :, 0].T.contiguous())
    return out


def random_images(b: int = 2, h: int = 64, w: int = 96, seed: int = 0):
    """(b, 3, h, w) float32 uniform [0, 1) images, deterministic given the seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def reference_last_block_input(visual, images):
    """By hand: tokens entering CLIP's last block, (B, 1 + h*w, width) batch-first, and (h, w)."""
    import torch
    import torch.nn.functional as F

    from clip2scene.precompute.teacher.maskclip import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (images - mean) / std
    b, _, hh, ww = x.shape
    p = visual.patch_size[0]
    h, w = hh // p, ww // p
    with torch.no_grad():
        if (h, w) == tuple(visual.grid_size):
            x = visual._embeds(x)  # the model's own embedding path
        else:
            x = visual.conv1(x).flatten(2).transpose(1, 2)
            x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(b, -1, -1), x], dim=1)
            pe = visual.positional_embedding
            gh, gw = visual.grid_size
            grid = pe[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pe = torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)
            x = visual.ln_pre(x + pe)
        for blk in visual.transformer.resblocks[:-1]:
            x = blk(x)
    return x, (h, w)


def synthetic_scan(n: int, seed: int, extent: float = 8.0):
    """Synthetic scan for the students: a ground plane plus a few boxes' surfaces; (xyz (n,3), intensity (n,))."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_ground = n // 2
    ground = torch.rand(n_ground, 3, generator=g) * torch.tensor([extent, extent, 0.05])
    centres = torch.rand(4, 3, generator=g) * torch.tensor([extent, extent, 1.0])
    which = torch.randint(0, 4, (n - n_ground,), generator=g)
    offs = torch.rand(n - n_ground, 3, generator=g) * 1.5
    objects = centres[which] + offs
    xyz = torch.cat([ground, objects]) - extent / 2
    intensity = torch.rand(n, generator=g)
    return xyz.float(), intensity


def halved(config):
    """A copy of a student ModelConfig with every channel width halved (a cheaper student)."""
    from dataclasses import replace

    return replace(config, channels=tuple(max(1, c // 2) for c in config.channels))


def png_size(width_in: float, height_in: float, dpi: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels of a saved figure of that size in inches (matplotlib rounds)."""
    from clip2scene.viz.figures import DPI

    dpi = DPI if dpi is None else dpi
    return int(round(width_in * dpi)), int(round(height_in * dpi))
