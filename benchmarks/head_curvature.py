"""Why fine-tuning diverged (issue 18): the classifier's input scale on real lidar, and head-only SGD.

Runs a randomly initialised SPVCNN (default widths, train mode) over `--scans` real keyframes of
the fixture (labels-only cache), takes the per-point features the fine-tuning classifier reads
(`embed_points`, 480-d), and reports their squared norm and the largest eigenvalue of E[x x^T]
(the curvature scale of cross-entropy in the classifier weights). Then trains only a linear
classifier on those fixed features with SGD (momentum 0.9, weight decay 1e-4, 60 steps of 20,000
labelled points) at several head learning rates, on the raw features and on unit-norm (L2)
features, and prints the cross-entropy of the first steps, the largest, and the last 10 steps'
mean. Minutes on a CPU.

    .venv/bin/python benchmarks/head_curvature.py --scans 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REAL_ROOT, real_available, setup_process, table  # noqa: E402
from _report import publish  # noqa: E402

TITLE = "Fine-tuning head: input scale and head-only SGD on real lidar features (issue 18 root cause)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    setup_process()
    if not real_available():
        raise SystemExit(f"this check needs the real fixture {REAL_ROOT}")
    import numpy as np
    import torch
    import torch.nn.functional as F

    from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
    from clip2scene.storage import open_cache
    from clip2scene.train.data import ScanDataset, collate
    from clip2scene.train.nets import ModelConfig, build_model
    from clip2scene.train.voxelize import voxelize

    tmp = Path(tempfile.mkdtemp(prefix="head_curvature_"))
    run_precompute(PrecomputeConfig(dataroot=REAL_ROOT, out=str(tmp / "c.zarr"), version="v1.0-mini", sweeps=1,
                                    teacher=None), progress=False)
    cache = open_cache(tmp / "c.zarr")
    picks = np.linspace(0, cache.num_scans - 1, args.scans).round().astype(int)
    ds = ScanDataset(cache, cache.indices()[picks], augment=False)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="spvcnn", in_channels=1), "cpu").train()
    xs, ys = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            b = collate([ds[i]])
            xs.append(model.embed_points(voxelize(b["xyz"], b["batch"], cache.voxel_size), b["feat"]))
            ys.append(b["label"].long() - 1)
    x, y = torch.cat(xs), torch.cat(ys)
    n2 = (x * x).sum(1)
    lam = float(torch.linalg.eigvalsh(((x.T @ x) / len(x)).double())[-1])
    bound = 2 * (1 + 0.9) / (0.5 * lam)
    keep = y >= 0
    lines = [f"{len(x):,} points of {args.scans} keyframes ({int(keep.sum()):,} labelled); features {x.shape[1]}-d, "
             f"all >= 0: {bool((x >= 0).all())}",
             f"- squared norm: median {float(n2.median()):,.0f}, mean {float(n2.mean()):,.0f}, max {float(n2.max()):,.0f}",
             f"- largest eigenvalue of E[x x^T]: {lam:,.0f}; heavy-ball bound lr < 2(1+0.9)/(0.5 lambda) = {bound:.2g}",
             ""]
    rows = []
    for head_input in ("raw", "l2"):
        feats = (x if head_input == "raw" else F.normalize(x, dim=1))[keep]
        labels = y[keep]
        for lr in (2.0, 0.2, 0.02, 0.002):
            torch.manual_seed(0)
            head = torch.nn.Linear(x.shape[1], len(cache.eval_class_names))
            opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
            ce = []
            for _ in range(args.steps):
                sel = torch.randint(0, len(feats), (20000,))
                loss = F.cross_entropy(head(feats[sel]), labels[sel])
                opt.zero_grad()
                loss.backward()
                opt.step()
                ce.append(float(loss.detach()))
            acc = float((head(feats).argmax(1) == labels).float().mean())
            rows.append([head_input, lr, " ".join(f"{v:.3g}" for v in ce[:6]), max(ce), float(np.mean(ce[-10:])), acc])
    lines += table(["head input", "head lr", "CE steps 1-6", "max CE", "CE last 10", "accuracy"], rows)
    lines += ["", "- recipe: lr 0.02 x head 100 = 2.0 at batch 8; 'raw' is the classifier on the features as the "
                  "backbone gives them (before issue 18), 'l2' on unit-norm features (the default now)"]
    raw2 = next(r for r in rows if r[0] == "raw" and r[1] == 2.0)
    l22 = next(r for r in rows if r[0] == "l2" and r[1] == 2.0)
    publish(TITLE, lines, f"RATIO max CE at head lr 2: raw {raw2[3]:,.0f} vs l2 {l22[3]:.2f}",
            report=not args.no_report)


if __name__ == "__main__":
    main()
