"""Watching a run (train/tracking.py): TensorBoard event files, validation with best.pt, ETA, wandb."""

import importlib.machinery
import importlib.util
import json
import math
import re
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clip2scene.errors import ConfigError
from clip2scene.storage import CacheWriter, open_cache
from clip2scene.train.checkpoint import load_checkpoint
from clip2scene.train.evaluate import EvalConfig, evaluate
from clip2scene.train.finetune import FinetuneConfig, evaluate_segmenter, finetune
from clip2scene.train.tracking import BestKeeper, Eta, Validator, duration
from clip2scene.train.trainer import TrainConfig, train
from tests.train.test_trainer import C, TINY, make_scan, teacher_meta, write_cache

TRAIN_TAGS = {"train/loss", "train/scr", "train/ssr", "train/lr", "train/grad_norm", "train/epoch_loss",
              "perf/scans_per_s", "perf/points_per_s"}
VAL_TAGS = {"val/miou", "val/teacher_miou", "val/teacher_accuracy"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("track") / "c.zarr", n=400)  # 3 train scans, 1 val scan


def run_config(cache, out, **kw):
    kw = dict(dict(batch_size=3, lr=0.05, model=TINY, precise_bn_batches=0, warmup_steps=0), **kw)
    return TrainConfig(cache=str(cache), out=str(out), **kw)


def scalars(run) -> dict[str, list]:
    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_event_files_validation_and_best(cache, tmp_path):
    out = tmp_path / "run"
    s = train(run_config(cache, out, epochs=3, val_every=2), progress=False)
    events = scalars(out)
    assert TRAIN_TAGS | VAL_TAGS <= set(events), sorted(events)
    rows = lines(out / "metrics.jsonl")
    # TensorBoard stores float32: the logged values are metrics.jsonl's to float32 precision
    assert [st for st, _ in events["train/loss"]] == [1, 2, 3]
    assert [v for _, v in events["train/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [v for _, v in events["train/lr"]] == pytest.approx([r["lr"] for r in rows], rel=1e-6, abs=1e-12)
    # validated after epoch 2 (every 2) and after the last epoch 3
    vals = lines(out / "val.jsonl")
    assert [v["epoch"] for v in vals] == [2, 3] and [st for st, _ in events["val/miou"]] == [2, 3]
    assert [v for _, v in events["val/miou"]] == pytest.approx([v["miou"] for v in vals], rel=1e-6)
    assert all(v["metric"] == "miou" and v["score"] == v["miou"] and v["scans"] == 1 for v in vals)
    best = max(vals, key=lambda v: v["score"])  # the first of equal scores stays best
    assert s["best"]["score"] == best["score"] and s["best"]["epoch"] == best["epoch"]
    kept = load_checkpoint(out / "best.pt")
    assert kept["epoch"] == best["epoch"] and kept["extra"]["best"]["score"] == best["score"]
    # best.pt holds the model that scored: `clip2scene evaluate` on it gives the same mIoU
    r = evaluate(EvalConfig(checkpoint=str(out / "best.pt"), cache=str(cache), out=str(tmp_path / "e.json")),
                 progress=False)
    assert r["miou"] == pytest.approx(best["miou"], rel=1e-9)
    assert load_checkpoint(out / "checkpoint.pt")["extra"]["best"]["epoch"] == best["epoch"]


def test_no_validation_by_default(cache, tmp_path):
    out = tmp_path / "run"
    s = train(run_config(cache, out, epochs=1), progress=False)
    assert s["val"] is None and not (out / "best.pt").exists() and not (out / "val.jsonl").exists()
    assert TRAIN_TAGS <= set(scalars(out)) and not VAL_TAGS & set(scalars(out))


def test_resume_in_place_purges_the_replayed_steps_and_keeps_the_best(cache, tmp_path):
    out = tmp_path / "run"
    train(run_config(cache, out, epochs=2, val_every=1, keep_checkpoints=True), progress=False)
    first = lines(out / "val.jsonl")
    s = train(run_config(cache, out, epochs=2, val_every=1, resume=str(out / "checkpoint_epoch1.pt")), progress=False)
    assert s["start_epoch"] == 1
    events = scalars(out)
    assert [st for st, _ in events["train/loss"]] == [1, 2]  # step 2 of the first run purged, not doubled
    assert [st for st, _ in events["val/miou"]] == [1, 2]
    assert [v["epoch"] for v in lines(out / "val.jsonl")] == [1, 2]
    # the resumed epoch 2 repeats the first run's epoch 2 exactly, so the same best is chosen
    assert s["best"]["epoch"] == max(first, key=lambda v: v["score"])["epoch"]


def write_unlabelled(path, n=400):
    rng = np.random.default_rng(0)
    text = np.linalg.qr(rng.normal(size=(16, 16)))[0][:C].astype(np.float32)
    with CacheWriter(path, teacher_meta(), C, 16, has_labels=False) as w:
        for i, s in enumerate(("train", "val")):
            w.append(replace(make_scan(rng, i, s, n), label=None))
        w.set_text_embeddings(text)
    return path


class FromIntensity(torch.nn.Module):
    """A fake student: the text embedding of class `floor(intensity * 255 / 80)` (make_scan's
    class code), or of class `constant`."""

    def __init__(self, text: torch.Tensor, constant: int | None = None):
        super().__init__()
        self.text, self.constant = text, constant

    def forward_points(self, vox, feat):
        cls = (feat[:, 0] * 255 // 80).long().clamp(0, C - 1)
        return self.text[torch.full_like(cls, self.constant) if self.constant is not None else cls]


def test_validator_scores_against_the_teacher_without_labels(tmp_path):
    cache = open_cache(write_unlabelled(tmp_path / "u.zarr"))
    text = torch.from_numpy(cache.text_embeddings)
    v = Validator(cache, "val", 1, "distill", 0.1, torch.device("cpu"), text=text)
    assert v.metric == "teacher_miou"
    perfect = v(FromIntensity(text))
    assert perfect["score"] == perfect["teacher_miou"] == 1.0 and perfect["teacher_accuracy"] == 1.0
    assert "miou" not in perfect
    # a student that always says class 0: accuracy = the teacher's share of class 0; IoU(0) = that share,
    # IoU of the other (taught, never predicted) classes 0
    scan = cache.read_scan(int(cache.indices("val")[0]))
    share = float((scan.pair_logits.astype(np.float32).argmax(axis=1) == 0).mean())
    const = v(FromIntensity(text, constant=0))
    assert const["teacher_accuracy"] == pytest.approx(share, rel=1e-12)
    assert const["teacher_miou"] == pytest.approx(share / C, rel=1e-6)


def test_train_without_labels_keeps_best_by_teacher_agreement(tmp_path):
    cache = write_unlabelled(tmp_path / "u.zarr")
    s = train(run_config(cache, tmp_path / "run", epochs=1, val_every=1, batch_size=1), progress=False)
    assert s["val"]["metric"] == "teacher_miou" and s["best"]["score"] == s["val"]["teacher_miou"]
    assert (tmp_path / "run" / "best.pt").exists()


def test_max_steps_stops_mid_epoch_and_refuses_resume(cache, tmp_path):
    out = tmp_path / "run"
    s = train(run_config(cache, out, epochs=2, batch_size=1, max_steps=4), progress=False)
    assert s["steps"] == 4 and s["stopped_at_max_steps"] and len(lines(out / "metrics.jsonl")) == 4
    # the schedule is the full run's (6 steps), not squeezed into 4
    lr4 = lines(out / "metrics.jsonl")[-1]["lr"]
    assert lr4 == pytest.approx(0.05 / 4 * 0.5 * (1 + math.cos(math.pi * 4 / 6)), rel=1e-9)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["extra"]["partial_epoch"] == 4
    with pytest.raises(ConfigError, match="in the middle of epoch 2"):
        train(run_config(cache, tmp_path / "more", epochs=3, resume=str(out / "checkpoint.pt")), progress=False)


def test_finetune_validates_and_keeps_best(cache, tmp_path):
    pre = tmp_path / "pre"
    train(run_config(cache, pre, epochs=1), progress=False)
    out = tmp_path / "ft"
    r = finetune(FinetuneConfig(cache=str(cache), out=str(out), checkpoint=str(pre / "checkpoint.pt"), epochs=2,
                                batch_size=3, eval_split=None, val_every=1, precise_bn_batches=0, warmup_steps=0),
                 progress=False)
    events = scalars(out)
    assert {"train/loss", "train/ce", "train/lovasz", "train/lr", "train/head_lr", "perf/scans_per_s",
            "perf/points_per_s", "val/miou"} <= set(events), sorted(events)
    vals = lines(out / "val.jsonl")
    assert [v["epoch"] for v in vals] == [1, 2] and r["val"]["score"] == vals[-1]["miou"]
    best = max(vals, key=lambda v: v["score"])
    assert r["best"]["epoch"] == best["epoch"]
    ev = evaluate_segmenter(out / "best.pt", str(cache), "val", progress=False)
    assert ev["miou"] == pytest.approx(best["miou"], rel=1e-9)
    assert load_checkpoint(out / "best.pt")["epoch"] == best["epoch"]


def test_linear_probe_max_steps_and_validation(cache, tmp_path):
    pre = tmp_path / "pre"
    train(run_config(cache, pre, epochs=1), progress=False)
    r = finetune(FinetuneConfig(cache=str(cache), out=str(tmp_path / "lp"), checkpoint=str(pre / "checkpoint.pt"),
                                mode="linear", epochs=3, batch_size=1, eval_split="val", max_steps=2, val_every=1),
                 progress=False)
    assert r["steps"] == 2 and r["stopped_at_max_steps"] and r["eval_scans"] == 1
    assert len(lines(tmp_path / "lp" / "metrics.jsonl")) == 2
    # stopped in epoch 1: validated once, after it; the final evaluation (last model) agrees with it
    (val,) = lines(tmp_path / "lp" / "val.jsonl")
    assert val["epoch"] == 1 and val["step"] == 2 and r["miou"] == pytest.approx(val["miou"], rel=1e-9)
    assert load_checkpoint(tmp_path / "lp" / "best.pt")["kind"] == "segmenter"


def test_progress_bar_shows_the_run_eta(cache, tmp_path, capsys):
    train(run_config(cache, tmp_path / "run", epochs=2), progress=True)
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and re.search(r"eta=\d+:\d\d:\d\d", err), err


def test_best_keeper(tmp_path):
    k = BestKeeper(tmp_path, "miou", "val")
    assert [k.update(v, e) for e, v in enumerate([0.2, None, 0.5, 0.5, float("nan"), 0.4], 1)] == \
        [True, False, True, False, False, False]
    assert (k.score, k.epoch) == (0.5, 3)
    state = k.state()
    assert BestKeeper(tmp_path, "miou", "val", state).score is None  # no best.pt on disk
    torch.save(dict(epoch=4), tmp_path / "best.pt")
    assert BestKeeper(tmp_path, "miou", "val", state).score is None  # a later best.pt (resumed from an earlier epoch)
    torch.save(dict(epoch=3), tmp_path / "best.pt")
    assert BestKeeper(tmp_path, "miou", "val", state).score == 0.5  # resumed in place
    assert BestKeeper(tmp_path / "other", "miou", "val", state).score is None  # another run folder: no best.pt there
    assert BestKeeper(tmp_path, "miou", "test", state).score is None  # another split
    assert BestKeeper(tmp_path, "teacher_miou", "val", state).score is None  # another metric


def test_eta_counts_the_whole_run():
    now = [100.0]
    eta = Eta(total=10, done=2, clock=lambda: now[0])  # resumed at step 2 of 10
    assert eta.remaining() is None and eta.text() == "?"
    now[0] = 110.0
    eta.update(4)  # 2 steps in 10 s -> 6 steps left = 30 s
    assert eta.remaining() == pytest.approx(30.0) and eta.text() == "0:00:30"
    assert duration(3725.4) == "1:02:05"


def test_wandb_gets_the_scalars_when_asked(cache, tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # find_spec sees it as installed
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "p")
    train(run_config(cache, tmp_path / "run", epochs=2, val_every=1, wandb=True), progress=False)
    (init,) = calls["init"]
    assert init["project"] == "p" and init["name"] == "run" and init["config"]["epochs"] == 2
    steps = [st for st, v in calls["log"] if "train/loss" in v]
    assert steps == [1, 2] and any("val/miou" in v for _, v in calls["log"]) and calls["finish"] == 1


def test_wandb_not_installed_is_refused():
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match="--wandb: the wandb package is not installed"):
        TrainConfig(cache="c", out="o", wandb=True)
