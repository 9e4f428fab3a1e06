"""Shared fixtures: the real nuScenes keyframes beside the project (skipped when absent), and the
synthetic data built once per session (helpers and configs: tests/helpers.py).

Session data is read-only: a test that damages files copies them first (`shutil.copytree`)."""

from pathlib import Path

import pytest

from tests import helpers

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


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """Synthetic nuScenes sample `helpers.SAMPLE`: 2 scenes x 2 keyframes (mini_train, mini_val),
    2 sweeps before each, 400x225 cameras."""
    from clip2scene.samples.nuscenes import make_sample

    return make_sample(tmp_path_factory.mktemp("sample") / "root", helpers.SAMPLE)


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory) -> Path:
    """Synthetic nuScenes sample `helpers.SMALL_SAMPLE`: 2 scenes x 2 keyframes, 1 sweep, 160x90 cameras."""
    from clip2scene.samples.nuscenes import make_sample

    return make_sample(tmp_path_factory.mktemp("small_sample") / "root", helpers.SMALL_SAMPLE)


@pytest.fixture(scope="session")
def small_cache(small_sample, tmp_path_factory) -> Path:
    """Precomputed cache of `small_sample`: tiny random-weight MaskCLIP (float32), labels, 2 lidar
    frames per scan, one scan per block."""
    from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute

    out = tmp_path_factory.mktemp("small_cache") / "cache.zarr"
    run_precompute(PrecomputeConfig(dataroot=small_sample, out=out, version="v1.0-mini", sweeps=2,
                                    teacher=helpers.TINY_TEACHER, block_size=1, teacher_precision="float32"),
                   progress=False)
    return out


@pytest.fixture(scope="session")
def value_cache(tmp_path_factory) -> Path:
    """`helpers.write_cache`: 3 train + 1 val scans of 3000 points, 3 classes in x-bands, a
    teacher whose logits are the one-hot labels (built through the storage API, no teacher run)."""
    return helpers.write_cache(tmp_path_factory.mktemp("value_cache") / "c.zarr")
