"""Plots of a run folder: loss curves and mIoU; and row-normalised confusion matrices.

`plot_run(run_dir)` reads ``metrics.jsonl`` (one JSON object per optimiser step, written by
`clip2scene train` and `clip2scene finetune`) and draws every loss term it finds (``loss`` =
the weighted total, ``scr``, ``ssr``, ``kl`` for distillation, ``ce``, ``lovasz`` for fine-tuning)
against the step (the ``step`` field, else the line number), raw (thin) and smoothed (bold,
bias-corrected exponential moving average). When the folder also holds mIoU results they get a
second panel, mIoU (%) against the epoch:

* ``eval_history.jsonl``: lines ``{"epoch": E, "miou": M, ...}`` (M in [0, 1]; null = n/a);
* ``val.jsonl`` (`--val-every`, train/tracking.py): one series per split and metric (``miou``, or
  ``teacher_miou`` = agreement with the teacher on a cache without labels);
* ``eval_<split>.json`` (`clip2scene evaluate`) and ``result.json`` (`clip2scene finetune`): one
  point each at the run's last epoch (``epochs`` of result.json, else the last epoch of
  metrics.jsonl), labelled with the file's split.

`plot_confusion(matrix, class_names, out)` draws a confusion matrix (rows = ground truth,
columns = prediction, as `clip2scene.train.metrics.ConfusionMatrix` and the ``confusion_matrix``
of eval JSONs), each row divided by its total, cells annotated in %.

    from clip2scene.viz.plot import plot_run, plot_confusion
    plot_run("runs/exp1")                                   # runs/exp1/training_curves.png
    r = json.load(open("runs/exp1/eval_val.json"))
    plot_confusion(r["confusion_matrix"], r["class_names"], "runs/exp1/confusion_val.png")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clip2scene.errors import ConfigError, DataError
from clip2scene.viz.figures import DPI, inch_figure, save_figure

log = logging.getLogger(__name__)

__all__ = ["CURVES_FILE", "LOSS_TERMS", "confusion_from_eval", "load_metrics", "plot_confusion", "plot_run", "smooth"]

LOSS_TERMS = ("loss", "scr", "ssr", "kl", "ce", "lovasz")  # metrics.jsonl keys drawn, in this order
TERM_COLOURS = {"loss": "#222222", "scr": "#1f77b4", "ssr": "#ff7f0e", "kl": "#2ca02c", "ce": "#d62728",
                "lovasz": "#9467bd"}
TERM_LABELS = {"loss": "total loss", "scr": "SCR", "ssr": "SSR", "kl": "KL", "ce": "cross-entropy",
               "lovasz": "Lovasz-softmax"}
CURVES_FILE = "training_curves.png"
PANEL_SIZE = (6.5, 4.2)  # inches per panel of plot_run
MARGINS = dict(left=0.75, right=0.25, bottom=0.6, top=0.55)  # inches around each panel


def load_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (blank lines skipped); DataError naming the bad line."""
    path = Path(path)
    rows = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"no metrics file: {path} (is this a `clip2scene train` / `finetune` run folder?)") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {no} is not valid JSON ({e.msg.rstrip(': ')}: line {e.lineno} column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {no} is not a JSON object")
        rows.append(row)
    return rows


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard's smoothing) of (n,) float64
    values; NaNs are skipped (they keep the running average). weight in [0, 1)."""
    out = np.empty(len(values), np.float64)
    avg, norm = 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            avg = weight * avg + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out[i] = avg / norm if norm > 0 else np.nan
    return out


def _smoothing_for(n: int) -> float:
    """Smoothing weight that averages over ~n/20 steps (0 for short runs, at most 0.98)."""
    return float(min(0.98, max(0.0, 1.0 - 20.0 / n))) if n > 20 else 0.0


def _miou_points(run: Path, last_epoch: int | None) -> list[tuple[str, list[float], list[float]]]:
    """(label, epochs, mIoU %) series from eval_history.jsonl, val.jsonl, eval_*.json and result.json."""
    series: list[tuple[str, list[float], list[float]]] = []
    val = run / "val.jsonl"
    if val.is_file():
        curves: dict[str, tuple[list[float], list[float]]] = {}
        for row in load_metrics(val):
            metric = row.get("metric") or "miou"
            if row.get("epoch") is not None and row.get(metric) is not None:
                xs, ys = curves.setdefault(f"validation ({row.get('split', 'val')}, {metric})", ([], []))
                xs.append(float(row["epoch"]))
                ys.append(100.0 * float(row[metric]))
        series.extend((label, xs, ys) for label, (xs, ys) in curves.items())
    hist = run / "eval_history.jsonl"
    if hist.is_file():
        xs, ys = [], []
        for row in load_metrics(hist):
            if row.get("epoch") is not None and row.get("miou") is not None:
                xs.append(float(row["epoch"]))
                ys.append(100.0 * float(row["miou"]))
        if xs:
            series.append(("eval history", xs, ys))
    for path in sorted(run.glob("eval_*.json")) + ([run / "result.json"] if (run / "result.json").is_file() else []):
        try:
            r = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as e:
            log.warning("skipping %s: %s", path, e)
            continue
        if not isinstance(r, dict) or r.get("miou") is None:
            continue
        epoch = r.get("epochs") if path.name == "result.json" else None
        epoch = epoch if epoch is not None else last_epoch
        if epoch is None:
            continue
        split = r.get("split") or r.get("eval_split") or path.stem
        series.append((f"{path.name} ({split})", [float(epoch)], [100.0 * float(r["miou"])]))
    return series


def plot_run(run_dir: str | Path, out: str | Path | None = None, smoothing: float | None = None,
             dpi: int = DPI) -> Path:
    """Loss curves (and mIoU, when found) of a run folder as one PNG.

    Args:
        run_dir: a `clip2scene train` / `finetune` output folder with metrics.jsonl.
        out: PNG path; default ``<run_dir>/training_curves.png``.
        smoothing: EMA weight in [0, 1); None = automatic (about n/20 steps averaged).
        dpi: pixels per inch.

    Returns:
        The PNG path. Its size is 1 or 2 panels of `PANEL_SIZE` plus `MARGINS` inches x dpi.

    Raises:
        ConfigError: no metrics.jsonl, or it has no loss values; DataError: a bad line.
    """
    run = Path(run_dir)
    rows = load_metrics(run / "metrics.jsonl")
    terms = [t for t in LOSS_TERMS if any(isinstance(r.get(t), (int, float)) for r in rows)]
    if not terms:
        raise ConfigError(f"{run / 'metrics.jsonl'} has no loss values ({', '.join(LOSS_TERMS)})")
    x = np.array([float(r["step"]) if isinstance(r.get("step"), (int, float)) else float(i + 1)
                  for i, r in enumerate(rows)])
    epochs = [r.get("epoch") for r in rows]
    last_epoch = max((int(e) for e in epochs if isinstance(e, (int, float))), default=None)
    miou = _miou_points(run, last_epoch)
    panels = 2 if miou else 1
    pw, ph = PANEL_SIZE
    cell_w = MARGINS["left"] + pw + MARGINS["right"]
    width, height = panels * cell_w, MARGINS["bottom"] + ph + MARGINS["top"]
    fig, place = inch_figure(width, height)

    ax = place(MARGINS["left"], MARGINS["bottom"], pw, ph)
    weight = _smoothing_for(len(rows)) if smoothing is None else float(smoothing)
    if not 0.0 <= weight < 1.0:
        raise ConfigError(f"smoothing {smoothing}: must lie in [0, 1)")
    for t in terms:
        y = np.array([float(r[t]) if isinstance(r.get(t), (int, float)) else np.nan for r in rows])
        colour = TERM_COLOURS[t]
        if weight > 0:
            ax.plot(x, y, color=colour, linewidth=0.7, alpha=0.3)
        ax.plot(x, smooth(y, weight) if weight > 0 else y, color=colour, linewidth=1.8 if t == "loss" else 1.4,
                label=TERM_LABELS[t], marker="o" if len(x) <= 20 else None, markersize=3)
    # epoch boundaries (last step of each epoch), when there are few enough to read
    bounds = [x[i] for i in range(len(rows) - 1) if epochs[i] is not None and epochs[i] != epochs[i + 1]]
    if 0 < len(bounds) <= 60:
        for b in bounds:
            ax.axvline(b, color="#bbbbbb", linewidth=0.6, linestyle=":", zorder=0)
    ax.set_xlabel("step" if any("step" in r for r in rows) else "logged step", fontsize=9)
    ax.set_ylabel("loss", fontsize=9)
    note = f", smoothed (EMA {weight:.2f}) over raw" if weight > 0 else ""
    ax.set_title(f"{run.name}: losses per step{note}", fontsize=10)
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    if len(x) == 1:
        ax.set_xlim(x[0] - 1, x[0] + 1)

    if miou:
        ax2 = place(cell_w + MARGINS["left"], MARGINS["bottom"], pw, ph)
        markers = "osD^v<>"
        for i, (label, xs, ys) in enumerate(miou):
            ax2.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1.4 if len(xs) > 1 else 0, markersize=6,
                     label=label, clip_on=False)
            for xe, ye in zip(xs[-1:], ys[-1:]):
                ax2.annotate(f"{ye:.1f}", (xe, ye), textcoords="offset points", xytext=(5, 5), fontsize=8)
        all_x = [v for _, xs, _ in miou for v in xs]
        all_y = [v for _, _, ys in miou for v in ys]
        ax2.set_xlim(min(all_x) - 0.5, max(all_x) + 0.5)
        span = max(max(all_y) - min(all_y), 4.0)
        ax2.set_ylim(min(all_y) - 0.15 * span, max(all_y) + 0.2 * span)
        ax2.set_xlabel("epoch", fontsize=9)
        ax2.set_ylabel("mIoU (%)", fontsize=9)
        ax2.set_title("evaluation mIoU", fontsize=10)
        ax2.grid(True, color="#e5e5e5", linewidth=0.6)
        ax2.tick_params(labelsize=8)
        ax2.legend(fontsize=8, frameon=True, framealpha=0.85, edgecolor="none", loc="best")
    return save_figure(fig, Path(out) if out is not None else run / CURVES_FILE, dpi)


def plot_confusion(matrix: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str], out: str | Path,
                   title: str | None = None, dpi: int = DPI) -> Path:
    """Row-normalised confusion matrix as a PNG.

    Args:
        matrix: (K, K) or (K + 1, K + 1) counts, rows = ground truth, columns = prediction; with
            K + 1 rows, row/column 0 is the ignore label and is dropped.
        class_names: the K class names (labels 1..K).
        out: PNG path.
        title: figure title (default: "confusion matrix (rows: ground truth, normalised)").
        dpi: pixels per inch.

    Returns:
        `out`. Rows without ground truth points are left blank and marked "(no points)".

    Raises:
        ConfigError: the matrix is not square or does not fit the class names.
    """
    m = np.asarray(matrix, dtype=np.float64)
    k = len(class_names)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ConfigError(f"confusion matrix must be square, got shape {m.shape}")
    if m.shape[0] == k + 1:
        m = m[1:, 1:]
    elif m.shape[0] != k:
        raise ConfigError(f"confusion matrix {m.shape[0]}x{m.shape[1]} does not fit {k} class names")
    totals = m.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(totals > 0, m / np.where(totals > 0, totals, 1), np.nan)
    ylabels = [n if totals[i, 0] > 0 else f"{n} (no points)" for i, n in enumerate(class_names)]
    cell = 0.42 if k <= 24 else max(0.18, 10.0 / k)
    left = 0.065 * max((len(n) for n in ylabels), default=4) + 0.55  # room for the row names
    bottom = 0.065 * max((len(n) for n in class_names), default=4) + 0.55  # column names
    side = cell * k
    width = left + side + 0.25 + 0.18 + 0.75
    height = bottom + side + 0.55
    fig, place = inch_figure(width, height)
    ax = place(left, bottom, side, side)
    masked = np.ma.masked_invalid(norm)
    im = ax.imshow(masked, cmap=_blues(), vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(class_names, rotation=90, fontsize=8)
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.set_xlabel("prediction", fontsize=9)
    ax.set_ylabel("ground truth", fontsize=9)
    ax.tick_params(length=2)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                v = norm[i, j]
                if np.isfinite(v) and v >= 0.005:
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6.5 if k > 16 else 7.5,
                            color="white" if v > 0.55 else "#222222")
    ax.set_title(title or "confusion matrix (% of each ground-truth row)", fontsize=10, pad=8)
    cax = place(left + side + 0.25, bottom, 0.18, side)
    cb = fig.colorbar(im, cax=cax)
    cb.ax.tick_params(labelsize=8)
    cb.set_label("fraction of the row", fontsize=8)
    diag = np.diagonal(norm)
    if np.isfinite(diag).any():
        log.info("confusion: mean per-class recall %.3f", float(np.nanmean(diag)))
    return save_figure(fig, out, dpi)


def _blues():
    """Matplotlib's Blues with masked (no ground truth) cells in very light grey."""
    from matplotlib import colormaps

    return colormaps["Blues"].with_extremes(bad="#f2f2f2")


def confusion_from_eval(eval_json: str | Path, out: str | Path | None = None, dpi: int = DPI) -> Path:
    """`plot_confusion` of an eval JSON (``confusion_matrix`` + ``class_names``, as `clip2scene
    evaluate` writes); default out = ``confusion_<split>.png`` beside it."""
    path = Path(eval_json)
    try:
        r = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no such file: {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg.rstrip(': ')}: line {e.lineno} column {e.colno})") from None
    if not isinstance(r, dict) or "confusion_matrix" not in r or "class_names" not in r:
        raise ConfigError(f"{path}: no confusion_matrix / class_names (not a `clip2scene evaluate` result)")
    split = r.get("split") or path.stem
    miou = r.get("miou")
    title = f"{split}: confusion (% of each ground-truth row)" + (f", mIoU {100 * miou:.1f} %" if miou is not None else "")
    dest = Path(out) if out is not None else path.with_name(f"confusion_{split}.png")
    return plot_confusion(r["confusion_matrix"], r["class_names"], dest, title=title, dpi=dpi)

