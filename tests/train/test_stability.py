"""Guard rails (issue 18): warm-up into the cosine, batch-scaled learning rates, gradient-norm
logging and clipping, the divergence monitor and --stop-on-divergence, the unit-norm classifier
input, and one hostile-input row per new option."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from clip2scene.cli import app
from clip2scene.errors import ConfigError
from clip2scene.train import stability
from clip2scene.train.checkpoint import load_checkpoint
from clip2scene.train.finetune import FinetuneConfig, Segmenter, finetune
from clip2scene.train.nets import build_model
from clip2scene.train.stability import (DivergenceMonitor, TrainingDiverged, clip_gradients, lr_scale,
                                        resolve_warmup, warmup_cosine)
from clip2scene.train.trainer import TrainConfig, train

from tests.helpers import TINY


@pytest.fixture(scope="module")
def cache(value_cache):
    return value_cache


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=10, warmup_steps=3)
    assert [f(s) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert f(3) == pytest.approx(1.0)  # the cosine starts at the full rate
    assert f(10) == pytest.approx(0.0, abs=1e-12) and f(50) == pytest.approx(0.0, abs=1e-12)
    assert f(3 + 7 / 2) == pytest.approx(0.5)
    plain = warmup_cosine(8, 0)
    assert [plain(s) for s in range(9)] == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(9)])
    assert resolve_warmup(None, 36) == 18 and resolve_warmup(None, 3516) == 300 and resolve_warmup(None, 1) == 1
    assert resolve_warmup(0, 100) == 0 and resolve_warmup(7, 100) == 7


def test_lr_scale_rules():
    assert lr_scale(4, 8, "linear") == 0.5 and lr_scale(32, 8, "linear") == 4.0
    assert lr_scale(2, 8, "sqrt") == pytest.approx(0.5) and lr_scale(2, 8, "none") == 1.0
    with pytest.raises(ConfigError, match="lr-scaling"):
        lr_scale(4, 8, "cubic")


def test_divergence_monitor():
    m = DivergenceMonitor(window=4, factor=10.0, min_history=3)
    assert not any(m.update(v) for v in (3.0, 100.0, 2.0))  # fewer than 3 losses: never flagged
    assert m.median == 3.0
    assert m.update(31.0)  # > 10 x 3
    assert m.median == 3.0 and m.events == 1  # a flagged loss stays out of the window
    assert not m.update(29.0)
    assert m.update(float("nan")) and m.update(float("inf")) and m.events == 3


def test_clip_gradients_measures_and_clips():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_gradients([p], None) == pytest.approx(5.0)
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0, 0.0, 0.0]))  # measured, not clipped
    assert clip_gradients([p], 1.0) == pytest.approx(5.0)  # the norm before clipping
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_l2_head_input_is_scale_free(cache):
    """Unit-norm classifier input: scaling the backbone features does not change the logits."""
    torch.manual_seed(0)
    seg = Segmenter(build_model(TINY, "cpu"), 3)
    emb = torch.rand(10, seg.backbone.embed_channels) * 30
    seg.backbone.embed_points = lambda vox, feat: emb * feat
    a, b = seg.forward_points(None, torch.tensor(1.0)), seg.forward_points(None, torch.tensor(50.0))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    seg.head_input = "raw"
    assert not torch.allclose(seg.forward_points(None, torch.tensor(1.0)), seg.forward_points(None, torch.tensor(50.0)))


def test_finetune_logs_schedule_and_grad_norms(cache, tmp_path):
    cfg = FinetuneConfig(cache=str(cache), out=str(tmp_path / "ft"), epochs=2, batch_size=1, lr=0.02, model=TINY,
                         warmup_steps=2, clip_grad_norm=0.5)
    r = finetune(cfg, progress=False)
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    sched = saved["schedule"]
    assert sched["lr_scale"] == pytest.approx(1 / 8) and sched["effective_lr"] == pytest.approx(0.0025)
    assert sched["head_lr"] == pytest.approx(0.25) and sched["warmup_steps"] == 2 and sched["reference_batch"] == 8
    assert saved["head_input"] == "l2" and r["schedule"] == sched
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert all(math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 for row in rows)
    # lr after each step: warm-up 2/3 of the rate, then the cosine from the full rate
    assert rows[0]["lr"] == pytest.approx(0.0025 * 2 / 3) and rows[1]["lr"] == pytest.approx(0.0025)
    assert rows[0]["head_lr"] == pytest.approx(0.25 * 2 / 3)
    assert load_checkpoint(tmp_path / "ft" / "checkpoint.pt")["head_input"] == "l2"


def test_train_logs_terms_and_grad_norm(cache, tmp_path):
    s = train(TrainConfig(cache=str(cache), out=str(tmp_path / "tr"), epochs=1, batch_size=2, lr=0.1, model=TINY,
                          clip_grad_norm=1.0), progress=False)
    assert s["schedule"]["effective_lr"] == pytest.approx(0.05) and s["schedule"]["warmup_steps"] == 1
    assert json.loads((tmp_path / "tr" / "config.json").read_text())["schedule"]["reference_batch"] == 4
    rows = [json.loads(x) for x in (tmp_path / "tr" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all({"scr", "ssr", "grad_norm"} <= set(r) for r in rows)


class _FlagAtStep:
    """A DivergenceMonitor stand-in that reports a divergence at step k (1-based)."""

    def __init__(self, k):
        self.k, self.n, self.events, self.window = k, 0, 0, [1.0]

    def __call__(self, window, factor):
        return self

    median = 1.0

    def update(self, loss):
        self.n += 1
        hit = self.n == self.k
        self.events += hit
        return hit


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_stop_on_divergence_keeps_last_good_checkpoint(cache, tmp_path, monkeypatch, command):
    """3 training scans, batch 1: a divergence at step 5 (epoch 2) stops the run with exit 2 and
    leaves the checkpoint of epoch 1; the metrics row says why."""
    import clip2scene.train.loop as loop_mod

    monkeypatch.setattr(loop_mod, "DivergenceMonitor", _FlagAtStep(5))
    out = tmp_path / command
    common = ["--cache", str(cache), "--out", str(out), "--epochs", "3", "--batch-size", "1", "--stop-on-divergence"]
    if command == "train":
        args = ["train", *common, "--channels", "8,8,16,16,32,32,16,8,8"]
    else:
        args = ["finetune", "--checkpoint", "none", *common, "--channels", "8,8,16,16,32,32,16,8,8"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "step 5" in res.output and "last good checkpoint" in res.output and "epoch 1" in res.output
    assert "Traceback" not in res.output
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5 and rows[-1]["diverged"] is True and "loss_median" in rows[-1]
    assert not (out / "result.json").exists()


def test_divergence_without_stop_is_reported(cache, tmp_path, monkeypatch):
    import clip2scene.train.loop as loop_mod

    monkeypatch.setattr(loop_mod, "DivergenceMonitor", _FlagAtStep(2))
    r = finetune(FinetuneConfig(cache=str(cache), out=str(tmp_path / "ft"), epochs=1, batch_size=1, model=TINY,
                                eval_split=None), progress=False)
    assert r["divergences"] == 1
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [bool(row.get("diverged")) for row in rows] == [False, True, False]


BAD = [  # (extra args, text expected in the one-line error)
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm"),
    (["--clip-grad-norm", "nan"], "--clip-grad-norm"),
    (["--lr-scaling", "cubic"], "--lr-scaling"),
    (["--reference-batch", "0"], "--reference-batch"),
    (["--divergence-factor", "1"], "--divergence-factor"),
    (["--divergence-factor", "inf"], "--divergence-factor"),
    (["--divergence-window", "0"], "--divergence-window"),
]


@pytest.mark.parametrize("command", ["train", "finetune", "linear-probe"])
@pytest.mark.parametrize("extra,needle", BAD + [(["--head-input", "bn"], "--head-input")])
def test_hostile_guard_rail_options(cache, tmp_path, command, extra, needle):
    if command == "train" and extra[0] == "--head-input":
        pytest.skip("finetune / linear-probe option")
    out = tmp_path / "run"
    base = ["--cache", str(cache), "--out", str(out)]
    args = {"train": ["train", *base], "finetune": ["finetune", "--checkpoint", "none", *base],
            "linear-probe": ["linear-probe", "--checkpoint", str(tmp_path / "pre.pt"), *base]}[command]
    res = CliRunner().invoke(app, args + extra)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output, res.output
    assert not out.exists()


def test_config_validation_in_the_dataclasses():
    with pytest.raises(ConfigError, match="--warmup-steps"):
        TrainConfig(cache="c", out="o", warmup_steps=1.5)
    with pytest.raises(ConfigError, match="--divergence-window"):
        FinetuneConfig(cache="c", out="o", divergence_window=True)
    assert stability.LR_SCALING == ("linear", "sqrt", "none")
    with pytest.raises(TrainingDiverged.__mro__[1]):  # a Clip2SceneError: one line, exit 2 from the CLI
        raise TrainingDiverged("x")
