"""SCR loss = InfoNCE over class text embeddings with temperature (paper Eq. 1); SSR (Eqs. 3-4) vs a by-hand loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from clip2scene.train.loss import kl_loss, scr_loss, ssr_loss


def test_scr_matches_by_hand():
    torch.manual_seed(0)
    f, t = torch.randn(5, 8), torch.randn(3, 8)
    target = torch.tensor([0, 2, -1, 1, 2])
    tau = 0.5
    total = []
    for i in range(5):
        if target[i] < 0:
            continue
        sims = [F.cosine_similarity(f[i], t[k], dim=0) / tau for k in range(3)]
        num = math.exp(sims[target[i]])
        den = sum(math.exp(s) for s in sims)
        total.append(-math.log(num / den))
    assert abs(float(scr_loss(f, t, target, tau)) - sum(total) / len(total)) < 1e-5


def test_scr_no_labels_is_zero_with_grad():
    f = torch.randn(4, 8, requires_grad=True)
    loss = scr_loss(f, torch.randn(3, 8), torch.full((4,), -1))
    loss.backward()
    assert float(loss.detach()) == 0.0 and f.grad is not None


def _ssr_by_hand(f, grid, target, px, px_point, text, lam):
    """SSR (paper Eqs. 3-4) cell by cell, with Python loops: the reference for `ssr_loss`."""
    f_unit = F.normalize(f, dim=-1)
    t = F.normalize(text, dim=-1)
    terms = []
    for cell in sorted(set(grid.tolist())):
        pts = [i for i in range(len(grid)) if grid[i] == cell]
        labelled = [int(target[i]) for i in pts if target[i] >= 0]
        if not labelled:
            continue
        counts = [labelled.count(c) for c in range(len(t))]
        k = counts.index(max(counts))  # majority, ties -> lower class
        members = [f_unit[i].detach() for i in pts]
        members += [F.normalize(px[j], dim=0) for j in range(len(px_point)) if grid[px_point[j]] == cell]
        scores = torch.stack([torch.dot(m, t[k]) / lam for m in members])
        a = torch.softmax(scores, dim=0)
        fused = F.normalize(sum(a[i] * members[i] for i in range(len(members))), dim=0)
        terms += [1 - torch.dot(f_unit[i], fused) for i in pts]
    return torch.stack(terms).mean()


def test_ssr_matches_by_hand_value_and_gradient():
    torch.manual_seed(3)
    n, m, d, c = 40, 25, 16, 4
    grid = torch.randint(0, 9, (n,))
    target = torch.randint(-1, c, (n,))
    target[grid == 0] = -1  # a cell with no label: its points take no part
    px_point = torch.randperm(n)[:m]
    px, text = torch.randn(m, d), torch.randn(c, d)
    f1 = torch.randn(n, d, requires_grad=True)
    f2 = f1.detach().clone().requires_grad_(True)
    got = ssr_loss(f1, grid, 9, target, px, px_point, text, lam=0.7)
    want = _ssr_by_hand(f2, grid, target, px, px_point, text, 0.7)
    got.backward()
    want.backward()
    assert abs(float(got.detach()) - float(want.detach())) < 1e-5
    assert torch.allclose(f1.grad, f2.grad, atol=1e-6)
    assert float(f1.grad[grid == 0].abs().max()) == 0.0


def test_ssr_no_labelled_cell_is_zero_with_grad():
    f = torch.randn(6, 8, requires_grad=True)
    loss = ssr_loss(f, torch.arange(6), 6, torch.full((6,), -1), torch.randn(2, 8), torch.tensor([0, 3]),
                    torch.randn(3, 8))
    loss.backward()
    assert float(loss.detach()) == 0.0 and f.grad is not None


@pytest.mark.parametrize("same_grid", [True, False])
def test_per_voxel_losses_equal_per_point_losses_value_and_gradient(same_grid):
    """Points of a voxel share its feature: losses on (V, D) with point2voxel = losses on the
    gathered (N, D), gradients included; with the SSR grid equal to the voxels and coarser."""
    torch.manual_seed(5)
    n, v, m, d, c = 300, 60, 120, 16, 5
    p2v = torch.cat([torch.arange(v), torch.randint(0, v, (n - v,))])[torch.randperm(n)]
    grid = p2v if same_grid else p2v // 4 + (p2v % 3 == 0).long() * 20  # cells cut across voxels
    cells = int(grid.max()) + 1
    target = torch.randint(-1, c, (n,))
    px_point = torch.randperm(n)[:m]
    px, px_logits, text = torch.randn(m, d), torch.randn(m, c), torch.randn(c, d)
    fv = torch.randn(v, d, requires_grad=True)
    fv2 = fv.detach().clone().requires_grad_(True)
    for name, per_voxel, per_point in [
        ("scr", lambda f: scr_loss(f, text, target, 0.5, point2voxel=p2v), lambda f: scr_loss(f, text, target, 0.5)),
        ("ssr", lambda f: ssr_loss(f, grid, cells, target, px, px_point, text, 0.7, point2voxel=p2v),
         lambda f: ssr_loss(f, grid, cells, target, px, px_point, text, 0.7)),
        ("kl", lambda f: kl_loss(f, text, px_logits, px_point, 0.5, point2voxel=p2v),
         lambda f: kl_loss(f, text, px_logits, px_point, 0.5)),
    ]:
        fv.grad = fv2.grad = None
        a = per_voxel(fv)
        b = per_point(fv2[p2v])
        a.backward()
        b.backward()
        assert abs(float(a.detach()) - float(b.detach())) < 1e-5, name
        torch.testing.assert_close(fv.grad, fv2.grad, atol=1e-6, rtol=1e-4, msg=name)
