"""SPVCNN student (Tang et al., ECCV 2020) in spconv 2.x, as released with CLIP2Scene.

A sparse-voxel U-Net (exactly the voxel branch of our :class:`~clip2scene.train.nets.minkunet.MinkUNet`,
same parameter names) plus a light point branch: per-point features are read off the voxel
branch at three resolutions, refined by point MLPs, written back into the voxel branch, and the
multi-scale point features ``[z1 (cs4), z2 (cs6), z3 (cs8)]`` (256 + 128 + 96 = 480 for the
default widths) go through one ``Linear`` to the teacher's text space (512).

    from clip2scene.train.nets import ModelConfig, build_model
    from clip2scene.train.voxelize import voxelize

    model = build_model(ModelConfig(arch="spvcnn"), "cpu")       # ConvAlgo.Native on CPU
    vox = voxelize(xyz, batch, 0.1)
    out = model.forward_points(vox, intensity[:, None])           # (N, 512), release semantics
    out = model.forward_points(vox, intensity[:, None], xyz=xyz)  # (N, 512), true point branch
    per_voxel = model(vox.sparse_tensor(voxel_feats))              # (V, 512)

Data flow (names as in the released ``model/spvcnn.py``; ``v2p`` = voxel-to-point, ``p2v`` =
point-to-voxel; the strides are those of the tensor the points meet)::

    x0 = stem(x)                          stride 1, cs0
    z0 = v2p(x0)                          (P, cs0)  (no MLP here, as in the release)
    x1..x4 = encoder(p2v(z0) on x0's voxels)          x4: stride 16, cs4
    z1 = v2p(x4) + MLP0(z0)               (P, cs4)  MLP = Linear + BatchNorm1d + ReLU
    y1, y2 = up1, up2(p2v(z1) on x4's voxels)         y2: stride 4, cs6
    z2 = v2p(y2) + MLP1(z1)               (P, cs6)
    y3, y4 = up3, up4(p2v(z2) on y2's voxels)         y4: stride 1, cs8
    z3 = v2p(y4) + MLP2(z2)               (P, cs8)
    out = Linear(cat[z1, z2, z3])         (P, out_channels)

``p2v`` REPLACES the tensor's features by the mean of its points' features (torchsparse
``point_to_voxel``; a point belongs to the stride-s voxel ``floor(cell / s)`` of its stride-1
voxel ``cell``). ``v2p`` is torchsparse's trilinear devoxelisation (``calc_ti_weights``):
with point position ``p`` in stride-1 voxel units, ``q = p / s``, the 8 stride-s voxels
``floor(q) + {0,1}^3`` get weights ``prod(r or 1 - r)`` with ``r = q - floor(q)``; missing voxels
get weight 0 and the weights are renormalised to sum to 1. The decoder's skip joins
concatenate the encoder tensors ``x3, x2, x1`` and the STEM output ``x0`` (not ``p2v(z0)``).

What the "points" are:

* ``forward(x)`` / ``forward_points(vox, f)`` (no ``xyz``) -- the release semantics. CLIP2Scene
  and SPVNAS feed SPVCNN the UNIQUE voxels (``sparse_quantize``) at integer coordinates, with
  point resolution = voxel resolution, then gather per-point outputs with the inverse map. So
  the points of the point branch are the V voxels at integer positions: ``v2p`` at stride 1 is
  then exactly a gather of the point's own voxel, the trilinear weights only matter at strides
  16 and 4, BatchNorm1d in the MLPs sees V rows, and all points of a voxel get the same output.
* ``forward_points(vox, f, xyz=xyz)`` -- a genuine per-point branch: the N points at their
  continuous positions ``p = xyz / voxel_size - origin - 0.5`` (a voxel's sample point is its
  centre, so integer ``p`` reproduces the case above). Trilinear weights now vary inside a
  voxel, so points sharing a voxel get different outputs; BatchNorm1d sees N rows and ``p2v``
  averages over points. (torchsparse interpolates between voxel ORIGIN corners for float
  coordinates; the half-voxel centring here is the deliberate difference.)

Voxel membership always comes from ``voxelize`` (``vox.point2voxel`` and ``vox.coords``); the
point positions only set interpolation weights. Dropout: none (the release uses p = 0.0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging

import spconv.pytorch as spconv
import torch
from spconv.core import ConvAlgo
from torch import nn

from clip2scene.train.nets.blocks import SparseUNet, check_same_indices
from clip2scene.train.voxelize import Voxels, scatter_mean

if TYPE_CHECKING:
    from clip2scene.train.nets import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["SPVCNN", "PointVoxelMaps", "lookup_voxels", "point_positions"]

#: the 8 corner offsets of trilinear interpolation, (8, 3) int64, x slowest
_CORNERS = torch.tensor(
    [[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.int64
)


def lookup_voxels(
    indices: torch.Tensor, spatial_shape: list[int], query: torch.Tensor
) -> torch.Tensor:
    """Rows of ``indices`` holding the ``query`` cells (a sort + ``searchsorted`` hash).

    Args:
        indices: (V, 4) integer ``[b, x, y, z]`` voxel indices of a sparse tensor (unique rows).
        spatial_shape: ``[X, Y, Z]`` grid extent of that tensor.
        query: (M, 4) int64 ``[b, x, y, z]`` cells; coordinates outside the grid are allowed.

    Returns:
        (M,) int64 row index into ``indices``, -1 where the cell is not occupied.
    """
    sx, sy, sz = (int(s) for s in spatial_shape)
    device = query.device
    if indices.shape[0] == 0:
        return torch.full((query.shape[0],), -1, dtype=torch.int64, device=device)

    def key(c: torch.Tensor) -> torch.Tensor:
        return ((c[:, 0] * sx + c[:, 1]) * sy + c[:, 2]) * sz + c[:, 3]

    vkey, order = torch.sort(key(indices.to(device=device, dtype=torch.int64)))
    hi = torch.tensor([sx - 1, sy - 1, sz - 1], device=device)
    inside = ((query[:, 1:] >= 0) & (query[:, 1:] <= hi)).all(dim=1)
    qc = query.clone()
    qc[:, 1:] = torch.minimum(qc[:, 1:].clamp(min=0), hi)  # keep keys in range; masked below
    qkey = key(qc)
    pos = torch.searchsorted(vkey, qkey).clamp(max=vkey.shape[0] - 1)
    found = inside & (vkey[pos] == qkey)
    return torch.where(found, order[pos], torch.full_like(pos, -1))


def point_positions(vox: Voxels, xyz: torch.Tensor) -> torch.Tensor:
    """Continuous point positions in stride-1 voxel units, voxel centres at integers.

    Args:
        vox: the :class:`Voxels` that ``voxelize(xyz, ...)`` returned for these points.
        xyz: (N, 3) float point coordinates in metres, the SAME tensor given to ``voxelize``.

    Returns:
        (N, 3) float64 ``xyz / voxel_size - origin - 0.5``; ``floor(p + 0.5)`` is the voxel cell.

    Raises:
        ValueError: if ``xyz`` has the wrong shape or does not fall into ``vox``'s voxels.
    """
    if xyz.ndim != 2 or xyz.shape != (vox.num_points, 3):
        raise ValueError(f"xyz must have shape ({vox.num_points}, 3), got {tuple(xyz.shape)}")
    scaled = xyz.to(device=vox.coords.device, dtype=torch.float64) / float(vox.voxel_size)
    origin = vox.origin.to(scaled.device)
    cells = torch.floor(scaled).to(torch.int64) - origin  # exactly voxelize's arithmetic
    if not torch.equal(cells, vox.coords[vox.point2voxel, 1:].to(torch.int64)):
        raise ValueError("xyz does not match vox (pass the tensor given to voxelize)")
    return scaled - origin.to(torch.float64) - 0.5


class PointVoxelMaps:
    """Point <-> voxel maps of one forward pass, cached per stride.

    Args:
        positions: (P, 3) float64 point positions in stride-1 voxel units (voxel centres at
            integers; integer positions = the release's unique-voxel "points").
        cells: (P, 4) int64 ``[b, x, y, z]`` stride-1 voxel of every point.
        point2voxel: (P,) int64 row of that voxel in the stride-1 sparse tensor.

    The cache is keyed by stride: within one forward every tensor of a given stride has the
    same indices (the decoder's inverse convolutions restore the encoder's; checked there).
    """

    def __init__(
        self, positions: torch.Tensor, cells: torch.Tensor, point2voxel: torch.Tensor
    ) -> None:
        self.positions = positions
        self.cells = cells
        self.integer = bool(torch.equal(positions, cells[:, 1:].to(positions.dtype)))
        #: point i is voxel i (the release semantics): p2v / v2p at stride 1 are no-ops
        rows = torch.arange(point2voxel.shape[0], device=point2voxel.device)
        self.identity = bool(torch.equal(point2voxel, rows))
        self._member: dict[int, torch.Tensor] = {1: point2voxel}
        self._interp: dict[int, torch.Tensor] = {}

    @property
    def num_points(self) -> int:
        return int(self.cells.shape[0])

    def member(self, x: spconv.SparseConvTensor, stride: int) -> torch.Tensor:
        """(P,) int64 row of ``x`` (a stride-``stride`` tensor) holding each point's voxel."""
        if stride not in self._member:
            q = self.cells.clone()
            q[:, 1:] = torch.div(q[:, 1:], stride, rounding_mode="floor")
            idx = lookup_voxels(x.indices, x.spatial_shape, q)
            if bool((idx < 0).any()):
                raise RuntimeError(f"some points have no stride-{stride} voxel")
            self._member[stride] = idx
        return self._member[stride]

    def interp(self, x: spconv.SparseConvTensor, stride: int) -> torch.Tensor:
        """Trilinear devoxelisation matrix at ``stride``: a coalesced sparse COO (P, V_s)
        float64 tensor, <= 8 non-zeros per row summing to 1 (missing corners dropped)."""
        if stride not in self._interp:
            q = self.positions / stride
            base = torch.floor(q)
            r = q - base  # (P, 3) in [0, 1)
            corners = _CORNERS.to(q.device)  # (8, 3)
            w = torch.where(corners[None].bool(), r[:, None], 1.0 - r[:, None]).prod(dim=2)
            cell = base.to(torch.int64)[:, None, :] + corners[None]  # (P, 8, 3)
            b = self.cells[:, None, :1].expand(-1, 8, 1)
            query = torch.cat([b, cell], dim=2).reshape(-1, 4)
            idx = lookup_voxels(x.indices, x.spatial_shape, query).view(-1, 8)
            w = torch.where(idx >= 0, w, torch.zeros_like(w))
            total = w.sum(dim=1, keepdim=True)
            if bool((total <= 0).any()):  # cannot happen: the point's own voxel is a corner
                raise RuntimeError(f"points without any stride-{stride} neighbour")
            w = w / total
            keep = (w > 0).reshape(-1)
            rows = torch.arange(self.num_points, device=q.device).repeat_interleave(8)
            ij = torch.stack([rows[keep], idx.reshape(-1)[keep]])
            size = (self.num_points, int(x.indices.shape[0]))
            mat = torch.sparse_coo_tensor(ij, w.reshape(-1)[keep], size, check_invariants=False)
            self._interp[stride] = mat.coalesce()
        return self._interp[stride]

    def point_to_voxel(
        self, z: torch.Tensor, x: spconv.SparseConvTensor, stride: int
    ) -> spconv.SparseConvTensor:
        """``x`` with its features replaced by the mean of ``z`` (P, C) over each voxel."""
        if stride == 1 and self.identity:
            return x.replace_feature(z)  # one point per voxel: the mean is the point itself
        feats = scatter_mean(z, self.member(x, stride), int(x.indices.shape[0]))
        return x.replace_feature(feats)

    def voxel_to_point(self, x: spconv.SparseConvTensor, stride: int) -> torch.Tensor:
        """(P, C) trilinear devoxelisation of ``x``'s features (a gather when exact)."""
        if stride == 1 and self.integer:
            return x.features if self.identity else x.features[self._member[1]]
        mat = self.interp(x, stride)
        # sparse (P, V_s) @ dense (V_s, C): ~5x faster fwd+bwd than 8 gathers on CPU
        return torch.sparse.mm(mat.to(x.features.dtype), x.features)


class SPVCNN(SparseUNet):
    """Sparse point-voxel CNN (see module docstring).

    Parameters beyond the voxel branch: ``point_transforms`` (3 x Linear + BatchNorm1d + ReLU:
    cs0 -> cs4, cs4 -> cs6, cs6 -> cs8) and ``head`` = Linear(cs4 + cs6 + cs8 -> out_channels).

    Args:
        config: the :class:`~clip2scene.train.nets.ModelConfig` (``arch="spvcnn"``).
        algo: spconv convolution algorithm; ``ConvAlgo.Native`` on CPU, ``None`` for spconv's
            CUDA default.
    """

    def __init__(self, config: ModelConfig, algo: ConvAlgo | None = ConvAlgo.Native) -> None:
        super().__init__(config, algo)
        cs = config.channels

        def mlp(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))

        self.point_transforms = nn.ModuleList(
            [mlp(cs[0], cs[4]), mlp(cs[4], cs[6]), mlp(cs[6], cs[8])]
        )
        self.head = nn.Linear(self.embed_channels, config.out_channels)
        self.reset_parameters()

    @property
    def embed_channels(self) -> int:
        """Width of the concatenated multi-scale point feature: cs4 + cs6 + cs8 (480)."""
        cs = self.config.channels
        return cs[4] + cs[6] + cs[8]

    def _embed(self, x: spconv.SparseConvTensor, maps: PointVoxelMaps) -> torch.Tensor:
        """(P, embed_channels) point features for a prepared stride-1 tensor ``x``."""
        full = [int(s) for s in x.spatial_shape]

        def check_stride(t: spconv.SparseConvTensor, s: int) -> None:
            if [int(v) for v in t.spatial_shape] != [v // s for v in full]:
                raise RuntimeError(f"expected a stride-{s} tensor, got {t.spatial_shape}")

        pt = self.point_transforms
        x0 = self.stem(x)
        z0 = maps.voxel_to_point(x0, 1)
        h = maps.point_to_voxel(z0, x0, 1)
        skips = [x0]  # the decoder joins the stem output, as the release does
        for down, enc in zip(self.down, self.enc):
            h = enc(down(h))
            skips.append(h)
        check_stride(h, 16)
        z1 = maps.voxel_to_point(h, 16) + pt[0](z0)
        h = maps.point_to_voxel(z1, h, 16)
        z2 = None
        for j, (up, dec) in enumerate(zip(self.up, self.dec), start=1):
            skip = skips[4 - j]
            h = up(h)
            check_same_indices(h, skip, f"decoder stage {j}")
            h = dec(h.replace_feature(torch.cat([h.features, skip.features], dim=1)))
            if j == 2:
                check_stride(h, 4)
                z2 = maps.voxel_to_point(h, 4) + pt[1](z1)
                h = maps.point_to_voxel(z2, h, 4)
        check_same_indices(h, x, "network output")
        z3 = maps.voxel_to_point(h, 1) + pt[2](z2)
        return torch.cat([z1, z2, z3], dim=1)

    @staticmethod
    def _voxel_maps(x: spconv.SparseConvTensor) -> PointVoxelMaps:
        """Maps for the release semantics: the points are the voxels at integer positions."""
        cells = x.indices.to(torch.int64)
        rows = torch.arange(cells.shape[0], device=cells.device)
        return PointVoxelMaps(cells[:, 1:].to(torch.float64), cells, rows)

    def embed(self, x: spconv.SparseConvTensor) -> torch.Tensor:
        """Per-voxel multi-scale features, each voxel a point at its integer position.

        Args:
            x: SparseConvTensor, features (V, in_channels) float32, indices (V, 4) int32,
               ``spatial_shape`` a multiple of :attr:`total_stride`.

        Returns:
            (V, embed_channels) float32, rows in the order of ``x.indices``.
        """
        x = self._prepare_input(x)
        return self._embed(x, self._voxel_maps(x))

    def forward(self, x: spconv.SparseConvTensor) -> torch.Tensor:
        """Per-voxel embedding (release semantics): (V, out_channels) float32, ``x``'s order."""
        return self.head(self.embed(x)).float()

    def embed_points(
        self, vox: Voxels, point_features: torch.Tensor, xyz: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-point multi-scale features before the head: (N, embed_channels) float32.

        Same arguments as :meth:`forward_points`.
        """
        x = self._prepare_input(self._voxel_input(vox, point_features))
        if xyz is None:
            return self._embed(x, self._voxel_maps(x))[vox.point2voxel]
        cells = vox.coords[vox.point2voxel].to(torch.int64)
        maps = PointVoxelMaps(point_positions(vox, xyz), cells, vox.point2voxel)
        return self._embed(x, maps)

    def forward_points(
        self, vox: Voxels, point_features: torch.Tensor, xyz: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-point embedding in the teacher's text space.

        Args:
            vox: :class:`~clip2scene.train.voxelize.Voxels` of the N points (``voxelize`` with
                ``stride`` a multiple of :attr:`total_stride`, the default).
            point_features: (N, in_channels) float per-point input (intensity); the voxel
                branch's input is their per-voxel mean.
            xyz: optional (N, 3) float point coordinates in metres, the SAME tensor that was
                given to ``voxelize``. ``None`` (default): release semantics, the point branch
                runs on the V voxels and every point gets its voxel's output. Given: the point
                branch runs on the N points at their continuous positions (points sharing a
                voxel get different outputs).

        Returns:
            (N, out_channels) float32, row i = point i.
        """
        if xyz is None:  # head on V rows, then gather: cheaper than gathering first
            return self.forward_voxels(vox, point_features)[vox.point2voxel]
        return self.head(self.embed_points(vox, point_features, xyz)).float()
