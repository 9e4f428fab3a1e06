"""ScanNet reader on the synthetic box-room sample: PLY, splits, NYU40 labels, views, projection
with the depth-occlusion test, colours at visible vertices, and errors that name the file."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from plyfile import PlyData

from clip2scene.classes import SCANNET_CLASSES
from clip2scene.errors import ConfigError, DataError
from clip2scene.precompute.datasets.scannet import NYU40_TO_EVAL, ScanNet
from clip2scene.samples.scannet import (
    CLASS_COLOURS, NYU40_NAMES, ScanNetSampleConfig, make_scannet_sample, room_layout)

SCENES = ["scene0000_00", "scene0001_00", "scene0002_00"]
TINY = ScanNetSampleConfig(train_scenes=1, val_scenes=0, frames=2, image_width=64, image_height=48,
                           depth_width=32, depth_height=24, spacing=0.25)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_scannet_sample(tmp_path_factory.mktemp("scannet") / "root")


@pytest.fixture(scope="module")
def ds(root) -> ScanNet:
    return ScanNet(root)


def _scan(ds, scene="scene0000_00"):
    return next(s for s in ds.scans() if s.scene == scene)


def _mesh(root, scene, labels=False):
    return root / "scans" / scene / f"{scene}_vh_clean_2{'.labels' if labels else ''}.ply"


def _nyu(root, scene):
    return np.asarray(PlyData.read(str(_mesh(root, scene, labels=True)))["vertex"]["label"])


def test_ply_files_and_points(root, ds):
    mesh = PlyData.read(str(_mesh(root, "scene0000_00")))
    lab = PlyData.read(str(_mesh(root, "scene0000_00", labels=True)))
    v = mesh["vertex"]
    n = v.count
    assert 30_000 < n < 150_000 and lab["vertex"].count == n
    assert v["x"].dtype == np.float32 and v["red"].dtype == np.uint8 and v["alpha"].dtype == np.uint8
    assert lab["vertex"]["label"].dtype == np.uint16
    faces = np.stack(mesh["face"]["vertex_indices"])
    assert faces.shape[1] == 3 and len(faces) > 20 and faces.min() >= 0 and faces.max() < n

    scan = _scan(ds)
    xyz, feat, sweep, n_key = ds.points(scan)
    assert xyz.shape == (n, 3) and xyz.dtype == np.float32
    assert feat.shape == (n, 3) and feat.dtype == np.float32
    assert sweep.shape == (n,) and sweep.dtype == np.uint8 and not sweep.any() and n_key == n
    np.testing.assert_array_equal(xyz[:, 0], v["x"])
    np.testing.assert_allclose(feat[:, 1], v["green"] / 255.0, rtol=1e-6)
    assert 0.0 <= feat.min() and feat.max() <= 1.0
    w, d, h = room_layout(ScanNetSampleConfig(), 0).size
    assert np.all(xyz.min(0) >= -1e-4) and np.all(xyz.max(0) <= np.array([w, d, h]) + 1e-4)
    # a scene is already fused: asking for sweeps changes nothing
    swept = [s for s in ds.scans(sweeps=3) if s.scene == scan.scene][0]
    assert swept == scan and ds.points(swept)[3] == n
    assert (ds.name, ds.version, ds.voxel_size, ds.cameras, ds.has_labels) == ("scannet", "scannet-25k", 0.05, (), True)
    assert ds.point_features == ("red", "green", "blue")


def test_splits_from_the_official_lists(ds, tmp_path):
    scans = ds.scans()
    assert [s.scene for s in scans] == SCENES and [s.token for s in scans] == SCENES
    assert [s.split for s in scans] == ["train", "train", "val"]
    assert scans[0].lidar_path == "scans/scene0000_00/scene0000_00_vh_clean_2.ply"
    assert [s.scene for s in ds.scans("train")] == SCENES[:2]
    assert [s.scene for s in ds.scans("val")] == SCENES[2:]
    with pytest.raises(DataError, match="scannetv2_test.txt"):
        ds.scans("test")

    # a bare root: scenes on disk, lists that miss one scene or are absent
    for scene in ("scene0007_00", "scene0003_01", "scene0003_00"):
        (tmp_path / "scans" / scene).mkdir(parents=True)
    (tmp_path / "scannetv2_train.txt").write_text("scene0003_00\nscene0003_01\nscene0999_00\n")
    bare = ScanNet(tmp_path)
    assert [(s.scene, s.split) for s in bare.scans()] == [
        ("scene0003_00", "train"), ("scene0003_01", "train"), ("scene0007_00", "unknown")]
    assert [s.scene for s in bare.scans("unknown")] == ["scene0007_00"]
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "scannetv2_val.txt"))):
        bare.scans("val")
    # test scenes live in scans_test/ and have no labels: all ignore
    (tmp_path / "scans_test" / "scene0707_00").mkdir(parents=True)
    (tmp_path / "scannetv2_test.txt").write_text("scene0707_00\n")
    bare = ScanNet(tmp_path)
    [test] = bare.scans("test")
    assert test.lidar_path == "scans_test/scene0707_00/scene0707_00_vh_clean_2.ply"
    assert bare.labels(test, 5).tolist() == [0] * 5


def test_nyu40_to_eval_labels(root, ds):
    eval_ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]
    for nyu in range(256):
        expected = eval_ids.index(nyu) + 1 if nyu in eval_ids else 0
        assert NYU40_TO_EVAL[nyu] == expected, nyu
    for scene in SCENES:
        scan = _scan(ds, scene)
        n = ds.points(scan)[3]
        labels = ds.labels(scan, n)
        nyu = _nyu(root, scene)
        assert labels.dtype == np.uint8 and labels.shape == (n,)
        np.testing.assert_array_equal(labels, NYU40_TO_EVAL[nyu])
        # every class of the room maps by name; ceiling and otherprop are ignored
        for cid in np.unique(nyu):
            got = np.unique(labels[nyu == cid])
            assert len(got) == 1
            if cid in (22, 40):
                assert got[0] == 0
            else:
                assert SCANNET_CLASSES[got[0] - 1] == NYU40_NAMES[cid]
        assert {1, 2, 3, 5, 7, 8, 9, 10, 11} <= set(np.unique(labels))


def test_views_skip_the_invalid_pose_and_subsample(root, ds):
    scan = _scan(ds)
    views = ds.views(scan)
    assert (root / "scannet_frames_25k/scene0000_00/pose/000300.txt").read_text().split()[0] == "-inf"
    assert [v.name for v in views] == ["000000", "000100", "000200", "000400", "000500", "000600", "000700"]
    assert all((v.width, v.height) == (320, 240) and v.path.is_file() for v in views)
    assert views[1].path == root / "scannet_frames_25k/scene0000_00/color/000100.jpg"
    three = ScanNet(root, frames_per_scene=3)
    assert [v.name for v in three.views(scan)] == ["000000", "000400", "000700"]
    assert len(ScanNet(root, frames_per_scene=1000).views(scan)) == 7
    with pytest.raises(ConfigError, match="frames_per_scene"):
        ScanNet(root, frames_per_scene=0)
    with pytest.raises(ConfigError, match="version"):
        ScanNet(root, version="scannet-v1")


def _read_matrix(path):
    return np.array([float(x) for x in path.read_text().split()]).reshape(4, 4)


def test_projection_by_hand(root, ds):
    scan = _scan(ds)
    xyz = ds.points(scan)[0]
    folder = root / "scannet_frames_25k/scene0000_00"
    k = _read_matrix(folder / "intrinsics_color.txt")
    # intrinsics_color.txt is for 1296x968; the images are 320x240 (pixel centres at integers)
    fx, fy = k[0, 0] * 320 / 1296, k[1, 1] * 240 / 968
    cx, cy = (k[0, 2] + 0.5) * 320 / 1296 - 0.5, (k[1, 2] + 0.5) * 240 / 968 - 0.5
    np.testing.assert_allclose(ds.intrinsic(scan, 0), [[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    for view in (0, 3):  # views[3] is frame 000400 (000300 has no pose)
        pose = _read_matrix(folder / "pose" / f"{ds.views(scan)[view].name}.txt")
        pts = xyz[[0, 5000, 20000, 40000, len(xyz) - 1]].astype(np.float64)
        world_to_cam = np.linalg.inv(pose)  # the file has 6 decimals: not exactly orthonormal
        cam = pts @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
        expected = np.stack([fx * cam[:, 0] / cam[:, 2] + cx, fy * cam[:, 1] / cam[:, 2] + cy], axis=1)
        uv, _ = ds.project(scan, view, pts)
        np.testing.assert_allclose(uv, expected, rtol=1e-9, atol=1e-7)

        # points straight ahead: in the image, but nearer than 0.1 m, behind the camera, or off-image
        eye, forward = pose[:3, 3], pose[:3, 2]
        near = eye + 0.05 * forward
        behind = eye - 2.0 * forward
        off = eye + 2.0 * forward + 5.0 * pose[:3, 0]
        edge = eye + 2.0 * (forward + pose[:3, 0] * (319.5 - cx) / fx)  # u = 319.5 > W - 1
        uv, vis = ds.project(scan, view, np.stack([near, behind, off, edge]).astype(np.float32))
        np.testing.assert_allclose(uv[0], [cx, cy], atol=1e-3)
        np.testing.assert_allclose(uv[3, 0], 319.5, atol=1e-3)
        assert not vis.any()


def _enters_box_before(eye, pts, boxes, margin):
    """(n,) bool: the segment eye -> p enters one of the boxes more than `margin` metres before p."""
    seg = pts - eye
    length = np.linalg.norm(seg, axis=1)
    seg = np.where(np.abs(seg) < 1e-12, 1e-12, seg)
    out = np.zeros(len(pts), bool)
    for b in boxes:
        t1, t2 = (np.array(b.lo) - eye) / seg, (np.array(b.hi) - eye) / seg
        t_near, t_far = np.minimum(t1, t2).max(1), np.maximum(t1, t2).min(1)
        out |= (t_near <= t_far) & (t_near > 0) & (t_near * length < length - margin)
    return out


def test_depth_occlusion(root, ds):
    scan = _scan(ds)
    xyz = ds.points(scan)[0]
    nyu = _nyu(root, scan.scene)
    boxes = room_layout(ScanNetSampleConfig(), 0).boxes
    folder = root / "scannet_frames_25k/scene0000_00"
    behind_table = hidden_total = shown_total = hidden_seen = shown_seen = 0
    for view, v in enumerate(ds.views(scan)):
        pose = _read_matrix(folder / "pose" / f"{v.name}.txt")
        eye = pose[:3, 3]
        uv, vis = ds.project(scan, view, xyz)
        z = (xyz - eye) @ pose[:3, 2]
        in_image = (z > 0.1) & (uv[:, 0] > 1) & (uv[:, 0] < 319) & (uv[:, 1] > 1) & (uv[:, 1] < 239)
        assert not (vis & ~in_image).any()
        # geometric truth: hidden = a box lies > 10 cm in front of the vertex on its ray; shown = none
        hidden = in_image & _enters_box_before(eye, xyz, boxes, 0.10)
        shown = in_image & ~_enters_box_before(eye, xyz, boxes, 0.005)
        hidden_total += hidden.sum()
        hidden_seen += (hidden & vis).sum()
        shown_total += shown.sum()
        shown_seen += (shown & vis).sum()
        # floor and wall vertices under the table whose ray from the camera crosses the top
        # surface at least 8 cm inside its edges (away from the silhouette) are never visible
        top = next(b for b in boxes if b.name == "table" and b.lo[2] > 0.5)
        s = (top.hi[2] - eye[2]) / (xyz[:, 2] - eye[2])  # where the ray meets the top's plane
        cross = eye[:2] + s[:, None] * (xyz[:, :2] - eye[:2])
        under = (xyz[:, 2] < top.lo[2]) & (s > 0) & (s < 1)
        under &= np.all((cross > np.array(top.lo[:2]) + 0.08) & (cross < np.array(top.hi[:2]) - 0.08), axis=1)
        occluded_by_table = in_image & np.isin(nyu, [1, 2]) & under
        assert not (vis & occluded_by_table).any()
        behind_table += occluded_by_table.sum()

        # along the ray of a visible table-top vertex: the vertex is seen, points 10% nearer or
        # 25% farther on the same ray project to the same pixel but are not
        top = np.flatnonzero(vis & (nyu == 7) & (np.abs(xyz[:, 2] - 0.76) < 1e-4))
        if len(top):
            p = xyz[top[len(top) // 2]].astype(np.float64)
            ray = np.stack([p, eye + 0.9 * (p - eye), eye + 1.25 * (p - eye)])
            uv_r, vis_r = ds.project(scan, view, ray)
            np.testing.assert_allclose(uv_r[1:], uv_r[[0, 0]], atol=1e-6)
            assert vis_r.tolist() == [True, False, False]
    assert behind_table > 100  # the table hides floor or wall in several views
    assert hidden_total > 5000 and hidden_seen / hidden_total < 0.01
    assert shown_total > 20000 and shown_seen / shown_total > 0.9


def test_colour_at_visible_vertices_matches_the_class(root, ds):
    ids = np.array(sorted(CLASS_COLOURS))
    palette = np.array([CLASS_COLOURS[i] for i in ids], np.float64)
    matched = total = 0
    for scene in SCENES:
        scan = _scan(ds, scene)
        xyz = ds.points(scan)[0]
        nyu = _nyu(root, scene)
        for view, v in enumerate(ds.views(scan)):
            uv, vis = ds.project(scan, view, xyz)
            image = np.asarray(Image.open(v.path), np.float64)
            px = image[np.rint(uv[vis, 1]).astype(int), np.rint(uv[vis, 0]).astype(int)]
            nearest = ids[np.argmin(((px[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)]
            matched += (nearest == nyu[vis]).sum()
            total += vis.sum()
    assert total > 100_000
    assert matched / total > 0.85


def test_generator_is_deterministic_and_checks_input(tmp_path):
    a = make_scannet_sample(tmp_path / "a", TINY)
    b = make_scannet_sample(tmp_path / "b", TINY)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + 2 + 2 * 3 + 2  # plys, intrinsics, frames x (jpg, png, pose), lists
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = make_scannet_sample(tmp_path / "c", ScanNetSampleConfig(**{**TINY.__dict__, "seed": 1}))
    assert _mesh(c, "scene0000_00").read_bytes() != _mesh(a, "scene0000_00").read_bytes()
    with pytest.raises(FileExistsError):
        make_scannet_sample(a, TINY)
    with pytest.raises(ValueError, match="frames"):
        make_scannet_sample(tmp_path / "d", ScanNetSampleConfig(frames=0))


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_scannet_sample(tmp_path / "tiny", TINY)


def test_errors_name_the_file(tiny, tmp_path):
    scene = "scene0000_00"
    frames = tiny / "scannet_frames_25k" / scene

    def fresh():
        ds = ScanNet(tiny)
        return ds, _scan(ds, scene)

    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nowhere"))):
        ScanNet(tmp_path / "nowhere")
    ds, scan = fresh()
    n = ds.points(scan)[3]
    ds.project(scan, 0, ds.points(scan)[0])  # the intact sample reads

    labels = _mesh(tiny, scene, labels=True)
    ply = PlyData.read(str(labels), mmap=False)
    ply["vertex"].data = np.array(ply["vertex"].data[:-1])
    ply.write(str(labels))
    with pytest.raises(DataError, match=f"{re.escape(str(labels))}.*{n - 1} labelled vertices for {n}"):
        fresh()[0].labels(scan, n)
    labels.unlink()
    with pytest.raises(DataError, match=re.escape(str(labels))):
        fresh()[0].labels(scan, n)

    mesh = _mesh(tiny, scene)
    mesh.write_bytes(mesh.read_bytes()[:400])  # header intact, body cut
    with pytest.raises(DataError, match=re.escape(str(mesh))):
        fresh()[0].points(scan)
    mesh.write_bytes(b"not a ply at all\n")
    with pytest.raises(DataError, match=re.escape(str(mesh))):
        fresh()[0].points(scan)
    mesh.unlink()
    with pytest.raises(DataError, match=re.escape(str(mesh))):
        fresh()[0].points(scan)

    xyz = np.zeros((3, 3), np.float32)
    depth = frames / "depth" / "000100.png"
    depth.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=re.escape(str(depth))):
        fresh()[0].project(scan, 1, xyz)
    depth.unlink()
    with pytest.raises(DataError, match=re.escape(str(depth))):
        fresh()[0].project(scan, 1, xyz)

    pose = frames / "pose" / "000100.txt"
    pose.write_text("1 0 0\n0 1 0\n")
    with pytest.raises(DataError, match=f"{re.escape(str(pose))}.*6 numbers"):
        fresh()[0].views(scan)
    pose.write_text("1 0 0 zero\n")
    with pytest.raises(DataError, match=re.escape(str(pose))):
        fresh()[0].views(scan)
    pose.unlink()
    with pytest.raises(DataError, match=re.escape(str(pose))):
        fresh()[0].views(scan)

    intr = frames / "intrinsics_depth.txt"
    intr.unlink()
    with pytest.raises(DataError, match=re.escape(str(intr))):
        fresh()[0].views(scan)

    shutil.rmtree(tiny / "scans")
    with pytest.raises(DataError, match=re.escape(str(tiny / "scans"))):
        ScanNet(tiny)
