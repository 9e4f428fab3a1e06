"""SCR loss = InfoNCE over class text embeddings with temperature (paper Eq. 1)."""

import math

import torch
import torch.nn.functional as F

from clip2scene.train.loss import scr_loss


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
    assert float(loss) == 0.0 and f.grad is not None
