"""Open-vocabulary queries: score every point of a scan against free text with the student.

The distilled student maps points into CLIP's joint image-text space, so any text embedded by
the *same* CLIP text tower can be looked for in a point cloud. `query_scan` rebuilds that tower
from the checkpoint's teacher fingerprint (`load_teacher` with the fingerprint's model, weights
and image size), embeds each query exactly as the class prompts were embedded (85 templates,
mean of the normalised embeddings; `clip2scene.precompute.teacher.maskclip.encode_text`), and refuses to
go on unless the text tower is the checkpoint's:

* real weights: the sha256 of the weight file loaded here must equal the fingerprint's
  ``weights_sha256`` (`QueryError` otherwise, naming both);
* ``weights="none"`` (the seeded random teacher of tests and smoke runs, sha256 "random"): the
  rebuilt tower must reproduce the checkpoint's stored text embeddings of its own class names
  (cosine > `REPRODUCE_MIN_COSINE` for every class).

The student then runs on the scan, either a cached one (``cache`` + ``index``: the cached points,
keyframe + sweeps, as in training) or a raw lidar file (``points_file``: a nuScenes ``.pcd.bin``,
float32 x 5 [x, y, z, intensity 0..255, ring], intensity / 255 as input; a SemanticKITTI
``.bin``, float32 x 4 [x, y, z, remission 0..1], remission as is). Each point's score for a
query is the cosine similarity of its student feature and the query's text embedding.

Written to `out_dir`:

* ``query_<k>_<text>.png``: bird's-eye heat map of the scores of query k (keyframe points of a
  cached scan, all points of a file), highest scores drawn on top, with a colour bar;
* ``query_labels.png`` (``labels=True``): each point coloured by its best-scoring query, with a
  legend: a segmentation by the queries alone;
* ``query.json``: the source, the queries, per query the score range and the `top_k` points
  (index into the scan's points, xyz, score), the per-query point counts of the labelling.

    from clip2scene.viz.query import query_scan
    r = query_scan("runs/exp1/checkpoint.pt", ["a car", "a tree"], cache="cache.zarr", index=3,
                   labels=True, out_dir="query/")
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clip2scene.errors import ConfigError, DataError
from clip2scene.storage import Cache, open_cache
from clip2scene.viz.colors import distinct_colours
from clip2scene.viz.figures import (DPI, bev_extent, bev_point_size, draw_bev, inch_figure, legend_axes, mark_sensor,
                                    save_figure, slug)
from clip2scene.viz.student import DISTILL_KIND, Student, load_student

log = logging.getLogger(__name__)

REPRODUCE_MIN_COSINE = 0.999  # weights "none": rebuilt vs stored class text embeddings, every class
HEAT_PANEL = 6.0  # inches, square BEV axes of a heat map
HEAT_LEFT, HEAT_BOTTOM, HEAT_TOP, HEAT_BAR = 0.65, 0.55, 0.5, 1.1  # margins and colour-bar column, inches
LABEL_LEGEND = 2.6  # legend column of the labels picture, inches


class QueryError(ConfigError):
    """The checkpoint's CLIP text tower cannot be rebuilt faithfully here (other weights, or the
    random teacher does not reproduce the stored embeddings)."""


@dataclass
class PointSource:
    """Points to query. xyz (n, 3) float32; feat (n, F) float32 student input; shown (n,) bool,
    the points drawn and ranked; description: JSON-able origin."""

    xyz: np.ndarray
    feat: np.ndarray
    shown: np.ndarray
    description: dict
    lidar: bool  # frame is the sensor's (mark the origin)


def heat_figure_size() -> tuple[float, float]:
    """(width, height) in inches of a query heat-map picture."""
    return HEAT_LEFT + HEAT_PANEL + HEAT_BAR, HEAT_BOTTOM + HEAT_PANEL + HEAT_TOP


def labels_figure_size() -> tuple[float, float]:
    """(width, height) in inches of the query-labels picture."""
    return HEAT_LEFT + HEAT_PANEL + 0.2 + LABEL_LEGEND, HEAT_BOTTOM + HEAT_PANEL + HEAT_TOP


def encode_queries(student: Student, texts: list[str], weights: str | None = None,
                   device: str = "cpu") -> torch.Tensor:
    """Embed `texts` with the CLIP text tower of the student's teacher.

    Args:
        student: a distillation student (`load_student`).
        texts: Q free-text queries (each filled into the 85 prompt templates like a class name).
        weights: where the CLIP weights are on this machine when not at the fingerprint's
            ``weights`` (a file, an open_clip tag or ``local-dir:DIR``); their sha256 is checked.
        device: torch device for the text tower.

    Returns:
        (Q, D) float32 on the CPU, rows L2-normalised.

    Raises:
        QueryError: other weights than the checkpoint's teacher, or a random teacher that does not
            reproduce the stored embeddings; ConfigError: no teacher fingerprint in the checkpoint.
        WeightsNotFoundError: the weights are not on this machine (the message says where to put them).
    """
    from clip2scene.precompute.teacher.config import TeacherConfig
    from clip2scene.precompute.teacher.maskclip import load_teacher
    from clip2scene.precompute.teacher.prompts import TEMPLATES, templates_sha256

    fp = student.teacher
    if not fp or not fp.get("model") or not fp.get("weights"):
        raise ConfigError(f"{student.path} records no teacher (model, weights): cannot rebuild its CLIP text tower")
    if not texts or any(not t.strip() for t in texts):
        raise ConfigError("give at least one non-empty query text")
    if fp.get("model") == "simulated":  # the simulated teacher's pseudo-text embeddings (no CLIP text tower)
        from clip2scene.precompute.teacher.simulated import pseudo_text_embeddings

        knobs = fp.get("simulated") or {}
        return pseudo_text_embeddings(texts, int(fp["embed_dim"]), float(knobs.get("group_weight", 0.0)))
    if fp.get("templates_sha256") not in (None, templates_sha256(TEMPLATES)):
        raise QueryError(f"{student.path} was distilled with other prompt templates (sha256 {fp['templates_sha256']}) "
                         f"than this clip2scene's ({templates_sha256(TEMPLATES)}): its text space differs")
    cfg = TeacherConfig(model=str(fp["model"]), weights=str(weights or fp["weights"]),
                        image_size=tuple(int(v) for v in fp.get("image_size", (224, 224))))
    stored = student.ckpt.get("text_embeddings")
    own = list(student.class_names) if stored is not None else []
    random_weights = fp.get("weights_sha256") == "random" or cfg.weights == "none"
    names = list(texts) + (own if random_weights else [])
    try:
        teacher = load_teacher(cfg, names, device=device)
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(f"cannot rebuild the teacher {fp['model']!r} of {student.path}: {e}") from None
    got_sha = teacher.fingerprint.get("weights_sha256")
    if got_sha != fp.get("weights_sha256"):
        raise QueryError(f"CLIP weights {cfg.weights!r} have sha256 {got_sha}, but {student.path} was distilled from "
                         f"weights with sha256 {fp.get('weights_sha256')}: query texts would land in another "
                         "text space (pass the teacher's own weights)")
    if fp.get("quick_gelu") is not None and teacher.fingerprint.get("quick_gelu") != fp.get("quick_gelu"):
        raise QueryError(f"teacher rebuilt with quick_gelu={teacher.fingerprint.get('quick_gelu')}, "
                         f"{student.path} records quick_gelu={fp.get('quick_gelu')}")
    emb = teacher.text_embeddings.detach().float().cpu()
    if random_weights:
        if stored is None or not own:
            raise QueryError(f"{student.path}: random teacher weights and no stored text embeddings to check "
                             "that the rebuilt text tower is the same")
        rebuilt = F.normalize(emb[len(texts):], dim=1)
        ref = F.normalize(stored.float().cpu(), dim=1)
        if rebuilt.shape != ref.shape:
            raise QueryError(f"{student.path}: stored text embeddings {tuple(ref.shape)}, rebuilt {tuple(rebuilt.shape)}")
        cos = (rebuilt * ref).sum(dim=1)
        if float(cos.min()) < REPRODUCE_MIN_COSINE:
            worst = int(cos.argmin())
            raise QueryError(f"the random teacher {fp['model']!r} (weights 'none', seed {cfg.seed}) rebuilt here does "
                             f"not reproduce the text embeddings stored in {student.path} (class {own[worst]!r}: "
                             f"cosine {float(cos[worst]):.4f}); another open_clip / torch version?")
        log.info("random teacher reproduces the stored text embeddings (min cosine %.6f)", float(cos.min()))
    del teacher
    return F.normalize(emb[: len(texts)], dim=1)


def read_points_file(path: str | Path, points_format: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """Read a raw lidar file for the student.

    Args:
        path: a nuScenes ``*.pcd.bin`` or a SemanticKITTI / KITTI velodyne ``*.bin``.
        points_format: "auto" (by name: ``.pcd.bin`` = nuscenes, other ``.bin`` = kitti),
            "nuscenes" or "kitti".

    Returns:
        xyz (n, 3) float32, feat (n, 1) float32 intensity in 0..1 (nuScenes / 255, KITTI as
        stored), and the format used.

    Raises:
        DataError: missing file, size not a whole number of points, empty, NaN/inf values.
        ConfigError: unknown format.
    """
    path = Path(path)
    fmt = points_format
    if fmt == "auto":
        name = path.name.lower()
        fmt = "nuscenes" if name.endswith(".pcd.bin") else "kitti" if name.endswith(".bin") else ""
        if not fmt:
            raise ConfigError(f"{path}: cannot tell the point format from the name (expected *.pcd.bin for "
                              "nuScenes or *.bin for KITTI); pass points_format")
    if fmt not in ("nuscenes", "kitti"):
        raise ConfigError(f"points format {points_format!r}: expected auto, nuscenes or kitti")
    width = 5 if fmt == "nuscenes" else 4
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"points file not found: {path}") from None
    if len(raw) % (4 * width):
        raise DataError(f"{path}: size {len(raw)} bytes is not a multiple of {4 * width} "
                        f"(float32 x {width} per point, {fmt} format)")
    pts = np.frombuffer(raw, dtype=np.float32).reshape(-1, width)
    if len(pts) == 0:
        raise DataError(f"{path}: no points (empty file)")
    finite = np.isfinite(pts).all(axis=1)
    if not finite.all():
        raise DataError(f"{path}: {int((~finite).sum())} of {len(pts)} points have NaN/inf values")
    xyz = np.ascontiguousarray(pts[:, :3])
    feat = pts[:, 3:4] / np.float32(255.0) if fmt == "nuscenes" else np.ascontiguousarray(pts[:, 3:4])
    return xyz, feat.astype(np.float32), fmt


def _source(cache: Cache | str | Path | None, index: int | None, points_file: str | Path | None,
            points_format: str, storage_options: dict | None) -> PointSource:
    if (cache is None) == (points_file is None):
        raise ConfigError("give exactly one of a cache (with a scan index) and a points file")
    if points_file is not None:
        xyz, feat, fmt = read_points_file(points_file, points_format)
        return PointSource(xyz, feat, np.ones(len(xyz), bool),
                           dict(points_file=str(points_file), format=fmt, points=int(len(xyz))), lidar=True)
    cache = cache if isinstance(cache, Cache) else open_cache(cache, storage_options)
    index = 0 if index is None else int(index)
    if not 0 <= index < cache.num_scans:
        raise ConfigError(f"scan index {index} out of range: cache {cache.path} has {cache.num_scans} scans")
    scan = cache.read_scan(index)
    dataset = str((cache.meta.get("dataset") or {}).get("name", ""))
    return PointSource(scan.xyz, scan.feat.astype(np.float32), scan.sweep == 0,
                       dict(cache=str(cache.path), index=index, token=scan.token, scene=scan.scene, split=scan.split,
                            dataset=dataset, points=int(len(scan.xyz)), keyframe_points=int((scan.sweep == 0).sum())),
                       lidar=dataset in ("nuscenes", "semantickitti"))


def _heat_picture(path: Path, xy: np.ndarray, z: np.ndarray, score: np.ndarray, text: str, extent, lidar: bool,
                  title: str, dpi: int) -> Path:
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    width, height = heat_figure_size()
    fig, place = inch_figure(width, height)
    ax = place(HEAT_LEFT, HEAT_BOTTOM, HEAT_PANEL, HEAT_PANEL)
    # colour range: 2nd percentile .. maximum, so that one outlier cannot wash out the scene
    lo, hi = float(np.percentile(score, 2.0)), float(score.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 1e-3, hi + 1e-3
    norm = Normalize(vmin=lo, vmax=hi)
    cmap = colormaps["viridis"]
    order = np.lexsort((z, score))  # low scores first, high scores on top
    draw_bev(ax, xy, cmap(norm(score))[:, :3], extent, size=bev_point_size(len(xy)), order=order)
    if lidar:
        mark_sensor(ax)
    ax.set_title(title, fontsize=9, pad=4)
    cax = place(HEAT_LEFT + HEAT_PANEL + 0.2, HEAT_BOTTOM, 0.18, HEAT_PANEL)
    from matplotlib.cm import ScalarMappable

    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, extend="min" if score.min() < lo else "neither")
    cb.ax.tick_params(labelsize=8)
    cb.set_label(f'cosine similarity to "{text}"', fontsize=8)
    return save_figure(fig, path, dpi)


def _labels_picture(path: Path, xy: np.ndarray, z: np.ndarray, best: np.ndarray, texts: list[str], extent,
                    lidar: bool, title: str, dpi: int) -> Path:
    width, height = labels_figure_size()
    fig, place = inch_figure(width, height)
    ax = place(HEAT_LEFT, HEAT_BOTTOM, HEAT_PANEL, HEAT_PANEL)
    colours = distinct_colours(len(texts))
    draw_bev(ax, xy, colours[best].astype(np.float64) / 255.0, extent, size=bev_point_size(len(xy)),
             order=np.argsort(z, kind="stable"))
    if lidar:
        mark_sensor(ax)
    ax.set_title(title, fontsize=9, pad=4)
    counts = np.bincount(best, minlength=len(texts))
    names = [f'"{t}" ({c})' for t, c in zip(texts, counts)]
    legend_axes(place(HEAT_LEFT + HEAT_PANEL + 0.25, HEAT_BOTTOM, LABEL_LEGEND - 0.1, HEAT_PANEL), names, colours,
                title="best query (points)", fontsize=8)
    return save_figure(fig, path, dpi)


def query_scan(checkpoint: str | Path, texts: list[str], cache: Cache | str | Path | None = None,
               index: int | None = None, points_file: str | Path | None = None, labels: bool = False, *,
               out_dir: str | Path, device: str = "cpu", top_k: int = 20, points_format: str = "auto",
               clip_weights: str | None = None, storage_options: dict | None = None, dpi: int = DPI) -> dict:
    """Score a scan's points against free-text queries; write heat maps and a JSON summary.

    Args:
        checkpoint: a `clip2scene train` checkpoint (fine-tuned classifiers have no text space).
        texts: Q >= 1 queries, e.g. ["a car", "a traffic cone"].
        cache, index: a cached scan (index default 0) ...
        points_file: ... or a raw nuScenes .pcd.bin / KITTI .bin file (exactly one source).
        labels: also write the argmax-over-queries segmentation picture.
        out_dir: output folder (created).
        device: torch device for the student and the text tower.
        top_k: points listed per query in the JSON.
        points_format: "auto", "nuscenes" or "kitti" for `points_file`.
        clip_weights: the teacher's CLIP weights on this machine when not at the fingerprint's
            path (sha256 checked).
        storage_options: fsspec options when `cache` is a URL.
        dpi: pixels per inch.

    Returns:
        The dict written to ``query.json`` plus ``"json"``: its path. Keys: checkpoint, source,
        teacher, texts, points_scored, points_shown, queries (per query: text, png, score_min,
        score_max, score_mean, top_k [{index, xyz, score}]), labels_png and label_counts (with
        labels=True).

    Raises:
        ConfigError / DataError: bad arguments or input files; QueryError: the checkpoint's text
        tower cannot be rebuilt faithfully; WeightsNotFoundError: CLIP weights missing here.
    """
    texts = [str(t) for t in texts]
    if top_k < 1:
        raise ConfigError(f"top_k {top_k}: must be >= 1")
    src = _source(cache, index, points_file, points_format, storage_options)
    student = load_student(checkpoint, device)
    if student.kind != DISTILL_KIND:
        raise ConfigError(f"{checkpoint} is a fine-tuned classifier: it has no text-space features to query "
                          "(use the `clip2scene train` checkpoint it started from)")
    if student.in_channels != src.feat.shape[1]:
        raise ConfigError(f"{checkpoint} takes {student.in_channels} input channel(s) per point, the points have "
                          f"{src.feat.shape[1]}")
    text = encode_queries(student, texts, clip_weights, device)
    feats = F.normalize(student.point_features(src.xyz, src.feat), dim=1)
    scores = (feats @ text.T).numpy()  # (n, Q) cosine
    shown = np.flatnonzero(src.shown)
    xy, z, s = src.xyz[shown, :2], src.xyz[shown, 2], scores[shown]
    extent = bev_extent(xy)
    out_dir = Path(out_dir)
    where = (f"{src.description.get('dataset', '')} scan {src.description['index']} ({src.description['scene']})"
             if "index" in src.description else Path(src.description["points_file"]).name)
    queries = []
    for q, t in enumerate(texts):
        col = s[:, q]
        top = np.argsort(-col, kind="stable")[:top_k]
        png = _heat_picture(out_dir / f"query_{q:02d}_{slug(t)}.png", xy, z, col, t, extent, src.lidar,
                            f'"{t}" on {where}: cosine with the {student.describe()}', dpi)
        queries.append(dict(text=t, png=str(png), score_min=float(col.min()), score_max=float(col.max()),
                            score_mean=float(col.mean()),
                            top_k=[dict(index=int(shown[i]), xyz=[float(v) for v in src.xyz[shown[i]]],
                                        score=float(col[i])) for i in top]))
    fp = student.teacher
    result = dict(checkpoint=str(checkpoint), source=src.description,
                  teacher=dict(model=fp.get("model"), weights=fp.get("weights"), weights_sha256=fp.get("weights_sha256")),
                  texts=texts, points_scored=int(len(src.xyz)), points_shown=int(len(shown)), queries=queries)
    if labels:
        best = s.argmax(axis=1)
        result["labels_png"] = str(_labels_picture(out_dir / "query_labels.png", xy, z, best, texts, extent, src.lidar,
                                                   f"best-scoring query per point on {where}", dpi))
        result["label_counts"] = {t: int(c) for t, c in zip(texts, np.bincount(best, minlength=len(texts)))}
    path = out_dir / "query.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    log.info("wrote %s", path)
    result["json"] = str(path)
    return result
