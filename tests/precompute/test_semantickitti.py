"""SemanticKITTI reader (clip2scene.precompute.datasets.semantickitti) on the synthetic sample
(clip2scene.samples.semantickitti): layout, splits, label map, sweeps, projection, colours,
bad input. Calibration is re-read and the projection recomputed here by hand, independently of
the reader. Run: .venv/bin/python -m pytest -q tests/precompute/test_semantickitti.py
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip2scene.classes import SEMANTICKITTI_CLASSES
from clip2scene.errors import DataError
from clip2scene.precompute.datasets.semantickitti import LEARNING_MAP, SPLITS, KittiFrame, SemanticKITTI, sequence_split
from clip2scene.samples.semantickitti import PALETTE, KittiSampleConfig, make_semantickitti_sample

CONFIG = KittiSampleConfig()
W, H = CONFIG.image_width, CONFIG.image_height

# semantic-kitti.yaml learning_map, written out in full (raw id -> 0..19).
YAML_LEARNING_MAP = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10,
    48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19, 99: 0,
    252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_semantickitti_sample(tmp_path_factory.mktemp("kitti") / "root", CONFIG)


@pytest.fixture(scope="module")
def ds(root) -> SemanticKITTI:
    return SemanticKITTI(root)


@pytest.fixture()
def copy(root, tmp_path) -> Path:
    """A private copy of the sample that a test may damage."""
    return Path(shutil.copytree(root, tmp_path / "copy"))


def _raw_labels(root: Path, seq: str, frame: int) -> np.ndarray:
    return np.fromfile(root / "sequences" / seq / "labels" / f"{frame:06d}.label", dtype="<u4")


def _raw_points(root: Path, seq: str, frame: int) -> np.ndarray:
    return np.fromfile(root / "sequences" / seq / "velodyne" / f"{frame:06d}.bin", dtype="<f4").reshape(-1, 4)


def _calib_by_hand(root: Path, seq: str) -> tuple[np.ndarray, np.ndarray]:
    """(P2 (3, 4), Tr (4, 4)) parsed straight from calib.txt."""
    rows = dict(line.split(":", 1) for line in (root / "sequences" / seq / "calib.txt").read_text().splitlines())
    p2 = np.array(rows["P2"].split(), dtype=np.float64).reshape(3, 4)
    tr = np.vstack([np.array(rows["Tr"].split(), dtype=np.float64).reshape(3, 4), [0, 0, 0, 1]])
    return p2, tr


def _scan(ds: SemanticKITTI, token: str, sweeps: int = 1):
    return next(s for s in ds.scans(sweeps=sweeps) if s.token == token)


# -- layout ---------------------------------------------------------------------------------
def test_layout_and_dtypes(root):
    for seq in CONFIG.sequences:
        d = root / "sequences" / seq
        for sub, ext in (("velodyne", ".bin"), ("labels", ".label"), ("image_2", ".png")):
            assert sorted(p.name for p in (d / sub).iterdir()) == [f"{k:06d}{ext}" for k in range(CONFIG.frames)]
        calib = dict(line.split(":", 1) for line in (d / "calib.txt").read_text().splitlines())
        assert list(calib) == ["P0", "P1", "P2", "P3", "Tr"] and all(len(v.split()) == 12 for v in calib.values())
        p2, tr = _calib_by_hand(root, seq)
        assert p2[0, 0] == pytest.approx(p2[1, 1], rel=0.03) and 0.4 * W < p2[0, 2] < 0.6 * W
        assert np.allclose(tr[:3, :3] @ tr[:3, :3].T, np.eye(3), atol=1e-9)
        assert np.allclose(tr[:3, :3], [[0, -1, 0], [0, 0, -1], [1, 0, 0]], atol=0.02)  # velo -> camera axes
        poses = np.loadtxt(d / "poses.txt")
        assert poses.shape == (CONFIG.frames, 12) and np.allclose(poses[0].reshape(3, 4), np.eye(4)[:3])
        assert 0.5 < poses[-1].reshape(3, 4)[2, 3] < 4.0  # drives forward (camera z) ~8 m/s
        assert np.allclose(np.loadtxt(d / "times.txt"), 0.1 * np.arange(CONFIG.frames))
        for k in range(CONFIG.frames):
            size = (d / "velodyne" / f"{k:06d}.bin").stat().st_size
            assert size % 16 == 0 and (d / "labels" / f"{k:06d}.label").stat().st_size == size // 4
            pts, raw = _raw_points(root, seq, k), _raw_labels(root, seq, k)
            assert len(pts) > 0.5 * CONFIG.lidar_beams * CONFIG.lidar_azimuth_steps
            assert np.all((pts[:, 3] >= 0) & (pts[:, 3] < 1))
            assert 0 < np.linalg.norm(pts[:, :3], axis=1).min() and np.linalg.norm(pts[:, :3], axis=1).max() < 80
            assert set(np.unique(raw & 0xFFFF)) <= set(PALETTE)
            with Image.open(d / "image_2" / f"{k:06d}.png") as im:
                assert im.size == (W, H) and im.mode == "RGB"
    raw = np.concatenate([_raw_labels(root, s, k) for s in CONFIG.sequences for k in range(CONFIG.frames)])
    assert np.any((raw & 0xFFFF) == 252) and np.any(raw >> 16 > 0)  # a moving car; instance ids


def test_dataset_attributes(ds, root):
    assert ds.name == "semantickitti" and ds.version == "semantickitti" and ds.dataroot == root
    assert ds.cameras == ("image_2",) and ds.point_features == ("intensity",) and ds.voxel_size == 0.1
    assert ds.has_labels


# -- splits ---------------------------------------------------------------------------------
def test_official_splits():
    assert SPLITS["train"] == ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10")
    assert SPLITS["val"] == ("08",) and SPLITS["test"] == tuple(f"{i}" for i in range(11, 22))
    assert (sequence_split("00"), sequence_split("08"), sequence_split("21"), sequence_split("22")) == (
        "train", "val", "test", "unknown")


def test_scans_and_splits(ds):
    scans = ds.scans()
    assert [s.token for s in scans] == [f"{q}/{k:06d}" for q in ("00", "08") for k in range(4)]
    assert {s.split for s in ds.scans("train")} == {"train"} and {s.scene for s in ds.scans("train")} == {"00"}
    assert [s.scene for s in ds.scans("val")] == ["08"] * 4
    assert ds.scans("test") == []
    assert [s.timestamp for s in scans[:4]] == [0, 100_000, 200_000, 300_000]  # microseconds
    assert scans[5].lidar_path == "sequences/08/velodyne/000001.bin"
    assert scans[5].native == KittiFrame("08", 1, ())
    assert ds.scans() == ds.scans()  # deterministic
    views = ds.views(scans[0])
    assert len(views) == 1 and (views[0].name, views[0].width, views[0].height) == ("image_2", W, H)
    assert views[0].path == ds.dataroot / "sequences/00/image_2/000000.png"


# -- points and labels ------------------------------------------------------------------------
def test_points_and_labels(ds, root):
    scan = _scan(ds, "08/000002")
    xyz, feat, sweep, n_key = ds.points(scan)
    raw_pts = _raw_points(root, "08", 2)
    assert (xyz.dtype, feat.dtype, sweep.dtype) == (np.float32, np.float32, np.uint8)
    assert xyz.shape == (n_key, 3) and feat.shape == (n_key, 1) and n_key == len(raw_pts)
    assert np.array_equal(xyz, raw_pts[:, :3]) and np.array_equal(feat[:, 0], raw_pts[:, 3]) and not sweep.any()
    labels = ds.labels(scan, n_key)
    assert labels.dtype == np.uint8 and labels.shape == (n_key,) and labels.max() <= 19
    raw = _raw_labels(root, "08", 2)
    expected = np.array([YAML_LEARNING_MAP[int(r)] for r in raw & 0xFFFF], np.uint8)
    assert np.array_equal(labels, expected)
    car = SEMANTICKITTI_CLASSES.index("car") + 1
    assert np.all(labels[(raw & 0xFFFF) == 252] == car) and np.any((raw & 0xFFFF) == 252)


def test_learning_map_table():
    assert LEARNING_MAP.dtype == np.uint8 and LEARNING_MAP.shape == (65536,)
    for raw, label in YAML_LEARNING_MAP.items():
        assert LEARNING_MAP[raw] == label, raw
    unknown = np.setdiff1d(np.arange(65536), list(YAML_LEARNING_MAP))
    assert not LEARNING_MAP[unknown].any()
    names = {raw: SEMANTICKITTI_CLASSES[LEARNING_MAP[raw] - 1] for raw in (10, 13, 16, 60, 252, 253, 254, 258, 81)}
    assert names == {10: "car", 13: "other vehicle", 16: "other vehicle", 60: "road", 252: "car",
                     253: "bicyclist", 254: "person", 258: "truck", 81: "traffic sign"}


def test_instance_bits_are_ignored(copy):
    ds = SemanticKITTI(copy)
    scan = _scan(ds, "00/000001")
    n = len(_raw_points(copy, "00", 1))
    sem = np.resize(np.array([10, 252, 40, 60, 254, 99, 1, 50], np.uint32), n)
    inst = (np.arange(n, dtype=np.uint32) % 7) * 4099 + 1  # any upper 16 bits
    (sem | (inst << 16)).astype("<u4").tofile(copy / "sequences/00/labels/000001.label")
    assert np.array_equal(ds.labels(scan, n), np.resize(np.array([1, 1, 9, 9, 6, 0, 0, 13], np.uint8), n))


# -- sweeps ---------------------------------------------------------------------------------
def test_sweep_chain(ds, root):
    scans = {s.token: s for s in ds.scans(sweeps=3)}
    assert [scans[f"08/{k:06d}"].native.sweeps for k in range(4)] == [(), (0,), (1, 0), (2, 1)]
    xyz, feat, sweep, n_key = ds.points(scans["08/000003"])
    sizes = [len(_raw_points(root, "08", k)) for k in (3, 2, 1)]
    assert n_key == sizes[0] and len(xyz) == len(feat) == len(sweep) == sum(sizes)
    assert np.array_equal(np.bincount(sweep), sizes) and np.all(np.diff(sweep.astype(int)) >= 0)
    assert np.array_equal(feat[sizes[0]:sizes[0] + sizes[1], 0], _raw_points(root, "08", 2)[:, 3])
    assert np.allclose(ds.sweep_transform("08", 2, 2), np.eye(4), atol=1e-12)
    # by hand: inv(Tr) inv(P_j) P_k Tr from the text files
    _, tr = _calib_by_hand(root, "08")
    poses = np.loadtxt(root / "sequences/08/poses.txt").reshape(-1, 3, 4)
    pj, pk = np.vstack([poses[3], [0, 0, 0, 1]]), np.vstack([poses[2], [0, 0, 0, 1]])
    t = np.linalg.inv(tr) @ np.linalg.inv(pj) @ pk @ tr
    prev = _raw_points(root, "08", 2)[:, :3].astype(np.float64)
    assert np.allclose(xyz[n_key:n_key + sizes[1]], prev @ t[:3, :3].T + t[:3, 3], atol=1e-4)


@pytest.mark.parametrize("seq", ["00", "08"])
def test_sweep_points_land_on_the_same_wall(ds, root, seq):
    """The building across the road ahead (a wall facing the car, the car drives ~0.8 m per frame
    towards it) seen from frame 2 lands on the wall's plane seen from frame 3."""
    xyz, _, sweep, n_key = ds.points(_scan(ds, f"{seq}/000003", sweeps=2))
    building = YAML_LEARNING_MAP[50]

    def wall(points, labels):
        return points[(labels == building) & (points[:, 0] > 15) & (np.abs(points[:, 1]) < 4)]

    key = wall(xyz[:n_key].astype(np.float64), ds.labels(_scan(ds, f"{seq}/000003"), n_key))
    prev_labels = LEARNING_MAP[_raw_labels(root, seq, 2) & 0xFFFF]
    moved = wall(xyz[sweep == 1].astype(np.float64), prev_labels)
    unmoved = wall(_raw_points(root, seq, 2)[:, :3].astype(np.float64), prev_labels)
    assert len(key) > 30 and len(moved) > 30
    centre = key.mean(axis=0)
    normal = np.linalg.svd(key - centre)[2][-1]
    assert abs(normal[0]) > 0.95  # faces the car
    assert np.abs((key - centre) @ normal).max() < 0.01
    assert np.abs((moved - centre) @ normal).max() < 0.03  # within a few cm of the same wall
    assert np.abs((unmoved - centre) @ normal).min() > 0.4  # without the poses it would be off


# -- projection ---------------------------------------------------------------------------------
def test_projection_matches_hand_computation(ds, root):
    scan = _scan(ds, "00/000001")
    p2, tr = _calib_by_hand(root, "00")
    xyz = _raw_points(root, "00", 1)[::97, :3]
    uv, visible = ds.project(scan, 0, xyz)
    assert uv.dtype == np.float64 and uv.shape == (len(xyz), 2) and visible.dtype == bool
    hom = np.hstack([xyz.astype(np.float64), np.ones((len(xyz), 1))])
    cam = hom @ tr.T
    uvw = cam @ p2.T
    exp_uv = uvw[:, :2] / uvw[:, 2:]
    exp_vis = (cam[:, 2] > 1) & (exp_uv[:, 0] > 1) & (exp_uv[:, 0] < W - 1) & (exp_uv[:, 1] > 1) & (exp_uv[:, 1] < H - 1)
    front = cam[:, 2] > 0.1
    assert np.allclose(uv[front], exp_uv[front], rtol=0, atol=1e-9)
    assert np.array_equal(visible, exp_vis) and 0.05 < visible.mean() < 0.5


def test_projection_margin_and_depth_rules(ds, root):
    """Points built to land just inside / outside the 1-pixel margin and the 1 m depth limit."""
    scan = _scan(ds, "00/000000")
    p2, tr = _calib_by_hand(root, "00")
    cases = [  # (u, v, camera-0 depth z, visible)
        (1.05, H / 2, 10.0, True), (0.95, H / 2, 10.0, False), (1.0 + 1e-3, 1.0 + 1e-3, 10.0, True),
        (W - 1.05, H / 2, 10.0, True), (W - 0.95, H / 2, 10.0, False),
        (W / 2, 1.05, 10.0, True), (W / 2, 0.95, 10.0, False),
        (W / 2, H - 1.05, 10.0, True), (W / 2, H - 0.95, 10.0, False),
        (W / 2, H / 2, 1.05, True), (W / 2, H / 2, 0.95, False), (W / 2, H / 2, -5.0, False),
        (W / 2, H / 2, 1.001, True), (W / 2, H / 2, 0.999, False),  # camera-0 z, not P2's w = z + 2.7 mm
        (-50.0, H / 2, 10.0, False), (W / 2, 3 * H, 10.0, False),
    ]
    pts = []
    for u, v, z, _ in cases:
        w = z + p2[2, 3]  # uvw = P2 @ [x_cam, 1] with P2's last row (0, 0, 1, b)
        x_cam = np.linalg.solve(p2[:, :3], w * np.array([u, v, 1.0]) - p2[:, 3])
        pts.append((np.linalg.inv(tr) @ np.append(x_cam, 1.0))[:3])
    uv, visible = ds.project(scan, 0, np.asarray(pts, np.float32))
    assert np.allclose(uv, [(u, v) for u, v, _, _ in cases], atol=1e-3)
    assert visible.tolist() == [c[3] for c in cases]


def test_image_colour_matches_point_class(ds, root):
    """At projected visible keyframe points the image shows the colour of the point's raw class."""
    palette = np.zeros((65536, 3), np.uint8)
    for raw, rgb in PALETTE.items():
        palette[raw] = rgb
    hits = total = 0
    for scan in ds.scans():
        xyz, _, _, n_key = ds.points(scan)
        uv, visible = ds.project(scan, 0, xyz)
        img = np.asarray(Image.open(ds.views(scan)[0].path))
        col = np.rint(uv[visible]).astype(int)
        raw = _raw_labels(root, scan.scene, scan.native.frame)[visible] & 0xFFFF
        hits += np.all(img[col[:, 1], col[:, 0]] == palette[raw], axis=1).sum()
        total += int(visible.sum())
    assert total > 1000
    assert hits / total > 0.85, hits / total


# -- bad input ---------------------------------------------------------------------------------
def test_truncated_bin_names_the_file(copy):
    path = copy / "sequences/08/velodyne/000001.bin"
    path.write_bytes(path.read_bytes()[:-5])
    ds = SemanticKITTI(copy)
    with pytest.raises(DataError, match="000001.bin.*multiple of 16"):
        ds.points(_scan(ds, "08/000001"))
    with pytest.raises(DataError, match="000001.bin"):  # also as a sweep of the next frame
        ds.points(_scan(ds, "08/000002", sweeps=2))


def test_label_count_mismatch_names_the_file(copy):
    path = copy / "sequences/08/labels/000001.label"
    path.write_bytes(path.read_bytes()[:-4])
    ds = SemanticKITTI(copy)
    assert ds.has_labels  # the file exists (wrong length is found when read)
    scan = _scan(ds, "08/000001")
    _, _, _, n_key = ds.points(scan)
    with pytest.raises(DataError, match="000001.label"):
        ds.labels(scan, n_key)
    path.unlink()
    with pytest.raises(DataError, match="label file not found: .*000001.label"):
        ds.labels(scan, n_key)
    assert ds.has_labels is True and SemanticKITTI(copy).has_labels is False  # cached per instance


def test_missing_calib_names_the_path(copy):
    (copy / "sequences/08/calib.txt").unlink()
    ds = SemanticKITTI(copy)
    assert len(ds.scans("train")) == 4  # sequence 00 is intact
    with pytest.raises(DataError, match=r"sequences/08/calib\.txt"):
        ds.scans("val")
    with pytest.raises(DataError, match=r"sequences/08/calib\.txt"):
        ds.scans()


def test_malformed_calib_and_poses(copy):
    calib = copy / "sequences/08/calib.txt"
    calib.write_text("".join(line + "\n" for line in calib.read_text().splitlines() if not line.startswith("P2")))
    with pytest.raises(DataError, match=r"calib\.txt: no 'P2:' line"):
        SemanticKITTI(copy).scans("val")
    (copy / "sequences/00/poses.txt").unlink()
    ds = SemanticKITTI(copy)
    assert len(ds.scans("train", sweeps=1)) == 4  # poses are only needed for sweeps
    with pytest.raises(DataError, match=r"sequences/00/poses\.txt"):
        ds.scans("train", sweeps=2)


def test_missing_files_and_roots(copy, tmp_path):
    (copy / "sequences/00/image_2/000002.png").unlink()
    ds = SemanticKITTI(copy)
    with pytest.raises(DataError, match="000002.png"):
        ds.views(_scan(ds, "00/000002"))
    with pytest.raises(DataError, match="dataroot not found"):
        SemanticKITTI(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="sequences"):
        SemanticKITTI(tmp_path / "empty")


# -- generator --------------------------------------------------------------------------------
def test_generator_is_deterministic_and_checks_its_input(tmp_path, root):
    small = replace(CONFIG, sequences=("08", "11"), frames=2)
    a = make_semantickitti_sample(tmp_path / "a", small)
    b = make_semantickitti_sample(tmp_path / "b", small)
    c = make_semantickitti_sample(tmp_path / "c", replace(small, seed=1))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "sequences/08/velodyne/000000.bin").read_bytes() != (c / "sequences/08/velodyne/000000.bin").read_bytes()
    # same seed and sequence -> same frames as the default sample
    assert (a / "sequences/08/velodyne/000001.bin").read_bytes() == (root / "sequences/08/velodyne/000001.bin").read_bytes()
    assert not (a / "sequences/11/labels").exists()  # test sequences are unlabelled
    ds = SemanticKITTI(a)
    assert [s.split for s in ds.scans()] == ["val", "val", "test", "test"] and len(ds.scans("test")) == 2
    assert ds.has_labels  # the test sequence does not count
    shutil.rmtree(a / "sequences/08")
    assert not SemanticKITTI(a).has_labels
    with pytest.raises(FileExistsError):
        make_semantickitti_sample(b, small)
    for bad in (dict(sequences=("8",)), dict(sequences=("00", "00")), dict(frames=0), dict(image_width=4)):
        with pytest.raises(ValueError):
            make_semantickitti_sample(tmp_path / "bad", replace(CONFIG, **bad))
