"""Fine-tuning, linear probing, the label-fraction split, Lovasz-softmax and the report table."""


import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clip2scene.cli import app
from clip2scene.errors import ConfigError
from clip2scene.storage import CacheWriter
from clip2scene.train.finetune import FinetuneConfig, evaluate_segmenter, finetune, label_subset
from clip2scene.train.lovasz import lovasz_softmax
from clip2scene.train.metrics import ConfusionMatrix
from clip2scene.train.report import format_table, gather
from clip2scene.train.trainer import TrainConfig, train

from tests.helpers import TINY, make_scan, teacher_meta


@pytest.fixture(scope="module")
def cache(value_cache):
    return value_cache


@pytest.fixture(scope="module")
def pretrained(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    train(TrainConfig(cache=str(cache), out=str(out), epochs=4, batch_size=2, lr=0.05, model=TINY), progress=False)
    return out / "checkpoint.pt"


def test_label_subset_is_every_nth_scan():
    idx = np.arange(10, 260)
    np.testing.assert_array_equal(label_subset(idx, 0.01), [10, 110, 210])  # SLidR: every 100th
    np.testing.assert_array_equal(label_subset(idx, 1.0), idx)
    np.testing.assert_array_equal(label_subset(idx, 0.1), idx[::10])
    for bad in (0.0, -0.5, 1.5, float("nan")):  # the config refuses them before any work
        with pytest.raises(ConfigError, match="label-fraction"):
            FinetuneConfig(cache="c.zarr", out="ft", label_fraction=bad)


def test_lovasz_equals_jaccard_loss_on_hard_predictions():
    """On one-hot probabilities the Lovasz extension IS the Jaccard loss: 1 - IoU per present class."""
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 4, 200))
    pred = torch.from_numpy(np.where(rng.random(200) < 0.7, labels.numpy(), rng.integers(0, 4, 200)))
    labels[:10] = -1
    probs = torch.nn.functional.one_hot(pred, 4).float()
    cm = ConfusionMatrix(5, 0)
    keep = labels >= 0
    cm.update(labels[keep].numpy() + 1, pred[keep].numpy() + 1)
    iou = cm.per_class_iou()[1:]
    expected = float(np.mean([1 - iou[c] for c in np.unique(labels[keep].numpy())]))
    assert float(lovasz_softmax(probs, labels, ignore=-1)) == pytest.approx(expected, abs=1e-6)
    perfect = torch.nn.functional.one_hot(labels.clamp(min=0), 4).float()
    assert float(lovasz_softmax(perfect, labels)) == pytest.approx(0.0, abs=1e-7)
    p = torch.softmax(torch.randn(50, 4, requires_grad=True), 1)
    lovasz_softmax(p, labels[:50]).backward()  # differentiable


@pytest.mark.slow
def test_finetune_random_and_pretrained_and_linear_probe(cache, pretrained, tmp_path):
    # reference_batch=2: the recipe's lr at this toy batch (not scaled down by 2/8)
    base = dict(cache=str(cache), epochs=8, batch_size=2, reference_batch=2, eval_split="val", model=TINY)
    rand = finetune(FinetuneConfig(out=str(tmp_path / "rand"), checkpoint=None, **base), progress=False)
    pre = finetune(FinetuneConfig(out=str(tmp_path / "pre"), checkpoint=str(pretrained), **base), progress=False)
    lin = finetune(FinetuneConfig(out=str(tmp_path / "lin"), checkpoint=str(pretrained), mode="linear", **base),
                   progress=False)
    for r in (rand, pre, lin):
        assert r["labelled_scans"] == 3 and r["eval_scans"] == 1
    # three classes told apart by intensity: full fine-tuning learns them from either start; the
    # linear probe of a briefly pre-trained 8-d backbone gets well above chance (~0.2 mIoU)
    assert rand["miou"] > 0.75 and pre["miou"] > 0.75, (rand["miou"], pre["miou"])
    assert lin["miou"] > 0.45, lin["miou"]
    assert rand["init"] == "random" and pre["init"] == "pretrained"
    assert lin["trainable_parameters"] == (TINY.channels[8] + 1) * 3 < pre["trainable_parameters"]
    # the linear probe leaves the backbone exactly as pre-trained
    lin_sd = torch.load(tmp_path / "lin" / "checkpoint.pt", weights_only=False)["state_dict"]
    pre_sd = torch.load(pretrained, weights_only=False)["state_dict"]
    for k, v in pre_sd.items():
        assert torch.equal(lin_sd[f"backbone.{k}"], v), k
    again = evaluate_segmenter(tmp_path / "pre" / "checkpoint.pt", str(cache), "val")
    assert again["miou"] == pytest.approx(pre["miou"])
    table = format_table(gather([tmp_path]))
    assert "| random init |" in table and "linear probe" in table and "100%" in table
    assert f"{100 * pre['miou']:.1f}" in table


def test_finetune_on_labels_only_cache(tmp_path):
    """A cache built without a teacher (no logits/features/text) still fine-tunes and evaluates."""
    rng = np.random.default_rng(0)
    meta = dict(teacher_meta(), teacher=None)
    with CacheWriter(tmp_path / "l.zarr", meta, 3, None, has_labels=True) as w:
        for i, split in enumerate(("train", "train", "val")):
            s = make_scan(rng, i, split)
            s.pair_point, s.pair_image, s.pair_uv = np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros((0, 2), np.float32)
            s.image_view = s.image_size = s.image_logits = s.image_features = None
            w.append(s)
    r = finetune(FinetuneConfig(cache=str(tmp_path / "l.zarr"), out=str(tmp_path / "run"), epochs=16, batch_size=2,
                                reference_batch=2, model=TINY), progress=False)
    assert r["miou"] > 0.75
    with pytest.raises(ConfigError, match="no teacher outputs"):
        train(TrainConfig(cache=str(tmp_path / "l.zarr"), out=str(tmp_path / "t"), model=TINY), progress=False)


def test_cli_finetune_report_and_errors(cache, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", "--checkpoint", "none", "--cache", str(cache), "--out", str(tmp_path / "r"),
                            "--epochs", "1", "--batch-size", "2", "--label-fraction", "0.5",
                            "--channels", ",".join(map(str, TINY.channels))])
    assert r.exit_code == 0, r.output
    assert "labelled scans 2 of 3" in r.output
    r = runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "t.md")])
    assert r.exit_code == 0, r.output
    assert "50%" in r.output and (tmp_path / "t.md").exists()
    r = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "r" / "checkpoint.pt"), "--cache", str(cache)])
    assert r.exit_code == 0 and "mIoU" in r.output, r.output
    r = runner.invoke(app, ["finetune", "--checkpoint", "none", "--cache", str(cache), "--out", str(tmp_path / "x"),
                            "--label-fraction", "2"])
    assert r.exit_code == 2 and "--label-fraction 2" in r.stderr
    r = runner.invoke(app, ["linear-probe", "--checkpoint", str(tmp_path / "nope.pt"), "--cache", str(cache),
                            "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "nope.pt" in r.stderr
    r = runner.invoke(app, ["report", str(tmp_path / "empty_nothing")])
    assert r.exit_code == 2 and "empty_nothing" in r.stderr


def test_report_table_layout():
    """Rows: random init first; columns per dataset: linear probe, then fractions small to large."""
    def res(init, mode, frac, miou, ds="nuscenes"):
        return dict(init=init, pretrained=None if init == "random" else "pre.pt", mode=mode, label_fraction=frac,
                    miou=miou, dataset=ds, eval_split="val")
    rows = [res("pretrained", "finetune", 1.0, 0.715), res("random", "finetune", 0.01, 0.422),
            res("random", "finetune", 1.0, 0.691), res("pretrained", "finetune", 0.01, 0.563),
            res("pretrained", "linear", 1.0, 0.3), res("random", "finetune", 0.01, 0.325, "semantickitti")]
    lines = format_table(rows).splitlines()
    assert lines[2] == ("| initialisation | nuscenes linear probe | nuscenes 1% | nuscenes 100% "
                        "| semantickitti 1% |")
    assert lines[4] == "| random init |  | 42.2 | 69.1 | 32.5 |"
    assert lines[5] == "| pretrained (pre.pt) | 30.0 | 56.3 | 71.5 |  |"
