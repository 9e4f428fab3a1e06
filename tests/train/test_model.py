"""Tests for clip2scene.train.nets: the spconv MinkUNet student on CPU (ConvAlgo.Native)."""

from __future__ import annotations

import logging
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
from clip2scene.train.voxelize import scatter_mean, voxelize  # noqa: E402

log = logging.getLogger(__name__)

SMALL = ModelConfig(
    out_channels=16, channels=(8, 8, 16, 16, 32, 32, 16, 16, 16), blocks_per_stage=1
)


def _scan(n: int, seed: int, extent: float = 8.0):
    """Synthetic scan: a ground plane plus a few boxes' surfaces; (xyz (n,3), intensity (n,))."""
    g = torch.Generator().manual_seed(seed)
    n_ground = n // 2
    ground = torch.rand(n_ground, 3, generator=g) * torch.tensor([extent, extent, 0.05])
    centres = torch.rand(4, 3, generator=g) * torch.tensor([extent, extent, 1.0])
    which = torch.randint(0, 4, (n - n_ground,), generator=g)
    offs = torch.rand(n - n_ground, 3, generator=g) * 1.5
    objects = centres[which] + offs
    xyz = torch.cat([ground, objects]) - extent / 2
    intensity = torch.rand(n, generator=g)
    return xyz.float(), intensity


def _sparse_input(scans, voxel_size: float = 0.1):
    xyz = torch.cat([s[0] for s in scans])
    feat = torch.cat([s[1] for s in scans])[:, None]
    batch = torch.cat([torch.full((len(s[0]),), i, dtype=torch.int64) for i, s in enumerate(scans)])
    vox = voxelize(xyz, batch, voxel_size)
    feats = scatter_mean(feat, vox.point2voxel, vox.num_voxels)
    return vox, vox.sparse_tensor(feats)


def _algos(model: torch.nn.Module) -> set:
    return {m.algo for m in model.modules() if isinstance(m, SparseConvolution)}


def _randomise_bn_stats(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_default_model_shape_and_parameter_count():
    torch.manual_seed(0)
    model = build_model(ModelConfig(), "cpu")
    n = count_parameters(model)
    n_half = count_parameters(build_model(ModelConfig().halved()))
    log.info("default MinkUNet: %d parameters; halved channels: %d", n, n_half)
    # torchsparse's MinkUNet with these channels has ~21.7M parameters (+ the 96x512 head)
    assert 20_000_000 < n < 24_000_000
    assert 0.2 * n < n_half < 0.3 * n
    assert count_parameters(model, trainable_only=True) == n
    assert _algos(model) == {ConvAlgo.Native}

    vox, x = _sparse_input([_scan(1500, 0)])
    out = model(x)
    assert out.shape == (vox.num_voxels, 512)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    emb = model.embed(x)
    assert emb.shape == (vox.num_voxels, 96)


def test_output_order_follows_input_order():
    """Permuting the input rows permutes the output rows identically (eval mode)."""
    torch.manual_seed(1)
    model = build_model(SMALL).eval()
    _randomise_bn_stats(model)
    _, x = _sparse_input([_scan(1200, 1)])
    perm = torch.randperm(x.indices.shape[0])
    xp = spconv.SparseConvTensor(
        x.features[perm].contiguous(), x.indices[perm].contiguous(), x.spatial_shape, x.batch_size
    )
    with torch.no_grad():
        out = model(x)
        out_p = model(xp)
    torch.testing.assert_close(out_p, out[perm], atol=1e-5, rtol=1e-5)


def test_eval_forward_is_deterministic():
    torch.manual_seed(2)
    model = build_model(SMALL).eval()
    _randomise_bn_stats(model)
    _, x = _sparse_input([_scan(1200, 2)])
    with torch.no_grad():
        a = model(x)
        b = model(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_non_contiguous_indices_are_handled():
    torch.manual_seed(3)
    model = build_model(SMALL).eval()
    _, x = _sparse_input([_scan(800, 3)])
    idx_t = x.indices.t().contiguous().t()  # same values, column-major like nonzero()
    assert not idx_t.is_contiguous()
    xt = spconv.SparseConvTensor(x.features, idx_t, x.spatial_shape, x.batch_size)
    with torch.no_grad():
        torch.testing.assert_close(model(xt), model(x), atol=1e-6, rtol=1e-6)


def test_spatial_shape_must_be_multiple_of_stride():
    model = build_model(SMALL).eval()
    _, x = _sparse_input([_scan(300, 4)])
    bad = spconv.SparseConvTensor(x.features, x.indices, [s + 1 for s in x.spatial_shape], 1)
    with pytest.raises(ValueError, match="multiple of 16"):
        model(bad)
    with pytest.raises(ValueError, match="features"):
        model(x.replace_feature(torch.ones(x.features.shape[0], 3)))


def test_gradient_reaches_every_parameter():
    torch.manual_seed(5)
    model = build_model(SMALL).train()
    _, x = _sparse_input([_scan(1000, 5), _scan(900, 6)])
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_batch_of_two_scans_does_not_mix_items():
    """In eval mode, item 0 of a batched forward equals a forward of item 0 alone."""
    torch.manual_seed(7)
    model = build_model(SMALL).eval()
    _randomise_bn_stats(model, 1)
    vox, x = _sparse_input([_scan(1000, 7), _scan(1100, 8)])
    assert vox.batch_size == 2
    assert set(vox.coords[:, 0].tolist()) == {0, 1}
    with torch.no_grad():
        out = model(x)
        assert out.shape == (vox.num_voxels, SMALL.out_channels)
        m0 = x.indices[:, 0] == 0
        x0 = spconv.SparseConvTensor(
            x.features[m0].contiguous(), x.indices[m0].contiguous(), x.spatial_shape, 1
        )
        out0 = model(x0)
    torch.testing.assert_close(out[m0], out0, atol=1e-5, rtol=1e-5)
    # per-point outputs come back through point2voxel
    assert out[vox.point2voxel].shape == (vox.num_points, SMALL.out_channels)


def test_unknown_arch_raises():
    assert tuple(ARCHS) == ("minkunet", "spvcnn")
    with pytest.raises(ValueError, match="pointnet.*minkunet, spvcnn"):
        ModelConfig(arch="pointnet")


def test_forward_points_is_the_trainer_recipe():
    """``forward_points`` == scatter_mean -> sparse tensor -> forward -> gather, bit for bit;
    ``xyz`` is accepted and ignored; ``embed_points`` is the gathered ``embed``."""
    torch.manual_seed(12)
    model = build_model(SMALL).eval()
    _randomise_bn_stats(model, 3)
    xyz, intensity = _scan(900, 12)
    feats = intensity[:, None]
    vox = voxelize(xyz, torch.zeros(900, dtype=torch.int64), 0.1)
    with torch.no_grad():
        x = vox.sparse_tensor(scatter_mean(feats, vox.point2voxel, vox.num_voxels))
        ref = model(x)[vox.point2voxel]
        out = model.forward_points(vox, feats)
        assert out.shape == (900, SMALL.out_channels)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        torch.testing.assert_close(model.forward_points(vox, feats, xyz), ref, atol=0, rtol=0)
        emb = model.embed_points(vox, feats)
        torch.testing.assert_close(emb, model.embed(x)[vox.point2voxel], atol=0, rtol=0)
    assert emb.shape == (900, model.embed_channels)
    with pytest.raises(ValueError, match="point_features"):
        model.forward_points(vox, feats[:-1])


def test_config_validation():
    cfg = ModelConfig(channels=[4] * 9)  # lists (e.g. from JSON) become tuples
    assert cfg.channels == (4,) * 9
    with pytest.raises(ValueError):
        ModelConfig(channels=(8, 8, 8))
    with pytest.raises(ValueError):
        ModelConfig(blocks_per_stage=0)


def test_set_conv_algo():
    model = MinkUNet(SMALL, algo=ConvAlgo.Native)
    set_conv_algo(model, None)
    assert _algos(model) == {ConvAlgo.MaskImplicitGemm}
    set_conv_algo(model, ConvAlgo.Native)
    assert _algos(model) == {ConvAlgo.Native}


def test_overfits_tiny_problem():
    """500 points, 4 position-dependent classes, 30 Adam steps: loss drops substantially."""
    torch.manual_seed(9)
    cfg = ModelConfig(
        out_channels=4, channels=(16, 16, 32, 32, 64, 64, 32, 32, 32), blocks_per_stage=1
    )
    model = build_model(cfg).train()
    xyz, intensity = _scan(500, 9, extent=6.0)
    labels = (xyz[:, 0] > 0).long() * 2 + (xyz[:, 2] > -2.9).long()  # 4 classes
    vox = voxelize(xyz, torch.zeros(500, dtype=torch.int64), 0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        out = model.forward_points(vox, intensity[:, None])
        loss = torch.nn.functional.cross_entropy(out, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    log.info("overfit losses: first %.3f last %.3f", losses[0], losses[-1])
    assert losses[-1] < 0.3 * losses[0]


def test_one_and_two_threads_agree():
    """Known hazard: CPU spconv has been seen to go wrong with several threads."""
    torch.manual_seed(10)
    model = build_model(SMALL).eval()
    _randomise_bn_stats(model, 2)
    _, x = _sparse_input([_scan(800, 10), _scan(700, 11)])
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)  # the autouse fixture restores the original count
        with torch.no_grad():
            outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
