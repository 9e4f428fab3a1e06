"""Stage one: run the MaskCLIP teacher once per keyframe and write the Zarr cache.

For every keyframe: read the lidar scan (+ K-1 previous sweeps moved into the keyframe's lidar
frame through both ego poses), decode the six camera images, run MaskCLIP on all six as one
batch, project every point (keyframe and sweep points alike, in the keyframe frame) into the
keyframe's cameras with the devkit chain, keep for each visible point the camera where it lies
farthest from the image border (deterministic; ties -> lower camera index), sample the teacher's
dense features and class logits there bilinearly, and store them per visible point. Sweep points
use the keyframe's images (see docs/architecture.md for why and what it costs on moving objects).

    from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
    meta = run_precompute(PrecomputeConfig(dataroot="data/nuscenes", version="v1.0-mini", out="cache.zarr"))

CLI: `clip2scene precompute --dataset nuscenes --dataroot D --version v1.0-mini --out ./zarr`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from clip2scene.classes import get_class_set, get_eval_classes, prompt_to_eval
from clip2scene.devices import resolve_device
from clip2scene.errors import ConfigError, DataError
from clip2scene.precompute.geometry import project_points, sensor_to_sensor
from clip2scene.precompute.maskclip import MaskCLIP, TeacherConfig, load_teacher
from clip2scene.precompute.nuscenes import CAMERAS, Keyframe, NuScenes, load_points
from clip2scene.storage import CacheWriter, ScanRecord

log = logging.getLogger(__name__)

DATASETS = ("nuscenes",)


@dataclass(frozen=True)
class PrecomputeConfig:
    dataroot: Path  # dataset root (the folder holding samples/, sweeps/, <version>/)
    out: Path  # cache folder to create (a Zarr v3 group)
    dataset: str = "nuscenes"  # dataset format; only nuscenes for now
    version: str = "v1.0-trainval"  # nuScenes version folder under dataroot
    split: str | None = None  # cache only this split's scenes (train/val/...), None = all
    sweeps: int = 3  # K lidar frames per scan: the keyframe + K-1 previous sweeps (paper: 3)
    class_set: str = "nuscenes"  # prompt class names (clip2scene.classes)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # MaskCLIP model and weights
    device: str = "cpu"  # torch device for the teacher
    overwrite: bool = False  # replace an existing cache at `out`
    limit: int | None = None  # only the first N keyframes (smoke runs)


def load_image(path: Path, width: int, height: int) -> Image.Image:
    """Decode a camera JPEG as RGB; DataError names the file if missing, corrupt or of the wrong size."""
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"camera image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None
    if img.size != (width, height):
        raise DataError(f"{path}: image is {img.size[0]}x{img.size[1]}, sample_data says {width}x{height}")
    return img


def images_to_tensor(images: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """Resize PIL images to size (H, W) and stack: (B, 3, H, W) float32 in [0, 1]."""
    h, w = size
    arrays = [np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


def merged_points(kf: Keyframe) -> tuple[np.ndarray, np.ndarray, int]:
    """Keyframe + previous sweeps in the keyframe lidar frame.

    Returns xyzi (n, 4) float32, sweep (n,) uint8 (0 = keyframe) and the keyframe point count.
    """
    key = load_points(kf.lidar.path)
    if len(key) == 0:
        raise DataError(f"{kf.lidar.path}: scan has no points")
    parts, sweep_ids = [key[:, :4]], [np.zeros(len(key), np.uint8)]
    for j, sw in enumerate(kf.sweeps, start=1):
        pts = load_points(sw.path)
        xyz = sensor_to_sensor(pts[:, :3], sw.calib, sw.ego, kf.lidar.ego, kf.lidar.calib)
        parts.append(np.concatenate([xyz, pts[:, 3:4]], axis=1))
        sweep_ids.append(np.full(len(pts), j, np.uint8))
    return np.concatenate(parts).astype(np.float32), np.concatenate(sweep_ids), len(key)


def assign_cameras(xyz: np.ndarray, kf: Keyframe) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick one camera per visible point: the one where it is farthest from the image border.

    xyz: (n, 3) float32 in the keyframe lidar frame. Returns point index (m,) int32 ascending,
    camera (m,) uint8, uv (m, 2) float32 pixel coordinates in that camera's original image.
    """
    n = len(xyz)
    best_margin = np.full(n, -np.inf)
    best_cam = np.zeros(n, np.uint8)
    best_uv = np.zeros((n, 2), np.float64)
    for c, cam in enumerate(kf.cameras):
        uv, _, vis = project_points(xyz, kf.lidar.calib, kf.lidar.ego, cam.ego, cam.calib,
                                    cam.intrinsic, cam.width, cam.height)
        margin = np.minimum.reduce([uv[:, 0] - 1, cam.width - 1 - uv[:, 0], uv[:, 1] - 1, cam.height - 1 - uv[:, 1]])
        margin = np.where(vis, margin, -np.inf)
        better = margin > best_margin
        best_margin[better] = margin[better]
        best_cam[better] = c
        best_uv[better] = uv[better]
    idx = np.flatnonzero(np.isfinite(best_margin)).astype(np.int32)
    return idx, best_cam[idx], best_uv[idx].astype(np.float32)


def sample_maps(dense: torch.Tensor, cams: np.ndarray, uv: np.ndarray, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Bilinearly sample dense teacher maps at sub-pixel point positions.

    dense: (B, K, h, w) patch-grid maps of the B cameras (features or class logits); cams: (m,)
    camera per point; uv: (m, 2) pixel coords in the original image whose size per camera is
    sizes[c] = (W, H). Pixel centres sit at integer coordinates, so x_norm = (u + 0.5) / W * 2 - 1
    (align_corners=False); borders clamp. Returns (m, K) float32.
    """
    m, d = len(cams), dense.shape[1]
    out = torch.zeros(m, d, dtype=torch.float32, device=dense.device)
    for c in np.unique(cams):
        rows = np.flatnonzero(cams == c)
        w, h = sizes[c]
        g = torch.from_numpy(uv[rows]).to(dense.device, torch.float32)
        grid = torch.stack([(g[:, 0] + 0.5) / w * 2 - 1, (g[:, 1] + 0.5) / h * 2 - 1], dim=-1)
        s = F.grid_sample(dense[c : c + 1].float(), grid.view(1, 1, -1, 2), mode="bilinear",
                          padding_mode="border", align_corners=False)  # (1, D, 1, k)
        out[torch.from_numpy(rows).to(dense.device)] = s[0, :, 0].T
    return out


@torch.inference_mode()
def process_keyframe(ds: NuScenes, kf: Keyframe, teacher: MaskCLIP, device: torch.device) -> ScanRecord:
    """Teacher outputs for one keyframe as a ScanRecord (see storage.writer)."""
    xyzi, sweep, n_key = merged_points(kf)
    label = None
    if ds.has_labels:
        label = np.zeros(len(xyzi), np.uint8)
        label[:n_key] = ds.load_labels(kf, n_key)
    images = [load_image(cam.path, cam.width, cam.height) for cam in kf.cameras]
    batch = images_to_tensor(images, tuple(teacher.fingerprint["image_size"])).to(device)
    dense, dense_logits = teacher.dense_outputs(batch)  # (6, D, h, w), (6, C, h, w)
    idx, cams, uv = assign_cameras(xyzi[:, :3], kf)
    sizes = [(c.width, c.height) for c in kf.cameras]
    feats = F.normalize(sample_maps(dense, cams, uv, sizes), dim=-1)
    logits = sample_maps(dense_logits, cams, uv, sizes)
    return ScanRecord(
        token=kf.sample_token,
        scene=kf.scene,
        split=kf.split,
        timestamp=kf.timestamp,
        lidar_path=str(kf.lidar.path.relative_to(ds.dataroot)),
        xyzi=xyzi,
        sweep=sweep,
        label=label,
        pair_point=idx,
        pair_camera=cams,
        pair_uv=uv,
        pair_logits=logits.cpu().numpy().astype(np.float16),
        pair_features=feats.cpu().numpy().astype(np.float16),
    )


def open_dataset(config: PrecomputeConfig) -> NuScenes:
    """Open the configured dataset (ConfigError for an unknown dataset name)."""
    if config.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {config.dataset!r}; supported: {', '.join(DATASETS)}")
    return NuScenes(config.dataroot, config.version)


def run_precompute(config: PrecomputeConfig, progress: bool = True) -> dict:
    """Build the cache described by `config`; returns its metadata plus timing numbers."""
    if not 1 <= config.sweeps <= 10:
        raise ConfigError(f"--sweeps must be between 1 and 10, got {config.sweeps}")
    class_names = get_class_set(config.class_set)
    ds = open_dataset(config)
    keyframes = ds.keyframes(split=config.split, sweeps=config.sweeps)
    if config.limit is not None:
        keyframes = keyframes[: config.limit]
    if not keyframes:
        raise DataError(f"no keyframes in {ds.dataroot / ds.version} for split {config.split!r}")
    device = resolve_device(config.device)
    try:
        teacher = load_teacher(config.teacher, class_names, device=device)
    except (ValueError, NotImplementedError) as e:  # unknown model, bad image size, unsupported tower
        raise ConfigError(f"teacher --clip-model {config.teacher.model!r} --image-size "
                          f"{config.teacher.image_size[0]}x{config.teacher.image_size[1]}: {e}") from None
    meta = dict(
        dataset=dict(name=ds.name, version=ds.version, dataroot=str(Path(config.dataroot).resolve()), split=config.split),
        teacher=teacher.fingerprint,
        class_names=list(class_names),
        class_set=config.class_set,
        eval_class_names=list(get_eval_classes(ds.name)),
        prompt_to_eval=list(prompt_to_eval(config.class_set, ds.name)),
        sweeps=config.sweeps,
        cameras=list(CAMERAS),
        camera_choice="farthest-from-border",
    )
    t0 = time.perf_counter()
    with CacheWriter(config.out, meta, len(class_names), teacher.embed_dim, ds.has_labels, config.overwrite) as writer:
        bar = tqdm(keyframes, desc="precompute", unit="scan", disable=not progress)
        for kf in bar:
            writer.append(process_keyframe(ds, kf, teacher, device))
        writer.set_text_embeddings(teacher.text_embeddings.cpu().numpy())
    seconds = time.perf_counter() - t0
    result = dict(writer.meta)
    result["seconds"] = seconds
    result["images_per_second"] = len(keyframes) * len(CAMERAS) / max(seconds, 1e-9)
    log.info("precompute done: %d scans in %.1fs", len(keyframes), seconds)
    return result

