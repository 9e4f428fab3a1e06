"""Projection chain: hand-checked cases, devkit numerics, and the real keyframes."""

import numpy as np
import pytest

from clip2scene.errors import DataError
from clip2scene.precompute.datasets.geometry import Pose, project_points, quaternion_to_matrix, sensor_to_sensor

# Camera looking along +x of its parent frame: camera z = parent x, camera x = -parent y, camera y = -parent z.
CAM_R = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns = camera axes in parent
K = np.array([[100.0, 0.0, 50.0], [0.0, 100.0, 40.0], [0.0, 0.0, 1.0]])
I = Pose(np.eye(3), np.zeros(3))


def test_quaternion_rotation_about_z():
    th = np.deg2rad(30)
    r = quaternion_to_matrix([np.cos(th / 2), 0, 0, np.sin(th / 2)])
    np.testing.assert_allclose(r @ [1, 0, 0], [np.cos(th), np.sin(th), 0], atol=1e-12)
    # not normalised input is normalised first (pyquaternion behaviour)
    np.testing.assert_allclose(quaternion_to_matrix([2 * np.cos(th / 2), 0, 0, 2 * np.sin(th / 2)]), r, atol=1e-12)


@pytest.mark.parametrize("q", [[0, 0, 0, 0], [np.nan, 0, 0, 1], [1, 0, 0]])
def test_bad_quaternion_names_record(q):
    with pytest.raises(DataError, match="calib of X"):
        quaternion_to_matrix(q, "calib of X")


def test_hand_checked_pixel():
    cam = Pose(CAM_R, np.zeros(3))
    pts = np.array([[10.0, 0.0, 0.0], [10.0, 1.0, 0.5], [-10.0, 0.0, 0.0], [0.5, 0.0, 0.0]], np.float32)
    uv, depth, vis = project_points(pts, I, I, I, cam, K, 100, 80)
    np.testing.assert_allclose(uv[0], [50, 40])
    # y = +1 (left) -> u = 50 - 100 * 1 / 10; z = +0.5 (up) -> v = 40 - 100 * 0.5 / 10
    np.testing.assert_allclose(uv[1], [40, 35], atol=1e-5)
    np.testing.assert_allclose(depth, [10, 10, -10, 0.5])
    assert vis.tolist() == [True, True, False, False]  # behind the camera; closer than 1 m


def test_both_ego_poses_are_used():
    # The ego moved 1 m forward (+x) between the lidar and the camera timestamps.
    cam = Pose(CAM_R, np.zeros(3))
    ego_cam = Pose(np.eye(3), np.array([1.0, 0.0, 0.0]))
    pts = np.array([[11.0, 1.0, 0.0]], np.float32)
    uv, depth, _ = project_points(pts, I, I, ego_cam, cam, K, 100, 80)
    np.testing.assert_allclose(depth, [10.0])
    np.testing.assert_allclose(uv[0], [40.0, 40.0], atol=1e-5)


def test_strict_one_pixel_margin():
    # depth 8, fx 128, cx 64: u = 64 - 16 y, exact in binary floating point
    k = np.array([[128.0, 0.0, 64.0], [0.0, 128.0, 64.0], [0.0, 0.0, 1.0]])
    cam = Pose(CAM_R, np.zeros(3))
    ys = [63 / 16, 63 / 16 - 1 / 256, -63 / 16, -63 / 16 + 1 / 256]
    pts = np.array([[8.0, y, 0.0] for y in ys], np.float32)
    uv, _, vis = project_points(pts, I, I, I, cam, k, 128, 128)
    np.testing.assert_array_equal(uv[:, 0], [1.0, 1.0625, 127.0, 126.9375])
    assert vis.tolist() == [False, True, False, True]
    # v: exactly on the bottom margin (H - 1) is out, just inside is in
    pts = np.array([[8.0, 0.0, -63 / 16], [8.0, 0.0, -63 / 16 + 1 / 256]], np.float32)
    uv, _, vis = project_points(pts, I, I, I, cam, k, 128, 128)
    np.testing.assert_array_equal(uv[:, 1], [127.0, 126.9375])
    assert vis.tolist() == [False, True]


def test_chain_matches_float64_reference():
    rng = np.random.default_rng(0)
    poses = []
    for _ in range(4):
        q = rng.normal(size=4)
        poses.append(Pose(quaternion_to_matrix(q), rng.normal(size=3) * 50))
    pts = (rng.normal(size=(1000, 3)) * 20).astype(np.float32)
    out = sensor_to_sensor(pts, *poses)
    m = np.linalg.inv(poses[3].matrix()) @ np.linalg.inv(poses[2].matrix()) @ poses[1].matrix() @ poses[0].matrix()
    ref = pts.astype(np.float64) @ m[:3, :3].T + m[:3, 3]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-3)


CAMS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT")
# ring order: CAM_FRONT -> FRONT_RIGHT -> BACK_RIGHT -> BACK -> BACK_LEFT -> FRONT_LEFT -> FRONT (clockwise seen from above)
RING = ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT"]


def test_real_keyframes_project_inside_and_overlap_only_at_edges(real_root):
    from clip2scene.precompute.datasets.nuscenes import NuScenes, load_points

    ds = NuScenes(real_root, "v1.0-mini")
    for kf in ds.keyframes()[::10]:
        pts = load_points(kf.lidar.path)
        vis_by_cam, uv_by_cam = {}, {}
        for cam in kf.cameras:
            uv, depth, vis = project_points(pts[:, :3], kf.lidar.calib, kf.lidar.ego, cam.ego, cam.calib,
                                            cam.intrinsic, cam.width, cam.height)
            assert cam.width == 1600 and cam.height == 900
            assert vis.sum() > 500, cam.channel
            assert np.all((uv[vis, 0] > 1) & (uv[vis, 0] < cam.width - 1))
            assert np.all((uv[vis, 1] > 1) & (uv[vis, 1] < cam.height - 1))
            assert np.all(depth[vis] > 1.0)
            vis_by_cam[cam.channel], uv_by_cam[cam.channel] = vis, uv
        for i, a in enumerate(RING):
            for j, b in enumerate(RING):
                if j <= i:
                    continue
                both = vis_by_cam[a] & vis_by_cam[b]
                neighbours = (j - i) in (1, len(RING) - 1)
                if not neighbours:
                    assert both.sum() == 0, (a, b)
                    continue
                if both.sum() == 0:
                    continue
                # the right-hand camera of the pair sees the shared points at its left edge and vice versa
                left, right = (a, b) if j - i == 1 else (b, a)
                assert np.all(uv_by_cam[left][both, 0] > 0.6 * 1600), (left, right)
                assert np.all(uv_by_cam[right][both, 0] < 0.4 * 1600), (left, right)
