"""The one training loop (train/loop.py), the Checkpoint type and the prediction rule."""

import json

import numpy as np
import pytest
import torch

from clip2scene.errors import ConfigError
from clip2scene.storage import open_cache
from clip2scene.train.checkpoint import DISTILL_KIND, Checkpoint, load_checkpoint
from clip2scene.train.data import ScanDataset, collate
from clip2scene.train.finetune import FinetuneConfig, finetune
from clip2scene.train.loop import LoopConfig, build_optimizer
from clip2scene.train.nets import build_model
from clip2scene.train.predict import eval_labels, forward_points, predict_labels
from clip2scene.train.nets.segmenter import SEGMENTER_KIND
from clip2scene.train.trainer import TrainConfig, train
from clip2scene.viz.student import load_student, teacher_labels
from tests.helpers import TINY

CPU = torch.device("cpu")

# metrics.jsonl of `train` before the loop was shared (commit 0492a3f, trainer._train):
# (loss, switched, grad_norm) per step of the run in `test_train_curve_is_unchanged`.
BEFORE = [(1.214961051940918, None, 1.590428113937378),
          (1.1869378089904785, None, 1.4721726179122925),
          (0.8817245960235596, 0.16816666722297668, 0.9073425531387329),
          (0.8582382798194885, 0.1550000011920929, 0.9214937686920166),
          (0.8603430986404419, 0.16233333945274353, 0.6545417904853821),
          (0.8419991731643677, 0.15666666626930237, 0.7853007912635803)]


@pytest.fixture(scope="module")
def runs(value_cache, tmp_path_factory):
    """A tiny cache, a 3-epoch distillation run on it and a 1-epoch fine-tuning of that run."""
    root = tmp_path_factory.mktemp("loop")
    cache = value_cache
    summary = train(TrainConfig(cache=str(cache), out=str(root / "run"), epochs=3, batch_size=2, lr=0.05, model=TINY,
                                seed=2, switch_epoch=1), progress=False)
    ft = finetune(FinetuneConfig(cache=str(cache), out=str(root / "ft"), checkpoint=str(root / "run" / "checkpoint.pt"),
                                 epochs=1, batch_size=2, model=TINY, seed=1), progress=False)
    return dict(cache=cache, root=root, summary=summary, ft=ft)


def test_train_curve_is_unchanged(runs):
    """The same run through the shared loop reproduces the losses, S3 switch rates and gradient
    norms of the trainer's own loop before (tolerances: float32 rounding over 6 SGD steps of a
    tiny net on another CPU; measured on the recording machine: bitwise equal)."""
    rows = [json.loads(x) for x in (runs["root"] / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and [r["epoch"] for r in rows] == [1, 1, 2, 2, 3, 3]
    for row, (loss, switched, grad_norm) in zip(rows, BEFORE):
        assert row["loss"] == pytest.approx(loss, rel=1e-4)
        assert row["grad_norm"] == pytest.approx(grad_norm, rel=1e-3)
        assert (row.get("switched") is None) == (switched is None)
        if switched is not None:
            assert row["switched"] == pytest.approx(switched, abs=2e-3)  # a few argmax flips at most
    assert {"scr", "ssr", "lr", "points", "seconds", "scans_per_s"} <= rows[0].keys()


def test_finetune_rows_have_the_loop_columns(runs):
    rows = [json.loads(x) for x in (runs["root"] / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert {"loss", "ce", "lovasz", "lr", "head_lr", "grad_norm", "points", "seconds", "scans_per_s"} <= r.keys()
        assert r["head_lr"] == pytest.approx(100 * r["lr"])
        assert r["loss"] == pytest.approx(r["ce"] + r["lovasz"], rel=1e-6)
    assert runs["ft"]["epoch_losses"] == [pytest.approx((rows[0]["loss"] + rows[1]["loss"]) / 2)]


def test_loop_config_picks_the_run_options():
    cfg = TrainConfig(cache="c", out="o", epochs=3, batch_size=4, workers=2, clip_grad_norm=1.5,
                      keep_checkpoints=True, voxel_size=0.2, stop_on_divergence=True)
    lc = LoopConfig.of(cfg)
    assert (lc.epochs, lc.batch_size, lc.workers, lc.clip_grad_norm, lc.keep_checkpoints, lc.voxel_size) == (
        3, 4, 2, 1.5, True, 0.2)
    assert lc.stop_on_divergence and lc.save_every_epoch and lc.resumable and str(lc.out) == "o"
    ft = LoopConfig.of(FinetuneConfig(cache="c", out="o", voxel_size=0.1), save_every_epoch=False)
    assert not ft.save_every_epoch and not ft.keep_checkpoints and not ft.amp and ft.batch_size == 8


def test_build_optimizer_groups_follow_the_multipliers():
    model = build_model(TINY, CPU)
    cfg = FinetuneConfig(cache="c", out="o", lr=0.02, batch_size=8, warmup_steps=0)
    opt, _ = build_optimizer([(model.stem.parameters(), 1.0), (model.head.parameters(), 100.0)], cfg, 10, 5)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.02), pytest.approx(2.0)]
    one, _ = build_optimizer(model, cfg, 10, 5)
    assert len(one.param_groups) == 1 and len(one.param_groups[0]["params"]) == len(list(model.parameters()))


def test_checkpoint_rebuilds_both_kinds(runs):
    cache = open_cache(runs["cache"])
    batch = collate([ScanDataset(cache, cache.indices("val"))[0]])
    distill = load_checkpoint(runs["root"] / "run" / "checkpoint.pt")
    assert isinstance(distill, Checkpoint) and distill.kind == DISTILL_KIND and distill.voxel_size == 0.1
    assert distill["epoch"] == 3 and "state_dict" in distill and distill.get("kind") is None
    model = distill.load_model(CPU)
    assert not model.training
    text = distill.text_on(CPU)
    assert text.shape == (3, 16) and text.dtype == torch.float32
    table = distill.label_table(cache.prompt_to_eval)
    assert table.tolist() == [1, 2, 3]
    with pytest.raises(ConfigError, match="prompt -> evaluation"):
        distill.label_table()
    with torch.no_grad():
        pred = predict_labels(forward_points(model, batch, distill.voxel_size, CPU), text, table)
    assert pred.dtype == torch.int64 and pred.shape == (len(batch["xyz"]),)
    assert np.array_equal(pred.numpy(), load_student(distill.path).predict(batch["xyz"].numpy(), batch["feat"].numpy(),
                                                                         cache.prompt_to_eval))

    seg = load_checkpoint(runs["root"] / "ft" / "checkpoint.pt")
    assert seg.kind == SEGMENTER_KIND and seg.text_on(CPU) is None and seg.label_table().tolist() == [1, 2, 3]
    net = seg.load_model(CPU)
    with torch.no_grad():
        logits = forward_points(net, batch, seg.voxel_size, CPU)
    assert logits.shape == (len(batch["xyz"]), 3)
    assert torch.equal(predict_labels(logits, None, seg.label_table()), logits.argmax(1) + 1)


def test_checkpoint_refuses_pickled_objects_and_nonfinite_weights(runs, tmp_path):
    """weights_only loading: a file holding an arbitrary Python object is not unpickled."""
    good = load_checkpoint(runs["root"] / "run" / "checkpoint.pt")
    evil = tmp_path / "evil.pt"
    torch.save(dict(good.data, extra=dict(obj=ConfigError("x"))), evil)
    with pytest.raises(ConfigError, match=r"evil\.pt: cannot read checkpoint"):
        load_checkpoint(evil)
    bad = tmp_path / "nan.pt"
    state = {k: v.clone() for k, v in good["state_dict"].items()}
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = float("inf")
    torch.save(dict(good.data, state_dict=state), bad)
    with pytest.raises(ConfigError, match=rf"nan\.pt: 1 of \d+ tensors hold NaN/Inf \(first state_dict\.{name}\)"):
        load_checkpoint(bad)
    assert load_checkpoint(bad, check_finite=False)["epoch"] == 3


def test_eval_labels_masks_unmapped_classes():
    scores = torch.tensor([[5.0, 1.0, 2.0], [0.0, 3.0, 3.0], [9.0, -1.0, -2.0]])
    assert eval_labels(scores, [0, 4, 7]).tolist() == [7, 4, 4]  # class 0 maps to nothing; ties: the first
    assert eval_labels(scores, [1, 2, 3]).tolist() == [1, 2, 1]
    assert eval_labels(scores, [0, 0, 0]).tolist() == [0, 0, 0]
    assert eval_labels(torch.zeros(0, 3), [1, 2, 3]).shape == (0,)
    half = scores.numpy().astype(np.float16)
    assert np.array_equal(teacher_labels(half, [0, 4, 7]), [7, 4, 4])  # the pictures' teacher labels: the same rule
    assert teacher_labels(np.zeros((0, 3), np.float16), [0, 4, 7]).shape == (0,)
    text = torch.eye(3)
    feats = torch.tensor([[0.1, 0.2, 3.0]])  # cosine argmax: class 2
    assert predict_labels(feats, text, [5, 6, 0]).tolist() == [6]  # class 2 unmapped: the best mapped one
