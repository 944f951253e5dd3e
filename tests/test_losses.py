import math

import numpy as np
import pytest
import torch

from emtile import EmtileError
from emtile.losses import balanced_class_weights, border_weights, get_loss, uses_weights, weight_map


def term(d1, d2, w0=10.0, sigma=5.0):
    return w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def test_weight_map_hand_case_one_row():
    # cells at columns 0, 2 and 6; membrane at 1, 3, 4, 5
    labels = np.array([[1, 0, 1, 0, 0, 0, 1]], np.uint8)
    w = weight_map(labels, class_weights=(2.0, 0.5))
    expected = [
        0.5,
        2.0 + term(1, 1),  # between the first two cells
        0.5,
        2.0 + term(1, 3),  # nearest: column 2, second: column 6
        2.0 + term(2, 2),
        2.0 + term(1, 3),
        0.5,
    ]
    np.testing.assert_allclose(w[0], expected, rtol=1e-6)
    assert w.dtype == np.float32


def test_weight_map_hand_case_diagonal_cells_stay_apart():
    # 4-connectivity: the two diagonal corner pixels are two cells, not one
    labels = np.array([[1, 0, 0],
                       [0, 0, 0],
                       [0, 0, 1]], np.uint8)
    w = weight_map(labels, class_weights=(1.0, 1.0))
    s2, s5 = math.sqrt(2), math.sqrt(5)
    expected = [
        [1.0, 1 + term(1, s5), 1 + term(2, 2)],
        [1 + term(1, s5), 1 + term(s2, s2), 1 + term(1, s5)],
        [1 + term(2, 2), 1 + term(1, s5), 1.0],
    ]
    np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_weight_map_default_class_balance_and_single_cell():
    labels = np.zeros((6, 6), np.uint8)
    labels[1:3, 1:3] = 1  # one cell: no border term
    w = weight_map(labels)
    f = 4 / 36
    np.testing.assert_allclose(w[labels == 1], 0.5 / f)
    np.testing.assert_allclose(w[labels == 0], 0.5 / (1 - f))
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-6)
    assert not border_weights(labels).any()


def test_border_weights_match_brute_force(rng):
    # the bounding-box shortcut gives the same map as distances to every cell computed in full
    from scipy import ndimage

    labels = (ndimage.gaussian_filter(rng.random((60, 70)), 2) > 0.5).astype(np.uint8)
    cells, n = ndimage.label(labels)
    assert n >= 4
    dist = np.sort(np.stack([ndimage.distance_transform_edt(cells != i) for i in range(1, n + 1)]), axis=0)
    expected = np.where(labels == 0, 10 * np.exp(-((dist[0] + dist[1]) ** 2) / 50), 0)
    np.testing.assert_allclose(border_weights(labels), expected, atol=1e-5)


def test_balanced_class_weights():
    assert balanced_class_weights(0.75) == (2.0, pytest.approx(2 / 3))
    assert balanced_class_weights(0.0) == (0.5, 10.0)
    assert balanced_class_weights(0.75, power=0.5) == (pytest.approx(2**0.5), pytest.approx((2 / 3) ** 0.5))
    assert balanced_class_weights(0.75, power=0) == (1.0, 1.0)
    with pytest.raises(EmtileError, match="foreground_fraction"):
        balanced_class_weights(1.5)


def test_losses_by_hand():
    # logits ln 3 and 0 -> p = 3/4 and 1/2; targets 1 and 0
    logits = torch.tensor([[[[math.log(3.0), 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0]]]])
    bce_1, bce_2 = -math.log(0.75), math.log(2.0)  # -log p, -log(1 - p)
    assert get_loss("bce")(logits, target, None).item() == pytest.approx((bce_1 + bce_2) / 2)
    weight = torch.tensor([[[[3.0, 1.0]]]])  # normalised by the weights' sum
    assert get_loss("bce")(logits, target, weight).item() == pytest.approx((3 * bce_1 + bce_2) / 4)
    # soft Dice, eps = 1, averaged over both classes:
    #   cell:     (2 * 3/4 + 1) / ((3/4 + 1/2) + 1 + 1) = 2.5 / 3.25
    #   membrane: (2 * 1/2 + 1) / ((1/4 + 1/2) + 1 + 1) = 2 / 2.75
    dice = 1 - (2.5 / 3.25 + 2 / 2.75) / 2
    assert get_loss("dice")(logits, target, weight).item() == pytest.approx(dice)  # weight ignored
    assert get_loss("bce+dice")(logits, target, weight).item() == pytest.approx((3 * bce_1 + bce_2) / 4 + dice)
    perfect = target * 40 - 20
    assert get_loss("dice")(perfect, target, None) < 1e-6 < get_loss("dice")(-perfect, target, None) - 0.5


def test_which_losses_read_the_weight_map():
    assert uses_weights("bce") and uses_weights("bce+dice") and not uses_weights("dice")


def test_unknown_loss():
    with pytest.raises(EmtileError, match="loss='focal' is not supported: choose one of bce, dice, bce\\+dice"):
        get_loss("focal")
