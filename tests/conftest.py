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
