"""Tests for clip2scene.train.voxelize: hand-checked voxelisation and scatter_mean."""

from __future__ import annotations

import pytest
import torch

from clip2scene.train.voxelize import DEFAULT_STRIDE, Voxels, scatter_mean, voxelize


def _hand_example():
    # voxel 0.5 m. Grid cells (floor(xyz / 0.5)):
    #   p0 ( 0.10,  0.20, 0.30) -> ( 0,  0, 0)   item 0
    #   p1 ( 0.40,  0.45, 0.01) -> ( 0,  0, 0)   item 0, same voxel as p0
    #   p2 (-0.10,  1.20, 0.00) -> (-1,  2, 0)   item 0, negative x
    #   p3 ( 0.20,  0.30, 0.40) -> ( 0,  0, 0)   item 1: same cell as p0 but another scan
    #   p4 ( 2.60, -0.70, 1.00) -> ( 5, -2, 2)   item 1
    #   p5 (-0.05,  1.49, 0.49) -> (-1,  2, 0)   item 0, same voxel as p2
    xyz = torch.tensor(
        [
            [0.10, 0.20, 0.30],
            [0.40, 0.45, 0.01],
            [-0.10, 1.20, 0.00],
            [0.20, 0.30, 0.40],
            [2.60, -0.70, 1.00],
            [-0.05, 1.49, 0.49],
        ],
        dtype=torch.float32,
    )
    batch = torch.tensor([0, 0, 0, 1, 1, 0], dtype=torch.int64)
    return xyz, batch


def test_hand_checked_example():
    xyz, batch = _hand_example()
    vox = voxelize(xyz, batch, 0.5)
    assert isinstance(vox, Voxels)
    # global minimum over the WHOLE batch: (-1, -2, 0)
    assert vox.origin.tolist() == [-1, -2, 0]
    # shifted cells: (1,2,0) (1,2,0) (0,4,0) | (1,2,0) (6,0,2) | (0,4,0)
    # sorted by (batch, x, y, z):
    expected = [[0, 0, 4, 0], [0, 1, 2, 0], [1, 1, 2, 0], [1, 6, 0, 2]]
    assert vox.coords.dtype == torch.int32
    assert vox.coords.tolist() == expected
    assert vox.coords.is_contiguous()
    assert vox.point2voxel.dtype == torch.int64
    assert vox.point2voxel.tolist() == [1, 1, 0, 2, 3, 0]
    assert vox.num_voxels == 4 and vox.num_points == 6
    assert vox.batch_size == 2
    # extent (7, 5, 3) rounded up to the stride
    assert vox.spatial_shape == [DEFAULT_STRIDE] * 3
    # relative geometry inside item 1 is preserved: (5,-2,2) - (0,0,0) = (6,0,2) - (1,2,0)
    c = vox.coords[:, 1:]
    assert (c[3] - c[2]).tolist() == [5, -2, 2]


def test_spatial_shape_and_stride():
    xyz = torch.tensor([[0.0, 0.0, 0.0], [3.35, 0.05, 1.75]])
    batch = torch.zeros(2, dtype=torch.int64)
    vox = voxelize(xyz, batch, 0.1, stride=1)
    assert vox.spatial_shape == [34, 1, 18]  # max + 1
    vox = voxelize(xyz, batch, 0.1, stride=16)
    assert vox.spatial_shape == [48, 16, 32]  # rounded up to multiples of 16
    assert all(s % 16 == 0 for s in vox.spatial_shape)
    assert (vox.coords[:, 1:] < torch.tensor(vox.spatial_shape)).all()
    assert (vox.coords >= 0).all()


def test_inverse_index_reconstructs_cells():
    g = torch.Generator().manual_seed(0)
    xyz = (torch.rand(2000, 3, generator=g) - 0.5) * 20.0
    batch = torch.randint(0, 3, (2000,), generator=g)
    vox = voxelize(xyz, batch, 0.7)
    cells = torch.floor(xyz.double() / 0.7).long() - vox.origin
    got = vox.coords[vox.point2voxel].long()
    assert torch.equal(got[:, 0], batch)
    assert torch.equal(got[:, 1:], cells)
    # unique and sorted by linearised key
    sx, sy, sz = vox.spatial_shape
    c = vox.coords.long()
    key = ((c[:, 0] * sx + c[:, 1]) * sy + c[:, 2]) * sz + c[:, 3]
    assert (key[1:] > key[:-1]).all()
    # deterministic
    vox2 = voxelize(xyz, batch, 0.7)
    assert torch.equal(vox.coords, vox2.coords)
    assert torch.equal(vox.point2voxel, vox2.point2voxel)


def test_batch_separation_identical_scans():
    xyz, _ = _hand_example()
    both = torch.cat([xyz, xyz])
    batch = torch.cat([torch.zeros(6), torch.ones(6)]).long()
    vox = voxelize(both, batch, 0.5)
    half = vox.num_voxels // 2
    assert vox.num_voxels == 2 * half
    assert (vox.coords[:half, 0] == 0).all() and (vox.coords[half:, 0] == 1).all()
    assert torch.equal(vox.coords[:half, 1:], vox.coords[half:, 1:])
    assert torch.equal(vox.point2voxel[6:], vox.point2voxel[:6] + half)


def test_empty_item_and_explicit_batch_size():
    xyz, _ = _hand_example()
    batch = torch.full((6,), 2, dtype=torch.int64)  # only item 2 present
    vox = voxelize(xyz, batch, 0.5, batch_size=4)
    assert vox.batch_size == 4
    assert (vox.coords[:, 0] == 2).all()
    with pytest.raises(ValueError):
        voxelize(xyz, batch, 0.5, batch_size=2)
    empty = voxelize(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), 0.1)
    assert empty.num_voxels == 0 and empty.batch_size == 0 and empty.coords.shape == (0, 4)


@pytest.mark.parametrize(
    "xyz,batch,vs",
    [
        (torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64), 0.1),
        (torch.zeros(3, 3), torch.zeros(2, dtype=torch.int64), 0.1),
        (torch.zeros(3, 3), torch.zeros(3, dtype=torch.int64), 0.0),
        (torch.tensor([[0.0, float("nan"), 0.0]]), torch.zeros(1, dtype=torch.int64), 0.1),
        (torch.zeros(1, 3), torch.tensor([-1]), 0.1),
    ],
    ids=["bad_xyz_shape", "bad_batch_len", "zero_voxel", "nan", "negative_batch"],
)
def test_invalid_inputs(xyz, batch, vs):
    with pytest.raises(ValueError):
        voxelize(xyz, batch, vs)


def test_sparse_tensor_wrapper():
    xyz, batch = _hand_example()
    vox = voxelize(xyz, batch, 0.5)
    x = vox.sparse_tensor(torch.ones(vox.num_voxels, 2))
    assert x.indices is vox.coords
    assert list(x.spatial_shape) == vox.spatial_shape and x.batch_size == 2
    with pytest.raises(ValueError):
        vox.sparse_tensor(torch.ones(vox.num_voxels + 1, 2))


def test_scatter_mean_matches_loop():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(17, 3, generator=g, dtype=torch.float64)
    index = torch.randint(0, 6, (17,), generator=g)
    index[index == 4] = 5  # make row 4 empty
    out = scatter_mean(values, index, 7)
    assert out.shape == (7, 3) and out.dtype == torch.float64
    for r in range(7):
        rows = [values[i] for i in range(17) if int(index[i]) == r]
        want = torch.stack(rows).mean(0) if rows else torch.zeros(3, dtype=torch.float64)
        torch.testing.assert_close(out[r], want)
    assert torch.equal(out[4], torch.zeros(3, dtype=torch.float64))


def test_scatter_mean_hand_and_grad():
    values = torch.tensor([[1.0], [3.0], [10.0]], requires_grad=True)
    out = scatter_mean(values, torch.tensor([0, 0, 1]), 2)
    assert out.tolist() == [[2.0], [10.0]]
    out.sum().backward()
    assert values.grad.tolist() == [[0.5], [0.5], [1.0]]
    # 1-D values work too
    assert scatter_mean(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 1, 0]), 2).tolist() == [
        4.0,
        1.5,
    ]
