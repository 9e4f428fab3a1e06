"""Voxelisation of batched point clouds for the spconv student, and per-voxel averaging.

The student network works on sparse voxels; the teacher targets and the evaluation labels live
on points. This module maps between the two, fully vectorised in torch (no per-point Python):

    from clip2scene.train.voxelize import voxelize, scatter_mean

    vox = voxelize(xyz, batch, voxel_size=0.1)           # xyz (N, 3) float32, batch (N,) int64
    feats = scatter_mean(intensity[:, None], vox.point2voxel, vox.num_voxels)   # (V, 1)
    x = vox.sparse_tensor(feats)                          # spconv.pytorch.SparseConvTensor
    per_voxel = model(x)                                  # (V, C), same order as vox.coords
    per_point = per_voxel[vox.point2voxel]                # (N, C) back on the points

Grid convention: ``grid = floor(xyz / voxel_size)`` (computed in float64), then ONE offset,
the minimum over the whole batch, is subtracted from every item, so all coordinates are >= 0
and each scan keeps its own relative geometry (items are separated by the batch column, never
by shifting them differently). ``spatial_shape`` is ``max + 1`` rounded UP to a multiple of
``stride`` (default 16 = the MinkUNet's total stride). The rounding is required, not cosmetic:
spconv's ``SparseConv3d(k=2, s=2)`` produces ``floor(X / 2)`` output cells, so with an odd
extent the voxels in the last slab are silently dropped by the down-sampling convolution.

Voxel order is deterministic: voxels are sorted by the linearised key
``((b * X + x) * Y + y) * Z + z`` (``torch.unique(sorted=True)``), i.e. by batch item first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: Total down-sampling factor of the default student (4 stride-2 stages); the default rounding
#: unit of ``Voxels.spatial_shape``.
DEFAULT_STRIDE = 16

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True, eq=False)
class Voxels:
    """Result of :func:`voxelize`.

    Attributes:
        coords: (V, 4) int32 ``[batch, x, y, z]``, all >= 0, sorted by linearised key; this is
            the ``indices`` argument of ``spconv.pytorch.SparseConvTensor``.
        point2voxel: (N,) int64, index into ``coords`` of the voxel holding each input point.
        spatial_shape: ``[X, Y, Z]`` grid extent (list of int), a multiple of the stride used.
        batch_size: number of batch items (``batch.max() + 1`` unless given explicitly).
        origin: (3,) int64 grid offset that was subtracted, i.e.
            ``coords[:, 1:] == floor(xyz / voxel_size) - origin`` for the points of each voxel.
        voxel_size: the voxel edge length in metres.
    """

    coords: torch.Tensor
    point2voxel: torch.Tensor
    spatial_shape: list[int]
    batch_size: int
    origin: torch.Tensor
    voxel_size: float

    @property
    def num_voxels(self) -> int:
        """V, the number of occupied voxels."""
        return int(self.coords.shape[0])

    @property
    def num_points(self) -> int:
        """N, the number of input points."""
        return int(self.point2voxel.shape[0])

    def sparse_tensor(self, features: torch.Tensor):
        """Wrap per-voxel ``features`` (V, C) float into a ``spconv.pytorch.SparseConvTensor``."""
        import spconv.pytorch as spconv  # local import: keeps this module importable without spconv

        if features.shape[0] != self.num_voxels:
            raise ValueError(
                f"features has {features.shape[0]} rows but there are {self.num_voxels} voxels"
            )
        return spconv.SparseConvTensor(
            features.contiguous(), self.coords, list(self.spatial_shape), self.batch_size
        )


def voxelize(
    xyz: torch.Tensor,
    batch: torch.Tensor,
    voxel_size: float,
    *,
    stride: int = DEFAULT_STRIDE,
    batch_size: int | None = None,
) -> Voxels:
    """Quantise batched points to a sparse voxel grid.

    Args:
        xyz: (N, 3) float (float32 expected) point coordinates in metres.
        batch: (N,) integer (int64 expected) batch-item index of every point, >= 0.
        voxel_size: voxel edge length in metres, > 0.
        stride: ``spatial_shape`` is rounded up to a multiple of this (>= 1); use the network's
            total stride (16 for the default MinkUNet) so every down-sampling stage keeps all
            voxels.
        batch_size: number of batch items; defaults to ``batch.max() + 1`` (0 for no points).
            Pass it when trailing items may be empty.

    Returns:
        :class:`Voxels` on the device of ``xyz``.

    Raises:
        ValueError: on bad shapes, non-finite coordinates, negative batch indices,
            ``voxel_size <= 0`` or ``stride < 1``.
    """
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must have shape (N, 3), got {tuple(xyz.shape)}")
    if batch.ndim != 1 or batch.shape[0] != xyz.shape[0]:
        raise ValueError(
            f"batch must have shape ({xyz.shape[0]},), got {tuple(batch.shape)}"
        )
    if not xyz.is_floating_point():
        raise ValueError(f"xyz must be floating point, got {xyz.dtype}")
    if batch.is_floating_point() or batch.dtype == torch.bool:
        raise ValueError(f"batch must be an integer tensor, got {batch.dtype}")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")

    device = xyz.device
    n = xyz.shape[0]
    batch = batch.to(device=device, dtype=torch.int64)
    if n == 0:
        bs = 0 if batch_size is None else int(batch_size)
        return Voxels(
            coords=torch.zeros((0, 4), dtype=torch.int32, device=device),
            point2voxel=torch.zeros((0,), dtype=torch.int64, device=device),
            spatial_shape=[stride] * 3,
            batch_size=bs,
            origin=torch.zeros(3, dtype=torch.int64, device=device),
            voxel_size=float(voxel_size),
        )
    if not bool(torch.isfinite(xyz).all()):
        raise ValueError("xyz contains non-finite values")
    if int(batch.min()) < 0:
        raise ValueError("batch indices must be >= 0")
    bs = int(batch.max()) + 1
    if batch_size is not None:
        if batch_size < bs:
            raise ValueError(f"batch_size={batch_size} but batch holds index {bs - 1}")
        bs = int(batch_size)

    # float64 so that large coordinates / small voxels do not lose integer precision
    grid = torch.floor(xyz.to(torch.float64) / float(voxel_size)).to(torch.int64)  # (N, 3)
    origin = grid.min(dim=0).values  # (3,) global offset, shared by all batch items
    grid = grid - origin
    extent = grid.max(dim=0).values + 1  # (3,)
    shape = ((extent + stride - 1) // stride) * stride
    spatial_shape = [int(s) for s in shape.tolist()]
    if max(spatial_shape) > _INT32_MAX:
        raise ValueError(f"grid extent {spatial_shape} does not fit in int32 coordinates")
    cells = spatial_shape[0] * spatial_shape[1] * spatial_shape[2]
    if cells * bs > _INT32_MAX:
        # Normal for real scans at batch 8 (~2,000 x 2,000 x 200 cells each): spconv 2.3 then hashes
        # with 64-bit keys (ops.py: spatial_volume >= INT32_MAX), which gives the same outputs
        # (tests/train/test_spvcnn.py::test_grid_beyond_int32_cells_gives_the_same_outputs).
        logger.debug("voxel grid %s x batch %d = %d cells exceeds int32: spconv uses 64-bit hash keys",
                     spatial_shape, bs, cells * bs)

    sx, sy, sz = spatial_shape
    key = ((batch * sx + grid[:, 0]) * sy + grid[:, 1]) * sz + grid[:, 2]  # (N,) int64
    ukey, point2voxel = torch.unique(key, sorted=True, return_inverse=True)
    z = ukey % sz
    rest = ukey // sz
    y = rest % sy
    rest = rest // sy
    x = rest % sx
    b = rest // sx
    coords = torch.stack([b, x, y, z], dim=1).to(torch.int32).contiguous()  # (V, 4)
    logger.debug(
        "voxelize: %d points -> %d voxels, spatial_shape=%s, batch_size=%d",
        n,
        coords.shape[0],
        spatial_shape,
        bs,
    )
    return Voxels(
        coords=coords,
        point2voxel=point2voxel.to(torch.int64),
        spatial_shape=spatial_shape,
        batch_size=bs,
        origin=origin,
        voxel_size=float(voxel_size),
    )


def scatter_mean(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of ``values`` rows grouped by ``index``.

    Args:
        values: (N, C) (or (N,) / (N, *)) floating-point tensor.
        index: (N,) int64 target row of every value, in ``[0, size)``.
        size: number of output rows.

    Returns:
        (size, C) tensor, same dtype/device as ``values``; rows that receive no value are 0.
        Differentiable w.r.t. ``values`` (built on ``index_add``).
    """
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")
    if index.ndim != 1 or index.shape[0] != values.shape[0]:
        raise ValueError(
            f"index must have shape ({values.shape[0]},), got {tuple(index.shape)}"
        )
    index = index.to(device=values.device, dtype=torch.int64)
    sums = values.new_zeros((size, *values.shape[1:])).index_add(0, index, values)
    counts = values.new_zeros((size,)).index_add(
        0, index, values.new_ones((values.shape[0],))
    )
    counts = counts.clamp(min=1).view(size, *([1] * (values.ndim - 1)))
    return sums / counts
