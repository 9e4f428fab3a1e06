"""Evidence that training learns: a cache whose teacher logits are the synthetic sample's TRUE
labels with 40% of points flipped to random classes. 3D consistency must denoise: the trained
network's mIoU on the true labels beats the noisy labels' own mIoU, with SCR alone and with the
full method (SCR + SSR + S3).

Measured in this setting (tiny SPVCNN, 60 epochs x 3 steps, 64 rays per ring): noisy labels
0.341, SCR 0.479, SCR + SSR 0.474, SCR + S3 0.416, full 0.423. The four-way comparison at 128
rays: noisy 0.313, SCR 0.463, SCR + SSR 0.446, SCR + S3 0.403, full 0.394. 120 epochs: SCR 0.599,
full 0.566. S3 variants (64 rays, 60 epochs): switch prob 0.25 0.445, switch at epoch 45 0.453,
whole-batch switch 0.398; the network is at 0.422 when S3 starts and stays there, while SCR
alone keeps improving. With 60% of points labelled and S3 applied to unlabelled points too: SCR
0.475, full 0.416, SCR + S3 0.385. SSR and S3 therefore do NOT beat SCR alone here (the pixel
features carry no information beyond the noisy label, 0.1 m cells of a sparse scan hold about
one point, and S3's own-prediction targets freeze the network's errors), so that comparison is not asserted."""

import numpy as np
import pytest
import torch

from clip2scene.classes import NUSCENES_CLASSES
from clip2scene.storage import CacheWriter, ScanRecord
from clip2scene.storage.writer import images_from_point_values
from clip2scene.train.evaluate import EvalConfig, evaluate
from clip2scene.train.metrics import ConfusionMatrix
from clip2scene.train.nets import ModelConfig
from clip2scene.train.trainer import TrainConfig, train

C, D = len(NUSCENES_CLASSES), 32
NOISE = 0.4
AZIMUTH = 64  # rays per ring: ~1.5k points per keyframe keeps the runs short
EPOCHS, LR = 60, 0.1
PIXEL_NOISE = 0.05  # per-dimension noise on the pixel features (norm ~0.3 for D = 32)
SMALL = ModelConfig(arch="spvcnn", channels=(16, 16, 32, 32, 64, 64, 32, 16, 16), blocks_per_stage=1)


def build_noisy_cache(root, out, seed=0):
    """Cache through the storage API: keyframe + 2 sweeps per scan, as precompute builds it (every
    point, sweep points included, gets a teacher label). A keyframe point's true label is its
    lidarseg label; a sweep point's is the label of its nearest keyframe point (sweeps carry no
    lidarseg). Each teacher label is the true one flipped with probability NOISE to a uniform
    random class present in the sample (flips to absent classes would only measure whether a
    class is ever predicted); the 'pixel feature' is the text embedding of the noisy label plus
    noise. Only keyframe points carry ground truth for evaluation."""
    from clip2scene.precompute.datasets.nuscenes import NuScenes
    from clip2scene.precompute.datasets.nuscenes import merged_points

    rng = np.random.default_rng(seed)
    text = np.linalg.qr(rng.normal(size=(D, D)))[0][:C].astype(np.float32)
    ds = NuScenes(root, "v1.0-mini")
    meta = dict(dataset=dict(name="nuscenes", version="v1.0-mini", dataroot=str(root), split=None),
                teacher=dict(model="noisy-labels", weights="none", weights_sha256="random", quick_gelu=False,
                             image_size=[0, 0], class_names=list(NUSCENES_CLASSES), templates_sha256="-",
                             embed_dim=D, patch_size=0),
                class_names=list(NUSCENES_CLASSES), eval_class_names=list(NUSCENES_CLASSES),
                prompt_to_eval=list(range(1, C + 1)), class_set="nuscenes", sweeps=3, cameras=[],
                point_features=["intensity"], voxel_size=0.1)
    noisy_cm = ConfusionMatrix(C + 1, 0)
    scans = []
    for kf in ds.keyframes(sweeps=3):
        xyzi, sweep, n_key = merged_points(kf)
        label = np.zeros(len(xyzi), np.uint8)
        label[:n_key] = ds.load_labels(kf, n_key)
        key = torch.from_numpy(xyzi[:n_key, :3])
        nearest = torch.cat([torch.cdist(torch.from_numpy(c), key).argmin(1)
                             for c in np.array_split(xyzi[n_key:, :3], max(1, (len(xyzi) - n_key) // 4096))])
        true = label.copy()
        true[n_key:] = label[:n_key][nearest.numpy()]
        scans.append((kf, xyzi, sweep, label, true))
    present = np.unique(np.concatenate([s[3] for s in scans]))
    present = present[present > 0].astype(np.int64) - 1
    with CacheWriter(out, meta, C, D, has_labels=True) as w:
        for kf, xyzi, sweep, label, true in scans:
            idx = np.flatnonzero(true > 0).astype(np.int32)
            noisy = true[idx].astype(np.int64) - 1
            flip = rng.random(len(idx)) < NOISE
            noisy[flip] = rng.choice(present, flip.sum())
            noisy_cm.update(label[idx], noisy + 1)  # scored on keyframe points (sweeps' label is 0)
            feats = text[noisy] + rng.normal(scale=PIXEL_NOISE, size=(len(idx), D)).astype(np.float32)
            feats /= np.linalg.norm(feats, axis=1, keepdims=True)
            w.append(ScanRecord(token=kf.sample_token, scene=kf.scene, split="train", timestamp=kf.timestamp,
                                lidar_path="", xyz=xyzi[:, :3].copy(), feat=xyzi[:, 3:4] / np.float32(255.0), sweep=sweep, label=label, pair_point=idx,
                                **images_from_point_values(np.eye(C, dtype=np.float16)[noisy], feats)))
        w.set_text_embeddings(text)
    return noisy_cm.miou()


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    from clip2scene.samples.nuscenes import SampleConfig, make_sample

    tmp = tmp_path_factory.mktemp("noisy")
    root = make_sample(tmp / "root", SampleConfig(scenes=2, keyframes=3, sweeps=2, lidar_azimuth_steps=AZIMUTH,
                                                  image_width=64, image_height=36))
    return tmp / "cache.zarr", build_noisy_cache(root, tmp / "cache.zarr")


def run(cache, out, **changes):
    # the schedule these numbers were measured with: LR as given at batch 2, no warm-up (the issue-18
    # defaults would halve it for batch 2 against the reference batch 4 and warm up half an epoch)
    cfg = TrainConfig(cache=str(cache), out=str(out), epochs=EPOCHS, batch_size=2, lr=LR, model=SMALL,
                      warmup_steps=0, lr_scaling="none", **changes)
    ckpt = train(cfg, progress=False)["checkpoint"]
    return evaluate(EvalConfig(checkpoint=ckpt, cache=str(cache), split="train"), progress=False)


@pytest.mark.slow
def test_training_denoises_noisy_pseudo_labels(noisy, tmp_path):
    cache, noisy_miou = noisy
    scr = run(cache, tmp_path / "scr", ssr_weight=0.0, self_training="off")
    full = run(cache, tmp_path / "full")
    print(f"noisy labels mIoU {noisy_miou:.3f}; SCR {scr['miou']:.3f}; SCR+SSR+S3 {full['miou']:.3f}")
    assert scr["teacher_miou_visible"] == pytest.approx(noisy_miou)
    assert scr["miou"] > noisy_miou + 0.08
    assert full["miou"] > noisy_miou + 0.04
