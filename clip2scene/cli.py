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
from pathlib import Path
from typing import Optional

import typer

from clip2scene import __version__
from clip2scene.errors import Clip2SceneError
from clip2scene.options import PRESETS, LazyGroup, lazy_options, options_for
from clip2scene.validation import STORAGE_HELP as _STORAGE_HELP

app = typer.Typer(cls=LazyGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
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

def _storage(options: Optional[list[str]]) -> dict:
    from clip2scene.storage import parse_storage_options

    return _run(parse_storage_options, options)

CONFIG_HELP = ("Options from a TOML file (keys = option names with _ for -; [model] / [teacher] tables), a run's "
               "config.json, or a preset (clip2scene/configs/: annotation-free, demo, finetune-1pct, linear-probe); "
               "options on the command line override its values.")


def _config_from(ctx: typer.Context, command, cls, values: dict, config_file: Optional[str],
                 fixed: Optional[dict] = None, make=None, match: tuple[str, ...] = ()):
    """The config of a command with generated options (clip2scene.options): the --config file's
    values, then the options typed, then `fixed` (set by the command; a file value of a `match`
    key must equal it); `make(tree)` builds it (default: nested configs start from the field's
    default). Every bad value: one line naming the option (and the file when it came from
    there), exit 2. Returns (config, tree of the values set, file path)."""
    from clip2scene.options import blame_file, build, given_params, make_config, read_config

    path, file_values = _run(read_config, config_file, cls)
    for key in match:  # e.g. a finetune config.json given to linear-probe
        value = (fixed or {})[key]
        if key in file_values and file_values[key] != value:
            _fail(f"{path}: {key} = {file_values[key]!r} does not fit `clip2scene {ctx.info_name}` ({key} {value!r})")
    given = given_params(ctx)
    tree = _run(build, command.__options__, values, given, file_values, command.__required__, path)
    tree.update(fixed or {})
    try:
        return (make or (lambda t: make_config(cls, t)))(tree), tree, path
    except ValueError as e:  # ConfigError, or a knob of SimulatedConfig
        _fail(str(blame_file(e if isinstance(e, Clip2SceneError) else Clip2SceneError(str(e)), path, file_values,
                             command.__options__, given)))


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
def _window_text(fp: dict) -> str:
    """' window HxW stride HxW' of a teacher fingerprint ('' without windows), plus ' +PAMR'."""
    out = ""
    if fp.get("window"):
        out += f" window {'x'.join(map(str, fp['window']))} stride {'x'.join(map(str, fp['stride']))}"
    return out + (" +PAMR" if fp.get("pamr") else "")


SIMULATED_NOTE = ("SIMULATED teacher: pseudo-labels made from the synthetic sample's own class maps with CLIP-like "
                  "errors (not CLIP; see docs/simulated-teacher.md)")


def _simulated_teacher_config(image_size: tuple[int, int] | str):
    """The simulated teacher at `image_size` ((H, W) or text HxW)."""
    from clip2scene.options import parse_hw
    from clip2scene.precompute.teacher.config import TeacherConfig

    size = _run(parse_hw, "--image-size", image_size) if isinstance(image_size, str) else image_size
    return _run(TeacherConfig, model="simulated", weights="none", image_size=size, teacher="simulated")


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

def _precompute_config(tree: dict):
    """PrecomputeConfig from nested field values; the [teacher] values are read as the CLI means
    them: model none = labels only (no teacher), teacher simulated = the simulated teacher, no
    image_size = the dataset's default for that model (full camera size with a window)."""
    from clip2scene.options import make_config
    from clip2scene.precompute.pipeline import DATASETS, PrecomputeConfig, default_image_size
    from clip2scene.precompute.teacher.config import TeacherConfig

    tree = dict(tree)
    t = tree.pop("teacher", None) or {}
    dataset = tree.get("dataset", "nuscenes")
    known = dataset if dataset in DATASETS else "nuscenes"  # an unknown one: PrecomputeConfig names it
    if t.get("teacher") == "simulated":
        teacher = _simulated_teacher_config(t.get("image_size") or default_image_size(known, "ViT-B-16"))
    elif t.get("model") == "none":
        teacher = None
    else:
        size = t.get("image_size") or default_image_size(known, t.get("model", "ViT-B-16"),
                                                         windowed=t.get("window") is not None)
        teacher = TeacherConfig(**{**t, "image_size": size})
    return make_config(PrecomputeConfig, dict(tree, teacher=teacher))


def _precompute_options():
    from clip2scene.precompute.pipeline import PrecomputeConfig

    return options_for(PrecomputeConfig, defaults={"image_size": None})


@app.command()
@lazy_options(_precompute_options, required=("dataroot", "out"))
def precompute(ctx: typer.Context, config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
               **options) -> None:
    """Stage one: run MaskCLIP once per scan and write the per-point cache (resumes an interrupted run)."""
    from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute

    # every option is validated by PrecomputeConfig / TeacherConfig (one line, exit 2)
    cfg, _, _ = _config_from(ctx, precompute, PrecomputeConfig, options, config, make=_precompute_config)
    try:
        meta = _run(run_precompute, cfg)
    except KeyboardInterrupt:
        _interrupted("precompute stopped: the blocks finished so far are kept; rerun the same command to resume")
    meta["path"] = str(cfg.out)
    _print_precompute(meta)


# ---------------------------------------------------------------------------------- train
def _train_options(exclude: tuple[str, ...] = ()):
    def make():
        from clip2scene.train.trainer import TrainConfig

        return options_for(TrainConfig, exclude=exclude)

    return make


def _train_config(ctx: typer.Context, command, options: dict, config_file: Optional[str] = None,
                  fixed: Optional[dict] = None):
    """TrainConfig from --config and the typed options (TrainConfig validates them). With --resume,
    the options set nowhere (neither typed nor in the file) come from the checkpoint's run."""
    from clip2scene.options import given_fields
    from clip2scene.train.checkpoint import load_checkpoint
    from clip2scene.train.trainer import TrainConfig, resumed_config

    config, tree, _ = _config_from(ctx, command, TrainConfig, options, config_file, fixed)
    if config.resume is not None:
        ckpt = _run(load_checkpoint, config.resume)
        config = _run(resumed_config, config, ckpt, given_fields(tree), config.resume)
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


@app.command()
@lazy_options(_train_options(), required=("cache", "out"))
def train(ctx: typer.Context, config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
          **options) -> None:
    """Stage two: train the sparse 3D student from the cache alone (SCR + SSR + S3 by default).
    Several processes: `torchrun --nproc-per-node N -m clip2scene.cli train ...` (DDP).
    Ctrl-C exits with code 130 and names the checkpoint that `--resume` continues from."""
    from clip2scene.train.trainer import train as run_train

    cfg = _train_config(ctx, train, options, config)
    _print_schedule(cfg, "train")
    _print_train(_interruptible(run_train, cfg))


@app.command()
@lazy_options(_train_options(exclude=("resume",)))
def ablate(
    ctx: typer.Context,
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP + " Its cache / out are not used."),
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
    base = _train_config(ctx, ablate, options, config,
                         fixed=dict(cache=str(cache), out=str(out / "base"), overwrite=overwrite, resume=None))
    results = _interruptible(run_ablation, base, out, caches, eval_split)
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
@lazy_options(_train_options(exclude=("resume", "overwrite")))
def compare_teachers(
    ctx: typer.Context,
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP + " Its cache / out are not used."),
    cache: list[str] = typer.Option(..., help="NAME=PATH: a cache of the same scans precomputed with one teacher (repeatable)."),
    out: Path = typer.Option(Path("runs/teachers"), help="Folder for one run per teacher plus teachers.md/json."),
    eval_split: str = typer.Option("val", help="Split to evaluate each student on."),
    **options,
) -> None:
    """Train the same student on each teacher's cache; one table of teacher and student mIoU."""
    from clip2scene.train.ablate import format_teacher_table, run_teacher_comparison

    caches = _name_paths(cache, "--cache")
    first = next(iter(caches.values()))
    base = _train_config(ctx, compare_teachers, options, config, fixed=dict(cache=first, out=str(out / "base"), overwrite=False, resume=None))
    results = _run(run_teacher_comparison, base, caches, out, eval_split)
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

def _eval_options():
    from clip2scene.train.evaluate import EvalConfig

    return options_for(EvalConfig)


@app.command()
@lazy_options(_eval_options, required=("checkpoint", "cache"))
def evaluate(ctx: typer.Context, **options) -> None:
    """mIoU (the dataset's protocol) of a checkpoint on a cached split: annotation-free for a
    distillation checkpoint (text embeddings), classifier argmax for a fine-tuned one."""

    from clip2scene.storage import open_cache
    from clip2scene.train.checkpoint import load_checkpoint
    from clip2scene.train.evaluate import EvalConfig, evaluate as run_eval
    from clip2scene.train.finetune import SEGMENTER_KIND, evaluate_segmenter

    cfg, _, _ = _config_from(ctx, evaluate, EvalConfig, options, None)
    checkpoint, split = Path(cfg.checkpoint), cfg.split
    if _run(load_checkpoint, checkpoint).get("kind") == SEGMENTER_KIND:
        r = _run(evaluate_segmenter, checkpoint, _run(open_cache, cfg.cache, cfg.storage_options), split, cfg.device,
                 limit=cfg.limit)
        path = Path(cfg.out) if cfg.out else checkpoint.parent / f"eval_{split}.json"
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

def _finetune_options(exclude: tuple[str, ...] = ()):
    def make():
        from clip2scene.train.finetune import FinetuneConfig

        return options_for(FinetuneConfig, exclude=exclude)

    return make


def _finetune_cmd(ctx: typer.Context, command, mode: str, options: dict, config_file: Optional[str]) -> None:
    from clip2scene.train.finetune import FinetuneConfig, finetune

    cfg, _, _ = _config_from(ctx, command, FinetuneConfig, options, config_file, fixed=dict(mode=mode),
                             match=("mode",))
    _print_schedule(cfg, "finetune")
    _print_finetune(_interruptible(finetune, cfg))


@app.command()
@lazy_options(_finetune_options(), required=("checkpoint", "cache", "out"))
def finetune(ctx: typer.Context, config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
             **options) -> None:
    """Supervised fine-tuning (cross-entropy + Lovasz) from a pre-trained or random backbone.
    Ctrl-C exits with code 130 (no resume: start again with --overwrite)."""
    _finetune_cmd(ctx, finetune, "finetune", options, config)


@app.command("linear-probe")
@lazy_options(_finetune_options(exclude=("voxel_size", "model", "augment")), required=("checkpoint", "cache", "out"))
def linear_probe(ctx: typer.Context, config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
                 **options) -> None:
    """Linear probe: frozen pre-trained backbone, a linear classifier trained on labels."""
    _finetune_cmd(ctx, linear_probe, "linear", options, config)


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
# The demo's student and schedule: the preset clip2scene/configs/demo.toml (also `train --config demo`):
# a narrow SPVCNN (one residual block per stage), 80 epochs, batch 2, lr 0.1, SCR temperature 0.1
# (sharper than the paper's 0.5, which left the small student predicting few classes).
DEMO_PRESET = PRESETS / "demo.toml"


def _demo_preset() -> dict:
    import tomllib

    return tomllib.loads(DEMO_PRESET.read_text())


_DEMO = _demo_preset()
DEMO_CHANNELS = tuple(_DEMO["model"]["channels"])
DEMO_BATCH, DEMO_LR, DEMO_EPOCHS, DEMO_TAU = _DEMO["batch_size"], _DEMO["lr"], _DEMO["epochs"], _DEMO["tau"]


def demo_train_config(cache: str, out: str, epochs: Optional[int] = None):
    """The TrainConfig `clip2scene demo` trains with: the demo preset, on `cache` into `out`."""
    from clip2scene.options import make_config, read_config
    from clip2scene.train.trainer import TrainConfig

    _, tree = read_config(str(DEMO_PRESET), TrainConfig)
    tree.update(cache=cache, out=out, **({} if epochs is None else dict(epochs=epochs)))
    return make_config(TrainConfig, tree)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo"), help="Folder for the sample, cache and run (replaced)."),
    clip_weights: Optional[str] = typer.Option(None, help="Run MaskCLIP ViT-B-16 with these CLIP weights (open_clip tag, "
                                                          "file, local-dir:DIR, or none = random ViT). Default: the "
                                                          "simulated teacher (no weights needed)."),
    epochs: int = typer.Option(DEMO_EPOCHS, help="Training epochs (the demo preset's, clip2scene/configs/demo.toml)."),
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
        from clip2scene.options import parse_hw
        from clip2scene.precompute.teacher.config import TeacherConfig

        teacher = _run(TeacherConfig, model="ViT-B-16", weights=clip_weights, image_size=parse_hw("", DEMO_IMAGE_SIZE))
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
    tcfg = _run(demo_train_config, str(cfg.out), str(workdir / "run"), epochs)
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
