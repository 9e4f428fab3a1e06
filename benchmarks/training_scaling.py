"""Student step time vs points per scan (1x, 2x, 4x) and vs lidar frames per scan (K = 1, 3, 5).

One training step of the SPVCNN student (voxelize + forward + SCR/SSR loss + backward + SGD
step) on a batch collated once (reading and collating are outside the timing; see loader.py):

- points series: B scans of the real keyframes (or the synthetic fallback at K=1), each scan's
  points duplicated 1x / 2x / 4x with Gaussian jitter (--jitter metres, default half a voxel),
  camera-visible points and their cached teacher features duplicated with them: a denser lidar
  with the same scene;
- sweeps series: a synthetic sample with 4 sweeps before each keyframe, cached with sweeps=5,
  trained with TrainConfig.sweeps = 1, 3, 5 (ScanDataset keeps the first K lidar frames).

Every setting runs in its own interpreter (--variant re-invocation) for a clean peak RSS.

    .venv/bin/python benchmarks/training_scaling.py [--batch 1 --steps 2 --warmup 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _report import publish  # noqa: E402

TITLE = "Student training step vs points per scan and lidar frames per scan"
FACTORS = (1, 2, 4)
SWEEPS = (1, 3, 5)


def duplicate(item: dict, factor: int, jitter: float, rng: np.random.Generator) -> dict:
    """The scan with every point repeated `factor` times (copies jittered), pairs repeated too."""
    import torch

    if factor == 1:
        return item
    n = len(item["xyz"])
    out = dict(item)
    noise = [torch.zeros_like(item["xyz"])] + [
        torch.from_numpy(rng.normal(0.0, jitter, item["xyz"].shape).astype(np.float32)) for _ in range(factor - 1)]
    out["xyz"] = torch.cat([item["xyz"] + e for e in noise])
    for k in ("feat", "target", "label", "visible", "pair_logits", "pair_features"):
        if k in item:
            out[k] = torch.cat([item[k]] * factor)
    out["pair_point"] = torch.cat([item["pair_point"] + j * n for j in range(factor)])
    return out


def run_variant(args) -> None:
    C.setup_process()
    import torch

    from clip2scene.storage import open_cache
    from clip2scene.train.data import collate

    if args.threads:
        torch.set_num_threads(args.threads)
    cache = open_cache(args.cache)
    ds = C.scan_dataset(cache, cache.indices()[: args.batch], augment=True, features=True, sweeps=args.k)
    rng = np.random.default_rng(0)
    batch = collate([duplicate(ds[i], args.factor, args.jitter, rng) for i in range(len(ds))])
    student = C.StudentStep(cache.text_embeddings, len(cache.point_features), cache.voxel_size, args.device,
                            C.parse_channels(args.channels), workdir=args.tmp, sweeps=args.k)
    voxels = student.num_voxels(batch)
    rss_setup = C.peak_rss_mb()
    C.reset_gpu_peak(args.device)
    times = []
    for i in range(args.warmup + args.steps):
        C.sync(args.device)
        t0 = time.perf_counter()
        student(batch)
        C.sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    C.emit(dict(step_s=times, points=int(batch["xyz"].shape[0]), pairs=int(batch["pair_point"].shape[0]),
                voxels=voxels, peak_rss_mb=C.peak_rss_mb(), setup_rss_mb=rss_setup,
                gpu_peak_mb=C.gpu_peak_mb(args.device), parameters=student.parameters))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1, help="B scans per step")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per setting (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--jitter", type=float, default=0.05, help="std of the duplicated points' offset, metres")
    ap.add_argument("--channels", default=None, help="9 SPVCNN widths (default: the model's default widths)")
    ap.add_argument("--data", default="auto", choices=["auto", "real", "synthetic"],
                    help="data of the points series (the sweeps series is always synthetic)")
    ap.add_argument("--synthetic-size", default="400x225", help="WxH of synthetic cameras (only the teacher sees them)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--keep-tmp", action="store_true")
    # child-only
    ap.add_argument("--variant", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--factor", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return run_variant(args)

    C.setup_process()
    tmp = Path(tempfile.mkdtemp(prefix="c2s-bench-scaling-"))
    try:
        w, h = (int(x) for x in args.synthetic_size.lower().split("x"))
        t0 = time.perf_counter()
        syn = C.pick_data("synthetic", tmp, args.batch, max(SWEEPS), (w, h))
        C.build_cache(syn, tmp / "sweeps.zarr", max(SWEEPS), args.batch, device=args.device)
        points_cache, points_k, points_note = tmp / "sweeps.zarr", 1, syn.note + " (lidar frame 0 only)"
        if args.data != "synthetic" and C.real_available():
            real = C.pick_data("real", tmp, args.batch, 1)
            C.build_cache(real, tmp / "points.zarr", 1, args.batch, device=args.device)
            points_cache, points_k, points_note = tmp / "points.zarr", None, real.note
        elif args.data == "real":
            raise SystemExit(f"--data real: {C.REAL_ROOT} is missing")
        print(f"[setup] caches built in {time.perf_counter() - t0:.1f}s", flush=True)
        common = ["--variant", "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--jitter", str(args.jitter), "--device", args.device, "--threads", str(args.threads),
                  "--tmp", str(tmp)] + (["--channels", args.channels] if args.channels else [])
        results = []
        for f in FACTORS:
            r = C.run_child(__file__, common + ["--cache", str(points_cache), "--factor", str(f)]
                            + (["--k", str(points_k)] if points_k else []))
            results.append(("points", f"{f}x points", r))
            print(f"[run] points {f}x: {C.median(r['step_s']):.2f}s/step", flush=True)
        for k in SWEEPS:
            r = C.run_child(__file__, common + ["--cache", str(tmp / "sweeps.zarr"), "--k", str(k)])
            results.append(("sweeps", f"K={k}", r))
            print(f"[run] sweeps K={k}: {C.median(r['step_s']):.2f}s/step", flush=True)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    gpu = results[0][2].get("gpu_peak_mb") is not None
    base = {s: C.median(next(r for ss, _, r in results if ss == s)["step_s"]) for s in ("points", "sweeps")}
    rows = []
    for series, setting, r in results:
        t = C.median(r["step_s"])
        rows.append([series, setting, r["points"], r["voxels"], r["pairs"], t * 1e3, f"{t / base[series]:.2f}",
                     r["points"] / t, r["peak_rss_mb"]] + ([r["gpu_peak_mb"]] if gpu else []))
    headers = ["series", "setting", "points/step", "voxels/step", "visible points/step", "ms/step (median)",
               "time vs first", "points/s", "peak RSS MB"] + (["GPU peak alloc MB"] if gpu else [])
    t1 = C.median(results[0][2]["step_s"])
    t4 = C.median(results[2][2]["step_s"])
    lines = C.table(headers, rows)
    lines += [
        "",
        f"- B = {args.batch} scan(s) per step; SPVCNN {'default widths' if not args.channels else args.channels}, "
        f"{results[0][2]['parameters'] / 1e6:.2f}M parameters; SCR + SSR; {args.steps} timed steps after "
        f"{args.warmup} warm-up, each setting in its own process; reading/collating not timed",
        f"- points series: {points_note}; 2x/4x = every point repeated with N(0, {args.jitter} m) jitter (voxel "
        "0.1 m), pairs and teacher features repeated with it",
        f"- sweeps series: {syn.note}; cached with sweeps=5, TrainConfig.sweeps = K selects the first K frames",
        "- peak RSS = VmHWM (high-water resident set) of the setting's own process",
    ]
    ratio_line = f"RATIO time(4x points)/time(1x) = {t4 / t1:.2f} ({t4 * 1e3:,.0f} ms vs {t1 * 1e3:,.0f} ms per step)"
    publish(TITLE, lines, ratio_line, report=not args.no_report, device=args.device)


if __name__ == "__main__":
    main()
