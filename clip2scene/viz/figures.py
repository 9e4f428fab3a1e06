"""Figure plumbing shared by the viz modules: Agg figures laid out in inches, saved reproducibly.

Figures are built as `matplotlib.figure.Figure` with an explicit `FigureCanvasAgg` (no pyplot,
no global backend switch) and saved without bbox trimming, so a PNG's pixel size is exactly
figure size x dpi and the bytes depend only on the data (no timestamp, no software tag).

    fig, place = inch_figure(width=10, height=6)
    ax = place(left=0.5, bottom=0.5, width=4, height=4)     # axes at a position in inches
    draw_bev(ax, xy, rgb, bev_extent(xy))
    save_figure(fig, "out.png", dpi=100)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

log = logging.getLogger(__name__)

DPI = 100  # default resolution of every PNG (pixels per figure inch)


def inch_figure(width: float, height: float, facecolor: str = "white") -> tuple[Figure, Callable[..., Axes]]:
    """A width x height inch Agg figure and a function placing axes by (left, bottom, width,
    height) in inches from the figure's lower-left corner."""
    fig = Figure(figsize=(width, height), facecolor=facecolor)
    FigureCanvasAgg(fig)

    def place(left: float, bottom: float, width_: float, height_: float, **kwargs) -> Axes:
        return fig.add_axes((left / width, bottom / height, width_ / width, height_ / height), **kwargs)

    return fig, place


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write `fig` as a PNG of exactly (width * dpi) x (height * dpi) pixels; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor=fig.get_facecolor(), metadata={"Software": None})
    log.info("wrote %s", path)
    return path


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of free text: lowercase, runs of other characters -> '_'."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return (s[:limit].rstrip("_")) or "query"


def bev_extent(xy: np.ndarray, margin: float = 0.08, robust: float = 97.0) -> tuple[float, float, float, float]:
    """Square (xmin, xmax, ymin, ymax) in metres holding the bulk of (n, 2) points.

    Per axis the box spans the (100 - robust)..robust percentiles (the sparse far returns of a
    70 m lidar would shrink the near scene to a dot), the larger span on both axes, plus
    `margin` of it on each side.
    """
    if len(xy) == 0:
        return -1.0, 1.0, -1.0, 1.0
    lo = np.percentile(xy, 100 - robust, axis=0)
    hi = np.percentile(xy, robust, axis=0)
    centre = (lo + hi) / 2
    half = float(max((hi - lo).max() / 2, 0.5)) * (1 + margin)
    return float(centre[0] - half), float(centre[0] + half), float(centre[1] - half), float(centre[1] + half)


def bev_point_size(n: int) -> float:
    """Marker area (points^2) for n points in a ~5.5 inch BEV panel: dense scans get fine dots."""
    return float(np.clip(40000.0 / max(n, 1), 0.6, 8.0))


def draw_bev(ax: Axes, xy: np.ndarray, rgb: np.ndarray, extent: Sequence[float], size: float = 1.0,
             order: np.ndarray | None = None) -> None:
    """Scatter (n, 2) x/y metres coloured by (n, 3) float RGB in [0, 1] on `ax` with equal
    aspect and `extent` (xmin, xmax, ymin, ymax). `order`: drawing order (last on top), e.g. by
    height so that objects cover the ground under them."""
    if order is not None:
        xy, rgb = xy[order], rgb[order]
    ax.scatter(xy[:, 0], xy[:, 1], c=rgb, s=size, marker="o", linewidths=0, rasterized=True)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal", adjustable="box")
    ax.tick_params(labelsize=7, length=2)
    ax.set_xlabel("x [m]", fontsize=8, labelpad=1)
    ax.set_ylabel("y [m]", fontsize=8, labelpad=1)


def mark_sensor(ax: Axes) -> None:
    """A small black triangle at the origin pointing along +x (the lidar's forward axis)."""
    ax.plot([0.0], [0.0], marker=">", color="black", markersize=5, linestyle="none", zorder=5)


def legend_axes(ax: Axes, names: Sequence[str], rgb: np.ndarray, title: str | None = None, ncol: int = 1,
                fontsize: float = 8) -> None:
    """Fill an (axis-less) axes with a legend of colour patches: names[i] in rgb[i] (uint8 or
    float in [0, 1])."""
    ax.set_axis_off()
    if not len(names):
        return
    cols = np.asarray(rgb, dtype=np.float64)
    if cols.max(initial=0.0) > 1.0:
        cols = cols / 255.0
    handles = [Patch(facecolor=tuple(c), edgecolor="black", linewidth=0.3, label=n) for n, c in zip(names, cols)]
    ax.legend(handles=handles, loc="upper left", ncol=ncol, frameon=False, fontsize=fontsize, title=title,
              title_fontsize=fontsize + 1, handlelength=1.2, handleheight=1.0, borderaxespad=0.0,
              columnspacing=1.0, labelspacing=0.35, alignment="left")
