"""The flood with pair costs (affinities, distance seeds) against a NumPy reference.

With ``levels`` a flood step from a pixel to its neighbour costs ``1 + 255 - level`` of the pair
between them, not the altitude of the pixel stepped into. The reference below is the definition
written plainly: synchronous rounds over whole arrays (each domain pixel takes the smallest of
its key and each keyed neighbour's key plus the step over their pair), then, if the last round
still changed keys, only the keys that a chain of final keys carries back to a seed are kept.
"""

import numpy as np
import pytest

from emtile.segmenter import flood as fl
from emtile.segmenter import kernels

UNSET = fl.UNSET
SHIFT = fl.COST_SHIFT


def shifted(a, ax, d, fill):
    """``out[v] = a[v + d e_ax]`` (``fill`` past the edge)."""
    out = np.full_like(a, fill)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    n = a.shape[ax]
    if d < 0:
        src[ax], dst[ax] = slice(0, n - 1), slice(1, n)
    else:
        src[ax], dst[ax] = slice(1, n), slice(0, n - 1)
    out[tuple(dst)] = a[tuple(src)]
    return out


def pair_alt(levels, ax, d):
    """Altitude of the pair between ``v`` and ``v + d e_ax``, per ``v`` (int64)."""
    n = levels.shape[1 + ax] - 1
    sl = [slice(0, s - 1) for s in levels.shape[1:]]
    if d > 0:
        sl[ax] = slice(1, n + 1)
    return 255 - levels[(ax,) + tuple(sl)].astype(np.int64)


def reference(seeds, domain, levels, rounds, origin, volume_shape):
    shape = seeds.shape
    gidx = np.ravel_multi_index(np.indices(shape).reshape(3, -1) + np.array(origin)[:, None],
                                volume_shape).reshape(shape)
    key = np.where(seeds, gidx, UNSET).astype(np.int64)
    moved = 0
    for r in range(rounds):
        new = key.copy()
        for ax in range(3):
            for d in (-1, 1):
                nb = shifted(key, ax, d, UNSET)
                step = (1 + pair_alt(levels, ax, d)) << SHIFT
                cand = np.where(nb != UNSET, nb + step, UNSET)
                new = np.where(domain & (cand < new), cand, new)
        if np.array_equal(new, key):
            break
        key = new
        moved = r + 1
    dropped = 0
    if moved == rounds and rounds > 0:
        ok = seeds.copy()
        for _ in range(rounds):
            grow = np.zeros_like(ok)
            for ax in range(3):
                for d in (-1, 1):
                    nb_ok = shifted(ok, ax, d, False)
                    nb = shifted(key, ax, d, UNSET)
                    step = (1 + pair_alt(levels, ax, d)) << SHIFT
                    grow |= nb_ok & (key != UNSET) & (key == nb + step)
            ok |= domain & grow
        drop = domain & (key != UNSET) & ~ok
        dropped = int(drop.sum())
        key = np.where(drop, UNSET, key)
    return key, moved, dropped


@pytest.mark.parametrize("trial", range(6))
def test_pair_flood_equals_the_reference(trial):
    rng = np.random.default_rng(trial)
    seen = {"early": 0, "dropped": 0}
    for case in range(12):
        shape = tuple(int(s) for s in rng.integers(2, 12, 3))
        volume_shape = tuple(s + int(e) for s, e in zip(shape, rng.integers(0, 4, 3)))
        origin = tuple(int(v - s) for v, s in zip(volume_shape, shape))
        seeds = rng.random(shape) < rng.choice([0.02, 0.1])
        domain = ~seeds & (rng.random(shape) > rng.choice([0.0, 0.2]))
        # levels with plateaus (ties) and a few strong walls
        levels = (rng.integers(0, 4, (3,) + tuple(s + 1 for s in shape)) * 85).astype(np.uint8)
        alt = rng.integers(0, 256, shape).astype(np.uint8)  # ignored with pairs
        rounds = int(rng.choice([1, 2, 3, 5, 40]))
        key, done, dropped = fl.run_flood(seeds, domain, alt, rounds, (0, 1, 2), origin,
                                          volume_shape, levels)
        ref, ref_done, ref_dropped = reference(seeds, domain, levels, rounds, origin,
                                               volume_shape)
        np.testing.assert_array_equal(key, ref)
        assert (done, dropped) == (ref_done, ref_dropped)
        np.testing.assert_array_equal(
            kernels.flood(seeds, domain, alt, rounds=rounds, axes=(0, 1, 2), origin=origin,
                          volume_shape=volume_shape, levels=levels), ref)
        seen["early"] += done < rounds
        seen["dropped"] += dropped > 0
    assert seen["early"]


def test_a_step_costs_its_pair_not_the_pixel():
    """A line of pixels: the seed at x=0 reaches x=1 over a weak pair (level 0); the seed at
    x=4 reaches x=3 and x=2 over strong pairs. The pixel altitudes would say the opposite."""
    seeds = np.zeros((1, 1, 5), bool)
    seeds[0, 0, [0, 4]] = True
    domain = ~seeds
    levels = np.full((3, 2, 2, 6), 255, np.uint8)
    levels[2, 0, 0, 1] = 0  # the pair (x=0, x=1)
    alt = np.array([[[0, 0, 255, 255, 0]]], np.uint8)
    key = kernels.flood(seeds, domain, alt, rounds=10, axes=(0, 1, 2), origin=(0, 0, 0),
                        volume_shape=(1, 1, 5), levels=levels)
    source = key & ((1 << SHIFT) - 1)
    assert source[0, 0].tolist() == [0, 4, 4, 4, 4]
    by_pixel = kernels.flood(seeds, domain, alt, rounds=10, axes=(0, 1, 2), origin=(0, 0, 0),
                             volume_shape=(1, 1, 5))
    assert (by_pixel & ((1 << SHIFT) - 1))[0, 0].tolist() == [0, 0, 0, 4, 4]


def test_pair_costs_need_all_three_axes():
    """Pair altitudes come per direction of all three axes: a 2-D neighbourhood is refused."""
    seeds = np.zeros((2, 3, 3), bool)
    seeds[0, 0, 0] = True
    levels = np.full((3, 3, 4, 4), 255, np.uint8)
    with pytest.raises(ValueError, match="pair costs need all three axes"):
        fl.run_flood(seeds, ~seeds, np.zeros((2, 3, 3), np.uint8), 4, (1, 2), (0, 0, 0),
                     (2, 3, 3), levels)
