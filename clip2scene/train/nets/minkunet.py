"""MinkUNet student: the shared voxel U-Net (:class:`~clip2scene.train.nets.blocks.SparseUNet`) plus a
``Linear`` head. Architecture: see :mod:`clip2scene.train.nets`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import spconv.pytorch as spconv
import torch
from spconv.core import ConvAlgo
from torch import nn

from clip2scene.train.nets.blocks import SparseUNet, check_same_indices
from clip2scene.train.voxelize import Voxels

if TYPE_CHECKING:
    from clip2scene.train.nets import ModelConfig

__all__ = ["MinkUNet"]


class MinkUNet(SparseUNet):
    """MinkUNet-style sparse U-Net (see module docstring): voxel branch + ``Linear`` head.

    Args:
        config: the :class:`ModelConfig`.
        algo: spconv convolution algorithm for every conv; ``ConvAlgo.Native`` on CPU,
            ``None`` for spconv's CUDA default.
    """

    def __init__(self, config: ModelConfig, algo: ConvAlgo | None = ConvAlgo.Native) -> None:
        super().__init__(config, algo)
        self.head = nn.Linear(config.channels[8], config.out_channels)
        self.reset_parameters()

    @property
    def embed_channels(self) -> int:
        """Width of :meth:`embed`'s output (``channels[-1]``)."""
        return self.config.channels[-1]

    def embed_sparse(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        """Backbone output as a sparse tensor on the input voxels (features (V, channels[-1]))."""
        x = self._prepare_input(x)
        h = self.stem(x)
        skips = [h]
        for down, enc in zip(self.down, self.enc):
            h = enc(down(h))
            skips.append(h)
        for j, (up, dec) in enumerate(zip(self.up, self.dec), start=1):
            skip = skips[4 - j]
            h = up(h)
            check_same_indices(h, skip, f"decoder stage {j}")
            h = h.replace_feature(torch.cat([h.features, skip.features], dim=1))
            h = dec(h)
        check_same_indices(h, x, "network output")
        return h

    def embed(self, x: spconv.SparseConvTensor) -> torch.Tensor:
        """Per-voxel backbone features before the head.

        Args:
            x: SparseConvTensor with features (V, in_channels) float32 and indices (V, 4) int32.

        Returns:
            (V, channels[-1]) features, rows in the order of ``x.indices``.
        """
        return self.embed_sparse(x).features

    def forward(self, x: spconv.SparseConvTensor) -> torch.Tensor:
        """Per-voxel embedding in the teacher's text space.

        Args:
            x: SparseConvTensor with features (V, in_channels) float32 and indices (V, 4) int32
               (``spatial_shape`` a multiple of :attr:`total_stride`, see ``voxelize``).

        Returns:
            (V, out_channels) float32, rows in the SAME order as ``x.indices``.
        """
        return self.head(self.embed(x)).float()

    def embed_points(
        self, vox: Voxels, point_features: torch.Tensor, xyz: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-point backbone features before the head: (N, channels[-1]) float32.

        Same arguments as :meth:`forward_points`; every point gets its voxel's features.
        """
        return self.embed(self._voxel_input(vox, point_features))[vox.point2voxel]

    def forward_points(
        self, vox: Voxels, point_features: torch.Tensor, xyz: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-point embedding in the teacher's text space.

        ``scatter_mean(point_features, vox.point2voxel)`` -> :meth:`forward` -> gather with
        ``vox.point2voxel``: all points of a voxel get the same output.

        Args:
            vox: :class:`~clip2scene.train.voxelize.Voxels` of the N points (``voxelize`` with
                ``stride`` a multiple of :attr:`total_stride`, the default).
            point_features: (N, in_channels) float per-point input (intensity), in the order of
                the points given to ``voxelize``.
            xyz: accepted for interface parity with ``SPVCNN.forward_points`` and ignored.

        Returns:
            (N, out_channels) float32, row i = point i.
        """
        return self.forward_voxels(vox, point_features)[vox.point2voxel]
