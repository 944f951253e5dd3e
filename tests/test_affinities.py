import subprocess
import sys

import numpy as np
import pytest

from emtile import EmtileError
from emtile.affinities import (
    affinities,
    check_offsets,
    class_weights,
    default_offsets,
    offset_context,
    parse_offsets,
    tta_permutations,
)

NEAREST3 = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


def reference(labels, offsets):
    """The definition, voxel by voxel: the pair (v, v + o) is known where both lie in the volume
    and are labelled; its affinity is 1 where their ids are equal."""
    aff = np.zeros((len(offsets),) + labels.shape, np.float32)
    mask = np.zeros_like(aff)
    for k, offset in enumerate(offsets):
        for v in np.ndindex(labels.shape):
            w = tuple(a + b for a, b in zip(v, offset))
            if not all(0 <= c < n for c, n in zip(w, labels.shape)):
                continue
            if labels[v] != 0 and labels[w] != 0:
                mask[(k,) + v] = 1
                aff[(k,) + v] = float(labels[v] == labels[w])
    return aff, mask


# --- affinities ----------------------------------------------------------------------------------


def test_one_row_by_hand():
    labels = np.array([[1, 1, 0, 2, 2, 2]])
    aff, mask = affinities(labels, [(0, -1), (0, -2), (0, 1), (-1, 0)])
    assert aff.shape == mask.shape == (4, 1, 6) and aff.dtype == np.float32
    assert mask[0, 0].tolist() == [0, 1, 0, 0, 1, 1]  # 0: edge; 2, 3: touch the unlabelled voxel
    assert aff[0, 0].tolist() == [0, 1, 0, 0, 1, 1]
    assert mask[1, 0].tolist() == [0, 0, 0, 1, 0, 1]  # 3 sees 1 (object 1), 4 sees 2 (unlabelled)
    assert aff[1, 0].tolist() == [0, 0, 0, 0, 0, 1]
    assert mask[2, 0].tolist() == [1, 0, 0, 1, 1, 0]  # a positive step: the last column is edge
    assert aff[2, 0].tolist() == [1, 0, 0, 1, 1, 0]
    assert not mask[3].any() and not aff[3].any()  # one row: no pair across rows


def test_3d_against_the_definition(rng):
    # few ids and many unlabelled voxels, so that every case occurs; offsets of both signs, some
    # as long as an axis (nothing inside) or longer
    labels = rng.integers(0, 4, size=(5, 7, 8)).astype(np.uint32)
    offsets = NEAREST3 + ((-3, 0, 0), (0, -3, 0), (0, 0, -3), (-5, 0, 0), (0, -9, 0), (0, 0, -7),
                          (2, -1, 0), (0, 2, 3), (-1, -1, -1))
    aff, mask = affinities(labels, offsets)
    want_aff, want_mask = reference(labels, offsets)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(aff, want_aff)
    assert not mask[6].any() and not mask[7].any()  # -5 in z of 5, -9 in y of 7
    assert mask[8].any() and mask[0].any() and 0 < aff[0].sum() < mask[0].sum()


def test_2d_against_the_definition(rng):
    labels = rng.integers(0, 3, size=(9, 6)).astype(np.int64)
    offsets = ((-1, 0), (0, -1), (-4, 0), (0, -5), (3, 2))
    aff, mask = affinities(labels, offsets, dtype=np.uint8)
    want_aff, want_mask = reference(labels, offsets)
    assert aff.dtype == mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(aff, want_aff)


def test_objects_and_background_by_hand():
    # two objects side by side in x, an unlabelled slab in z = 2
    labels = np.ones((3, 2, 4), np.uint16)
    labels[:, :, 2:] = 7
    labels[2] = 0
    aff, mask = affinities(labels, NEAREST3 + ((0, 0, -2),))
    # z: slice 0 is the edge, slice 2 is unlabelled; slice 1 pairs with slice 0
    assert mask[0].sum(axis=(1, 2)).tolist() == [0, 8, 0] and aff[0].sum() == 8
    # x: the pair across the objects' face (x = 2 with x = 1) is a boundary
    assert mask[2, :2].all(axis=(0, 1)).tolist() == [False, True, True, True]
    assert aff[2, 0, 0].tolist() == [0, 1, 0, 1]
    assert aff[3, 0, 0].tolist() == [0, 0, 0, 0] and mask[3, 0, 0].tolist() == [0, 0, 1, 1]


def test_mask_is_zero_exactly_at_borders_and_unlabelled_pairs():
    labels = np.ones((6, 7, 8), np.int32)
    offsets = NEAREST3 + ((0, -3, 0), (2, 0, 0), (0, 1, -2))
    aff, mask = affinities(labels, offsets)
    np.testing.assert_array_equal(aff, mask)  # one object: every known pair is "same"
    for k, offset in enumerate(offsets):
        inside = np.ones(labels.shape, bool)
        for axis, step in enumerate(offset):
            index = np.arange(labels.shape[axis]) + step
            ok = (index >= 0) & (index < labels.shape[axis])
            inside &= ok.reshape([-1 if a == axis else 1 for a in range(3)])
        np.testing.assert_array_equal(mask[k], inside, err_msg=str(offset))
    # one unlabelled voxel: its own pairs and the pairs that reach it are masked, nothing else
    hole = (3, 3, 4)
    labels[hole] = 0
    _, holed = affinities(labels, offsets)
    for k, offset in enumerate(offsets):
        lost = np.argwhere(mask[k] != holed[k]).tolist()
        reaching = [h - s for h, s in zip(hole, offset)]
        assert sorted(lost) == sorted([list(hole), reaching]), offset


def test_patch_read_with_the_offsets_context_matches_the_volume(rng):
    labels = rng.integers(1, 5, size=(12, 20, 20))
    offsets = default_offsets((10, 10, 10))
    whole_aff, whole_mask = affinities(labels, offsets)
    context = offset_context(offsets)
    assert context == ((9, 0), (9, 0), (9, 0))
    start, stop = (9, 9, 10), (12, 15, 20)  # the patch, its context inside the volume
    grown = tuple(slice(a - before, b + after)
                  for a, b, (before, after) in zip(start, stop, context))
    aff, mask = affinities(labels[grown], offsets)
    crop = (slice(None),) + tuple(slice(before, before + b - a)
                                  for a, b, (before, _) in zip(start, stop, context))
    patch = (slice(None),) + tuple(slice(a, b) for a, b in zip(start, stop))
    np.testing.assert_array_equal(mask[crop], whole_mask[patch])
    np.testing.assert_array_equal(aff[crop], whole_aff[patch])
    assert mask[crop].all()  # every voxel is labelled, and the context holds every partner
    assert offset_context([(-1, 0), (2, -3)]) == ((1, 2), (3, 0))


def test_affinities_refuse_what_is_not_ids():
    with pytest.raises(EmtileError, match="labels of dtype float32 are not object ids"):
        affinities(np.ones((3, 3), np.float32), [(0, -1)])
    with pytest.raises(EmtileError, match=r"labels of shape \(4,\) must be \(Z, Y, X\) or"):
        affinities(np.ones(4, int), [(-1,)])
    with pytest.raises(EmtileError, match="offsets=.* has 3 steps per offset; 2-D labels"):
        affinities(np.ones((3, 3), int), NEAREST3)


# --- offsets -------------------------------------------------------------------------------------


def test_parse_offsets():
    text = "-1,0,0;0,-1,0;0,0,-1; -3, 0, 0;0,-9,0;"
    assert parse_offsets(text) == NEAREST3 + ((-3, 0, 0), (0, -9, 0))
    assert parse_offsets("0,-1;-1,0", ndim=2) == ((0, -1), (-1, 0))
    assert parse_offsets("1,2,3") == ((1, 2, 3),)  # positive steps are offsets too
    assert check_offsets(np.array([[-1, 0], [0, -1]])) == ((-1, 0), (0, -1))
    assert check_offsets("0,0,-1") == ((0, 0, -1),)


@pytest.mark.parametrize("text, message", [
    ("-1,0,0;0,x,0", r"offsets='-1,0,0;0,x,0' is not a list of integer offsets like "
                     r"\"-1,0,0;0,-1,0;0,0,-1\": '0,x,0' is not integers"),
    ("-1,0,0;;0,0,-1", "is not a list of integer offsets"),
    ("-1.5,0,0", "is not a list of integer offsets"),
    ("", "offsets='' holds no offset"),
    (" ; ", "holds no offset|is not a list"),
    ("-1,0,0;0,-1", r"offsets='-1,0,0;0,-1' mixes offsets of 2 and 3 steps"),
    ("-1;0", "has 1 steps per offset; 3-D or 2-D labels need one per axis"),
    ("-1,0,0,0", "has 4 steps per offset"),
    ("-1,0,0;0,0,0", r"holds the zero offset \(0, 0, 0\)"),
    ("-1,0,0;0,-1,0;-1,0,0", r"offsets='-1,0,0;0,-1,0;-1,0,0' holds \(-1, 0, 0\) twice"),
])
def test_parse_offsets_errors(text, message):
    with pytest.raises(EmtileError, match=message):
        parse_offsets(text)


def test_offsets_errors_from_python():
    with pytest.raises(EmtileError, match="offsets=-1 is not a sequence of offsets"):
        check_offsets(-1)
    with pytest.raises(EmtileError, match=r"holds \(-1.0, 0, 0\): steps must be integers"):
        check_offsets([(-1.0, 0, 0)])
    with pytest.raises(EmtileError, match="has 3 steps per offset; 2-D labels"):
        parse_offsets("-1,0,0", ndim=2)
    with pytest.raises(EmtileError, match="offsets=None must be text"):
        parse_offsets(None)
    with pytest.raises(EmtileError) as info:  # an array's repr is quoted on one line
        check_offsets(np.array([[0, 0, 0], [0, 0, -1]]))
    assert "\n" not in str(info.value) and "zero offset" in str(info.value)


def test_default_offsets():
    assert default_offsets((10, 10, 10)) == NEAREST3 + (
        (-3, 0, 0), (0, -3, 0), (0, 0, -3), (-9, 0, 0), (0, -9, 0), (0, 0, -9))
    # serial sections: 3 * 4 / 50 rounds to 0 (dropped), 9 * 4 / 50 to 1 (the nearest neighbour)
    assert default_offsets((50, 4, 4)) == NEAREST3 + (
        (0, -3, 0), (0, 0, -3), (0, -9, 0), (0, 0, -9))
    # 40 x 8 x 8: 3 * 8 / 40 = 0.6 -> 1 (present), 9 * 8 / 40 = 1.8 -> 2
    assert default_offsets((40, 8, 8)) == NEAREST3 + (
        (0, -3, 0), (0, 0, -3), (-2, 0, 0), (0, -9, 0), (0, 0, -9))
    # halves round up: 3 * 5 / 6 = 2.5 -> 3 (Python's round would give 2)
    assert default_offsets((6, 5, 5), long_range=(3,))[3] == (-3, 0, 0)
    assert default_offsets((4, 4)) == ((-1, 0), (0, -1), (-3, 0), (0, -3), (-9, 0), (0, -9))
    assert default_offsets((10, 10, 10), long_range=()) == NEAREST3
    assert default_offsets((10, 10, 10), long_range=(1, 3, 3)) == NEAREST3 + (
        (-3, 0, 0), (0, -3, 0), (0, 0, -3))
    assert check_offsets(default_offsets((50, 4, 4)), ndim=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"voxel_size": (10, 10, 10, 10)}, r"voxel_size=\(10, 10, 10, 10\) must be 3 \(z, y, x\) or 2"),
    ({"voxel_size": 10}, "voxel_size=10 must be"),
    ({"voxel_size": (50, 0, 4)}, "voxel_size=.* positive sizes in nm"),
    ({"voxel_size": (50, float("nan"), 4)}, "voxel_size="),
    ({"voxel_size": (10, 10, 10), "long_range": (3, 0)}, r"long_range=\(3, 0\) must be positive"),
    ({"voxel_size": (10, 10, 10), "long_range": (2.5,)}, "long_range="),
    ({"voxel_size": (10, 10, 10), "long_range": 3}, "long_range=3 must be"),
])
def test_default_offsets_errors(kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(EmtileError, match=message):
        default_offsets(kwargs.pop("voxel_size"), **kwargs)


# --- class weights -------------------------------------------------------------------------------


def test_class_weights_balance_the_masked_in_classes(rng):
    labels = rng.integers(0, 3, size=(6, 10, 10))
    aff, mask = affinities(labels, NEAREST3 + ((0, -3, 0),))
    w = class_weights(aff, mask)
    assert w.dtype == np.float32 and w.shape == aff.shape
    assert not w[mask == 0].any() and (w[mask == 1] > 0).all()
    positive, negative = (aff == 1) & (mask == 1), (aff == 0) & (mask == 1)
    assert w[positive].sum() == pytest.approx(w[negative].sum(), rel=1e-5)
    assert w[mask == 1].mean() == pytest.approx(1.0, rel=1e-5)
    f = positive.sum() / mask.sum()
    np.testing.assert_allclose(w[positive], 0.5 / f, rtol=1e-6)
    np.testing.assert_allclose(w[negative], 0.5 / (1 - f), rtol=1e-6)
    # per channel: each channel balanced on its own
    wc = class_weights(aff, mask, per_channel=True)
    for k in range(aff.shape[0]):
        assert wc[k][positive[k]].sum() == pytest.approx(wc[k][negative[k]].sum(), rel=1e-5)
    assert not np.allclose(wc, w)


def test_class_weights_clip_an_absent_or_rare_class():
    mask = np.ones((1, 1, 100))
    w = class_weights(np.ones((1, 1, 100)), mask)  # no negatives: f clipped to 0.95
    np.testing.assert_allclose(w, 0.5 / 0.95, rtol=1e-6)
    aff = np.zeros((1, 1, 100))
    aff[0, 0, :2] = 1  # 2% positives: f clipped to 0.05, weight 10 (not 25)
    w = class_weights(aff, mask)
    np.testing.assert_allclose(w[0, 0, :2], 10.0, rtol=1e-6)
    np.testing.assert_allclose(w[0, 0, 2:], 0.5 / 0.95, rtol=1e-6)
    assert not class_weights(aff, np.zeros_like(mask)).any()  # nothing masked in: all 0
    with pytest.raises(EmtileError, match=r"mask of shape \(1, 100\) must have the shape of aff"):
        class_weights(aff, mask[0])


def test_importing_the_module_loads_no_torch():
    code = "import sys, emtile.affinities; print('torch' in sys.modules, 'numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


LONG9 = NEAREST3 + ((-3, 0, 0), (0, -3, 0), (0, 0, -3), (-9, 0, 0), (0, -9, 0), (0, 0, -9))


@pytest.mark.parametrize("offsets", [NEAREST3, LONG9])
def test_tta_permutations_rename_offsets_as_the_labels_transposed_do(offsets):
    """Transposing the labels, taking their affinities and transposing back gives the
    affinities of the labels themselves, channel ``order[c]`` for offset ``c``: the mapping the
    predictor averages with, checked against the definition (not against itself)."""
    labels = np.random.default_rng(0).integers(0, 4, (11, 11, 11))
    labels[2:5, 3:9, 1:4] = 7  # some objects larger than one voxel
    want, want_mask = affinities(labels, offsets)
    perms = tta_permutations(offsets, "aaa")
    assert len(perms) == 6 and perms[0] == ((0, 1, 2), tuple(range(len(offsets))))
    for perm, order in perms:
        aff, mask = affinities(labels.transpose(perm), offsets)
        inverse = [perm.index(a) for a in range(3)]
        back = aff.transpose(0, *(1 + a for a in inverse))[list(order)]
        assert np.array_equal(back, want), perm
        assert np.array_equal(mask.transpose(0, *(1 + a for a in inverse))[list(order)],
                              want_mask)


def test_tta_permutations_keep_to_alike_axes_and_a_closed_set_of_offsets():
    assert [p for p, _ in tta_permutations(NEAREST3, ["z", "yx", "yx"])] == [(0, 1, 2), (0, 2, 1)]
    assert [p for p, _ in tta_permutations(NEAREST3, "zyx")] == [(0, 1, 2)]
    # (0, 0, -3) has no partner along z or y: only the permutations that keep x
    only_x = NEAREST3 + ((0, 0, -3),)
    assert [p for p, _ in tta_permutations(only_x, "aaa")] == [(0, 1, 2), (1, 0, 2)]
    with pytest.raises(EmtileError, match="offsets of 3 axes for a model of 2 spatial axes"):
        tta_permutations(NEAREST3, "aa")
