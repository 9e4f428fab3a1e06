"""Scans/s the training DataLoader delivers from a cache vs scans/s the training step consumes.

The loader is the one `train` builds (clip2scene.train.loop.make_loader: spawned workers, as configured there;
EpochSampler; ScanDataset with features=True, as SSR reads them; augmentation on; collate),
reading a cache of the first --scans keyframes
- from a local folder, and
- from S3 served by moto on loopback (ThreadedMotoServer on 127.0.0.1, the cache uploaded with
  s3fs; open_cache(url, storage_options={"client_kwargs": {"endpoint_url": ...}})),
each with 0 and 2 worker processes. The consumer only touches the batches. Each configuration
runs two epochs of --reads scans: the first is the warm-up (worker start-up, imports, first store
opens; its first-batch latency is shown), the second is timed: steady rate = its scans / its time
(with persistent workers, as `train` uses, no worker starts again; the rate over both epochs is
shown too). The step rate is B / median time of the student step (voxelize +
forward + SCR/SSR + backward + SGD) on pre-loaded batches of the same cache.

Every measurement runs in its own interpreter (--variant re-invocation).

    .venv/bin/python benchmarks/loader.py [--scans 8 --reads 24 --batch 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _report import publish  # noqa: E402

TITLE = "Training DataLoader throughput (local folder and S3 on loopback) vs training step"


def _storage_options(endpoint: str | None) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def run_loader(args) -> None:
    C.setup_process()
    from clip2scene.storage import open_cache

    cache = open_cache(args.url, _storage_options(args.endpoint))
    reps = max(1, -(-args.reads // len(cache.indices())))
    ds = C.scan_dataset(cache, np.tile(cache.indices(), reps)[: args.reads], augment=True, features=True)
    loader = C.train_loader(ds, args.batch, args.workers, args.device)
    persistent = bool(getattr(loader, "persistent_workers", False))

    def epoch(e: int):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(e)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(e)
        t0 = time.perf_counter()
        n, nbytes, t_first = 0, 0, None
        for batch in loader:
            if t_first is None:
                t_first = time.perf_counter() - t0
            n += len(batch["index"])
            nbytes += sum(v.nbytes for v in batch.values() if hasattr(v, "nbytes"))
        return n, time.perf_counter() - t0, t_first, nbytes

    n0, s0, first0, _ = epoch(0)  # warm-up epoch: worker start-up, imports, first opens
    n1, s1, first1, nbytes = epoch(1)  # timed epoch
    C.emit(dict(scans=n1, first_s=first0, warm_s=s0, timed_s=s1, steady=n1 / s1, overall=(n0 + n1) / (s0 + s1),
                mb_per_scan=nbytes / n1 / 1e6, loader="loop.make_loader", persistent=persistent, peak_rss_mb=C.peak_rss_mb()))


def run_step(args) -> None:
    C.setup_process()
    from clip2scene.storage import open_cache
    from clip2scene.train.data import collate

    cache = open_cache(args.url)
    ds = C.scan_dataset(cache, cache.indices(), augment=True, features=True)
    batches = [collate([ds[(i * args.batch + j) % len(ds)] for j in range(args.batch)])
               for i in range(args.warmup + args.steps)]
    student = C.StudentStep(cache.text_embeddings, len(cache.point_features), cache.voxel_size, args.device,
                            C.parse_channels(args.channels), workdir=args.tmp)
    times = []
    for i, b in enumerate(batches):
        C.sync(args.device)
        t0 = time.perf_counter()
        student(b)
        C.sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    C.emit(dict(step_s=times, scans_per_s=args.batch / C.median(times), parameters=student.parameters,
                peak_rss_mb=C.peak_rss_mb()))


def start_s3(local: Path):
    """moto S3 on 127.0.0.1 with the cache uploaded; (server, endpoint, url) or (None, reason, None)."""
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        return None, f"S3 rows skipped: {e.name} is not installed", None
    for k, v in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1").items():
        os.environ[k] = v  # this process and its children only; moto accepts any key
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("bench")
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(f), f"bench/cache.zarr/{f.relative_to(local).as_posix()}")
    return server, endpoint, "s3://bench/cache.zarr"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=8, help="keyframes in the cache")
    ap.add_argument("--reads", type=int, default=24, help="scans per epoch (2 epochs: warm-up + timed)")
    ap.add_argument("--batch", type=int, default=2, help="scans per batch (loader and step)")
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts to measure")
    ap.add_argument("--sweeps", type=int, default=3, help="K lidar frames per scan in the cache")
    ap.add_argument("--steps", type=int, default=2, help="timed student steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed student steps first")
    ap.add_argument("--channels", default=None, help="9 SPVCNN widths (default: the model's default widths)")
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) rows")
    ap.add_argument("--cache", default=None, help="use this existing local cache instead of building one "
                                                  "(e.g. the same keyframes under two cache schemas)")
    ap.add_argument("--data", default="auto", choices=["auto", "real", "synthetic"])
    ap.add_argument("--synthetic-size", default="800x450", help="WxH of synthetic cameras (fallback data)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--keep-tmp", action="store_true")
    # child-only
    ap.add_argument("--variant", choices=["loader", "step"], help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp", help=argparse.SUPPRESS)
    ap.add_argument("--nworkers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant == "loader":
        args.workers = args.nworkers
        return run_loader(args)
    if args.variant == "step":
        return run_step(args)

    C.setup_process()
    tmp = Path(tempfile.mkdtemp(prefix="c2s-bench-loader-"))
    server = None
    rows, notes = [], []
    try:
        w, h = (int(x) for x in args.synthetic_size.lower().split("x"))
        data = C.pick_data(args.data, tmp, args.scans, args.sweeps, (w, h))
        print(f"[setup] {data.note}", flush=True)
        t0 = time.perf_counter()
        local = tmp / "cache.zarr"
        if args.cache:
            from clip2scene.storage import open_cache

            shutil.copytree(args.cache, local)
            meta = open_cache(local).meta
        else:
            meta, _ = C.build_cache(data, local, args.sweeps, args.scans, device=args.device)
        print(f"[setup] cache of {meta['num_scans']} scans built in {time.perf_counter() - t0:.1f}s", flush=True)
        sources = [("local", str(local), None)]
        if not args.no_s3:
            server, endpoint, url = start_s3(local)
            if server is None:
                notes.append(f"- {endpoint}")
            else:
                sources.append(("s3 (moto, loopback)", url, endpoint))
        step = C.run_child(__file__, ["--variant", "step", "--url", str(local), "--batch", str(args.batch),
                                      "--steps", str(args.steps), "--warmup", str(args.warmup), "--device",
                                      args.device, "--tmp", str(tmp)]
                           + (["--channels", args.channels] if args.channels else []))
        print(f"[run] step: {step['scans_per_s']:.3f} scans/s", flush=True)
        for name, url, endpoint in sources:
            for nw in [int(x) for x in args.workers.split(",")]:
                r = C.run_child(__file__, ["--variant", "loader", "--url", url, "--nworkers", str(nw), "--batch",
                                           str(args.batch), "--reads", str(args.reads), "--device", args.device]
                                + (["--endpoint", endpoint] if endpoint else []))
                print(f"[run] {name} workers={nw}: {r['steady']:.2f} scans/s", flush=True)
                rows.append((name, nw, r))
    finally:
        if server is not None:
            server.stop()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    step_rate = step["scans_per_s"]
    table_rows = [[name, nw, r["scans"], f"{r['steady']:.2f}", f"{r['overall']:.2f}", f"{r['first_s']:.2f}",
                   f"{r['mb_per_scan']:.1f}", f"{r['steady'] / step_rate:.1f}x", r["peak_rss_mb"]]
                  for name, nw, r in rows]
    table_rows.append(["training step (consumer)", "", args.batch * args.steps, f"{step_rate:.3f}", "", "", "", "1.0x",
                       step["peak_rss_mb"]])
    lines = C.table(["source", "workers", "scans", "scans/s (timed epoch)", "scans/s (both epochs)",
                     "first batch s (cold)", "MB/scan decoded", "loader / step", "peak RSS MB"], table_rows)
    worst_name, worst_nw, worst = min(rows, key=lambda x: x[2]["steady"])
    ratio = worst["steady"] / step_rate
    lines += [
        "",
        f"- loader built by {rows[0][2]['loader']}; batch {args.batch}; ScanDataset(features=True, augment=True); "
        f"cache of {meta['num_scans']} scans (schema {meta.get('schema_version')}, "
        f"{meta.get('num_visible', meta.get('num_pairs', 0)) / max(meta['num_scans'], 1):,.0f} visible "
        f"points per scan) read {args.reads} times per epoch in shuffled order; worker processes "
        f"{'persist across epochs' if any(r.get('persistent') for _, _, r in rows) else 'restart every epoch'}",
        f"- step: SPVCNN {'default widths' if not args.channels else args.channels} "
        f"({step['parameters'] / 1e6:.2f}M parameters), SCR + SSR, B = {args.batch}, median of {args.steps} steps "
        f"after {args.warmup} warm-up: {C.median(step['step_s']):.2f} s/step",
        f"- slowest loader configuration: {worst_name}, workers={worst_nw}: {worst['steady']:.2f} scans/s = "
        f"{ratio:.1f}x what the step consumes (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})",
        "- the loader runs alone here; during training its workers share this machine's cores with the step",
        "- peak RSS = VmHWM of the measuring process only (DataLoader worker processes are not included)",
        f"- {data.note}",
    ] + notes
    ratio_line = (f"RATIO loader scans/s / step scans/s = {ratio:.1f}x (slowest loader: {worst_name}, workers="
                  f"{worst_nw}, {worst['steady']:.2f} scans/s; step {step_rate:.3f} scans/s; target >= 3x)")
    publish(TITLE, lines, ratio_line, report=not args.no_report, device=args.device)


if __name__ == "__main__":
    main()
