"""The `clip2scene` command line: make-sample, precompute, train, evaluate, ablate, finetune,
linear-probe, report, show, plot, query, cache info/verify/merge, demo.

Only this module prints. Library errors (clip2scene.errors) become one line on stderr and exit
code 2, with no traceback. Run `clip2scene --help` or `clip2scene COMMAND --help`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from clip2scene import __version__
from clip2scene.errors import Clip2SceneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="CLIP2Scene: distil a cached CLIP teacher into a 3D sparse network.")
cache_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect caches.")
app.add_typer(cache_app, name="cache")
log = logging.getLogger("clip2scene")


def _fail(message: str) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(2)


def _one_line(message: str) -> str:
    """An error re-raised from a worker process (a DataLoader worker wraps it as 'Caught X in
    DataLoader worker process 0. Original Traceback ...') -> just the original one-line message."""
    lines = [ln for ln in str(message).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and "Traceback (most recent call last)" in message:
        head, sep, rest = lines[-1].partition(": ")  # "clip2scene.errors.CacheError: <message>"
        if sep and " " not in head and (head.endswith(("Error", "Exception")) or "." in head):
            return rest
        return lines[-1]
    return str(message)


def _interrupted(message: str) -> None:
    """Ctrl-C: one line saying how to continue, exit 130, and nothing from threads still
    shutting down (Dask's event loop logs 'Task was destroyed' as the interpreter exits)."""
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    typer.echo(f"interrupted: {message}", err=True)
    raise typer.Exit(130)


def _interruptible(fn, *args, **kwargs):
    """`_run` for train / finetune / linear-probe / ablate: Ctrl-C prints one line (how to
    continue: the `--resume` checkpoint) and exits with code 130 (128 + SIGINT), no traceback."""
    try:
        return _run(fn, *args, **kwargs)
    except KeyboardInterrupt as e:  # clip2scene.errors.Interrupted says how to continue
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(str(e) if str(e) else "interrupted", err=True)
        raise typer.Exit(130)


def _given(ctx: typer.Context) -> set[str]:
    """Names of the command's options that the user gave (command line or environment), not defaults."""
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


RANDOM_TEACHER = "the teacher was randomly initialised (no CLIP weights): its pseudo-labels are meaningless."


def _run(fn, *args, _raise: type | tuple = (), **kwargs):
    """Call library code; turn user-facing errors into one line and exit code 2 (those of type
    `_raise` are re-raised for the caller to handle)."""
    from clip2scene.precompute.teacher.weights import WeightsNotFoundError
    from clip2scene.storage.store import remote_error

    try:
        return fn(*args, **kwargs)
    except _raise:
        raise
    except (Clip2SceneError, WeightsNotFoundError, FileExistsError) as e:
        _fail(str(e))
    except Exception as e:  # an object store failing inside zarr (no credentials, endpoint gone)
        err = remote_error(None, e)
        if err is None:
            raise
        _fail(str(err))


_STORAGE_HELP = "fsspec option for a cache URL, key=value (repeatable), e.g. client_kwargs.endpoint_url=http://host:9000."


def _storage(options: Optional[list[str]]) -> dict:
    from clip2scene.storage import parse_storage_options

    return _run(parse_storage_options, options)


def _parse_size(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        _fail(f"--image-size {value!r}: expected HxW, e.g. 224x416")
    return h, w  # positive multiples of the patch: TeacherConfig / load_teacher


def _parse_channels(value: Optional[str]):
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        _fail(f"--channels {value!r}: expected 9 comma-separated integers")


def _print_version(value: bool) -> None:
    """Eager --version: answered before Click looks for a command."""
    if value:
        typer.echo(f"clip2scene {__version__}")
        raise typer.Exit()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details (INFO)."),
          version: bool = typer.Option(False, "--version", is_eager=True, expose_value=False, callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # Dask logs ~30 INFO lines and nanny shutdown warnings per run otherwise
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
        logging.getLogger("distributed").setLevel(logging.ERROR)
    # third-party noise that says nothing about the user's run
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"spconv(\..*)?")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    from clip2scene.runtime import tune_malloc

    tune_malloc()  # big tensors reuse heap memory instead of page-faulting in fresh mmaps


# ---------------------------------------------------------------------------------- make-sample
@app.command("make-sample")
def make_sample_cmd(
    out: Path = typer.Option(..., help="Folder to write the synthetic dataroot into (must not exist)."),
    format: str = typer.Option("nuscenes", "--format", help="On-disk format: nuscenes, semantickitti or scannet."),
    scenes: int = typer.Option(2, help="nuScenes scenes (<= 10: v1.0-mini names) / ScanNet train scenes (+1 val)."),
    keyframes: int = typer.Option(4, help="Keyframes per scene (nuScenes) / frames per sequence (KITTI) / frames per scene (ScanNet)."),
    sweeps: int = typer.Option(3, help="nuScenes: lidar sweeps stored before each keyframe."),
    width: Optional[int] = typer.Option(None, help="Image width (default nuscenes 400, semantickitti 320, scannet 320)."),
    height: Optional[int] = typer.Option(None, help="Image height (default nuscenes 225, semantickitti 96, scannet 240)."),
    seed: int = typer.Option(0, help="Random seed; the output is deterministic given it."),
) -> None:
    """Write a small synthetic dataset in the exact on-disk format of nuScenes, SemanticKITTI or ScanNet."""
    try:
        _make_sample(out, format, scenes, keyframes, sweeps, width, height, seed)
    except ValueError as e:  # a bad generator setting
        _fail(f"make-sample: {e}")


def _make_sample(out: Path, format: str, scenes: int, keyframes: int, sweeps: int, width: Optional[int],
                 height: Optional[int], seed: int) -> None:
    if format == "nuscenes":
        from clip2scene.samples.nuscenes import SampleConfig, make_sample

        cfg = SampleConfig(scenes=scenes, keyframes=keyframes, sweeps=sweeps, image_width=width or 400,
                           image_height=height or 225, seed=seed)
        root = _run(make_sample, out, cfg)
        typer.echo(f"wrote synthetic nuScenes sample: {root} ({scenes} scenes x {keyframes} keyframes)")
    elif format == "semantickitti":
        from clip2scene.samples.semantickitti import KittiSampleConfig, make_semantickitti_sample

        cfg = KittiSampleConfig(frames=keyframes, image_width=width or 320, image_height=height or 96, seed=seed)
        root = _run(make_semantickitti_sample, out, cfg)
        typer.echo(f"wrote synthetic SemanticKITTI sample: {root} (sequences {', '.join(cfg.sequences)} x {keyframes} frames)")
    elif format == "scannet":
        from clip2scene.samples.scannet import ScanNetSampleConfig, make_scannet_sample

        cfg = ScanNetSampleConfig(train_scenes=scenes, frames=keyframes * 2, image_width=width or 320,
                                  image_height=height or 240, seed=seed)
        root = _run(make_scannet_sample, out, cfg)
        typer.echo(f"wrote synthetic ScanNet sample: {root} ({scenes} train + 1 val scenes x {cfg.frames} frames)")
    else:
        _fail(f"--format {format!r}: expected nuscenes, semantickitti or scannet")


# ---------------------------------------------------------------------------------- precompute
def _parse_window(option: str, value: Optional[str]) -> Optional[tuple[int, int]]:
    """--window / --stride: N (square) or HxW pixels; None stays None."""
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        _fail(f"{option} {value!r}: expected a positive size in pixels, N or HxW (e.g. 448 or 448x896)")
    return parts[0], parts[1]


def _teacher_config(clip_model: str, clip_weights: str, image_size: str, key_smoothing: bool = False,
                    prompt_denoising: bool = False, denoise_threshold: float = 0.5, teacher: str = "maskclip",
                    window: Optional[str] = None, stride: Optional[str] = None, pamr: bool = False):
    from clip2scene.precompute.teacher.config import TeacherConfig

    win, step = _parse_window("--window", window), _parse_window("--stride", stride)
    return _run(TeacherConfig, model=clip_model, weights=clip_weights, image_size=_parse_size(image_size),
                key_smoothing=key_smoothing, prompt_denoising=prompt_denoising, denoise_threshold=denoise_threshold,
                teacher=teacher, window=win, stride=step, pamr=pamr)


def _window_text(fp: dict) -> str:
    """' window HxW stride HxW' of a teacher fingerprint ('' without windows), plus ' +PAMR'."""
    out = ""
    if fp.get("window"):
        out += f" window {'x'.join(map(str, fp['window']))} stride {'x'.join(map(str, fp['stride']))}"
    return out + (" +PAMR" if fp.get("pamr") else "")


SIMULATED_NOTE = ("SIMULATED teacher: pseudo-labels made from the synthetic sample's own class maps with CLIP-like "
                  "errors (not CLIP; see docs/simulated-teacher.md)")


def _simulated_teacher_config(image_size: str):
    from clip2scene.precompute.teacher.config import TeacherConfig

    return TeacherConfig(model="simulated", weights="none", image_size=_parse_size(image_size), teacher="simulated")


def _print_precompute(meta: dict) -> None:
    t = meta["teacher"]
    typer.echo(f"cache: {meta.get('path', '')}")
    typer.echo(f"  scans {meta['num_scans']}, points {meta['num_points']}, camera-visible points "
               f"{meta.get('num_visible', meta['num_pairs'])} ({meta['num_pairs']} point-view pairs)")
    if meta.get("already_complete"):
        typer.echo("  already complete for these settings: nothing to do (pass --overwrite to rebuild it)")
    if t is None:
        if not meta.get("already_complete"):
            typer.echo(f"  labels only (no teacher), {meta['seconds']:.1f} s")
        return
    if t.get("model") == "simulated":
        typer.echo(f"  teacher: {SIMULATED_NOTE}")
        typer.echo(f"  simulated teacher {t['weights_sha256']} image {t['image_size']}, dim {t['embed_dim']}")
    else:
        typer.echo(f"  teacher {t.get('teacher', 'maskclip')} on {t['model']} weights={t['weights']} "
                   f"sha256={t['weights_sha256'][:16]} image {t['image_size']}{_window_text(t)} "
                   f"computed in {meta.get('teacher_precision') or 'float32'}")
    if meta.get("already_complete"):
        pass
    elif meta.get("resumed_blocks") and meta.get("resumed_blocks") == meta.get("num_blocks"):
        typer.echo(f"  resumed: all {meta['num_blocks']} blocks were already done; committed in {meta['seconds']:.1f} s")
    else:
        if meta.get("resumed_blocks"):
            typer.echo(f"  resumed: {meta['resumed_blocks']} of {meta['num_blocks']} blocks were already done")
        typer.echo(f"  {meta['seconds']:.1f} s, {meta['images_per_second']:.2f} images/s")
    if meta.get("num_skipped"):
        typer.echo(f"  skipped {meta['num_skipped']} bad sample(s): see `clip2scene cache info`")
    if t["weights_sha256"] == "random":
        typer.echo(f"  WARNING: {RANDOM_TEACHER}")


@app.command()
def precompute(
    dataroot: Path = typer.Option(..., help="Dataset root folder."),
    out: str = typer.Option(..., help="Cache to create: folder or fsspec URL (s3://bucket/c.zarr)."),
    dataset: str = typer.Option("nuscenes", help="Dataset format: nuscenes, semantickitti, scannet."),
    version: Optional[str] = typer.Option(None, help="Dataset version: nuScenes v1.0-mini or v1.0-trainval (default), SemanticKITTI semantickitti, ScanNet scannet-25k."),
    split: Optional[str] = typer.Option(None, help="Only this split (train/val); default all."),
    sweeps: int = typer.Option(3, help="Lidar frames per scan: keyframe + K-1 previous sweeps (1..10)."),
    class_set: Optional[str] = typer.Option(None, help="Prompt class set: nuscenes, semantickitti, cityscapes, scannet, all (default: the dataset's)."),
    teacher: str = typer.Option("maskclip", help="Dense-CLIP method: maskclip (the paper's), sclip, clearclip, naclip (docs: Choosing a teacher); or simulated: make-sample data only, MaskCLIP-shaped outputs with CLIP-like errors from the sample's class maps, no weights (--clip-model/--clip-weights ignored; docs/simulated-teacher.md)."),
    clip_model: str = typer.Option("ViT-B-16", help="open_clip ViT backbone (ViT-B-16, ViT-L-14, ViT-B-16-quickgelu, ...), or none: cache points and labels only (no teacher)."),
    clip_weights: str = typer.Option("openai", help="open_clip tag, checkpoint file, local-dir:DIR, or none (random)."),
    image_size: Optional[str] = typer.Option(None, help="Teacher input size HxW (default per dataset: nuscenes 224x416, semantickitti 128x416, scannet 240x320; with --window the full camera resolution, nuscenes 896x1600, semantickitti 384x1248, scannet 480x640; rounded to the patch size)."),
    window: Optional[str] = typer.Option(None, help="Sliding-window inference: window N or HxW pixels of the teacher input (e.g. 448), logits averaged on overlaps; default: the whole image at once."),
    stride: Optional[str] = typer.Option(None, help="Sliding-window stride N or HxW pixels (default half the window, in whole patches)."),
    pamr: bool = typer.Option(False, help="PAMR refinement of the class scores on the teacher-input pixels (NACLIP's post-processing)."),
    key_smoothing: bool = typer.Option(False, help="MaskCLIP key smoothing of the class scores."),
    prompt_denoising: bool = typer.Option(False, help="MaskCLIP prompt denoising (drop classes absent from an image)."),
    denoise_threshold: float = typer.Option(0.5, help="Prompt-denoising threshold on a class's max probability."),
    device: str = typer.Option("cpu", help="Teacher device (cpu, cuda)."),
    overwrite: bool = typer.Option(False, help="Replace an existing cache."),
    limit: Optional[int] = typer.Option(None, help="Only the first N scans."),
    workers: int = typer.Option(0, help="Run blocks on a local Dask cluster of N worker processes (0 = in this process)."),
    scheduler: Optional[str] = typer.Option(None, help="Run blocks on an existing Dask scheduler, tcp://HOST:PORT."),
    block_size: int = typer.Option(16, help="Scans per block (unit of work, writing and resuming)."),
    on_error: str = typer.Option("stop", help="A bad sample: stop (error naming the file) or skip (recorded in the manifest)."),
    feature_dtype: str = typer.Option("int8", help="Teacher feature maps on disk: int8 with a per-patch scale, or float16 (twice the size)."),
    teacher_precision: str = typer.Option("auto", help="Teacher compute: auto (float16 on CUDA, bfloat16 on CPUs with AMX, else float32), float32, bfloat16, float16 (CUDA only)."),
    storage_option: Optional[list[str]] = typer.Option(None, help=_STORAGE_HELP),
) -> None:
    """Stage one: run MaskCLIP once per scan and write the per-point cache (resumes an interrupted run)."""
    from clip2scene.precompute.pipeline import DATASETS, PrecomputeConfig, default_image_size, run_precompute

    # every option is validated by PrecomputeConfig / TeacherConfig (one line, exit 2)
    known = dataset if dataset in DATASETS else "nuscenes"
    size = image_size or "x".join(map(str, default_image_size(known, clip_model, windowed=window is not None)))
    if teacher == "simulated":
        teacher_cfg = _simulated_teacher_config(image_size or "x".join(map(str, default_image_size(known, "ViT-B-16"))))
    else:
        teacher_cfg = None if clip_model == "none" else _teacher_config(clip_model, clip_weights, size, key_smoothing,
                                                                        prompt_denoising, denoise_threshold, teacher,
                                                                        window, stride, pamr)
    cfg = _run(PrecomputeConfig, dataroot=dataroot, out=out, dataset=dataset, version=version, split=split,
               sweeps=sweeps, class_set=class_set or known, teacher=teacher_cfg,
               device=device, overwrite=overwrite, limit=limit, workers=workers, scheduler=scheduler,
               block_size=block_size, on_error=on_error, storage_options=_storage(storage_option),
               feature_dtype=feature_dtype, teacher_precision=teacher_precision)
    try:
        meta = _run(run_precompute, cfg)
    except KeyboardInterrupt:
        _interrupted("precompute stopped: the blocks finished so far are kept; rerun the same command to resume")
    meta["path"] = str(out)
    _print_precompute(meta)


# ---------------------------------------------------------------------------------- train
def _model_config(arch: str, channels: Optional[str]):
    """ModelConfig from --arch / --channels (ModelConfig validates: one-line error on bad values)."""
    from clip2scene.train.nets import ModelConfig

    chans = _parse_channels(channels)
    return _run(ModelConfig, arch=arch, **({} if chans is None else dict(channels=chans)))


def _train_config(cache, out, *, arch="spvcnn", channels=None, given: Optional[set[str]] = None, **fields):
    """TrainConfig from CLI values (TrainConfig validates them); `fields` are TrainConfig fields
    by name. With --resume, the options not `given` (typed) come from the checkpoint's run."""
    from clip2scene.train.checkpoint import load_checkpoint
    from clip2scene.train.trainer import TrainConfig, resumed_config

    model = _model_config(arch, channels)
    if fields.get("resume") is not None:
        fields["resume"] = str(fields["resume"])
    fields["storage_options"] = _storage(fields.pop("storage_option", None))
    config = _run(TrainConfig, cache=str(cache), out=str(out), model=model, **fields)
    if config.resume is not None:
        ckpt = _run(load_checkpoint, config.resume)
        config = _run(resumed_config, config, ckpt, given or set(), config.resume)
        if int(os.environ.get("RANK", "0")) == 0 and int(ckpt["epoch"]) < config.epochs:
            typer.echo(f"resumed from epoch {int(ckpt['epoch'])} ({config.resume}): training epochs "
                       f"{int(ckpt['epoch']) + 1}-{config.epochs}")
    return config


_RECIPE_SOURCE = {"train": "method.md section 5: pre-training batch 4",
                  "finetune": "method.md section 5: released nuScenes fine-tuning config, batch 8"}


def _print_schedule(cfg, kind: str) -> None:
    """The learning-rate set-up a run will use (also in its config.json under "schedule")."""
    from clip2scene.train.stability import WARMUP_MAX_STEPS, lr_scale

    if int(os.environ.get("RANK", "0")) != 0:
        return
    scale = _run(lr_scale, cfg.batch_size, cfg.reference_batch, cfg.lr_scaling)
    src = _RECIPE_SOURCE[kind] if cfg.reference_batch == (4 if kind == "train" else 8) else "--reference-batch"
    head = f", head x{cfg.head_lr_mult:g} = {cfg.lr * scale * cfg.head_lr_mult:g}" if hasattr(cfg, "head_lr_mult") else ""
    warm = (f"auto (half the first epoch, <= {WARMUP_MAX_STEPS} steps)" if cfg.warmup_steps is None
            else f"{cfg.warmup_steps} steps" if cfg.warmup_steps else "off")
    typer.echo(f"lr {cfg.lr:g} at reference batch {cfg.reference_batch} ({src}); batch {cfg.batch_size}: "
               f"x{scale:.4g} ({cfg.lr_scaling}) = {cfg.lr * scale:g}{head}")
    typer.echo(f"  warm-up {warm}, then cosine; gradient clipping "
               f"{f'at L2 norm {cfg.clip_grad_norm:g}' if cfg.clip_grad_norm else 'off'} (norm logged every step); "
               f"divergence = loss > {cfg.divergence_factor:g}x the median of the last {cfg.divergence_window} steps "
               f"-> {'stop' if cfg.stop_on_divergence else 'warn'}")


def _print_train(s: dict) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 speaks for all
        return
    if s.get("nothing_to_do"):
        typer.echo(f"nothing to do: {s['checkpoint']} is already at epoch {s['epoch']} of {s['epochs']} "
                   f"(give --epochs N > {s['epochs']} to train longer)")
        return
    typer.echo(f"run: {s['run']}  ({s['arch']}, {s['parameters'] / 1e6:.2f}M parameters, {s['device']})")
    resumed = f" (resumed at epoch {s['start_epoch']})" if s.get("start_epoch") else ""
    typer.echo(f"  {s['train_scans']} scans x {s['epochs']} epochs{resumed} = {s['steps']} steps in {s['seconds']:.1f} s "
               f"({s['scans_per_second']:.2f} scans/s)")
    if s.get("schedule_note"):
        typer.echo(f"  note: {s['schedule_note']}")
    typer.echo("  mean loss per epoch: " + " ".join(f"{v:.4f}" for v in s["epoch_losses"]))
    if s.get("divergences"):
        typer.echo(f"  WARNING: {s['divergences']} step(s) with a loss above the divergence threshold (see metrics.jsonl)")
    if s.get("stopped_at_max_steps"):
        typer.echo(f"  stopped at --max-steps (step {s['steps']} of {s['schedule']['total_steps']})")
    _print_val(s)
    typer.echo(f"  checkpoint: {s['checkpoint']}")
    if s.get("teacher_weights_sha256") == "random":
        typer.echo("  WARNING: distilled from a randomly initialised teacher (no CLIP weights): the student "
                   "learned meaningless pseudo-labels.")


def _print_val(s: dict) -> None:
    """The last validation and the best one (train / finetune / linear-probe summaries)."""
    v, best = s.get("val"), s.get("best")
    if not v:
        return
    typer.echo(f"  validation on {v['split']} ({v['scans']} scan{'s' if v['scans'] != 1 else ''}): {v['metric']} {_fmt(v['score']).strip()} after the last "
               f"epoch; best {_fmt(best['score']).strip()} at epoch {best['epoch']} -> {best['path']}"
               if best and best.get("score") is not None else
               f"  validation on {v['split']} ({v['scans']} scan{'s' if v['scans'] != 1 else ''}): {v['metric']} {_fmt(v['score']).strip()} (no best.pt: undefined)")


_WARMUP_HELP = "Linear warm-up steps before the cosine (default: half the first epoch, at most 300; 0 = off)."
_CLIP_HELP = "Clip the total gradient L2 norm to this (default off; the norm is logged in metrics.jsonl every step)."
_SCALING_HELP = "How learning rates follow --batch-size / --reference-batch: linear, sqrt or none."
_DIV_FACTOR_HELP = "A step's loss above this x the running median is reported as a divergence."
_DIV_WINDOW_HELP = "Steps in the running median of the divergence check."
_STOP_HELP = "Stop (exit 2) at the first divergence, keeping the last good epoch's checkpoint."
_VAL_EVERY_HELP = "Validate every N epochs and after the last one; best.pt keeps the best score (0 = off)."
_VAL_SPLIT_HELP = ("Cached split to validate on: ground-truth mIoU where the cache has labels, else (train) the "
                   "agreement with the teacher.")
_MAX_STEPS_HELP = "Stop after N optimiser steps (a smoke run; the learning-rate schedule stays the full run's)."
_WANDB_HELP = "Also log to Weights & Biases (needs the wandb package; project from WANDB_PROJECT, default clip2scene)."


def _training_options(
    split: str = typer.Option("train", help="Cached split to train on."),
    epochs: int = typer.Option(20, help="Epochs."),
    batch_size: int = typer.Option(4, help="Scans per step."),
    lr: float = typer.Option(0.1, help="SGD learning rate (momentum 0.9, weight decay 1e-4, cosine schedule)."),
    tau: float = typer.Option(0.5, help="SCR temperature."),
    voxel_size: Optional[float] = typer.Option(None, help="Voxel size in metres (default: the dataset's, 0.1 outdoor, 0.05 ScanNet)."),
    arch: str = typer.Option("spvcnn", help="Student: spvcnn (paper) or minkunet."),
    channels: Optional[str] = typer.Option(None, help="9 comma-separated widths (default 32,32,64,128,256,256,128,96,96)."),
    sweeps: Optional[int] = typer.Option(None, help="Use the first K cached lidar frames per scan (default all)."),
    views: str = typer.Option("border", help="Teacher view of a point seen by several cameras: border (farthest from the image border) or mean (average over all, OpenScene-style)."),
    scr_weight: float = typer.Option(1.0, help="SCR loss weight (0 = off)."),
    ssr_weight: float = typer.Option(1.0, help="SSR loss weight (0 = off)."),
    kl_weight: float = typer.Option(0.0, help="KL loss weight (the paper's failing ablation)."),
    ssr_lambda: float = typer.Option(1.0, help="SSR attention temperature lambda."),
    ssr_grid: float = typer.Option(0.1, help="SSR grid cell in metres."),
    self_training: str = typer.Option("point", help="S3 switch: point (paper), batch (released code) or off."),
    switch_epoch: Optional[int] = typer.Option(None, help="First epoch (0-based) of S3 switching (default epochs // 2)."),
    switch_prob: float = typer.Option(0.5, help="S3 probability of the network's own prediction."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    workers: int = typer.Option(0, help="DataLoader workers (spawned processes)."),
    seed: int = typer.Option(0, help="Random seed."),
    augment: bool = typer.Option(True, help="Random z-rotation and flips."),
    precise_bn_batches: int = typer.Option(16, help="Re-estimate BatchNorm statistics on N batches at the end (0 = off)."),
    keep_checkpoints: bool = typer.Option(False, help="Also keep checkpoint_epochK.pt of every epoch (resume points)."),
    storage_option: Optional[list[str]] = typer.Option(None, help=_STORAGE_HELP),
    warmup_steps: Optional[int] = typer.Option(None, help=_WARMUP_HELP),
    clip_grad_norm: Optional[float] = typer.Option(None, help=_CLIP_HELP),
    lr_scaling: str = typer.Option("linear", help=_SCALING_HELP),
    reference_batch: int = typer.Option(4, help="The recipe's global batch that --lr is given for (method.md section 5: pre-training batch 4)."),
    divergence_factor: float = typer.Option(10.0, help=_DIV_FACTOR_HELP),
    divergence_window: int = typer.Option(50, help=_DIV_WINDOW_HELP),
    stop_on_divergence: bool = typer.Option(False, help=_STOP_HELP),
    val_every: int = typer.Option(0, help=_VAL_EVERY_HELP),
    val_split: str = typer.Option("val", help=_VAL_SPLIT_HELP),
    max_steps: Optional[int] = typer.Option(None, help=_MAX_STEPS_HELP),
    wandb: bool = typer.Option(False, help=_WANDB_HELP),
):
    """Typer options shared by train and ablate (collected by _with_training_options)."""


def _with_training_options(fn):
    """Give `fn` the options of _training_options (typer reads the signature)."""
    import inspect

    extra = list(inspect.signature(_training_options, eval_str=True).parameters.values())
    sig = inspect.signature(fn, eval_str=True)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    fn.__signature__ = sig.replace(parameters=params + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in extra])
    return fn


@app.command()
@_with_training_options
def train(
    ctx: typer.Context,
    cache: str = typer.Option(..., help="Cache written by precompute (folder or URL)."),
    out: Path = typer.Option(..., help="Run folder (checkpoint.pt, metrics.jsonl, config.json)."),
    resume: Optional[Path] = typer.Option(None, help="Checkpoint to continue from: options not given are the run's own "
                                                     "(model, lr, ...); a larger --epochs extends the run."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace a previous run in --out (its run files are removed)."),
    **options,
) -> None:
    """Stage two: train the sparse 3D student from the cache alone (SCR + SSR + S3 by default).
    Several processes: `torchrun --nproc-per-node N -m clip2scene.cli train ...` (DDP).
    Ctrl-C exits with code 130 and names the checkpoint that `--resume` continues from."""
    from clip2scene.train.trainer import train as run_train

    config = _train_config(cache, out, resume=resume, overwrite=overwrite, given=_given(ctx), **options)
    _print_schedule(config, "train")
    _print_train(_interruptible(run_train, config))


@app.command()
@_with_training_options
def ablate(
    cache: Path = typer.Option(..., help="Cache to ablate on (its sweeps bound the sweep rows)."),
    out: Path = typer.Option(Path("runs/ablate"), help="Folder for one run per row plus ablation.md/json."),
    prompt_cache: list[str] = typer.Option([], help="NAME=PATH: a cache of the same data precomputed with "
                                                    "--class-set NAME, for the prompt-set rows (repeatable)."),
    eval_split: str = typer.Option("val", help="Split to evaluate each row on."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace the runs of a previous ablation in --out."),
    **options,
) -> None:
    """Run the rows of the paper's Table 3 and write one table."""
    from clip2scene.train.ablate import format_table, run_ablation

    caches = _name_paths(prompt_cache, "--prompt-cache")
    results = _interruptible(run_ablation, _train_config(cache, out / "base", overwrite=overwrite, **options), out,
                             caches, eval_split)
    typer.echo(format_table(results))
    typer.echo(f"table: {out / 'ablation.md'}")


def _name_paths(items: list[str], flag: str) -> dict[str, str]:
    """NAME=PATH options -> {name: path}; a malformed item or a repeated name is a one-line error."""
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            _fail(f"{flag} {item!r}: expected NAME=PATH")
        if name in pairs:
            _fail(f"{flag} {item!r}: row name {name!r} given twice")
        pairs[name] = path
    return pairs


@app.command("compare-teachers")
@_with_training_options
def compare_teachers(
    cache: list[str] = typer.Option(..., help="NAME=PATH: a cache of the same scans precomputed with one teacher (repeatable)."),
    out: Path = typer.Option(Path("runs/teachers"), help="Folder for one run per teacher plus teachers.md/json."),
    eval_split: str = typer.Option("val", help="Split to evaluate each student on."),
    **options,
) -> None:
    """Train the same student on each teacher's cache; one table of teacher and student mIoU."""
    from clip2scene.train.ablate import format_teacher_table, run_teacher_comparison

    caches = _name_paths(cache, "--cache")
    first = next(iter(caches.values()))
    results = _run(run_teacher_comparison, _train_config(first, out / "base", **options), caches, out, eval_split)
    typer.echo(format_teacher_table(results))
    typer.echo(f"table: {out / 'teachers.md'}")


# ---------------------------------------------------------------------------------- evaluate
def _fmt(v) -> str:
    return "   n/a" if v is None else f"{100 * v:6.2f}"


def _confusion_png(eval_json) -> None:
    from clip2scene.viz.plot import confusion_from_eval

    typer.echo(f"confusion matrix: {_run(confusion_from_eval, eval_json)}")


def _scans(r: dict) -> str:
    """'N scans', or 'N of M scans (--limit)' for a limited evaluation."""
    if r.get("split_scans", r["scans"]) > r["scans"]:
        return f"the first {r['scans']} of {r['split_scans']} scans (--limit)"
    return f"{r['scans']} scans"


def _print_eval(r: dict) -> None:
    if r.get("teacher_model") == "simulated":
        typer.echo(f"teacher: {SIMULATED_NOTE}")
    typer.echo(f"{'class':<22}{'student IoU':>12}{'teacher IoU*':>14}")
    for name in r["class_names"]:
        typer.echo(f"{name:<22}{_fmt(r['per_class_iou'][name]):>12}{_fmt(r['teacher_per_class_iou_visible'][name]):>14}")
    random = r.get("teacher_weights") == "random"
    typer.echo(f"{'mIoU':<22}{_fmt(r['miou']):>12}{_fmt(r['teacher_miou_visible']):>14}"
               + ("  (RANDOM teacher, no CLIP weights)" if random else ""))
    typer.echo(f"({r['split']}: {_scans(r)}, {r['points']} points; *teacher pseudo-labels on camera-visible "
               f"points only; n/a = class absent from truth and prediction)")
    typer.echo(f"results: {r['json']}")
    _confusion_png(r["json"])
    if random:
        typer.echo("WARNING: the teacher was randomly initialised (no CLIP weights): these numbers are not meaningful.")


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., help="checkpoint.pt from train, finetune or linear-probe."),
    cache: str = typer.Option(..., help="Cache with ground-truth labels (folder or URL)."),
    split: str = typer.Option("val", help="Cached split to evaluate."),
    out: Optional[Path] = typer.Option(None, help="JSON result path (default next to the checkpoint)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    storage_option: Optional[list[str]] = typer.Option(None, help=_STORAGE_HELP),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N scans of the split (a smoke run)."),
) -> None:
    """mIoU (the dataset's protocol) of a checkpoint on a cached split: annotation-free for a
    distillation checkpoint (text embeddings), classifier argmax for a fine-tuned one."""

    from clip2scene.train.checkpoint import load_checkpoint
    from clip2scene.train.evaluate import EvalConfig, evaluate as run_eval
    from clip2scene.train.finetune import SEGMENTER_KIND, evaluate_segmenter

    from clip2scene.storage import open_cache

    opts = _storage(storage_option)
    cfg = _run(EvalConfig, checkpoint=str(checkpoint), cache=str(cache), split=split,
               out=str(out) if out else None, device=device, storage_options=opts, limit=limit)
    if _run(load_checkpoint, checkpoint).get("kind") == SEGMENTER_KIND:
        r = _run(evaluate_segmenter, checkpoint, _run(open_cache, cache, opts), split, device, limit=limit)
        path = out or checkpoint.parent / f"eval_{split}.json"
        r["split"] = split
        path.write_text(json.dumps(r, indent=2))
        typer.echo(f"{split}: {_scans(r)}, {r['points']} points; mIoU {_fmt(r['miou'])}")
        for name, v in r["per_class_iou"].items():
            typer.echo(f"  {name:22s} {_fmt(v)}")
        typer.echo(f"  result: {path}")
        _confusion_png(path)
        return
    _print_eval(_run(run_eval, cfg))


# ---------------------------------------------------------------------------------- finetune
def _print_finetune(r: dict) -> None:
    typer.echo(f"run: {r['run']}  ({r['mode']}, init {r['init']}, {r['trainable_parameters'] / 1e6:.2f}M trainable)")
    typer.echo(f"  labelled scans {r['labelled_scans']} of {r['train_scans']} (fraction {r['label_fraction']:g}), "
               f"{r['epochs']} epochs in {r['seconds']:.1f} s")
    typer.echo("  mean loss per epoch: " + " ".join(f"{v:.4f}" for v in r["epoch_losses"]))
    if r.get("divergences"):
        typer.echo(f"  WARNING: {r['divergences']} step(s) with a loss above the divergence threshold (see metrics.jsonl)")
    if r.get("stopped_at_max_steps"):
        typer.echo(f"  stopped at --max-steps (step {r['steps']} of {r['schedule']['total_steps']})")
    _print_val(r)
    if "miou" in r:
        typer.echo(f"  {r['eval_split']}: mIoU {_fmt(r['miou'])} over {r['eval_scans']} scans")
    typer.echo(f"  result: {r['json']}")


def _finetune_cmd(mode: str, checkpoint: str, cache: Path, out: Path, label_fraction: float, epochs: int,
                  batch_size: int, lr: float, head_lr_mult: float, lovasz_weight: float, eval_split: str,
                  voxel_size: Optional[float], arch: str, channels: Optional[str], device: str, workers: int, seed: int,
                  augment: bool, storage_option: Optional[list[str]] = None, overwrite: bool = False,
                  **guard) -> None:
    from clip2scene.train.finetune import FinetuneConfig, finetune

    model = _model_config(arch, channels)
    cfg = _run(FinetuneConfig, cache=str(cache), out=str(out), checkpoint=None if checkpoint == "none" else checkpoint,
                         mode=mode, label_fraction=label_fraction, epochs=epochs, batch_size=batch_size, lr=lr,
                         head_lr_mult=head_lr_mult, lovasz_weight=lovasz_weight,
                         eval_split=None if eval_split == "none" else eval_split, voxel_size=voxel_size,
                         device=device, workers=workers, seed=seed, augment=augment, model=model,
                         storage_options=_storage(storage_option), overwrite=overwrite, **guard)
    _print_schedule(cfg, "finetune")
    _print_finetune(_interruptible(finetune, cfg))


@app.command()
def finetune(
    checkpoint: str = typer.Option(..., help="Pre-trained checkpoint.pt from train, or none (random init baseline)."),
    cache: str = typer.Option(..., help="Cache with labels, folder or URL (a labels-only cache from --clip-model none works)."),
    out: Path = typer.Option(..., help="Run folder (checkpoint.pt, metrics.jsonl, result.json)."),
    label_fraction: float = typer.Option(1.0, help="Labelled fraction of the training scans: 0.01 = every 100th scan."),
    epochs: int = typer.Option(24, help="Epochs."),
    batch_size: int = typer.Option(8, help="Scans per step."),
    lr: float = typer.Option(0.02, help="Backbone SGD learning rate (cosine)."),
    head_lr_mult: float = typer.Option(100.0, help="Classifier learning rate = lr x this."),
    lovasz_weight: float = typer.Option(1.0, help="Weight of Lovasz-softmax next to cross-entropy."),
    eval_split: str = typer.Option("val", help="Split to evaluate at the end (none = skip)."),
    voxel_size: Optional[float] = typer.Option(None, help="Voxel size (default: the checkpoint's, else the dataset's)."),
    arch: str = typer.Option("spvcnn", help="Architecture for random init: spvcnn or minkunet."),
    channels: Optional[str] = typer.Option(None, help="9 widths for random init (default the paper's)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    workers: int = typer.Option(0, help="DataLoader workers."),
    seed: int = typer.Option(0, help="Random seed."),
    augment: bool = typer.Option(True, help="Random z-rotation and flips."),
    storage_option: Optional[list[str]] = typer.Option(None, help=_STORAGE_HELP),
    head_input: str = typer.Option("l2", help="Classifier input: l2 (unit-norm point features; the recipe's head lr is stable on them) or raw."),
    warmup_steps: Optional[int] = typer.Option(None, help=_WARMUP_HELP),
    clip_grad_norm: Optional[float] = typer.Option(None, help=_CLIP_HELP),
    lr_scaling: str = typer.Option("linear", help=_SCALING_HELP),
    reference_batch: int = typer.Option(8, help="The recipe's batch that --lr is given for (method.md section 5: released fine-tuning config, batch 8)."),
    divergence_factor: float = typer.Option(10.0, help=_DIV_FACTOR_HELP),
    divergence_window: int = typer.Option(50, help=_DIV_WINDOW_HELP),
    stop_on_divergence: bool = typer.Option(False, help=_STOP_HELP),
    val_every: int = typer.Option(0, help=_VAL_EVERY_HELP),
    val_split: str = typer.Option("val", help="Cached split to validate on during training (ground-truth mIoU)."),
    max_steps: Optional[int] = typer.Option(None, help=_MAX_STEPS_HELP),
    wandb: bool = typer.Option(False, help=_WANDB_HELP),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace a previous run in --out (its run files are removed)."),
) -> None:
    """Supervised fine-tuning (cross-entropy + Lovasz) from a pre-trained or random backbone.
    Ctrl-C exits with code 130 (no resume: start again with --overwrite)."""
    _finetune_cmd("finetune", checkpoint, cache, out, label_fraction, epochs, batch_size, lr, head_lr_mult,
                  lovasz_weight, eval_split, voxel_size, arch, channels, device, workers, seed, augment, storage_option,
                  overwrite=overwrite, head_input=head_input, warmup_steps=warmup_steps, clip_grad_norm=clip_grad_norm,
                  lr_scaling=lr_scaling, reference_batch=reference_batch, divergence_factor=divergence_factor,
                  divergence_window=divergence_window, stop_on_divergence=stop_on_divergence, val_every=val_every,
                  val_split=val_split, max_steps=max_steps, wandb=wandb)


@app.command("linear-probe")
def linear_probe(
    checkpoint: str = typer.Option(..., help="Pre-trained checkpoint.pt from train."),
    cache: str = typer.Option(..., help="Cache with labels (folder or URL)."),
    out: Path = typer.Option(..., help="Run folder."),
    label_fraction: float = typer.Option(1.0, help="Labelled fraction of the training scans."),
    epochs: int = typer.Option(24, help="Epochs."),
    batch_size: int = typer.Option(8, help="Scans per step."),
    lr: float = typer.Option(0.02, help="Base learning rate; the linear head trains at lr x head-lr-mult."),
    head_lr_mult: float = typer.Option(100.0, help="Classifier learning rate = lr x this."),
    lovasz_weight: float = typer.Option(1.0, help="Weight of Lovasz-softmax next to cross-entropy."),
    eval_split: str = typer.Option("val", help="Split to evaluate at the end (none = skip)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    workers: int = typer.Option(0, help="DataLoader workers."),
    seed: int = typer.Option(0, help="Random seed."),
    storage_option: Optional[list[str]] = typer.Option(None, help=_STORAGE_HELP),
    head_input: str = typer.Option("l2", help="Classifier input: l2 (unit-norm point features; the recipe's head lr is stable on them) or raw."),
    warmup_steps: Optional[int] = typer.Option(None, help=_WARMUP_HELP),
    clip_grad_norm: Optional[float] = typer.Option(None, help=_CLIP_HELP),
    lr_scaling: str = typer.Option("linear", help=_SCALING_HELP),
    reference_batch: int = typer.Option(8, help="The recipe's batch that --lr is given for (method.md section 5: released fine-tuning config, batch 8)."),
    divergence_factor: float = typer.Option(10.0, help=_DIV_FACTOR_HELP),
    divergence_window: int = typer.Option(50, help=_DIV_WINDOW_HELP),
    stop_on_divergence: bool = typer.Option(False, help=_STOP_HELP),
    val_every: int = typer.Option(0, help=_VAL_EVERY_HELP),
    val_split: str = typer.Option("val", help="Cached split to validate on during training (ground-truth mIoU)."),
    max_steps: Optional[int] = typer.Option(None, help=_MAX_STEPS_HELP),
    wandb: bool = typer.Option(False, help=_WANDB_HELP),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace a previous run in --out (its run files are removed)."),
) -> None:
    """Linear probe: frozen pre-trained backbone, a linear classifier trained on labels."""
    _finetune_cmd("linear", checkpoint, cache, out, label_fraction, epochs, batch_size, lr, head_lr_mult,
                  lovasz_weight, eval_split, None, "spvcnn", None, device, workers, seed, True, storage_option,
                  overwrite=overwrite, head_input=head_input, warmup_steps=warmup_steps, clip_grad_norm=clip_grad_norm,
                  lr_scaling=lr_scaling, reference_batch=reference_batch, divergence_factor=divergence_factor,
                  divergence_window=divergence_window, stop_on_divergence=stop_on_divergence, val_every=val_every,
                  val_split=val_split, max_steps=max_steps, wandb=wandb)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run folders (searched for result.json) or result.json files."),
    out: Optional[Path] = typer.Option(None, help="Also write the table to this Markdown file."),
) -> None:
    """One table of fine-tuning / linear-probe results, shaped like the paper's Table 1."""
    from clip2scene.train.report import format_table, gather

    table = format_table(_run(gather, runs))
    typer.echo(table)
    if out:
        out.write_text(table + "\n")
        typer.echo(f"written: {out}")


# ---------------------------------------------------------------------------------- cache info
@cache_app.command("info")
def cache_info(path: str = typer.Argument(..., help="Cache folder or URL (s3://bucket/c.zarr)."),
               as_json: bool = typer.Option(False, "--json/--no-json", help="Print JSON."),
               storage_option: Optional[list[str]] = typer.Option(None, help=_STORAGE_HELP)) -> None:
    """Print a cache's metadata (who built it, when, from what), counts, bytes per point, skipped samples."""
    from clip2scene.errors import CacheError
    from clip2scene.storage import open_cache
    from clip2scene.storage.tools import partial_info

    opts = _storage(storage_option)
    try:
        info = _run(lambda: open_cache(path, opts).info(), _raise=CacheError)
    except CacheError as e:  # unfinished (writing / failed): show what there is, or the reason
        partial = _run(partial_info, path, opts)
        if partial is None or partial["status"] == "complete":
            _fail(str(e))
        if as_json:
            typer.echo(json.dumps(partial, indent=2))
        else:
            _print_partial(partial)
        return
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    m, t = info["meta"], info["meta"]["teacher"]
    typer.echo(f"cache {info['path']}  (schema {m['schema_version']}, clip2scene {m['tool_version']}, {m['status']})")
    typer.echo(f"  built {m['created']} by {m.get('created_by', '?')}, {m.get('num_blocks', '?')} blocks")
    for src in m.get("merged_from", []):
        typer.echo(f"  merged from {src['path']} ({src['num_scans']} scans, built {src['created']} by {src['created_by']})")
    d = m["dataset"]
    typer.echo(f"  dataset {d['name']} {d['version']} from {d['dataroot']}")
    if t is None:
        typer.echo("  teacher: none (labels-only cache)")
    elif t.get("model") == "simulated":
        typer.echo(f"  teacher: {SIMULATED_NOTE}")
        typer.echo(f"          {t['weights_sha256']}, image {t['image_size']}, dim {t['embed_dim']}, knobs "
                   + ", ".join(f"{k}={v}" for k, v in (t.get("simulated") or {}).items() if k != "confusions"))
    else:
        typer.echo(f"  teacher {t.get('teacher', 'maskclip')} on {t['model']} weights={t['weights']} "
                   f"sha256={t['weights_sha256']}{_window_text(t)}")
        typer.echo(f"          image {t['image_size']}, dim {t['embed_dim']}, templates {t['templates_sha256'][:12]}")
        if t["weights_sha256"] == "random":
            typer.echo(f"  WARNING: {RANDOM_TEACHER}")
    typer.echo(f"  classes ({len(m['class_names'])}): {', '.join(m['class_names'])}")
    typer.echo(f"  scans {m['num_scans']} ({', '.join(f'{k}={v}' for k, v in info['splits'].items())}), "
               f"sweeps per scan {m['sweeps']}, input {', '.join(m['point_features'])}")
    typer.echo(f"  points {m['num_points']}, camera-visible {m['num_visible']} "
               f"({100 * m['num_visible'] / max(m['num_points'], 1):.1f}%) in {m['num_pairs']} point-view pairs, "
               f"labels: {'yes' if m['has_labels'] else 'no'}")
    if m.get("grid"):
        typer.echo(f"  teacher maps: {m['num_images']} images on a {m['grid'][0]}x{m['grid'][1]} patch grid, "
                   f"features {m['feature_dtype']}")
    typer.echo(f"  stored {info['stored_bytes'] / 2**20:.2f} MiB = {info['bytes_per_point']:.1f} B/point, "
               f"{info['bytes_per_visible_point']:.1f} B/visible point")
    for a in info["arrays"]:
        typer.echo(f"    {a['name']:<22}{str(a['shape']):<18}{a['dtype']:<9}{a['stored_bytes'] / 2**20:9.2f} MiB")
    typer.echo(f"  skipped samples: {len(info['skipped'])}")
    for sk in info["skipped"]:
        typer.echo(f"    {sk['token']} ({sk['scene']}): {sk['reason']}")


def _duration(seconds: float) -> str:
    """'42 s', '3 min 5 s', '2 h 10 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{max(s, 1)} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _print_partial(p: dict) -> None:
    """`cache info` of an unfinished cache: its state, the error, what is done, how to continue."""
    m, t = p["meta"], p["meta"].get("teacher")
    typer.echo(f"cache {p['path']}  (schema {m.get('schema_version')}, clip2scene {m.get('tool_version')}, "
               f"{str(p['status']).upper()}: not usable for training)")
    if p.get("error"):
        typer.echo(f"  error: {p['error']}")
    if p.get("writer"):
        w = p["writer"]
        typer.echo(f"  being written by {w.get('user', '?')}@{w.get('host', '?')} pid {w.get('pid', '?')} since {w.get('since', '?')}")
    typer.echo(f"  built {m.get('created')} by {m.get('created_by', '?')}")
    d = m.get("dataset") or {}
    typer.echo(f"  dataset {d.get('name')} {d.get('version')} from {d.get('dataroot')}")
    if t is None:
        typer.echo("  teacher: none (labels-only cache)")
    else:
        typer.echo(f"  teacher {t['model']} weights={t['weights']} sha256={t['weights_sha256']}")
        if t.get("weights_sha256") == "random":
            typer.echo(f"  WARNING: {RANDOM_TEACHER}")
    typer.echo(f"  done so far: {p['blocks_done']} blocks, {p['scans_done']} scans, {p['points_done']} points; "
               f"skipped samples: {len(p['skipped'])}")
    if not p.get("writer"):
        typer.echo("  rerun the same `clip2scene precompute` command to resume it (or pass --overwrite to start again)")


@cache_app.command("verify")
def cache_verify(path: str = typer.Argument(..., help="Cache folder or URL."),
                 storage_option: Optional[list[str]] = typer.Option(None, help=_STORAGE_HELP)) -> None:
    """Re-hash every stored file against manifest.json; exit 1 naming each corrupt or missing file."""
    from tqdm.auto import tqdm

    from clip2scene.storage.tools import verify

    def estimate(files: int, seconds: float) -> None:
        typer.echo(f"verify: {files} files, about {_duration(seconds)} (timed on a sample of them)", err=True)

    problems = _run(verify, path, _storage(storage_option), lambda it: tqdm(it, desc="verify", unit="file"),
                    estimate)
    for p in problems:
        typer.echo(p)
    if problems:
        typer.echo(f"{path}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{path}: every file matches its sha256 in the manifest")


@cache_app.command("merge")
def cache_merge(caches: list[str] = typer.Argument(..., help="Two or more caches (folders or URLs)."),
                out: str = typer.Option(..., help="Cache to create."),
                overwrite: bool = typer.Option(False, help="Replace an existing cache at --out."),
                storage_option: Optional[list[str]] = typer.Option(None, help=_STORAGE_HELP)) -> None:
    """Combine caches built on different scans with the same teacher, without recomputing."""
    from tqdm.auto import tqdm

    from clip2scene.storage.tools import merge

    meta = _run(merge, caches, out, _storage(storage_option), overwrite, lambda it: tqdm(it, desc="merge", unit="block"))
    typer.echo(f"merged {len(caches)} caches into {out}: {meta['num_scans']} scans, {meta['num_points']} points")


# ---------------------------------------------------------------------------------- demo
# Demo size, chosen so that the whole demo with the simulated teacher takes <= 3 minutes on 2 cores
# (README, "Quick start"): 4 scenes (2 train, 2 val) x 3 keyframes, a light lidar (64 rays per ring)
# and small images; a narrow SPVCNN (one residual block per stage) trained for 80 epochs.
DEMO_SAMPLE = dict(scenes=4, keyframes=3, sweeps=2, lidar_azimuth_steps=64, image_width=200, image_height=113)
DEMO_IMAGE_SIZE = "224x416"  # teacher input (MaskCLIP's nuScenes size): a 14 x 26 patch grid
DEMO_SWEEPS = 3
DEMO_CHANNELS = (16, 16, 32, 32, 64, 64, 32, 16, 16)
DEMO_BATCH, DEMO_LR, DEMO_EPOCHS = 2, 0.1, 80
DEMO_TAU = 0.1  # SCR temperature: sharper than the paper's 0.5, which left the small student predicting few classes


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo"), help="Folder for the sample, cache and run (replaced)."),
    clip_weights: Optional[str] = typer.Option(None, help="Run MaskCLIP ViT-B-16 with these CLIP weights (open_clip tag, "
                                                          "file, local-dir:DIR, or none = random ViT). Default: the "
                                                          "simulated teacher (no weights needed)."),
    epochs: int = typer.Option(DEMO_EPOCHS, help="Training epochs."),
) -> None:
    """Whole pipeline on a built-in synthetic sample: sample -> precompute -> train -> evaluate.

    Without --clip-weights the teacher is the SIMULATED teacher (pseudo-labels from the sample's
    own class maps with CLIP-like errors), and the demo shows whether the 3D student beats its
    2D teacher; with --clip-weights it runs MaskCLIP ViT-B-16."""
    from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
    from clip2scene.samples.nuscenes import SampleConfig, make_sample
    from clip2scene.storage import open_cache
    from clip2scene.train.evaluate import EvalConfig, evaluate as run_eval
    from clip2scene.train.trainer import train as run_train

    if epochs < 1:
        _fail(f"--epochs must be >= 1, got {epochs}")
    start = t0 = time.perf_counter()

    def lap() -> str:
        nonlocal t0
        dt, t0 = time.perf_counter() - t0, time.perf_counter()
        return f"{dt:.0f} s"

    if workdir.exists():
        shutil.rmtree(workdir)
    sample_cfg = SampleConfig(**DEMO_SAMPLE)
    typer.echo(f"[1/4] make-sample: synthetic nuScenes, {sample_cfg.scenes} scenes x {sample_cfg.keyframes} keyframes "
               f"(half train, half val), 6 cameras, {sample_cfg.sweeps} sweeps per keyframe")
    root = _run(make_sample, workdir / "sample", sample_cfg)
    typer.echo(f"  took {lap()}")
    simulated = clip_weights is None
    if simulated:
        teacher = _simulated_teacher_config(DEMO_IMAGE_SIZE)
        typer.echo(f"[2/4] precompute: {SIMULATED_NOTE}, on {6 * sample_cfg.scenes * sample_cfg.keyframes} images")
        typer.echo("  (no CLIP weights given; `clip2scene demo --clip-weights FILE` runs MaskCLIP ViT-B-16 instead)")
    else:
        teacher = _teacher_config("ViT-B-16", clip_weights, DEMO_IMAGE_SIZE)
        typer.echo(f"[2/4] precompute: MaskCLIP ViT-B-16 (weights {clip_weights}) over "
                   f"{6 * sample_cfg.scenes * sample_cfg.keyframes} images")
    cfg = PrecomputeConfig(dataroot=root, out=workdir / "cache.zarr", version="v1.0-mini", sweeps=DEMO_SWEEPS,
                           teacher=teacher)
    meta = _run(run_precompute, cfg)
    meta["path"] = str(cfg.out)
    _print_precompute(meta)
    info = open_cache(cfg.out).info()
    typer.echo(f"  cache size {info['stored_bytes'] / 2**20:.2f} MiB ({info['bytes_per_visible_point']:.0f} B per "
               f"visible point); took {lap()}")
    typer.echo(f"[3/4] train: SPVCNN (spconv, narrow) from the cache, SCR + SSR + S3, {epochs} epochs, tau {DEMO_TAU}")
    from clip2scene.train.nets import ModelConfig
    from clip2scene.train.trainer import TrainConfig

    tcfg = TrainConfig(cache=str(cfg.out), out=str(workdir / "run"), epochs=epochs, batch_size=DEMO_BATCH, lr=DEMO_LR,
                       tau=DEMO_TAU, precise_bn_batches=4,
                       model=ModelConfig(arch="spvcnn", channels=DEMO_CHANNELS, blocks_per_stage=1))
    _print_train(_run(run_train, tcfg))
    typer.echo(f"  took {lap()}")
    typer.echo("[4/4] evaluate: annotation-free mIoU on the val scene (devkit protocol)")
    result = _run(run_eval, EvalConfig(checkpoint=str(workdir / "run" / "checkpoint.pt"), cache=str(cfg.out), split="val"))
    _print_eval(result)
    typer.echo(f"  took {lap()}")
    student, teacher_miou = result["miou"], result["teacher_miou_visible"]
    who = "simulated teacher" if simulated else "teacher"
    typer.echo(f"val mIoU: {who} pseudo-labels {_fmt(teacher_miou).strip()} (camera-visible points), "
               f"student {_fmt(student).strip()} (all points)")
    if student is not None and teacher_miou is not None:
        verdict = "BEATS" if student > teacher_miou else "does NOT beat"
        typer.echo(f"the 3D student {verdict} its 2D {who} by {100 * (student - teacher_miou):+.2f} mIoU points")
    if meta["teacher"] and meta["teacher"].get("weights_sha256") == "random":
        typer.echo("(random ViT teacher: both numbers are meaningless)")
    typer.echo(f"demo finished in {time.perf_counter() - start:.0f} s; outputs under {workdir}/")


# ---------------------------------------------------------------------------------- pictures
from clip2scene.viz import commands as _viz_commands  # noqa: E402  (typer commands; figures import lazily)

app.command("show")(_viz_commands.show)
app.command("plot")(_viz_commands.plot)
app.command("query")(_viz_commands.query)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
