"""Precompute on a real Dask cluster: a `distributed` scheduler and two worker processes on
loopback run the blocks; the cache equals a single-process run file by file (sha256)."""

import json

import pytest

from clip2scene.precompute.teacher.config import TeacherConfig
from clip2scene.precompute.pipeline import PrecomputeConfig, run_precompute
from clip2scene.storage.tools import verify

TINY = TeacherConfig(model="clip2scene-tiny", weights="none", image_size=(64, 112))


def _files(path):
    return {k: v for k, v in json.loads((path / "manifest.json").read_text())["sha256"].items() if k != "zarr.json"}


@pytest.mark.slow
def test_dask_cluster_precompute_equals_single_process(tmp_path):
    distributed = pytest.importorskip("distributed")
    from clip2scene.samples.nuscenes import SampleConfig, make_sample

    root = make_sample(tmp_path / "root", SampleConfig(scenes=2, keyframes=3, sweeps=1, image_width=160, image_height=90))
    base = dict(dataroot=root, version="v1.0-mini", sweeps=2, teacher=TINY, block_size=2)
    run_precompute(PrecomputeConfig(out=tmp_path / "single.zarr", **base), progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        meta = run_precompute(PrecomputeConfig(out=tmp_path / "dask.zarr", scheduler=cluster.scheduler_address, **base),
                              progress=False)
        with distributed.Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
    assert meta["num_scans"] == 6 and meta["num_blocks"] == 3
    assert _files(tmp_path / "dask.zarr") == _files(tmp_path / "single.zarr")
    assert verify(str(tmp_path / "dask.zarr")) == []
