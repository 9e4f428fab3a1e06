"""The 3D student: sparse-convolution networks built on spconv 2.x (MinkUNet and SPVCNN).

The network maps per-point input features (intensity) to a per-point embedding in the teacher's
text space (512-d for CLIP ViT-B/16), which is compared with the cached CLIP text embeddings.
Both architectures (``ModelConfig.arch`` in :data:`KNOWN_ARCHS`) share one point-level
interface, which is what the trainer should call:

    from clip2scene.train.model import ModelConfig, build_model
    from clip2scene.train.voxelize import voxelize

    model = build_model(ModelConfig(arch="spvcnn"), device="cpu")   # ConvAlgo.Native on CPU
    vox = voxelize(xyz, batch, 0.1)
    out = model.forward_points(vox, intensity[:, None])   # (N, 512) float32, point order kept
    emb = model.embed_points(vox, intensity[:, None])     # (N, E) features before the head

Both also keep a voxel-level ``model(x)`` on a ``SparseConvTensor`` -> (V, out_channels); for
MinkUNet ``forward_points`` is exactly ``model(vox.sparse_tensor(scatter_mean(feats, ...)))``
gathered with ``vox.point2voxel``. SPVCNN lives in :mod:`clip2scene.train.spvcnn`.

MinkUNet architecture (as the torchsparse MinkUNet of SPVNAS / CLIP2Scene, channels ``cs`` of 9):
stem = 2 x (SubMConv3d k3 + BN + ReLU) -> cs[0];
encoder stage i=1..4 = SparseConv3d k2 s2 (indice_key ``down{i}``) + BN + ReLU keeping width
cs[i-1], then ``blocks_per_stage`` residual basic blocks of SubMConv3d k3 (indice_key
``subm{i}``), the first one cs[i-1] -> cs[i] with a Linear+BN shortcut when the width changes;
decoder stage j=1..4 = SparseInverseConv3d k2 reusing ``down{5-j}`` + BN + ReLU -> cs[4+j],
concatenation with the encoder features of that resolution, then residual blocks (the first
one has a Linear+BN shortcut to reduce the concatenated width); head = Linear(cs[8] -> out).
The inverse convolutions restore exactly the encoder's voxel indices (same tensor), so the
output rows are in the same order as the input rows; this is checked at every skip join.

Parameter count (default widths, 2 blocks per stage, out 512, formula in
tests/train/test_spvcnn.py::expected_params): the shared voxel branch has 21,718,880;
MinkUNet adds Linear(96 -> 512) = 21,768,544 in all; SPVCNN adds 3 point MLPs (54,688) and
Linear(480 -> 512) (246,272) = 22,019,840 in all.

Convolution algorithm: spconv's implicit-GEMM kernels need CUDA, so CPU models are built with
``ConvAlgo.Native``. The weight layout is the same for every algorithm in spconv 2.3
(``(out, kx, ky, kz, in)``), so state dicts move freely between the two; after moving a model
between devices call :func:`set_conv_algo` (``build_model`` does this for you).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import spconv.pytorch as spconv
import torch
from spconv.core import ConvAlgo
from spconv.pytorch.conv import SparseConvolution
from torch import nn

from clip2scene.errors import ConfigError
from clip2scene.train.voxelize import Voxels, scatter_mean

logger = logging.getLogger(__name__)

__all__ = [
    "ModelConfig",
    "MinkUNet",
    "SparseUNet",
    "ResidualBlock",
    "build_model",
    "count_parameters",
    "set_conv_algo",
    "default_algo",
    "KNOWN_ARCHS",
]

KNOWN_ARCHS = ("minkunet", "spvcnn")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the student network.

    Attributes:
        arch: one of :data:`KNOWN_ARCHS`: ``"minkunet"`` or ``"spvcnn"``.
        in_channels: input features per point / voxel (1 = intensity).
        out_channels: width of the head output = text-embedding dimension of the teacher.
        channels: 9 widths: stem, 4 encoder stages, 4 decoder stages.
        blocks_per_stage: residual blocks per encoder / decoder stage (>= 1).
    """

    arch: str = "minkunet"
    in_channels: int = 1
    out_channels: int = 512
    channels: tuple[int, ...] = (32, 32, 64, 128, 256, 256, 128, 96, 96)
    blocks_per_stage: int = 2

    def __post_init__(self) -> None:
        """ConfigError (a ValueError) naming the field and value when one is unusable."""
        if self.arch not in KNOWN_ARCHS:
            raise ConfigError(f"--arch {self.arch!r}: unknown model arch; known: {', '.join(KNOWN_ARCHS)}")
        try:
            channels = tuple(int(c) for c in self.channels)
        except (TypeError, ValueError):
            raise ConfigError(f"--channels {self.channels!r}: expected 9 integers") from None
        object.__setattr__(self, "channels", channels)
        if len(self.channels) != 9:
            raise ConfigError(
                f"--channels {','.join(map(str, self.channels))}: must have 9 entries (stem, 4 encoder, 4 decoder), "
                f"got {len(self.channels)}"
            )
        if any(c < 1 for c in self.channels):
            raise ConfigError(f"--channels {','.join(map(str, self.channels))}: widths must be >= 1")
        for name in ("in_channels", "out_channels", "blocks_per_stage"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model {name} {value!r}: must be an integer >= 1")

    def halved(self) -> "ModelConfig":
        """A copy with every channel width halved (a cheaper student)."""
        return ModelConfig(
            arch=self.arch,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            channels=tuple(max(1, c // 2) for c in self.channels),
            blocks_per_stage=self.blocks_per_stage,
        )


def default_algo(device: str | torch.device) -> ConvAlgo | None:
    """``ConvAlgo.Native`` for CPU, ``None`` (spconv's default implicit GEMM) otherwise."""
    return ConvAlgo.Native if torch.device(device).type == "cpu" else None


def _resolve_algo(algo: ConvAlgo | None) -> ConvAlgo:
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


def _check_same_indices(a: spconv.SparseConvTensor, b: spconv.SparseConvTensor, where: str) -> None:
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
        algo = _resolve_algo(algo)
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
            _check_same_indices(h, skip, f"decoder stage {j}")
            h = h.replace_feature(torch.cat([h.features, skip.features], dim=1))
            h = dec(h)
        _check_same_indices(h, x, "network output")
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


def set_conv_algo(model: nn.Module, algo: ConvAlgo | None) -> nn.Module:
    """Set the convolution algorithm of every spconv conv in ``model`` (in place; returns it).

    ``None`` selects spconv's CUDA default (``ConvAlgo.MaskImplicitGemm``). The weight layout
    does not depend on the algorithm in spconv 2.3, so this is safe after loading weights.
    """
    resolved = _resolve_algo(algo)
    for m in model.modules():
        if isinstance(m, SparseConvolution):
            m.algo = resolved
    return model


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Build the student for ``config`` on ``device``: :class:`MinkUNet` or ``SPVCNN``.

    Uses ``ConvAlgo.Native`` on CPU (the implicit-GEMM kernels need CUDA) and spconv's default
    implicit-GEMM algorithm on CUDA.

    Raises:
        ValueError: for an unknown ``config.arch``.
    """
    device = torch.device(device)
    algo = default_algo(device)
    if config.arch == "minkunet":
        model: nn.Module = MinkUNet(config, algo=_resolve_algo(algo))
    elif config.arch == "spvcnn":
        from clip2scene.train.spvcnn import SPVCNN  # local: spvcnn imports this module

        model = SPVCNN(config, algo=_resolve_algo(algo))
    else:
        raise ValueError(
            f"unknown model arch {config.arch!r}; known: {', '.join(KNOWN_ARCHS)}"
        )
    model = model.to(device)
    logger.info(
        "built %s on %s (%s): %.2fM parameters",
        config.arch,
        device,
        _resolve_algo(algo).name,
        count_parameters(model) / 1e6,
    )
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) in ``model``; only ``requires_grad`` ones if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
