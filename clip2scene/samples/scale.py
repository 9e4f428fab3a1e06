"""Metadata-scale dataroots: full-size dataset tables over a handful of real data files.

For measuring what the readers, the planner and the cache cost at full dataset size without
terabytes of sensor data (benchmarks/scale.py, docs/scaling.md), and for testing the sweep path
on real-format sweeps at trainval density (tests/precompute/test_scale_sweeps.py).

- `make_nuscenes_tables(out, NuScenesScale())`: `v1.0-trainval/` with the reader's tables
  (scene, sample, sample_data, ego_pose, calibrated_sensor, sensor, log, category, lidarseg) at
  trainval size by default: 850 scenes, 34,149 samples, 2,631,083 sample_data and as many
  ego_pose records, written in the official layout (`json.dump(..., indent=0)` style, tokens of
  32 hex digits, full-precision floats) so the JSON sizes are those of the real tables. Per
  scene: LIDAR_TOP at 20 Hz (`sweeps_per_interval` sweeps between keyframes, 0..K-1 sweeps
  before the first keyframe so some keyframes lack sweeps at scene starts), six cameras at
  12 Hz, five radars filling the rest; `prev`/`next` chains per channel; one ego pose per
  sample_data at its own timestamp on a smooth trajectory. Every file path points into a small
  pool of real files (`files` keyframe scans with their lidarseg labels, as many sweep scans,
  one 1600x900 JPEG per camera): .pcd.bin of 5 float32 per point, uint8 labels. The annotation
  tables (sample_annotation, instance, ...) are not written: no reader here opens them.
- `make_kitti_tree(out, KittiScale())`: `sequences/00..21` with the official scan counts
  (43,552 in all), real-format calib.txt / poses.txt / times.txt, and velodyne/labels/image_2
  entries that are symlinks to a few real files.
- `make_scannet_tree(out, ScanNetScale())`: 1,513 scene folders (official split-list sizes)
  symlinked to one real scene's files, plus the split lists.

Deterministic given the seed. Run: ``python -m clip2scene.samples.scale OUT [--scenes N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clip2scene.classes import NUSCENES_CATEGORIES
from clip2scene.precompute.datasets.nuscenes import CAMERAS, LIDAR
from clip2scene.precompute.datasets.splits import TRAIN, VAL

RADARS = ("RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT")
TRAINVAL_SAMPLES = 34_149
TRAINVAL_SAMPLE_DATA = 2_631_083
TRAINVAL_SCENES = 850
TRAINVAL_LOGS = 68


@dataclass(frozen=True)
class NuScenesScale:
    scenes: int = TRAINVAL_SCENES  # official trainval scene names, train first then val
    samples: int = TRAINVAL_SAMPLES  # keyframes in all (spread evenly over the scenes)
    sample_data: int | None = TRAINVAL_SAMPLE_DATA  # total records (radars fill up); None = no radars
    sweeps_per_interval: int = 9  # LIDAR_TOP sweeps between two keyframes (20 Hz lidar, 2 Hz keyframes)
    camera_hz: int = 12
    files: int = 4  # real keyframe scans (and as many sweep scans) the records point at
    points: int = 34_720  # points per real scan (nuScenes HDL-32E average)
    image_size: tuple[int, int] = (1600, 900)  # (W, H) of the real camera JPEGs
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.scenes <= len(TRAIN) + len(VAL):
            raise ValueError(f"scenes must be 1..{len(TRAIN) + len(VAL)}, got {self.scenes}")
        if self.samples < self.scenes:
            raise ValueError(f"samples ({self.samples}) must be at least one per scene ({self.scenes})")
        if self.files < 1 or self.points < 1 or self.sweeps_per_interval < 0:
            raise ValueError("files and points must be >= 1, sweeps_per_interval >= 0")


def _token(*parts) -> str:
    return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()


def _quat_z(yaw: float) -> list[float]:
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def _sd_text(r: dict) -> str:  # one sample_data record exactly as json.dumps(indent=0) writes it
    return ('{\n"token": "%s",\n"sample_token": "%s",\n"ego_pose_token": "%s",\n"calibrated_sensor_token": "%s",\n'
            '"timestamp": %d,\n"fileformat": "%s",\n"is_key_frame": %s,\n"height": %d,\n"width": %d,\n'
            '"filename": "%s",\n"prev": "%s",\n"next": "%s"\n}') % (
        r["token"], r["sample_token"], r["ego_pose_token"], r["calibrated_sensor_token"], r["timestamp"],
        r["fileformat"], "true" if r["is_key_frame"] else "false", r["height"], r["width"], r["filename"],
        r["prev"], r["next"])


def _pose_text(token: str, ts: int, rot: list[float], trans: list[float]) -> str:
    return '{\n"token": "%s",\n"timestamp": %d,\n"rotation": [\n%s\n],\n"translation": [\n%s\n]\n}' % (
        token, ts, ",\n".join(repr(v) for v in rot), ",\n".join(repr(v) for v in trans))


def ego_pose_at(scene: int, t_us: int, t0_us: int) -> tuple[list[float], list[float]]:
    """Ego pose (quaternion wxyz, translation) of scene `scene` at time t: a smooth curve at ~8 m/s."""
    t = (t_us - t0_us) / 1e6
    yaw = 0.3 * np.sin(0.15 * t + scene) + 0.01 * scene
    x = 600.0 + 8.0 * t * np.cos(0.01 * scene) + 3.0 * np.sin(0.3 * t)
    y = 1600.0 + 8.0 * t * np.sin(0.01 * scene) + 2.0 * np.cos(0.2 * t)
    return _quat_z(yaw), [float(x), float(y), 0.0]


class _ListWriter:
    """Writes a JSON list record by record (indent=0 layout)."""

    def __init__(self, path: Path):
        self.f = path.open("w")
        self.f.write("[\n")
        self.first = True

    def add(self, text: str) -> None:
        self.f.write(text if self.first else ",\n" + text)
        self.first = False

    def close(self) -> None:
        self.f.write("\n]")
        self.f.close()


def _real_files(root: Path, config: NuScenesScale) -> tuple[list[str], list[str], list[str], dict[str, str]]:
    """The pool of real files: keyframe scans, their lidarseg labels, sweep scans, one JPEG per camera."""
    rng = np.random.default_rng(config.seed)
    keys, segs, sweeps = [], [], []
    for kind, names in (("samples", keys), ("sweeps", sweeps)):
        folder = root / kind / LIDAR
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(config.files):
            n = config.points
            r = rng.uniform(2.0, 60.0, n)
            az = rng.uniform(-np.pi, np.pi, n)
            z = rng.uniform(-1.8, 2.0, n)
            pts = np.stack([r * np.cos(az), r * np.sin(az), z, rng.integers(0, 256, n).astype(np.float64),
                            rng.integers(0, 32, n).astype(np.float64)], axis=1).astype(np.float32)
            name = f"{kind}/{LIDAR}/scale-{i:03d}__{LIDAR}.pcd.bin"
            pts.tofile(root / name)
            names.append(name)
            if kind == "samples":
                seg = f"lidarseg/v1.0-trainval/scale-{i:03d}_lidarseg.bin"
                (root / seg).parent.mkdir(parents=True, exist_ok=True)
                rng.integers(1, 31, n).astype(np.uint8).tofile(root / seg)
                segs.append(seg)
    images = {}
    w, h = config.image_size
    for c, cam in enumerate(CAMERAS):
        name = f"samples/{cam}/scale-000__{cam}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (40 * c, 120, 200 - 30 * c)).save(root / name, quality=80)
        images[cam] = name
    return keys, segs, sweeps, images


def _calibrations(scene: int) -> dict[str, dict]:
    """calibrated_sensor records of one scene (devkit-like extrinsics; cameras with intrinsics)."""
    out = {}
    out[LIDAR] = dict(translation=[0.943713, 0.0, 1.84023], rotation=[0.7077955119163518, -0.006492242056004365,
                      0.010646214713995808, -0.7063073142877817], camera_intrinsic=[])
    for c, cam in enumerate(CAMERAS):
        yaw = -np.pi / 2 + c * np.pi / 3  # camera z (optical axis) around the car
        # camera frame: z forward, x right, y down -> rotation ego<-camera
        fwd = np.array([np.cos(yaw + np.pi / 2), np.sin(yaw + np.pi / 2), 0.0])
        right = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        down = np.array([0.0, 0.0, -1.0])
        m = np.stack([right, down, fwd], axis=1)
        w = np.sqrt(max(1e-12, 1 + m[0, 0] + m[1, 1] + m[2, 2])) / 2
        q = [w, (m[2, 1] - m[1, 2]) / (4 * w), (m[0, 2] - m[2, 0]) / (4 * w), (m[1, 0] - m[0, 1]) / (4 * w)]
        q = list(np.asarray(q) / np.linalg.norm(q))
        out[cam] = dict(translation=[1.5 * np.cos(yaw + np.pi / 2), 0.5 * np.sin(yaw + np.pi / 2), 1.5],
                        rotation=[float(v) for v in q],
                        camera_intrinsic=[[1266.417203046554, 0.0, 816.2670197447984],
                                          [0.0, 1266.417203046554, 491.50706579294757], [0.0, 0.0, 1.0]])
    for r, radar in enumerate(RADARS):
        out[radar] = dict(translation=[3.412 - r, 0.0, 0.5], rotation=_quat_z(r * 1.2), camera_intrinsic=[])
    for rec in out.values():
        rec["translation"] = [float(v) for v in rec["translation"]]
    return out


def make_nuscenes_tables(out: str | Path, config: NuScenesScale = NuScenesScale()) -> dict:
    """Write the dataroot; returns record counts per table and bytes per table file."""
    root = Path(out)
    tables = root / "v1.0-trainval"
    tables.mkdir(parents=True, exist_ok=True)
    keys, segs, sweep_files, images = _real_files(root, config)
    rng = np.random.default_rng(config.seed + 1)
    names = sorted(TRAIN + VAL)[: config.scenes]  # by number: train and val scenes mixed
    per_scene = np.full(config.scenes, config.samples // config.scenes)
    per_scene[: config.samples % config.scenes] += 1
    sensors = {ch: _token("sensor", ch) for ch in (LIDAR,) + CAMERAS + RADARS}
    modality = {LIDAR: "lidar", **{c: "camera" for c in CAMERAS}, **{r: "radar" for r in RADARS}}
    # lidar and camera records per scene are fixed by the scene length; radars fill the total
    lead = rng.integers(0, config.sweeps_per_interval + 1, config.scenes)  # sweeps before the first keyframe
    n_lidar = per_scene + (per_scene - 1) * config.sweeps_per_interval + lead
    dur_s = (per_scene - 1) * 0.5 + lead * 0.05 + 0.05
    n_cam = np.maximum(per_scene, np.round(dur_s * config.camera_hz).astype(int))
    fixed = int(n_lidar.sum() + 6 * n_cam.sum())
    radar_total = max(0, (config.sample_data or fixed) - fixed) if config.sample_data is not None else 0
    n_radar = np.full(config.scenes * 5, radar_total // (config.scenes * 5))
    n_radar[: radar_total % (config.scenes * 5)] += 1
    n_radar = n_radar.reshape(config.scenes, 5)

    sd_w, ep_w = _ListWriter(tables / "sample_data.json"), _ListWriter(tables / "ego_pose.json")
    samples, scenes, calibs, lidarseg, logs = [], [], [], [], []
    counts = dict(sample_data=0)
    for s, name in enumerate(names):
        li = s * TRAINVAL_LOGS // TRAINVAL_SCENES  # 68 logs for 850 scenes, as in trainval
        log_token = _token("log", li)
        if not logs or logs[-1]["token"] != log_token:
            logs.append(dict(token=log_token, logfile=f"n015-scale-{li:03d}", vehicle="n015",
                             date_captured="2018-07-24", location="singapore-onenorth"))
        cal = {}
        for ch, rec in _calibrations(s).items():
            tok = _token("cs", s, ch)
            calibs.append(dict(token=tok, sensor_token=sensors[ch], **rec))
            cal[ch] = tok
        t0 = 1_532_402_927_000_000 + s * 3_600_000_000
        k = int(per_scene[s])
        key_ts = [t0 + int(lead[s]) * 50_000 + i * 500_000 for i in range(k)]
        sample_tokens = [_token("sample", s, i) for i in range(k)]
        for i in range(k):
            samples.append(dict(token=sample_tokens[i], timestamp=key_ts[i], prev=sample_tokens[i - 1] if i else "",
                                next=sample_tokens[i + 1] if i + 1 < k else "", scene_token=_token("scene", s)))
        scenes.append(dict(token=_token("scene", s), log_token=log_token, nbr_samples=k,
                           first_sample_token=sample_tokens[0], last_sample_token=sample_tokens[-1], name=name,
                           description="metadata-scale synthetic scene"))

        def chain(channel: str, stamps: list[int], is_key: list[bool], files: list[str], fmt: str, wh=(0, 0)):
            toks = [_token("sd", s, channel, j) for j in range(len(stamps))]
            for j, ts in enumerate(stamps):
                if is_key[j]:  # its own sample: the latest keyframe at or before it (cameras 10-60 ms after)
                    owner = int(np.searchsorted(key_ts, ts, side="right")) - 1
                else:  # a sweep belongs to the next keyframe's sample
                    owner = min(int(np.searchsorted(key_ts, ts)), k - 1)
                rec = dict(token=toks[j], sample_token=sample_tokens[owner], ego_pose_token=toks[j],
                           calibrated_sensor_token=cal[channel], timestamp=ts, fileformat=fmt,
                           is_key_frame=is_key[j], height=wh[1], width=wh[0], filename=files[j % len(files)],
                           prev=toks[j - 1] if j else "", next=toks[j + 1] if j + 1 < len(stamps) else "")
                sd_w.add(_sd_text(rec))
                rot, trans = ego_pose_at(s, ts, t0)
                ep_w.add(_pose_text(toks[j], ts, rot, trans))
                if channel == LIDAR and is_key[j]:
                    i = key_ts.index(ts)
                    lidarseg.append(dict(token=_token("seg", s, i), sample_data_token=toks[j],
                                         filename=segs[(s + i) % len(segs)]))
            counts["sample_data"] += len(stamps)

        # LIDAR_TOP: lead sweeps, then keyframe + sweeps_per_interval sweeps per interval (50 ms apart)
        lidar_ts = [t0 + j * 50_000 for j in range(int(n_lidar[s]))]
        key_set = set(key_ts)
        is_key = [ts in key_set for ts in lidar_ts]
        files, kf_i, sw_i = [], 0, 0
        for j, kk in enumerate(is_key):
            if kk:
                files.append(keys[(s + kf_i) % len(keys)])
                kf_i += 1
            else:
                files.append(sweep_files[(s + sw_i) % len(sweep_files)])
                sw_i += 1
        chain(LIDAR, lidar_ts, is_key, files, "pcd")
        # cameras: keyframe images 10 ms per channel after the lidar keyframe; the other images
        # spread evenly over the scene
        for c, cam in enumerate(CAMERAS):
            cam_keys = [t + 10_000 * (c + 1) for t in key_ts]
            extra = int(n_cam[s]) - k
            span = int(dur_s[s] * 1e6)
            others = [t0 + 3_000 * c + (j * span) // max(extra, 1) + 1 for j in range(extra)]
            stamps = sorted(set(cam_keys) | set(others))
            while len(stamps) < int(n_cam[s]):  # a collision with a keyframe stamp: shift by 1 us
                stamps = sorted(set(stamps) | {stamps[-1] + 1})
            keyset = set(cam_keys)
            chain(cam, stamps, [t in keyset for t in stamps], [images[cam]], "jpg", config.image_size)
        for r, radar in enumerate(RADARS):
            m = int(n_radar[s, r])
            if m:
                stamps = [t0 + (j * 77_000) + 3_000 * r for j in range(m)]
                chain(radar, stamps, [False] * m, [f"sweeps/{radar}/scale-000__{radar}.pcd"], "pcd")
    sd_w.close()
    ep_w.close()
    small = dict(
        scene=scenes, sample=samples, calibrated_sensor=calibs, lidarseg=lidarseg, log=logs,
        sensor=[dict(token=t, channel=ch, modality=modality[ch]) for ch, t in sensors.items()],
        category=[dict(token=_token("category", n), name=n, description=d, index=i)
                  for i, (n, d) in enumerate(NUSCENES_CATEGORIES)],
    )
    for name, recs in small.items():
        with (tables / f"{name}.json").open("w") as f:
            json.dump(recs, f, indent=0)
    counts.update({name: len(recs) for name, recs in small.items()}, ego_pose=counts["sample_data"])
    sizes = {p.stem: p.stat().st_size for p in sorted(tables.glob("*.json"))}
    return dict(records=counts, bytes=sizes)


# -- SemanticKITTI ----------------------------------------------------------------------------
KITTI_SCANS = {"00": 4541, "01": 1101, "02": 4661, "03": 801, "04": 271, "05": 2761, "06": 1101, "07": 1101,
               "08": 4071, "09": 1591, "10": 1201, "11": 921, "12": 1061, "13": 3281, "14": 631, "15": 1901,
               "16": 1731, "17": 491, "18": 1801, "19": 4981, "20": 831, "21": 2721}  # 43,552 in all


@dataclass(frozen=True)
class KittiScale:
    scale: float = 1.0  # fraction of the official scan counts per sequence
    files: int = 4  # real scans (with labels and images) the entries link to
    points: int = 120_000  # points per real scan (HDL-64E)
    seed: int = 0


def make_kitti_tree(out: str | Path, config: KittiScale = KittiScale()) -> dict:
    """sequences/NN with official scan counts; velodyne/labels/image_2 entries are symlinks to
    `files` real files; calib.txt, poses.txt and times.txt real-format and full length."""
    root = Path(out)
    rng = np.random.default_rng(config.seed)
    real = root / "real"
    real.mkdir(parents=True, exist_ok=True)
    for i in range(config.files):
        n = config.points
        pts = np.concatenate([rng.normal(0, 15, (n, 3)), rng.uniform(0, 1, (n, 1))], axis=1).astype(np.float32)
        pts.tofile(real / f"{i}.bin")
        rng.choice(np.array([40, 44, 48, 50, 70, 10], np.uint32), n).tofile(real / f"{i}.label")
        Image.new("RGB", (1241, 376), (90, 90 + 30 * i, 120)).save(real / f"{i}.png")
    tr = "Tr: 4.276802385584e-04 -9.999672484946e-01 -8.084491683471e-03 -1.198459927713e-02 " \
         "-7.210626507497e-03 8.081198471645e-03 -9.999413164504e-01 -5.403984729748e-02 " \
         "9.999738645903e-01 4.859485810390e-04 -7.206933692422e-03 -2.921968648686e-01"
    p = "7.188560000000e+02 0.000000000000e+00 6.071928000000e+02 {x} 0.000000000000e+00 " \
        "7.188560000000e+02 1.852157000000e+02 0.000000000000e+00 0.000000000000e+00 0.000000000000e+00 " \
        "1.000000000000e+00 0.000000000000e+00"
    total = 0
    for seq, full in KITTI_SCANS.items():
        n = max(1, int(round(full * config.scale)))
        d = root / "sequences" / seq
        for sub in ("velodyne", "labels", "image_2"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        calib = [f"P{k}: " + p.format(x=f"{-386.1448 * k:.12e}") for k in range(4)] + [tr]
        (d / "calib.txt").write_text("\n".join(calib) + "\n")
        t = np.arange(n) * 0.1036
        yaw = 0.02 * t
        rows = [f"{np.cos(a):.9e} 0 {np.sin(a):.9e} {3 * np.sin(a):.9e} 0 1 0 0 {-np.sin(a):.9e} 0 "
                f"{np.cos(a):.9e} {10 * ti:.9e}" for a, ti in zip(yaw, t)]
        (d / "poses.txt").write_text("\n".join(rows) + "\n")
        (d / "times.txt").write_text("\n".join(f"{v:.6e}" for v in t) + "\n")
        labelled = int(seq) <= 10
        for f in range(n):
            j = (f + int(seq)) % config.files
            os.symlink(real / f"{j}.bin", d / "velodyne" / f"{f:06d}.bin")
            os.symlink(real / f"{j}.png", d / "image_2" / f"{f:06d}.png")
            if labelled:
                os.symlink(real / f"{j}.label", d / "labels" / f"{f:06d}.label")
        total += n
    return dict(scans=total, sequences=len(KITTI_SCANS))


# -- ScanNet ------------------------------------------------------------------------------------
SCANNET_SPLITS = {"train": 1201, "val": 312}  # scannetv2_train.txt / scannetv2_val.txt sizes (1,513 scenes)


@dataclass(frozen=True)
class ScanNetScale:
    scale: float = 1.0


def make_scannet_tree(out: str | Path, source: str | Path, config: ScanNetScale = ScanNetScale()) -> dict:
    """1,513 scene folders (official split sizes) whose files are symlinks to the files of the
    one real scene under `source` (a dataroot from synthetic_scannet, say), plus split lists."""
    from clip2scene.precompute.datasets.scannet import SPLIT_FILES

    root, src = Path(out), Path(source)
    real = sorted((src / "scans").iterdir())[0]
    files = [p for p in real.rglob("*") if p.is_file()]
    names = {}
    k = 0
    for split, n in SCANNET_SPLITS.items():
        n = max(1, int(round(n * config.scale)))
        names[split] = [f"scene{k + i:04d}_00" for i in range(n)]
        k += n
    for split, scenes in names.items():
        for scene in scenes:
            for f in files:
                rel = f.relative_to(real)
                target = root / "scans" / scene / str(rel).replace(real.name, scene)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(f.resolve(), target)
        (root / SPLIT_FILES[split]).write_text("\n".join(scenes) + "\n")
    return dict(scenes=sum(len(v) for v in names.values()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--scenes", type=int, default=TRAINVAL_SCENES)
    ap.add_argument("--samples", type=int, default=None, help="default: trainval's 34,149 scaled to --scenes")
    args = ap.parse_args(argv)
    samples = args.samples or max(args.scenes, round(TRAINVAL_SAMPLES * args.scenes / TRAINVAL_SCENES))
    sd = round(TRAINVAL_SAMPLE_DATA * samples / TRAINVAL_SAMPLES)
    print(json.dumps(make_nuscenes_tables(args.out, NuScenesScale(scenes=args.scenes, samples=samples,
                                                                   sample_data=sd)), indent=1))


if __name__ == "__main__":
    main()
