"""The ablation rows (paper Table 3: SCR only, without SSR, without S3, KL, S3 whole-batch, sweeps,
views) on the simulated teacher, at the demo's setting (issue 15): does SSR / S3 help against
structured, image-space teacher errors?

Builds the demo's sample and simulated-teacher cache (or takes `--cache`), then runs
`clip2scene.train.ablate.run_ablation` with the demo's student and schedule (the demo preset, clip2scene/configs/demo.toml)
and appends the table to docs/benchmarks.md. About 80 s per row on 2 CPU cores.

    .venv/bin/python benchmarks/simulated_ablation.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup_process  # noqa: E402
from _report import publish  # noqa: E402


def build_demo_cache(work: Path) -> Path:
    """The demo's sample and its simulated-teacher cache under `work`."""
    from clip2scene.cli import DEMO_IMAGE_SIZE, DEMO_SAMPLE, DEMO_SWEEPS, _simulated_teacher_config
    from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
    from clip2scene.samples.nuscenes import SampleConfig, make_sample

    root = make_sample(work / "sample", SampleConfig(**DEMO_SAMPLE))
    cfg = PrecomputeConfig(dataroot=root, out=work / "cache.zarr", version="v1.0-mini", sweeps=DEMO_SWEEPS,
                           teacher=_simulated_teacher_config(DEMO_IMAGE_SIZE))
    run_precompute(cfg, progress=False)
    return cfg.out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="a simulated-teacher cache (default: build the demo's)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs per row (default: the demo's)")
    ap.add_argument("--no-report", action="store_true", help="print only, do not append to docs/benchmarks.md")
    args = ap.parse_args()
    setup_process()

    from clip2scene.cli import DEMO_BATCH, DEMO_EPOCHS, DEMO_LR, DEMO_TAU, demo_train_config
    from clip2scene.train.ablate import run_ablation

    with tempfile.TemporaryDirectory(prefix="c2s-simablate-") as tmp:
        work = Path(tmp)
        cache = args.cache or str(build_demo_cache(work))
        epochs = args.epochs or DEMO_EPOCHS
        base = demo_train_config(str(cache), str(work / "base"), epochs)  # the demo preset (configs/demo.toml)
        t0 = time.perf_counter()
        results = run_ablation(base, work / "ablate", split="val", progress=False)
        seconds = time.perf_counter() - t0
    teacher = results[0]["teacher_miou_visible"]
    lines = [f"Demo setting: simulated teacher, narrow SPVCNN, {epochs} epochs, batch {DEMO_BATCH}, lr {DEMO_LR}, "
             f"tau {DEMO_TAU}; val split; simulated teacher's own mIoU on camera-visible val points "
             f"{100 * teacher:.1f}. {len(results)} rows in {seconds:.0f} s.", "",
             "| row | student mIoU | minus teacher | paper (nuScenes val, real CLIP) |", "|---|---|---|---|"]
    for r in results:
        paper = "-" if r["paper_miou"] is None else f"{r['paper_miou']:.1f}"
        lines.append(f"| {r['row']} | {100 * r['miou']:.1f} | {100 * (r['miou'] - teacher):+.1f} | {paper} |")
    best = max(results, key=lambda r: r["miou"])
    headline = f"BEST ROW {best['row']}: {100 * best['miou']:.1f} mIoU vs simulated teacher {100 * teacher:.1f}"
    publish("Ablation rows on the simulated teacher (issue 15)", lines, headline, report=not args.no_report)


if __name__ == "__main__":
    main()
