"""nuScenes reader from the official JSON tables (no nuscenes-devkit needed).

Reads `<dataroot>/<version>/*.json`, and yields one `Keyframe` per sample: the LIDAR_TOP file
with its calibration and ego pose, the six cameras (file, intrinsics, calibration, ego pose at
the camera's own timestamp), up to K-1 previous lidar sweeps found through `sample_data.prev`
(only those whose files exist), the lidarseg label file, the scene name and its official split.

    ds = NuScenes("/data/nuscenes", "v1.0-mini")
    for kf in ds.keyframes(split="train", sweeps=3):
        points = load_points(kf.lidar.path)            # (N, 5) float32
        labels = ds.load_labels(kf, len(points))       # (N,) uint8, 16 classes + 0 ignore

Bad records fail per sample, not at open: `keyframes()` lists every sample of the scene chains,
and a keyframe's frames (`lidar`, `cameras`, `sweeps`) are built and validated on first access
(or by `Keyframe.check()` / `NuScenes.check(scan)`), raising DataError that names the sample
token and the record, file or missing channel: NaN/inf or non-unit rotations in calibrated_sensor
/ ego_pose, a bad camera_intrinsic, a missing LIDAR_TOP or camera keyframe, a token that resolves
to no record. `load_points` rejects empty scans and NaN/inf values, naming the file.

Fine lidarseg labels map to the 16 challenge classes by category name, via category.json's
`index` (method.md section 6).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from clip2scene.classes import FINE_TO_COARSE, NUSCENES_CLASSES
from clip2scene.errors import DataError
from clip2scene.precompute.datasets.base import ScanRef, View
from clip2scene.precompute.datasets.geometry import Pose, camera_matrix, project_points, sensor_to_sensor
from clip2scene.precompute.datasets.points import read_labels, read_points
from clip2scene.precompute.datasets.splits import scene_split

log = logging.getLogger(__name__)

CAMERAS: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT",
)
LIDAR = "LIDAR_TOP"
TABLES = ("category", "sensor", "calibrated_sensor", "ego_pose", "sample", "sample_data", "scene", "log")

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


@dataclass(frozen=True, eq=False)
class Keyframe:
    """A nuScenes sample with its lidar scan, six cameras, previous sweeps and labels.

    `lidar`, `cameras` (in CAMERAS order) and `sweeps` (previous lidar sweeps, most recent first)
    are built from the reader's tables on first access and cached; a bad or missing record raises
    DataError naming this sample's token, so only the samples that use it fail. `check()` builds
    all three at once.
    """

    sample_token: str
    scene: str
    split: str
    timestamp: int
    lidarseg: Path | None  # uint8 fine label file, or None when the version has no lidarseg
    lidar_file: str = ""  # keyframe LIDAR_TOP file relative to the dataroot ("" when the sample has none)
    num_sweeps: int = 0  # previous sweeps wanted (K - 1); `sweeps` stops early where a file is missing
    reader: NuScenes | None = field(default=None, repr=False)

    @cached_property
    def lidar(self) -> LidarFrame:
        return self._reader()._keyframe_lidar(self)

    @cached_property
    def cameras(self) -> tuple[CameraFrame, ...]:
        return self._reader()._keyframe_cameras(self)

    @cached_property
    def sweeps(self) -> tuple[LidarFrame, ...]:
        return self._reader()._keyframe_sweeps(self)

    def check(self) -> Keyframe:
        """Build and validate every frame of the sample now; DataError naming the sample if bad."""
        self.lidar, self.cameras, self.sweeps  # noqa: B018  (first access builds and validates)
        return self

    def _reader(self) -> NuScenes:
        if self.reader is None:
            raise RuntimeError(f"Keyframe {self.sample_token} was made without its NuScenes reader")
        return self.reader


def load_points(path: Path) -> np.ndarray:
    """Read a nuScenes .pcd.bin: (N, 5) float32 [x, y, z, intensity, ring] (checks: `read_points`)."""
    return read_points(path, 5)


def _load_table(root: Path, name: str, required: bool = True) -> list[dict]:
    path = root / f"{name}.json"
    if not path.is_file():
        if required:
            raise DataError(f"missing nuScenes table: {path}")
        return []
    return list(iter_table(path))


_WS = re.compile(r"[ \t\n\r]*")
_CHUNK = 1 << 24  # characters read at a time by iter_table


def _json_error(path: Path) -> DataError:
    """The DataError of a table that does not stream as a list of records (parsed whole, once,
    to name the line; error path only)."""
    try:
        with path.open() as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        return DataError(f"{path}: not valid JSON ({e.msg.rstrip(': ')}: line {e.lineno} column {e.colno})")
    if not isinstance(data, list):
        return DataError(f"{path}: expected a JSON list of records")
    return DataError(f"{path}: expected a JSON list of records (objects)")


def iter_table(path: Path, on_read=None) -> Iterator[dict]:
    """Stream the records of a JSON list-of-objects table without holding the whole file or its
    parsed form in memory (the trainval sample_data / ego_pose tables are ~2.6 million records
    each): the caller keeps only what it needs. DataError naming the file when it is not a valid
    JSON list of objects. `on_read(n)` is called with the characters read at each read (for a
    progress bar)."""
    dec = json.JSONDecoder()
    with path.open(encoding="utf-8") as f:
        read = f.read
        if on_read is not None:
            def read(n, _read=f.read):
                text = _read(n)
                on_read(len(text))
                return text
        buf, pos, eof = read(_CHUNK), 0, False
        pos = _WS.match(buf, pos).end()
        if pos >= len(buf) or buf[pos] != "[":
            raise _json_error(path)
        pos += 1
        first = True
        while True:
            pos = _WS.match(buf, pos).end()
            if pos >= len(buf) - 1 and not eof:  # keep at least one character past the whitespace
                more = read(_CHUNK)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            if pos >= len(buf):
                raise _json_error(path)  # unterminated list
            ch = buf[pos]
            if ch == "]":
                if _WS.match(buf, pos + 1).end() != len(buf) or (not eof and f.read(1).strip()):
                    raise _json_error(path)
                return
            if not first:
                if ch != ",":
                    raise _json_error(path)
                pos = _WS.match(buf, pos + 1).end()
            if pos < len(buf) and buf[pos] != "{":
                raise _json_error(path)
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    raise _json_error(path) from None
                more = read(max(_CHUNK, len(buf)))  # the record runs past the buffer: read on
                eof = not more
                buf, pos = buf[pos:] + more, 0
                if not first:  # the comma is consumed: parse the record next
                    buf = "," + buf
                continue
            first = False
            yield obj
            pos = end


# sample_data fields the reader uses (the others are dropped as the table streams in)
_SD_KEYS = ("token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "timestamp", "filename",
            "width", "height", "is_key_frame", "prev")


def _table_bar(path: Path) -> tqdm:
    """A bytes progress bar with ETA for streaming a big table; shown on a terminal only."""
    size = path.stat().st_size
    return tqdm(total=size, desc=f"reading {path.name}", unit="B", unit_scale=True, leave=False,
                disable=None if size > 50_000_000 else True)


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
            found = sorted(d.name for d in self.dataroot.iterdir() if d.is_dir() and (d / "sample.json").is_file())
            hint = (f"; this dataroot has {', '.join(found)}: pass --version {found[0]}" if found
                    else "; no folder here holds nuScenes tables (sample.json, ...)")
            raise DataError(f"no table folder for version {version!r}: {table_dir}{hint}")
        # Small tables whole; sample_data and ego_pose (millions of records at trainval size)
        # streamed, keeping only what scans use: keyframes of every channel, the LIDAR_TOP
        # sweeps their `prev` chains reach, and the ego poses of those (docs/scaling.md).
        t = {name: _load_table(table_dir, name) for name in TABLES if name not in ("sample_data", "ego_pose")}
        t["lidarseg"] = _load_table(table_dir, "lidarseg", required=False)
        self._by_token = {name: {r["token"]: r for r in recs} for name, recs in t.items()}
        self.scenes = sorted(t["scene"], key=lambda r: r["name"])
        self.categories = t["category"]
        self.label_map = self._build_label_map(table_dir)
        del t

        # sample_token -> channel -> keyframe sample_data record
        self._key_data: dict[str, dict[str, dict]] = {}
        # sample_token -> problems with its keyframe sample_data (raised when the sample is used)
        self._key_errors: dict[str, list[str]] = {}
        sample_data: dict[str, dict] = {}
        channels: dict = {}  # calibrated_sensor token -> channel, or the DataError resolving it
        path = table_dir / "sample_data.json"
        if not path.is_file():
            raise DataError(f"missing nuScenes table: {path}")
        bar = _table_bar(path)
        for sd in iter_table(path, bar.update):
            cs_token = sd.get("calibrated_sensor_token")
            try:
                channel = channels.get(cs_token) if isinstance(cs_token, str) else None
                if channel is None:
                    channel = self._channel(sd)
                    if isinstance(cs_token, str):
                        channels[cs_token] = channel
            except DataError as e:
                channel = e
            if not sd.get("is_key_frame"):
                if channel == LIDAR or isinstance(channel, DataError):  # a sweep (bad ones fail when used)
                    sample_data[sd.get("token")] = {k: sd[k] for k in _SD_KEYS if k in sd}
                continue
            sd = {k: sd[k] for k in _SD_KEYS if k in sd}
            sample_data[sd.get("token")] = sd
            if isinstance(channel, DataError):
                self._key_errors.setdefault(sd.get("sample_token"), []).append(
                    f"keyframe sample_data {sd.get('token')!r}: {channel}")
                continue
            self._key_data.setdefault(sd.get("sample_token"), {})[channel] = sd
        bar.close()
        self._by_token["sample_data"] = sample_data
        wanted = {sd.get("ego_pose_token") for sd in sample_data.values()}
        path = table_dir / "ego_pose.json"
        if not path.is_file():
            raise DataError(f"missing nuScenes table: {path}")
        with _table_bar(path) as bar:
            self._by_token["ego_pose"] = {r.get("token"): r for r in iter_table(path, bar.update)
                                          if r.get("token") in wanted}
        self._lidarseg_by_sd = {r["sample_data_token"]: r["filename"] for r in self._by_token.pop("lidarseg").values()}
        self._has_labels = bool(self._lidarseg_by_sd)
        log.info("%s %s: %d samples, %d of the sample_data records kept", self.dataroot, version,
                 len(self._by_token["sample"]), len(sample_data))

    def subset(self, scans: list[ScanRef]) -> tuple[NuScenes, list[ScanRef]]:
        """A reader holding only the records `scans` use (their keyframes' sample_data of every
        channel, the sweeps their `prev` chains reach, the ego poses, calibrations, sensors and
        lidarseg entries of those), and the scans re-pointed at it. This is a Dask task's
        payload: a few hundred records per block instead of the whole tables, so workers never
        load the tables and their memory is bounded by their own scans."""
        sub = NuScenes.__new__(NuScenes)
        sub.dataroot, sub.version, sub.categories = self.dataroot, self.version, self.categories
        sub.label_map = self.label_map
        tokens = {s.token for s in scans}
        sub.scenes = [sc for sc in self.scenes if sc["name"] in {s.scene for s in scans}]
        sub._key_data = {t: self._key_data[t] for t in tokens if t in self._key_data}
        sub._key_errors = {t: self._key_errors[t] for t in tokens if t in self._key_errors}
        sds: dict[str, dict] = {}
        all_sd = self._by_token["sample_data"]
        for s in scans:
            for sd in sub._key_data.get(s.token, {}).values():
                sds[sd.get("token")] = sd
            lidar = sub._key_data.get(s.token, {}).get(LIDAR)
            token, n = (lidar or {}).get("prev", ""), 0
            while token and n < s.native.num_sweeps and token in all_sd:
                sds[token] = all_sd[token]
                token, n = all_sd[token].get("prev", ""), n + 1
        cs = {sd.get("calibrated_sensor_token") for sd in sds.values()}
        egos = {sd.get("ego_pose_token") for sd in sds.values()}

        def pick(table: str, keys) -> dict:  # lookups only: a block's cost does not grow with the tables
            recs = self._by_token[table]
            return {k: recs[k] for k in keys if isinstance(k, str) and k in recs}

        cs_recs = pick("calibrated_sensor", cs)
        sub._by_token = dict(sample=pick("sample", tokens), sample_data=sds, calibrated_sensor=cs_recs,
                             sensor=pick("sensor", {r.get("sensor_token") for r in cs_recs.values()}),
                             ego_pose=pick("ego_pose", egos))
        for name in ("scene", "log", "category"):
            sub._by_token[name] = {}
        lidar_tokens = {d[LIDAR].get("token") for d in sub._key_data.values() if LIDAR in d}
        sub._lidarseg_by_sd = {k: self._lidarseg_by_sd[k] for k in lidar_tokens if k in self._lidarseg_by_sd}
        sub._has_labels = self._has_labels
        out = []
        for s in scans:
            kf = s.native
            native = Keyframe(sample_token=kf.sample_token, scene=kf.scene, split=kf.split, timestamp=kf.timestamp,
                              lidarseg=kf.lidarseg, lidar_file=kf.lidar_file, num_sweeps=kf.num_sweeps, reader=sub)
            out.append(ScanRef(token=s.token, scene=s.scene, split=s.split, timestamp=s.timestamp,
                               lidar_path=s.lidar_path, native=native))
        return sub, out

    # -- tables -----------------------------------------------------------------------------
    def table_path(self, table: str) -> Path:
        return self.dataroot / self.version / f"{table}.json"

    def get(self, table: str, token: str) -> dict:
        """Record of `table` with `token`; DataError names both when missing."""
        try:
            return self._by_token[table][token]
        except (KeyError, TypeError):
            raise DataError(f"{self.table_path(table)}: no record with token {token!r}") from None

    def _channel(self, sd: dict) -> str:
        cs = self.get("calibrated_sensor", sd.get("calibrated_sensor_token"))
        channel = self.get("sensor", cs.get("sensor_token")).get("channel")
        if not isinstance(channel, str):
            raise DataError(f"{self.table_path('sensor')}: record {cs.get('sensor_token')!r} has channel {channel!r}")
        return channel

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

    # -- frames (built per keyframe on first use; every check names the record) ----------------
    def _record(self, table: str, token, ctx: str) -> tuple[dict, str]:
        """(record, "<table file> record <token>") or DataError prefixed with `ctx`."""
        try:
            rec = self._by_token[table][token]
        except (KeyError, TypeError):
            raise DataError(f"{ctx}: {self.table_path(table)}: no record with token {token!r}") from None
        return rec, f"{ctx}: {self.table_path(table)} record {token!r}"

    def _sd_field(self, sd: dict, key: str, ctx: str, kind=str):
        """sd[key] converted by `kind`; DataError naming the sample_data record if absent or bad."""
        value = sd.get(key)
        try:
            if value is None:
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            raise DataError(f"{ctx}: {self.table_path('sample_data')} record {sd.get('token')!r} "
                            f"has {key} {value!r}") from None

    def _ego(self, sd: dict, ctx: str) -> Pose:
        rec, what = self._record("ego_pose", sd.get("ego_pose_token"), ctx)
        return Pose.from_record(rec, what)

    def _lidar_frame(self, sd: dict, ctx: str, role: str = "LIDAR_TOP") -> LidarFrame:
        ctx = f"{ctx}, {role} sample_data {sd.get('token')!r}"
        cs, what = self._record("calibrated_sensor", sd.get("calibrated_sensor_token"), ctx)
        k = cs.get("camera_intrinsic")
        if k:  # lidars store [] here; anything else must at least be finite
            arr = np.asarray(k, dtype=object).ravel()
            if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in arr):
                raise DataError(f"{what}: camera_intrinsic {k!r} has NaN/inf or non-numeric entries")
        return LidarFrame(
            token=self._sd_field(sd, "token", ctx),
            path=self.dataroot / self._sd_field(sd, "filename", ctx),
            timestamp=self._sd_field(sd, "timestamp", ctx, int),
            calib=Pose.from_record(cs, what),
            ego=self._ego(sd, ctx),
        )

    def _camera_frame(self, channel: str, sd: dict, ctx: str) -> CameraFrame:
        ctx = f"{ctx}, {channel} sample_data {sd.get('token')!r}"
        cs, what = self._record("calibrated_sensor", sd.get("calibrated_sensor_token"), ctx)
        width = self._sd_field(sd, "width", ctx, int)
        height = self._sd_field(sd, "height", ctx, int)
        if width <= 0 or height <= 0:
            raise DataError(f"{ctx}: {self.table_path('sample_data')} record {sd.get('token')!r} "
                            f"has image size {width}x{height}")
        return CameraFrame(
            channel=channel,
            token=self._sd_field(sd, "token", ctx),
            path=self.dataroot / self._sd_field(sd, "filename", ctx),
            timestamp=self._sd_field(sd, "timestamp", ctx, int),
            width=width,
            height=height,
            intrinsic=camera_matrix(cs.get("camera_intrinsic"), what),
            calib=Pose.from_record(cs, what),
            ego=self._ego(sd, ctx),
        )

    def _keyframe_sd(self, kf: Keyframe, channel: str) -> dict:
        """The sample's keyframe sample_data of `channel`; DataError naming sample and channel."""
        ctx = f"sample {kf.sample_token} of {kf.scene}"
        errors = self._key_errors.get(kf.sample_token)
        if errors:
            raise DataError(f"{ctx}: {errors[0]}")
        sd = self._key_data.get(kf.sample_token, {}).get(channel)
        if sd is None:
            raise DataError(f"{ctx}: no {channel} keyframe in {self.table_path('sample_data')}")
        return sd

    def _keyframe_lidar(self, kf: Keyframe) -> LidarFrame:
        return self._lidar_frame(self._keyframe_sd(kf, LIDAR), f"sample {kf.sample_token} of {kf.scene}")

    def _keyframe_cameras(self, kf: Keyframe) -> tuple[CameraFrame, ...]:
        ctx = f"sample {kf.sample_token} of {kf.scene}"
        return tuple(self._camera_frame(c, self._keyframe_sd(kf, c), ctx) for c in CAMERAS)

    def _keyframe_sweeps(self, kf: Keyframe) -> tuple[LidarFrame, ...]:
        """Up to kf.num_sweeps previous LIDAR_TOP frames through `prev`, stopping at a missing file."""
        ctx = f"sample {kf.sample_token} of {kf.scene}"
        out: list[LidarFrame] = []
        token = self._keyframe_sd(kf, LIDAR).get("prev", "")
        while token and len(out) < kf.num_sweeps:
            sd = self._by_token["sample_data"].get(token)
            if sd is None:
                break
            filename = sd.get("filename")
            if not isinstance(filename, str) or not (self.dataroot / filename).is_file():
                log.debug("sweep file missing, stopping the sweep chain: %s", filename)
                break
            out.append(self._lidar_frame(sd, ctx, "LIDAR_TOP sweep"))
            token = sd.get("prev", "")
        return tuple(out)

    def keyframes(self, split: str | None = None, sweeps: int = 1) -> list[Keyframe]:
        """All keyframes (scene order, then time), optionally of one split ('train', 'val', ...).

        sweeps: K = total lidar frames per keyframe (the keyframe + up to K-1 previous sweeps).
        Listing only walks the scene / sample chains; each keyframe's frames are validated when
        first used (DataError for that sample only), see `Keyframe`.
        """
        out = []
        for scene in self.scenes:
            scene_split_name = scene_split(self.version, scene["name"])
            if split is not None and scene_split_name != split:
                continue
            token = scene.get("first_sample_token", "")
            seen: set[str] = set()
            while token:
                if token in seen:
                    raise DataError(f"{self.table_path('sample')}: the next chain of {scene['name']} loops at sample {token}")
                seen.add(token)
                sample = self.get("sample", token)
                try:
                    timestamp = int(sample["timestamp"])
                except (KeyError, TypeError, ValueError):
                    raise DataError(f"{self.table_path('sample')}: record {token!r} has timestamp "
                                    f"{sample.get('timestamp')!r}") from None
                lidar_sd = self._key_data.get(token, {}).get(LIDAR, {})
                seg = self._lidarseg_by_sd.get(lidar_sd.get("token"))
                filename = lidar_sd.get("filename")
                out.append(
                    Keyframe(
                        sample_token=token,
                        scene=scene["name"],
                        split=scene_split_name,
                        timestamp=timestamp,
                        lidarseg=self.dataroot / seg if seg else None,
                        lidar_file=str(Path(filename)) if isinstance(filename, str) and filename else "",
                        num_sweeps=max(sweeps - 1, 0),
                        reader=self,
                    )
                )
                token = sample.get("next", "")
        return out

    @property
    def has_labels(self) -> bool:
        """True when the version has lidarseg labels."""
        return self._has_labels

    def load_labels(self, keyframe: Keyframe, num_points: int) -> np.ndarray:
        """(num_points,) uint8 evaluation labels (0 = ignore) of the keyframe's lidar points."""
        if keyframe.lidarseg is None:
            raise DataError(f"sample {keyframe.sample_token}: no lidarseg record for lidar sample_data {keyframe.lidar.token}")
        return self.label_map[read_labels(keyframe.lidarseg, "u1", num_points, keyframe.lidar.path)]

    # -- the precompute.datasets.base.Dataset protocol ------------------------------------------------
    def scans(self, split: str | None = None, sweeps: int = 1) -> list[ScanRef]:
        """Keyframes as ScanRefs (native = the Keyframe); bad samples are listed and fail when used."""
        return [ScanRef(token=kf.sample_token, scene=kf.scene, split=kf.split, timestamp=kf.timestamp,
                        lidar_path=kf.lidar_file, native=kf)
                for kf in self.keyframes(split=split, sweeps=sweeps)]

    def check(self, scan: ScanRef) -> None:
        """Validate every record the scan uses (lidar, six cameras, sweeps) without reading files;
        DataError naming the sample token and the bad record or missing channel."""
        scan.native.check()

    def points(self, scan: ScanRef) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """xyz (n, 3) float32 keyframe lidar frame, intensity / 255 (n, 1) float32 in 0..1, sweep (n,) uint8, n_key.

        Validates the whole sample first (`check`), so a sample with a bad camera record fails
        here whether or not a teacher will look at its images.
        """
        xyzi, sweep, n_key = merged_points(scan.native.check())
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
    DataError (naming the file or sample) for an empty or non-finite scan or a bad record.
    """
    key = load_points(kf.lidar.path)
    parts, sweep_ids = [key[:, :4]], [np.zeros(len(key), np.uint8)]
    for j, sw in enumerate(kf.sweeps, start=1):
        pts = load_points(sw.path)
        xyz = sensor_to_sensor(pts[:, :3], sw.calib, sw.ego, kf.lidar.ego, kf.lidar.calib)
        parts.append(np.concatenate([xyz, pts[:, 3:4]], axis=1))
        sweep_ids.append(np.full(len(pts), j, np.uint8))
    return np.concatenate(parts).astype(np.float32), np.concatenate(sweep_ids), len(key)
