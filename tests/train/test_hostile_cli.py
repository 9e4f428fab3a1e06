"""Hostile input to the training side of the CLI (train, finetune, linear-probe, evaluate, query).

One table: command, expected exit code, a fragment of the one-line message, and what must hold on
disk afterwards. For every row: no traceback; exit 2 is exactly one `error:` line, and a command
that fails with it never writes or changes a checkpoint (every `*.pt` in --out is as before);
every row leaves `metrics.jsonl` strict JSON (no NaN / Infinity). Exit 130 is Ctrl-C: one line
naming the checkpoint that `--resume` continues from (epochs finished before it are saved).
Rows that train use a 4-scan cache of 400 points and a tiny network, one step per epoch; the CLI
runs in-process (CliRunner), and rows that need a NaN loss or a Ctrl-C at a given step patch the
loss function for that one invocation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import signal
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

from clip2scene.cli import app
from clip2scene.errors import ConfigError, TrainingError
from clip2scene.train import trainer as trainer_module
from clip2scene.train import finetune as finetune_module
from clip2scene.train.checks import check_finite_loss, nonfinite_tensors, remove_run
from clip2scene.train.checkpoint import load_checkpoint
from clip2scene.train.evaluate import EvalConfig
from clip2scene.train.finetune import FinetuneConfig
from clip2scene.train.nets import ModelConfig
from clip2scene.train.trainer import TrainConfig, _continue_schedule, build_optimizer, resumed_config
from tests.helpers import write_cache

runner = CliRunner()
NET = ["--channels", "8,8,16,16,32,32,16,8,8"]
CHANNELS = (8, 8, 16, 16, 32, 32, 16, 8, 8)
# 3 train scans, batch 3: one optimiser step per epoch
# (no warm-up, lr not batch-scaled: the plain cosine at --lr, which the schedule rows check)
TRAIN = ["train", "--cache", "{cache}", "--out", "{out}", "--epochs", "1", "--batch-size", "3", "--lr", "0.05",
         "--precise-bn-batches", "0", "--warmup-steps", "0", "--lr-scaling", "none", *NET]
RESUME = ["train", "--cache", "{cache}", "--out", "{out}", "--resume", "{ckpt}"]
FT = ["finetune", "--checkpoint", "{ckpt}", "--cache", "{cache}", "--out", "{out}", "--epochs", "1",
      "--batch-size", "3", "--eval-split", "none"]
PROBE = ["linear-probe", "--checkpoint", "{ckpt}", "--cache", "{cache}", "--out", "{out}", "--epochs", "1",
         "--eval-split", "none"]


def invoke(args: list[str]):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny cache and one finished 1-epoch run (`base`) trained through the CLI."""
    root = tmp_path_factory.mktemp("hostile")
    cache = write_cache(root / "c.zarr", n=400)
    base = root / "base"
    r = invoke([a.format(cache=cache, out=base) for a in TRAIN])
    assert r.exit_code == 0, r.output
    return SimpleNamespace(root=root, cache=cache, base=base, ckpt=base / "checkpoint.pt", train_output=r.stdout)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every checkpoint file in `folder`."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.pt*"))} \
        if folder.is_dir() else {}


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"non-strict JSON constant {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ row setups and checks
def copy_base(ctx):
    shutil.copytree(ctx.world.base, ctx.out)


def copy_base_plus_extras(ctx):
    copy_base(ctx)
    (ctx.out / "notes.txt").write_text("mine")
    (ctx.out / "eval_val.json").write_text("{}")


def nan_checkpoint(ctx):
    ckpt = torch.load(ctx.world.ckpt, map_location="cpu", weights_only=False)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name][0] = float("nan")
    ctx.bad.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, ctx.bad)


def checkpoint_at_epoch_5(ctx):
    copy_base(ctx)
    ckpt = torch.load(ctx.out / "checkpoint.pt", map_location="cpu", weights_only=False)
    ckpt["epoch"] = 5
    torch.save(ckpt, ctx.out / "checkpoint.pt")


def patch_loss(ctx, at_call: int, what: str, module=trainer_module, name="compute_loss"):
    """Make the loss function of `module` return NaN (what="nan") or raise KeyboardInterrupt
    (what="interrupt") on its `at_call`-th call in this invocation."""
    real = getattr(module, name)
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call and what == "interrupt":
            raise KeyboardInterrupt
        loss, terms = real(*args, **kwargs)
        if calls["n"] == at_call:
            key = "scr" if "scr" in terms else next(iter(terms))
            return loss * float("nan"), {**terms, key: float("nan")}
        return loss, terms

    ctx.monkeypatch.setattr(module, name, patched)


def config_file(text: str, name: str = "cfg.toml"):
    """Row setup: write `text` to {cfg} (tmp_path/cfg.toml) or tmp_path/`name`."""
    def setup(ctx):
        path = ctx.out.parent / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text.format(cache=ctx.world.cache))
    return setup


def trained_as_in_config(ctx, r):
    """`train --config base/config.json --out OUT`: the same options as the base run."""
    saved = json.loads((ctx.world.base / "config.json").read_text())
    now = json.loads((ctx.out / "config.json").read_text())
    assert {k: v for k, v in now.items() if k != "out"} == {k: v for k, v in saved.items() if k != "out"}


def nothing_written(ctx, r):
    assert not (ctx.out / "checkpoint.pt").exists() and not (ctx.out / "metrics.jsonl").exists()


def metrics_unchanged(ctx, r):
    assert (ctx.out / "metrics.jsonl").read_bytes() == (ctx.world.base / "metrics.jsonl").read_bytes()


def overwritten(ctx, r):
    assert len(strict_json_lines(ctx.out / "metrics.jsonl")) == 1  # only the new run's step
    assert (ctx.out / "notes.txt").read_text() == "mine"  # not a run file: kept
    assert not (ctx.out / "eval_val.json").exists()  # the old run's evaluation: removed
    assert len(list(ctx.out.glob("events.out.tfevents.*"))) == 1  # the old run's TensorBoard file: removed
    assert load_checkpoint(ctx.out / "checkpoint.pt")["epoch"] == 1


def checkpoint_kept(ctx, r):
    assert digest(ctx.out) == digest(ctx.world.base)


def extended(ctx, r):
    ckpt = load_checkpoint(ctx.out / "checkpoint.pt")
    assert ckpt["epoch"] == 3 and tuple(ckpt["model_config"]["channels"]) == CHANNELS
    assert ckpt["train_config"]["lr"] == 0.05 and ckpt["train_config"]["epochs"] == 3  # the run's own options
    lrs = {m["step"]: m["lr"] for m in strict_json_lines(ctx.out / "metrics.jsonl")}
    # the cosine stretched over 3 steps: lr after step s = 0.05 * 0.5 * (1 + cos(pi s / 3))
    assert sorted(lrs) == [2, 3]
    assert lrs[2] == pytest.approx(0.05 * 0.5 * (1 + math.cos(2 * math.pi / 3)), rel=1e-12)
    assert lrs[3] == pytest.approx(0.0, abs=1e-12)


def stopped_after_step_1(ctx, r):
    assert [m["step"] for m in strict_json_lines(ctx.out / "metrics.jsonl")] == [1]


def no_checkpoint(ctx, r):
    assert not (ctx.out / "checkpoint.pt").exists()


def partial_run(ctx):
    """A --max-steps run that stops in the middle of its first epoch (3 scans, batch 1)."""
    r = invoke([a.format(cache=ctx.world.cache, out=ctx.out) for a in TRAIN + ["--batch-size", "1", "--max-steps", "2"]])
    assert r.exit_code == 0, r.output


def validated_run(ctx):
    r = invoke([a.format(cache=ctx.world.cache, out=ctx.out) for a in TRAIN + ["--val-every", "1"]])
    assert r.exit_code == 0, r.output


def validated_epochs_1_2(ctx, r):
    assert [v["epoch"] for v in strict_json_lines(ctx.out / "val.jsonl")] == [1, 2]


def two_steps_logged(ctx, r):
    assert [m["step"] for m in strict_json_lines(ctx.out / "metrics.jsonl")] == [1, 2]
    assert load_checkpoint(ctx.out / "checkpoint.pt")["epoch"] == 2  # stopped at an epoch's end: resumable


def best_kept(ctx, r):
    vals = strict_json_lines(ctx.out / "val.jsonl")
    assert [v["epoch"] for v in vals] == [1] and vals[0]["best"] and vals[0]["metric"] == "miou"
    assert load_checkpoint(ctx.out / "best.pt")["extra"]["best"]["score"] == vals[0]["score"]


def interrupted_after_epoch_1(ctx, r):
    assert load_checkpoint(ctx.out / "checkpoint.pt")["epoch"] == 1


@dataclass
class Row:
    id: str
    args: list
    code: int
    fragment: str
    setup: Callable | None = None
    after: Callable | None = None


ROWS = [
    # options refused before any work (TrainConfig / FinetuneConfig / ModelConfig.__post_init__)
    Row("lr-negative", TRAIN + ["--lr", "-1"], 2, "--lr -1.0: must be a finite number > 0", after=nothing_written),
    Row("lr-zero", TRAIN + ["--lr", "0"], 2, "--lr 0.0", after=nothing_written),
    Row("lr-nan", TRAIN + ["--lr", "nan"], 2, "--lr nan", after=nothing_written),
    Row("lr-inf", TRAIN + ["--lr", "inf"], 2, "--lr inf", after=nothing_written),
    Row("tau-zero", TRAIN + ["--tau", "0"], 2, "--tau 0.0", after=nothing_written),
    Row("tau-negative", TRAIN + ["--tau", "-1"], 2, "--tau -1.0", after=nothing_written),
    Row("voxel-size-zero", TRAIN + ["--voxel-size", "0"], 2, "--voxel-size 0.0", after=nothing_written),
    Row("sweeps-zero", TRAIN + ["--sweeps", "0"], 2, "--sweeps 0: must be an integer >= 1", after=nothing_written),
    Row("sweeps-beyond-cache", TRAIN + ["--sweeps", "99"], 2, "--sweeps 99: cache", after=nothing_written),
    Row("arch-unknown", TRAIN + ["--arch", "pointnet"], 2, "--arch 'pointnet': unknown model arch; known: minkunet, spvcnn",
        after=nothing_written),
    Row("channels-count", TRAIN + ["--channels", "8,8"], 2, "--channels 8,8", after=nothing_written),
    Row("channels-text", TRAIN + ["--channels", "a,b"], 2, "--channels 'a,b'", after=nothing_written),
    Row("workers-negative", TRAIN + ["--workers", "-1"], 2, "--workers -1", after=nothing_written),
    Row("switch-prob", TRAIN + ["--switch-prob", "2"], 2, "--switch-prob 2.0: must be a finite number in [0, 1]",
        after=nothing_written),
    Row("switch-epoch", TRAIN + ["--switch-epoch", "-5"], 2, "--switch-epoch -5", after=nothing_written),
    Row("precise-bn", TRAIN + ["--precise-bn-batches", "-3"], 2, "--precise-bn-batches -3", after=nothing_written),
    Row("ssr-weight", TRAIN + ["--ssr-weight", "-1"], 2, "--ssr-weight -1.0", after=nothing_written),
    Row("kl-weight-nan", TRAIN + ["--kl-weight", "nan"], 2, "--kl-weight nan", after=nothing_written),
    Row("weights-all-zero", TRAIN + ["--scr-weight", "0", "--ssr-weight", "0"], 2, "nothing to train",
        after=nothing_written),
    Row("ssr-lambda", TRAIN + ["--ssr-lambda", "0"], 2, "--ssr-lambda 0.0", after=nothing_written),
    Row("ssr-grid", TRAIN + ["--ssr-grid", "-0.1"], 2, "--ssr-grid -0.1", after=nothing_written),
    Row("epochs-zero", TRAIN + ["--epochs", "0"], 2, "--epochs 0", after=nothing_written),
    Row("batch-size-zero", TRAIN + ["--batch-size", "0"], 2, "--batch-size 0", after=nothing_written),
    Row("seed-negative", TRAIN + ["--seed", "-1"], 2, "--seed -1", after=nothing_written),
    Row("self-training", TRAIN + ["--self-training", "sometimes"], 2, "expected one of point, batch, off",
        after=nothing_written),
    Row("ft-label-fraction-zero", FT + ["--label-fraction", "0"], 2, "--label-fraction 0.0", after=nothing_written),
    Row("ft-label-fraction-big", FT + ["--label-fraction", "1.5"], 2, "--label-fraction 1.5", after=nothing_written),
    Row("ft-lr", FT + ["--lr", "-1"], 2, "--lr -1.0", after=nothing_written),
    Row("ft-head-lr-mult", FT + ["--head-lr-mult", "0"], 2, "--head-lr-mult 0.0", after=nothing_written),
    Row("ft-lovasz", FT + ["--lovasz-weight", "-1"], 2, "--lovasz-weight -1.0", after=nothing_written),
    Row("ft-epochs", FT + ["--epochs", "0"], 2, "--epochs 0", after=nothing_written),
    Row("ft-workers", FT + ["--workers", "-1"], 2, "--workers -1", after=nothing_written),
    Row("ft-voxel-size", FT + ["--voxel-size", "0"], 2, "--voxel-size 0.0", after=nothing_written),
    Row("ft-arch", ["finetune", "--checkpoint", "none", "--cache", "{cache}", "--out", "{out}", "--arch", "pointnet"],
        2, "known: minkunet, spvcnn", after=nothing_written),
    Row("probe-random", ["linear-probe", "--checkpoint", "none", "--cache", "{cache}", "--out", "{out}"], 2,
        "linear probe of a random backbone", after=nothing_written),
    Row("probe-lr-nan", PROBE + ["--lr", "nan"], 2, "--lr nan", after=nothing_written),
    # --config FILE (TOML, or a run's config.json): one line naming the file (and the key)
    Row("config-missing", TRAIN + ["--config", "{tmp}/nope.toml"], 2, "--config {tmp}/nope.toml: file not found",
        after=nothing_written),
    Row("config-a-folder", TRAIN + ["--config", "{tmp}"], 2, "--config {tmp}: cannot read it", after=nothing_written),
    Row("config-bad-toml", TRAIN + ["--config", "{cfg}"], 2, "{cfg}: not valid TOML", setup=config_file("lr = = 1"),
        after=nothing_written),
    Row("config-not-text", TRAIN + ["--config", "{cfg}"], 2, "{cfg}: not a text file",
        setup=config_file(b"\xff\xfe\x00lr"), after=nothing_written),
    Row("config-bad-json", TRAIN + ["--config", "{tmp}/c.json"], 2, "{tmp}/c.json: not valid JSON (line 1",
        setup=config_file('{{"lr": 0.1', "c.json"), after=nothing_written),
    Row("config-json-list", TRAIN + ["--config", "{tmp}/c.json"], 2, "{tmp}/c.json: expected a table of options",
        setup=config_file("[1, 2]", "c.json"), after=nothing_written),
    Row("config-unknown-key", TRAIN + ["--config", "{cfg}"], 2, "{cfg}: unknown key 'lrr'", setup=config_file("lrr = 1"),
        after=nothing_written),
    Row("config-unknown-model-key", TRAIN + ["--config", "{cfg}"], 2, "{cfg}: unknown key 'model.width'",
        setup=config_file("[model]\nwidth = 3"), after=nothing_written),
    Row("config-wrong-type", TRAIN + ["--config", "{cfg}"], 2, '{cfg}: epochs = "ten": expected an integer',
        setup=config_file('epochs = "ten"'), after=nothing_written),
    Row("config-bool-type", TRAIN + ["--config", "{cfg}"], 2, "{cfg}: augment = 1: expected true or false",
        setup=config_file("augment = 1"), after=nothing_written),
    Row("config-bad-channels", TRAIN + ["--config", "{cfg}"], 2, "{cfg}: model.channels 'a,b'",
        setup=config_file('[model]\nchannels = "a,b"'), after=nothing_written),
    Row("config-value-out-of-range", ["train", "--config", "{cfg}", "--out", "{out}"], 2,
        "--lr -1.0: must be a finite number > 0 (set by lr in {cfg})",
        setup=config_file('cache = "{cache}"\nlr = -1.0'), after=nothing_written),
    Row("config-model-out-of-range", ["train", "--config", "{cfg}", "--out", "{out}", "--cache", "{cache}"], 2,
        "--arch 'pointnet': unknown model arch; known: minkunet, spvcnn (set by model.arch in {cfg})",
        setup=config_file('[model]\narch = "pointnet"'), after=nothing_written),
    Row("config-without-cache", ["train", "--config", "{cfg}", "--out", "{out}"], 2,
        "missing option --cache: give it or set cache in {cfg}", setup=config_file("epochs = 1"), after=nothing_written),
    Row("config-command-line-wins", TRAIN + ["--config", "{cfg}", "--lr", "-2"], 2, "--lr -2.0: must be",
        setup=config_file("lr = 0.5"), after=nothing_written),
    Row("config-probe-given-finetune-preset", PROBE + ["--config", "finetune-1pct"], 2,
        "finetune-1pct.toml: mode = 'finetune' does not fit `clip2scene linear-probe` (mode 'linear')",
        after=nothing_written),
    Row("config-finetune-wrong-type", FT + ["--config", "{cfg}"], 2, '{cfg}: label_fraction = "1%": expected a number',
        setup=config_file('label_fraction = "1%"'), after=nothing_written),
    Row("config-finetune-range", FT + ["--config", "{cfg}"], 2,
        "--label-fraction 2.0: must be a finite number in (0, 1] (set by label_fraction in {cfg})",
        setup=config_file("label_fraction = 2"), after=nothing_written),
    Row("config-json-of-a-run", ["train", "--config", "{base}/config.json", "--out", "{out}"], 0, "checkpoint:",
        after=trained_as_in_config),
    # watching a run: validation, smoke-run limits, wandb (train/tracking.py)
    Row("val-every-negative", TRAIN + ["--val-every", "-1"], 2, "--val-every -1: must be an integer >= 0 (0 = off)",
        after=nothing_written),
    Row("val-split-empty", TRAIN + ["--val-every", "1", "--val-split", "test"], 2,
        "--val-split 'test': cache {cache} has no scans in it (it has train=3, val=1)", after=nothing_written),
    Row("max-steps-zero", TRAIN + ["--max-steps", "0"], 2, "--max-steps 0: must be an integer >= 1",
        after=nothing_written),
    Row("ft-val-every", FT + ["--val-every", "-2"], 2, "--val-every -2", after=nothing_written),
    Row("ft-val-split-empty", FT + ["--val-every", "1", "--val-split", "test"], 2, "--val-split 'test'",
        after=nothing_written),
    Row("ft-max-steps", FT + ["--max-steps", "0"], 2, "--max-steps 0", after=nothing_written),
    Row("probe-max-steps", PROBE + ["--max-steps", "-1"], 2, "--max-steps -1", after=nothing_written),
    Row("evaluate-limit-zero", ["evaluate", "--checkpoint", "{ckpt}", "--cache", "{cache}", "--limit", "0"], 2,
        "--limit 0: must be an integer >= 1"),
    *([Row("wandb-not-installed", TRAIN + ["--wandb"], 2, "--wandb: the wandb package is not installed",
           after=nothing_written),
       Row("ft-wandb-not-installed", FT + ["--wandb"], 2, "--wandb: the wandb package is not installed",
           after=nothing_written)] if importlib.util.find_spec("wandb") is None else []),
    Row("resume-partial-epoch", RESUME[:-1] + ["{out}/checkpoint.pt", "--epochs", "2"], 2,
        "{out}/checkpoint.pt was written by a --max-steps run in the middle of epoch 1 (step 2)", setup=partial_run),
    Row("resume-max-steps-behind", RESUME + ["--epochs", "3", "--max-steps", "1"], 2,
        "--max-steps 1: {ckpt} is already at step 1", after=nothing_written),
    Row("max-steps", TRAIN + ["--epochs", "3", "--max-steps", "2"], 0, "stopped at --max-steps (step 2 of 3)",
        after=two_steps_logged),
    Row("ft-max-steps-stops", FT + ["--epochs", "3", "--max-steps", "1"], 0, "stopped at --max-steps (step 1 of 3)"),
    Row("limit-zero", TRAIN + ["--limit", "0"], 2, "--limit 0: must be an integer >= 1", after=nothing_written),
    Row("ft-limit-negative", FT + ["--limit", "-1"], 2, "--limit -1", after=nothing_written),
    Row("probe-limit-text", PROBE + ["--limit", "x"], 2, "Invalid value for '--limit'", after=nothing_written),
    Row("epochs-text", TRAIN + ["--epochs", "ten"], 2, "Invalid value for '--epochs'", after=nothing_written),
    Row("unknown-option", TRAIN + ["--epoch", "2"], 2, "No such option: --epoch", after=nothing_written),
    Row("limit", TRAIN + ["--limit", "1"], 0, "  1 scans x 1 epochs"),
    Row("ft-limit", FT + ["--limit", "1"], 0, "labelled scans 1 of"),
    Row("val-every", TRAIN + ["--val-every", "1"], 0, "validation on val (1 scan): miou", after=best_kept),
    Row("resume-keeps-validating", RESUME[:-1] + ["{out}/checkpoint.pt", "--epochs", "2"], 0,
        "validation on val (1 scan)", setup=validated_run, after=validated_epochs_1_2),
    Row("resume-other-val-split", RESUME + ["--epochs", "2", "--val-every", "1", "--val-split", "train"], 0,
        "validation on train (3 scans)"),
    Row("resume-says-epoch", RESUME + ["--epochs", "2"], 0, "resumed from epoch 1 ({ckpt}): training epochs 2-2"),
    Row("evaluate-limit", ["evaluate", "--checkpoint", "{ckpt}", "--cache", "{cache}", "--split", "train", "--limit",
                           "1", "--out", "{out}/eval.json"], 0, "train: the first 1 of 3 scans (--limit)"),
    # an existing run in --out
    Row("existing-run", TRAIN, 2, "already holds a run (checkpoint.pt, metrics.jsonl)", setup=copy_base,
        after=metrics_unchanged),
    Row("existing-run-finetune", FT, 2, "already holds a run", setup=copy_base, after=metrics_unchanged),
    Row("existing-run-probe", PROBE, 2, "give --overwrite", setup=copy_base, after=metrics_unchanged),
    Row("overwrite", TRAIN + ["--overwrite"], 0, "checkpoint:", setup=copy_base_plus_extras, after=overwritten),
    Row("overwrite-own-resume", TRAIN + ["--overwrite", "--resume", "{out}/checkpoint.pt"], 2,
        "--overwrite would delete", setup=copy_base, after=checkpoint_kept),
    # resume
    Row("resume-finished", RESUME, 0, "nothing to do: {ckpt} is already at epoch 1 of 1", after=nothing_written),
    Row("resume-finished-in-place", RESUME[:-1] + ["{out}/checkpoint.pt"], 0, "already at epoch 1 of 1",
        setup=copy_base, after=checkpoint_kept),
    Row("resume-past-epochs", RESUME[:-1] + ["{out}/checkpoint.pt", "--epochs", "3"], 2, "is already at epoch 5",
        setup=checkpoint_at_epoch_5),
    Row("resume-missing", RESUME[:-1] + ["{out}/nope.pt"], 2, "checkpoint not found: {out}/nope.pt",
        after=nothing_written),
    Row("resume-other-arch", RESUME + ["--epochs", "2", "--arch", "minkunet"], 2,
        "--arch minkunet differs from the run being resumed", after=nothing_written),
    Row("resume-other-channels", RESUME + ["--epochs", "2", "--channels", "8,8,8,8,8,8,8,8,8"], 2,
        "--channels 8,8,8,8,8,8,8,8,8 differs from the run being resumed ({ckpt} has 8,8,16,16,32,32,16,8,8)",
        after=nothing_written),
    Row("resume-other-lr", RESUME + ["--epochs", "2", "--lr", "0.1"], 2, "--lr 0.1 differs", after=nothing_written),
    Row("resume-other-run-folder", RESUME + ["--epochs", "2"], 2, "already holds a run", setup=copy_base,
        after=checkpoint_kept),
    Row("resume-extends-without-model-options", RESUME + ["--epochs", "3"], 0,
        "extended from 1 to 3 epochs: the cosine schedule now runs over 3 epochs", after=extended),
    # non-finite checkpoints are refused by every reader
    Row("evaluate-nan-checkpoint", ["evaluate", "--checkpoint", "{bad}", "--cache", "{cache}"], 2,
        "{bad}: 1 of", setup=nan_checkpoint),
    Row("finetune-nan-checkpoint", FT[:2] + ["{bad}"] + FT[3:], 2, "tensors hold NaN/Inf", setup=nan_checkpoint,
        after=nothing_written),
    Row("query-nan-checkpoint", ["query", "a car", "--checkpoint", "{bad}", "--cache", "{cache}", "--out", "{out}"], 2,
        "tensors hold NaN/Inf", setup=nan_checkpoint),
    Row("resume-nan-checkpoint", RESUME[:-1] + ["{bad}"], 2, "the run that wrote it diverged", setup=nan_checkpoint,
        after=nothing_written),
    # non-finite training stops at the first bad step and keeps the last good checkpoint
    Row("nan-loss-keeps-checkpoint", RESUME[:-1] + ["{out}/checkpoint.pt", "--epochs", "3"], 2,
        "non-finite loss at step 2 (epoch 2): loss=nan, scr=nan; training stopped, the last good checkpoint "
        "{out}/checkpoint.pt (epoch 1) is kept", setup=lambda ctx: (copy_base(ctx), patch_loss(ctx, 1, "nan")),
        after=lambda ctx, r: (checkpoint_kept(ctx, r), stopped_after_step_1(ctx, r))),
    Row("tiny-tau-diverges", TRAIN + ["--tau", "1e-30"], 2, "non-finite", after=no_checkpoint),
    Row("finetune-nan-loss", FT, 2, "non-finite loss at step 1 (epoch 1): loss=nan, ce=nan; training stopped, nothing",
        setup=lambda ctx: patch_loss(ctx, 1, "nan", finetune_module, "segmentation_loss"), after=no_checkpoint),
    # Ctrl-C: one line naming the checkpoint to resume from, exit 130
    Row("ctrl-c", TRAIN + ["--epochs", "3"], 130, "interrupted in epoch 2 of 3; `--resume {out}/checkpoint.pt` "
        "continues from epoch 1", setup=lambda ctx: patch_loss(ctx, 2, "interrupt"), after=interrupted_after_epoch_1),
    Row("ctrl-c-first-epoch", TRAIN, 130, "no checkpoint was written yet",
        setup=lambda ctx: patch_loss(ctx, 1, "interrupt"), after=no_checkpoint),
    Row("ctrl-c-finetune", FT, 130, "finetune has no --resume",
        setup=lambda ctx: patch_loss(ctx, 1, "interrupt", finetune_module, "segmentation_loss")),
    # a random teacher is said plainly
    Row("evaluate-random-teacher", ["evaluate", "--checkpoint", "{ckpt}", "--cache", "{cache}", "--out",
                                    "{out}/eval.json"], 0, "(RANDOM teacher, no CLIP weights)"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_hostile_cli(world, tmp_path, monkeypatch, row):
    out, bad = tmp_path / "out", tmp_path / "bad" / "checkpoint.pt"
    ctx = SimpleNamespace(world=world, out=out, bad=bad, monkeypatch=monkeypatch)
    if row.setup:
        row.setup(ctx)
    names = dict(cache=world.cache, out=out, ckpt=world.ckpt, bad=bad, tmp=tmp_path, cfg=tmp_path / "cfg.toml",
                 base=world.base)
    before = digest(out)
    r = invoke([a.format(**names) for a in row.args])
    text = r.output + r.stderr
    assert "Traceback" not in text, text
    assert r.exit_code == row.code, text
    fragment = row.fragment.format(**names)
    if row.code == 0:
        assert fragment in r.stdout, r.stdout
    else:
        last = r.stderr.strip().splitlines()[-1]  # progress bars may come before it
        assert fragment in last, last
    if row.code == 130:
        assert r.stderr.count("interrupted") == 1 and "error" not in r.stderr, r.stderr
    if row.code == 2:
        assert last.startswith("error: ") and r.stderr.count("error:") == 1, r.stderr
        # a failed command writes or changes no checkpoint, and leaves no temp file
        after = digest(out)
        assert {k: v for k, v in after.items() if k in before} == before and set(after) <= set(before), (before, after)
    if (out / "metrics.jsonl").exists():
        strict_json_lines(out / "metrics.jsonl")
    if row.after:
        row.after(ctx, r)


def test_train_summary_says_the_teacher_was_random(world):
    assert "randomly initialised teacher" in world.train_output


def test_interrupted_run_resumes_in_place_without_duplicate_steps(world, tmp_path, monkeypatch):
    """Ctrl-C in epoch 2 of 3, then `--resume` of the named checkpoint into the same folder: the
    steps of the interrupted epoch are not logged twice, and the options come from the run."""
    out = tmp_path / "run"
    ctx = SimpleNamespace(monkeypatch=monkeypatch)
    patch_loss(ctx, 2, "interrupt")
    r = invoke([a.format(cache=world.cache, out=out) for a in TRAIN + ["--epochs", "3"]])
    assert r.exit_code == 130 and f"--resume {out / 'checkpoint.pt'}" in r.stderr, r.output
    monkeypatch.undo()
    with (out / "metrics.jsonl").open("a") as f:  # a torn line of a killed process and a step past the checkpoint
        f.write(json.dumps(dict(step=2, epoch=2, loss=1.0)) + "\n{\"step\": 3, \"lo")
    r = invoke(["train", "--cache", world.cache, "--out", out, "--resume", out / "checkpoint.pt"])
    assert r.exit_code == 0, r.output
    assert "3 epochs (resumed at epoch 1) = 3 steps" in r.stdout and "extended" not in r.stdout
    assert [m["step"] for m in strict_json_lines(out / "metrics.jsonl")] == [1, 2, 3]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3


@pytest.mark.slow
def test_real_sigint_names_the_resume_checkpoint(world, tmp_path):
    """A real SIGINT to a training process: exit 130, one line, no traceback."""
    out = tmp_path / "run"
    args = [a.format(cache=world.cache, out=out) for a in TRAIN]
    args[args.index("--epochs") + 1] = "1000"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "clip2scene.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and f"`--resume {out / 'checkpoint.pt'}` continues from epoch" in stderr, stderr
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] >= 1
    strict_json_lines(out / "metrics.jsonl")


# ------------------------------------------------------------------------------ the library side, fast
GOOD = dict(cache="c.zarr", out="run")


@pytest.mark.parametrize("changes,message", [
    (dict(lr=-1.0), "--lr -1.0"), (dict(lr=0.0), "--lr 0.0"), (dict(lr=float("nan")), "--lr nan"),
    (dict(lr="0.1"), "--lr '0.1'"), (dict(epochs=0), "--epochs 0"), (dict(epochs=2.5), "--epochs 2.5"),
    (dict(batch_size=0), "--batch-size 0"), (dict(momentum=1.0), "--momentum 1.0"),
    (dict(weight_decay=-1e-4), "--weight-decay"), (dict(tau=0.0), "--tau 0.0"), (dict(tau=float("inf")), "--tau inf"),
    (dict(voxel_size=0.0), "--voxel-size 0.0"), (dict(workers=-1), "--workers -1"), (dict(seed=-1), "--seed -1"),
    (dict(precise_bn_batches=-3), "--precise-bn-batches -3"), (dict(sweeps=0), "--sweeps 0"),
    (dict(scr_weight=-1.0), "--scr-weight -1.0"), (dict(ssr_weight=-1.0), "--ssr-weight -1.0"),
    (dict(kl_weight=float("nan")), "--kl-weight nan"), (dict(scr_weight=0.0, ssr_weight=0.0), "nothing to train"),
    (dict(ssr_lambda=0.0), "--ssr-lambda 0.0"), (dict(ssr_grid=0.0), "--ssr-grid 0.0"),
    (dict(self_training="maybe"), "--self-training 'maybe'"), (dict(switch_epoch=-5), "--switch-epoch -5"),
    (dict(switch_prob=2.0), "--switch-prob 2.0"), (dict(switch_prob=-0.1), "--switch-prob -0.1"),
    (dict(augment="yes"), "--augment 'yes'"), (dict(split=""), "--split ''"), (dict(out=""), "--out ''"),
    (dict(storage_options=None), "storage_options"), (dict(model="spvcnn"), "model 'spvcnn'"),
    (dict(overwrite=True, resume="run/checkpoint.pt"), "--overwrite would delete run/checkpoint.pt"),
    (dict(val_every=-1), "--val-every -1"), (dict(val_every=1.5), "--val-every 1.5"), (dict(val_split=""), "--val-split ''"),
    (dict(max_steps=0), "--max-steps 0"), (dict(wandb="yes"), "--wandb 'yes'"),
])
def test_train_config_refuses(changes, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{**GOOD, **changes})
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("changes,message", [
    (dict(mode="full"), "--mode 'full'"), (dict(mode="linear"), "linear probe of a random backbone"),
    (dict(label_fraction=0.0), "--label-fraction 0.0"), (dict(label_fraction=1.5), "--label-fraction 1.5"),
    (dict(epochs=0), "--epochs 0"), (dict(batch_size=-2), "--batch-size -2"), (dict(lr=float("nan")), "--lr nan"),
    (dict(head_lr_mult=0.0), "--head-lr-mult 0.0"), (dict(momentum=-0.5), "--momentum -0.5"),
    (dict(lovasz_weight=-1.0), "--lovasz-weight -1.0"), (dict(voxel_size=-0.1), "--voxel-size -0.1"),
    (dict(workers=-1), "--workers -1"), (dict(seed=-3), "--seed -3"), (dict(precise_bn_batches=-1), "--precise-bn-batches"),
    (dict(eval_split=""), "--eval-split ''"),
    (dict(val_every=-1), "--val-every -1"), (dict(val_split=None), "--val-split None"),
    (dict(max_steps=0), "--max-steps 0"), (dict(wandb=1), "--wandb 1"),
])
def test_finetune_config_refuses(changes, message):
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(**{**GOOD, **changes})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_eval_config_refuses():
    with pytest.raises(ConfigError, match="--batch-size 0"):
        EvalConfig(checkpoint="c.pt", cache="c.zarr", batch_size=0)
    with pytest.raises(ConfigError, match="--split ''"):
        EvalConfig(checkpoint="c.pt", cache="c.zarr", split="")
    with pytest.raises(ConfigError, match="--limit 0: must be an integer >= 1"):
        EvalConfig(checkpoint="c.pt", cache="c.zarr", limit=0)


def test_model_config_refuses_unknown_arch():
    with pytest.raises(ConfigError, match="'pointnet'.*minkunet, spvcnn"):
        ModelConfig(arch="pointnet")
    with pytest.raises(ValueError):  # ConfigError is a ValueError too
        ModelConfig(channels=(8, 8, 0, 8, 8, 8, 8, 8, 8))


def test_valid_configs_pass():
    TrainConfig(**GOOD, voxel_size=0.05, sweeps=1, switch_epoch=0, switch_prob=1.0, scr_weight=0.0, momentum=0.0)
    FinetuneConfig(**GOOD, checkpoint="pre.pt", mode="linear", label_fraction=0.01, eval_split=None)


def test_check_finite_loss_names_only_the_bad_terms():
    check_finite_loss(7, 2, 1.5, dict(scr=1.0, ssr=0.5), "kept")
    with pytest.raises(TrainingError) as e:
        check_finite_loss(7, 2, float("nan"), dict(scr=1.0, ssr=float("inf")), "no checkpoint was written")
    msg = str(e.value)
    assert msg.startswith("non-finite loss at step 7 (epoch 2): loss=nan, ssr=inf;") and "scr" not in msg
    assert "no checkpoint was written" in msg


def test_nonfinite_tensors_walks_nested_state():
    state = dict(a=torch.ones(2), b=dict(c=torch.tensor([0.0, float("inf")]), d=[torch.zeros(1), torch.tensor([1, 2])]))
    assert nonfinite_tensors(state) == ["b.c"]
    state["b"]["d"][0][0] = float("nan")
    assert nonfinite_tensors(state) == ["b.c", "b.d.0"]


def test_remove_run_removes_only_run_files(tmp_path):
    for name in ("checkpoint.pt", "checkpoint_epoch3.pt", "metrics.jsonl", "config.json", "eval_val.json",
                 "confusion_val.png", "training_curves.png", "result.json", "checkpoint.pt.tmp", "notes.md", "data.pt"):
        (tmp_path / name).write_text("x")
    removed = remove_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.pt", "notes.md"] and len(removed) == 9


def _schedule(total: int, steps: int, lr: float = 0.1):
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(model, TrainConfig(**GOOD, lr=lr, warmup_steps=0, lr_scaling="none"), total, total)
    for _ in range(steps):
        opt.step()
        sched.step()
    return model, opt, sched


@pytest.mark.parametrize("old_total,new_total", [(4, 4), (4, 12), (6, 6)])
def test_continue_schedule(old_total, new_total):
    """Same total: the saved rate bit for bit (exact resume). More epochs: the stretched cosine's
    rate at the resume step, never the stale one of the old schedule (0 after a finished run)."""
    _, opt, sched = _schedule(old_total, old_total if old_total == 4 else 3)
    step = sched.last_epoch
    model2, opt2, sched2 = _schedule(new_total, 0)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    note = _continue_schedule(opt2, sched2, old_total // 2, new_total // 2)
    expected = 0.1 * 0.5 * (1 + math.cos(math.pi * step / new_total))
    if old_total == new_total:
        assert note is None and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    else:
        assert opt.param_groups[0]["lr"] == 0.0 and "extended from 2 to 6 epochs" in note
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


def test_resumed_config_library_semantics(world):
    ckpt = load_checkpoint(world.ckpt)
    saved = ckpt["train_config"]
    model = ModelConfig(arch="spvcnn", channels=CHANNELS)
    cfg = resumed_config(TrainConfig(cache=str(world.cache), out="x", epochs=4, lr=0.05, batch_size=3,
                                     precise_bn_batches=0, warmup_steps=0, lr_scaling="none", model=model), ckpt)
    assert cfg.epochs == 4 and cfg.voxel_size == saved["voxel_size"] and cfg.switch_epoch == saved["switch_epoch"]
    with pytest.raises(ConfigError, match=r"^--lr 0\.1 differs"):  # library: every non-None option counts as given
        resumed_config(TrainConfig(cache=str(world.cache), out="x", batch_size=3, model=model), ckpt)
    with pytest.raises(ConfigError, match=r"^--blocks-per-stage 1 differs"):
        resumed_config(TrainConfig(cache=str(world.cache), out="x", lr=0.05, batch_size=3, precise_bn_batches=0,
                                   warmup_steps=0, lr_scaling="none",
                                   model=ModelConfig(arch="spvcnn", channels=CHANNELS, blocks_per_stage=1)), ckpt)
    # CLI: only the typed options are compared; the rest, the model included, come from the run
    cfg = resumed_config(TrainConfig(cache=str(world.cache), out="x"), ckpt, given={"cache", "out"})
    assert cfg.lr == 0.05 and cfg.batch_size == 3 and cfg.epochs == 1 and cfg.model.channels == CHANNELS
