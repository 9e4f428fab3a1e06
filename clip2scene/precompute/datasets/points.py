"""Point and label files shared by the lidar readers (nuScenes .pcd.bin, SemanticKITTI .bin/.label):
every check once, each failure one DataError naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clip2scene.errors import DataError


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}") from None


def read_points(path: Path, columns: int) -> np.ndarray:
    """(N, columns) float32 points of a flat little-endian float32 file (nuScenes 5 columns
    [x, y, z, intensity, ring], SemanticKITTI 4 [x, y, z, remission]).

    DataError naming the file when it is missing, not a whole number of points, empty, or holds
    NaN/inf values.
    """
    raw = _read(path, "lidar")
    if len(raw) % (4 * columns) != 0:
        raise DataError(f"{path}: size {len(raw)} bytes is not a multiple of {4 * columns} "
                        f"(float32 x {columns} per point)")
    if not raw:
        raise DataError(f"{path}: scan has no points (empty file)")
    pts = np.frombuffer(raw, dtype="<f4").reshape(-1, columns).astype(np.float32)
    finite = np.isfinite(pts).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"{path}: {len(bad)} of {len(pts)} points have NaN/inf values "
                        f"(first: point {bad[0]} = {pts[bad[0]].tolist()})")
    return pts


def read_labels(path: Path, dtype: str, num_points: int, points_path: Path) -> np.ndarray:
    """(num_points,) labels of a flat file of `dtype` (nuScenes lidarseg "u1", SemanticKITTI
    "<u4"); DataError naming both files when it is missing or holds another number of labels."""
    raw = _read(path, "label")
    size = np.dtype(dtype).itemsize
    if len(raw) != size * num_points:
        raise DataError(f"{path}: {len(raw) / size:g} labels for {num_points} points in {points_path}")
    return np.frombuffer(raw, dtype=dtype)
