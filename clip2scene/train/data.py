"""Training data from the cache: one item per scan, batched for the sparse network.

Each item holds the scan's points (keyframe + cached sweeps, optionally only the first K lidar
frames), the input features (cached scaled to 0..1: intensity, or RGB), the MaskCLIP pseudo-label of every camera-visible
point (argmax of the teacher's class scores; -1 for points no camera sees), the visible points'
class scores and (when asked, for SSR) teacher features, sampled from the cached per-image maps
at the point's view (`views`: "border" or "mean", see storage.sampling), and the ground-truth label when the cache has
one. Training-time augmentation: random rotation about z and random flips of x and y.

`EpochSampler` fixes the order of the scans in each epoch from (seed, epoch) alone and, under
DDP, gives rank r every N-th scan of that order, so N ranks with batch B / N together see the
same global batches as one process with batch B.

    ds = ScanDataset(cache, cache.indices("train"), augment=True, seed=0)
    sampler = EpochSampler(len(ds), seed=0)      # rank=r, world_size=N under DDP
    loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate)
    sampler.set_epoch(0); ds.set_epoch(0)
    batch = next(iter(loader))   # dict of tensors, see `collate`
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from clip2scene.storage import Cache


class ScanDataset(Dataset):
    """Scans `indices` of `cache` as training/evaluation items (see module docstring)."""

    def __init__(self, cache: Cache, indices: np.ndarray, augment: bool = False, seed: int = 0,
                 features: bool = False, sweeps: int | None = None, views: str = "border"):
        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64)
        self.augment = augment
        self.seed = seed
        self.features = features  # read the (large) teacher features too
        self.sweeps = sweeps  # keep points of the first K lidar frames only (None = all cached)
        self.views = views  # teacher view rule of Cache.read_scan: "border" or "mean"
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations depend on (seed, epoch, scan): reproducible across workers and resumes."""
        self.epoch = epoch

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        """`item` = dataset position, or (position, epoch) from an epoch-tagging sampler (so that
        persistent DataLoader workers, which keep their own copy of the dataset, still augment
        by the right epoch)."""
        epoch = self.epoch
        if isinstance(item, tuple):
            item, epoch = item
        index = int(self.indices[item])
        scan = self.cache.read_scan(index, features=self.features, views=self.views)
        xyz, feat, pair_point = scan.xyz, scan.feat, scan.pair_point.astype(np.int64)
        pair_logits, pair_features, label = scan.pair_logits, scan.pair_features, scan.label
        if self.sweeps is not None and scan.sweep.max(initial=0) >= self.sweeps:
            keep = scan.sweep < self.sweeps
            new_index = np.cumsum(keep) - 1
            rows = keep[pair_point]
            xyz, feat, pair_point = xyz[keep], feat[keep], new_index[pair_point[rows]]
            pair_logits = pair_logits[rows] if pair_logits is not None else None
            pair_features = pair_features[rows] if pair_features is not None else None
            label = label[keep] if label is not None else None
        xyz = xyz.astype(np.float32, copy=True)
        feat = feat.astype(np.float32, copy=False)
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, index])
            theta = rng.uniform(0, 2 * np.pi)
            c, s = np.cos(theta), np.sin(theta)
            rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)
            xyz = xyz @ rot.T
            flips = rng.random(2) < 0.5
            xyz[:, 0] *= -1 if flips[0] else 1
            xyz[:, 1] *= -1 if flips[1] else 1
        target = np.full(len(xyz), -1, dtype=np.int64)
        if len(pair_point) and pair_logits is not None:
            target[pair_point] = pair_logits.astype(np.float32).argmax(axis=1)
        label = label.astype(np.int64) if label is not None else np.zeros(len(xyz), np.int64)
        item = dict(
            index=index,
            xyz=torch.from_numpy(xyz),
            feat=torch.from_numpy(np.ascontiguousarray(feat)),
            target=torch.from_numpy(target),
            label=torch.from_numpy(label),
            visible=torch.from_numpy(target >= 0),
            pair_point=torch.from_numpy(pair_point),
        )
        if pair_logits is not None:
            item["pair_logits"] = torch.from_numpy(np.ascontiguousarray(pair_logits))
        if self.features:
            item["pair_features"] = torch.from_numpy(np.ascontiguousarray(pair_features))
        return item


class EpochSampler(Sampler[int]):
    """Dataset positions for one rank, in a per-epoch shuffled order (DistributedSampler-like).

    Every rank computes the same permutation of range(n) from (seed, epoch) alone; when n is
    not a multiple of `world_size` the permutation is padded by repeating its first positions
    (so every rank runs the same number of steps), and rank r takes positions r, r + N, ... of
    it. With a per-rank batch of B / N, step s of rank r holds positions s*B + r + N*j of the
    padded permutation: the N ranks together see exactly the global batch that one process
    with batch B sees at step s (plus the padding repeats in the last step).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 tag_epoch: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} out of range")
        self.n = n  # number of dataset items
        self.seed = seed  # shuffle seed, combined with the epoch
        self.shuffle = shuffle  # False: 0, 1, ..., n-1 every epoch
        self.rank = rank
        self.world_size = world_size
        self.tag_epoch = tag_epoch  # yield (position, epoch) pairs (for persistent workers)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation (call before iterating, like ScanDataset.set_epoch)."""
        self.epoch = epoch

    def order(self) -> list[int]:
        """The epoch's global order (padded to a multiple of world_size), the same on every rank."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        total = math.ceil(self.n / self.world_size) * self.world_size
        while len(order) < total:
            order += order[: total - len(order)]
        return order

    def __iter__(self):
        mine = self.order()[self.rank::self.world_size]
        return iter([(i, self.epoch) for i in mine] if self.tag_epoch else mine)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)


def collate(items: list[dict]) -> dict:
    """Concatenate items: xyz (N, 3) float32, feat (N, F) float32, target (N,) int64 (-1 = none),
    label (N,) int64 (0 = ignore), visible (N,) bool, batch (N,) int64 item index, index (B,) scan
    ids, pair_point (M,) int64 index into the batch's points, pair_logits (M, C) float16 (caches
    with a teacher) and, when read, pair_features (M, D) float16."""
    keys = ["xyz", "feat", "target", "label", "visible"]
    keys += [k for k in ("pair_logits", "pair_features") if k in items[0]]
    out = {k: torch.cat([it[k] for it in items]) for k in keys}
    out["batch"] = torch.cat([torch.full((len(it["xyz"]),), b, dtype=torch.int64) for b, it in enumerate(items)])
    starts = np.cumsum([0] + [len(it["xyz"]) for it in items[:-1]])
    out["pair_point"] = torch.cat([it["pair_point"] + int(s) for it, s in zip(items, starts)])
    out["index"] = torch.tensor([it["index"] for it in items], dtype=torch.int64)
    return out
