"""The nuScenes sweep path on real-format sweeps at trainval density (synthetic_scale tables):
10 lidar frames per keyframe (the keyframe + 9 previous 20 Hz sweeps through `prev`), fewer at
scene starts, each sweep moved into the keyframe lidar frame through the ego pose at its own
timestamp. The expected points are computed here from the JSON tables and files directly."""

import json
import pickle

import numpy as np
import pytest

from clip2scene.precompute.datasets.nuscenes import LIDAR, NuScenes, merged_points
from clip2scene.precompute.pipeline import block_payload
from clip2scene.samples.scale import NuScenesScale, make_nuscenes_tables

K = 10  # --sweeps 10: keyframe + 9 previous sweeps


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    make_nuscenes_tables(out, NuScenesScale(scenes=3, samples=7, sample_data=None, files=2, points=64,
                                            image_size=(32, 18), seed=3))
    return out


def _rot(q):  # (w, x, y, z) unit quaternion -> (3, 3) float64
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _tables(root):
    t = {n: json.loads((root / "v1.0-trainval" / f"{n}.json").read_text())
         for n in ("sample_data", "ego_pose", "calibrated_sensor", "sensor", "sample")}
    return {n: {r["token"]: r for r in recs} for n, recs in t.items()}


def _expected(root, t, sample_token):
    """Merged xyz (n, 3) float64 and sweep ids from the tables: walk LIDAR_TOP prev, transform
    sensor -> ego(t_sweep) -> global -> ego(t_key) -> sensor."""
    lidar_cs = {tok for tok, cs in t["calibrated_sensor"].items() if t["sensor"][cs["sensor_token"]]["channel"] == LIDAR}
    key = next(sd for sd in t["sample_data"].values()
               if sd["sample_token"] == sample_token and sd["is_key_frame"] and sd["calibrated_sensor_token"] in lidar_cs)

    def to_global(sd):
        cs, ep = t["calibrated_sensor"][sd["calibrated_sensor_token"]], t["ego_pose"][sd["ego_pose_token"]]
        m1, m2 = np.eye(4), np.eye(4)
        m1[:3, :3], m1[:3, 3] = _rot(cs["rotation"]), cs["translation"]
        m2[:3, :3], m2[:3, 3] = _rot(ep["rotation"]), ep["translation"]
        return m2 @ m1

    inv_key = np.linalg.inv(to_global(key))
    frames, sd = [key], key
    while sd["prev"] and len(frames) < K:
        sd = t["sample_data"][sd["prev"]]
        frames.append(sd)
    xyz, ids = [], []
    for j, sd in enumerate(frames):
        pts = np.fromfile(root / sd["filename"], np.float32).reshape(-1, 5)[:, :3].astype(np.float64)
        m = inv_key @ to_global(sd)
        xyz.append(pts @ m[:3, :3].T + m[:3, 3])
        ids.append(np.full(len(pts), j))
    return np.concatenate(xyz), np.concatenate(ids), frames


def test_sweeps_follow_prev_with_ego_pose_at_sweep_time(root):
    ds = NuScenes(root, "v1.0-trainval")
    t = _tables(root)
    scans = ds.scans(sweeps=K)
    assert len(scans) == 7
    counts = []
    for scan in scans:
        kf = scan.native
        want, want_ids, frames = _expected(root, t, scan.token)
        assert [s.token for s in kf.sweeps] == [f["token"] for f in frames[1:]]
        # ego poses at sweep time differ from the keyframe's (the car moves ~0.4 m per sweep)
        assert all(np.abs(s.ego.translation - kf.lidar.ego.translation).max() > 0.1 for s in kf.sweeps)
        xyzi, sweep, n_key = merged_points(kf)
        assert n_key == 64 and np.array_equal(sweep, want_ids)
        # float32 storage of points in 100 m-scale global coordinates: ~1e-5 relative
        np.testing.assert_allclose(xyzi[:, :3], want, atol=2e-3)
        counts.append(len(kf.sweeps))
    # 9 previous sweeps wherever the chain is long enough; fewer at each scene start
    firsts = [i for i, s in enumerate(scans) if i == 0 or scans[i - 1].scene != s.scene]
    assert all(counts[i] == K - 1 for i in range(len(scans)) if i not in firsts)
    assert any(counts[i] < K - 1 for i in firsts)


def test_block_payload_is_self_contained(root):
    """A Dask task's payload: only the block's records, and the same points as the full reader."""
    ds = NuScenes(root, "v1.0-trainval")
    scans = ds.scans(sweeps=K)
    sub, part = pickle.loads(pickle.dumps(block_payload(ds, scans[2:5])))
    assert len(sub._by_token["sample_data"]) < len(ds._by_token["sample_data"])
    for a, b in zip(scans[2:5], part):
        x1, s1, n1 = merged_points(a.native)
        x2, s2, n2 = merged_points(b.native)
        assert n1 == n2 and np.array_equal(x1, x2) and np.array_equal(s1, s2)
        assert sub.load_labels(b.native, n2).tolist() == ds.load_labels(a.native, n1).tolist()
        assert [c.token for c in b.native.cameras] == [c.token for c in a.native.cameras]


def test_streamed_tables_match_json_load(root, tmp_path):
    """iter_table reads records across buffer boundaries exactly as json.load does."""
    from clip2scene.precompute.datasets import nuscenes

    path = root / "v1.0-trainval" / "sample_data.json"
    old = nuscenes._CHUNK
    nuscenes._CHUNK = 97  # records straddle every buffer boundary
    try:
        assert list(nuscenes.iter_table(path)) == json.loads(path.read_text())
    finally:
        nuscenes._CHUNK = old


def test_kitti_block_payload_holds_only_its_sequences(tmp_path):
    from clip2scene.precompute.datasets.semantickitti import SemanticKITTI
    from clip2scene.samples.semantickitti import KittiSampleConfig, make_semantickitti_sample

    root = make_semantickitti_sample(tmp_path / "kitti", KittiSampleConfig(frames=3, lidar_beams=8,
                                                                           lidar_azimuth_steps=64))
    ds = SemanticKITTI(root)
    scans = ds.scans(sweeps=3)
    part = [s for s in scans if s.scene == "08"]
    sub, got = pickle.loads(pickle.dumps(block_payload(ds, part)))
    assert set(sub._poses) == {"08"} and set(ds._poses) == {"00", "08"}
    for a, b in zip(part, got):
        pa, pb = ds.points(a), sub.points(b)
        assert all(np.array_equal(x, y) for x, y in zip(pa[:3], pb[:3])) and pa[3] == pb[3]
        assert np.array_equal(ds.labels(a, pa[3]), sub.labels(b, pb[3]))
