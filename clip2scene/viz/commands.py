"""Typer command functions for the pictures: ``show``, ``plot`` and ``query``.

They are plain functions with typer parameter declarations, registered by the main CLI:

    from clip2scene.viz import commands as viz_commands
    app.command("show")(viz_commands.show)
    app.command("plot")(viz_commands.plot)
    app.command("query")(viz_commands.query)

Like the rest of the CLI layer they print (the written paths, a short summary). A user-facing
library error (`clip2scene.errors.Clip2SceneError`, missing CLIP weights) ends the command with
one ``error: ...`` line on stderr and exit code 2, without a traceback, whether or not the
caller wraps them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer

from clip2scene.errors import Clip2SceneError

_STORAGE_HELP = "fsspec option for a cache URL, key=value (repeatable), e.g. client_kwargs.endpoint_url=http://host:9000."


def _guard(fn):
    """Run a command body; Clip2SceneError / WeightsNotFoundError -> 'error: ...' and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from clip2scene.precompute.teacher.weights import WeightsNotFoundError

        try:
            return fn(*args, **kwargs)
        except (Clip2SceneError, WeightsNotFoundError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _storage(options: Optional[list[str]]) -> dict:
    from clip2scene.storage import parse_storage_options

    return parse_storage_options(options)


@_guard
def show(
    cache: str = typer.Option(..., help="Cache folder or URL (s3://bucket/c.zarr)."),
    index: Optional[int] = typer.Option(None, help="Scan index in the cache (default 0)."),
    token: Optional[str] = typer.Option(None, help="Scan token (nuScenes sample token, KITTI '08/000123', ScanNet scene) instead of --index."),
    out: Path = typer.Option(Path("pictures"), help="Folder for the PNGs."),
    checkpoint: Optional[Path] = typer.Option(None, help="checkpoint.pt (train or finetune) for the student's prediction panels."),
    dataroot: Optional[Path] = typer.Option(None, help="Dataset root with the camera images (default: the one recorded in the cache)."),
    max_views: int = typer.Option(6, help="At most this many camera images (those with the most points)."),
    device: str = typer.Option("cpu", help="cpu or cuda, for the student."),
    storage_option: Optional[list[str]] = typer.Option(None, help=_STORAGE_HELP),
) -> None:
    """Draw one cached scan: camera images with projected points (teacher pseudo-labels, student
    prediction, ground truth) and a bird's-eye view."""
    from clip2scene.storage import open_cache
    from clip2scene.viz.show import render_scan, scan_index

    if index is not None and token is not None:
        raise typer.BadParameter("give --index or --token, not both")
    c = open_cache(cache, _storage(storage_option))
    i = scan_index(c, token) if token is not None else (index or 0)
    paths = render_scan(c, i, out, checkpoint=checkpoint, dataroot=dataroot, device=device,
                        max_views=max_views if max_views > 0 else None)
    if len(paths) == 1:  # the bird's-eye view only
        typer.echo("no camera pictures (dataroot or images not available here; see --dataroot, -v for details)")
    for p in paths:
        typer.echo(str(p))
    if c.has_teacher and c.fingerprint.get("weights_sha256") == "random":
        typer.echo("WARNING: the cache's teacher was randomly initialised (no CLIP weights): its pseudo-labels "
                   "in these pictures are meaningless.")


@_guard
def plot(
    run: Path = typer.Argument(..., help="Run folder with metrics.jsonl (clip2scene train / finetune)."),
    out: Optional[Path] = typer.Option(None, help="PNG path for the curves (default RUN/training_curves.png)."),
    confusion: bool = typer.Option(True, help="Also draw confusion_<split>.png for every eval_*.json with a confusion matrix."),
    smoothing: Optional[float] = typer.Option(None, help="EMA smoothing weight in [0, 1) (default: automatic)."),
) -> None:
    """Plot a run's loss curves (and mIoU when the folder has evaluation results)."""
    import json

    from clip2scene.viz.plot import confusion_from_eval, plot_run

    typer.echo(str(plot_run(run, out, smoothing)))
    if confusion:
        for path in sorted(run.glob("eval_*.json")):
            try:
                has = "confusion_matrix" in json.loads(path.read_text())
            except (OSError, ValueError):
                has = False
            if has:
                typer.echo(str(confusion_from_eval(path)))


@_guard
def query(
    texts: list[str] = typer.Argument(..., help="One or more query texts, e.g. 'a car' 'a traffic cone'."),
    checkpoint: Path = typer.Option(..., help="checkpoint.pt from `clip2scene train` (a distilled student)."),
    cache: Optional[str] = typer.Option(None, help="Cache folder or URL holding the scan (with --index)."),
    index: int = typer.Option(0, help="Scan index in --cache."),
    points: Optional[Path] = typer.Option(None, help="Raw lidar file instead of a cache: nuScenes *.pcd.bin or KITTI *.bin."),
    points_format: str = typer.Option("auto", help="Format of --points: auto, nuscenes or kitti."),
    labels: bool = typer.Option(False, "--labels/--no-labels", help="Also write the argmax-over-queries segmentation picture."),
    out: Path = typer.Option(Path("query"), help="Output folder for the PNGs and query.json."),
    top_k: int = typer.Option(20, help="Best points per query listed in query.json."),
    clip_weights: Optional[str] = typer.Option(None, help="The teacher's CLIP weights here, when not where the checkpoint says (sha256 is checked)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    storage_option: Optional[list[str]] = typer.Option(None, help=_STORAGE_HELP),
) -> None:
    """Open-vocabulary query: score every point against free text with the student (heat maps)."""
    from clip2scene.errors import ConfigError
    from clip2scene.viz.query import query_scan

    if texts[0].lower() in ("yes", "no", "true", "false", "on", "off", "1", "0"):
        raise ConfigError(f"query text {texts[0]!r} looks like a value for --labels, which is a flag: write "
                          "--labels or --no-labels alone (to query that word, put another text first)")

    r = query_scan(checkpoint, list(texts), cache=cache, index=index if cache is not None else None,
                   points_file=points, labels=labels, out_dir=out, device=device, top_k=top_k,
                   points_format=points_format, clip_weights=clip_weights,
                   storage_options=_storage(storage_option) if cache is not None else None)
    typer.echo(f"{r['points_scored']} points scored, {r['points_shown']} drawn")
    for q in r["queries"]:
        best = q["top_k"][0]
        typer.echo(f'  "{q["text"]}": cosine {q["score_min"]:.3f} .. {q["score_max"]:.3f}, best point '
                   f'{best["index"]} at ({best["xyz"][0]:.1f}, {best["xyz"][1]:.1f}, {best["xyz"][2]:.1f}) -> {q["png"]}')
    if labels:
        typer.echo(f"  labels: {r['labels_png']}")
    typer.echo(f"results: {r['json']}")
