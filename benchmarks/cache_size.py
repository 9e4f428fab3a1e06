"""Cache size: stored bytes per keyframe and per camera-visible point, per array, projected to
nuScenes trainval at K sweeps, against OpenScene's per-point features; int8 vs float16 features.

Builds a cache of the first --scans real keyframes (synthetic fallback: 1600x900 cameras) with
float16 teacher feature maps and, when PrecomputeConfig has a `feature_dtype` field, a second
one with int8 maps (per-patch scale); reads `open_cache(...).info()` (stored = compressed bytes
on disk, Zstd level 3 as written). The reference figure is OpenScene's 1,536 bytes per point, as
given: 768-d fused features in float16 per point. The int8 cache's fidelity is the cosine of
every visible point's sampled int8 feature with its float16 one (mean and min).

Projection (schema 5): the teacher maps are per image and sweeps are projected into the
keyframe's images, so with K lidar frames per keyframe

    bytes/keyframe(K) = images/* + K x (points/* + pairs/*) + scans/* and text (per keyframe)

where images/*, points/* and pairs/* are measured per keyframe with one lidar frame per scan
(the real fixture ships no sweeps); trainval = 34,149 keyframes x bytes/keyframe(K).

    .venv/bin/python benchmarks/cache_size.py [--scans 41 --sweeps 1 --project-sweeps 3]

With ``--window 448 --stride 224`` (issue 16) one more float16 cache is built with that
teacher (``--teacher``, default clearclip) on sliding windows of the ``--window-image`` input
(default nuScenes' full 896x1600), and its size is set beside the whole-image one, with the
dense patch-map bytes per image of both grids (D + C float16 values per patch cell), the figure
a cache that stores dense maps instead of per-point samples would pay.

    .venv/bin/python benchmarks/cache_size.py [--scans 6 --sweeps 3 --feature-dtype int8]
    .venv/bin/python benchmarks/cache_size.py --window 448 --stride 224 [--window-image 896x1600]
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

TITLE = "Cache size per visible point and per keyframe (float16 and int8 teacher features)"
OPENSCENE_BYTES_PER_POINT = 1536  # as given: 768-d float16 features per point


BYTES = {"float32": 4, "float16": 2, "int32": 4, "int64": 8, "uint8": 1, "int8": 1, "uint16": 2}


def actual_dtype(cache, name: str, listed: str) -> str:
    """The dtype stored on disk (Cache.array_info lists the schema's dtype, float16 for int8 features)."""
    try:
        if name.startswith(("points/", "pairs/", "images/")):
            return str(cache.group[f"blocks/{int(cache.block[0]):06d}/{name}"].dtype)
        return str(cache.group[name].dtype)
    except Exception:  # noqa: BLE001 - layout changed: keep the listed dtype
        return listed


def cosine_fidelity(ref, other) -> tuple[float, float, int]:
    """Mean and min cosine between the two caches' features over all visible points (of the
    scans both hold)."""
    cos = []
    for i in ref.indices()[: other.num_scans]:
        a = ref.read_scan(int(i), features=True).pair_features.astype(np.float32)
        b = other.read_scan(int(i), features=True).pair_features.astype(np.float32)
        if a.shape != b.shape:
            raise SystemExit(f"scan {i}: feature shapes differ {a.shape} vs {b.shape}")
        cos.append((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12))
    c = np.concatenate(cos)
    return float(c.mean()), float(c.min()), int(len(c))


def _hw(text: str) -> tuple[int, int]:
    parts = [int(v) for v in text.lower().split("x")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def build_windowed(args, data, tmp: Path) -> dict:
    """The float16 cache of a sliding-window teacher; its info() plus the teacher's grids."""
    from dataclasses import replace

    from clip2scene.precompute.teacher.config import TeacherConfig
    from clip2scene.precompute.pipeline import run_precompute
    from clip2scene.storage import open_cache

    base = C.precompute_config(data, tmp / "windowed.zarr", args.sweeps, args.scans, device=args.device)
    teacher = TeacherConfig(model=base.teacher.model, weights=base.teacher.weights, image_size=_hw(args.window_image),
                            teacher=args.teacher, window=_hw(args.window),
                            stride=_hw(args.stride) if args.stride else None)
    t0 = time.perf_counter()
    run_precompute(replace(base, teacher=teacher), progress=False)
    print(f"[run] windowed {args.teacher} cache built in {time.perf_counter() - t0:.1f}s", flush=True)
    cache = open_cache(tmp / "windowed.zarr")
    return dict(info=cache.info(), teacher=teacher, whole=base.teacher, seconds=time.perf_counter() - t0)


def windowed_lines(w: dict, whole_info: dict) -> list[str]:
    """Rows: whole-image vs windowed cache bytes, and dense patch-map bytes per image of each grid."""
    info, meta = w["info"], w["info"]["meta"]
    fp = meta["teacher"]
    d, c = int(fp["embed_dim"]), len(meta["class_names"])
    patch = fp["patch_size"] if isinstance(fp["patch_size"], list) else [fp["patch_size"]] * 2
    rows = []
    for label, inf, cfg in (("whole image (maskclip)", whole_info, w["whole"]), (
            f"{fp['teacher']} window {'x'.join(map(str, fp['window']))} stride {'x'.join(map(str, fp['stride']))}",
            info, w["teacher"])):
        gh, gw = cfg.image_size[0] // patch[0], cfg.image_size[1] // patch[1]
        s = max(int(inf["meta"]["num_scans"]), 1)
        rows.append([label, f"{cfg.image_size[0]}x{cfg.image_size[1]}", f"{gh}x{gw}",
                     f"{inf['bytes_per_visible_point']:.0f}", f"{inf['stored_bytes'] / s / 1e6:.2f}",
                     f"{gh * gw * (d + c) * 2 / 1e3:.1f}"])
    return ["", "**sliding-window teacher** (float16 features)", ""] + C.table(
        ["teacher", "input", "patch grid", "bytes / visible point", "MB / keyframe (stored)",
         "dense map kB / image (raw, D + C float16 per cell)"], rows) + [
        "", f"- the per-point cache stores one feature and one logit row per visible point whatever the grid; "
        f"the windowed cache was built in {w['seconds']:.0f}s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=6, help="keyframes to cache")
    ap.add_argument("--sweeps", type=int, default=3, help="K lidar frames per scan to build (paper: 3)")
    ap.add_argument("--project-sweeps", type=int, default=3, help="K of the trainval projection (paper: 3)")
    ap.add_argument("--feature-dtype", default="int8", choices=["int8", "none"],
                    help="second cache's feature dtype to compare with float16 (none = float16 only)")
    ap.add_argument("--data", default="auto", choices=["auto", "real", "synthetic"])
    ap.add_argument("--synthetic-size", default="1600x900", help="WxH of synthetic cameras (fallback data)")
    ap.add_argument("--cache", action="append", default=[], metavar="DTYPE=PATH",
                    help="measure this existing cache of the real keyframes as the DTYPE row instead of building "
                         "it (repeatable: --cache float16=a.zarr --cache int8=b.zarr)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--window", default=None, help="also build a sliding-window cache: window HxW (or N)")
    ap.add_argument("--stride", default=None, help="its stride (default half the window)")
    ap.add_argument("--window-image", default="896x1600", help="its teacher input HxW")
    ap.add_argument("--teacher", default="clearclip", help="its teacher variant")
    args = ap.parse_args()
    C.setup_process()
    from clip2scene.storage import open_cache

    tmp = Path(tempfile.mkdtemp(prefix="c2s-bench-size-"))
    notes = []
    try:
        w, h = (int(x) for x in args.synthetic_size.lower().split("x"))
        data = C.pick_data(args.data, tmp, args.scans, args.sweeps, (w, h))
        print(f"[setup] {data.note}", flush=True)
        dtypes = ["float16"]
        if args.feature_dtype != "none":
            if C.has_feature_dtype():
                dtypes.append(args.feature_dtype)
            else:
                notes.append(f"- {args.feature_dtype} row skipped: PrecomputeConfig has no feature_dtype field")
        infos, caches, dtypes_on_disk = {}, {}, {}
        given = dict(c.split("=", 1) for c in args.cache)
        for dt in dtypes:
            t0 = time.perf_counter()
            if dt in given:
                caches[dt] = open_cache(given[dt])
                notes.append(f"- {dt} row: existing cache {given[dt]} ({caches[dt].num_scans} keyframes)")
            else:
                C.build_cache(data, tmp / f"{dt}.zarr", args.sweeps, args.scans, device=args.device,
                              feature_dtype=dt if C.has_feature_dtype() else None)
                caches[dt] = open_cache(tmp / f"{dt}.zarr")
            infos[dt] = caches[dt].info()
            dtypes_on_disk[dt] = {a["name"]: actual_dtype(caches[dt], a["name"], str(a["dtype"]))
                                  for a in infos[dt]["arrays"]}
            print(f"[run] {dt} cache built in {time.perf_counter() - t0:.1f}s", flush=True)
        fidelity = cosine_fidelity(caches["float16"], caches[dtypes[1]]) if len(dtypes) > 1 else None
        windowed = None
        if args.window:
            windowed = build_windowed(args, data, tmp)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    lines = []
    for dt in dtypes:
        info = infos[dt]
        meta = info["meta"]
        m, n, s = max(int(meta["num_pairs"]), 1), max(int(meta["num_points"]), 1), max(int(meta["num_scans"]), 1)
        rows = []
        arrays = [a for a in info["arrays"] if not a["name"].startswith("scans/")]
        tables = [a for a in info["arrays"] if a["name"].startswith("scans/")]
        for a in sorted(arrays, key=lambda a: -a["stored_bytes"]):
            dtype = dtypes_on_disk[dt][a["name"]]
            raw = int(np.prod(a["shape"])) * BYTES.get(dtype, 0)
            rows.append([a["name"], dtype, "x".join(str(x) for x in a["shape"]), a["stored_bytes"],
                         f"{raw / a['stored_bytes']:.2f}" if raw and a["stored_bytes"] else "",
                         f"{a['stored_bytes'] / s / 1e6:.4f}", f"{100 * a['stored_bytes'] / info['stored_bytes']:.1f}%"])
        if tables:
            tb = sum(a["stored_bytes"] for a in tables)
            rows.append([f"scans/* ({len(tables)} per-scan tables)", "", f"{s} rows each", tb, "", f"{tb / s / 1e6:.4f}",
                         f"{100 * tb / info['stored_bytes']:.1f}%"])
        rows.append(["total", "", "", info["stored_bytes"], "", f"{info['stored_bytes'] / s / 1e6:.4f}", "100%"])
        v = max(int(meta.get("num_visible", m)), 1)
        lines += [f"**images/features as {dt}** ({s} scans, {n:,} points, {v:,} camera-visible points = "
                  f"{100 * v / n:.0f}% in {m:,} point-view pairs, {meta.get('num_images', 0)} images on a "
                  f"{'x'.join(map(str, meta.get('grid') or []))} grid)", ""]
        lines += C.table(["array", "dtype", "shape", "stored bytes", "compression", "MB / keyframe",
                          "share"], rows)
        lines.append("")
    summary, projection = [], []
    k_built = 1 if data.real else args.sweeps  # lidar frames actually in each scan
    k = args.project_sweeps
    for dt in dtypes:
        info = infos[dt]
        s = max(int(info["meta"]["num_scans"]), 1)
        per_kf = info["stored_bytes"] / s
        group = {g: sum(a["stored_bytes"] for a in info["arrays"] if a["name"].startswith(g + "/")) / s
                 for g in ("images", "points", "pairs")}
        other = per_kf - sum(group.values())
        projected = group["images"] + k / k_built * (group["points"] + group["pairs"]) + other
        summary.append([dt, f"{info['bytes_per_visible_point']:.0f}", f"{info['bytes_per_point']:.0f}",
                        f"{per_kf / 1e6:.2f}", f"{projected / 1e6:.2f}", f"{projected * C.TRAINVAL_KEYFRAMES / 1e9:.0f}",
                        f"{OPENSCENE_BYTES_PER_POINT / info['bytes_per_visible_point']:.1f}x smaller"])
        projection.append([dt, f"{group['images'] / 1e6:.3f}", f"{group['points'] / 1e6:.3f}",
                           f"{group['pairs'] / 1e6:.3f}", f"{other / 1e6:.4f}", f"{projected / 1e6:.2f}",
                           f"{projected * C.TRAINVAL_KEYFRAMES / 1e9:.1f}"])
    lines += C.table(["features", "bytes / visible point", "bytes / point", f"MB / keyframe (K = {k_built})",
                      f"MB / keyframe (K = {k}, projected)",
                      f"projected trainval GB at K = {k} ({C.TRAINVAL_KEYFRAMES:,} keyframes)",
                      f"vs OpenScene {OPENSCENE_BYTES_PER_POINT:,} B/point"], summary)
    lines.append("")
    lines.append(f"Projection: bytes/keyframe(K) = images/* + K/{k_built} x (points/* + pairs/*) + tables, "
                 f"K = {k}; trainval = {C.TRAINVAL_KEYFRAMES:,} x bytes/keyframe (MB per keyframe, measured at "
                 f"K = {k_built}):")
    lines.append("")
    lines += C.table(["features", "images/*", "points/*", "pairs/*", "scans/* + text", f"total at K = {k}",
                      "trainval GB"], projection)
    lines.append("")
    lines += [
        f"- OpenScene reference: {OPENSCENE_BYTES_PER_POINT:,} bytes per point (figure as given: 768-d float16 "
        "features per point); ours counts every stored byte of the cache (points, pairs, logits, features, "
        "tables) per camera-visible point",
        f"- K = {args.sweeps} lidar frames requested; "
        + ("the real fixture has no sweep files, so these scans are keyframe-only (the projection "
           "above scales points and pairs, not the per-image maps)"
           if data.real else "points and visible points include the sweeps"),
        f"- {data.note}",
        f"- {C.RANDOM_WEIGHTS_NOTE} (random features may compress differently from real CLIP features)",
    ] + notes
    if windowed is not None:
        lines += windowed_lines(windowed, infos["float16"])
    ratio_line = (f"RATIO MB per keyframe (K = {k_built}) = "
                  + ", ".join(f"{infos[d]['stored_bytes'] / max(int(infos[d]['meta']['num_scans']), 1) / 1e6:.2f} ({d})"
                              for d in dtypes)
                  + f"; trainval at K = {k}: " + ", ".join(f"{r[-1]} GB ({r[0]})" for r in projection)
                  + "; bytes per visible point = "
                  + ", ".join(f"{infos[d]['bytes_per_visible_point']:.0f} ({d})" for d in dtypes)
                  + f" vs OpenScene {OPENSCENE_BYTES_PER_POINT:,}"
                  + (f"; {dtypes[1]} cosine vs float16: mean {fidelity[0]:.5f}, min {fidelity[1]:.5f}"
                     if fidelity else ""))
    publish(TITLE, lines, ratio_line, report=not args.no_report, device=args.device)


if __name__ == "__main__":
    main()
