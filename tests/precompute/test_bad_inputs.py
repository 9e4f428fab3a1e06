"""Bad inputs of a nuScenes dataroot fail per sample with a DataError naming the file / record.

Each test corrupts one thing in a copy of a tiny synthetic sample (1 scene x 2 keyframes) and
checks that the dataset still opens and lists both samples, that the bad sample raises a one-line
DataError naming the token or file and the bad value, and that the other sample still works.
"""

import json
import math
import re
import shutil

import numpy as np
import pytest

from clip2scene.errors import DataError
from clip2scene.precompute.datasets.nuscenes import CAMERAS, NuScenes, load_points
from clip2scene.precompute.pipeline import load_image
from clip2scene.samples.nuscenes import SampleConfig, make_sample

VERSION = "v1.0-mini"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    cfg = SampleConfig(scenes=1, keyframes=2, sweeps=1, image_width=160, image_height=90)
    return make_sample(tmp_path_factory.mktemp("bad") / "root", cfg)


@pytest.fixture
def root(sample, tmp_path):
    return shutil.copytree(sample, tmp_path / "root")


def read(root, table):
    return json.loads((root / VERSION / f"{table}.json").read_text())


def write(root, table, records):
    (root / VERSION / f"{table}.json").write_text(json.dumps(records))  # NaN / Infinity allowed


def key_sd(root, sample_token, channel):
    """The keyframe sample_data record of `channel` in `sample_token` (and the whole table)."""
    sds = read(root, "sample_data")
    sensors = {r["token"]: r["channel"] for r in read(root, "sensor")}
    cs = {r["token"]: sensors[r["sensor_token"]] for r in read(root, "calibrated_sensor")}
    for sd in sds:
        if sd["sample_token"] == sample_token and sd["is_key_frame"] and cs[sd["calibrated_sensor_token"]] == channel:
            return sd, sds
    raise AssertionError(f"no {channel} keyframe in {sample_token}")


def tokens(root):
    return [s.token for s in NuScenes(root, VERSION).scans()]


def assert_works(ds, scan):
    """Everything the pipeline does with a scan, short of running a teacher."""
    ds.check(scan)
    xyz, feat, sweep, n_key = ds.points(scan)
    assert n_key > 0 and len(xyz) >= n_key and np.isfinite(xyz).all()
    assert (len(xyz) > n_key) == bool(scan.native.sweeps)
    assert len(ds.labels(scan, n_key)) == n_key
    views = ds.views(scan)
    assert [v.name for v in views] == list(CAMERAS)
    assert sum(ds.project(scan, c, xyz)[1].sum() for c in range(len(views))) > 0


def assert_fails(root, bad, match, sweeps=1):
    """Opening and listing succeed; the bad sample fails in check/points/views; the other works."""
    ds = NuScenes(root, VERSION)
    scans = ds.scans(sweeps=sweeps)
    assert [s.token for s in scans] == tokens(root) and len(scans) == 2
    by_token = {s.token: s for s in scans}
    for step in (ds.check, ds.points):
        with pytest.raises(DataError, match=match) as e:
            step(by_token[bad])
        assert "\n" not in str(e.value)
    for other in set(by_token) - {bad}:
        assert_works(ds, by_token[other])
    return str(e.value)


def fresh_calib(root, sd_token, **changes):
    """Give one sample_data its own copy of its calibrated_sensor record (token 'bad-calib'),
    changed by `changes`, so that only that sample uses the bad record."""
    sds = read(root, "sample_data")
    sd = next(r for r in sds if r["token"] == sd_token)
    cs = read(root, "calibrated_sensor")
    rec = dict(next(r for r in cs if r["token"] == sd["calibrated_sensor_token"]), token="bad-calib", **changes)
    sd["calibrated_sensor_token"] = "bad-calib"
    write(root, "calibrated_sensor", cs + [rec])
    write(root, "sample_data", sds)


@pytest.mark.parametrize("field,value,message", [
    ("translation", [1.0, float("nan"), 2.0], r"translation \[1\.0, nan, 2\.0\] is not 3 finite"),
    ("translation", [1.0, 2.0], r"translation \[1\.0, 2\.0\] is not 3 finite"),
    ("rotation", [float("inf"), 0.0, 0.0, 0.0], r"rotation \[inf, 0\.0, 0\.0, 0\.0\] is not 4 finite"),
    ("rotation", [1.01, 0.0, 0.0, 0.0], r"rotation \[1\.01, 0\.0, 0\.0, 0\.0\] has norm 1\.01, not a unit quaternion"),
])
def test_bad_ego_pose_fails_only_its_sample(root, field, value, message):
    bad = tokens(root)[0]
    sd, _ = key_sd(root, bad, "CAM_FRONT_LEFT")
    poses = read(root, "ego_pose")
    rec = next(r for r in poses if r["token"] == sd["ego_pose_token"])
    rec[field] = value
    write(root, "ego_pose", poses)
    msg = assert_fails(root, bad, re.escape(f"ego_pose.json record {rec['token']!r}") + ".*" + message)
    assert msg.startswith(f"sample {bad} ") and "CAM_FRONT_LEFT" in msg


def test_bad_lidar_ego_pose_fails_points(root):
    bad = tokens(root)[1]
    sd, _ = key_sd(root, bad, "LIDAR_TOP")
    poses = read(root, "ego_pose")
    rec = next(r for r in poses if r["token"] == sd["ego_pose_token"])
    rec["rotation"] = [0.5, 0.5, 0.5, 0.6]
    write(root, "ego_pose", poses)
    assert_fails(root, bad, rf"sample {bad} .*LIDAR_TOP sample_data .*ego_pose\.json record .*has norm 1\.0(4|5)")


@pytest.mark.parametrize("changes,message", [
    (dict(rotation=[0.5, float("nan"), 0.5, 0.5]), r"rotation \[0\.5, nan, 0\.5, 0\.5\] is not 4 finite"),
    (dict(rotation=[0.0, 0.0, 0.0, 0.0]), r"rotation \[0\.0, 0\.0, 0\.0, 0\.0\] has zero norm"),
    (dict(rotation=[0.7, 0.0, 0.0, 0.7]), r"has norm 0\.989949, not a unit quaternion \(\|norm - 1\| > 0\.001\)"),
    (dict(translation=[0.0, float("-inf"), 1.5]), r"translation \[0\.0, -inf, 1\.5\] is not 3 finite"),
    (dict(camera_intrinsic=[[100.0, 0.0, 80.0], [0.0, 100.0, 45.0]]), r"camera_intrinsic .* is not a 3x3 matrix"),
    (dict(camera_intrinsic=[]), r"camera_intrinsic \[\] is not a 3x3 matrix"),
    (dict(camera_intrinsic=[[100.0, 0.0, float("nan")], [0.0, 100.0, 45.0], [0.0, 0.0, 1.0]]),
     r"camera_intrinsic .*nan.* has NaN/inf entries"),
    (dict(camera_intrinsic=[[0.0, 0.0, 80.0], [0.0, 100.0, 45.0], [0.0, 0.0, 1.0]]),
     r"non-positive focal length \(fx=0, fy=100\)"),
    (dict(camera_intrinsic=[[100.0, 0.0, 80.0], [0.0, -100.0, 45.0], [0.0, 0.0, 1.0]]),
     r"non-positive focal length \(fx=100, fy=-100\)"),
])
def test_bad_camera_calibration_fails_only_its_sample(root, changes, message):
    bad = tokens(root)[1]
    sd, _ = key_sd(root, bad, "CAM_BACK")
    fresh_calib(root, sd["token"], **changes)
    msg = assert_fails(root, bad, r"calibrated_sensor\.json record 'bad-calib'.*" + message)
    assert msg.startswith(f"sample {bad} ") and f"CAM_BACK sample_data {sd['token']!r}" in msg


def test_bad_lidar_calibration_and_sweep_pose(root):
    bad = tokens(root)[0]
    sd, _ = key_sd(root, bad, "LIDAR_TOP")
    fresh_calib(root, sd["token"], camera_intrinsic=[[float("nan")]])
    assert_fails(root, bad, r"calibrated_sensor\.json record 'bad-calib': camera_intrinsic \[\[nan\]\] has NaN/inf")
    # a sweep's ego pose: only the sample whose sweeps use it fails, and only with sweeps > 1
    root2 = root.parent / "root2"
    shutil.copytree(root, root2)
    fresh_calib(root2, sd["token"], camera_intrinsic=[])
    bad2 = tokens(root2)[1]
    lidar, sds = key_sd(root2, bad2, "LIDAR_TOP")
    sweep = next(r for r in sds if r["token"] == lidar["prev"])
    assert not sweep["is_key_frame"]
    poses = read(root2, "ego_pose")
    next(r for r in poses if r["token"] == sweep["ego_pose_token"])["translation"] = [float("nan")] * 3
    write(root2, "ego_pose", poses)
    for s in NuScenes(root2, VERSION).scans(sweeps=1):
        assert_works(NuScenes(root2, VERSION), s)
    assert_fails(root2, bad2, rf"sample {bad2} .*LIDAR_TOP sweep sample_data '{sweep['token']}'.*"
                              r"ego_pose\.json.*translation \[nan, nan, nan\]", sweeps=2)


@pytest.mark.parametrize("channel", ["CAM_BACK_LEFT", "LIDAR_TOP"])
def test_missing_channel_is_listed_and_fails_when_used(root, channel):
    bad = tokens(root)[1]
    sd, sds = key_sd(root, bad, channel)
    write(root, "sample_data", [r for r in sds if r["token"] != sd["token"]])
    ds = NuScenes(root, VERSION)
    kfs = ds.keyframes()  # lists every sample; nothing raised yet
    assert [k.sample_token for k in kfs] == tokens(root)
    with pytest.raises(DataError, match=rf"^sample {bad} of scene-\d+: no {channel} keyframe in .*sample_data\.json$"):
        kfs[1].check()
    assert_fails(root, bad, rf"sample {bad} .*no {channel} keyframe")
    if channel == "LIDAR_TOP":
        assert ds.scans()[1].lidar_path == ""
    else:
        with pytest.raises(DataError, match=channel):
            ds.views(ds.scans()[1])


def test_unknown_calibrated_sensor_token_fails_only_its_sample(root):
    bad = tokens(root)[0]
    sd, sds = key_sd(root, bad, "CAM_FRONT")
    next(r for r in sds if r["token"] == sd["token"])["calibrated_sensor_token"] = "no-such-calib"
    write(root, "sample_data", sds)
    assert_fails(root, bad, rf"sample {bad} .*{sd['token']}.*calibrated_sensor\.json: no record with token 'no-such-calib'")


def test_missing_ego_pose_record_fails_only_its_sample(root):
    bad = tokens(root)[1]
    sd, sds = key_sd(root, bad, "CAM_FRONT")
    next(r for r in sds if r["token"] == sd["token"])["ego_pose_token"] = "gone"
    write(root, "sample_data", sds)
    assert_fails(root, bad, rf"sample {bad} .*CAM_FRONT.*ego_pose\.json: no record with token 'gone'")


def test_empty_and_non_finite_lidar_files_name_the_file(root):
    ds = NuScenes(root, VERSION)
    first, second = ds.scans()
    path = root / first.lidar_path
    pts = load_points(path)
    path.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(str(path)) + r": scan has no points"):
        ds.points(first)
    assert_works(ds, second)
    bad = pts.copy()
    bad[7, 1] = np.nan
    bad[9, 3] = np.inf
    bad.tofile(path)
    with pytest.raises(DataError, match=re.escape(str(path)) + r": 2 of \d+ points have NaN/inf values \(first: point 7 = \[.*nan"):
        ds.points(first)
    assert_works(ds, second)


def test_non_finite_sweep_file_names_the_file(root):
    ds = NuScenes(root, VERSION)
    scan = ds.scans(sweeps=2)[1]
    sweep = scan.native.sweeps[0].path
    pts = load_points(sweep)
    pts[0, 0] = -np.inf
    pts.tofile(sweep)
    with pytest.raises(DataError, match=re.escape(str(sweep)) + r": 1 of \d+ points have NaN/inf"):
        ds.points(scan)
    assert_works(ds, ds.scans(sweeps=2)[0])
    assert_works(ds, ds.scans(sweeps=1)[1])  # without sweeps the sample is fine


def test_truncated_jpeg_names_the_file(root):
    ds = NuScenes(root, VERSION)
    first, second = ds.scans()
    view = ds.views(first)[2]
    data = view.path.read_bytes()
    view.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(str(view.path)) + r": cannot decode image"):
        load_image(view.path, view.width, view.height)
    for v in ds.views(second):
        assert load_image(v.path, v.width, v.height).size == (v.width, v.height)


def test_valid_sample_passes_and_tolerance_is_loose_enough(root):
    # nuScenes quaternions are unit to ~1e-6: a 1e-4 deviation is accepted, listing is lazy
    poses = read(root, "ego_pose")
    for r in poses:
        r["rotation"] = [v * (1 + 1e-4) for v in r["rotation"]]
    write(root, "ego_pose", poses)
    ds = NuScenes(root, VERSION)
    for scan in ds.scans(sweeps=2):
        assert_works(ds, scan)
    assert math.isclose(np.linalg.det(ds.scans()[0].native.lidar.ego.rotation), 1.0, rel_tol=1e-9)
