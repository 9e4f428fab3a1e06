"""ScanNet v2 reader for the 25k-frame subset: one scan = one scene (`dataset.Dataset` protocol).

Layout under the dataroot (ScanNet v2 release + the official `scannet_frames_25k` benchmark subset):

    scans/<scene>/<scene>_vh_clean_2.ply            mesh: vertex x, y, z (float), red, green, blue
                                                    (, alpha) (uchar); faces (not read)
    scans/<scene>/<scene>_vh_clean_2.labels.ply     vertex property `label` = NYU40 id
    scans_test/<scene>/...                          test scenes (mesh only), read when present
    scannet_frames_25k/<scene>/color/NNNNNN.jpg     colour frames (any size; 640x480 in the subset)
    scannet_frames_25k/<scene>/depth/NNNNNN.png     uint16 depth in millimetres, 0 = no value
    scannet_frames_25k/<scene>/pose/NNNNNN.txt      4x4 camera -> world (OpenCV axes: x right,
                                                    y down, z forward); -inf/nan = no pose
    scannet_frames_25k/<scene>/intrinsics_color.txt 4x4, for the 1296x968 colour sensor
    scannet_frames_25k/<scene>/intrinsics_depth.txt 4x4, for the 640x480 depth sensor
    scannetv2_train.txt, scannetv2_val.txt (, scannetv2_test.txt)   official splits, one id a line

    ds = ScanNet("/data/scannet", frames_per_scene=50)
    for scan in ds.scans(split="val"):
        xyz, feat, sweep, n_key = ds.points(scan)       # mesh vertices, RGB / 255
        labels = ds.labels(scan, n_key)                 # (n,) uint8, NYU40 -> 1..20, 0 = ignore
        for v, view in enumerate(ds.views(scan)):       # the scene's posed 25k-subset frames
            uv, visible = ds.project(scan, v, xyz)      # pinhole + depth-occlusion test

Conventions:
- Points are the mesh vertices in the scene's world frame (a scene is already fused, so
  `sweeps` is ignored and every point is a "keyframe" point, sweep 0).
- Views: the frames of `scannet_frames_25k/<scene>/color` in frame-number order, without those
  whose pose has an inf/nan (ScanNet marks tracking failures so), subsampled evenly (first and
  last kept) to at most `frames_per_scene`, and never more than 255 (the cache's uint8 view index).
  The pair camera of a point is its view index; `cameras` is () since views differ per scene.
- Intrinsics are rescaled to each image's actual size: fx' = fx * W / W0, cx' = (cx + 0.5) * W /
  W0 - 0.5 (pixel centres at integers, image corners aligned), likewise in y, where W0 x H0 is
  the sensor size the file was written for (1296x968 colour, 640x480 depth; a file whose
  principal point already fits the image, 2 (cx + 0.5) nearer W than W0, is used unscaled).
- Visible (method.md section 5: depth occlusion threshold 0.05 m): camera z > 0.1 m, 1 < u < W-1
  and 1 < v < H-1 (strict, as for nuScenes), and the depth image, with its own rescaled
  intrinsics, holds at the nearest pixel a value d > 0 with |d - z| < 0.05 m. The depth camera is
  taken to share the colour camera's pose, as ScanNet's registered frames do.

Run (prints the scenes, point counts and views): ``python -m clip2scene.precompute.datasets.scannet DATAROOT``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clip2scene.classes import SCANNET_CLASSES
from clip2scene.errors import ConfigError, DataError
from clip2scene.precompute.datasets.base import ScanRef, View

log = logging.getLogger(__name__)

VERSIONS = ("scannet-25k",)
FRAMES_DIR = "scannet_frames_25k"
SPLIT_FILES = {"train": "scannetv2_train.txt", "val": "scannetv2_val.txt", "test": "scannetv2_test.txt"}
SCAN_DIRS = ("scans", "scans_test")  # where scene meshes live (test scenes in scans_test)
COLOR_INTRINSICS_SIZE = (1296, 968)  # (W, H) that intrinsics_color.txt is written for
DEPTH_INTRINSICS_SIZE = (640, 480)  # (W, H) that intrinsics_depth.txt is written for
DEPTH_SCALE = 1000.0  # depth png units per metre
MIN_DEPTH = 0.1  # metres: nearer points are not visible
OCCLUSION_THRESHOLD = 0.05  # metres: |depth image - point z| below this = the surface the pixel sees
MAX_VIEWS = 255  # the cache stores the view index as uint8

# NYU40 id -> evaluation label 1..20 (method.md section 6), everything else 0 = ignore.
NYU40_EVAL_IDS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
assert len(NYU40_EVAL_IDS) == len(SCANNET_CLASSES)


def nyu40_label_map() -> np.ndarray:
    """(256,) uint8 lookup: NYU40 id -> 1..20 in `SCANNET_CLASSES` order, 0 = ignore."""
    lut = np.zeros(256, dtype=np.uint8)
    for label, nyu in enumerate(NYU40_EVAL_IDS, start=1):
        lut[nyu] = label
    return lut


NYU40_TO_EVAL = nyu40_label_map()


def scale_intrinsic(k: np.ndarray, native: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(3, 3) float64 intrinsics for an image of `size` (W, H) from a matrix written for `native`.

    Pixel centres at integer coordinates, image corners aligned: fx' = fx W / W0, cx' = (cx +
    0.5) W / W0 - 0.5, likewise fy, cy with H / H0. A matrix whose principal point already fits
    `size` (2 (cx + 0.5) nearer W than W0) is returned unchanged.
    """
    k = np.asarray(k, dtype=np.float64)[:3, :3].copy()
    (w0, h0), (w, h) = native, size
    if abs(2 * (k[0, 2] + 0.5) - w) < abs(2 * (k[0, 2] + 0.5) - w0):
        return k
    sx, sy = w / w0, h / h0
    k[0, 0] *= sx
    k[1, 1] *= sy
    k[0, 1] *= sx
    k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
    k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
    return k


def read_matrix(path: Path, what: str) -> np.ndarray:
    """(4, 4) float64 from a whitespace-separated text file (ScanNet pose / intrinsics); may hold
    inf/nan. DataError naming the file when it is missing or not 16 numbers."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read {what} ({e})") from None
    try:
        values = np.array([float(x) for x in text.split()], dtype=np.float64)
    except ValueError:
        raise DataError(f"{path}: {what} is not 16 numbers (4x4 matrix)") from None
    if values.shape != (16,):
        raise DataError(f"{path}: {what} has {values.size} numbers, expected 16 (4x4 matrix)")
    return values.reshape(4, 4)


def read_ply_vertices(path: Path, properties: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named vertex properties of a PLY file as numpy arrays (each (n,), dtype as stored).

    Faces are read with plyfile's fast memory-mapped path when they are all triangles. Raises
    DataError naming the file when it is missing, unreadable or lacks a property.
    """
    from plyfile import PlyData

    if not path.is_file():
        raise DataError(f"PLY file not found: {path}")
    try:
        try:
            ply = PlyData.read(str(path), known_list_len={"face": {"vertex_indices": 3}})
        except Exception:  # not all triangles, or another face property: the generic reader
            ply = PlyData.read(str(path))
        if "vertex" not in ply:
            raise DataError(f"{path}: PLY file has no 'vertex' element")
        vertex = ply["vertex"]
        names = {p.name for p in vertex.properties}
        missing = [p for p in properties if p not in names]
        if missing:
            raise DataError(f"{path}: PLY vertices lack propert{'y' if len(missing) == 1 else 'ies'} "
                            f"{', '.join(missing)} (have {', '.join(sorted(names))})")
        return {p: np.array(vertex[p]) for p in properties}
    except DataError:
        raise
    except Exception as e:  # plyfile raises assorted parse / IO errors on corrupt files
        raise DataError(f"{path}: not a readable PLY file ({type(e).__name__}: {e})") from None


def read_depth(path: Path) -> np.ndarray:
    """(H, W) float32 depth in metres from a ScanNet uint16 millimetre PNG (0 = no value)."""
    try:
        with Image.open(path) as im:
            im.load()
            depth = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"depth image not found: {path}") from None
    except Exception as e:  # PIL: UnidentifiedImageError, truncated data, ...
        raise DataError(f"{path}: not a readable depth PNG ({type(e).__name__}: {e})") from None
    if depth.ndim != 2:
        raise DataError(f"{path}: depth image has shape {depth.shape}, expected one 16-bit channel")
    return depth.astype(np.float32) / DEPTH_SCALE


@dataclass(frozen=True)
class Frame:
    """One posed 25k-subset frame of a scene."""

    name: str  # frame id, the file stem ("000100")
    color: Path
    depth: Path
    pose: np.ndarray  # (4, 4) float64 camera -> world
    width: int  # colour image size on disk
    height: int


@dataclass(frozen=True)
class _SceneFrames:
    frames: tuple[Frame, ...]
    views: tuple[View, ...]
    k_color: np.ndarray  # (4, 4) as written
    k_depth: np.ndarray


class ScanNet:
    """ScanNet v2 scenes with their 25k-subset frames (see the module docstring)."""

    name = "scannet"
    has_labels = True
    cameras: tuple[str, ...] = ()
    point_features: tuple[str, ...] = ("red", "green", "blue")
    voxel_size = 0.05

    def __init__(self, dataroot: str | Path, version: str = "scannet-25k", frames_per_scene: int | None = None):
        self.dataroot = Path(dataroot)
        self.version = version
        if version not in VERSIONS:
            raise ConfigError(f"unknown ScanNet version {version!r}; supported: {', '.join(VERSIONS)}")
        if frames_per_scene is not None and frames_per_scene < 1:
            raise ConfigError(f"frames_per_scene must be >= 1 (or None for all), got {frames_per_scene}")
        self.frames_per_scene = min(frames_per_scene or MAX_VIEWS, MAX_VIEWS)
        if not self.dataroot.is_dir():
            raise DataError(f"dataroot not found: {self.dataroot}")
        if not (self.dataroot / "scans").is_dir():
            raise DataError(f"no ScanNet scans folder: {self.dataroot / 'scans'}")
        self._scene_dirs: dict[str, Path] = {}
        for sub in SCAN_DIRS:
            folder = self.dataroot / sub
            if folder.is_dir():
                for d in folder.iterdir():
                    if d.is_dir() and d.name.startswith("scene"):
                        self._scene_dirs.setdefault(d.name, d)
        self._split_lists: dict[str, set[str]] = {}
        for split, fname in SPLIT_FILES.items():
            path = self.dataroot / fname
            if path.is_file():
                self._split_lists[split] = {s.strip() for s in path.read_text().splitlines() if s.strip()}
        self._cache: tuple[str, _SceneFrames] | None = None  # the last scene's frames

    # -- scans ------------------------------------------------------------------------------
    def scene_split(self, scene: str) -> str:
        """Official split of a scene from the split lists present; "unknown" if in none."""
        for split, names in self._split_lists.items():
            if scene in names:
                return split
        return "unknown"

    def scans(self, split: str | None = None, sweeps: int = 1) -> list[ScanRef]:
        """Scenes of `split` (None = all) in sorted scene order. `sweeps` is ignored (a scene is
        already fused). DataError naming the list file when `split` is train/val/test and its
        official list is missing."""
        if split in SPLIT_FILES and split not in self._split_lists:
            raise DataError(f"split list not found: {self.dataroot / SPLIT_FILES[split]}")
        out = []
        for scene in sorted(self._scene_dirs):
            scene_split = self.scene_split(scene)
            if split is not None and scene_split != split:
                continue
            mesh = self._scene_dirs[scene] / f"{scene}_vh_clean_2.ply"
            out.append(ScanRef(token=scene, scene=scene, split=scene_split, timestamp=0,
                               lidar_path=mesh.relative_to(self.dataroot).as_posix()))
        if split in self._split_lists:
            missing = len(self._split_lists[split]) - len(out)
            if missing:
                log.debug("%d scenes of %s are not under %s", missing, SPLIT_FILES[split], self.dataroot)
        return out

    def _mesh_path(self, scan: ScanRef, suffix: str = "") -> Path:
        folder = self._scene_dirs.get(scan.scene, self.dataroot / "scans" / scan.scene)
        return folder / f"{scan.scene}_vh_clean_2{suffix}.ply"

    def points(self, scan: ScanRef) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Mesh vertices: xyz (n, 3) float32 world frame, feat (n, 3) float32 RGB / 255 in [0, 1],
        sweep (n,) uint8 zeros, n_key = n."""
        path = self._mesh_path(scan)
        v = read_ply_vertices(path, ("x", "y", "z", "red", "green", "blue"))
        xyz = np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float32)
        rgb = np.stack([v["red"], v["green"], v["blue"]], axis=1).astype(np.float32)
        if np.issubdtype(v["red"].dtype, np.floating):  # some exports store colours in 0..1
            feat = rgb
        else:
            feat = rgb / np.float32(255.0)
        if not np.all(np.isfinite(xyz)):
            raise DataError(f"{path}: vertex coordinates hold inf/nan")
        return xyz, feat, np.zeros(len(xyz), np.uint8), len(xyz)

    def labels(self, scan: ScanRef, n_key: int) -> np.ndarray:
        """(n_key,) uint8 labels 1..20 from the labels PLY's NYU40 ids, 0 = ignore. A test-split
        scene without a labels file gets all zeros."""
        path = self._mesh_path(scan, ".labels")
        if not path.is_file() and scan.split == "test":
            return np.zeros(n_key, np.uint8)
        nyu = read_ply_vertices(path, ("label",))["label"].astype(np.int64)
        if nyu.shape[0] != n_key:
            raise DataError(f"{path}: {nyu.shape[0]} labelled vertices for {n_key} mesh vertices in "
                            f"{self._mesh_path(scan)}")
        return NYU40_TO_EVAL[np.clip(nyu, 0, 255)]

    # -- views ------------------------------------------------------------------------------
    def _scene_frames(self, scene: str) -> _SceneFrames:
        if self._cache is not None and self._cache[0] == scene:
            return self._cache[1]
        folder = self.dataroot / FRAMES_DIR / scene
        color_dir = folder / "color"
        if not color_dir.is_dir():
            raise DataError(f"no 25k-subset frames for {scene}: {color_dir}")
        k_color = read_matrix(folder / "intrinsics_color.txt", "colour intrinsics")
        k_depth = read_matrix(folder / "intrinsics_depth.txt", "depth intrinsics")
        for k, fname in ((k_color, "intrinsics_color.txt"), (k_depth, "intrinsics_depth.txt")):
            if not np.all(np.isfinite(k)) or k[0, 0] <= 0 or k[1, 1] <= 0:
                raise DataError(f"{folder / fname}: not a finite intrinsic matrix with positive focal lengths")
        stems = sorted((p.stem for p in color_dir.glob("*.jpg")), key=lambda s: (len(s), s))
        valid = []
        for stem in stems:
            pose_path = folder / "pose" / f"{stem}.txt"
            pose = read_matrix(pose_path, "camera pose")
            if not np.all(np.isfinite(pose)):
                log.debug("skipping frame with an invalid pose: %s", pose_path)
                continue
            valid.append((stem, pose))
        if len(valid) > self.frames_per_scene:
            pick = np.round(np.linspace(0, len(valid) - 1, self.frames_per_scene)).astype(int)
            valid = [valid[i] for i in pick]
        frames = []
        for stem, pose in valid:
            color = color_dir / f"{stem}.jpg"
            try:
                with Image.open(color) as im:
                    width, height = im.size
            except Exception as e:
                raise DataError(f"{color}: not a readable image ({type(e).__name__}: {e})") from None
            frames.append(Frame(stem, color, folder / "depth" / f"{stem}.png", pose, width, height))
        entry = _SceneFrames(
            frames=tuple(frames),
            views=tuple(View(name=f.name, path=f.color, width=f.width, height=f.height) for f in frames),
            k_color=k_color,
            k_depth=k_depth,
        )
        self._cache = (scene, entry)
        return entry

    def frames(self, scan: ScanRef) -> tuple[Frame, ...]:
        """The posed frames behind views(scan), same order."""
        return self._scene_frames(scan.scene).frames

    def views(self, scan: ScanRef) -> list[View]:
        """The scene's 25k-subset frames with a valid pose, frame order, evenly subsampled to at
        most frames_per_scene (<= 255)."""
        return list(self._scene_frames(scan.scene).views)

    def intrinsic(self, scan: ScanRef, view: int) -> np.ndarray:
        """(3, 3) float64 colour intrinsics scaled to views(scan)[view]'s image size."""
        sf = self._scene_frames(scan.scene)
        f = sf.frames[view]
        return scale_intrinsic(sf.k_color, COLOR_INTRINSICS_SIZE, (f.width, f.height))

    def project(self, scan: ScanRef, view: int, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project (n, 3) world-frame points into views(scan)[view]: uv (n, 2) float64 pixel
        coordinates of the colour image (pixel centres at integers; meaningful where visible) and
        visible (n,) bool: z > 0.1 m, 1 < u < W-1, 1 < v < H-1, and the depth image at the nearest
        pixel has d > 0 with |d - z| < 0.05 m. DataError naming the depth PNG if unreadable."""
        sf = self._scene_frames(scan.scene)
        if not 0 <= view < len(sf.frames):
            raise IndexError(f"view {view} of {scan.scene}: the scene has {len(sf.frames)} views")
        f = sf.frames[view]
        world_to_cam = np.linalg.inv(f.pose)
        pts = np.asarray(xyz, dtype=np.float64)[:, :3]
        cam = pts @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
        z = cam[:, 2]
        k = scale_intrinsic(sf.k_color, COLOR_INTRINSICS_SIZE, (f.width, f.height))
        with np.errstate(divide="ignore", invalid="ignore"):
            xn, yn = cam[:, 0] / z, cam[:, 1] / z
        uv = np.stack([k[0, 0] * xn + k[0, 1] * yn + k[0, 2], k[1, 1] * yn + k[1, 2]], axis=1)
        visible = ((z > MIN_DEPTH) & (uv[:, 0] > 1) & (uv[:, 0] < f.width - 1)
                   & (uv[:, 1] > 1) & (uv[:, 1] < f.height - 1))

        depth = read_depth(f.depth)
        dh, dw = depth.shape
        kd = scale_intrinsic(sf.k_depth, DEPTH_INTRINSICS_SIZE, (dw, dh))
        idx = np.flatnonzero(visible)
        col = np.rint(kd[0, 0] * xn[idx] + kd[0, 1] * yn[idx] + kd[0, 2])
        row = np.rint(kd[1, 1] * yn[idx] + kd[1, 2])
        inside = (col >= 0) & (col <= dw - 1) & (row >= 0) & (row <= dh - 1)
        d = np.zeros(len(idx), np.float64)
        d[inside] = depth[row[inside].astype(np.int64), col[inside].astype(np.int64)]
        ok = inside & (d > 0) & (np.abs(d - z[idx]) < OCCLUSION_THRESHOLD)
        visible[idx[~ok]] = False
        return uv, visible


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m clip2scene.precompute.datasets.scannet DATAROOT [--split val --frames-per-scene N]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataroot", type=Path)
    parser.add_argument("--split", default=None)
    parser.add_argument("--frames-per-scene", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ds = ScanNet(args.dataroot, frames_per_scene=args.frames_per_scene)
    for scan in ds.scans(args.split):
        xyz, _, _, _ = ds.points(scan)
        log.info("%s (%s): %d vertices, %d views", scan.scene, scan.split, len(xyz), len(ds.views(scan)))


if __name__ == "__main__":
    main()
