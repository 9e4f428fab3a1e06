"""Multi-process training with torch DDP: the torchrun environment and the process group.

`train` runs on one process unless it finds a torchrun environment (RANK, WORLD_SIZE and
LOCAL_RANK with WORLD_SIZE > 1). Then every process joins a process group (gloo on CPU, nccl on
CUDA with rank r pinned to cuda:LOCAL_RANK), the model is wrapped in DistributedDataParallel and
the scans are sharded over the ranks (`clip2scene.train.data.EpochSampler`).

    torchrun --nproc-per-node 2 -m clip2scene.cli train --cache cache.zarr --out runs/ddp

    env = detect_env()                       # DistEnv(rank=0, world_size=1, local_rank=0) without torchrun
    with process_group(env, torch.device("cpu")) as device:
        ...                                  # collectives work here; the group is destroyed on exit
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clip2scene.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0  # global rank; rank 0 writes the run folder and logs
    world_size: int = 1  # number of processes taking part
    local_rank: int = 0  # rank on this node: the CUDA device index under nccl

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part (DDP, sharded data, collectives)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs (rank 0)."""
        return self.rank == 0


def detect_env(environ: dict | None = None) -> DistEnv:
    """The torchrun environment of this process (RANK, WORLD_SIZE, LOCAL_RANK); a single-process
    DistEnv when WORLD_SIZE is unset. ConfigError if the variables are malformed."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return DistEnv()
    try:
        world_size = int(environ["WORLD_SIZE"])
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError(f"torchrun environment: RANK/WORLD_SIZE/LOCAL_RANK must be integers "
                          f"(got {environ.get('RANK')!r}/{environ.get('WORLD_SIZE')!r}/{environ.get('LOCAL_RANK')!r})") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(f"torchrun environment: RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank} is inconsistent")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank)


def rank_device(env: DistEnv, device: torch.device) -> torch.device:
    """The device this rank trains on: `device` itself for a single process or CPU, else
    cuda:LOCAL_RANK (a --device index is overridden by the rank's own GPU)."""
    if not env.distributed or device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise ConfigError(f"--device {device}: LOCAL_RANK {env.local_rank} needs a GPU but only {count} are visible")
    if device.index is not None and device.index != env.local_rank:
        log.warning("--device %s ignored under torchrun: rank %d uses cuda:%d", device, env.rank, env.local_rank)
    return torch.device("cuda", env.local_rank)


@contextmanager
def process_group(env: DistEnv, device: torch.device):
    """Join the torchrun process group for the duration of the block (no-op for one process);
    yields the rank's device. Uses an existing default group (and leaves it alone) if the caller
    already created one. Ranks other than 0 log only warnings and errors meanwhile."""
    device = rank_device(env, device)
    if not env.distributed:
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"cannot join the torchrun process group ({backend}): {e}".splitlines()[0]) from None
    elif dist.get_world_size() != env.world_size:
        raise ConfigError(f"existing process group has {dist.get_world_size()} ranks, WORLD_SIZE says {env.world_size}")
    package_log = logging.getLogger("clip2scene")
    level = package_log.level
    if not env.is_main:  # only rank 0 logs progress; warnings and errors still show on every rank
        package_log.setLevel(max(logging.WARNING, level))
    try:
        yield device
    finally:
        package_log.setLevel(level)
        if owned:
            dist.destroy_process_group()


def broadcast_buffers(module: torch.nn.Module, env: DistEnv, src: int = 0) -> None:
    """Copy every buffer (BatchNorm running statistics) of `module` from rank `src` to all ranks."""
    if not env.distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=src)


def broadcast_object(obj, env: DistEnv, src: int = 0):
    """Rank `src`'s `obj` (picklable) on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64; the same list on every rank)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
