"""The CLIP2Scene ablation table (paper Table 3) as runs of our trainer on a cache.

Each row is a TrainConfig variant trained from the same cache (or, for the prompt-set rows, from
a cache precomputed with another prompt class set) and evaluated annotation-free on the val
split; the result is one table (Markdown + JSON) beside the paper's numbers.

    rows = ablation_rows(base_config, cache_sweeps=5)
    results = run_ablation(base_config, out="runs/ablate", prompt_caches={"cityscapes": "c.zarr"})

CLI: `clip2scene ablate --cache Z --out runs/ablate [--prompt-cache cityscapes=PATH ...]`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from clip2scene.storage import open_cache
from clip2scene.train.evaluate import EvalConfig, evaluate
from clip2scene.train.trainer import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AblationRow:
    name: str  # row label in the table
    paper_miou: float | None  # the paper's nuScenes val mIoU for this row (Table 3), if any
    changes: dict  # TrainConfig fields that differ from the full method
    cache: str | None = None  # another cache (prompt-set rows); None = the base cache


def ablation_rows(cache_sweeps: int, prompt_caches: dict[str, str] | None = None,
                  views: str = "border") -> list[AblationRow]:
    """Rows of Table 3 that the cache supports (sweep rows need that many cached sweeps), plus the
    other teacher-view rule than the base config's `views` (border: farthest from the image
    border, as the paper; mean: all views averaged, as OpenScene)."""
    other = "mean" if views == "border" else "border"
    rows = [
        AblationRow(f"full: SCR + SSR + S3 (views: {views})", 20.8 if views == "border" else None, {}),
        AblationRow(f"views: {other}", 20.8 if other == "border" else None, dict(views=other)),
        AblationRow("SCR only, 1 sweep", 15.1, dict(ssr_weight=0.0, self_training="off", sweeps=1)),
        AblationRow("without SSR", 19.8, dict(ssr_weight=0.0)),
        AblationRow("without S3", 18.8, dict(self_training="off")),
        AblationRow("KL instead of SCR", 0.0, dict(scr_weight=0.0, ssr_weight=0.0, kl_weight=1.0, self_training="off")),
        AblationRow("S3 switching whole batches (released code)", None, dict(self_training="batch")),
    ]
    for k, paper in ((1, 18.7), (3, 20.8), (5, 20.6)):
        if k <= cache_sweeps:
            rows.append(AblationRow(f"{k} sweep{'s' if k > 1 else ''}", paper, dict(sweeps=k)))
        else:
            log.warning("skipping the %d-sweep row: the cache holds %d lidar frames per scan", k, cache_sweeps)
    paper_prompts = {"semantickitti": 13.9, "cityscapes": 11.3, "all": 15.3}
    for name, path in (prompt_caches or {}).items():
        rows.append(AblationRow(f"prompts: {name}", paper_prompts.get(name), {}, cache=str(path)))
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def run_ablation(base: TrainConfig, out: str | Path, prompt_caches: dict[str, str] | None = None,
                 split: str = "val", progress: bool = True) -> list[dict]:
    """Train and evaluate every row; writes out/ablation.md and out/ablation.json; returns the rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_sweeps = int(open_cache(base.cache, base.storage_options).meta["sweeps"])
    results = []
    for row in ablation_rows(cache_sweeps, prompt_caches, base.views):
        run_dir = out / _slug(row.name)
        cfg = replace(base, out=str(run_dir), cache=row.cache or base.cache, **row.changes)
        log.info("ablation row %r -> %s", row.name, run_dir)
        summary = train(cfg, progress=progress)
        result = evaluate(EvalConfig(checkpoint=summary["checkpoint"], cache=cfg.cache, split=split,
                                     device=base.device), progress=progress)
        results.append(dict(row=row.name, miou=result["miou"], teacher_miou_visible=result["teacher_miou_visible"],
                            paper_miou=row.paper_miou, run=str(run_dir), changes=row.changes, cache=cfg.cache,
                            final_loss=summary["epoch_losses"][-1]))
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    (out / "ablation.md").write_text(format_table(results))
    return results


def _pct(v) -> str:
    """A fraction as a percentage with one decimal, n/a for None."""
    return "n/a" if v is None else f"{100 * v:.1f}"


def format_table(results: list[dict]) -> str:
    """Markdown table: row, our mIoU, the paper's mIoU (nuScenes val, real CLIP weights)."""
    lines = ["| row | mIoU (ours) | mIoU (paper, nuScenes val) |", "|---|---|---|"]
    for r in results:
        paper = "-" if r["paper_miou"] is None else f"{r['paper_miou']:.1f}"
        lines.append(f"| {r['row']} | {_pct(r['miou'])} | {paper} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- teachers
def _teacher_label(fp: dict) -> str:
    """'clearclip ViT-L-14 window 448x448/224x224 +PAMR' from a cache's teacher fingerprint."""
    label = f"{fp.get('teacher', 'maskclip')} {fp.get('model', '?')}"
    if fp.get("window"):
        label += f" window {'x'.join(map(str, fp['window']))}/{'x'.join(map(str, fp['stride']))}"
    return label + (" +PAMR" if fp.get("pamr") else "")


def run_teacher_comparison(base: TrainConfig, caches: dict[str, str], out: str | Path, split: str = "val",
                           progress: bool = True) -> list[dict]:
    """The same student trained on each teacher's cache and evaluated: one row per teacher.

    ``caches``: row name -> cache of the same scans and prompt classes precomputed with another
    teacher (``precompute --teacher ... --clip-model ... --window ...``). Each row reports the
    teacher's own mIoU on the camera-visible points and the distilled student's mIoU on all
    points of ``split``. Writes out/teachers.md and out/teachers.json; returns the rows.

    Raises:
        CacheError: a cache without teacher outputs, or caches of other scans or classes than
            the first (the comparison would not be like for like).
    """
    from clip2scene.errors import CacheError

    if not caches:
        raise CacheError("compare-teachers needs at least one cache")
    out = Path(out)
    opened = {name: open_cache(path, base.storage_options) for name, path in caches.items()}
    first_name, first = next(iter(opened.items()))
    for name, cache in opened.items():
        if not cache.has_teacher:
            raise CacheError(f"cache {cache.path} ({name}) has no teacher outputs (built with --clip-model none)")
        if cache.class_names != first.class_names:
            raise CacheError(f"cache {cache.path} ({name}) has classes {cache.class_names}, "
                             f"{first.path} ({first_name}) has {first.class_names}: not comparable")
        if sorted(cache.token.tolist()) != sorted(first.token.tolist()):
            raise CacheError(f"cache {cache.path} ({name}) holds other scans than {first.path} ({first_name}): "
                             "precompute every teacher on the same data")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, cache in opened.items():
        run_dir = out / _slug(name)
        cfg = replace(base, out=str(run_dir), cache=caches[name])
        log.info("teacher %r (%s) -> %s", name, _teacher_label(cache.fingerprint), run_dir)
        summary = train(cfg, progress=progress)
        result = evaluate(EvalConfig(checkpoint=summary["checkpoint"], cache=cfg.cache, split=split,
                                     device=base.device), progress=progress)
        fp = cache.fingerprint
        results.append(dict(row=name, teacher=_teacher_label(fp), variant=fp.get("teacher", "maskclip"),
                            model=fp.get("model"), window=fp.get("window"), stride=fp.get("stride"),
                            pamr=bool(fp.get("pamr", False)), teacher_miou_visible=result["teacher_miou_visible"],
                            miou=result["miou"], random_weights=fp.get("weights_sha256") == "random",
                            cache=cfg.cache, run=str(run_dir), split=split))
    (out / "teachers.json").write_text(json.dumps(results, indent=2))
    (out / "teachers.md").write_text(format_teacher_table(results))
    return results


def format_teacher_table(results: list[dict]) -> str:
    """Markdown table: row, teacher, teacher mIoU (camera-visible points), student mIoU (all points)."""
    lines = ["| row | teacher | teacher mIoU (visible points) | student mIoU |", "|---|---|---|---|"]
    for r in results:
        note = " (random weights)" if r.get("random_weights") else ""
        lines.append(f"| {r['row']} | {r['teacher']}{note} | {_pct(r['teacher_miou_visible'])} | {_pct(r['miou'])} |")
    return "\n".join(lines) + "\n"
