"""Shared fixtures: the real nuScenes keyframes beside the project (skipped when absent)."""

from pathlib import Path

import pytest

REAL_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nuscenes-real-0916"


@pytest.fixture(scope="session")
def real_root() -> Path:
    """../shared/data/nuscenes-real-0916, or skip the test when it is not there."""
    if not (REAL_ROOT / "v1.0-mini" / "sample_data.json").is_file():
        pytest.skip(f"real nuScenes keyframes not found at {REAL_ROOT}")
    return REAL_ROOT


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run tests single-threaded: the CPU kernels (spconv Native, OpenMP) slow down by 10x when
    their threads compete with another process for the 2 cores; tests that check threading set
    the count themselves."""
    try:
        import torch
    except ImportError:  # storage-only environments
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
