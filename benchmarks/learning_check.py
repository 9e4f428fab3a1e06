"""Real-data learning check (issue 18): does training stay stable and learn on real nuScenes lidar?

On the real fixture (scene-0916, 41 keyframes), the keyframes are split by time: the first
`--train-keyframes` become a scene of their own ("scene-0916-early"; no official split lists it,
so the cache files it under split "unknown") and the rest stay scene-0916 (split "val"). A
labels-only cache (`precompute --clip-model none`; the fixture's labels are box-derived, things
only) is fine-tuned from random weights (`finetune --checkpoint none`) with the defaults at batch
8 and at batch 4, and, for comparison, with the behaviour before issue 18 (`--head-input raw
--warmup-steps 0 --lr-scaling none`). Recorded per run: mean loss per epoch, the largest epoch
mean over the first epoch's (the check: no spike above 2x), divergence events, and the per-class
IoU on the held-out keyframes for the classes that appear there. With `--train-scans N > 0` the
same for `train` (stage two) on a cache with a random-weights ViT-B-16 teacher over the first N
training keyframes. Curves: `clip2scene plot` of every run, copied to docs/img/.

    .venv/bin/python benchmarks/learning_check.py                       # the issue's settings (long on CPU)
    .venv/bin/python benchmarks/learning_check.py --epochs 6 --channels 16,16,32,64,128,128,64,48,48

This is a benchmark, not a test: it takes minutes to hours on a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REAL_ROOT, REPO, parse_channels, real_available, setup_process, table  # noqa: E402
from _report import publish  # noqa: E402

TITLE = "Real-data learning check: fine-tune / train stability on real nuScenes keyframes (issue 18)"
BEFORE = dict(head_input="raw", warmup_steps=0, lr_scaling="none")  # the behaviour before issue 18
VARIANTS = {  # name -> (batch size, FinetuneConfig overrides)
    "default-b8": (8, {}),
    "default-b4": (4, {}),
    "before-b8": (8, BEFORE),
    "before-b4": (4, BEFORE),
}


def split_by_time(dst: Path, train_keyframes: int) -> Path:
    """A dataroot at `dst` that is the fixture with scene-0916 cut in two by time (symlinked data,
    rewritten scene.json / sample.json)."""
    src = REAL_ROOT
    dst.mkdir(parents=True)
    for name in ("samples", "sweeps", "lidarseg", "maps"):
        if (src / name).exists():
            os.symlink(src / name, dst / name)
    (dst / "v1.0-mini").mkdir()
    for f in (src / "v1.0-mini").iterdir():
        if f.name not in ("scene.json", "sample.json"):
            os.symlink(f, dst / "v1.0-mini" / f.name)
    scenes = json.loads((src / "v1.0-mini" / "scene.json").read_text())
    samples = json.loads((src / "v1.0-mini" / "sample.json").read_text())
    by_token = {s["token"]: s for s in samples}
    scene = scenes[0]
    chain, token = [], scene["first_sample_token"]
    while token:
        chain.append(by_token[token])
        token = by_token[token]["next"]
    if not 0 < train_keyframes < len(chain):
        raise SystemExit(f"--train-keyframes {train_keyframes}: must lie in 1..{len(chain) - 1}")
    early = dict(scene, token=hashlib.md5(b"scene-0916-early").hexdigest(), name=scene["name"] + "-early",
                 nbr_samples=train_keyframes, first_sample_token=chain[0]["token"],
                 last_sample_token=chain[train_keyframes - 1]["token"])
    late = dict(scene, nbr_samples=len(chain) - train_keyframes, first_sample_token=chain[train_keyframes]["token"])
    for s in chain[:train_keyframes]:
        s["scene_token"] = early["token"]
    chain[train_keyframes - 1]["next"] = ""
    chain[train_keyframes]["prev"] = ""
    (dst / "v1.0-mini" / "scene.json").write_text(json.dumps([early, late] + scenes[1:]))
    (dst / "v1.0-mini" / "sample.json").write_text(json.dumps(samples))
    return dst


def truth_counts(cache, split: str) -> dict[str, int]:
    """Labelled points per evaluation class over a split's scans."""
    names = cache.eval_class_names
    counts = np.zeros(len(names) + 1, np.int64)
    for i in cache.indices(split):
        counts += np.bincount(cache.read_scan(int(i)).label, minlength=len(names) + 1)[: len(names) + 1]
    return {n: int(c) for n, c in zip(names, counts[1:])}


def plot(run: Path, img_dir: Path, name: str) -> str:
    """`clip2scene plot RUN` (the CLI, as a user runs it); the PNG copied to docs/img/."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "clip2scene.cli", "plot", str(run), "--no-confusion"], check=True,
                   capture_output=True, env=env)
    img_dir.mkdir(parents=True, exist_ok=True)
    dst = img_dir / f"learning_check_{name}.png"
    shutil.copy(run / "training_curves.png", dst)
    return str(dst.relative_to(REPO))


def spike(losses: list[float]) -> float:
    """Largest epoch mean over the first epoch's mean (the issue's check: <= 2)."""
    return max(losses) / losses[0]


def step_spike(run: Path) -> str:
    """Largest step loss over the first step's, with its step (metrics.jsonl): a first epoch that
    is itself diverged hides behind `spike`, not behind this."""
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    worst = int(np.argmax(losses))
    return f"{losses[worst] / losses[0]:.2f} (step {worst + 1})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-keyframes", type=int, default=30, help="first N keyframes (by time) train, the rest are held out")
    ap.add_argument("--epochs", type=int, default=24, help="fine-tuning epochs (recipe: 24)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--channels", default=None, help="9 SPVCNN widths (default: the paper's)")
    ap.add_argument("--train-scans", type=int, default=30, help="keyframes of the teacher cache for `train` (0 = skip)")
    ap.add_argument("--train-epochs", type=int, default=20, help="`train` epochs (recipe: 20)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args()
    setup_process()
    if not real_available():
        raise SystemExit(f"this check needs the real fixture {REAL_ROOT}")
    from clip2scene.precompute.teacher.config import TeacherConfig
    from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
    from clip2scene.storage import open_cache
    from clip2scene.train.finetune import FinetuneConfig, finetune
    from clip2scene.train.nets import ModelConfig
    from clip2scene.train.trainer import TrainConfig, train

    model = ModelConfig(arch="spvcnn", **({"channels": parse_channels(args.channels)} if args.channels else {}))
    tmp = Path(tempfile.mkdtemp(prefix="learning_check_"))
    img = REPO / "docs" / "img"
    lines, ratio = [], []
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    try:
        root = split_by_time(tmp / "root", args.train_keyframes)
        cache_path = tmp / "labels.zarr"
        run_precompute(PrecomputeConfig(dataroot=root, out=str(cache_path), version="v1.0-mini", sweeps=1,
                                        teacher=None), progress=False)
        cache = open_cache(cache_path)
        counts = truth_counts(cache, "val")
        present = [n for n, c in counts.items() if c > 0]
        n_train, n_val = len(cache.indices("unknown")), len(cache.indices("val"))
        rows, iou_rows, results = [], [], {}
        for name in [v for v in args.variants.split(",") if v]:
            batch, over = VARIANTS[name]
            t0 = time.perf_counter()
            r = finetune(FinetuneConfig(cache=str(cache_path), out=str(tmp / name), checkpoint=None, split="unknown",
                                        eval_split="val", epochs=args.epochs, batch_size=batch, model=model,
                                        device=args.device, **over), progress=False)
            results[name] = r
            s = spike(r["epoch_losses"])
            sched = r["schedule"]
            rows.append([name, batch, f"{sched['effective_lr']:g} / {sched['head_lr']:g}", sched["warmup_steps"],
                         over.get("head_input", "l2"), " ".join(f"{v:.3g}" for v in r["epoch_losses"]),
                         f"{s:.2f}", "yes" if s <= 2 else "NO", step_spike(tmp / name), r["divergences"],
                         f"{time.perf_counter() - t0:.0f}"])
            iou_rows.append([name] + [("n/a" if r["per_class_iou"][c] is None else f"{100 * r['per_class_iou'][c]:.1f}")
                                      for c in present] + [f"{100 * r['miou']:.1f}" if r["miou"] is not None else "n/a"])
            rows[-1].append(plot(tmp / name, img, name))
            print(f"{name}: epoch losses {r['epoch_losses']}, IoU {r['per_class_iou']}", flush=True)
        lines += [f"Fine-tuning from random weights (`finetune --checkpoint none`), labels-only cache: "
                  f"{n_train} training keyframes (the first by time), {n_val} held out; "
                  f"{args.epochs} epochs, SPVCNN {'widths ' + args.channels if args.channels else 'default widths'}.", ""]
        lines += table(["run", "batch", "lr backbone / head", "warm-up steps", "head input", "mean loss per epoch",
                        "max / first epoch", "<= 2x", "max / first step", "divergences", "seconds", "curves"], rows)
        lines += ["", f"Per-class IoU (%) on the {n_val} held-out keyframes, classes with labelled points there "
                      f"({', '.join(f'{c} {counts[c]:,}' for c in present)} points):", ""]
        lines += table(["run"] + present + ["mIoU (these classes)"], iou_rows)
        if args.train_scans > 0:
            tcache = tmp / "teacher.zarr"
            t0 = time.perf_counter()
            run_precompute(PrecomputeConfig(dataroot=root, out=str(tcache), version="v1.0-mini", sweeps=1,
                                            split="unknown", limit=args.train_scans, teacher=TeacherConfig(model="ViT-B-16", weights="none"),
                                            device=args.device), progress=False)
            tp = time.perf_counter() - t0
            tsplit = "unknown"
            t0 = time.perf_counter()
            s = train(TrainConfig(cache=str(tcache), out=str(tmp / "train"), split=tsplit, epochs=args.train_epochs,
                                  model=model, device=args.device), progress=False)
            metrics = [json.loads(x) for x in (tmp / "train" / "metrics.jsonl").read_text().splitlines()]
            per_epoch = {}
            for m in metrics:
                for k in ("scr", "ssr", "switched"):
                    if k in m:
                        per_epoch.setdefault(k, {}).setdefault(m["epoch"], []).append(m[k])
            sp = spike(s["epoch_losses"])
            s3_from = min((e for e in per_epoch.get("switched", {})), default=None)
            lines += ["", f"`train` (stage two, SCR + SSR, S3 from epoch {s3_from}) on a cache of the "
                          f"first {args.train_scans} keyframes with a RANDOM-weights ViT-B-16 teacher (precompute "
                          f"{tp:.0f} s), batch {s['schedule']['batch_size']}, lr {s['schedule']['effective_lr']:g}, "
                          f"warm-up {s['schedule']['warmup_steps']} steps, {args.train_epochs} epochs "
                          f"({time.perf_counter() - t0:.0f} s):", ""]
            trow = [["loss"] + [f"{v:.3f}" for v in s["epoch_losses"]]]
            for k, d in per_epoch.items():
                trow.append([k] + [f"{np.mean(d[e]):.3f}" if e in d else "-" for e in range(1, args.train_epochs + 1)])
            lines += table(["epoch"] + [str(e) for e in range(1, args.train_epochs + 1)], trow)
            lines += ["", f"max / first epoch {sp:.2f} ({'<= 2x' if sp <= 2 else 'ABOVE 2x'}), max / first step "
                          f"{step_spike(tmp / 'train')}, divergences "
                          f"{s['divergences']}; curves {plot(tmp / 'train', img, 'train')}"]
            ratio.append(f"train max/first {sp:.2f}")
        load1 = os.getloadavg()
        lines += ["", f"- wall time {time.perf_counter() - t_start:.0f} s; load average (1 min) {load0[0]:.1f} at start, "
                      f"{load1[0]:.1f} at end (other processes share the cores)",
                  "- labels: the fixture's lidarseg labels are derived from the 3D boxes (things only; stuff is ignore)",
                  "- split: keyframes by time; the first part is re-filed as scene 'scene-0916-early' (split "
                  "'unknown'), the rest keep scene-0916 (split 'val')",
                  "- 'before' = `--head-input raw --warmup-steps 0 --lr-scaling none`, the behaviour before issue 18"]
        for name, r in reversed(list(results.items())):
            miou = "n/a" if r["miou"] is None else f"{100 * r['miou']:.1f}"
            ratio.insert(0, f"{name} max/first {spike(r['epoch_losses']):.2f} mIoU {miou}")
        publish(TITLE, lines, "RATIO " + "; ".join(ratio), report=not args.no_report, device=args.device)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
