"""Rigid transforms and the devkit-exact lidar-to-image projection chain (method.md section 3).

The chain reproduces nuscenes-devkit's `NuScenesExplorer.map_pointcloud_to_image` step by step,
including its numerics: points are stored as float32 after every rotate/translate (the devkit
keeps a float32 `LidarPointCloud.points` array and assigns float64 products back into it), the
pixel is (K p) / z in float64, and the mask is depth > min_depth, 1 < u < W-1, 1 < v < H-1
(strict). Pixel coordinates follow the calibration's convention: the centre of the top-left
pixel is (0, 0).

    uv, depth, visible = project_points(points_lidar, lidar_calib, lidar_ego, cam_ego, cam_calib,
                                        intrinsic, width, height)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from clip2scene.errors import DataError


UNIT_QUATERNION_TOL = 1e-3  # |norm - 1| allowed in a record's rotation (nuScenes stores unit to ~1e-6)


def _floats(value) -> np.ndarray | None:
    """`value` as a float64 array, or None when it is not numeric (strings, ragged lists, ...)."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def quaternion_to_matrix(q: Sequence[float], what: str = "quaternion") -> np.ndarray:
    """Rotation matrix (3, 3) float64 of a quaternion [w, x, y, z] (normalised first, as
    pyquaternion does). Raises DataError naming `what` for NaN/inf or zero-norm input."""
    arr = _floats(q)
    if arr is None or arr.shape != (4,) or not np.all(np.isfinite(arr)):
        raise DataError(f"{what}: rotation {q!r} is not 4 finite numbers [w, x, y, z]")
    norm = np.linalg.norm(arr)
    if norm < 1e-12:
        raise DataError(f"{what}: rotation {q!r} has zero norm")
    w, x, y, z = arr / norm
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=np.float64,
    )


def camera_matrix(value, what: str = "camera_intrinsic") -> np.ndarray:
    """(3, 3) float64 pinhole matrix from a record's camera_intrinsic; DataError naming `what` and
    the value unless it is a finite 3x3 matrix with positive focal lengths and last row [0, 0, 1]."""
    k = _floats(value if value is not None else [])
    if k is None or k.shape != (3, 3):
        raise DataError(f"{what}: camera_intrinsic {value!r} is not a 3x3 matrix")
    if not np.all(np.isfinite(k)):
        raise DataError(f"{what}: camera_intrinsic {value!r} has NaN/inf entries")
    if not (k[0, 0] > 0 and k[1, 1] > 0):
        raise DataError(f"{what}: camera_intrinsic {value!r} has a non-positive focal length "
                        f"(fx={k[0, 0]:g}, fy={k[1, 1]:g})")
    if np.abs(k[2] - [0.0, 0.0, 1.0]).max() > 1e-6:
        raise DataError(f"{what}: camera_intrinsic {value!r} is not a pinhole matrix (last row {k[2].tolist()}, "
                        f"expected [0, 0, 1])")
    return k


@dataclass(frozen=True)
class Pose:
    """A rigid transform child -> parent: p_parent = rotation @ p_child + translation."""

    rotation: np.ndarray  # (3, 3) float64
    translation: np.ndarray  # (3,) float64

    @staticmethod
    def from_record(record: dict, what: str = "record", unit_tol: float | None = UNIT_QUATERNION_TOL) -> "Pose":
        """Build from a nuScenes calibrated_sensor / ego_pose record (rotation w,x,y,z; translation).

        DataError naming `what` and the value for a translation that is not 3 finite numbers, a
        rotation that is not 4 finite numbers, or (unless unit_tol is None) a rotation whose norm
        differs from 1 by more than unit_tol.
        """
        raw_t, raw_q = record.get("translation"), record.get("rotation")
        t = _floats(raw_t)
        if t is None or t.shape != (3,) or not np.all(np.isfinite(t)):
            raise DataError(f"{what}: translation {raw_t!r} is not 3 finite numbers")
        q = _floats(raw_q)
        if q is not None and q.shape == (4,) and np.all(np.isfinite(q)) and unit_tol is not None:
            norm = float(np.linalg.norm(q))
            if norm >= 1e-12 and abs(norm - 1.0) > unit_tol:
                raise DataError(f"{what}: rotation {raw_q!r} has norm {norm:.6g}, not a unit quaternion "
                                f"(|norm - 1| > {unit_tol:g})")
        return Pose(quaternion_to_matrix(raw_q, what), t)

    def matrix(self) -> np.ndarray:
        """(4, 4) float64 homogeneous matrix."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation
        return m


def _rotate(points: np.ndarray, rot: np.ndarray) -> np.ndarray:
    # devkit: self.points[:3, :] = np.dot(rot_matrix, self.points[:3, :])  (float32 storage)
    return (points.astype(np.float64) @ rot.T).astype(np.float32)


def _translate(points: np.ndarray, t: np.ndarray) -> np.ndarray:
    # devkit: self.points[i, :] = self.points[i, :] + x[i]  (float32 storage)
    return (points.astype(np.float64) + t[None, :]).astype(np.float32)


def sensor_to_sensor(
    points: np.ndarray, src_calib: Pose, src_ego: Pose, dst_ego: Pose, dst_calib: Pose
) -> np.ndarray:
    """Move points from one sensor frame to another through both ego poses (devkit order).

    points: (N, 3) float32 in the source sensor frame -> (N, 3) float32 in the destination
    sensor frame: sensor -> ego(src time) -> global -> ego(dst time) -> sensor.
    """
    p = np.ascontiguousarray(points[:, :3], dtype=np.float32)
    p = _translate(_rotate(p, src_calib.rotation), src_calib.translation)
    p = _translate(_rotate(p, src_ego.rotation), src_ego.translation)
    p = _rotate(_translate(p, -dst_ego.translation), dst_ego.rotation.T)
    p = _rotate(_translate(p, -dst_calib.translation), dst_calib.rotation.T)
    return p


def project_points(
    points: np.ndarray,
    lidar_calib: Pose,
    lidar_ego: Pose,
    cam_ego: Pose,
    cam_calib: Pose,
    intrinsic: np.ndarray,
    width: int,
    height: int,
    min_depth: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project lidar points into a camera image exactly as the nuScenes devkit does.

    points: (N, >=3) float32 lidar-frame points. intrinsic: (3, 3). Returns
    uv (N, 2) float64 pixel coordinates (meaningful where visible), depth (N,) float32 camera z,
    visible (N,) bool = depth > min_depth and 1 < u < width-1 and 1 < v < height-1.
    """
    cam = sensor_to_sensor(points, lidar_calib, lidar_ego, cam_ego, cam_calib)
    depth = cam[:, 2]
    k = np.asarray(intrinsic, dtype=np.float64)
    proj = cam.astype(np.float64) @ k.T  # view_points: viewpad @ [p; 1], then / z
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = proj[:, :2] / proj[:, 2:3]
    visible = (
        (depth > min_depth)
        & (uv[:, 0] > 1)
        & (uv[:, 0] < width - 1)
        & (uv[:, 1] > 1)
        & (uv[:, 1] < height - 1)
    )
    return uv, depth, visible
