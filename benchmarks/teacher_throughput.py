"""Teacher throughput: images/s of the precompute path vs a naive per-image loop, and the
teacher's achieved FLOP rate as a fraction of this machine's matmul rate.

- precompute: `run_precompute` on N scans (decode + resize + MaskCLIP in batches of 6 under
  inference_mode, at --teacher-precision (default auto: bfloat16 on a CPU with AMX, float16
  autocast on CUDA, else float32) + projection + sampling + Zarr cache write), timed end to end
  (teacher already loaded: a warm-up run of one scan loads it; the pipeline keeps one per process);
- naive: per image, PIL open + decode, PIL resize to 224x416, one fp32 forward of that single
  image with a float32 teacher (no inference_mode, no batching), then projection and sampling for that one camera
  (points keep the camera where they lie farthest from the border, as the pipeline), and one
  .npz file per scan with the same arrays;
- FLOPs of one ViT-B/16 MaskCLIP dense forward at 224x416, analytically (FlopCounterMode is
  run too but misses the fused multi-head-attention kernel of the eval fast path, ~35%); GFLOP/s of the teacher forward
  alone (batches of 6, inference_mode) and of the whole precompute path (FLOPs x images/s),
  each against torch.mm of 2048x2048 in the teacher's compute dtype measured in the same run
  (median); float32 numbers are given beside the reduced-precision ones;
- fidelity: cosine of the cached features (reduced precision) with the naive float32 loop's.

Targets printed against: precompute >= 2x the naive loop; teacher >= 50% of the matmul rate.

With ``--teachers`` it measures instead what the dense-CLIP variants and sliding windows cost
(issue 16): seconds per image of `dense_outputs` (batch --teacher-batch, inference_mode, at
--teacher-precision) for maskclip, sclip, clearclip and naclip on the whole --image-size input,
and for each variant with sliding windows (--window/--stride) over the finer --window-image
input; relative to MaskCLIP on the whole image, with the number of windows and the patch grid.

    .venv/bin/python benchmarks/teacher_throughput.py [--scans 3 --repeats 2]
    .venv/bin/python benchmarks/teacher_throughput.py --teachers [--window-image 896x1600 --window 448 --stride 224]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _report import publish  # noqa: E402

TITLE = "Teacher throughput: precompute path vs naive per-image loop, FLOP rate vs matmul"


def analytic_flops(teacher, image_size: tuple[int, int]) -> float:
    """Multiply-adds x 2 of the MaskCLIP dense forward of one image (ViT, value-only last block,
    projection, class logits); layer norms, softmax and GELU are left out (< 1%)."""
    v = teacher.visual
    blocks = v.transformer.resblocks
    d = int(v.transformer.width)
    mlp = int(blocks[0].mlp[0].out_features)
    ph, pw = teacher.patch_size
    hw = (image_size[0] // ph) * (image_size[1] // pw)
    n = hw + 1
    patch = 2 * hw * (3 * ph * pw) * d
    full = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * mlp
    last = 2 * n * d * d * 2 + 2 * 2 * n * d * mlp
    head = 2 * hw * d * teacher.embed_dim + 2 * hw * teacher.embed_dim * len(teacher.class_names)
    return float(patch + full * (len(blocks) - 1) + last + head)


def counted_flops(teacher, image_size) -> float | None:
    import torch

    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    x = torch.rand(1, 3, *image_size, device=teacher.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        teacher.dense_outputs(x)
    return float(fc.get_total_flops())


def matmul_gflops(n: int = 2048, repeats: int = 10, device: str = "cpu", dtype: str = "float32") -> float:
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    with torch.inference_mode():
        for _ in range(2):
            torch.mm(a, b)
        ts = []
        for _ in range(repeats):
            C.sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            C.sync(device)
            ts.append(time.perf_counter() - t0)
    return 2 * n**3 / C.median(ts) / 1e9


def forward_seconds(teacher, image_size, batch: int, repeats: int, device: str) -> float:
    import torch

    x = torch.rand(batch, 3, *image_size, device=device)
    with torch.inference_mode(), teacher.autocast():
        teacher.dense_outputs(x)
        ts = []
        for _ in range(repeats):
            C.sync(device)
            t0 = time.perf_counter()
            teacher.dense_outputs(x)
            C.sync(device)
            ts.append(time.perf_counter() - t0)
    return C.median(ts)


def naive_scan(ds, scan, teacher, out_dir: Path, image_size) -> dict:
    """The per-image loop for one scan (see the module docstring); returns its arrays."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from clip2scene.precompute.pipeline import sample_maps

    h, w = image_size
    xyz, feat, sweep, n_key = ds.points(scan)
    n = len(xyz)
    best = np.full(n, -np.inf)
    cam_of = np.zeros(n, np.uint8)
    uv_of = np.zeros((n, 2), np.float32)
    feats = np.zeros((n, teacher.embed_dim), np.float32)
    logits = np.zeros((n, len(teacher.class_names)), np.float32)
    for c, view in enumerate(ds.views(scan)):
        with Image.open(view.path) as im:
            img = im.convert("RGB")
        img = img.resize((w, h), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8)).permute(2, 0, 1)[None].float().div_(255.0)
        dense, dense_logits = teacher.dense_outputs(x.to(teacher.device))  # one image, fp32, autograd mode
        uv, vis = ds.project(scan, c, xyz)
        margin = np.minimum.reduce([uv[:, 0] - 1, view.width - 1 - uv[:, 0], uv[:, 1] - 1, view.height - 1 - uv[:, 1]])
        margin = np.where(vis, margin, -np.inf)
        better = np.flatnonzero(margin > best)
        best[better] = margin[better]
        cam_of[better] = c
        uv_of[better] = uv[better]
        zero = np.zeros(len(better), np.uint8)
        size = [(view.width, view.height)]
        feats[better] = sample_maps(dense, zero, uv_of[better], size).detach().cpu().numpy()
        logits[better] = sample_maps(dense_logits, zero, uv_of[better], size).detach().cpu().numpy()
    idx = np.flatnonzero(np.isfinite(best)).astype(np.int32)
    f = F.normalize(torch.from_numpy(feats[idx]), dim=-1).numpy().astype(np.float16)
    out = dict(xyz=xyz, feat=feat, sweep=sweep, pair_point=idx, pair_camera=cam_of[idx], pair_uv=uv_of[idx],
               pair_logits=logits[idx].astype(np.float16), pair_features=f)
    np.savez(out_dir / f"{scan.token}.npz", **out)
    return out


def teacher_costs(args) -> None:
    """--teachers: per-image cost of every variant, whole image and sliding windows (see the docstring)."""
    from clip2scene.classes import get_class_set
    from clip2scene.precompute.teacher.config import TEACHERS, TeacherConfig
    from clip2scene.precompute.teacher.maskclip import MaskCLIP, load_teacher
    from clip2scene.precompute.teacher.precision import resolve_precision

    def size(text):
        h, w = (int(v) for v in text.lower().split("x"))
        return h, w

    image, full = size(args.image_size), size(args.window_image)
    window, stride = size(args.window), size(args.stride)
    precision = resolve_precision(args.teacher_precision, args.device)
    classes = get_class_set("nuscenes")
    rows, base = [], None
    t0 = time.perf_counter()
    loaded = load_teacher(TeacherConfig(model=args.clip_model, weights=args.clip_weights, image_size=image), classes,
                          device=args.device).set_precision(precision)
    print(f"[setup] {args.clip_model} loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    for windowed in (False, True):
        for name in TEACHERS:
            hw = full if windowed else image
            # the same image tower and text embeddings, another last block / windowing
            teacher = MaskCLIP(loaded.visual, loaded.text_embeddings, classes, hw, loaded.fingerprint, teacher=name,
                               window=window if windowed else None, stride=stride if windowed else None)
            teacher.precision = loaded.precision
            secs = forward_seconds(teacher, hw, args.teacher_batch, args.repeats, args.device) / args.teacher_batch
            grid = (hw[0] // teacher.patch_size[0], hw[1] // teacher.patch_size[1])
            n_win = len(teacher._windows(grid[0] * teacher.patch_size[0], grid[1] * teacher.patch_size[1]))
            base = secs if base is None else base
            rows.append([name, f"{hw[0]}x{hw[1]}", f"{window[0]}x{window[1]} / {stride[0]}x{stride[1]}" if windowed
                         else "whole image", str(n_win), f"{grid[0]}x{grid[1]}", f"{secs:.3f}", f"{1 / secs:.2f}",
                         f"{secs / base:.2f}x"])
            print(f"[run] {name} {'windowed' if windowed else 'whole'}: {secs:.3f} s/image", flush=True)
            del teacher
    lines = C.table(["teacher", "input", "window / stride", "windows", "patch grid", "s/image (median)", "images/s",
                     "vs maskclip whole"], rows)
    lines += [
        "",
        f"- {args.clip_model}, {precision}, batch {args.teacher_batch}, {args.repeats} timed runs (median), "
        "dense_outputs (features + logits) under inference_mode; cost of decoding, projection and writing not included",
        "- windows tile the input as SCLIP/ClearCLIP/NACLIP evaluate (mmseg slide inference: last window flush "
        "with the border); features and logits are averaged on overlaps on the patch grid",
        f"- {C.RANDOM_WEIGHTS_NOTE}" if args.clip_weights == "none" else f"- teacher weights: {args.clip_weights}",
    ]
    windowed_rows = rows[len(TEACHERS):]
    ratio_line = (f"RATIO windowed ({args.window_image}, window {args.window}/{args.stride}) / whole-image "
                  f"({args.image_size}) MaskCLIP seconds per image = {windowed_rows[0][-1]}; "
                  + ", ".join(f"{r[0]} {r[-1]}" for r in rows[1:len(TEACHERS)]) + " whole-image")
    publish("Teacher variants and sliding windows: cost per image", lines, ratio_line, report=not args.no_report,
            device=args.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=3, help="N scans (6 images each) per timed run")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each path (median reported)")
    ap.add_argument("--sweeps", type=int, default=3, help="K lidar frames per scan (points projected)")
    ap.add_argument("--data", default="auto", choices=["auto", "real", "synthetic"])
    ap.add_argument("--synthetic-size", default="1600x900", help="WxH of synthetic cameras (fallback data)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clip-weights", default="none", help="TeacherConfig.weights (default: random init)")
    ap.add_argument("--teacher-precision", default="auto", help="precompute path: auto, float32, bfloat16, float16")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--teachers", action="store_true", help="measure the teacher variants and sliding windows instead")
    ap.add_argument("--clip-model", default="ViT-B-16", help="--teachers: open_clip backbone")
    ap.add_argument("--image-size", default="224x416", help="--teachers: whole-image input HxW")
    ap.add_argument("--window-image", default="448x832", help="--teachers: input HxW that the windows tile")
    ap.add_argument("--window", default="224x224", help="--teachers: window HxW")
    ap.add_argument("--stride", default="112x112", help="--teachers: stride HxW")
    ap.add_argument("--teacher-batch", type=int, default=2, help="--teachers: images per forward")
    args = ap.parse_args()
    C.setup_process()
    if args.teachers:
        teacher_costs(args)
        return
    import torch

    from clip2scene.classes import get_class_set
    from clip2scene.precompute.teacher.maskclip import load_teacher
    from clip2scene.precompute.datasets.nuscenes import NuScenes
    from clip2scene.precompute.pipeline import run_precompute
    from clip2scene.storage import open_cache

    tmp = Path(tempfile.mkdtemp(prefix="c2s-bench-teacher-"))
    try:
        w, h = (int(x) for x in args.synthetic_size.lower().split("x"))
        data = C.pick_data(args.data, tmp, args.scans, args.sweeps, (w, h))
        print(f"[setup] {data.note}", flush=True)
        t0 = time.perf_counter()
        cfg = C.precompute_config(data, tmp / "cache.zarr", args.sweeps, args.scans, args.clip_weights, args.device,
                                  teacher_precision=args.teacher_precision)
        run_precompute(replace(cfg, out=str(tmp / "warmup.zarr"), limit=1), progress=False)  # loads the teacher
        teacher = C.process_teacher(cfg)
        precision = teacher.precision
        naive_teacher = load_teacher(cfg.teacher, get_class_set(cfg.class_set), device=args.device)
        naive_teacher.set_precision("float32")
        image_size = tuple(teacher.fingerprint["image_size"])
        print(f"[setup] teacher loaded and warmed up in {time.perf_counter() - t0:.1f}s", flush=True)
        ds = NuScenes(data.root, data.version)
        scans = ds.scans(sweeps=args.sweeps)[: args.scans]
        images = sum(len(ds.views(s)) for s in scans)

        pre_t = []
        for r in range(args.repeats):
            C.sync(args.device)
            t0 = time.perf_counter()
            run_precompute(cfg, progress=False)
            C.sync(args.device)
            pre_t.append(time.perf_counter() - t0)
            print(f"[run] precompute {r + 1}/{args.repeats}: {pre_t[-1]:.2f}s for {images} images", flush=True)

        naive_dir = tmp / "naive"
        naive_dir.mkdir()
        with torch.no_grad():  # warm-up of the batch-1 forward only (untimed)
            naive_teacher.dense_outputs(torch.rand(1, 3, *image_size, device=teacher.device))
        naive_t, naive_out = [], {}
        for r in range(args.repeats):
            C.sync(args.device)
            t0 = time.perf_counter()
            for s in scans:
                naive_out[s.token] = naive_scan(ds, s, naive_teacher, naive_dir, image_size)
            C.sync(args.device)
            naive_t.append(time.perf_counter() - t0)
            print(f"[run] naive {r + 1}/{args.repeats}: {naive_t[-1]:.2f}s for {images} images", flush=True)

        # the two paths compute the same thing: compare the naive arrays with the cache's
        cache = open_cache(cfg.out)
        cos, same_pairs = [], True
        for i in cache.indices():
            sd = cache.read_scan(int(i), features=True)
            nv = naive_out[str(cache.token[int(i)])]
            same_pairs &= np.array_equal(sd.pair_point, nv["pair_point"])
            if len(sd.pair_point) == len(nv["pair_point"]):
                a = sd.pair_features.astype(np.float32)
                b = nv["pair_features"].astype(np.float32)
                cos.append((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12))
        agree = float(np.concatenate(cos).mean()) if cos else float("nan")
        agree_min = float(np.concatenate(cos).min()) if cos else float("nan")

        flops_counted = counted_flops(teacher, image_size)
        flops_analytic = analytic_flops(teacher, image_size)
        flops = flops_analytic  # FlopCounterMode misses the fused native MHA kernel of the eval fast path
        fwd_s = forward_seconds(teacher, image_size, cfg.view_batch, 3, args.device)
        fwd32_s = fwd_s if precision == "float32" else forward_seconds(naive_teacher, image_size, cfg.view_batch, 3,
                                                                         args.device)
        mm32 = matmul_gflops(device=args.device)
        mm = mm32 if precision == "float32" else matmul_gflops(device=args.device, dtype=precision)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    pre_ips = images / C.median(pre_t)
    naive_ips = images / C.median(naive_t)
    fwd_gflops = flops * cfg.view_batch / fwd_s / 1e9
    fwd32_gflops = flops * cfg.view_batch / fwd32_s / 1e9
    e2e_gflops = flops * pre_ips / 1e9
    speedup = pre_ips / naive_ips
    low = precision != "float32"
    rows = [
        [f"precompute path (run_precompute, {precision})", f"{pre_ips:.2f}", f"{C.median(pre_t):.2f}",
         f"{e2e_gflops:.0f}", f"{100 * e2e_gflops / mm:.0f}% of {precision}"],
        ["naive per-image loop (float32)", f"{naive_ips:.2f}", f"{C.median(naive_t):.2f}", f"{flops * naive_ips / 1e9:.0f}",
         f"{100 * flops * naive_ips / 1e9 / mm32:.0f}% of float32"],
        [f"teacher forward only ({precision}, batch {cfg.view_batch}, inference_mode)", f"{cfg.view_batch / fwd_s:.2f}",
         f"{fwd_s:.2f} per batch", f"{fwd_gflops:.0f}", f"{100 * fwd_gflops / mm:.0f}% of {precision}"],
    ]
    if low:
        rows.append([f"teacher forward only (float32, batch {cfg.view_batch}, inference_mode)",
                     f"{cfg.view_batch / fwd32_s:.2f}", f"{fwd32_s:.2f} per batch", f"{fwd32_gflops:.0f}",
                     f"{100 * fwd32_gflops / mm32:.0f}% of float32"])
        rows.append([f"torch.mm 2048x2048 {precision} (reference)", "", "", f"{mm:.0f}", "100%"])
    rows.append(["torch.mm 2048x2048 float32 (reference)", "", "", f"{mm32:.0f}", "100%"])
    lines = C.table(["path", "images/s", "seconds (median)", "GFLOP/s", "% of matmul rate"], rows)
    lines += [
        "",
        f"- {images} images = {len(scans)} scans x 6 cameras per timed run; {args.repeats} runs per path, median; "
        f"teacher input {image_size[0]}x{image_size[1]}; precompute teacher precision {precision} "
        f"(--teacher-precision {args.teacher_precision})",
        f"- FLOPs of one dense forward: {flops / 1e9:.1f} GFLOP, analytic (2 x multiply-adds of patch embedding, "
        f"{len(teacher.visual.transformer.resblocks) - 1} full blocks, the value-only last block, projection, "
        "logits); FlopCounterMode counts "
        f"{flops_counted / 1e9 if flops_counted else float('nan'):.1f} GFLOP because in eval mode "
        "nn.MultiheadAttention runs the fused native kernel (QKV, attention, out-projection), which it does not see",
        f"- speed-up of the precompute path over the naive loop: {speedup:.2f}x (target >= 2x: "
        f"{'met' if speedup >= 2 else 'NOT met'})",
        f"- teacher forward at {100 * fwd_gflops / mm:.0f}% of the {precision} matmul rate (target >= 50%: "
        f"{'met' if fwd_gflops >= 0.5 * mm else 'NOT met'}); whole precompute path at {100 * e2e_gflops / mm:.0f}%"
        + (f"; in float32 the forward runs at {100 * fwd32_gflops / mm32:.0f}% of the float32 rate, and the "
           f"{precision} forward is {fwd32_s / fwd_s:.1f}x the float32 one" if low else ""),
        f"- the naive loop produces the same pairs as the cache: {'yes' if same_pairs else 'NO'}; cosine of its "
        f"float32 features with the cached {precision} ones: mean {agree:.5f}, min {agree_min:.5f} "
        "(PIL vs torchvision decode/resize differ slightly too)",
        f"- {data.note}",
        f"- {C.RANDOM_WEIGHTS_NOTE}" if args.clip_weights == "none" else f"- teacher weights: {args.clip_weights}",
    ]
    ratio_line = (f"RATIO precompute/naive images/s = {speedup:.2f}x (target >= 2x); teacher forward at "
                  f"{100 * fwd_gflops / mm:.0f}% of the {precision} matmul rate (target >= 50%), precompute path at "
                  f"{100 * e2e_gflops / mm:.0f}%")
    publish(TITLE, lines, ratio_line, report=not args.no_report, device=args.device)


if __name__ == "__main__":
    main()
