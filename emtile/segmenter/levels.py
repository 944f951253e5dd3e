"""The map's own levels: a probability map brought to the distribution the defaults were tuned on.

``emtile segment``'s defaults (seeds above 0.88, faces merged up to a boundary probability of
0.2) were chosen on the maps of three models of one recipe. A map that is more or less sure
of itself (another model, another stack, a tool that calibrates differently) puts cells and
membranes at other levels: the same cells at ``p ~ 0.75`` instead of 0.9. Fixed levels then split
cells into many seeds or merge them (issue 22: V-Rand 0.89 against 0.97 for the map's own best
threshold on a second stack; 0.88 and 0.82 for the recipe's own map passed through ``p ** 0.5``
and ``p ** 2``).

``calibrate="map"`` therefore reads every level on a *reference scale*: before anything is
compared, each level ``v`` (0..255) of the map becomes ``lut[v]``, the reference level at the same
rank (histogram specification): the fraction of the map's pixels at or below ``v`` (mid-rank) is
looked up in :data:`REFERENCE` (the levels of the tuning maps at each fraction). The thresholds,
the flood's relief and the faces' scores then all mean on the map what they meant on the maps the
defaults were tuned on. Properties:

- a monotone recalibration of the map (``p -> f(p)``, ``f`` increasing) leaves the ranks, and so
  the labels, unchanged (up to uint8 levels that ``f`` merges);
- the table comes from the histogram of the whole map, counted in integers (:func:`histogram`;
  a volume of more than :data:`SAMPLE_PX` pixels counts evenly spaced slabs of it, whatever the
  blocks), so the labels stay the same for every block size;
- it assumes the map covers tissue like the tuning maps: the share of membrane is part of the
  ranks. A map with a large empty region (resin, a masked-out area at one level) or a tissue whose
  membranes cover a very different share of the pixels shifts the ranks; ``calibrate="none"``
  (or explicit thresholds, which mean the map's own levels) is then the choice, and
  ``emtile segment --report`` says how far the table moved the defaults.

:data:`REFERENCE` is the pooled histogram of the three recipe models' maps of ISBI 2012 slices
25-29 (``examples/train_isbi.py --seeds 0,1,2``; ``examples/bench_segment.py reference`` prints
it), the maps the defaults were chosen on, as levels at 64 equal steps of rank.
"""

import numpy as np
from numba import njit

__all__ = ["REFERENCE", "SAMPLE_PX", "MIN_GRADED", "usable", "histogram", "rank_lut",
           "reference_lut", "uint8_levels", "apply_lut", "level_of", "reference_from"]

#: Pixels counted for the histogram, at most: a larger volume counts evenly spaced z-slabs.
SAMPLE_PX = 2**28

#: Reference levels (0..255, as uint8 probabilities ``v / 255``) at ranks 0, 1/64, ..., 1.
REFERENCE = np.array([
    0.0, 3.4, 14.0, 25.2, 32.6, 40.2, 48.9, 58.8, 70.0, 82.1, 94.6, 107.1, 119.5, 131.2, 142.2,
    153.0, 164.4, 176.4, 187.5, 196.7, 205.0, 211.8, 217.9, 223.5, 227.9, 231.5, 234.3, 236.5,
    238.4, 239.9, 241.2, 242.3, 243.4, 244.3, 245.1, 245.9, 246.6, 247.2, 247.7, 248.2, 248.7,
    249.2, 249.6, 250.0, 250.5, 250.9, 251.4, 252.0, 252.6, 253.2, 253.7, 254.1, 254.5, 254.6,
    254.7, 254.8, 254.8, 254.9, 255.0, 255.0, 255.0, 255.0, 255.0, 255.0, 255.0])
REFERENCE.setflags(write=False)


def histogram(read, shape, *, sample_px=SAMPLE_PX, slab_px=2**24, threads=None):
    """Counts of the map's uint8 levels (0..255): int64, shape (256,).

    Parameters
    ----------
    read : callable
        ``read(z0, z1, y0, y1)`` -> uint8 levels of that box (floats already rounded to ``v/255``);
        called from several threads at once.
    shape : tuple of int
        (Z, Y, X).
    sample_px, slab_px : int
        A volume of more than ``sample_px`` pixels counts every ``k``-th slab of z-slices (a
        stride fixed by the shape alone); a slab reads at most ``slab_px`` pixels at a time.
    threads : int, optional
        Boxes read and counted at once (default: one per usable core). The counts are integer
        sums, the same in any order.
    """
    from concurrent.futures import ThreadPoolExecutor

    from emtile._process import usable_cores

    z, y, x = shape
    rows = max(1, min(y, slab_px // max(1, x)))  # y rows per read within one slice
    slices = max(1, slab_px // (y * x)) if rows == y else 1  # slices per read
    starts = list(range(0, z, slices))
    step = max(1, int(np.ceil(z * y * x / sample_px)))
    boxes = [(z0, min(z, z0 + slices), y0, min(y, y0 + rows))
             for z0 in starts[::step] for y0 in range(0, y, rows)]

    def count(box):
        out = np.zeros(256, np.int64)
        _count_levels(np.ascontiguousarray(read(*box)).reshape(-1), out)
        return out

    with ThreadPoolExecutor(threads or usable_cores()) as pool:
        return sum(pool.map(count, boxes), np.zeros(256, np.int64))


@njit(cache=True, nogil=True)
def _count_levels(levels, counts):
    """``counts[v] += 1`` for every uint8 ``v`` of ``levels`` (np.bincount would first copy
    them to int64: 8 bytes a pixel)."""
    for v in levels:
        counts[v] += 1


#: A map with fewer than this share of its pixels strictly between 0 and 1 (levels 1..254) is
#: read as stored: its ranks say nothing about its levels (an empty map, all 0, would otherwise
#: read as the reference's median, cell interior; a binary map has no levels to match). A
#: confident map's spike at 1 (seed 2 of the recipe: more than half its pixels) is no reason.
MIN_GRADED = 0.05


def usable(counts):
    """Whether a histogram can be calibrated: at least :data:`MIN_GRADED` of its pixels on
    levels strictly between 0 and 255."""
    counts = np.asarray(counts)
    total = counts.sum()
    return bool(total) and counts[1:255].sum() >= MIN_GRADED * total


def rank_lut(counts, reference):
    """The table ``lut[v]`` (uint8, shape (256,)): the reference level at the mid-rank of ``v``.

    Parameters
    ----------
    counts : ndarray, shape (256,)
        The map's histogram.
    reference : ndarray, shape (K + 1,)
        Reference levels at ranks ``0, 1/K, ..., 1`` (non-decreasing).

    Examples
    --------
    >>> counts = np.zeros(256, np.int64); counts[[10, 20]] = 1
    >>> lut = rank_lut(counts, np.array([0.0, 100.0, 200.0]))
    >>> int(lut[10]), int(lut[20])   # ranks 1/4 and 3/4
    (50, 150)
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total == 0:
        return np.arange(256, dtype=np.uint8)
    cdf = np.cumsum(counts) / total
    mid = cdf - counts / (2 * total)
    ranks = np.linspace(0.0, 1.0, len(reference))
    out = np.interp(mid, ranks, np.asarray(reference, np.float64))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def reference_lut(counts):
    """:func:`rank_lut` against :data:`REFERENCE`."""
    return rank_lut(counts, REFERENCE)


def uint8_levels(p):
    """The map's values as uint8 levels: uint8 as stored, floats in [0, 1] to the nearest 1/255."""
    p = np.asarray(p)
    if p.dtype == np.uint8:
        return p
    return np.clip(np.rint(p.astype(np.float32) * np.float32(255)), 0, 255).astype(np.uint8)


def apply_lut(p, lut):
    """The map's values (uint8 levels, or floats in [0, 1]) through ``lut``: uint8 levels."""
    return np.asarray(lut, np.uint8)[uint8_levels(p)]


def level_of(lut, value):
    """The lowest level of the map that reads above ``value`` on the reference scale (a
    probability), as a probability of the map: where ``threshold=value`` cuts the map."""
    above = np.nonzero(np.asarray(lut, np.float64) / 255 > value)[0]
    return float(above[0]) / 255 if above.size else 1.0


def reference_from(counts, steps=64):
    """Reference levels of a histogram (the pooled tuning maps): the level at each of
    ``steps + 1`` equal steps of rank (linear within a level), rounded to 0.1."""
    counts = np.asarray(counts, np.float64)
    cdf = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
    edges = np.arange(257, dtype=np.float64) - 0.5  # level v spans [v - 0.5, v + 0.5]
    ranks = np.linspace(0.0, 1.0, steps + 1)
    levels = np.interp(ranks, cdf, edges)
    return np.round(np.clip(levels, 0, 255), 1)
