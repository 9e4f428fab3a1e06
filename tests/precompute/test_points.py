"""The point / label file checks shared by the nuScenes and SemanticKITTI readers."""

from __future__ import annotations

import numpy as np
import pytest

from clip2scene.errors import DataError
from clip2scene.precompute.datasets.points import read_labels, read_points


@pytest.mark.parametrize("columns", [4, 5])
def test_read_points_round_trip_and_refusals(tmp_path, columns):
    pts = np.arange(3 * columns, dtype=np.float32).reshape(3, columns)
    f = tmp_path / "scan.bin"
    f.write_bytes(pts.tobytes())
    got = read_points(f, columns)
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, pts)
    with pytest.raises(DataError, match="lidar file not found: .*missing.bin"):
        read_points(tmp_path / "missing.bin", columns)
    f.write_bytes(pts.tobytes()[:-4])
    with pytest.raises(DataError, match=f"scan.bin: size .* not a multiple of {4 * columns}"):
        read_points(f, columns)
    f.write_bytes(b"")
    with pytest.raises(DataError, match="scan.bin: scan has no points"):
        read_points(f, columns)
    pts[1, 2] = np.nan
    f.write_bytes(pts.tobytes())
    with pytest.raises(DataError, match=r"scan.bin: 1 of 3 points have NaN/inf values \(first: point 1"):
        read_points(f, columns)


def test_read_labels_counts_against_the_points(tmp_path):
    f = tmp_path / "000001.label"
    f.write_bytes(np.array([1, 2, 3], "<u4").tobytes())
    np.testing.assert_array_equal(read_labels(f, "<u4", 3, tmp_path / "000001.bin"), [1, 2, 3])
    with pytest.raises(DataError, match=r"000001.label: 3 labels for 4 points in .*000001.bin"):
        read_labels(f, "<u4", 4, tmp_path / "000001.bin")
    with pytest.raises(DataError, match="label file not found: .*nope.label"):
        read_labels(tmp_path / "nope.label", "u1", 3, f)
