"""mIoU against a hand-computed confusion matrix (devkit protocol)."""

import math

import numpy as np
import pytest

from clip2scene.train.metrics import ConfusionMatrix


def test_hand_computed_confusion_and_miou():
    # classes: 0 ignore, 1, 2, 3, 4 (4 absent from truth and prediction -> NaN, drops out)
    gt = np.array([1, 1, 1, 2, 2, 3, 0, 0, 3, 1])
    pred = np.array([1, 1, 2, 2, 3, 3, 1, 2, 3, 3])
    cm = ConfusionMatrix(5, ignore_index=0)
    cm.update(gt[:5], pred[:5])  # accumulated globally over two "scans"
    cm.update(gt[5:], pred[5:])
    expected = np.zeros((5, 5), np.int64)
    expected[1, 1], expected[1, 2], expected[1, 3] = 2, 1, 1
    expected[2, 2], expected[2, 3] = 1, 1
    expected[3, 3] = 2
    np.testing.assert_array_equal(cm.matrix, expected)  # ignore row and column zeroed
    iou = cm.per_class_iou()
    # class 1: TP 2, FN 2, FP 0 -> 2/4; class 2: TP 1, FN 1, FP 1 -> 1/3; class 3: TP 2, FP 2 -> 2/4
    assert math.isnan(iou[0]) and math.isnan(iou[4])
    np.testing.assert_allclose(iou[1:4], [0.5, 1 / 3, 0.5], rtol=1e-6)
    assert cm.miou() == pytest.approx((0.5 + 1 / 3 + 0.5) / 3, rel=1e-6)


def test_global_not_per_scan_average():
    cm = ConfusionMatrix(3, 0)
    cm.update(np.array([1] * 9 + [2]), np.array([1] * 9 + [1]))  # scan A
    cm.update(np.array([2]), np.array([2]))  # scan B
    # global: class 1 TP 9 FP 1 -> 0.9; class 2 TP 1 FN 1 -> 0.5
    assert cm.miou() == pytest.approx(0.7)


def test_false_positive_only_class_counts_as_zero():
    cm = ConfusionMatrix(4, 0)
    cm.update(np.array([1, 1]), np.array([1, 3]))
    iou = cm.per_class_iou()
    assert iou[3] == 0.0 and math.isnan(iou[2])
    assert cm.miou() == pytest.approx(0.25)


def test_rejects_out_of_range():
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(np.array([3]), np.array([1]))
