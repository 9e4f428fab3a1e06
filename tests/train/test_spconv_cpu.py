"""spconv on CPU (ConvAlgo.Native) against dense torch convolutions, with 1 and 2 threads.

Guards against a known hazard (a CPU spconv build giving wrong results with several threads)
and pins down spconv 2.3's conventions, which the rest of the package relies on:

* weight layout is ``(out, kx, ky, kz, in)`` for every algorithm; the dense ``conv3d`` weight is
  ``w.permute(0, 4, 1, 2, 3)`` -- no kernel flip, i.e. cross-correlation like ``conv3d``;
* ``SparseConvTensor.dense()`` is ``(B, C, X, Y, Z)`` with indices ``[b, x, y, z]``;
* ``SparseInverseConv3d`` with weight ``w`` equals ``conv_transpose3d`` with weight
  ``w.permute(0, 4, 1, 2, 3).transpose(0, 1)`` (= ``w.permute(4, 0, 1, 2, 3)``), restricted to
  the input sites of the conv it undoes, and returns that conv's very input index tensor;
* indices must be C-contiguous int32: ``nonzero()`` output (column-major) silently gives wrong
  results.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", category=FutureWarning)
spconv = pytest.importorskip("spconv.pytorch")
from spconv.core import ConvAlgo  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

S, CIN, COUT = 12, 3, 4
ATOL = 1e-4
RTOL = 1e-5


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def num_threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(old)


def _random_sparse(seed: int = 0, batch: int = 2):
    """Random ~30 % occupancy in a S^3 grid per batch item; returns (x, dense, occ)."""
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(batch, S, S, S, generator=g) < 0.3
    # (V, 4) [b, x, y, z]. contiguous() matters: nonzero() is column-major and spconv
    # silently computes garbage from non-contiguous indices.
    idx = occ.nonzero().to(torch.int32).contiguous()
    feats = torch.randn(idx.shape[0], CIN, generator=g)
    x = spconv.SparseConvTensor(feats, idx, [S, S, S], batch)
    dense = torch.zeros(batch, CIN, S, S, S)
    b, i, j, k = idx.long().unbind(1)
    dense[b, :, i, j, k] = feats
    return x, dense, occ


def _dense_weight(w: torch.Tensor) -> torch.Tensor:
    """spconv (out, kx, ky, kz, in) -> conv3d (out, in, kx, ky, kz)."""
    return w.permute(0, 4, 1, 2, 3)


def _mask(t: torch.Tensor, occ: torch.Tensor) -> torch.Tensor:
    return t * occ[:, None].to(t.dtype)


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module


def test_weight_layout():
    conv = spconv.SubMConv3d(5, 7, (3, 2, 1), algo=ConvAlgo.Native)
    assert tuple(conv.weight.shape) == (7, 3, 2, 1, 5)


def test_subm_conv_matches_dense(num_threads):
    x, dense, occ = _random_sparse(1)
    conv = _seeded(spconv.SubMConv3d(CIN, COUT, 3, bias=True, algo=ConvAlgo.Native), 1)
    out = conv(x)
    assert torch.equal(out.indices, x.indices)
    ref = F.conv3d(dense, _dense_weight(conv.weight), conv.bias, padding=1)
    torch.testing.assert_close(out.dense(), _mask(ref, occ), atol=ATOL, rtol=RTOL)


def test_subm_conv_is_not_flipped():
    """The kernel is NOT flipped: a flipped dense kernel must disagree (convention check)."""
    x, dense, occ = _random_sparse(2)
    conv = _seeded(spconv.SubMConv3d(CIN, COUT, 3, bias=False, algo=ConvAlgo.Native), 2)
    ref_flipped = F.conv3d(dense, _dense_weight(conv.weight).flip(2, 3, 4), padding=1)
    assert (conv(x).dense() - _mask(ref_flipped, occ)).abs().max() > 1e-2


def test_strided_conv_matches_dense(num_threads):
    x, dense, occ = _random_sparse(3)
    conv = _seeded(
        spconv.SparseConv3d(CIN, COUT, 2, stride=2, bias=False, algo=ConvAlgo.Native), 3
    )
    out = conv(x)
    assert out.spatial_shape == [S // 2] * 3
    ref = F.conv3d(dense, _dense_weight(conv.weight), stride=2)
    out_occ = F.max_pool3d(occ[:, None].float(), 2, 2)[:, 0] > 0
    got_occ = torch.zeros_like(out_occ)
    b, i, j, k = out.indices.long().unbind(1)
    got_occ[b, i, j, k] = True
    assert torch.equal(got_occ, out_occ)
    torch.testing.assert_close(out.dense(), _mask(ref, out_occ), atol=ATOL, rtol=RTOL)


def test_regular_conv_k3_pad1_matches_dense(num_threads):
    x, dense, occ = _random_sparse(4)
    conv = _seeded(
        spconv.SparseConv3d(CIN, COUT, 3, stride=1, padding=1, bias=False, algo=ConvAlgo.Native),
        4,
    )
    out = conv(x)
    assert out.spatial_shape == [S] * 3
    ref = F.conv3d(dense, _dense_weight(conv.weight), padding=1)
    out_occ = F.max_pool3d(occ[:, None].float(), 3, 1, padding=1)[:, 0] > 0  # dilated sites
    assert out.indices.shape[0] == int(out_occ.sum())
    torch.testing.assert_close(out.dense(), _mask(ref, out_occ), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 1, 1)], ids=["k2s2", "k3s1p1"])
def test_inverse_conv_matches_conv_transpose(num_threads, kernel, stride, padding):
    x, dense, occ = _random_sparse(5)
    down = _seeded(
        spconv.SparseConv3d(
            CIN, COUT, kernel, stride=stride, padding=padding, bias=False,
            indice_key="d", algo=ConvAlgo.Native,
        ),
        5,
    )
    inv = _seeded(
        spconv.SparseInverseConv3d(COUT, CIN, kernel, bias=False, indice_key="d",
                                   algo=ConvAlgo.Native),
        6,
    )
    y = down(x)
    z = inv(y)
    assert z.indices.data_ptr() == x.indices.data_ptr()  # exactly the input indices back
    assert z.spatial_shape == [S] * 3
    w_t = _dense_weight(inv.weight).transpose(0, 1)  # conv_transpose3d: (in, out, k, k, k)
    ref = F.conv_transpose3d(y.dense(), w_t, stride=stride, padding=padding)
    torch.testing.assert_close(z.dense(), _mask(ref, occ), atol=ATOL, rtol=RTOL)


def test_backward_matches_dense(num_threads):
    """Gradients w.r.t. features and weights, SubMConv3d and strided SparseConv3d."""
    x, dense, occ = _random_sparse(7)
    g = torch.Generator().manual_seed(8)
    for conv, kw, out_occ in [
        (spconv.SubMConv3d(CIN, COUT, 3, bias=False, algo=ConvAlgo.Native),
         dict(padding=1), occ),
        (spconv.SparseConv3d(CIN, COUT, 2, stride=2, bias=False, algo=ConvAlgo.Native),
         dict(stride=2), F.max_pool3d(occ[:, None].float(), 2, 2)[:, 0] > 0),
    ]:
        _seeded(conv, 9)
        feats = x.features.clone().requires_grad_(True)
        out = conv(spconv.SparseConvTensor(feats, x.indices, x.spatial_shape, x.batch_size))
        grad_out = torch.randn(out.features.shape, generator=g)
        (out.features * grad_out).sum().backward()

        dense_in = dense.clone().requires_grad_(True)
        w = _dense_weight(conv.weight.detach()).clone().requires_grad_(True)
        ref = F.conv3d(dense_in, w, **kw)
        grad_dense = torch.zeros_like(ref)
        b, i, j, k = out.indices.long().unbind(1)
        grad_dense[b, :, i, j, k] = grad_out
        (_mask(ref, out_occ) * grad_dense).sum().backward()

        b, i, j, k = x.indices.long().unbind(1)
        torch.testing.assert_close(
            feats.grad, dense_in.grad[b, :, i, j, k], atol=ATOL, rtol=RTOL
        )
        torch.testing.assert_close(
            _dense_weight(conv.weight.grad), w.grad, atol=ATOL * 10, rtol=1e-5
        )


def test_one_and_two_threads_agree():
    """Same inputs, 1 vs 2 threads: bit-for-bit close results for a small conv stack."""
    x, _, _ = _random_sparse(10)
    subm = _seeded(spconv.SubMConv3d(CIN, COUT, 3, bias=False, algo=ConvAlgo.Native), 11)
    down = _seeded(
        spconv.SparseConv3d(COUT, COUT, 2, 2, bias=False, indice_key="d", algo=ConvAlgo.Native), 12
    )
    inv = _seeded(
        spconv.SparseInverseConv3d(COUT, COUT, 2, bias=False, indice_key="d",
                                   algo=ConvAlgo.Native),
        13,
    )
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(inv(down(subm(x))).features.detach())
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=RTOL)
