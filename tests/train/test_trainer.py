"""Training and evaluation from a cache built through the storage API (no teacher involved)."""

import json

import pytest
import torch

from clip2scene.errors import CacheError, ConfigError
from clip2scene.train.checkpoint import load_checkpoint
from clip2scene.train.evaluate import EvalConfig, evaluate
from clip2scene.train.trainer import TrainConfig, train
from tests.helpers import C, D, TINY, write_cache


@pytest.fixture(scope="module")
def cache(value_cache):
    return value_cache


def test_train_learns_and_evaluates(cache, tmp_path):
    cfg = TrainConfig(cache=str(cache), out=str(tmp_path / "run"), epochs=12, batch_size=2, lr=0.05, model=TINY)
    summary = train(cfg, progress=False)
    assert summary["steps"] == 24 and summary["parameters"] > 0
    assert summary["epoch_losses"][-1] < 0.8 * summary["epoch_losses"][0]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 24 and {"step", "loss", "lr", "scans_per_s"} <= set(json.loads(lines[0]))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["epoch"] == 12 and ckpt["teacher"]["weights_sha256"] == "random"
    assert ckpt["model_config"]["out_channels"] == D and ckpt["class_names"] == ["road", "car", "tree"]
    result = evaluate(EvalConfig(checkpoint=str(tmp_path / "run" / "checkpoint.pt"), cache=str(cache)), progress=False)
    assert result["scans"] == 1 and result["points"] == 3000
    assert result["teacher_miou_visible"] == pytest.approx(1.0)
    assert result["miou"] > 0.6, result["per_class_iou"]
    saved = json.loads((tmp_path / "run" / "eval_val.json").read_text())
    assert saved["miou"] == pytest.approx(result["miou"]) and len(saved["confusion_matrix"]) == C + 1


def test_resume_continues_and_refuses_other_teacher(cache, tmp_path):
    base = dict(cache=str(cache), batch_size=2, lr=0.05, model=TINY)
    train(TrainConfig(out=str(tmp_path / "a"), epochs=1, **base), progress=False)
    s = train(TrainConfig(out=str(tmp_path / "b"), epochs=2, resume=str(tmp_path / "a" / "checkpoint.pt"), **base),
              progress=False)
    assert s["steps"] == 4 and len(s["epoch_losses"]) == 1
    other = write_cache(tmp_path / "other.zarr", sha="ab" * 32)
    with pytest.raises(CacheError, match="'weights_sha256' differs"):
        train(TrainConfig(out=str(tmp_path / "c"), epochs=2, resume=str(tmp_path / "a" / "checkpoint.pt"),
                          **{**base, "cache": str(other)}), progress=False)
    with pytest.raises(CacheError, match="'weights_sha256' differs"):
        evaluate(EvalConfig(checkpoint=str(tmp_path / "a" / "checkpoint.pt"), cache=str(other)), progress=False)


def test_bad_training_input(cache, tmp_path):
    with pytest.raises(ConfigError, match="no scans in split 'test'"):
        train(TrainConfig(cache=str(cache), out=str(tmp_path / "r"), split="test", model=TINY), progress=False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("machine has CUDA")
        train(TrainConfig(cache=str(cache), out=str(tmp_path / "r"), device="cuda", model=TINY), progress=False)
    with pytest.raises(ConfigError, match="checkpoint not found"):
        evaluate(EvalConfig(checkpoint=str(tmp_path / "none.pt"), cache=str(cache)), progress=False)
    with pytest.raises(CacheError, match="cache not found"):
        train(TrainConfig(cache=str(tmp_path / "missing.zarr"), out=str(tmp_path / "r"), model=TINY), progress=False)


@pytest.mark.slow
def test_loader_workers_are_spawned_and_read_the_cache(cache, tmp_path):
    """workers > 0 uses spawned processes that reopen the Zarr cache themselves."""
    base = dict(cache=str(cache), batch_size=2, lr=0.05, model=TINY, epochs=1, augment=False, precise_bn_batches=0)
    a = train(TrainConfig(out=str(tmp_path / "w0"), **base), progress=False)
    b = train(TrainConfig(out=str(tmp_path / "w1"), workers=1, **base), progress=False)
    assert a["epoch_losses"] == pytest.approx(b["epoch_losses"], rel=1e-5)


@pytest.mark.slow
def test_persistent_workers_give_the_same_run(cache, tmp_path):
    """Two spawned, persistent, prefetching loader workers: the same weights as loading in-process
    (augmentation follows the epoch through the sampler, not the workers' dataset copies)."""
    base = dict(cache=str(cache), epochs=2, batch_size=2, lr=0.05, model=TINY, augment=True, precise_bn_batches=0)
    train(TrainConfig(out=str(tmp_path / "w0"), workers=0, **base), progress=False)
    train(TrainConfig(out=str(tmp_path / "w2"), workers=2, **base), progress=False)
    a = load_checkpoint(tmp_path / "w0" / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "w2" / "checkpoint.pt")["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
