import math

import numpy as np
import pytest
import torch

from emtile import EmtileError
from emtile.affinities import affinities, class_weights, default_offsets
from emtile.losses import (
    AFFINITY_LOSSES,
    LOSSES,
    affinity_loss,
    balance_weights,
    balanced_class_weights,
    border_weights,
    get_loss,
    uses_weights,
    weight_map,
)


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


# --- affinity losses -----------------------------------------------------------------------------

def affinity_batch(rng, shape=(6, 9, 10), samples=2):
    """Targets and masks of ``samples`` random label volumes (0 = unlabelled), as tensors."""
    offsets = default_offsets((10,) * len(shape), long_range=(3,))
    pairs = [affinities(rng.integers(0, 4, size=shape), offsets) for _ in range(samples)]
    target = torch.from_numpy(np.stack([a for a, _ in pairs]))
    mask = torch.from_numpy(np.stack([m for _, m in pairs]))
    return target, mask


def test_affinity_losses_by_hand():
    # one channel, four pairs, the last masked; logits 0, ln 3, 0 (and 100, ignored)
    logits = torch.tensor([[[0.0, math.log(3.0), 0.0, 100.0]]])
    target = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])
    mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    # a third of the masked-in pairs positive: weights 0.5 / (1/3) = 1.5 and 0.5 / (2/3) = 0.75;
    # BCE ln 2 (p = 1/2, t = 1), ln 4 (p = 3/4, t = 0), ln 2; over the 3 masked-in pairs
    bce = (1.5 * math.log(2) + 0.75 * math.log(4) + 0.75 * math.log(2)) / 3
    assert affinity_loss(logits, target, mask).item() == pytest.approx(bce)
    # Dice of the boundary class: q = 1 - p = (1/2, 1/4, 1/2), t = 1 - target = (0, 1, 1)
    #   (2 * (1/4 + 1/2) + 1) / ((1/4 + 1/16 + 1/4) + 2 + 1)
    dice = 1 - 2.5 / 3.5625
    assert affinity_loss(logits, target, mask, kind="dice").item() == pytest.approx(dice)


@pytest.mark.parametrize("kind", AFFINITY_LOSSES)
@pytest.mark.parametrize("shape", [(6, 9, 10), (11, 12)])
def test_affinity_loss_ignores_masked_pairs(kind, shape, rng):
    target, mask = affinity_batch(rng, shape)
    off = mask == 0
    assert off.any() and (~off).any()
    logits = torch.from_numpy(rng.normal(size=target.shape).astype(np.float32))
    loss = affinity_loss(logits, target, mask, kind=kind).item()
    # wildly wrong logits, and targets that disagree with them, only where the mask is 0
    wild = logits.clone()
    wild[off] = torch.from_numpy(rng.choice([-1e4, 1e4], size=int(off.sum())).astype(np.float32))
    flipped = target.clone()
    flipped[off] = (wild[off] < 0).float()
    assert affinity_loss(wild, flipped, mask, kind=kind).item() == pytest.approx(loss, rel=1e-6)
    # the same without the mask would be far off: this test fails if the mask is dropped
    unmasked = affinity_loss(wild, flipped, torch.ones_like(mask), kind=kind).item()
    assert abs(unmasked - loss) > 0.1


def test_balanced_bce_matches_numpy_over_the_masked_in_pairs(rng):
    import torch.nn.functional as F

    target, mask = affinity_batch(rng)
    logits = torch.from_numpy(rng.normal(size=target.shape).astype(np.float32))
    weight = np.stack([class_weights(t, m) for t, m in zip(target.numpy(), mask.numpy())])
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").numpy()
    want = (weight * bce)[mask.numpy() == 1].sum() / mask.sum().item()
    assert affinity_loss(logits, target, mask).item() == pytest.approx(want, rel=1e-5)
    for per_channel in (False, True):  # the torch weights are the NumPy ones, sample by sample
        got = balance_weights(target, mask != 0, per_channel=per_channel).numpy()
        for n in range(target.shape[0]):
            want_w = class_weights(target[n].numpy(), mask[n].numpy(), per_channel=per_channel)
            np.testing.assert_allclose(got[n], want_w, rtol=1e-6)


def test_balanced_bce_weighs_positives_and_negatives_equally():
    # 20 positives, 80 negatives: wrong on every positive costs what wrong on every negative does
    target = torch.zeros(1, 1, 1, 100)
    target[..., :20] = 1
    mask = torch.ones_like(target)
    positive = target == 1
    wrong_on_positives = torch.where(positive, -2.0, -30.0)
    wrong_on_negatives = torch.where(positive, 30.0, 2.0)
    a = affinity_loss(wrong_on_positives, target, mask).item()
    b = affinity_loss(wrong_on_negatives, target, mask).item()
    softplus2 = math.log1p(math.exp(2.0))
    assert a == pytest.approx(0.5 * softplus2, rel=1e-6) and b == pytest.approx(a, rel=1e-6)
    # undecided everywhere: the weights' mean over the masked-in pairs is 1
    undecided = affinity_loss(torch.zeros_like(target), target, mask).item()
    assert undecided == pytest.approx(math.log(2))


def test_dice_of_a_perfect_prediction_is_about_zero(rng):
    target, mask = affinity_batch(rng)
    perfect = (2 * target - 1) * 30
    wrong = rng.choice([-30.0, 30.0], size=int((mask == 0).sum())).astype(np.float32)
    perfect[mask == 0] = torch.from_numpy(wrong)
    assert affinity_loss(perfect, target, mask, kind="dice").item() < 1e-6
    assert affinity_loss(-perfect, target, mask, kind="dice").item() > 0.5
    assert affinity_loss(perfect, target, mask).item() < 1e-6
    # a channel with no boundary among its masked-in pairs, predicted right, scores 1 (loss 0)
    ones = torch.ones(1, 2, 4, 4)
    assert affinity_loss(ones * 30, ones, ones, kind="dice").item() < 1e-6


@pytest.mark.parametrize("kind", AFFINITY_LOSSES)
def test_gradients_flow_only_through_masked_in_pairs(kind, rng):
    target, mask = affinity_batch(rng)
    # moderate logits everywhere, so that a masked pair would get a gradient if it took part
    logits = torch.from_numpy(rng.normal(size=target.shape).astype(np.float32))
    logits.requires_grad_(True)
    affinity_loss(logits, target, mask, kind=kind).backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    assert (grad[mask == 0] == 0).all()
    assert (grad[mask == 1] != 0).float().mean() > 0.99


def test_affinity_loss_errors():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(EmtileError, match="kind='focal' is not supported: choose one of "
                                          "balanced_bce, dice"):
        affinity_loss(x, x, x, kind="focal")
    with pytest.raises(EmtileError, match=r"mask of shape \(1, 3, 4\) must have the logits' shape"):
        affinity_loss(x, x, x[..., 0])
    with pytest.raises(EmtileError, match=r"logits of shape \(4, 4\) must be \(N, K, \*spatial\)"):
        affinity_loss(x[0, 0], x[0, 0], x[0, 0])
    assert LOSSES == ("bce", "dice", "bce+dice")  # the 2-D choices are unchanged
