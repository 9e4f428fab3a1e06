"""Measure what projecting lidar sweeps into the KEYFRAME's camera images costs.

precompute moves the K-1 previous sweeps into the keyframe lidar frame (both ego poses) and
projects them into the keyframe's six images. Static points land where they should; points of
moving objects are displaced by v * dt. On the synthetic sample (whose images are rendered with
class colours, so the pixel colour is an oracle label) this script reports, per sweep age, how
often the class read from the image at a point's pixel equals the point's own class.
Keyframe points give the baseline (occlusion, pixel rounding); a sweep point's class is that of
its nearest keyframe point within 0.2 m (sweeps have no lidarseg), others are skipped.

    .venv/bin/python benchmarks/sweep_projection.py [--scenes 2 --keyframes 4 --sweeps 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip2scene.precompute.datasets.nuscenes import NuScenes
from clip2scene.precompute.datasets.nuscenes import merged_points
from clip2scene.precompute.pipeline import assign_cameras
from clip2scene.classes import NUSCENES_CATEGORY_COLOURS as CLASS_COLOURS
from clip2scene.samples.nuscenes import SampleConfig, make_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=2)
    ap.add_argument("--keyframes", type=int, default=4)
    ap.add_argument("--sweeps", type=int, default=3, help="K lidar frames per scan (keyframe + K-1 sweeps)")
    args = ap.parse_args()
    root = make_sample(Path(tempfile.mkdtemp()) / "root",
                       SampleConfig(scenes=args.scenes, keyframes=args.keyframes, sweeps=max(args.sweeps - 1, 1)))
    ds = NuScenes(root, "v1.0-mini")
    hits = np.zeros(args.sweeps)
    total = np.zeros(args.sweeps)
    for scan in ds.scans(sweeps=args.sweeps):
        kf = scan.native
        xyzi, sweep, n_key = merged_points(kf)
        fine = np.fromfile(kf.lidarseg, dtype=np.uint8)
        key = torch.from_numpy(xyzi[:n_key, :3])
        d, nn = torch.cdist(torch.from_numpy(xyzi[n_key:, :3]), key).min(dim=1)
        cls = np.concatenate([fine, np.where(d.numpy() < 0.2, fine[nn.numpy()], 255)]).astype(np.int64)
        idx, cams, uv = assign_cameras(xyzi[:, :3], ds, scan)
        classes = np.array(sorted(set(fine.tolist())))
        palette = np.array([CLASS_COLOURS[c] for c in classes], dtype=np.float64)
        palette /= np.linalg.norm(palette, axis=1, keepdims=True)
        for c, cam in enumerate(kf.cameras):
            rows = idx[cams == c]
            if not len(rows):
                continue
            img = np.asarray(Image.open(cam.path).convert("RGB"), dtype=np.float64)
            px = np.clip(np.round(uv[cams == c]).astype(int), 0, [cam.width - 1, cam.height - 1])
            rgb = img[px[:, 1], px[:, 0]]
            rgb /= np.linalg.norm(rgb, axis=1, keepdims=True) + 1e-9
            oracle = classes[(rgb @ palette.T).argmax(1)]
            ok = cls[rows] != 255
            for k in range(args.sweeps):
                m = ok & (sweep[rows] == k)
                hits[k] += (oracle[m] == cls[rows][m]).sum()
                total[k] += m.sum()
    print("| lidar frame | points | image class == point class |")
    print("|---|---|---|")
    for k in range(args.sweeps):
        name = "keyframe" if k == 0 else f"sweep -{k} ({50 * k} ms)"
        print(f"| {name} | {int(total[k])} | {100 * hits[k] / max(total[k], 1):.1f}% |")


if __name__ == "__main__":
    main()
