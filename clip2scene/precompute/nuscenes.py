"""nuScenes reader from the official JSON tables (no nuscenes-devkit needed).

Reads `<dataroot>/<version>/*.json`, and yields one `Keyframe` per sample: the LIDAR_TOP file
with its calibration and ego pose, the six cameras (file, intrinsics, calibration, ego pose at
the camera's own timestamp), up to K-1 previous lidar sweeps found through `sample_data.prev`
(only those whose files exist), the lidarseg label file, the scene name and its official split.

    ds = NuScenes("/data/nuscenes", "v1.0-mini")
    for kf in ds.keyframes(split="train", sweeps=3):
        points = load_points(kf.lidar.path)            # (N, 5) float32
        labels = ds.load_labels(kf, len(points))       # (N,) uint8, 16 classes + 0 ignore

Fine lidarseg labels map to the 16 challenge classes by category name, via category.json's
`index` (method.md section 6).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip2scene.classes import NUSCENES_CLASSES
from clip2scene.errors import DataError
from clip2scene.precompute.dataset import ScanRef, View
from clip2scene.precompute.geometry import Pose, project_points, sensor_to_sensor
from clip2scene.precompute.splits import scene_split

log = logging.getLogger(__name__)

CAMERAS: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT",
)
LIDAR = "LIDAR_TOP"
TABLES = ("category", "sensor", "calibrated_sensor", "ego_pose", "sample", "sample_data", "scene", "log")

# Fine category name -> evaluation class name (nuScenes-lidarseg challenge); absent = ignore (0).
FINE_TO_COARSE: dict[str, str] = {
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "movable_object.barrier": "barrier",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction vehicle",
    "vehicle.motorcycle": "motorcycle",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
    "flat.driveable_surface": "driveable surface",
    "flat.other": "other_flat",
    "flat.sidewalk": "sidewalk",
    "flat.terrain": "terrain",
    "static.manmade": "manmade",
    "static.vegetation": "vegetation",
}


@dataclass(frozen=True)
class LidarFrame:
    """One LIDAR_TOP sample_data record: file, sensor->ego calibration, ego->global pose."""

    token: str
    path: Path
    timestamp: int  # microseconds
    calib: Pose
    ego: Pose


@dataclass(frozen=True)
class CameraFrame:
    """One camera image of a keyframe, with everything the projection needs."""

    channel: str
    token: str
    path: Path
    timestamp: int  # microseconds
    width: int
    height: int
    intrinsic: np.ndarray  # (3, 3) float64
    calib: Pose
    ego: Pose


@dataclass(frozen=True)
class Keyframe:
    """A nuScenes sample with its lidar scan, six cameras, previous sweeps and labels."""

    sample_token: str
    scene: str
    split: str
    timestamp: int
    lidar: LidarFrame
    cameras: tuple[CameraFrame, ...]  # in CAMERAS order
    sweeps: tuple[LidarFrame, ...]  # previous lidar sweeps, most recent first
    lidarseg: Path | None  # uint8 fine label file, or None when the version has no lidarseg


def load_points(path: Path) -> np.ndarray:
    """Read a nuScenes .pcd.bin: (N, 5) float32 [x, y, z, intensity, ring]."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"lidar file not found: {path}") from None
    if len(raw) % 20 != 0:
        raise DataError(f"{path}: size {len(raw)} bytes is not a multiple of 20 (float32 x 5 per point)")
    return np.frombuffer(raw, dtype=np.float32).reshape(-1, 5).copy()


def _load_table(root: Path, name: str, required: bool = True) -> list[dict]:
    path = root / f"{name}.json"
    if not path.is_file():
        if required:
            raise DataError(f"missing nuScenes table: {path}")
        return []
    try:
        with path.open() as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return data


class NuScenes:
    """Index over the nuScenes tables of one version under a dataroot."""

    name = "nuscenes"
    cameras = CAMERAS
    point_features = ("intensity",)
    voxel_size = 0.1

    def __init__(self, dataroot: str | Path, version: str = "v1.0-trainval"):
        self.dataroot = Path(dataroot)
        self.version = version
        if not self.dataroot.is_dir():
            raise DataError(f"dataroot not found: {self.dataroot}")
        table_dir = self.dataroot / version
        if not table_dir.is_dir():
            raise DataError(f"no table folder for version {version!r}: {table_dir}")
        t = {name: _load_table(table_dir, name) for name in TABLES}
        t["lidarseg"] = _load_table(table_dir, "lidarseg", required=False)
        self._by_token = {name: {r["token"]: r for r in recs} for name, recs in t.items()}
        self.scenes = sorted(t["scene"], key=lambda r: r["name"])
        self.categories = t["category"]
        self.label_map = self._build_label_map(table_dir)

        # sample_token -> channel -> keyframe sample_data record
        self._key_data: dict[str, dict[str, dict]] = {}
        for sd in t["sample_data"]:
            if not sd.get("is_key_frame"):
                continue
            channel = self._channel(sd)
            self._key_data.setdefault(sd["sample_token"], {})[channel] = sd
        self._lidarseg_by_sd = {r["sample_data_token"]: r["filename"] for r in t["lidarseg"]}

    # -- tables -----------------------------------------------------------------------------
    def get(self, table: str, token: str) -> dict:
        """Record of `table` with `token`; DataError names both when missing."""
        try:
            return self._by_token[table][token]
        except KeyError:
            raise DataError(f"{self.dataroot / self.version / (table + '.json')}: no record with token {token!r}") from None

    def _channel(self, sd: dict) -> str:
        cs = self.get("calibrated_sensor", sd["calibrated_sensor_token"])
        return self.get("sensor", cs["sensor_token"])["channel"]

    def _build_label_map(self, table_dir: Path) -> np.ndarray:
        """(256,) uint8 lookup: fine category index -> 1..16 evaluation class, 0 = ignore."""
        lut = np.zeros(256, dtype=np.uint8)
        for cat in self.categories:
            if "index" not in cat:
                raise DataError(f"{table_dir / 'category.json'}: category {cat.get('name')!r} has no 'index' (lidarseg needs it)")
            coarse = FINE_TO_COARSE.get(cat["name"])
            if coarse is not None:
                lut[int(cat["index"])] = NUSCENES_CLASSES.index(coarse) + 1
        return lut

    # -- frames -----------------------------------------------------------------------------
    def _lidar_frame(self, sd: dict) -> LidarFrame:
        what = f"sample_data {sd['token']}"
        return LidarFrame(
            token=sd["token"],
            path=self.dataroot / sd["filename"],
            timestamp=int(sd["timestamp"]),
            calib=Pose.from_record(self.get("calibrated_sensor", sd["calibrated_sensor_token"]), what + " calibration"),
            ego=Pose.from_record(self.get("ego_pose", sd["ego_pose_token"]), what + " ego pose"),
        )

    def _camera_frame(self, channel: str, sd: dict) -> CameraFrame:
        cs = self.get("calibrated_sensor", sd["calibrated_sensor_token"])
        what = f"{channel} sample_data {sd['token']}"
        k = np.asarray(cs.get("camera_intrinsic") or [], dtype=np.float64)
        if k.shape != (3, 3) or not np.all(np.isfinite(k)):
            raise DataError(f"{what}: camera_intrinsic {cs.get('camera_intrinsic')!r} is not a finite 3x3 matrix")
        return CameraFrame(
            channel=channel,
            token=sd["token"],
            path=self.dataroot / sd["filename"],
            timestamp=int(sd["timestamp"]),
            width=int(sd["width"]),
            height=int(sd["height"]),
            intrinsic=k,
            calib=Pose.from_record(cs, what + " calibration"),
            ego=Pose.from_record(self.get("ego_pose", sd["ego_pose_token"]), what + " ego pose"),
        )

    def _sweeps(self, lidar_sd: dict, count: int) -> tuple[LidarFrame, ...]:
        out = []
        token = lidar_sd.get("prev", "")
        while token and len(out) < count:
            sd = self._by_token["sample_data"].get(token)
            if sd is None:
                break
            frame = self._lidar_frame(sd)
            if not frame.path.is_file():
                log.debug("sweep file missing, stopping the sweep chain: %s", frame.path)
                break
            out.append(frame)
            token = sd.get("prev", "")
        return tuple(out)

    def keyframes(self, split: str | None = None, sweeps: int = 1) -> list[Keyframe]:
        """All keyframes (scene order, then time), optionally of one split ('train', 'val', ...).

        sweeps: K = total lidar frames per keyframe (the keyframe + up to K-1 previous sweeps).
        """
        out = []
        for scene in self.scenes:
            scene_split_name = scene_split(self.version, scene["name"])
            if split is not None and scene_split_name != split:
                continue
            token = scene["first_sample_token"]
            while token:
                sample = self.get("sample", token)
                data = self._key_data.get(token, {})
                if LIDAR not in data:
                    raise DataError(f"sample {token} of {scene['name']} has no LIDAR_TOP keyframe in sample_data.json")
                missing = [c for c in CAMERAS if c not in data]
                if missing:
                    raise DataError(f"sample {token} of {scene['name']} has no keyframe image for {', '.join(missing)}")
                lidar_sd = data[LIDAR]
                seg = self._lidarseg_by_sd.get(lidar_sd["token"])
                out.append(
                    Keyframe(
                        sample_token=token,
                        scene=scene["name"],
                        split=scene_split_name,
                        timestamp=int(sample["timestamp"]),
                        lidar=self._lidar_frame(lidar_sd),
                        cameras=tuple(self._camera_frame(c, data[c]) for c in CAMERAS),
                        sweeps=self._sweeps(lidar_sd, max(sweeps - 1, 0)),
                        lidarseg=self.dataroot / seg if seg else None,
                    )
                )
                token = sample.get("next", "")
        return out

    @property
    def has_labels(self) -> bool:
        """True when the version has lidarseg labels."""
        return bool(self._lidarseg_by_sd)

    def load_labels(self, keyframe: Keyframe, num_points: int) -> np.ndarray:
        """(num_points,) uint8 evaluation labels (0 = ignore) of the keyframe's lidar points."""
        if keyframe.lidarseg is None:
            raise DataError(f"no lidarseg record for lidar sample_data {keyframe.lidar.token}")
        try:
            fine = np.fromfile(keyframe.lidarseg, dtype=np.uint8)
        except FileNotFoundError:
            raise DataError(f"lidarseg file not found: {keyframe.lidarseg}") from None
        if fine.shape[0] != num_points:
            raise DataError(f"{keyframe.lidarseg}: {fine.shape[0]} labels for {num_points} points in {keyframe.lidar.path}")
        return self.label_map[fine]

    # -- the precompute.dataset.Dataset protocol ------------------------------------------------
    def scans(self, split: str | None = None, sweeps: int = 1) -> list[ScanRef]:
        """Keyframes as ScanRefs (native = the Keyframe)."""
        return [ScanRef(token=kf.sample_token, scene=kf.scene, split=kf.split, timestamp=kf.timestamp,
                        lidar_path=str(kf.lidar.path.relative_to(self.dataroot)), native=kf)
                for kf in self.keyframes(split=split, sweeps=sweeps)]

    def points(self, scan: ScanRef) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """xyz (n, 3) float32 keyframe lidar frame, intensity / 255 (n, 1) float32 in 0..1, sweep (n,) uint8, n_key."""
        xyzi, sweep, n_key = merged_points(scan.native)
        return np.ascontiguousarray(xyzi[:, :3]), xyzi[:, 3:4] / np.float32(255.0), sweep, n_key

    def labels(self, scan: ScanRef, n_key: int) -> np.ndarray:
        return self.load_labels(scan.native, n_key)

    def views(self, scan: ScanRef) -> list[View]:
        return [View(c.channel, c.path, c.width, c.height) for c in scan.native.cameras]

    def project(self, scan: ScanRef, view: int, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Devkit-exact projection of keyframe-lidar points into camera `view` (see geometry)."""
        kf = scan.native
        cam = kf.cameras[view]
        uv, _, vis = project_points(xyz, kf.lidar.calib, kf.lidar.ego, cam.ego, cam.calib, cam.intrinsic,
                                    cam.width, cam.height)
        return uv, vis


def merged_points(kf: Keyframe) -> tuple[np.ndarray, np.ndarray, int]:
    """Keyframe + previous sweeps in the keyframe lidar frame.

    Returns xyzi (n, 4) float32, sweep (n,) uint8 (0 = keyframe) and the keyframe point count.
    """
    key = load_points(kf.lidar.path)
    if len(key) == 0:
        raise DataError(f"{kf.lidar.path}: scan has no points")
    parts, sweep_ids = [key[:, :4]], [np.zeros(len(key), np.uint8)]
    for j, sw in enumerate(kf.sweeps, start=1):
        pts = load_points(sw.path)
        xyz = sensor_to_sensor(pts[:, :3], sw.calib, sw.ego, kf.lidar.ego, kf.lidar.calib)
        parts.append(np.concatenate([xyz, pts[:, 3:4]], axis=1))
        sweep_ids.append(np.full(len(pts), j, np.uint8))
    return np.concatenate(parts).astype(np.float32), np.concatenate(sweep_ids), len(key)
