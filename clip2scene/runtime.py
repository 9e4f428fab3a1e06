"""Process-level tuning shared by both stages: keep glibc from handing big tensors back to the OS.

PyTorch's CPU tensors come from `malloc`. glibc serves every block above its mmap threshold
(128 KiB to 32 MiB) with a fresh `mmap` and returns it with `munmap` on free, so a training step
that makes and drops (N, 512) float32 tensors (tens of MB each) page-faults through every one of
them again on every step: on the 2-core CI machine that was a third of the CPU training step
(docs/benchmarks.md, "allocator"). PyTorch's tuning guide suggests swapping in jemalloc or
tcmalloc with LD_PRELOAD; this does the same job in-process, with no system package, by telling
glibc to serve everything from its heap (M_MMAP_MAX = 0) and to keep up to 1 GiB of freed memory
at the top of it (M_TRIM_THRESHOLD). The cost is a higher resident set (measured +15 % on the
benchmark step) because freed memory is reused instead of returned.

    from clip2scene.runtime import tune_malloc
    tune_malloc()          # the CLI does this at start-up; loader and Dask workers do it too

Set CLIP2SCENE_MALLOC=default to leave glibc's behaviour alone. Not glibc (macOS, musl): no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# glibc <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

TRIM_THRESHOLD = 1 << 30  # bytes of free memory kept at the heap top before it is returned
TOP_PAD = 64 << 20  # extra bytes asked of the OS at each heap growth

_done: bool | None = None


def tune_malloc() -> bool:
    """Apply the glibc settings above once per process. Returns True if they are in effect.

    Idempotent and cheap; safe to call from any process (CLI, DataLoader worker, Dask worker).
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("CLIP2SCENE_MALLOC", "").lower() == "default":
        log.debug("CLIP2SCENE_MALLOC=default: glibc malloc settings left alone")
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = (libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
              and libc.mallopt(M_TOP_PAD, TOP_PAD) == 1)
    except (OSError, AttributeError):
        return False
    _done = ok
    log.debug("glibc malloc tuned (mmap off, trim threshold %d B): %s", TRIM_THRESHOLD, ok)
    return ok


def worker_init(_worker_id: int = 0) -> None:
    """`worker_init_fn` for DataLoader workers (spawned processes start with glibc defaults)."""
    tune_malloc()
