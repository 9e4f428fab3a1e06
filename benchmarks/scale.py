"""Full dataset size without the data: what the readers, the planner, Dask workers, the cache
tools and the loader cost at nuScenes trainval scale (34,149 keyframes, 2.6 million sample_data
and ego_pose records), SemanticKITTI (43,552 scans) and ScanNet (1,513 scenes).

Phases (each measured in a fresh child process, so peak RSS is its own):
- tables:  `samples.scale` writes the metadata-scale dataroots (once; reused with --work).
- reader:  NuScenes(trainval) open time and peak RSS; listing all scans (K = 10); planning every
           block's task payload (`pipeline.block_payload`, 16 scans a block); the same for the
           SemanticKITTI and ScanNet trees.
- dask:    `run_precompute(workers=4, --clip-model none)` over the first --dask-scans scans of the
           trainval tables (real files: 34,720-point scans, K = 3): peak RSS of the coordinator
           and of every worker process (psutil, sampled every 0.2 s).
- cache:   a 34,149-scan labels-only cache written with the real writer (CacheWriter.append of
           tiny scans, `--scan-points` points each; no teacher outputs) as two halves A and B,
           then `cache info`, `verify` (with its up-front estimate) and `merge A B -> C`
           (~2,136 blocks); manifest size and commit time.
- loader:  start-up (open_cache + first batch) and scans/s of the training DataLoader over C,
           local and on S3 (moto on loopback, C written there by `merge`).

Timings on the shared 2-core machine depend on its load: every row carries the 1-minute load
average at its start and the process CPU seconds next to the wall time.

    python benchmarks/scale.py --work /tmp/scale            # everything (tens of minutes)
    python benchmarks/scale.py --work /tmp/scale --phases reader --no-report
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _report import publish  # noqa: E402

PHASES = ("reader", "dask", "cache", "loader")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _load() -> float:
    return os.getloadavg()[0]


class Timer:
    def __enter__(self):
        self.load, self.t0, self.c0 = _load(), time.perf_counter(), _cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t0, _cpu_s() - self.c0

    def row(self, **kw) -> dict:
        return dict(wall_s=round(self.wall, 2), cpu_s=round(self.cpu, 2), load=round(self.load, 1), **kw)


# ------------------------------------------------------------------------------------ children
def child_reader(args) -> dict:
    from clip2scene.precompute.datasets.nuscenes import NuScenes
    from clip2scene.precompute.pipeline import block_payload

    out = {}
    with Timer() as t:
        ds = NuScenes(args.nus, "v1.0-trainval")
    out["open"] = t.row(rss_mb=round(_common.peak_rss_mb()), sample_data_kept=len(ds._by_token["sample_data"]),
                        ego_pose_kept=len(ds._by_token["ego_pose"]))
    with Timer() as t:
        scans = ds.scans(sweeps=10)
    out["list"] = t.row(scans=len(scans))
    sizes = []
    with Timer() as t:
        for a in range(0, len(scans), 16):
            payload = block_payload(ds, scans[a:a + 16])
            if a % (16 * 64) == 0:
                sizes.append(len(pickle.dumps(payload)))
    out["plan"] = t.row(blocks=-(-len(scans) // 16), payload_kb=round(float(np.mean(sizes)) / 1024, 1))
    with Timer() as t:
        bad = sum(1 for s in scans if s.native.check() is None)
    out["check_all"] = t.row(bad=bad)
    out["peak_rss_mb"] = round(_common.peak_rss_mb())
    return out


def child_reader_other(args) -> dict:
    from clip2scene.precompute.pipeline import block_payload, open_dataset

    out = {}
    for name, root in (("semantickitti", args.kitti), ("scannet", args.scannet)):
        if not root or not Path(root).is_dir():
            continue
        with Timer() as t:
            ds = open_dataset(name, root)
            scans = ds.scans(sweeps=3)
        row = t.row(scans=len(scans))
        with Timer() as t:
            sizes = [len(pickle.dumps(block_payload(ds, scans[a:a + 16]))) for a in range(0, len(scans), 16 * 64)]
        row.update(payload_kb=round(float(np.mean(sizes)) / 1024, 1))
        out[name] = row
    out["peak_rss_mb"] = round(_common.peak_rss_mb())
    return out


def child_dask(args) -> dict:
    import psutil

    from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute

    peaks: dict[int, tuple[float, str]] = {}
    first: dict[int, float] = {}  # RSS when first seen (a worker's footprint before its tasks)
    stop = threading.Event()

    def watch():
        me = psutil.Process()
        while not stop.is_set():
            for p in me.children(recursive=True):
                try:
                    rss = p.memory_info().rss / 2**20
                    name = " ".join(p.cmdline()[-3:])[-60:]
                except psutil.Error:
                    continue
                first.setdefault(p.pid, rss)
                if rss > peaks.get(p.pid, (0, ""))[0]:
                    peaks[p.pid] = (rss, name)
            stop.wait(0.2)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    cfg = PrecomputeConfig(dataroot=Path(args.nus), out=Path(args.tmp) / "dask.zarr", version="v1.0-trainval",
                           sweeps=3, teacher=None, workers=args.workers, limit=args.dask_scans, block_size=16,
                           overwrite=True)
    with Timer() as t:
        meta = run_precompute(cfg, progress=False)
    stop.set()
    th.join()
    procs = sorted((round(v[0]), round(first[pid]), v[1]) for pid, v in peaks.items())
    workers = [(r, r0) for r, r0, name in procs if "--multiprocessing-fork" in name]
    return dict(run=t.row(scans=meta["num_scans"], points=meta["num_points"]),
                coordinator_rss_mb=round(_common.peak_rss_mb()), worker_peak_and_first_seen_rss_mb=workers,
                processes=procs)


def _tiny_records(lo: int, hi: int, points: int):
    from clip2scene.storage.writer import ScanRecord

    rng = np.random.default_rng(lo)
    empty = np.zeros(0, np.int32)
    for i in range(lo, hi):
        yield ScanRecord(token=f"{i:032x}", scene=f"scene-{i // 40:04d}", split="train" if i % 6 else "val",
                         timestamp=1_532_402_927_000_000 + i * 500_000, lidar_path=f"samples/LIDAR_TOP/{i}.pcd.bin",
                         xyz=rng.normal(0, 10, (points, 3)).astype(np.float32),
                         feat=rng.uniform(0, 1, (points, 1)).astype(np.float32),
                         sweep=np.zeros(points, np.uint8), label=rng.integers(0, 17, points).astype(np.uint8),
                         pair_point=empty, pair_camera=empty.astype(np.uint8), pair_uv=np.zeros((0, 2), np.float32))


def _meta() -> dict:
    from clip2scene.classes import get_class_set, get_eval_classes, prompt_to_eval

    return dict(dataset=dict(name="nuscenes", version="v1.0-trainval", dataroot=None, split=None), teacher=None,
                class_names=list(get_class_set("nuscenes")), class_set="nuscenes",
                eval_class_names=list(get_eval_classes("nuscenes")),
                prompt_to_eval=list(prompt_to_eval("nuscenes", "nuscenes")), sweeps=1,
                cameras=["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT",
                         "CAM_FRONT_LEFT"], camera_choice="farthest-from-border", point_features=["intensity"],
                voxel_size=0.1)


def child_cache(args) -> dict:
    from clip2scene.storage import CacheWriter, open_cache
    from clip2scene.storage import writer as writer_mod
    from clip2scene.storage.tools import merge, verify

    tmp = Path(args.tmp)
    n = args.cache_scans
    halves = {"A": (0, n // 2 + n % 2), "B": (n // 2 + n % 2, n)}
    out: dict = {}
    commits: list[float] = []
    orig = writer_mod.CacheWriter.commit

    def timed_commit(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return orig(self, *a, **kw)
        finally:
            commits.append(time.perf_counter() - t0)

    writer_mod.CacheWriter.commit = timed_commit
    for name, (lo, hi) in halves.items():
        nc = len(_meta()["class_names"])
        with Timer() as t:
            with CacheWriter(tmp / f"{name}.zarr", _meta(), nc, None, True, overwrite=True, block_size=16) as w:
                for rec in _tiny_records(lo, hi, args.scan_points):
                    w.append(rec)
        out[f"write_{name}"] = t.row(scans=hi - lo, blocks=-(-(hi - lo) // 16), commit_s=round(commits[-1], 2))
    before = len(commits)
    with Timer() as t:
        merge([str(tmp / "A.zarr"), str(tmp / "B.zarr")], str(tmp / "C.zarr"), overwrite=True)
    c = open_cache(tmp / "C.zarr")
    out["merge"] = t.row(scans=c.num_scans, blocks=int(c.meta["num_blocks"]), commit_s=round(max(commits[before:]), 2))
    manifest = tmp / "C.zarr" / "manifest.json"
    out["manifest"] = dict(bytes=manifest.stat().st_size, files=len(json.loads(manifest.read_text())["sha256"]),
                           block_records=len(list((tmp / "C.zarr" / "manifest" / "blocks").iterdir())))
    with Timer() as t:
        info = open_cache(tmp / "C.zarr").info()
    out["info"] = t.row(stored_mb=round(info["stored_bytes"] / 2**20, 1))
    est = {}
    with Timer() as t:
        problems = verify(str(tmp / "C.zarr"), on_estimate=lambda f, s: est.update(files=f, estimate_s=round(s, 1)))
    out["verify"] = t.row(problems=len(problems), **est)
    out["disk_mb"] = round(sum(f.stat().st_size for f in (tmp / "C.zarr").rglob("*") if f.is_file()) / 2**20, 1)
    out["peak_rss_mb"] = round(_common.peak_rss_mb())
    return out


def _read_rate(url: str, storage_options: dict, reads: int, workers: int) -> dict:
    from clip2scene.storage import open_cache

    with Timer() as t:
        cache = open_cache(url, storage_options)
        ds = _common.scan_dataset(cache, cache.indices(), augment=True, features=False)
        loader = _common.train_loader(ds, batch_size=8, workers=workers)
        it = iter(loader)
        next(it)
    start = t.row(scans=cache.num_scans)
    done = 0
    with Timer() as t:
        for batch in it:
            done += 8
            if done >= reads:
                break
    return dict(startup=start, read=t.row(scans=done, scans_per_s=round(done / t.wall, 1)), loader="loop.make_loader")


def child_loader(args) -> dict:
    out = {"local": {}}
    url = str(Path(args.tmp) / "C.zarr")
    for w in args.loader_workers:
        out["local"][f"workers={w}"] = _read_rate(url, {}, args.reads, w)
    if args.endpoint:
        so = {"client_kwargs": {"endpoint_url": args.endpoint}}
        out["s3"] = {f"workers={w}": _read_rate("s3://bench/C.zarr", so, args.reads // 4, w) for w in args.loader_workers}
    out["peak_rss_mb"] = round(_common.peak_rss_mb())
    return out


# ------------------------------------------------------------------------------------ parent
def _s3_copy(tmp: Path) -> tuple[object, str, dict]:
    """moto on loopback; C written there by `merge A B` (timed)."""
    from moto.server import ThreadedMotoServer

    for k, v in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1").items():
        os.environ[k] = v
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    import logging

    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("bench")
    from clip2scene.storage.tools import merge, verify

    so = {"client_kwargs": {"endpoint_url": endpoint}}
    with Timer() as t:
        merge([str(tmp / "A.zarr"), str(tmp / "B.zarr")], "s3://bench/C.zarr", so)
    row = dict(merge_to_s3=t.row())
    est = {}
    with Timer() as t:
        problems = verify("s3://bench/C.zarr", so, on_estimate=lambda f, s: est.update(files=f, estimate_s=round(s, 1)))
    row["verify_s3"] = t.row(problems=len(problems), **est)
    return server, endpoint, row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="folder for the dataroots and caches (kept); default a temp dir")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--scenes", type=int, default=850)
    ap.add_argument("--dask-scans", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--cache-scans", type=int, default=34_149)
    ap.add_argument("--scan-points", type=int, default=64)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--loader-workers", default="0,2")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--nus", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kitti", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scannet", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.loader_workers = [int(w) for w in args.loader_workers.split(",") if w != ""]
    if args.child:
        _common.setup_process()
        _common.emit(globals()[f"child_{args.child}"](args))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="c2s-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    phases = [p for p in args.phases.split(",") if p]
    from clip2scene.samples import scale as gen

    nus, kitti, scannet = work / "nuscenes", work / "semantickitti", work / "scannet"
    results: dict = {}
    if not (nus / "v1.0-trainval" / "ego_pose.json").is_file():
        samples = max(args.scenes, round(gen.TRAINVAL_SAMPLES * args.scenes / gen.TRAINVAL_SCENES))
        with Timer() as t:
            made = gen.make_nuscenes_tables(nus, gen.NuScenesScale(
                scenes=args.scenes, samples=samples,
                sample_data=round(gen.TRAINVAL_SAMPLE_DATA * samples / gen.TRAINVAL_SAMPLES)))
        results["tables"] = t.row(**made)
    else:
        results["tables"] = dict(bytes={p.stem: p.stat().st_size for p in (nus / "v1.0-trainval").glob("*.json")})
    if "reader" in phases and not (kitti / "sequences").is_dir():
        gen.make_kitti_tree(kitti, gen.KittiScale(scale=args.scenes / gen.TRAINVAL_SCENES))
    if "reader" in phases and not (scannet / "scans").is_dir():
        from clip2scene.samples.scannet import ScanNetSampleConfig, make_scannet_sample

        src = make_scannet_sample(work / "scannet-src", ScanNetSampleConfig(train_scenes=1, val_scenes=0))
        gen.make_scannet_tree(scannet, src, gen.ScanNetScale(scale=args.scenes / gen.TRAINVAL_SCENES))
    base = [str(Path(__file__).resolve()), "--nus", str(nus), "--kitti", str(kitti), "--scannet", str(scannet),
            "--tmp", str(work), "--dask-scans", str(args.dask_scans), "--workers", str(args.workers),
            "--cache-scans", str(args.cache_scans), "--scan-points", str(args.scan_points),
            "--reads", str(args.reads), "--loader-workers", ",".join(map(str, args.loader_workers))]
    for phase in phases:
        children = {"reader": ["reader", "reader_other"], "dask": ["dask"], "cache": ["cache"], "loader": ["loader"]}[phase]
        for child in children:
            extra = []
            if child == "loader" and not args.no_s3:
                server, endpoint, row = _s3_copy(work)
                results["s3"] = row
                extra = ["--endpoint", endpoint]
            print(f"[scale] {child} ...", flush=True)
            results[child] = _common.run_child(base[0], ["--child", child, *base[1:], *extra])
            print(json.dumps(results[child], indent=1), flush=True)
            if child == "loader" and not args.no_s3:
                server.stop()
    (work / "scale-results.json").write_text(json.dumps(results, indent=1))
    lines = ["```json", json.dumps(results, indent=1), "```"]
    r = results.get("reader", {})
    ratio = (f"RATIO trainval reader open {r.get('open', {}).get('wall_s')} s / 60 s target, "
             f"peak {r.get('peak_rss_mb')} MB / 4096 MB target")
    publish("Full-size datasets (benchmarks/scale.py)", lines, ratio, report=not args.no_report)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
