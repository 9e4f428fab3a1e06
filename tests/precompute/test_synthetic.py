"""Tests of the synthetic nuScenes generator (clip2scene.samples.nuscenes).

The dataroot is read back the way a nuScenes user would: JSON tables, files named by sample_data,
and the devkit projection chain written out here independently of the generator.
Run: .venv/bin/python -m pytest -q tests/precompute/test_synthetic.py
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip2scene.precompute.datasets import splits
from tests.nuscenes_reference import CATEGORY_NAMES
from clip2scene.classes import NUSCENES_CATEGORY_COLOURS as CLASS_COLOURS
from clip2scene.samples.nuscenes import SampleConfig, make_sample, scene_names

TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "lidarseg", "log",
          "map", "sample", "sample_annotation", "sample_data", "scene", "sensor", "visibility")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT")
# field -> type (or tuple of types); "token" fields are also checked to be 32 hex chars
SCHEMA = {
    "attribute": {"token": str, "name": str, "description": str},
    "calibrated_sensor": {"token": str, "sensor_token": str, "translation": list, "rotation": list,
                          "camera_intrinsic": list},
    "category": {"token": str, "name": str, "description": str, "index": int},
    "ego_pose": {"token": str, "timestamp": int, "rotation": list, "translation": list},
    "instance": {"token": str, "category_token": str, "nbr_annotations": int,
                 "first_annotation_token": str, "last_annotation_token": str},
    "lidarseg": {"token": str, "sample_data_token": str, "filename": str},
    "log": {"token": str, "logfile": str, "vehicle": str, "date_captured": str, "location": str},
    "map": {"category": str, "token": str, "filename": str, "log_tokens": list},
    "sample": {"token": str, "timestamp": int, "prev": str, "next": str, "scene_token": str},
    "sample_annotation": {"token": str, "sample_token": str, "instance_token": str,
                          "visibility_token": str, "attribute_tokens": list, "translation": list,
                          "size": list, "rotation": list, "prev": str, "next": str,
                          "num_lidar_pts": int, "num_radar_pts": int},
    "sample_data": {"token": str, "sample_token": str, "ego_pose_token": str,
                    "calibrated_sensor_token": str, "timestamp": int, "fileformat": str,
                    "is_key_frame": bool, "height": int, "width": int, "filename": str, "prev": str,
                    "next": str},
    "scene": {"token": str, "log_token": str, "nbr_samples": int, "first_sample_token": str,
              "last_sample_token": str, "name": str, "description": str},
    "sensor": {"token": str, "channel": str, "modality": str},
    "visibility": {"description": str, "token": str, "level": str},
}
CONFIG = SampleConfig()
SMALL = SampleConfig(scenes=1, keyframes=2, sweeps=1, image_width=96, image_height=54,
                     lidar_beams=8, lidar_azimuth_steps=128)


# ------------------------------------------------------------------------------------------------
# helpers: reading a dataroot like a nuScenes user
# ------------------------------------------------------------------------------------------------
def quat_matrix(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, float) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


class Root:
    def __init__(self, root: Path, version: str):
        self.root, self.version = root, version
        self.t = {n: json.loads((root / version / f"{n}.json").read_text()) for n in TABLES}
        self.by = {n: {r["token"]: r for r in recs} for n, recs in self.t.items() if n != "map"}
        self.channel = {cs["token"]: self.by["sensor"][cs["sensor_token"]]["channel"]
                        for cs in self.t["calibrated_sensor"]}

    def sd_channel(self, sd: dict) -> str:
        return self.channel[sd["calibrated_sensor_token"]]

    def points(self, sd: dict) -> np.ndarray:
        return np.fromfile(self.root / sd["filename"], dtype=np.float32).reshape(-1, 5)

    def labels(self, sd: dict) -> np.ndarray:
        seg = next(r for r in self.t["lidarseg"] if r["sample_data_token"] == sd["token"])
        return np.fromfile(self.root / seg["filename"], dtype=np.uint8)

    def sample_sd(self, sample_token: str, channel: str) -> dict:
        return next(sd for sd in self.t["sample_data"] if sd["sample_token"] == sample_token
                    and sd["is_key_frame"] and self.sd_channel(sd) == channel)

    def lidar_to_global(self, sd: dict, pts: np.ndarray) -> np.ndarray:
        cs = self.by["calibrated_sensor"][sd["calibrated_sensor_token"]]
        ep = self.by["ego_pose"][sd["ego_pose_token"]]
        p = pts[:, :3].astype(np.float64) @ quat_matrix(cs["rotation"]).T + cs["translation"]
        return p @ quat_matrix(ep["rotation"]).T + ep["translation"]

    def project(self, cam_sd: dict, glob: np.ndarray):
        """Devkit chain global -> ego(cam time) -> camera -> pixels; (uv (n, 2), depth (n,), keep (n,))."""
        ep = self.by["ego_pose"][cam_sd["ego_pose_token"]]
        cs = self.by["calibrated_sensor"][cam_sd["calibrated_sensor_token"]]
        p = (glob - ep["translation"]) @ quat_matrix(ep["rotation"])
        p = (p - cs["translation"]) @ quat_matrix(cs["rotation"])
        depth = p[:, 2]
        uvw = p @ np.array(cs["camera_intrinsic"]).T
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = uvw[:, :2] / uvw[:, 2:3]
        w, h = cam_sd["width"], cam_sd["height"]
        keep = (depth > 1.0) & (uv[:, 0] > 1) & (uv[:, 0] < w - 1) & (uv[:, 1] > 1) & (uv[:, 1] < h - 1)
        return uv, depth, keep


def points_in_box(glob: np.ndarray, ann: dict) -> np.ndarray:
    """Devkit points_in_box on global points (n, 3)."""
    r = quat_matrix(ann["rotation"])
    local = (glob - ann["translation"]) @ r
    w, l, h = ann["size"]
    return (np.abs(local[:, 0]) <= l / 2) & (np.abs(local[:, 1]) <= w / 2) & (np.abs(local[:, 2]) <= h / 2)


def surface_distance(glob: np.ndarray, ann: dict) -> np.ndarray:
    """(n,) unsigned distance of global points (n, 3) to the surface of an annotation box."""
    local = (glob - ann["translation"]) @ quat_matrix(ann["rotation"])
    w, l, h = ann["size"]
    q = np.abs(local) - np.array([l, w, h]) / 2
    return np.abs(np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0))


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Root:
    root = make_sample(tmp_path_factory.mktemp("synthetic") / "nuscenes", CONFIG)
    return Root(root, "v1.0-mini")


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def test_tables_have_nuscenes_fields_and_types(data: Root):
    for name, fields in SCHEMA.items():
        recs = data.t[name]
        assert recs, f"{name}.json is empty"
        for rec in recs:
            assert set(rec) == set(fields), (name, set(rec) ^ set(fields))
            for field, typ in fields.items():
                assert isinstance(rec[field], typ), (name, field, rec[field])
                if typ is int:
                    assert not isinstance(rec[field], bool)
            if name != "visibility":
                assert HEX32.match(rec["token"]), (name, rec["token"])
        assert len({r["token"] for r in recs}) == len(recs), f"duplicate tokens in {name}"
    for rec in data.t["ego_pose"] + data.t["calibrated_sensor"] + data.t["sample_annotation"]:
        assert len(rec["rotation"]) == 4 and abs(np.linalg.norm(rec["rotation"]) - 1) < 1e-9
        assert len(rec["translation"]) == 3 and all(isinstance(v, float) for v in rec["translation"])
    for cs in data.t["calibrated_sensor"]:
        k = cs["camera_intrinsic"]
        if data.channel[cs["token"]] == "LIDAR_TOP":
            assert k == []
        else:
            assert np.array(k).shape == (3, 3) and k[2] == [0.0, 0.0, 1.0]
    assert sorted(s["channel"] for s in data.t["sensor"]) == sorted(CAMERAS + ("LIDAR_TOP",))
    assert [v["token"] for v in data.t["visibility"]] == ["1", "2", "3", "4"]


def test_category_indices(data: Root):
    cats = sorted(data.t["category"], key=lambda c: c["index"])
    assert [c["index"] for c in cats] == list(range(32))
    assert [c["name"] for c in cats] == list(CATEGORY_NAMES)
    assert set(CLASS_COLOURS) == set(range(32))
    assert len(set(CLASS_COLOURS.values())) == 32, "class colours must be distinct"


def test_every_token_reference_resolves(data: Root):
    by = data.by

    def ok(table: str, token: str, empty: bool = False):
        assert (empty and token == "") or token in by[table], (table, token)

    for s in data.t["scene"]:
        ok("log", s["log_token"]), ok("sample", s["first_sample_token"]), ok("sample", s["last_sample_token"])
        chain, tok = [], s["first_sample_token"]
        while tok:
            chain.append(tok)
            tok = by["sample"][tok]["next"]
        assert chain[-1] == s["last_sample_token"] and len(chain) == s["nbr_samples"] == CONFIG.keyframes
        assert all(by["sample"][t]["scene_token"] == s["token"] for t in chain)
        ts = [by["sample"][t]["timestamp"] for t in chain]
        assert ts == sorted(ts) and len(set(ts)) == len(ts)
    for s in data.t["sample"]:
        ok("scene", s["scene_token"]), ok("sample", s["prev"], True), ok("sample", s["next"], True)
        if s["next"]:
            assert by["sample"][s["next"]]["prev"] == s["token"]
    for sd in data.t["sample_data"]:
        ok("sample", sd["sample_token"]), ok("ego_pose", sd["ego_pose_token"])
        ok("calibrated_sensor", sd["calibrated_sensor_token"])
        ok("sample_data", sd["prev"], True), ok("sample_data", sd["next"], True)
        assert by["ego_pose"][sd["ego_pose_token"]]["timestamp"] == sd["timestamp"]
    for cs in data.t["calibrated_sensor"]:
        ok("sensor", cs["sensor_token"])
    for ann in data.t["sample_annotation"]:
        ok("sample", ann["sample_token"]), ok("instance", ann["instance_token"])
        ok("visibility", ann["visibility_token"])
        ok("sample_annotation", ann["prev"], True), ok("sample_annotation", ann["next"], True)
        for a in ann["attribute_tokens"]:
            ok("attribute", a)
        assert all(v > 0 for v in ann["size"]) and ann["num_lidar_pts"] >= 0
    for inst in data.t["instance"]:
        ok("category", inst["category_token"])
        chain, tok = [], inst["first_annotation_token"]
        while tok:
            assert by["sample_annotation"][tok]["instance_token"] == inst["token"]
            chain.append(tok)
            tok = by["sample_annotation"][tok]["next"]
        assert chain[-1] == inst["last_annotation_token"] and len(chain) == inst["nbr_annotations"]
    for seg in data.t["lidarseg"]:
        ok("sample_data", seg["sample_data_token"])
        assert seg["filename"] == f"lidarseg/v1.0-mini/{seg['sample_data_token']}_lidarseg.bin"
    for m in data.t["map"]:
        for t in m["log_tokens"]:
            ok("log", t)
        assert (data.root / m["filename"]).is_file()
    # every keyframe LIDAR_TOP has exactly one lidarseg record
    key_lidar = {sd["token"] for sd in data.t["sample_data"]
                 if sd["is_key_frame"] and data.sd_channel(sd) == "LIDAR_TOP"}
    assert key_lidar == {seg["sample_data_token"] for seg in data.t["lidarseg"]}


def test_versions_and_scene_names(data: Root):
    names = [s["name"] for s in data.t["scene"]]
    assert names == ["scene-0061", "scene-0103"]
    assert [splits.scene_split("v1.0-mini", n) for n in names] == ["train", "val"]
    version, big = scene_names(20)
    assert version == "v1.0-trainval" and len(set(big)) == 20
    split = [splits.scene_split(version, n) for n in big]
    assert split.count("train") == 16 and split.count("val") == 4
    assert scene_names(10)[0] == "v1.0-mini"


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def test_files_exist_and_decode(data: Root):
    for sd in data.t["sample_data"]:
        path = data.root / sd["filename"]
        assert path.is_file(), sd["filename"]
        ch = data.sd_channel(sd)
        assert f"__{ch}__{sd['timestamp']}." in path.name
        if ch == "LIDAR_TOP":
            assert sd["fileformat"] == "pcd" and (sd["width"], sd["height"]) == (0, 0)
            assert sd["filename"].startswith("samples/" if sd["is_key_frame"] else "sweeps/")
            assert path.stat().st_size % 20 == 0 and path.stat().st_size > 0
            pts = data.points(sd)
            assert np.isfinite(pts).all()
            assert set(np.unique(pts[:, 4])) <= set(range(CONFIG.lidar_beams))
            assert pts[:, 3].min() >= 0 and pts[:, 3].max() <= 255
            rng = np.linalg.norm(pts[:, :3], axis=1)
            assert rng.max() < 70.5 and rng.min() > 0.9
            assert len(pts) > 0.3 * CONFIG.lidar_beams * CONFIG.lidar_azimuth_steps
            if sd["is_key_frame"]:
                lab = data.labels(sd)
                assert len(lab) == len(pts)
                assert set(np.unique(lab)) <= set(range(1, 31)), "no noise / ego labels expected"
                for cls in (17, 24, 26, 27, 28, 30):
                    assert (lab == cls).sum() > 0, cls
        else:
            assert ch in CAMERAS and sd["is_key_frame"] and sd["fileformat"] == "jpg"
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert im.size == (CONFIG.image_width, CONFIG.image_height) == (sd["width"], sd["height"])
                im.load()


def test_ego_frame_points_avoid_the_ego(data: Root):
    for sd in data.t["sample_data"]:
        if data.sd_channel(sd) != "LIDAR_TOP":
            continue
        cs = data.by["calibrated_sensor"][sd["calibrated_sensor_token"]]
        ego = data.points(sd)[:, :3] @ quat_matrix(cs["rotation"]).T + cs["translation"]
        inside = (ego[:, 0] > -1.0) & (ego[:, 0] < 3.9) & (np.abs(ego[:, 1]) < 0.95) & (ego[:, 2] < 2.0)
        assert not inside.any()


def test_num_lidar_pts_matches_points_in_box(data: Root):
    checked = 0
    for ann in data.t["sample_annotation"]:
        sd = data.sample_sd(ann["sample_token"], "LIDAR_TOP")
        glob = data.lidar_to_global(sd, data.points(sd))
        inside = points_in_box(glob, ann)
        assert abs(int(inside.sum()) - ann["num_lidar_pts"]) <= 1
        if ann["num_lidar_pts"] >= 10:
            cat = data.by["category"][data.by["instance"][ann["instance_token"]]["category_token"]]
            assert np.mean(data.labels(sd)[inside] == cat["index"]) > 0.95
            checked += 1
    assert checked > 10


# ------------------------------------------------------------------------------------------------
# determinism and API
# ------------------------------------------------------------------------------------------------
def test_deterministic_given_seed(tmp_path: Path):
    a = all_files(make_sample(tmp_path / "a", SMALL))
    b = all_files(make_sample(tmp_path / "b", SMALL))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    c = all_files(make_sample(tmp_path / "c", replace(SMALL, seed=1)))
    assert a["v1.0-mini/sample_data.json"] != c["v1.0-mini/sample_data.json"]
    pcd_a = [v for k, v in a.items() if k.endswith(".pcd.bin")]
    pcd_c = [v for k, v in c.items() if k.endswith(".pcd.bin")]
    assert len(pcd_a) == len(pcd_c) == 4 and not set(pcd_a) & set(pcd_c)
    jpg_a = {v for k, v in a.items() if k.endswith(".jpg")}
    assert len(jpg_a) == 12 and not jpg_a & {v for k, v in c.items() if k.endswith(".jpg")}


def test_existing_output_and_bad_config(tmp_path: Path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("")
    with pytest.raises(FileExistsError):
        make_sample(tmp_path / "x", SMALL)
    with pytest.raises(ValueError):
        make_sample(tmp_path / "y", SampleConfig(sweeps=10))
    assert not (tmp_path / "y").exists()
    (tmp_path / "empty").mkdir()
    assert make_sample(tmp_path / "empty", replace(SMALL, image_width=32, image_height=18)) == tmp_path / "empty"


def test_trainval_version_for_many_scenes(tmp_path: Path):
    tiny = SampleConfig(scenes=11, keyframes=1, sweeps=0, image_width=32, image_height=18,
                        lidar_beams=4, lidar_azimuth_steps=32)
    root = make_sample(tmp_path / "tv", tiny)
    assert (root / "v1.0-trainval" / "scene.json").is_file() and not (root / "v1.0-mini").exists()
    names = [s["name"] for s in json.loads((root / "v1.0-trainval" / "scene.json").read_text())]
    split = [splits.scene_split("v1.0-trainval", n) for n in names]
    assert len(set(names)) == 11 and split.count("val") == 2 and split.count("train") == 9
    seg = json.loads((root / "v1.0-trainval" / "lidarseg.json").read_text())
    assert all(r["filename"].startswith("lidarseg/v1.0-trainval/") for r in seg)


# ------------------------------------------------------------------------------------------------
# lidar <-> camera consistency
# ------------------------------------------------------------------------------------------------
def _nearest_class(rgb: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Class whose colour direction is closest (cosine) to each pixel: shading only scales colour."""
    pal = np.array([CLASS_COLOURS[c] for c in classes], float)
    pal /= np.linalg.norm(pal, axis=1, keepdims=True)
    x = rgb.astype(float) + 1e-6
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return classes[np.argmax(x @ pal.T, axis=1)]


def _visible(uv: np.ndarray, depth: np.ndarray, w: int, h: int, cell: int = 4) -> np.ndarray:
    """Point z-buffer: a point is visible if nothing projected within ~1 cell is much nearer."""
    gx, gy = (uv[:, 0] // cell).astype(int), (uv[:, 1] // cell).astype(int)
    nx, ny = w // cell + 1, h // cell + 1
    zbuf = np.full((ny + 2, nx + 2), np.inf)
    np.minimum.at(zbuf, (gy + 1, gx + 1), depth)
    near = np.full_like(zbuf, np.inf)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near[1:-1, 1:-1] = np.minimum(near[1:-1, 1:-1], zbuf[1 + dy:ny + 1 + dy, 1 + dx:nx + 1 + dx])
    return depth <= near[gy + 1, gx + 1] * 1.05 + 0.3


def test_lidar_labels_match_image_colours(data: Root):
    per_class: dict[int, list[int]] = {}
    for sample in data.t["sample"]:
        lidar = data.sample_sd(sample["token"], "LIDAR_TOP")
        pts, lab = data.points(lidar), data.labels(lidar)
        glob = data.lidar_to_global(lidar, pts)
        present = np.unique(lab)
        for cam in CAMERAS:
            sd = data.sample_sd(sample["token"], cam)
            lidar_ep = data.by["ego_pose"][lidar["ego_pose_token"]]
            cam_ep = data.by["ego_pose"][sd["ego_pose_token"]]
            dt = abs(sd["timestamp"] - lidar["timestamp"])
            assert 0 < dt < 60000  # cameras fire as the lidar sweeps past them
            moved = np.linalg.norm(np.subtract(cam_ep["translation"], lidar_ep["translation"]))
            assert moved > 0.05 or dt < 20000  # the ego moves 5-10 m/s: own pose per sample_data
            uv, depth, keep = data.project(sd, glob)
            idx = np.flatnonzero(keep)
            vis = idx[_visible(uv[idx], depth[idx], sd["width"], sd["height"])]
            img = np.asarray(Image.open(data.root / sd["filename"]).convert("RGB"))
            px = np.rint(uv[vis]).astype(int)
            got = _nearest_class(img[px[:, 1], px[:, 0]], present)
            for c in np.unique(lab[vis]):
                m = lab[vis] == c
                per_class.setdefault(int(c), [0, 0])
                per_class[int(c)][0] += int((got[m] == c).sum())
                per_class[int(c)][1] += int(m.sum())
    for c in (17, 24, 26, 27, 28, 30):  # car, road, sidewalk, terrain, manmade, vegetation
        good, total = per_class[c]
        assert total > 200, (c, total)
        assert good / total > 0.8, (c, good / total, per_class)
    good = sum(v[0] for v in per_class.values())
    total = sum(v[1] for v in per_class.values())
    assert good / total > 0.85


# ------------------------------------------------------------------------------------------------
# sweeps and motion
# ------------------------------------------------------------------------------------------------
def test_sweep_chains(data: Root):
    for scene in data.t["scene"]:
        samples = []
        tok = scene["first_sample_token"]
        while tok:
            samples.append(tok)
            tok = data.by["sample"][tok]["next"]
        for ch in CAMERAS + ("LIDAR_TOP",):
            recs = [sd for sd in data.t["sample_data"] if data.sd_channel(sd) == ch
                    and data.by["sample"][sd["sample_token"]]["scene_token"] == scene["token"]]
            heads = [sd for sd in recs if sd["prev"] == ""]
            assert len(heads) == 1
            chain, sd = [], heads[0]
            while True:
                chain.append(sd)
                if not sd["next"]:
                    break
                sd = data.by["sample_data"][sd["next"]]
                assert data.by["sample_data"][sd["prev"]] is chain[-1]
            assert len(chain) == len(recs)
            ts = [sd["timestamp"] for sd in chain]
            assert all(a < b for a, b in zip(ts, ts[1:]))
            keys = [sd for sd in chain if sd["is_key_frame"]]
            assert [sd["sample_token"] for sd in keys] == samples
            if ch != "LIDAR_TOP":
                assert len(chain) == len(samples)
                continue
            assert len(chain) == len(samples) * (1 + CONFIG.sweeps)
            for k, key in enumerate(keys):  # the `sweeps` records before a keyframe belong to it
                before = chain[chain.index(key) - CONFIG.sweeps:chain.index(key)]
                assert all(not sd["is_key_frame"] for sd in before)
                assert all(sd["sample_token"] == key["sample_token"] for sd in before)
                gaps = np.diff([sd["timestamp"] for sd in before + [key]])
                assert np.all(np.abs(gaps - 50000) < 1000)
                assert data.by["sample"][key["sample_token"]]["timestamp"] == key["timestamp"]


def test_moving_objects_move_between_sweeps(data: Root):
    moving = next(a["token"] for a in data.t["attribute"] if a["name"] == "vehicle.moving")
    parked = next(a["token"] for a in data.t["attribute"] if a["name"] == "vehicle.parked")
    for ann in data.t["sample_annotation"]:
        if parked in ann["attribute_tokens"] and ann["next"]:
            nxt = data.by["sample_annotation"][ann["next"]]
            assert np.allclose(ann["translation"], nxt["translation"], atol=1e-3)
    gains = []
    for ann in data.t["sample_annotation"]:
        if moving not in ann["attribute_tokens"] or ann["num_lidar_pts"] < 30 or not ann["next"]:
            continue
        nxt = data.by["sample_annotation"][ann["next"]]
        t0 = data.by["sample"][ann["sample_token"]]["timestamp"]
        t1 = data.by["sample"][nxt["sample_token"]]["timestamp"]
        vel = (np.array(nxt["translation"]) - ann["translation"]) / ((t1 - t0) / 1e6)
        assert 3.0 < np.linalg.norm(vel[:2]) < 20.0
        key = data.sample_sd(ann["sample_token"], "LIDAR_TOP")
        sweep = data.by["sample_data"][key["prev"]]
        while sweep["prev"] and not data.by["sample_data"][sweep["prev"]]["is_key_frame"]:
            sweep = data.by["sample_data"][sweep["prev"]]  # earliest sweep of this keyframe
        assert not sweep["is_key_frame"] and sweep["sample_token"] == ann["sample_token"]
        dt = (sweep["timestamp"] - key["timestamp"]) / 1e6
        glob = data.lidar_to_global(sweep, data.points(sweep))
        expect = vel * dt  # displacement from keyframe time to sweep time (constant velocity)
        moved = dict(ann, translation=list(np.array(ann["translation"]) + expect))
        w, l, h = ann["size"]
        region = dict(ann, size=[w, l + 2 * np.linalg.norm(expect) + 1.0, h])  # long enough either way
        in_region, in_moved = points_in_box(glob, region), points_in_box(glob, moved)
        if in_region.sum() < 20:  # hidden at sweep time
            continue
        assert in_moved.sum() >= 0.95 * in_region.sum()
        d_moved = np.median(surface_distance(glob[in_region], moved))
        d_key = np.median(surface_distance(glob[in_region], ann))
        assert d_moved < 0.1  # sweep points lie on the box moved to the sweep's time
        gains.append(d_key - d_moved)  # and off the keyframe-time box unless seen side-on
    assert len(gains) >= 2 and sum(g > 0.3 for g in gains) >= 2, gains
