"""Schema 5 vs schema 4 on the same keyframes: pairs, logits, features, uv, and a short training run.

Needs a schema-4 cache built by the schema-4 code (e.g. a worktree of commit f1ccacc, run with
PYTHONPATH pointing at it) and a schema-5 cache of the same keyframes with the same teacher,
both with float16 features. Compares, per visible point (`views="border"`): the point set and
the chosen camera (must be equal), class scores (max abs difference), features (cosine), the
stored pixel (uv quantisation); with `--old-code` also trains the same short run from each
cache (schema 4 with the old code in a subprocess) and compares the per-step loss curves.

    PYTHONPATH=. .venv/bin/python benchmarks/schema_equivalence.py --old /tmp/s4.zarr --new /tmp/s5.zarr \
        --old-code /work/wt-old [--epochs 2 --batch 2 --split val]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TRAIN = """
import json, sys
from clip2scene.train.nets import ModelConfig
from clip2scene.train.trainer import TrainConfig, train
a = json.loads(sys.argv[1])
cfg = TrainConfig(cache=a["cache"], out=a["out"], epochs=a["epochs"], batch_size=a["batch"], split=a["split"],
                  lr=0.05, model=ModelConfig(channels=tuple(a["channels"]), blocks_per_stage=1), precise_bn_batches=0)
train(cfg, progress=False)
"""


def compare(old_path: str, new_path: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import zarr

    from clip2scene.storage import open_cache

    new = open_cache(new_path)
    g = zarr.open_group(old_path, mode="r")  # schema 4, read directly (this code refuses it)
    meta4 = dict(g.attrs)["clip2scene"]
    assert meta4["schema_version"] == 4, meta4["schema_version"]
    tables = {k: g[f"scans/{k}"][...] for k in ("block", "pair_start", "pair_count", "token")}
    same_pairs, same_cams, n_vis, n_pairs = True, True, 0, 0
    max_logit, cos_min, cos_sum, uv_max = 0.0, 1.0, 0.0, 0.0
    mean_logit, mean_cos_min = 0.0, 1.0
    for i in range(new.num_scans):
        assert str(tables["token"][i]) == str(new.token[i]), "scan order differs"
        b = g[f"blocks/{int(tables['block'][i]):06d}"]
        q0 = int(tables["pair_start"][i])
        q1 = q0 + int(tables["pair_count"][i])
        p4, c4, uv4 = b["pairs/point"][q0:q1], b["pairs/camera"][q0:q1], b["pairs/uv"][q0:q1]
        l4 = b["pairs/logits"][q0:q1].astype(np.float32)
        f4 = b["pairs/features"][q0:q1].astype(np.float32)
        r = new.read_scan(i, features=True)
        n_vis += len(r.pair_point)
        n_pairs += len(r.view_point)
        if not (np.array_equal(r.pair_point, p4)):
            same_pairs = False
            continue
        same_cams &= bool(np.array_equal(r.pair_camera, c4))
        max_logit = max(max_logit, float(np.abs(r.pair_logits.astype(np.float32) - l4).max(initial=0)))
        f5 = r.pair_features.astype(np.float32)
        cos = (f5 * f4).sum(1) / np.linalg.norm(f5, axis=1) / np.linalg.norm(f4, axis=1)
        cos_min = min(cos_min, float(cos.min(initial=1)))
        cos_sum += float(cos.sum())
        uv_max = max(uv_max, float(np.abs(r.pair_uv - uv4).max(initial=0)))
        m = new.read_scan(i, features=True, views="mean")  # how far the OpenScene-style mean moves
        mean_logit = max(mean_logit, float(np.abs(m.pair_logits.astype(np.float32) - l4).max(initial=0)))
        fm = m.pair_features.astype(np.float32)
        mean_cos_min = min(mean_cos_min, float(((fm * f4).sum(1) / np.linalg.norm(fm, axis=1)
                                                / np.linalg.norm(f4, axis=1)).min(initial=1)))
    return dict(scans=new.num_scans, visible_points=n_vis, pairs=n_pairs, same_pairs=same_pairs, same_cameras=same_cams,
                logits_max_abs=max_logit, features_cos_min=cos_min, features_cos_mean=cos_sum / max(n_vis, 1),
                uv_max_abs_px=uv_max, mean_views_logits_max_abs=mean_logit, mean_views_cos_min=mean_cos_min)


def losses(cache: str, out: Path, pythonpath: str, args) -> list[float]:
    spec = dict(cache=cache, out=str(out), epochs=args.epochs, batch=args.batch, split=args.split,
                channels=[int(c) for c in args.channels.split(",")])
    env = dict(os.environ, PYTHONPATH=pythonpath)
    subprocess.run([sys.executable, "-c", TRAIN, json.dumps(spec)], check=True, env=env, cwd=pythonpath)  # cwd: no other checkout first on sys.path
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="schema-4 cache")
    ap.add_argument("--new", required=True, help="schema-5 cache of the same keyframes")
    ap.add_argument("--old-code", default=None, help="checkout of the schema-4 code: also compare training losses")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--split", default="val")
    ap.add_argument("--channels", default="8,8,16,16,32,32,16,8,8")
    args = ap.parse_args()
    result = compare(args.old, args.new)
    if args.old_code:
        with tempfile.TemporaryDirectory() as tmp:
            here = str(Path(__file__).resolve().parents[1])
            a = losses(args.old, Path(tmp) / "old", args.old_code, args)
            b = losses(args.new, Path(tmp) / "new", here, args)
        result.update(steps=len(a), loss_curve_max_abs=float(np.abs(np.array(a) - np.array(b)).max()),
                      loss_first=(a[0], b[0]), loss_last=(a[-1], b[-1]))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
