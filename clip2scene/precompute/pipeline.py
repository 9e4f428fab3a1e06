"""Stage one: run the MaskCLIP teacher once per scan and write the Zarr cache.

Works on any `precompute.datasets.base.Dataset` (nuScenes, SemanticKITTI, ScanNet). For every scan:
read its points (nuScenes/KITTI: keyframe + K-1 previous sweeps moved into the keyframe's lidar
frame through the ego poses; ScanNet: the scene's mesh vertices), decode its images (six
nuScenes cameras, KITTI image_2, ScanNet posed frames), run MaskCLIP on them in batches,
project every point into every view with the dataset's own chain (devkit-exact for nuScenes,
P2 @ Tr for KITTI, pinhole + depth-occlusion test for ScanNet), keep every (point, view) pair
(a point's pairs ordered by distance from the image border, farthest first; ties -> lower view
index) and store, per image, the teacher's dense feature and class-score maps on its patch
grid (cache schema 5); stage two samples them at the pairs. Sweep points use the keyframe's images (see docs/architecture.md for why and
what it costs on moving objects). With no teacher (`--clip-model none`) only points and labels
are cached, for fine-tuning without CLIP.

    from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
    meta = run_precompute(PrecomputeConfig(dataroot="data/nuscenes", version="v1.0-mini", out="cache.zarr"))

CLI: `clip2scene precompute --dataset nuscenes|semantickitti|scannet --dataroot D --out ./zarr`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clip2scene.classes import get_class_set, get_eval_classes, prompt_to_eval
from clip2scene.devices import resolve_device
from clip2scene.errors import CacheError, ConfigError, DataError
from clip2scene.precompute.teacher.precision import PRECISIONS, resolve_precision
from clip2scene.precompute.teacher.maskclip import MaskCLIP, load_teacher
from clip2scene.precompute.teacher.config import TeacherConfig
from clip2scene.precompute.datasets.base import Dataset, ScanRef
from clip2scene.precompute.teacher.simulated import SimulatedConfig, load_simulated_teacher
from clip2scene.precompute.datasets import DATASETS, open_dataset
from clip2scene.runtime import tune_malloc
from clip2scene.storage import CacheWriter, Layout, Location, ScanRecord, open_cache, write_block
from clip2scene.storage.store import Lock
from clip2scene.validation import STORAGE_HELP, check_int, opt

log = logging.getLogger(__name__)

def default_image_size(dataset: str, clip_model: str, windowed: bool = False) -> tuple[int, int]:
    """Teacher input (H, W) when none is given: the dataset's `DatasetSpec.image_size`, or its
    `full_size` for sliding windows, each side rounded to the nearest multiple of the backbone's patch size (16
    when the model name is unknown here; load_teacher reports that)."""
    from clip2scene.precompute.teacher.weights import _model_config

    spec = DATASETS[dataset]
    h, w = spec.full_size if windowed else spec.image_size
    try:
        patch = _model_config(clip_model.replace("/", "-")).get("vision_cfg", {}).get("patch_size") or 16
    except (ValueError, ImportError):
        patch = 16
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return max(ph, round(h / ph) * ph), max(pw, round(w / pw) * pw)


@dataclass(frozen=True)
class PrecomputeConfig:
    dataroot: Path = opt(help="Dataset root folder (nuScenes: holds samples/, sweeps/, <version>/; KITTI: "
                              "sequences/; ScanNet: scans/).")
    out: Path | str = opt(help="Cache to create: folder or fsspec URL (s3://bucket/c.zarr).")
    dataset: str = opt("nuscenes", "Dataset format: nuscenes, semantickitti, scannet.")
    version: str | None = opt(None, "Dataset version: nuScenes v1.0-mini or v1.0-trainval (default), SemanticKITTI "
                                    "semantickitti, ScanNet scannet-25k.")
    split: str | None = opt(None, "Only this split (train/val); default all.")
    sweeps: int = opt(3, "Lidar frames per scan: keyframe + K-1 previous sweeps (1..10).")
    class_set: str | None = opt(None, "Prompt class set: nuscenes, semantickitti, cityscapes, scannet, all "
                                      "(default: the dataset's).")
    teacher: TeacherConfig | None = opt(default_factory=TeacherConfig, help="The teacher; None = labels only.")
    device: str = opt("cpu", "Teacher device (cpu, cuda).")
    overwrite: bool = opt(False, "Replace an existing cache.")
    limit: int | None = opt(None, "Only the first N scans.")
    view_batch: int = opt(6, "Images per teacher forward pass.", cli=False)
    block_size: int = opt(16, "Scans per block (unit of work, writing and resuming).")
    storage_options: dict = opt(default_factory=dict, help=STORAGE_HELP, flag="--storage-option")
    workers: int = opt(0, "Run blocks on a local Dask cluster of N worker processes (0 = in this process).")
    scheduler: str | None = opt(None, "Run blocks on an existing Dask scheduler, tcp://HOST:PORT.")
    on_error: str = opt("stop", "A bad sample: stop (error naming the file) or skip (recorded in the manifest).")
    feature_dtype: str = opt("int8", "Teacher feature maps on disk: int8 with a per-patch scale, or float16 (twice "
                                     "the size).")
    teacher_precision: str = opt("auto", "Teacher compute: auto (float16 on CUDA, bfloat16 on CPUs with AMX, else "
                                         "float32), float32, bfloat16, float16 (CUDA only).")
    simulated: SimulatedConfig = opt(default_factory=SimulatedConfig, help="Knobs of the simulated teacher.",
                                     cli=False)

    def __post_init__(self) -> None:
        """Every option checked here, once: ConfigError with one line naming the option and value."""
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset {self.dataset!r}: unknown dataset; expected one of {', '.join(DATASETS)}")
        if self.version is None:
            object.__setattr__(self, "version", DATASETS[self.dataset].version)
        if self.class_set is None:  # the dataset's own class set (named as the dataset)
            object.__setattr__(self, "class_set", self.dataset)
        if not str(self.dataroot):
            raise ConfigError("--dataroot: empty path")
        object.__setattr__(self, "dataroot", Path(self.dataroot))
        if not str(self.out):
            raise ConfigError("--out: empty path")
        check_int("--sweeps", self.sweeps, 1, 10)
        if self.limit is not None:
            check_int("--limit", self.limit, 1, note=" (omit it for every scan)")
        check_int("--block-size", self.block_size, 1)
        check_int("view_batch", self.view_batch, 1)
        check_int("--workers", self.workers, 0, note=" (0 = run in this process)")
        if self.scheduler is not None:
            if not isinstance(self.scheduler, str) or not self.scheduler.strip():
                raise ConfigError(f"--scheduler {self.scheduler!r}: expected a scheduler address, e.g. tcp://host:8786")
            if self.workers:
                raise ConfigError(f"--workers {self.workers} and --scheduler {self.scheduler}: give one of them "
                                  "(--workers starts a local cluster, --scheduler uses a running one)")
        if self.on_error not in ("stop", "skip"):
            raise ConfigError(f"--on-error {self.on_error!r}: expected stop or skip")
        if self.feature_dtype not in ("int8", "float16"):
            raise ConfigError(f"--feature-dtype {self.feature_dtype!r}: expected int8 or float16")
        if self.teacher_precision not in PRECISIONS:
            raise ConfigError(f"--teacher-precision {self.teacher_precision!r}: unknown teacher precision; expected one of {', '.join(PRECISIONS)}")
        if self.teacher is not None and not isinstance(self.teacher, TeacherConfig):
            raise ConfigError(f"teacher {self.teacher!r}: expected a TeacherConfig or None")
        if not isinstance(self.overwrite, bool):
            raise ConfigError(f"--overwrite {self.overwrite!r}: expected True or False")
        if not isinstance(self.storage_options, dict):
            raise ConfigError(f"storage_options {self.storage_options!r}: expected a dict")
        get_class_set(self.class_set)  # ConfigError naming an unknown class set
        device = resolve_device(self.device)  # ConfigError for a malformed device or absent CUDA
        if self.teacher is not None and self.teacher_precision == "float16" and device.type != "cuda":
            raise ConfigError(f"--teacher-precision float16 on --device {self.device}: float16 is for CUDA only "
                              "(use bfloat16 or float32)")


def _check_image_file(path: Path) -> None:
    """DataError naming the file if it is missing or empty (0 bytes: a truncated copy or download)."""
    try:
        size = Path(path).stat().st_size
    except FileNotFoundError:
        raise DataError(f"camera image not found: {path}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read camera image ({e.strerror or e})") from None
    if size == 0:
        raise DataError(f"{path}: camera image file is empty (0 bytes): corrupt or truncated copy")


def decode_image(path: Path, width: int, height: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decode a camera JPEG/PNG with torchvision.io (nvjpeg on a CUDA device): (3, H, W) uint8 on
    `device`. DataError names the file if missing, corrupt or of the wrong size."""
    import torchvision.io as tvio

    device = torch.device(device)
    _check_image_file(path)
    try:
        data = tvio.read_file(str(path))
    except (FileNotFoundError, RuntimeError):
        raise DataError(f"camera image not found: {path}") from None
    try:
        if device.type == "cuda" and bytes(data[:2].tolist()) == b"\xff\xd8":
            img = tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device)
        else:
            img = tvio.decode_image(data, mode=tvio.ImageReadMode.RGB).to(device)
    except RuntimeError as e:
        raise DataError(f"{path}: cannot decode image ({str(e).splitlines()[0]})") from None
    if tuple(img.shape[1:]) != (height, width):
        raise DataError(f"{path}: image is {img.shape[2]}x{img.shape[1]}, the dataset says {width}x{height}")
    return img


def prepare_batch(images: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """(3, H_i, W_i) uint8 images -> (B, 3, h, w) float32 in [0, 1], resized with antialiased
    bilinear interpolation (as PIL's BILINEAR downscaling), on the images' device."""
    out = []
    for im in images:
        x = im.unsqueeze(0).float().div_(255.0)
        if tuple(x.shape[2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append(x)
    return torch.cat(out).clamp_(0.0, 1.0)


def project_views(xyz: np.ndarray, ds: Dataset, scan: ScanRef) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (point, view) pair: each visible point in every view that sees it.

    xyz: (n, 3) float32 in the scan's frame. Returns point (p,) int32, view (p,) uint8 and uv
    (p, 2) float32 pixel coordinates in that view's original image, sorted by point and, within
    a point, by distance from the image border (largest first; ties -> lower view index: the
    cache's `pair_order`).
    """
    views = ds.views(scan)
    if len(views) > 255:
        raise DataError(f"scan {scan.token}: {len(views)} views, at most 255 fit the cache's uint8 view index")
    points, cams, uvs, margins = [], [], [], []
    for c, view in enumerate(views):
        uv, vis = ds.project(scan, c, xyz)
        idx = np.flatnonzero(vis)
        uv = uv[idx]
        margins.append(np.minimum.reduce([uv[:, 0] - 1, view.width - 1 - uv[:, 0], uv[:, 1] - 1, view.height - 1 - uv[:, 1]]))
        points.append(idx)
        cams.append(np.full(len(idx), c, np.int64))
        uvs.append(uv)
    if not points:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros((0, 2), np.float32)
    point, cam, uv, margin = (np.concatenate(x) for x in (points, cams, uvs, margins))
    order = np.lexsort((cam, -margin, point))
    return point[order].astype(np.int32), cam[order].astype(np.uint8), uv[order].astype(np.float32)


@torch.inference_mode()
def process_scan(ds: Dataset, scan: ScanRef, teacher: MaskCLIP | None, device: torch.device,
                 view_batch: int = 6) -> ScanRecord:
    """Teacher outputs for one scan as a ScanRecord (see storage.writer); labels only without a teacher.

    Every (point, view) pair is kept (`project_views`); the views that see at least one point
    are run through the teacher `view_batch` at a time, and their dense maps are stored as they
    come out, on the teacher's patch grid (whatever its shape): features (h, w, D) L2-normalised,
    class scores (h, w, C) after the configured refinements. The teacher contract is
    `teacher.dense_outputs(images) -> ((V, D, h, w), (V, C, h, w))`.
    """
    xyz, feat, sweep, n_key = ds.points(scan)
    label = None
    if ds.has_labels:
        label = np.zeros(len(xyz), np.uint8)
        if not scan.split.endswith("test"):  # test splits ship without labels (all 0 = ignore)
            label[:n_key] = ds.labels(scan, n_key)
    if teacher is None:
        empty = np.zeros(0, np.int32)
        return ScanRecord(token=scan.token, scene=scan.scene, split=scan.split, timestamp=scan.timestamp,
                          lidar_path=scan.lidar_path, xyz=xyz, feat=feat, sweep=sweep, label=label,
                          pair_point=empty, pair_image=empty.astype(np.uint8), pair_uv=np.zeros((0, 2), np.float32))
    point, cam, uv = project_views(xyz, ds, scan)
    views = ds.views(scan)
    used = np.unique(cam)  # views with at least one pair, ascending: image k is view used[k]
    image_of_view = np.zeros(max(len(views), 1), np.uint8)
    image_of_view[used] = np.arange(len(used))
    feats, logits = [], []
    for k0 in range(0, len(used), view_batch):
        chunk = [views[int(c)] for c in used[k0 : k0 + view_batch]]
        if getattr(teacher, "reads_class_maps", False):  # the simulated teacher: the views' class maps
            dense, dense_logits = teacher.dense_outputs_for_views(chunk, ds.name)
        else:
            images = [decode_image(v.path, v.width, v.height, device) for v in chunk]
            batch = prepare_batch(images, tuple(teacher.fingerprint["image_size"]))
            with teacher.autocast():
                dense, dense_logits = teacher.dense_outputs(batch)  # (V, D, h, w), (V, C, h, w)
        feats.append(F.normalize(dense.float(), dim=1).permute(0, 2, 3, 1).cpu().numpy())
        logits.append(dense_logits.float().permute(0, 2, 3, 1).cpu().numpy().astype(np.float16))
    d, c = teacher.embed_dim, len(teacher.class_names)
    return ScanRecord(
        token=scan.token,
        scene=scan.scene,
        split=scan.split,
        timestamp=scan.timestamp,
        lidar_path=scan.lidar_path,
        xyz=xyz,
        feat=feat,
        sweep=sweep,
        label=label,
        pair_point=point,
        pair_image=image_of_view[cam],
        pair_uv=uv,
        image_view=used.astype(np.uint8),
        image_size=np.array([[views[int(v)].width, views[int(v)].height] for v in used], np.uint16).reshape(-1, 2),
        image_logits=np.concatenate(logits) if logits else np.zeros((0, 0, 0, c), np.float16),
        image_features=np.concatenate(feats) if feats else np.zeros((0, 0, 0, d), np.float32),
    )


# Teachers that are not a MaskCLIP variant, by TeacherConfig.teacher (any other name goes to load_teacher).
SPECIAL_TEACHERS = {"simulated": load_simulated_teacher}

_PROCESS_CACHE: dict = {}  # per worker process: dataset reader, scan list, teacher


def _cached(key, make):
    if key not in _PROCESS_CACHE:
        _PROCESS_CACHE[key] = make()
    return _PROCESS_CACHE[key]


def _dataset_and_scans(config: PrecomputeConfig, run_id: str) -> tuple[Dataset, list[ScanRef]]:
    """The reader and scan list, built once per process and run (files may change between runs)."""
    key = ("scans", run_id, config.dataset, str(config.dataroot), config.version, config.split, config.sweeps,
           config.limit)
    for k in [k for k in _PROCESS_CACHE if k[0] == "scans" and k[1] != run_id]:
        del _PROCESS_CACHE[k]  # an earlier run's reader

    def make():
        ds = open_dataset(config.dataset, config.dataroot, config.version)
        scans = ds.scans(split=config.split, sweeps=config.sweeps)
        return ds, scans[: config.limit] if config.limit is not None else scans

    return _cached(key, make)


def _worker_device(config: PrecomputeConfig) -> torch.device:
    """The task's device: in a Dask worker with several GPUs, worker k uses cuda:k mod count."""
    if config.device.startswith("cuda") and ":" not in config.device and torch.cuda.device_count() > 1:
        try:
            from distributed import get_worker

            name = get_worker().name
            k = name if isinstance(name, int) else sum(map(ord, str(name)))
            return resolve_device(f"cuda:{k % torch.cuda.device_count()}")
        except (ImportError, ValueError):
            pass
    return resolve_device(config.device)


def _teacher(config: PrecomputeConfig, class_names: tuple[str, ...], device: torch.device) -> MaskCLIP | None:
    if config.teacher is None:
        return None

    try:
        precision = resolve_precision(config.teacher_precision, device)
    except ValueError as e:
        raise ConfigError(f"--teacher-precision: {e}") from None

    def make():
        kind = config.teacher.teacher
        if kind in SPECIAL_TEACHERS:
            try:
                return SPECIAL_TEACHERS[kind](class_names, config.teacher.image_size, config.simulated, device)
            except ValueError as e:
                raise ConfigError(f"--teacher {kind} --image-size {config.teacher.image_size[0]}x"
                                  f"{config.teacher.image_size[1]}: {e}") from None
        try:
            teacher = load_teacher(config.teacher, class_names, device=device)
        except (ValueError, NotImplementedError) as e:  # unknown model, bad image size, unsupported tower
            raise ConfigError(f"teacher {config.teacher.teacher} --clip-model {config.teacher.model!r} --image-size "
                              f"{config.teacher.image_size[0]}x{config.teacher.image_size[1]}: {e}") from None
        try:
            return teacher.set_precision(precision)
        except ValueError as e:
            raise ConfigError(f"--teacher-precision {config.teacher_precision} on {device}: {e}") from None

    return _cached(("teacher", config.teacher, config.simulated, tuple(class_names), str(device), precision), make)


def block_payload(ds: Dataset, scans: list[ScanRef]) -> tuple[Dataset, list[ScanRef]]:
    """What a Dask task needs to process `scans`: the reader cut down to the records they use
    (`ds.subset`, e.g. nuScenes: a few hundred table records instead of millions) and the scans
    pointing at it. Readers without `subset` are small and are sent whole."""
    subset = getattr(ds, "subset", None)
    return subset(scans) if subset is not None else (ds, scans)


def run_block(config: PrecomputeConfig, index: int, start: int, stop: int, layout: Layout,
              threads: int | None = None, run_id: str = "",
              payload: tuple[Dataset, list[ScanRef]] | None = None) -> dict:
    """Process scans [start, stop) of the configured dataset as block `index` and write it.

    Runs in the coordinator or in a Dask worker. `payload` = (reader, the block's scans) from
    `block_payload`: the coordinator read the tables once and sends each task only the records
    it needs; without it (a direct call) the reader is opened here, once per process. The
    teacher is built once per process. A bad sample raises DataError naming it, or with
    on_error="skip" is left out and listed in the block summary. Returns the summary.
    """
    tune_malloc()  # Dask workers are fresh processes
    if threads:
        torch.set_num_threads(threads)
    if payload is None:
        ds, scans = _dataset_and_scans(config, run_id)
        scans = scans[start:stop]
    else:
        ds, scans = payload
        if len(scans) != stop - start:
            raise ValueError(f"block {index}: payload has {len(scans)} scans for [{start}, {stop})")
    device = _worker_device(config)
    teacher = _teacher(config, get_class_set(config.class_set), device)
    records, skipped, images = [], [], 0
    for scan in scans:
        try:
            records.append(process_scan(ds, scan, teacher, device, config.view_batch))
            images += len(records[-1].image_view) if teacher is not None else 0
        except DataError as e:
            if config.on_error != "skip":
                raise
            log.warning("skipping %s: %s", scan.token, e)
            skipped.append(dict(token=scan.token, scene=scan.scene, reason=str(e)))
    summary = write_block(Location.parse(config.out, config.storage_options), index, records, layout, skipped)
    summary["teacher_sha256"] = teacher.fingerprint["weights_sha256"] if teacher is not None else None
    summary["teacher_precision"] = teacher.precision if teacher is not None else None
    summary["images"] = images  # teacher images of the block, for the throughput figure
    return summary


def _resume_key(config: PrecomputeConfig, meta: dict, scans: list[ScanRef]) -> dict:
    tokens = hashlib.sha256("\n".join(s.token for s in scans).encode()).hexdigest()
    return dict(dataset=meta["dataset"], teacher=meta["teacher"], class_set=config.class_set, sweeps=config.sweeps,
                limit=config.limit, block_size=config.block_size, on_error=config.on_error, scans=len(scans),
                feature_dtype=config.feature_dtype, teacher_precision=config.teacher_precision,
                scan_tokens_sha256=tokens)


def _run_blocks(config: PrecomputeConfig, todo: list[tuple[int, int, int]], layout: Layout, writer: CacheWriter,
                expected_sha: str | None, progress: bool, run_id: str) -> None:
    """Run the pending blocks inline or on Dask; record each as it completes."""
    def record(summary: dict) -> None:
        if summary.get("teacher_sha256") != expected_sha:
            raise ConfigError(f"block {summary['index']} was computed with teacher weights sha256 "
                              f"{summary.get('teacher_sha256')}, the coordinator has {expected_sha}: "
                              "every worker must see the same CLIP weights")
        writer.record_block(summary)

    ds, scans = _dataset_and_scans(config, run_id)
    bar = tqdm(total=sum(stop - start for _, start, stop in todo), desc="precompute", unit="scan",
               disable=not progress, smoothing=0.05)
    if not (config.workers or config.scheduler):
        with bar:  # closed (line ended) before any error is reported
            for index, start, stop in todo:
                record(run_block(config, index, start, stop, layout, None, run_id, (ds, scans[start:stop])))
                bar.update(stop - start)
        return
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if config.scheduler:
        try:
            client = Client(config.scheduler)
        except (OSError, TimeoutError, ValueError) as e:
            raise ConfigError(f"--scheduler {config.scheduler}: cannot connect ({str(e).splitlines()[0]})") from None
    else:
        cluster = LocalCluster(n_workers=config.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        threads = 1 if not config.scheduler else None
        # Tasks are submitted a few per worker at a time, each carrying only its block's records
        # (block_payload): the coordinator's memory for payloads stays bounded whatever the
        # number of blocks, and no worker ever opens the dataset tables.
        in_flight = 2 * max(len(client.scheduler_info().get("workers", {})), config.workers, 1)
        pending = iter(todo)

        def submit(block):
            index, start, stop = block
            return client.submit(run_block, config, index, start, stop, layout, threads, run_id,
                                 block_payload(ds, scans[start:stop]), key=f"block-{run_id}-{index}", pure=False)

        ac = as_completed([submit(b) for b in itertools.islice(pending, in_flight)])
        for fut in ac:
            summary = fut.result()  # a worker's DataError is re-raised here
            fut.release()
            record(summary)
            bar.update(sum(1 for _ in summary["scans"]) + len(summary.get("skipped", [])))
            nxt = next(pending, None)
            if nxt is not None:
                ac.add(submit(nxt))
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()


def _probe_scheduler(address: str, timeout: float = 5.0) -> None:
    """ConfigError if nothing accepts TCP connections at a tcp:// (or bare host:port) scheduler
    address; other protocols are left to Dask's own connect."""
    import socket
    from urllib.parse import urlsplit

    if "://" in address and not address.startswith("tcp://"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ConfigError(f"--scheduler {address}: expected tcp://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"--scheduler {address}: cannot connect ({e.strerror or e}); is the Dask scheduler running?") from None


@contextlib.contextmanager
def _disk_full_is_resumable(out) -> Iterator[None]:
    """A full disk (or quota) while writing -> one-line CacheError saying the cache is resumable
    (the writer has marked it failed, never complete, and released its lock)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        raise CacheError(f"{out}: no space left on the device{where}; the blocks finished so far are kept and "
                         "the cache is not marked complete: free some space and rerun the same command to resume") from None


def run_precompute(config: PrecomputeConfig, progress: bool = True) -> dict:
    """Build (or resume) the cache described by `config`; returns its metadata plus timing numbers.

    Scans are cut into blocks of `block_size`; each block is processed and written whole by one
    task (inline, or on a Dask cluster with `workers` / `scheduler`), and recorded by this
    process, the single coordinator. Rerunning after a crash resumes: recorded blocks are kept,
    the others redone, and the result is the same cache as an uninterrupted run.
    """
    # a cache another process is writing, or a scheduler nobody listens on, is refused before any
    # work (the teacher takes long to load)
    Lock(Location.parse(config.out, config.storage_options)).check_free()
    if config.scheduler:
        _probe_scheduler(config.scheduler)
    class_names = get_class_set(config.class_set)
    run_id = uuid.uuid4().hex
    ds, scans = _dataset_and_scans(config, run_id)
    if not scans:
        raise DataError(f"no scans in {ds.dataroot} ({ds.name} {ds.version}) for split {config.split!r}")
    if config.teacher is None and not ds.has_labels:
        raise ConfigError(f"{ds.dataroot} has no labels and --clip-model none asks for no teacher: nothing to cache")
    teacher = _teacher(config, class_names, resolve_device(config.device))
    if getattr(teacher, "reads_class_maps", False):
        from clip2scene.precompute.teacher.classmaps import CLASSMAP_DIR, find_class_map_root

        first = ds.views(scans[0])
        if first and find_class_map_root(first[0].path) is None:
            raise ConfigError(f"--teacher {config.teacher.teacher}: {ds.dataroot} has no per-pixel class maps "
                              f"({CLASSMAP_DIR}/): the simulated teacher only runs on samples written by "
                              "`clip2scene make-sample`")
    meta = dict(
        dataset=dict(name=ds.name, version=ds.version, dataroot=str(Path(config.dataroot).resolve()), split=config.split),
        teacher=teacher.fingerprint if teacher is not None else None,
        class_names=list(class_names),
        class_set=config.class_set,
        eval_class_names=list(get_eval_classes(ds.name)),
        prompt_to_eval=list(prompt_to_eval(config.class_set, ds.name)),
        sweeps=config.sweeps,
        cameras=list(ds.cameras),
        point_features=list(ds.point_features),
        voxel_size=ds.voxel_size,
        on_error=config.on_error,
        teacher_precision=teacher.precision if teacher is not None else None,  # blocks record their own
    )
    embed_dim = teacher.embed_dim if teacher is not None else None
    layout = Layout(len(class_names), embed_dim, len(ds.point_features), ds.has_labels, config.feature_dtype)
    blocks = [(i, a, min(a + config.block_size, len(scans))) for i, a in enumerate(range(0, len(scans), config.block_size))]
    key = _resume_key(config, meta, scans)
    if not config.overwrite:
        try:
            existing = open_cache(config.out, config.storage_options)
        except CacheError:
            existing = None
        if existing is not None and existing.meta.get("resume_key") == json.loads(json.dumps(key)):
            log.info("%s is already complete for this configuration: nothing to do", config.out)
            return dict(existing.meta, seconds=0.0, resumed_blocks=len(blocks), images_per_second=float("nan"),
                        already_complete=True)
    t0 = time.perf_counter()
    with _disk_full_is_resumable(config.out):
        writer = CacheWriter(config.out, meta, len(class_names), embed_dim, ds.has_labels, config.overwrite,
                             storage_options=config.storage_options, block_size=config.block_size,
                             resume_key=key, feature_dtype=config.feature_dtype)
        with writer:
            done = writer.done_blocks()
            todo = [b for b in blocks if b[0] not in done]
            if writer.resumed:
                log.info("resuming: %d of %d blocks already done", len(blocks) - len(todo), len(blocks))
            _run_blocks(config, todo, layout, writer, teacher.fingerprint["weights_sha256"] if teacher else None,
                        progress, run_id)
            if teacher is not None:
                writer.set_text_embeddings(teacher.text_embeddings.cpu().numpy())
            writer.commit(num_blocks=len(blocks))
    seconds = time.perf_counter() - t0
    result = dict(writer.meta)
    result["seconds"] = seconds
    result["resumed_blocks"] = len(blocks) - len(todo)
    ran = {t[0] for t in todo}
    images = sum(b.get("images", 0) for i, b in writer.done_blocks().items() if i in ran)
    result["images_per_second"] = images / max(seconds, 1e-9)  # images this run computed
    log.info("precompute done: %d scans in %.1fs", len(scans), seconds)
    return result
