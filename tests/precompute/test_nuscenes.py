"""nuScenes reader: label mapping, splits, sweeps, bad input; real keyframes when present."""

import json
import shutil

import numpy as np
import pytest

from clip2scene.classes import NUSCENES_CLASSES
from clip2scene.errors import DataError
from clip2scene.precompute.datasets.nuscenes import CAMERAS, NuScenes, load_points
from tests.nuscenes_reference import CATEGORY_NAMES
from clip2scene.precompute.datasets.splits import MINI_TRAIN, MINI_VAL, TRAIN, VAL, scene_split


def test_official_splits():
    assert (len(TRAIN), len(VAL), len(MINI_TRAIN), len(MINI_VAL)) == (700, 150, 8, 2)
    assert not set(TRAIN) & set(VAL)
    assert scene_split("v1.0-trainval", "scene-0003") == "val"
    assert scene_split("v1.0-trainval", "scene-0001") == "train"
    assert scene_split("v1.0-trainval", "scene-0540") == "unknown"  # no such scene in nuScenes
    assert scene_split("v1.0-mini", "scene-0916") == "val"
    assert scene_split("v1.0-mini", "scene-0061") == "train"


def test_real_keyframes_and_label_counts(real_root):
    ds = NuScenes(real_root, "v1.0-mini")
    kfs = ds.keyframes()
    assert len(kfs) == 41 and {k.scene for k in kfs} == {"scene-0916"} and {k.split for k in kfs} == {"val"}
    assert all(tuple(c.channel for c in k.cameras) == CAMERAS for k in kfs)
    assert all(k.sweeps == () for k in ds.keyframes(sweeps=3))  # keyframes only on disk
    assert ds.keyframes(split="train") == []
    ts = [k.timestamp for k in kfs]
    assert ts == sorted(ts)
    counts = np.zeros(17, np.int64)
    total = 0
    for k in kfs:
        pts = load_points(k.lidar.path)
        total += len(pts)
        counts += np.bincount(ds.load_labels(k, len(pts)), minlength=17)
    assert total == 1423552
    # README of the fixture: fine-class counts; bicycle_rack (433) maps to ignore like noise
    expected = {"pedestrian": 6554, "bicycle": 45, "bus": 9184, "car": 79135, "motorcycle": 3606, "truck": 17996}
    for name, n in expected.items():
        assert counts[NUSCENES_CLASSES.index(name) + 1] == n, name
    assert counts[0] == 1306599 + 433


def test_label_map_follows_category_index():
    # the mapping of method.md section 6, checked from category names -> index
    fine_to_coarse = {2: 7, 3: 7, 4: 7, 6: 7, 9: 1, 12: 8, 14: 2, 15: 3, 16: 3, 17: 4, 18: 5, 21: 6, 22: 9,
                      23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 30: 16}

    ds = NuScenes.__new__(NuScenes)
    ds.categories = [{"name": n, "index": i} for i, n in enumerate(CATEGORY_NAMES)]
    lut = ds._build_label_map(None)
    for i in range(32):
        assert lut[i] == fine_to_coarse.get(i, 0), i


@pytest.fixture
def sample(tmp_path_factory):
    from clip2scene.samples.nuscenes import SampleConfig, make_sample

    return make_sample(tmp_path_factory.mktemp("s") / "root", SampleConfig(scenes=2, keyframes=3, sweeps=2))


def copy_root(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_synthetic_sample_reads(sample):
    ds = NuScenes(sample, "v1.0-mini")
    kfs = ds.keyframes(sweeps=3)
    assert len(kfs) == 6 and {k.split for k in kfs} == {"train", "val"}
    assert all(len(k.sweeps) == 2 for k in kfs)
    for k in kfs:
        assert all(s.timestamp < k.timestamp for s in k.sweeps)
        assert [s.timestamp for s in k.sweeps] == sorted((s.timestamp for s in k.sweeps), reverse=True)
        pts = load_points(k.lidar.path)
        lab = ds.load_labels(k, len(pts))
        assert lab.max() <= 16 and (lab > 0).mean() > 0.5
    assert len(ds.keyframes(sweeps=1)[0].sweeps) == 0


def test_bad_inputs_name_the_file(sample, tmp_path):
    with pytest.raises(DataError, match="dataroot not found"):
        NuScenes(tmp_path / "missing", "v1.0-mini")
    with pytest.raises(DataError, match="no table folder"):
        NuScenes(sample, "v1.0-trainval")
    root = copy_root(sample, tmp_path / "a")
    (root / "v1.0-mini" / "sample_data.json").unlink()
    with pytest.raises(DataError, match="sample_data.json"):
        NuScenes(root, "v1.0-mini")
    root = copy_root(sample, tmp_path / "b")
    (root / "v1.0-mini" / "scene.json").write_text("{not json")
    with pytest.raises(DataError, match="scene.json: not valid JSON"):
        NuScenes(root, "v1.0-mini")
    root = copy_root(sample, tmp_path / "c")
    kf = NuScenes(root, "v1.0-mini").keyframes()[0]
    with open(kf.lidar.path, "ab") as f:
        f.write(b"\0" * 7)
    with pytest.raises(DataError, match=r"pcd\.bin: size .* not a multiple of 20"):
        load_points(kf.lidar.path)
    kf.lidar.path.unlink()
    with pytest.raises(DataError, match="lidar file not found"):
        load_points(kf.lidar.path)
    root = copy_root(sample, tmp_path / "d")
    cs_path = root / "v1.0-mini" / "calibrated_sensor.json"
    cs = json.loads(cs_path.read_text())
    cs[0]["rotation"] = [0, 0, 0, 0]
    cs_path.write_text(json.dumps(cs))
    kfs = NuScenes(root, "v1.0-mini").keyframes()  # listing succeeds; the bad record fails per sample
    with pytest.raises(DataError, match="zero norm"):
        for kf in kfs:
            kf.check()
