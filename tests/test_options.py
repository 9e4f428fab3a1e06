"""clip2scene/options.py: CLI options made from the config dataclasses' fields, --config files
(TOML, a run's config.json, presets), and the presets in clip2scene/configs/.

The hostile --config rows are in the hostile tables (tests/test_hostile_cli.py for precompute,
tests/train/test_hostile_cli.py for train / finetune / linear-probe)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

import pytest
from typer.testing import CliRunner

from clip2scene import cli
from clip2scene.errors import ConfigError
from clip2scene.options import PRESETS, make_config, options_for, presets, read_config
from clip2scene.precompute.pipeline import PrecomputeConfig
from clip2scene.precompute.teacher.config import TeacherConfig
from clip2scene.train import finetune as finetune_module
from clip2scene.train import trainer as trainer_module
from clip2scene.train.evaluate import EvalConfig
from clip2scene.train.finetune import FinetuneConfig
from clip2scene.train.nets import ModelConfig
from clip2scene.train.trainer import TrainConfig, _train_config_dict

runner = CliRunner()

# The flags users know (the CLI before the options were generated): they must not change.
TRAIN_FLAGS = ("--cache --out --split --epochs --batch-size --lr --tau --voxel-size --augment --device --workers --seed "
               "--resume --precise-bn-batches --keep-checkpoints --storage-option --sweeps --scr-weight --ssr-weight "
               "--kl-weight --ssr-lambda --ssr-grid --self-training --switch-epoch --switch-prob --arch --channels "
               "--views --overwrite --warmup-steps --clip-grad-norm --lr-scaling --reference-batch "
               "--divergence-factor --divergence-window --stop-on-divergence --val-every --val-split --max-steps "
               "--wandb --limit").split()
FINETUNE_FLAGS = ("--cache --out --checkpoint --label-fraction --eval-split --epochs --batch-size --lr --head-lr-mult "
                  "--lovasz-weight --voxel-size --augment --device --workers --seed --arch --channels --storage-option "
                  "--overwrite --head-input --warmup-steps --clip-grad-norm --lr-scaling --reference-batch "
                  "--divergence-factor --divergence-window --stop-on-divergence --val-every --val-split --max-steps "
                  "--wandb --limit").split()
PRECOMPUTE_FLAGS = ("--dataroot --out --dataset --version --split --sweeps --class-set --clip-model --clip-weights "
                    "--image-size --key-smoothing --prompt-denoising --denoise-threshold --teacher --window --stride "
                    "--pamr --device --overwrite --limit --block-size --storage-option --workers --scheduler "
                    "--on-error --feature-dtype --teacher-precision").split()
EVAL_FLAGS = "--checkpoint --cache --split --out --device --storage-option --limit".split()
CONFIGS = (TrainConfig, ModelConfig, FinetuneConfig, EvalConfig, PrecomputeConfig, TeacherConfig)


def flags(cls, **kw) -> list[str]:
    return [o.flag for o in options_for(cls, **kw)]


def test_generated_flags_are_the_known_ones():
    assert sorted(flags(TrainConfig)) == sorted(TRAIN_FLAGS)
    assert sorted(flags(FinetuneConfig)) == sorted(FINETUNE_FLAGS)
    assert sorted(flags(FinetuneConfig, exclude=("voxel_size", "model", "augment"))) == sorted(
        set(FINETUNE_FLAGS) - {"--voxel-size", "--arch", "--channels", "--augment"})
    assert sorted(flags(PrecomputeConfig)) == sorted(PRECOMPUTE_FLAGS)
    assert sorted(flags(EvalConfig)) == sorted(EVAL_FLAGS)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_declared_with_opt(cls):
    """One source: each field carries its help text (and whether it is a flag) in its metadata,
    so a field added without `opt()` cannot silently miss its option."""
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text: declare it with opt()"


def test_option_defaults_are_the_field_defaults():
    by_flag = {o.flag: o for o in options_for(TrainConfig)}
    assert by_flag["--lr"].default == 0.1 and by_flag["--epochs"].default == 20
    assert by_flag["--arch"].default == "spvcnn"  # TrainConfig's model, not ModelConfig's own default
    assert by_flag["--channels"].default == "32,32,64,128,256,256,128,96,96"
    assert by_flag["--augment"].kind == "bool" and by_flag["--augment"].default is True
    ft = {o.flag: o for o in options_for(FinetuneConfig)}
    assert ft["--lr"].default == 0.02 and ft["--reference-batch"].default == 8 and ft["--eval-split"].default == "val"
    assert ft["--eval-split"].value("none") is None and ft["--checkpoint"].value("none") is None
    pre = {o.flag: o for o in options_for(PrecomputeConfig, defaults={"image_size": None})}
    assert pre["--clip-model"].path == ("teacher", "model") and pre["--image-size"].default is None
    assert pre["--window"].value("448") == (448, 448) and pre["--image-size"].value("224x416") == (224, 416)


def test_help_is_plain_and_lists_the_config_option():
    r = runner.invoke(cli.app, ["train", "--help"])
    assert r.exit_code == 0 and "--config" in r.output and "--storage-option" in r.output
    assert "<bool>" not in r.output and "\x1b[" not in r.output


# ------------------------------------------------------------------------------ presets
def test_presets_build_valid_configs(tmp_path, monkeypatch):
    assert {"demo", "annotation-free", "finetune-1pct", "linear-probe"} <= set(presets())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # what `make demo` leaves in the repo root: a folder does not hide the preset
    for name in ("demo", "annotation-free"):
        _, tree = read_config(name, TrainConfig)
        cfg = make_config(TrainConfig, dict(tree, cache="c.zarr", out="run"))
        assert cfg.model.arch == "spvcnn"
    _, tree = read_config("annotation-free", TrainConfig)
    paper = make_config(TrainConfig, dict(tree, cache="c.zarr", out="run"))
    assert paper == TrainConfig(cache="c.zarr", out="run")  # the paper's recipe is the default
    _, tree = read_config("finetune-1pct", FinetuneConfig)
    ft = make_config(FinetuneConfig, dict(tree, cache="c.zarr", out="run", checkpoint="pre.pt"))
    assert (ft.mode, ft.label_fraction, ft.epochs, ft.lr, ft.head_lr_mult, ft.batch_size) == (
        "finetune", 0.01, 24, 0.02, 100.0, 8)
    _, tree = read_config("linear-probe", FinetuneConfig)
    probe = make_config(FinetuneConfig, dict(tree, cache="c.zarr", out="run", checkpoint="pre.pt"))
    assert probe.mode == "linear" and probe.label_fraction == 1.0


def test_demo_trains_with_its_preset():
    cfg = cli.demo_train_config("c.zarr", "run")
    _, tree = read_config(str(PRESETS / "demo.toml"), TrainConfig)
    assert cfg == make_config(TrainConfig, dict(tree, cache="c.zarr", out="run"))
    assert cfg.model == ModelConfig(arch="spvcnn", channels=(16, 16, 32, 32, 64, 64, 32, 16, 16), blocks_per_stage=1)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.tau, cfg.precise_bn_batches) == (80, 2, 0.1, 0.1, 4)
    assert (cli.DEMO_EPOCHS, cli.DEMO_BATCH, cli.DEMO_LR, cli.DEMO_TAU) == (80, 2, 0.1, 0.1)
    assert cli.demo_train_config("c.zarr", "run", epochs=3).epochs == 3


# ------------------------------------------------------------------------------ --config through the CLI
@pytest.fixture
def captured(monkeypatch):
    """The config a train / finetune command would run with (the run itself is replaced)."""
    seen = {}

    def fake(config, *a, **k):
        seen["config"] = config
        raise KeyboardInterrupt  # stop right there: exit 130

    monkeypatch.setattr(trainer_module, "train", fake)
    monkeypatch.setattr(finetune_module, "finetune", fake)
    return seen


def test_config_file_then_command_line(tmp_path, captured):
    f = tmp_path / "exp.toml"
    f.write_text('cache = "c.zarr"\nout = "runs/a"\nepochs = 3\nlr = 0.05\naugment = false\n'
                 '[model]\nchannels = "8,8,16,16,32,32,16,8,8"\nblocks_per_stage = 1\n')
    r = runner.invoke(cli.app, ["train", "--config", str(f), "--lr", "0.07", "--out", "runs/b"])
    assert r.exit_code == 130, r.output
    cfg = captured["config"]
    assert (cfg.cache, cfg.out, cfg.epochs, cfg.lr, cfg.augment) == ("c.zarr", "runs/b", 3, 0.07, False)
    assert cfg.model == ModelConfig(arch="spvcnn", channels=(8, 8, 16, 16, 32, 32, 16, 8, 8), blocks_per_stage=1)


def test_run_config_json_round_trips(tmp_path, captured):
    """The config.json a train / finetune run writes, given back as --config, is the same config
    (its run records, e.g. the resolved schedule, are skipped)."""
    cfg = TrainConfig(cache="c.zarr", out=str(tmp_path / "a"), epochs=7, lr=0.03, voxel_size=0.2, switch_epoch=2,
                      clip_grad_norm=5.0, storage_options={"anon": True},
                      model=ModelConfig(arch="minkunet", channels=(8,) * 9))
    (tmp_path / "config.json").write_text(json.dumps(dict(_train_config_dict(cfg), schedule={"warmup_steps": 3})))
    r = runner.invoke(cli.app, ["train", "--config", str(tmp_path / "config.json")])
    assert r.exit_code == 130, r.output
    assert captured["config"] == cfg
    ft = FinetuneConfig(cache="c.zarr", out="ft", checkpoint="pre.pt", label_fraction=0.1, eval_split=None)
    d = asdict(ft)
    d["model"]["channels"] = list(d["model"]["channels"])
    (tmp_path / "ft.json").write_text(json.dumps(dict(d, schedule={})))
    r = runner.invoke(cli.app, ["finetune", "--config", str(tmp_path / "ft.json")])
    assert r.exit_code == 130, r.output
    assert captured["config"] == ft


def test_ablate_takes_the_base_options_from_a_config(tmp_path, monkeypatch):
    from clip2scene.train import ablate

    seen = {}

    def fake(base, *a, **k):
        seen["base"] = base
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate, "run_ablation", fake)
    f = tmp_path / "a.toml"
    f.write_text('cache = "elsewhere.zarr"\nresume = "x.pt"\nepochs = 2\n[model]\narch = "minkunet"\n')
    r = runner.invoke(cli.app, ["ablate", "--config", str(f), "--cache", "c.zarr", "--out", str(tmp_path / "ab"),
                                "--lr", "0.2"])
    assert r.exit_code == 130, r.output
    base = seen["base"]
    assert (base.cache, base.out, base.resume, base.epochs, base.lr, base.model.arch) == (
        "c.zarr", str(tmp_path / "ab" / "base"), None, 2, 0.2, "minkunet")


def test_precompute_config_file(tmp_path, monkeypatch):
    from clip2scene.precompute import pipeline

    seen = {}

    def fake(config, *a, **k):
        seen["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_precompute", fake)
    f = tmp_path / "pre.toml"
    f.write_text('dataroot = "data"\nout = "c.zarr"\ndataset = "semantickitti"\nsweeps = 1\n'
                 '[teacher]\nmodel = "clip2scene-tiny"\nweights = "none"\nwindow = "32"\n'
                 '[simulated]\nnoise = 0.01\n')
    r = runner.invoke(cli.app, ["precompute", "--config", str(f), "--sweeps", "2"])
    assert r.exit_code == 130, r.output
    cfg = seen["config"]
    assert (cfg.dataset, cfg.sweeps, cfg.class_set, cfg.version) == ("semantickitti", 2, "semantickitti", "semantickitti")
    assert cfg.teacher.model == "clip2scene-tiny" and cfg.teacher.window == (32, 32)
    assert cfg.simulated.noise == 0.01
    f.write_text('dataroot = "data"\nout = "c.zarr"\n[teacher]\nmodel = "none"\n')
    r = runner.invoke(cli.app, ["precompute", "--config", str(f)])
    assert r.exit_code == 130 and seen["config"].teacher is None, r.output


def test_read_config_refuses_with_one_line(tmp_path):
    f = tmp_path / "x.toml"
    for text, fragment in [("lr = = 1", "not valid TOML"), ("lrr = 0.1", "unknown key 'lrr'"),
                           ('epochs = "ten"', 'epochs = "ten": expected an integer'),
                           ("[model]\nwidth = 2", "unknown key 'model.width'"),
                           ("model = 3", "model = 3: expected a table"),
                           ("augment = 1", "augment = 1: expected true or false"),
                           ('[model]\nchannels = "a,b"', "channels 'a,b'")]:
        f.write_text(text)
        with pytest.raises(ConfigError) as e:
            read_config(str(f), TrainConfig)
        assert str(f) in str(e.value) and fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_top_level_help_imports_no_torch():
    """The options come from the config dataclasses (torch, spconv), so they are made only when a
    command is looked up: `clip2scene --help` and `--version` stay instant."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from typer.testing import CliRunner; from clip2scene.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0 and 'train' in r.output, r.output; "
            "print(sorted(m for m in ('torch', 'spconv', 'zarr') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
