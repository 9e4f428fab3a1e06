"""Tests for clip2scene.train.nets.spvcnn (SPVCNN on spconv, CPU / ConvAlgo.Native) and the
point-level interface (``forward_points`` / ``embed_points``) shared with the MinkUNet."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
spconv = pytest.importorskip("spconv.pytorch")
from spconv.core import ConvAlgo  # noqa: E402
from spconv.pytorch.conv import SparseConvolution  # noqa: E402

from clip2scene.train.nets import (  # noqa: E402
    ARCHS,
    MinkUNet,
    ModelConfig,
    build_model,
    count_parameters,
    set_conv_algo,
)
from clip2scene.train.nets.spvcnn import (  # noqa: E402
    SPVCNN,
    PointVoxelMaps,
    lookup_voxels,
    point_positions,
)
from clip2scene.train.voxelize import Voxels, scatter_mean, voxelize  # noqa: E402
from tests.helpers import halved  # noqa: E402
from tests.helpers import synthetic_scan as _model_scan  # noqa: E402

log = logging.getLogger(__name__)

SMALL = dict(out_channels=16, channels=(8, 8, 16, 16, 32, 32, 16, 16, 16), blocks_per_stage=1)
#: (arch, pass xyz to forward_points): MinkUNet, SPVCNN release semantics, SPVCNN true points
VARIANTS = [("minkunet", False), ("spvcnn", False), ("spvcnn", True)]


def _scan(n: int, seed: int, extent: float = 8.0):
    """test_model's ground plane + 4 boxes, intensity as a column: (xyz (n, 3), intensity (n, 1))."""
    xyz, intensity = _model_scan(n, seed, extent)
    return xyz, intensity[:, None]


def _batch(scans, voxel_size: float = 0.1):
    xyz = torch.cat([s[0] for s in scans])
    feat = torch.cat([s[1] for s in scans])
    batch = torch.cat(
        [torch.full((len(s[0]),), i, dtype=torch.int64) for i, s in enumerate(scans)]
    )
    return voxelize(xyz, batch, voxel_size), xyz, feat


def _model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch, **{**SMALL, **overrides}))


def _randomise_bn_stats(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _run(model, vox, feat, xyz, use_xyz: bool):
    return model.forward_points(vox, feat, xyz=xyz if use_xyz else None)


# ---------------------------------------------------------------- parameter counts (by hand)


def _conv_bn(taps: int, cin: int, cout: int) -> int:
    return taps * cin * cout + 2 * cout  # bias-free conv + BatchNorm weight/bias


def _res_block(cin: int, cout: int) -> int:
    shortcut = 0 if cin == cout else cin * cout + 2 * cout  # Linear (no bias) + BN
    return _conv_bn(27, cin, cout) + _conv_bn(27, cout, cout) + shortcut


def _voxel_branch_params(cfg: ModelConfig) -> int:
    cs, nb = cfg.channels, cfg.blocks_per_stage
    n = _conv_bn(27, cfg.in_channels, cs[0]) + _conv_bn(27, cs[0], cs[0])  # stem
    for i in range(1, 5):  # k2 s2 down conv keeps the width, first block changes it
        n += _conv_bn(8, cs[i - 1], cs[i - 1]) + _res_block(cs[i - 1], cs[i])
        n += (nb - 1) * _res_block(cs[i], cs[i])
    for j in range(1, 5):  # k2 inverse conv, concat skip, blocks
        cin, cout, cskip = cs[3 + j], cs[4 + j], cs[4 - j]
        n += _conv_bn(8, cin, cout) + _res_block(cout + cskip, cout)
        n += (nb - 1) * _res_block(cout, cout)
    return n


def expected_params(cfg: ModelConfig) -> int:
    """Parameter count from the config alone (the formula reported in the model docs)."""
    cs, out = cfg.channels, cfg.out_channels
    n = _voxel_branch_params(cfg)
    if cfg.arch == "minkunet":
        return n + cs[8] * out + out
    assert cfg.arch == "spvcnn"
    for cin, cout in ((cs[0], cs[4]), (cs[4], cs[6]), (cs[6], cs[8])):
        n += cin * cout + cout + 2 * cout  # Linear + BatchNorm1d
    return n + (cs[4] + cs[6] + cs[8]) * out + out


def test_parameter_counts_match_the_formula():
    cfgs = [ModelConfig(arch=a) for a in ARCHS]
    cfgs += [ModelConfig(arch=a, **SMALL) for a in ARCHS]
    cfgs += [halved(ModelConfig(arch=a, blocks_per_stage=3)) for a in ARCHS]
    counts = {}
    for cfg in cfgs:
        model = build_model(cfg)
        assert count_parameters(model) == expected_params(cfg), cfg
        counts[cfg] = count_parameters(model)
    mink, spv = counts[ModelConfig()], counts[ModelConfig(arch="spvcnn")]
    log.info("default parameters: minkunet %d, spvcnn %d", mink, spv)
    # pinned: the default (CLIP2Scene) widths with a 512-d head
    assert mink == 21_768_544
    assert spv == 22_019_840
    assert spv > mink
    # the difference is the point MLPs (54,688) and the wider 480 -> 512 head
    assert spv - mink == 54_688 + (480 - 96) * 512


# ---------------------------------------------------------------- shapes, order, determinism


@pytest.mark.parametrize("arch", ARCHS)
def test_default_models_output_per_point(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch))
    assert {m.algo for m in model.modules() if isinstance(m, SparseConvolution)} == {
        ConvAlgo.Native
    }
    vox, xyz, feat = _batch([_scan(1500, 0)])
    for use_xyz in (False, True):
        out = _run(model, vox, feat, xyz, use_xyz)
        assert out.shape == (1500, 512) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    emb = model.embed_points(vox, feat)
    assert emb.shape == (1500, {"minkunet": 96, "spvcnn": 480}[arch])
    assert emb.shape[1] == model.embed_channels
    with torch.no_grad():  # the voxel-level interface is still there
        x = vox.sparse_tensor(scatter_mean(feat, vox.point2voxel, vox.num_voxels))
        assert model(x).shape == (vox.num_voxels, 512)


def test_spvcnn_without_xyz_is_the_per_voxel_model_gathered():
    """Release semantics: the point branch runs on the voxels; points copy their voxel."""
    model = _model("spvcnn").eval()
    _randomise_bn_stats(model)
    vox, xyz, feat = _batch([_scan(900, 2)])
    with torch.no_grad():
        x = vox.sparse_tensor(scatter_mean(feat, vox.point2voxel, vox.num_voxels))
        ref = model(x)[vox.point2voxel]
        torch.testing.assert_close(model.forward_points(vox, feat), ref, atol=0, rtol=0)
        head = model.head(model.embed_points(vox, feat))
        torch.testing.assert_close(head, ref, atol=1e-5, rtol=1e-5)
        # with xyz the two paths agree in structure but not in values (different points)
        assert not torch.allclose(model.forward_points(vox, feat, xyz), ref, atol=1e-6)


@pytest.mark.parametrize("arch,use_xyz", VARIANTS)
def test_point_order_is_preserved(arch, use_xyz):
    """Permuting the input points permutes the outputs identically (eval mode)."""
    model = _model(arch, 3).eval()
    _randomise_bn_stats(model, 3)
    xyz, feat = _scan(1000, 3)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(3))
    zeros = torch.zeros(1000, dtype=torch.int64)
    vox, vox_p = voxelize(xyz, zeros, 0.1), voxelize(xyz[perm], zeros, 0.1)
    with torch.no_grad():
        out = _run(model, vox, feat, xyz, use_xyz)
        out_p = _run(model, vox_p, feat[perm], xyz[perm], use_xyz)
    torch.testing.assert_close(out_p, out[perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,use_xyz", [v if v == ("spvcnn", True) else pytest.param(*v, marks=pytest.mark.slow)
                                          for v in VARIANTS])
def test_eval_is_deterministic_and_thread_independent(arch, use_xyz):
    model = _model(arch, 4).eval()
    _randomise_bn_stats(model, 4)
    vox, xyz, feat = _batch([_scan(800, 4), _scan(700, 5)])
    with torch.no_grad():
        a = _run(model, vox, feat, xyz, use_xyz)
        b = _run(model, vox, feat, xyz, use_xyz)
        torch.set_num_threads(2)  # the autouse fixture restores the count
        c = _run(model, vox, feat, xyz, use_xyz)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,use_xyz", VARIANTS)
def test_batch_items_do_not_mix(arch, use_xyz):
    """Item 0 of a 2-scan batch equals item 0 alone on the same grid (eval mode)."""
    model = _model(arch, 6).eval()
    _randomise_bn_stats(model, 6)
    vox, xyz, feat = _batch([_scan(900, 6), _scan(800, 7)])
    n0 = 900
    v0 = int((vox.coords[:, 0] == 0).sum())  # voxels are sorted by batch item first
    vox0 = Voxels(
        coords=vox.coords[:v0].contiguous(),
        point2voxel=vox.point2voxel[:n0],
        spatial_shape=vox.spatial_shape,
        batch_size=1,
        origin=vox.origin,
        voxel_size=vox.voxel_size,
    )
    assert int(vox0.point2voxel.max()) == v0 - 1
    with torch.no_grad():
        both = _run(model, vox, feat, xyz, use_xyz)
        alone = _run(model, vox0, feat[:n0], xyz[:n0], use_xyz)
    torch.testing.assert_close(both[:n0], alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("arch,use_xyz", VARIANTS)
def test_gradient_reaches_every_parameter(arch, use_xyz):
    model = _model(arch, 8).train()
    vox, xyz, feat = _batch([_scan(1000, 8), _scan(900, 9)])
    out = _run(model, vox, feat, xyz, use_xyz)
    (out * torch.randn_like(out)).sum().backward()
    names = [name for name, _ in model.named_parameters()]
    if arch == "spvcnn":  # both branches are there
        assert any(n.startswith("point_transforms.2.") for n in names)
        assert any(n.startswith("enc.3.") for n in names)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- the point <-> voxel maps


def _points_sharing_voxels(seed: int):
    """300 points in 0.1 m voxels, ~5 per voxel: 60 voxel centres, 5 jittered points each."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 40, (60, 3), generator=g)
    cells[:, 2] = cells[:, 2] % 4  # flat-ish scene
    centres = (cells.float() + 0.5) * 0.1
    xyz = centres.repeat_interleave(5, 0) + (torch.rand(300, 3, generator=g) - 0.5) * 0.09
    return xyz, torch.rand(300, 1, generator=g)


def test_points_sharing_a_voxel():
    """MinkUNet and release-mode SPVCNN give every point of a voxel the same output; with
    xyz the SPVCNN point branch (trilinear read-out at continuous positions) separates them."""
    xyz, feat = _points_sharing_voxels(10)
    vox = voxelize(xyz, torch.zeros(len(xyz), dtype=torch.int64), 0.1)
    counts = torch.bincount(vox.point2voxel, minlength=vox.num_voxels)
    assert int(counts.max()) >= 3  # several points per voxel, really
    shared = counts[vox.point2voxel] > 1

    rep = torch.empty(vox.num_voxels, dtype=torch.int64)
    rep[vox.point2voxel] = torch.arange(len(xyz))  # one representative point per voxel

    def spread(out: torch.Tensor) -> torch.Tensor:
        """Per point: |out - out of its voxel's representative point|, max over channels."""
        return (out - out[rep[vox.point2voxel]]).abs().amax(dim=1)

    for arch, use_xyz in VARIANTS:
        model = _model(arch, 11).eval()
        _randomise_bn_stats(model, 11)
        with torch.no_grad():
            out = _run(model, vox, feat, xyz, use_xyz)
        s = spread(out)[shared]
        scale = float(out.abs().mean())
        log.info("%s xyz=%s: within-voxel spread max %.2e (output scale %.2e)",
                 arch, use_xyz, float(s.max()), scale)
        if use_xyz:
            assert float(s.median()) > 1e-3 * scale
        else:
            assert float(s.max()) == 0.0


def _coarse_tensor(cells: torch.Tensor, shape: list[int], channels: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.zeros(len(cells), 1, dtype=torch.int64), cells], 1).int()
    feats = torch.randn(len(cells), channels, generator=g)
    return spconv.SparseConvTensor(feats, idx.contiguous(), shape, 1)


def test_lookup_voxels_matches_a_dict():
    g = torch.Generator().manual_seed(12)
    shape = [7, 5, 6]
    cells = torch.unique(torch.randint(0, 5, (80, 3), generator=g), dim=0)
    cells = cells[torch.randperm(len(cells), generator=g)]
    x = _coarse_tensor(cells, shape, 2, 12)
    query = torch.cat([torch.zeros(200, 1, dtype=torch.int64),
                       torch.randint(-2, 8, (200, 3), generator=g)], 1)
    table = {tuple(c): i for i, c in enumerate(x.indices.tolist())}
    ref = [table.get(tuple(q), -1) for q in query.tolist()]
    assert lookup_voxels(x.indices, shape, query).tolist() == ref


@pytest.mark.parametrize("stride", [1, 4, 16])
def test_devoxelisation_matches_torchsparse_weights(stride):
    """Integer positions: weights are torchsparse's calc_ti_weights (corners floor(c/s)*s and
    +s, missing corners dropped, renormalised), computed here by brute force."""
    g = torch.Generator().manual_seed(13)
    fine = torch.randint(0, 3 * stride, (50, 3), generator=g)  # stride-1 positions
    coarse = torch.unique(torch.div(fine, stride, rounding_mode="floor"), dim=0)
    extra = torch.randint(0, 4, (20, 3), generator=g)  # some neighbours exist, some not
    coarse = torch.unique(torch.cat([coarse, extra]), dim=0)
    x = _coarse_tensor(coarse, [4, 4, 4], 3, 13)
    cells = torch.cat([torch.zeros(50, 1, dtype=torch.int64), fine], 1)
    # the stride-1 rows only matter when x itself is the stride-1 tensor
    p2v = lookup_voxels(x.indices, [4, 4, 4], cells) if stride == 1 else torch.zeros(50).long()
    maps = PointVoxelMaps(fine.double(), cells, p2v)
    out = maps.voxel_to_point(x, stride)
    via_matrix = torch.sparse.mm(maps.interp(x, stride), x.features.double()).float()
    torch.testing.assert_close(via_matrix, out, atol=1e-6, rtol=1e-6)
    table = {tuple(c[1:]): i for i, c in enumerate(x.indices.tolist())}
    for p in range(50):
        c = fine[p].tolist()
        base = [v // stride for v in c]
        acc, total = torch.zeros(3), 0.0
        for o in [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)]:
            row = table.get(tuple(b + d for b, d in zip(base, o)))
            if row is None:
                continue
            w = math.prod(
                (v - b * stride) / stride if d else (stride - (v - b * stride)) / stride
                for v, b, d in zip(c, base, o)
            )
            acc += w * x.features[row]
            total += w
        torch.testing.assert_close(out[p], acc / total, atol=1e-5, rtol=1e-5)
    if stride == 1:  # integer positions at stride 1: a plain gather of the own voxel
        assert maps.integer


def test_trilinear_reproduces_linear_fields():
    """Fully occupied coarse grid, features linear in the coarse sample positions c * s:
    interpolation at any continuous position inside is exact."""
    s = 4
    grid = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    x = _coarse_tensor(grid, [4, 4, 4], 1, 0)
    a, b = torch.tensor([0.3, -1.2, 2.0]), 0.7
    x = x.replace_feature(((grid * s).float() @ a + b)[:, None])
    g = torch.Generator().manual_seed(14)
    pos = torch.rand(100, 3, generator=g, dtype=torch.float64) * (3 * s - 1e-6)
    cells = torch.cat([torch.zeros(100, 1, dtype=torch.int64), pos.round().long()], 1)
    maps = PointVoxelMaps(pos, cells, torch.zeros(100, dtype=torch.int64))
    assert not maps.integer
    out = maps.voxel_to_point(x, s)[:, 0]
    torch.testing.assert_close(out, (pos.float() @ a + b), atol=1e-4, rtol=1e-5)


def test_point_voxel_round_trip():
    """p2v(v2p(x)) == x at stride 1 (integer positions; several points per voxel), and p2v at
    a coarse stride is the mean over each coarse voxel's points."""
    xyz, feat = _points_sharing_voxels(15)
    vox = voxelize(xyz, torch.zeros(len(xyz), dtype=torch.int64), 0.1)
    cells = vox.coords[vox.point2voxel].long()
    maps = PointVoxelMaps(cells[:, 1:].double(), cells, vox.point2voxel)
    assert maps.integer and not maps.identity
    x = vox.sparse_tensor(torch.randn(vox.num_voxels, 5))
    z = maps.voxel_to_point(x, 1)
    torch.testing.assert_close(z, x.features[vox.point2voxel], atol=0, rtol=0)
    back = maps.point_to_voxel(z, x, 1)
    torch.testing.assert_close(back.features, x.features, atol=1e-6, rtol=1e-6)
    # coarse: the stride-4 voxels are floor(cell / 4)
    coarse_cells = torch.unique(torch.div(vox.coords[:, 1:].long(), 4, rounding_mode="floor"),
                                dim=0)
    xc = _coarse_tensor(coarse_cells, [s // 4 for s in vox.spatial_shape], 5, 15)
    member = maps.member(xc, 4)
    pts = torch.randn(len(xyz), 5)
    got = maps.point_to_voxel(pts, xc, 4).features
    for row in range(len(coarse_cells)):
        sel = member == row
        if bool(sel.any()):
            torch.testing.assert_close(got[row], pts[sel].mean(0), atol=1e-5, rtol=1e-5)
    # the continuous positions round back to the voxel cells
    pos = point_positions(vox, xyz)
    assert torch.equal(torch.floor(pos + 0.5).long(), cells[:, 1:])
    with pytest.raises(ValueError, match="does not match"):
        point_positions(vox, xyz + 0.5)


# ---------------------------------------------------------------- learning, plumbing


@pytest.mark.parametrize("arch,use_xyz", [v if v == ("spvcnn", True) else pytest.param(*v, marks=pytest.mark.slow)
                                          for v in VARIANTS])  # MinkUNet: also tests/train/test_model.py
def test_overfits_tiny_problem(arch, use_xyz):
    """500 points, 4 position-dependent classes, 30 Adam steps: the loss drops a lot."""
    cfg = dict(out_channels=4, channels=(16, 16, 32, 32, 64, 64, 32, 32, 32))
    model = _model(arch, 9, **cfg).train()
    xyz, feat = _scan(500, 9, extent=6.0)
    labels = (xyz[:, 0] > 0).long() * 2 + (xyz[:, 2] > -2.9).long()
    vox = voxelize(xyz, torch.zeros(500, dtype=torch.int64), 0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(_run(model, vox, feat, xyz, use_xyz), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    log.info("%s xyz=%s overfit: first %.3f last %.3f", arch, use_xyz, losses[0], losses[-1])
    assert losses[-1] < 0.3 * losses[0]


def test_build_and_algo_plumbing():
    model = build_model(ModelConfig(arch="spvcnn", **SMALL))
    assert isinstance(model, SPVCNN) and not isinstance(model, MinkUNet)
    set_conv_algo(model, None)
    assert {m.algo for m in model.modules() if isinstance(m, SparseConvolution)} == {
        ConvAlgo.MaskImplicitGemm
    }
    set_conv_algo(model, ConvAlgo.Native)
    # the voxel branch has the MinkUNet's parameter names and shapes: weights transfer
    mink = build_model(ModelConfig(arch="minkunet", **SMALL)).state_dict()
    spv = model.state_dict()
    shared = {k for k in mink if not k.startswith("head.")}
    assert shared <= set(spv)
    assert all(mink[k].shape == spv[k].shape for k in shared)


def test_bad_point_inputs_raise():
    model = _model("spvcnn")
    vox, xyz, feat = _batch([_scan(300, 16)])
    with pytest.raises(ValueError, match="point_features"):
        model.forward_points(vox, feat[:-1])
    with pytest.raises(ValueError, match="point_features"):
        model.forward_points(vox, torch.ones(300, 2))
    with pytest.raises(ValueError, match="xyz"):
        model.forward_points(vox, feat, xyz[:, :2])


# ---------------------------------------------------------------- grids beyond int32 cells


@pytest.mark.parametrize("arch", ["minkunet", "spvcnn"])
def test_grid_beyond_int32_cells_gives_the_same_outputs(arch, caplog):
    """Real scans at batch 8 span more than 2**31 grid cells (e.g. 2,000 x 2,000 x 200 x 8);
    spconv then hashes with 64-bit keys. Two clusters 800 voxels apart (grid < 2**31) and the
    same clusters 4,096 x 4,096 x 512 voxels apart (grid ~8.6e9 cells) must give the same
    per-point outputs: the clusters are far beyond each other's receptive field and both shifts
    are multiples of the total stride 16, so only the hashing differs. Points sit at voxel
    centres so the shift moves no point across a voxel border."""
    model = _model(arch, 11).eval()
    _randomise_bn_stats(model, 11)
    a, b = _scan(700, 11), _scan(600, 12)
    snap = lambda x: (torch.floor(x.double() / 0.1) + 0.5) * 0.1  # noqa: E731
    outs = []
    for shift_vox in ((800, 800, 0), (4096, 4096, 512)):
        shift = torch.tensor(shift_vox, dtype=torch.float64) * 0.1
        xyz = torch.cat([snap(a[0]), snap(b[0]) + shift]).float()
        feat = torch.cat([a[1], b[1]])
        vox = voxelize(xyz, torch.zeros(len(xyz), dtype=torch.int64), 0.1)
        cells = math.prod(vox.spatial_shape)
        outs.append((cells, _run(model, vox, feat, xyz, False).detach()))
    assert outs[0][0] < 2**31 - 1 < outs[1][0]
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)
