"""Stage two's view of the teacher: sample the per-image patch-grid maps at the pairs' pixels.

The convention is that of `torch.nn.functional.grid_sample(mode="bilinear",
padding_mode="border", align_corners=False)` with the normalised coordinate
x = (u + 0.5) / W * 2 - 1 (u in pixels of the ORIGINAL image of width W, the centre of the
top-left pixel at 0), written out in numpy so that the storage package needs no torch:

    gx = (u + 0.5) / W * w - 0.5      # in patch units of the (h, w) grid; patch centres at integers
    gx = clip(gx, 0, w - 1)           # border padding
    value = bilinear mix of the (up to) four patches around (gx, gy)

Features are L2-normalised on the grid (at write time) and again after sampling. With
`views="mean"` a point seen by several images gets the mean of its per-view samples (features:
each normalised, averaged, normalised again), as OpenScene fuses views; with `views="border"`
(default) the first pair of each point, the view where it lies farthest from the image border.
"""

from __future__ import annotations

import numpy as np

VIEW_RULES = ("border", "mean")


def grid_coords(uvn: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """uvn (p, 2) = ((u + 0.5) / W, (v + 0.5) / H) -> corner indices and weights on an (h, w)
    grid: (y0, y1, x0, x1) int64 (p,) and (wy, wx) float32 (p,) weights of y1 / x1."""
    h, w = grid
    gx = np.clip(uvn[:, 0].astype(np.float32) * np.float32(w) - np.float32(0.5), 0, w - 1)
    gy = np.clip(uvn[:, 1].astype(np.float32) * np.float32(h) - np.float32(0.5), 0, h - 1)
    x0 = np.floor(gx).astype(np.int64)
    y0 = np.floor(gy).astype(np.int64)
    wx = (gx - x0).astype(np.float32)
    wy = (gy - y0).astype(np.float32)
    return y0, np.minimum(y0 + 1, h - 1), x0, np.minimum(x0 + 1, w - 1), wy, wx


def sample(maps: np.ndarray, image: np.ndarray, uvn: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Bilinear samples of per-image maps.

    maps: (I, h, w, K) float16/float32, or int8 with `scale` (I, h, w) float16 (value = q * scale);
    image: (p,) index into I; uvn: (p, 2) float normalised positions (see `grid_coords`).
    Returns (p, K) float32.
    """
    n_img, h, w, k = maps.shape
    out = np.zeros((len(image), k), np.float32)
    if len(image) == 0:
        return out
    y0, y1, x0, x1, wy, wx = grid_coords(uvn, (h, w))
    flat = maps.reshape(n_img * h * w, k)
    flat_scale = scale.reshape(-1).astype(np.float32) if scale is not None else None
    base = image.astype(np.int64) * (h * w)
    for yy, xx, wgt in ((y0, x0, (1 - wy) * (1 - wx)), (y0, x1, (1 - wy) * wx),
                        (y1, x0, wy * (1 - wx)), (y1, x1, wy * wx)):
        idx = base + yy * w + xx
        if flat_scale is not None:
            wgt = wgt * flat_scale[idx]
        out += flat[idx].astype(np.float32) * wgt[:, None]
    return out


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised (zero rows stay zero), float32."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def first_of_point(pair_point: np.ndarray) -> np.ndarray:
    """(p,) bool: the first pair of each point (pairs of a point are contiguous)."""
    first = np.ones(len(pair_point), bool)
    first[1:] = pair_point[1:] != pair_point[:-1]
    return first


def fuse(values: np.ndarray, pair_point: np.ndarray) -> np.ndarray:
    """Mean of `values` (p, K) over each point's contiguous pairs: (m, K), m = distinct points."""
    starts = np.flatnonzero(first_of_point(pair_point))
    counts = np.diff(np.append(starts, len(pair_point)))
    return np.add.reduceat(values, starts, axis=0) / counts[:, None].astype(np.float32) if len(starts) else \
        np.zeros((0,) + values.shape[1:], np.float32)
