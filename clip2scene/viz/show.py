"""Pictures of one cached scan: camera images with projected points, and a bird's-eye view.

`render_scan(cache, index, out_dir, checkpoint=None, dataroot=None)` writes

* one PNG per camera image that sees points of the scan (``scan0003_CAM_FRONT.png``): the image
  with the scan's keyframe points that the cache pairs with it (`ScanData.pair_camera`, at their
  cached pixel `ScanData.pair_uv`), in up to three panels stacked top to bottom, coloured by

  1. the teacher's pseudo-label: argmax of the cached MaskCLIP logits over the prompt classes that
     map to an evaluation class, mapped to it (`Cache.prompt_to_eval`); absent for a labels-only
     cache;
  2. the student's prediction when a checkpoint is given (distillation: cosine argmax over the
     checkpoint's text embeddings, mapped the same way; fine-tuned: classifier argmax), the
     student run on all cached points of the scan (keyframe + sweeps) as evaluation does;
  3. the ground truth when the cache has labels (label 0 = ignore in grey);

  The images are read from the dataset the cache was built from (``cache.meta['dataset']``:
  format, version and dataroot, or `dataroot` given here), whose reader names the scan's views
  in the cache's camera order. When that dataroot (or the scan, or an image) is not available
  the camera pictures are skipped with a logged warning.
* one bird's-eye-view PNG (``scan0003_bev.png``): x-y scatter of the keyframe points (equal
  aspect, metres, the sensor's frame), the same one to three colourings side by side (teacher:
  camera-visible points coloured, the rest light grey), and the legend of class colours.

Colours: `clip2scene.viz.colors.palette_for(cache.eval_class_names)` (official nuScenes-lidarseg,
SemanticKITTI and ScanNet colours). Only keyframe points (sweep 0) are drawn: sweeps carry no
ground truth, and moving objects smear in them.

    from clip2scene.viz.show import render_scan
    paths = render_scan("cache.zarr", 3, "pictures/", checkpoint="runs/exp1/checkpoint.pt")
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clip2scene.errors import ConfigError, DataError
from clip2scene.precompute.datasets.base import View
from clip2scene.storage import Cache, ScanData, open_cache
from clip2scene.viz.colors import IGNORE_COLOUR, UNSEEN_COLOUR, colour_points, palette_for
from clip2scene.viz.figures import DPI, bev_extent, bev_point_size, draw_bev, inch_figure, legend_axes, mark_sensor, save_figure
from clip2scene.viz.student import Student, check_student_fits, load_student, teacher_labels

log = logging.getLogger(__name__)

# Layout, inches.
CAMERA_PANEL_WIDTH = 8.0  # image width on the page
PANEL_TITLE = 0.3  # strip above each panel
HEADER = 0.4  # figure title strip
PAD = 0.1  # outer margins and gaps
LEGEND_COLUMNS = 6  # camera pictures: legend below the panels in this many columns
LEGEND_ROW = 0.22  # height of one legend row
BEV_PANEL = 5.5  # square BEV axes
BEV_LEFT = 0.6  # room for the y tick labels
BEV_BOTTOM = 0.5  # room for the x tick labels
BEV_LEGEND = 2.1  # legend column right of the BEV panels
LIDAR_DATASETS = ("nuscenes", "semantickitti")  # the scan frame is the sensor's: mark its origin


@dataclass
class Colouring:
    """One way of colouring the scan's keyframe points.

    labels: (n_key,) int64 evaluation labels 0..K of the keyframe points (0 = ignore).
    covered: (n_key,) bool, points this colouring has a label for (teacher: camera-visible).
    """

    key: str  # "teacher" | "student" | "truth"
    title: str
    labels: np.ndarray
    covered: np.ndarray


def camera_figure_size(num_panels: int, image_width: int, image_height: int, num_classes: int) -> tuple[float, float]:
    """(width, height) in inches of a camera picture: `num_panels` images of that pixel size
    stacked, and a legend with room for the K classes + ignore."""
    panel_h = CAMERA_PANEL_WIDTH * image_height / image_width
    return CAMERA_PANEL_WIDTH + 2 * PAD, HEADER + num_panels * (PANEL_TITLE + panel_h) + _legend_height(num_classes) + PAD


def bev_figure_size(num_panels: int) -> tuple[float, float]:
    """(width, height) in inches of a bird's-eye-view picture with `num_panels` colourings."""
    return (num_panels * (BEV_LEFT + BEV_PANEL + PAD) + BEV_LEGEND + PAD,
            BEV_BOTTOM + BEV_PANEL + PANEL_TITLE + HEADER)


def _legend_height(num_classes: int) -> float:
    return math.ceil((num_classes + 2) / LEGEND_COLUMNS) * LEGEND_ROW + 0.15


def _colourings(cache: Cache, scan: ScanData, key: np.ndarray, student: Student | None) -> list[Colouring]:
    """Teacher / student / truth labels of the keyframe points `key` (indices into the scan)."""
    n = len(scan.xyz)
    out: list[Colouring] = []
    if cache.has_teacher and scan.pair_logits is not None and len(scan.pair_point):
        labels = np.zeros(n, np.int64)
        covered = np.zeros(n, bool)
        labels[scan.pair_point] = teacher_labels(scan.pair_logits, cache.prompt_to_eval)
        covered[scan.pair_point] = True
        fp = cache.fingerprint or {}
        variant = {"maskclip": "MaskCLIP", "sclip": "SCLIP", "clearclip": "ClearCLIP", "naclip": "NACLIP"}
        name = variant.get(str(fp.get("teacher", "maskclip")), str(fp.get("teacher")))
        title = f"teacher: {name} pseudo-labels"
        if fp.get("model") == "simulated":
            title = "SIMULATED teacher pseudo-labels (not CLIP)"
        elif fp.get("weights_sha256") == "random":
            title += " - randomly initialised teacher, meaningless"
        out.append(Colouring("teacher", title, labels[key], covered[key]))
    if student is not None:
        pred = student.predict(scan.xyz, scan.feat, cache.prompt_to_eval)
        out.append(Colouring("student", f"{student.describe()} prediction", pred[key], np.ones(len(key), bool)))
    if cache.has_labels and scan.label is not None:
        out.append(Colouring("truth", "ground truth", scan.label[key].astype(np.int64), np.ones(len(key), bool)))
    return out


def _legend_entries(colourings: list[Colouring], names: list[str], pal: np.ndarray,
                    with_unseen: bool) -> tuple[list[str], np.ndarray]:
    """Names and colours of the labels that occur (class order, ignore last)."""
    present: set[int] = set()
    for c in colourings:
        present |= set(np.unique(c.labels[c.covered]).tolist())
    labels = [k for k in range(1, len(pal)) if k in present]
    entries = [names[k - 1] for k in labels]
    colours = [pal[k] for k in labels]
    if 0 in present:
        entries.append("ignore / unlabelled")
        colours.append(np.asarray(IGNORE_COLOUR, np.uint8))
    if with_unseen:
        entries.append("not seen by a camera")
        colours.append(np.asarray(UNSEEN_COLOUR, np.uint8))
    return entries, np.asarray(colours, np.uint8).reshape(-1, 3)


def _scan_views(cache: Cache, scan: ScanData, dataroot: str | Path | None) -> list[View] | None:
    """The scan's views from its dataset reader, or None (logged warning) when unavailable."""
    from clip2scene.precompute.datasets import open_dataset

    meta = cache.meta.get("dataset") or {}
    root = Path(dataroot) if dataroot is not None else (Path(meta["dataroot"]) if meta.get("dataroot") else None)
    if root is None or not root.is_dir():
        log.warning("dataroot %s of cache %s is not available here: skipping the camera pictures "
                    "(pass dataroot=... / --dataroot to draw them)", root, cache.path)
        return None
    try:
        ds = open_dataset(str(meta.get("name", "nuscenes")), root, meta.get("version"))
        ref = next((s for s in ds.scans(sweeps=1) if s.token == scan.token), None)
        if ref is None:
            log.warning("scan %s (%s) is not in the dataset at %s: skipping the camera pictures", scan.token,
                        scan.scene, root)
            return None
        return ds.views(ref)
    except (DataError, ConfigError) as e:
        log.warning("cannot read the dataset at %s (%s): skipping the camera pictures", root, e)
        return None


def _load_image(view: View) -> np.ndarray | None:
    try:
        with Image.open(view.path) as im:
            return np.asarray(im.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        log.warning("camera image %s unreadable (%s): skipping it", view.path, e)
        return None


def dimmed(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) float32 greyscale in [0.3, 0.85]: a quiet backdrop on
    which class colours (light and dark ones alike) stay readable."""
    lum = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    return np.repeat((0.3 + 0.55 * lum)[..., None], 3, axis=2)


def _camera_picture(path: Path, image: np.ndarray, view: View, uv: np.ndarray, rows: np.ndarray,
                    colourings: list[Colouring], depth: np.ndarray, names: list[str],
                    pal: np.ndarray, header: str, point_size: float, dim: bool, dpi: int) -> Path:
    """One camera's picture. uv (m_c, 2) pixels of its points in the view's stored size; rows:
    their positions in the keyframe-point arrays of the colourings; depth (m_c,) for the order."""
    h, w = image.shape[:2]
    if (w, h) != (view.width, view.height):  # image on disk differs from the table: rescale uv
        uv = uv * np.array([w / view.width, h / view.height], np.float32)
    width, height = camera_figure_size(len(colourings), w, h, len(pal) - 1)
    fig, place = inch_figure(width, height)
    fig.text(0.5, 1 - (HEADER / 2) / height, header, ha="center", va="center", fontsize=10)
    panel_h = CAMERA_PANEL_WIDTH * h / w
    order = np.argsort(-depth, kind="stable")  # far first, near points on top
    backdrop = dimmed(image) if dim else image
    top = height - HEADER
    shown: list[Colouring] = []
    for c in colourings:
        top -= PANEL_TITLE + panel_h
        ax = place(PAD, top, CAMERA_PANEL_WIDTH, panel_h)
        ax.imshow(backdrop, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
        lab = c.labels[rows][order]
        ok = c.covered[rows][order]
        first = np.argsort(lab != 0, kind="stable")  # ignore-labelled points underneath the classes
        lab, ok, pts = lab[first], ok[first], uv[order][first]
        ax.scatter(pts[ok, 0], pts[ok, 1], c=colour_points(lab[ok], pal), s=point_size, marker="o",
                   linewidths=0, rasterized=True)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_axis_off()
        ax.set_title(f"{c.title} ({int(ok.sum())} points)", fontsize=9, pad=3)
        shown.append(Colouring(c.key, c.title, c.labels[rows], c.covered[rows]))
    names_, colours = _legend_entries(shown, names, pal, with_unseen=False)
    legend_axes(place(PAD, PAD, CAMERA_PANEL_WIDTH, _legend_height(len(pal) - 1) - 0.05), names_, colours,
                ncol=LEGEND_COLUMNS, fontsize=8)
    return save_figure(fig, path, dpi)


def _bev_picture(path: Path, xyz: np.ndarray, colourings: list[Colouring], names: list[str], pal: np.ndarray,
                 header: str, mark_origin: bool, point_size: float, dpi: int) -> Path:
    width, height = bev_figure_size(len(colourings))
    fig, place = inch_figure(width, height)
    fig.text(0.5, 1 - (HEADER / 2) / height, header, ha="center", va="center", fontsize=10)
    extent = bev_extent(xyz[:, :2])
    by_height = np.argsort(xyz[:, 2], kind="stable")
    for i, c in enumerate(colourings):
        ax = place(i * (BEV_LEFT + BEV_PANEL + PAD) + BEV_LEFT, BEV_BOTTOM, BEV_PANEL, BEV_PANEL)
        rgb = colour_points(c.labels, pal)
        rgb[~c.covered] = np.asarray(UNSEEN_COLOUR) / 255.0
        # uncovered points first (underneath), then ignore-labelled ones, then the classes from low to high
        rank = np.where(~c.covered, 0, np.where(c.labels == 0, 1, 2))[by_height]
        order = by_height[np.argsort(rank, kind="stable")]
        draw_bev(ax, xyz[:, :2], rgb, extent, size=point_size, order=order)
        if mark_origin:
            mark_sensor(ax)
        ax.set_title(c.title, fontsize=9, pad=4)
    entries, colours = _legend_entries(colourings, names, pal,
                                       with_unseen=any(not c.covered.all() for c in colourings))
    left = len(colourings) * (BEV_LEFT + BEV_PANEL + PAD) + 0.1
    legend_axes(place(left, BEV_BOTTOM, BEV_LEGEND - 0.1, BEV_PANEL), entries, colours, title="classes", fontsize=8)
    return save_figure(fig, path, dpi)


def render_scan(cache: Cache | str | Path, index: int, out_dir: str | Path, checkpoint: str | Path | None = None,
                dataroot: str | Path | None = None, *, device: str = "cpu", max_views: int | None = 6,
                storage_options: dict | None = None, point_size: float | None = None,
                dim_images: bool = True, dpi: int = DPI) -> list[Path]:
    """Draw scan `index` of a cache: one PNG per camera image and one bird's-eye view.

    Args:
        cache: an open `Cache` or its path / URL.
        index: scan index in the cache (0..num_scans-1).
        out_dir: folder for the PNGs (created).
        checkpoint: a `clip2scene train` or `clip2scene finetune` checkpoint.pt for the student
            panels (classes must match the cache's); None = teacher and ground truth only.
        dataroot: where the dataset's images are, when not at ``cache.meta['dataset']['dataroot']``.
        device: torch device for the student.
        max_views: draw at most this many camera images, those with the most paired points
            (ScanNet scans have dozens of frames); None = all.
        storage_options: fsspec options when `cache` is a URL.
        point_size: marker area in points^2 (default: 6 on images, `bev_point_size` in the BEV).
        dim_images: draw the camera images as dimmed greyscale so that the class colours of
            the points stand out (False: the images in colour).
        dpi: pixels per inch of the PNGs.

    Returns:
        The written PNG paths: camera pictures in view order, then the bird's-eye view.

    Raises:
        CacheError: cache missing / incomplete; checkpoint classes differ from the cache's.
        ConfigError: index out of range; bad checkpoint; nothing to draw.
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache, storage_options)
    if not 0 <= int(index) < cache.num_scans:
        raise ConfigError(f"scan index {index} out of range: cache {cache.path} has {cache.num_scans} scans "
                          f"(0..{cache.num_scans - 1})")
    student = None
    if checkpoint is not None:
        student = load_student(checkpoint, device)
        check_student_fits(student, cache)
    out_dir = Path(out_dir)
    scan = cache.read_scan(int(index))
    key = np.flatnonzero(scan.sweep == 0)
    names = cache.eval_class_names
    pal = palette_for(names)
    colourings = _colourings(cache, scan, key, student)
    if not colourings:
        raise ConfigError(f"scan {index} of {cache.path}: no teacher outputs, no labels and no checkpoint: "
                          "nothing to colour the points by (give --checkpoint)")
    dataset = str((cache.meta.get("dataset") or {}).get("name", ""))
    header = f"{dataset} scan {index}: {scan.scene} ({scan.split}), token {scan.token}"
    if cache.has_teacher and cache.fingerprint.get("weights_sha256") == "random":
        header += " - teacher randomly initialised (no CLIP weights)"
    stem = f"scan{int(index):04d}"
    paths: list[Path] = []

    # (a) camera pictures
    key_pos = np.full(len(scan.xyz), -1, np.int64)
    key_pos[key] = np.arange(len(key))
    pair_key = key_pos[scan.pair_point] if len(scan.pair_point) else np.zeros(0, np.int64)
    if len(scan.pair_point) == 0:
        log.warning("cache %s has no camera pairs for scan %d (labels-only cache): no camera pictures",
                    cache.path, index)
    else:
        views = _scan_views(cache, scan, dataroot)
        if views is not None:
            cams = scan.pair_camera.astype(np.int64)
            counts = np.bincount(cams[pair_key >= 0], minlength=len(views))
            chosen = [v for v in np.argsort(-counts, kind="stable") if counts[v] > 0][: max_views or len(views)]
            for v in sorted(int(c) for c in chosen):
                if v >= len(views):
                    log.warning("scan %d pairs points with view %d but the dataset has %d views: skipped",
                                index, v, len(views))
                    continue
                image = _load_image(views[v])
                if image is None:
                    continue
                sel = np.flatnonzero((cams == v) & (pair_key >= 0))
                depth = np.linalg.norm(scan.xyz[scan.pair_point[sel]], axis=1)
                path = out_dir / f"{stem}_{_file_part(views[v].name)}.png"
                paths.append(_camera_picture(path, image, views[v], scan.pair_uv[sel].astype(np.float32),
                                             pair_key[sel], colourings, depth, names, pal,
                                             f"{header} - {views[v].name}",
                                             6.0 if point_size is None else point_size, dim_images, dpi))

    # (b) bird's-eye view
    paths.append(_bev_picture(out_dir / f"{stem}_bev.png", scan.xyz[key], colourings, names, pal,
                              f"{header} - bird's-eye view, {len(key)} keyframe points",
                              dataset in LIDAR_DATASETS, bev_point_size(len(key)) if point_size is None else point_size, dpi))
    return paths


def _file_part(name: str) -> str:
    """A view name as part of a file name (case kept; other characters -> '_')."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")[:60] or "view"


def scan_index(cache: Cache, token: str) -> int:
    """Index of the scan with sample token / id `token` (ConfigError if the cache has none)."""
    hits = np.flatnonzero(cache.token == token)
    if len(hits) == 0:
        raise ConfigError(f"cache {cache.path} has no scan with token {token!r}")
    return int(hits[0])
