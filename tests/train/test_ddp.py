"""Multi-process (DDP) training and exact resume of `train` on a tiny synthetic cache (CPU, gloo)."""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from clip2scene.errors import ConfigError
from clip2scene.storage import open_cache
from clip2scene.train.checkpoint import load_checkpoint
from clip2scene.train.data import EpochSampler, ScanDataset, collate
from clip2scene.train.distributed import DistEnv, detect_env
from clip2scene.train.loop import LoopConfig, Stepper, build_optimizer, final_batchnorm
from clip2scene.train.nets import build_model
from clip2scene.train.trainer import Distillation, TrainConfig, _switch, train
from tests.helpers import TINY, write_cache

CPU = torch.device("cpu")
REPO = Path(__file__).absolute().parents[2]  # so the ranks import this checkout

# The script every torchrun rank runs: train, then record what this rank returned.
RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from clip2scene.train.nets import ModelConfig
    from clip2scene.train.trainer import TrainConfig, train
    fields = json.loads(sys.argv[1])
    fields["model"] = ModelConfig(**fields["model"])
    summary = train(TrainConfig(**fields), progress=False)
    summary["group_left"] = not dist.is_initialized()
    with open(os.path.join(sys.argv[2], "summary%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(summary, f)
""")


@pytest.fixture(scope="module")
def cache4(tmp_path_factory):
    """Four training scans: a global batch of 2 splits into 1 + 1 with no padding."""
    return write_cache(tmp_path_factory.mktemp("c4") / "c.zarr", splits=("train",) * 4 + ("val",))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diffs = [0.0]
    for k in a:
        if a[k].is_floating_point():
            diffs.append(float((a[k] - b[k]).abs().max()))
        else:
            assert torch.equal(a[k], b[k]), k
    return max(diffs)


def emulate_ddp(config: TrainConfig, world_size: int) -> dict:
    """One process doing what `world_size` DDP ranks of `train` do; returns the final state_dict.

    Each step runs the ranks' sub-batches (EpochSampler shards) one after the other through the
    trainer's own step (`Stepper` with the `Distillation` task), each voxelised and
    BatchNorm-normalised on its own as on its rank, backpropagates loss_r / N (DDP's gradient
    average), keeps rank 0's BatchNorm running statistics (DDP broadcasts rank 0's buffers before
    every forward), then takes the one optimiser update. Precise BN as rank 0 does it: over the
    global batches of the last epoch (the loop's `final_batchnorm`).
    """
    cache = open_cache(config.cache)
    config = replace(config, voxel_size=cache.voxel_size,
                     switch_epoch=config.epochs // 2 if config.switch_epoch is None else config.switch_epoch)
    indices = cache.indices(config.split)
    model_config = replace(config.model, out_channels=cache.text_embeddings.shape[1],
                           in_channels=len(cache.point_features))
    torch.manual_seed(config.seed)
    model = build_model(model_config, CPU)
    steps = math.ceil(len(indices) / config.batch_size)
    optimizer, scheduler = build_optimizer(model, config, steps * config.epochs, steps_per_epoch=steps)
    task = Distillation(config, model, model_config, torch.from_numpy(cache.text_embeddings))
    step = Stepper(task, optimizer, scheduler, CPU, config.voxel_size, clip_grad_norm=config.clip_grad_norm)
    dataset = ScanDataset(cache, indices, augment=config.augment, seed=config.seed, features=True)
    local = config.batch_size // world_size
    for epoch in range(config.epochs):
        dataset.set_epoch(epoch)
        task.begin_epoch(epoch)
        shards = []
        for r in range(world_size):
            sampler = EpochSampler(len(dataset), seed=config.seed, rank=r, world_size=world_size)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        for s in range(steps):
            optimizer.zero_grad(set_to_none=True)
            for r in range(world_size):
                loss, _ = step.forward_loss(collate([dataset[i] for i in shards[r][s * local:(s + 1) * local]]), epoch)
                step.backward(loss / world_size)
                if r == 0:
                    rank0_buffers = [b.clone() for b in model.buffers()]
            with torch.no_grad():
                for b, kept in zip(model.buffers(), rank0_buffers):
                    b.copy_(kept)
            step.update()
    final_batchnorm(model, dataset, LoopConfig.of(config), DistEnv(), CPU, config.epochs - 1)
    return model.state_dict()


def test_epoch_sampler_shards_are_the_global_batches():
    for n, batch, world in [(8, 4, 2), (7, 4, 2), (5, 4, 4), (3, 2, 2), (9, 6, 3)]:
        one = EpochSampler(n, seed=3)
        one.set_epoch(5)
        order = list(one)
        assert sorted(order) == list(range(n))
        ranks = []
        for r in range(world):
            s = EpochSampler(n, seed=3, rank=r, world_size=world)
            s.set_epoch(5)
            ranks.append(list(s))
            assert len(ranks[-1]) == len(s) == math.ceil(n / world)
        local = batch // world
        steps = math.ceil(n / batch)
        assert all(math.ceil(len(sh) / local) == steps for sh in ranks)  # every rank: the same step count
        padded = one.order() + one.order()[: math.ceil(n / world) * world - n]
        for s in range(steps):
            step_items = sorted(i for sh in ranks for i in sh[s * local:(s + 1) * local])
            assert step_items == sorted(padded[s * batch:(s + 1) * batch])
            if (s + 1) * batch <= n:  # full global batches are exactly one process's
                assert step_items == sorted(order[s * batch:(s + 1) * batch])
    a, b = EpochSampler(10, seed=0), EpochSampler(10, seed=0)
    a.set_epoch(1)
    b.set_epoch(2)
    assert list(a) != list(b)


def test_torchrun_environment_and_global_batch_check(cache4, tmp_path, monkeypatch):
    assert detect_env({}) == DistEnv()
    assert detect_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == DistEnv(1, 2, 1)
    with pytest.raises(ConfigError, match="inconsistent"):
        detect_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="must be integers"):
        detect_env({"RANK": "x", "WORLD_SIZE": "2"})
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="--batch-size 3 is the global batch: it must be a multiple of the 2"):
        train(TrainConfig(cache=str(cache4), out=str(tmp_path / "r"), batch_size=3, model=TINY), progress=False)


def test_s3_point_draws_are_keyed_per_scan(cache4):
    """The "point" switch of a scan is the same whether it is batched with others or alone
    (so it does not depend on how DDP splits the global batch)."""
    cache = open_cache(cache4)
    ds = ScanDataset(cache, cache.indices("train"))
    cfg = TrainConfig(cache="-", out="-", self_training="point", switch_prob=0.5, seed=4)
    items = [ds[0], ds[1], ds[2]]

    def switched(group):
        batch = collate(group)
        predicted = (batch["target"] + 1) % 3
        return _switch(cfg, batch["target"], predicted, batch, 2, torch.Generator().manual_seed(0))

    together = switched(items)
    assert torch.equal(together, torch.cat([switched([it]) for it in items]))
    target = torch.cat([it["target"] for it in items])
    labelled = target >= 0
    assert 0.4 < float((together != target)[labelled].float().mean()) < 0.6  # prob 0.5 per labelled point
    assert torch.equal(together[~labelled], target[~labelled])


@pytest.mark.slow
def test_two_process_ddp_matches_emulated_ranks(cache4, tmp_path):
    """`torchrun --nproc-per-node 2` (gloo, CPU) against one process that emulates the two ranks.

    Why not a plain one-process run with the same global batch: it is not the same computation.
    Under DDP each rank voxelises, normalises (BatchNorm: SyncBatchNorm needs a GPU) and averages
    its loss over its own half batch, and DDP averages the two gradients; one process with the
    full batch normalises over both scans, takes one mean over all points and shifts both scans
    by one grid origin. So the reference (`emulate_ddp`, checked first against the real
    one-process `train`) runs the same per-rank sub-batches, in the same order, with the same
    augmentation, averages their gradients and keeps rank 0's BatchNorm buffers; the final
    weights and buffers must agree to float rounding (measured on CPU/gloo: bitwise equal).
    """
    base = dict(cache=str(cache4), epochs=2, batch_size=2, lr=0.05, model=TINY, augment=True,
                self_training="off", precise_bn_batches=2, seed=1)
    # the reference reproduces the trainer for one process
    train(TrainConfig(out=str(tmp_path / "one"), **base), progress=False)
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["state_dict"]
    assert max_diff(one, emulate_ddp(TrainConfig(out="-", **base), 1)) < 1e-6

    fields = dict(base, out=str(tmp_path / "ddp"), model=asdict(TINY))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(tmp_path / "rank.py"), json.dumps(fields), str(tmp_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    s0, s1 = (json.loads((tmp_path / f"summary{r}.json").read_text()) for r in (0, 1))
    assert s0 == s1 and s0["processes"] == 2 and s0["steps"] == 4 and s0["group_left"]
    names = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) == 1  # TensorBoard: rank 0 only
    assert [n for n in names if n not in events] == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 4  # rank 0 only
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["state_dict"]
    diff = max_diff(ddp, emulate_ddp(TrainConfig(out="-", **base), 2))
    print(f"DDP vs emulated ranks: max abs diff {diff:.3g}, torchrun {seconds:.1f} s")
    assert diff < 1e-5
    assert max_diff(ddp, one) > 1e-3  # the comparison can tell the two computations apart


@pytest.mark.slow
@pytest.mark.parametrize("self_training", ["point", "batch"])
def test_resume_is_exact(cache4, tmp_path, self_training):
    """Interrupted after epoch 1 and resumed = uninterrupted: weights, BatchNorm statistics (incl.
    precise BN at the end), SGD momentum and LR schedule, with augmentation and S3 switching on."""
    base = dict(cache=str(cache4), epochs=3, batch_size=3, lr=0.05, model=TINY, augment=True,
                self_training=self_training, switch_epoch=1, precise_bn_batches=2, seed=3)
    full = train(TrainConfig(out=str(tmp_path / "full"), keep_checkpoints=True, **base), progress=False)
    assert {p.name for p in (tmp_path / "full").glob("checkpoint_epoch*.pt")} == {
        "checkpoint_epoch1.pt", "checkpoint_epoch2.pt", "checkpoint_epoch3.pt"}
    resumed = train(TrainConfig(out=str(tmp_path / "resumed"), resume=str(tmp_path / "full" / "checkpoint_epoch1.pt"),
                                **base), progress=False)
    assert resumed["steps"] == full["steps"] == 6 and resumed["epoch_losses"] == full["epoch_losses"][1:]
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert a["scheduler"] == b["scheduler"]
    ma, mb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]) for i in ma)
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("switched", 0) > 0 for m in metrics)  # S3 really switched targets after the resume point
