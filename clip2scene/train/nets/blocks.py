"""Building blocks of the sparse students: conv + BN + ReLU, residual blocks, the shared voxel U-Net
(:class:`SparseUNet`), and the convolution-algorithm helpers. See :mod:`clip2scene.train.nets`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import spconv.pytorch as spconv
import torch
from spconv.core import ConvAlgo
from spconv.pytorch.conv import SparseConvolution
from torch import nn

from clip2scene.train.voxelize import Voxels, scatter_mean

if TYPE_CHECKING:
    from clip2scene.train.nets import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["SparseUNet", "ResidualBlock", "default_algo", "resolve_algo", "set_conv_algo", "count_parameters",
           "check_same_indices"]


def default_algo(device: str | torch.device) -> ConvAlgo | None:
    """``ConvAlgo.Native`` for CPU, ``None`` (spconv's default implicit GEMM) otherwise."""
    return ConvAlgo.Native if torch.device(device).type == "cpu" else None


def resolve_algo(algo: ConvAlgo | None) -> ConvAlgo:
    # spconv's own default for kernels with <= 32 taps on a CUDA build
    return ConvAlgo.MaskImplicitGemm if algo is None else algo


class _ConvBNReLU(nn.Module):
    """A spconv convolution followed by BatchNorm1d and ReLU on the features."""

    def __init__(self, conv: SparseConvolution, channels: int) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm1d(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        x = self.conv(x)
        return x.replace_feature(self.act(self.bn(x.features)))


class ResidualBlock(nn.Module):
    """Basic residual block: 2 x SubMConv3d k3 (+BN), identity or Linear+BN shortcut, ReLU.

    Input features (V, in_channels) -> (V, out_channels) on the same voxels.
    """

    def __init__(
        self, in_channels: int, out_channels: int, indice_key: str, algo: ConvAlgo
    ) -> None:
        super().__init__()
        self.conv1 = spconv.SubMConv3d(
            in_channels, out_channels, 3, bias=False, indice_key=indice_key, algo=algo
        )
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = spconv.SubMConv3d(
            out_channels, out_channels, 3, bias=False, indice_key=indice_key, algo=algo
        )
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.act = nn.ReLU(inplace=True)
        if in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:  # 1x1 submanifold conv == per-voxel Linear
            self.shortcut = nn.Sequential(
                nn.Linear(in_channels, out_channels, bias=False), nn.BatchNorm1d(out_channels)
            )

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        out = self.conv1(x)
        out = out.replace_feature(self.act(self.bn1(out.features)))
        out = self.conv2(out)
        feats = self.bn2(out.features) + self.shortcut(x.features)
        return out.replace_feature(self.act(feats))


def check_same_indices(a: spconv.SparseConvTensor, b: spconv.SparseConvTensor, where: str) -> None:
    """Raise if two sparse tensors do not share the exact same voxel indices (same order)."""
    ia, ib = a.indices, b.indices
    if ia.shape == ib.shape and ia.data_ptr() == ib.data_ptr():
        return  # the inverse conv hands back the very tensor the forward conv consumed
    if ia.shape != ib.shape or not torch.equal(ia, ib):
        raise RuntimeError(f"voxel indices differ at {where}; cannot join skip features")


def _check_point_inputs(vox: Voxels, point_features: torch.Tensor, in_channels: int) -> None:
    """Validate ``forward_points`` arguments (shapes only; no data-dependent checks)."""
    if point_features.ndim != 2 or point_features.shape[1] != in_channels:
        raise ValueError(
            f"expected point_features (N, {in_channels}), got {tuple(point_features.shape)}"
        )
    if point_features.shape[0] != vox.num_points:
        raise ValueError(
            f"point_features has {point_features.shape[0]} rows but vox has "
            f"{vox.num_points} points"
        )
    if not point_features.is_floating_point():
        raise ValueError(f"point_features must be floating point, got {point_features.dtype}")


class SparseUNet(nn.Module):
    """The voxel branch shared by :class:`MinkUNet` and ``SPVCNN`` (see module docstring).

    Builds ``stem``, ``down``/``enc`` (4 encoder stages) and ``up``/``dec`` (4 decoder stages);
    subclasses add their head and forward. Parameter names are those of the MinkUNet, so the
    voxel-branch weights of the two architectures are interchangeable.

    Args:
        config: the :class:`ModelConfig`.
        algo: spconv convolution algorithm for every conv; ``ConvAlgo.Native`` on CPU,
            ``None`` for spconv's CUDA default.
    """

    #: total down-sampling factor: coordinates' spatial_shape must be a multiple of this
    total_stride = 16

    def __init__(self, config: ModelConfig, algo: ConvAlgo | None = ConvAlgo.Native) -> None:
        super().__init__()
        algo = resolve_algo(algo)
        self.config = config
        cs = config.channels
        nb = config.blocks_per_stage

        def subm(cin: int, cout: int, key: str) -> SparseConvolution:
            return spconv.SubMConv3d(cin, cout, 3, bias=False, indice_key=key, algo=algo)

        self.stem = nn.Sequential(
            _ConvBNReLU(subm(config.in_channels, cs[0], "subm0"), cs[0]),
            _ConvBNReLU(subm(cs[0], cs[0], "subm0"), cs[0]),
        )
        self.down = nn.ModuleList()
        self.enc = nn.ModuleList()
        for i in range(1, 5):
            # as torchsparse's MinkUNet: the stride-2 conv keeps the width, the first
            # residual block changes it (Linear+BN shortcut)
            conv = spconv.SparseConv3d(
                cs[i - 1], cs[i - 1], 2, stride=2, bias=False, indice_key=f"down{i}", algo=algo
            )
            self.down.append(_ConvBNReLU(conv, cs[i - 1]))
            blocks = [ResidualBlock(cs[i - 1], cs[i], f"subm{i}", algo)]
            blocks += [ResidualBlock(cs[i], cs[i], f"subm{i}", algo) for _ in range(nb - 1)]
            self.enc.append(nn.Sequential(*blocks))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for j in range(1, 5):
            level = 4 - j  # resolution the decoder stage returns to
            cin, cout, cskip = cs[3 + j], cs[4 + j], cs[level]
            conv = spconv.SparseInverseConv3d(
                cin, cout, 2, bias=False, indice_key=f"down{level + 1}", algo=algo
            )
            self.up.append(_ConvBNReLU(conv, cout))
            blocks = [ResidualBlock(cout + cskip, cout, f"subm{level}", algo)]
            blocks += [ResidualBlock(cout, cout, f"subm{level}", algo) for _ in range(nb - 1)]
            self.dec.append(nn.Sequential(*blocks))

    def reset_parameters(self) -> None:
        """BN weight 1 / bias 0 (spconv and Linear keep their default Kaiming-uniform init)."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _prepare_input(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        """Validate ``x`` and return it with contiguous indices / features (row order kept)."""
        if x.features.ndim != 2 or x.features.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected features (V, {self.config.in_channels}), got {tuple(x.features.shape)}"
            )
        if x.indices.dtype != torch.int32:
            raise ValueError(f"indices must be int32, got {x.indices.dtype}")
        bad = [s for s in x.spatial_shape if int(s) % self.total_stride]
        if bad:
            # SparseConv3d(k=2, s=2) keeps floor(X / 2) cells: odd extents silently drop voxels
            raise ValueError(
                f"spatial_shape {list(x.spatial_shape)} must be a multiple of "
                f"{self.total_stride} (use voxelize(..., stride={self.total_stride}))"
            )
        if not (x.indices.is_contiguous() and x.features.is_contiguous()):
            # spconv silently computes wrong results from non-contiguous indices
            # (e.g. straight from nonzero()); the copy keeps the row order.
            x = spconv.SparseConvTensor(
                x.features.contiguous(), x.indices.contiguous(), x.spatial_shape, x.batch_size
            )
        return x

    def _voxel_input(self, vox: Voxels, point_features: torch.Tensor) -> spconv.SparseConvTensor:
        """Per-voxel mean of ``point_features`` (N, in_channels) wrapped as a sparse tensor."""
        _check_point_inputs(vox, point_features, self.config.in_channels)
        dtype = self.stem[0].bn.weight.dtype
        feats = scatter_mean(point_features.to(dtype), vox.point2voxel, vox.num_voxels)
        return vox.sparse_tensor(feats)

    def forward_voxels(self, vox: Voxels, point_features: torch.Tensor) -> torch.Tensor:
        """Per-voxel embedding: (V, out_channels) float32 in ``vox`` order, row v = voxel v.

        ``forward_points(vox, point_features)`` (without ``xyz``) is exactly this gathered with
        ``vox.point2voxel``; training takes it ungathered (the losses accept per-voxel features).
        """
        return self.forward(self._voxel_input(vox, point_features))


def set_conv_algo(model: nn.Module, algo: ConvAlgo | None) -> nn.Module:
    """Set the convolution algorithm of every spconv conv in ``model`` (in place; returns it).

    ``None`` selects spconv's CUDA default (``ConvAlgo.MaskImplicitGemm``). The weight layout
    does not depend on the algorithm in spconv 2.3, so this is safe after loading weights.
    """
    resolved = resolve_algo(algo)
    for m in model.modules():
        if isinstance(m, SparseConvolution):
            m.algo = resolved
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) in ``model``; only ``requires_grad`` ones if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
