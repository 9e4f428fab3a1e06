"""The 3D student: sparse-convolution networks built on spconv 2.x (MinkUNet and SPVCNN).

The network maps per-point input features (intensity) to a per-point embedding in the teacher's
text space (512-d for CLIP ViT-B/16), which is compared with the cached CLIP text embeddings.
Both architectures (``ModelConfig.arch`` in :data:`ARCHS`) share one point-level
interface, which is what the trainer should call:

    from clip2scene.train.nets import ModelConfig, build_model
    from clip2scene.train.voxelize import voxelize

    model = build_model(ModelConfig(arch="spvcnn"), device="cpu")   # ConvAlgo.Native on CPU
    vox = voxelize(xyz, batch, 0.1)
    out = model.forward_points(vox, intensity[:, None])   # (N, 512) float32, point order kept
    emb = model.embed_points(vox, intensity[:, None])     # (N, E) features before the head

Both also keep a voxel-level ``model(x)`` on a ``SparseConvTensor`` -> (V, out_channels); for
MinkUNet ``forward_points`` is exactly ``model(vox.sparse_tensor(scatter_mean(feats, ...)))``
gathered with ``vox.point2voxel``. SPVCNN lives in :mod:`clip2scene.train.nets.spvcnn`, the shared
blocks in :mod:`clip2scene.train.nets.blocks`; :data:`ARCHS` maps ``ModelConfig.arch`` to the class.

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

import torch
from torch import nn

from clip2scene.errors import ConfigError
from clip2scene.validation import opt
from clip2scene.train.nets.blocks import (ResidualBlock, SparseUNet, count_parameters, default_algo, resolve_algo,
                                          set_conv_algo)
from clip2scene.train.nets.minkunet import MinkUNet
from clip2scene.train.nets.spvcnn import SPVCNN

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHS",
    "ModelConfig",
    "MinkUNet",
    "SPVCNN",
    "SparseUNet",
    "ResidualBlock",
    "build_model",
    "count_parameters",
    "set_conv_algo",
    "default_algo",
]

#: model arch name -> class; every class takes ``(config, algo=...)`` and has ``forward_points``
ARCHS: dict[str, type[SparseUNet]] = {"minkunet": MinkUNet, "spvcnn": SPVCNN}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the student network.

    Attributes:
        arch: one of :data:`ARCHS`: ``"minkunet"`` or ``"spvcnn"``.
        in_channels: input features per point / voxel (1 = intensity).
        out_channels: width of the head output = text-embedding dimension of the teacher.
        channels: 9 widths: stem, 4 encoder stages, 4 decoder stages.
        blocks_per_stage: residual blocks per encoder / decoder stage (>= 1).
    """

    arch: str = opt("minkunet", "Student: spvcnn (paper) or minkunet.")
    in_channels: int = opt(1, "Input features per point (1 = intensity).", cli=False)
    out_channels: int = opt(512, "Head output width = the teacher's text-embedding dimension.", cli=False)
    channels: tuple[int, ...] = opt((32, 32, 64, 128, 256, 256, 128, 96, 96),
                                    "9 comma-separated widths: stem, 4 encoder, 4 decoder stages.", parse="widths")
    blocks_per_stage: int = opt(2, "Residual blocks per encoder / decoder stage.", cli=False)

    def __post_init__(self) -> None:
        """ConfigError (a ValueError) naming the field and value when one is unusable."""
        if self.arch not in ARCHS:
            raise ConfigError(f"--arch {self.arch!r}: unknown model arch; known: {', '.join(ARCHS)}")
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


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Build the student for ``config`` on ``device``: :class:`MinkUNet` or ``SPVCNN``.

    Uses ``ConvAlgo.Native`` on CPU (the implicit-GEMM kernels need CUDA) and spconv's default
    implicit-GEMM algorithm on CUDA.
    """
    device = torch.device(device)
    algo = default_algo(device)
    model: nn.Module = ARCHS[config.arch](config, algo=resolve_algo(algo)).to(device)
    logger.info(
        "built %s on %s (%s): %.2fM parameters",
        config.arch,
        device,
        resolve_algo(algo).name,
        count_parameters(model) / 1e6,
    )
    return model
