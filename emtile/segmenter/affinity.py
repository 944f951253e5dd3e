"""Affinities as the segmenter's input: the nearest-neighbour links, read per block.

An affinity map (``(C, Z, Y, X)``; channel ``k`` at voxel ``v`` the probability that ``v`` and
``v + o_k`` lie in one object, :mod:`emtile.affinities`) enters the same engine as a probability
map (:mod:`emtile.segmenter`), through three quantities of the three nearest-neighbour channels
``(-1, 0, 0), (0, -1, 0), (0, 0, -1)`` only (long-range channels are read by nobody here):

*links*
    The pair ``(v - e_k, v)`` is linked when its affinity is above ``threshold`` (compared as
    uint8 levels, ``level / 255 > threshold`` in float32, as :func:`~emtile.segmenter.kernels.
    interior_mask` compares). The fragments' seeds are the connected components of the links
    (not of a voxel mask: two touching objects whose contact pairs are not linked stay apart).
    A voxel with at least one link (pairs leaving the volume do not count) is *interior*.
*altitude*
    Per voxel, ``255 -`` the rounded mean level of the (up to six) pairs that touch it inside
    the volume: the relief the bounded flood climbs to give unlinked voxels to fragments (lsd's
    and volara's boundary map).
*face scores*
    A pair of neighbouring voxels of two fragments weighs in on their face with its own
    altitude ``255 - level`` (waterz's rule: the affinities across the face, not the voxels'),
    summed for the mean and counted in :data:`AFF_BINS` bins over the whole range ``0..255``
    for quantile linkage. The bins do not depend on ``merge_threshold``, so the region graph
    does not either: ``recut`` agglomerates the stored graph at another threshold and gets the
    bytes a fresh run would give.

Every quantity at a voxel depends on the levels within one step, so a block reads one plane
more at its upper faces than a probability map needs (:func:`read_levels`); everything else
(halos, faces joined across blocks, records, the global step) is the engine's, which is why the
labels are the same for every block size.

*distance seeds* (``seeds="distance"``)
    The interior is the *core*: voxels whose every pair inside the volume is linked (a contact
    between two objects, unlinked, is then a boundary on both sides, as a membrane is in a
    probability map). The seeds are the maxima of the core's capped distance transform
    (:func:`~emtile.segmenter.kernels.seed_maxima`, several per object), flooded over the core
    and then over the rest, and every flood step from a voxel to its neighbour costs ``1 + 255
    - level`` of the pair between them (:func:`emtile.segmenter.flood.pad_pairs`), not the
    altitude of the voxel entered: a front crosses a contact only at the price of an unlinked
    pair, so one object's fragment does not take the thin rim of a touching one. Core voxels
    no seed reaches keep their link component (of core voxels) as a fragment. On FIB-25 (the
    recipe's models) these fragments merged by the truth score a VOI of about 1.0 against 1.5-1.8
    for the components of the links (README, "3-D").

With perfect affinities (1 inside an object, 0 across a contact and on pairs touching id 0),
every 6-connected piece of an object with two voxels or more is one component of the links,
different objects are never linked, and every face between two objects scores 255: at any
``threshold`` below 1 and ``merge_threshold`` below 1 the labels are the pieces exactly, on the
labelled voxels (``keep_boundaries`` leaves the id-0 voxels 0 as well). A piece of one voxel has
no link and cannot be told from id 0. With distance seeds too (the test's objects: every piece
has a core); a piece with no core voxel at all (two voxels thin) would go to its neighbours.
"""

import numpy as np
from numba import njit

from emtile._errors import EmtileError
from emtile.segmenter.pixels import _new_table, _rows, _slot

__all__ = ["NEAREST", "AFF_BINS", "nearest_channels", "read_levels", "signals", "link_labels",
           "link_face_pairs", "pair_edges", "link_lut", "quantile_limit"]

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
AFF_BINS = 32  # histogram bins of a face's altitudes over 0..255 (8 levels each)


def nearest_channels(offsets, channels, path):
    """The channel of each nearest-neighbour offset, checked: ``offsets`` (checked with
    :func:`emtile.affinities.check_offsets`) must count ``channels`` and hold all three."""
    from emtile.affinities import check_offsets

    offsets = check_offsets(offsets, ndim=3)
    text = ";".join(",".join(str(v) for v in o) for o in offsets)
    if len(offsets) != channels:
        raise EmtileError(f"offsets={text!r} gives {len(offsets)} offsets, but affinities "
                          f"{path!r} have {channels} channels: give one offset per channel")
    missing = [o for o in NEAREST if o not in offsets]
    if missing:
        raise EmtileError(f"offsets={text!r} lacks the nearest neighbour "
                          f"{','.join(map(str, missing[0]))}: segmenting needs "
                          f"-1,0,0;0,-1,0;0,0,-1 among the offsets")
    return offsets, tuple(offsets.index(o) for o in NEAREST)


def link_lut(threshold):
    """``lut[level]``: a pair of this uint8 level is linked (``level / 255 > threshold``)."""
    return (np.arange(256, dtype=np.float32) / np.float32(255)) > np.float32(threshold)


def _levels(values, path, start):
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind != "f":
        raise EmtileError(f"affinities {path!r} have dtype {values.dtype}: expected uint8 "
                          f"(0..255 meaning 0..1) or floats in [0, 1]")
    bad = ~((values >= 0) & (values <= 1))
    if bad.any():
        raise EmtileError(f"affinities {path!r} hold {values[bad].flat[0]} near voxel "
                          f"{tuple(int(s) for s in start)}: affinities are probabilities in "
                          f"[0, 1]")
    return np.rint(values.astype(np.float32) * np.float32(255)).astype(np.uint8)


def read_levels(arr, channels, start, stop, shape, path):
    """uint8 levels of the three nearest-neighbour channels over ``[start, stop + 1)`` (the
    plane past each upper face; 0 past the volume), shape ``(3, dz + 1, dy + 1, dx + 1)``."""
    hi = [min(b + 1, n) for b, n in zip(stop, shape)]
    out = np.zeros((3,) + tuple(b + 1 - a for a, b in zip(start, stop)), np.uint8)
    box = tuple(slice(a, b) for a, b in zip(start, hi))
    inner = tuple(slice(0, b - a) for a, b in zip(start, hi))
    lo = min(channels)
    if sorted(channels) == list(range(lo, lo + len(channels))):
        # one read: a chunk that holds several channels is fetched and decoded once, not once
        # per channel (emtile's stores chunk every channel together)
        run = np.asarray(arr[(slice(lo, lo + len(channels)),) + box])
        for k, c in enumerate(channels):
            out[(k,) + inner] = _levels(run[c - lo], path, start)
        return out
    for k, c in enumerate(channels):
        out[(k,) + inner] = _levels(np.asarray(arr[(c,) + box]), path, start)
    return out


def signals(levels, start, stop, shape, lut):
    """``(inside, alt, core)`` over ``[start, stop)``: voxels with a link, the altitude (255 -
    the rounded mean level of the pairs touching each voxel inside the volume), and the voxels
    whose every pair inside the volume is linked (the interior that distance seeds measure).

    One pass in Numba: three bytes a voxel (NumPy's sums and masks took about 50 more at their
    peak, the fragment pass's largest term)."""
    size = tuple(b - a for a, b in zip(start, stop))
    inside = np.empty(size, bool)
    alt = np.empty(size, np.uint8)
    core = np.empty(size, bool)
    _signals(levels, np.array(start, np.int64), np.array(shape, np.int64),
             np.asarray(lut, bool), inside, alt, core)
    return inside, alt, core


@njit(cache=True, nogil=True)
def _pair(level, lut, sums):
    """Count one pair inside the volume: ``sums`` = (level total, pairs, linked, unlinked)."""
    sums[0] += level
    sums[1] += 1
    if lut[level]:
        sums[2] += 1
    else:
        sums[3] += 1


@njit(cache=True, nogil=True)
def _signals(levels, start, shape, lut, inside, alt, core):
    Z, Y, X = inside.shape
    sums = np.zeros(4, np.int64)
    for z in range(Z):
        gz = z + start[0]
        for y in range(Y):
            gy = y + start[1]
            for x in range(X):
                gx = x + start[2]
                sums[:] = 0
                if gz > 0:
                    _pair(levels[0, z, y, x], lut, sums)
                if gz + 1 < shape[0]:
                    _pair(levels[0, z + 1, y, x], lut, sums)
                if gy > 0:
                    _pair(levels[1, z, y, x], lut, sums)
                if gy + 1 < shape[1]:
                    _pair(levels[1, z, y + 1, x], lut, sums)
                if gx > 0:
                    _pair(levels[2, z, y, x], lut, sums)
                if gx + 1 < shape[2]:
                    _pair(levels[2, z, y, x + 1], lut, sums)
                mean = (2 * sums[0] + sums[1]) // max(2 * sums[1], 1)
                alt[z, y, x] = 255 - mean
                inside[z, y, x] = sums[2] > 0
                core[z, y, x] = sums[2] > 0 and sums[3] == 0


@njit(cache=True, nogil=True)
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True, nogil=True)
def link_labels(levels, inside, lut):
    """Connected components of the links between ``inside`` voxels of the box ``inside.shape``
    (``levels`` as :func:`read_levels` gives them for that box) -> (labels uint32, count),
    numbered in C order of their first voxel; 0 where not ``inside``. (A chain never passes
    through a voxel outside ``inside``, as the blocks' joins across faces cannot.)"""
    Z, Y, X = inside.shape
    parent = np.arange(Z * Y * X)
    for z in range(Z):
        for y in range(Y):
            for x in range(X):
                if not inside[z, y, x]:
                    continue
                i = (z * Y + y) * X + x
                for k in range(3):
                    if k == 0:
                        if z == 0 or not lut[levels[0, z, y, x]] or not inside[z - 1, y, x]:
                            continue
                        j = i - Y * X
                    elif k == 1:
                        if y == 0 or not lut[levels[1, z, y, x]] or not inside[z, y - 1, x]:
                            continue
                        j = i - X
                    else:
                        if x == 0 or not lut[levels[2, z, y, x]] or not inside[z, y, x - 1]:
                            continue
                        j = i - 1
                    a, b = _find(parent, i), _find(parent, j)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
    labels = np.zeros((Z, Y, X), np.uint32)
    number = np.zeros(Z * Y * X, np.uint32)
    count = 0
    for z in range(Z):
        for y in range(Y):
            for x in range(X):
                if inside[z, y, x]:
                    r = _find(parent, (z * Y + y) * X + x)
                    if number[r] == 0:
                        count += 1
                        number[r] = count
                    labels[z, y, x] = number[r]
    return labels, count


def link_face_pairs(labels, levels, lut, *, start, stop):
    """Label pairs joined across the upper faces of the box ``[start, stop)`` of ``labels``
    by a link (as :func:`emtile.segmenter.kernels.face_pairs`, linked pairs only)."""
    out = []
    for ax in range(3):
        if stop[ax] >= labels.shape[ax]:
            continue
        lo = [slice(a, b) for a, b in zip(start, stop)]
        hi = list(lo)
        lo[ax] = stop[ax] - 1
        hi[ax] = stop[ax]
        a = labels[tuple(lo)].ravel()
        b = labels[tuple(hi)].ravel()
        keep = (a > 0) & (b > 0) & lut[levels[(ax,) + tuple(hi)].ravel()]
        if keep.any():
            out.append(np.stack([a[keep], b[keep]], axis=1).astype(np.int64))
    if not out:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(out), axis=0)


@njit(cache=True, nogil=True)
def _pair_rows(frag, levels, start, stop, n_bins):
    shape = frag.shape
    rows = _new_table(1 << 12, 5 + n_bins)
    k = 0
    for ax in range(3):
        end = min(stop[ax] + 1, shape[ax])
        hi = [stop[0], stop[1], stop[2]]
        hi[ax] = end - 1
        for z in range(start[0], hi[0]):
            for y in range(start[1], hi[1]):
                for x in range(start[2], hi[2]):
                    a = frag[z, y, x]
                    if a <= 0:
                        continue
                    if ax == 0:
                        z2, y2, x2 = z + 1, y, x
                    elif ax == 1:
                        z2, y2, x2 = z, y + 1, x
                    else:
                        z2, y2, x2 = z, y, x + 1
                    b = frag[z2, y2, x2]
                    if b <= 0 or b == a:
                        continue
                    j, k, rows = _slot(rows, k, min(a, b), max(a, b))
                    alt = 255 - np.int64(levels[ax, z2, y2, x2])
                    rows[j, 2] += alt
                    rows[j, 3] += 1
                    rows[j, 4] += 1
                    rows[j, 5 + alt * n_bins // 256] += 1
    return _rows(rows)


def pair_edges(frag, levels, *, start, stop):
    """Region-graph edges of the box ``[start, stop)`` of ``frag`` scored by the pairs' own
    affinities: ``(u, v, altitude_sum, pairs, pairs, histogram of AFF_BINS)`` per fragment
    pair ``u < v`` (pairs ``(x, x + e)`` with ``x`` in the box, as
    :func:`emtile.segmenter.kernels.adjacent_pairs` counts them), sorted."""
    from emtile.segmenter.kernels import _by_pair

    rows = _pair_rows(np.ascontiguousarray(frag, np.int64), levels, np.array(start, np.int64),
                      np.array(stop, np.int64), AFF_BINS)
    return _by_pair(rows)


def quantile_limit(merge_threshold):
    """The highest histogram bin (of :data:`AFF_BINS` over altitudes 0..255) lying wholly at or
    below ``merge_threshold * 255``: quantile linkage merges a face whose quantile falls in a
    bin up to this one (-1: none)."""
    level = int(np.floor(np.float64(merge_threshold) * 255))
    return (level + 1) * AFF_BINS // 256 - 1


def open_affinities(path, arr, meta, offsets):
    """Check an affinity input: ``(shape (Z, Y, X), offsets, channels)``.

    ``meta`` is the store's ``emtile`` attributes (``{}`` for a foreign array); ``offsets`` the
    user's (text or sequences), needed when the store records none.
    """
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) != 4 or 0 in shape:
        raise EmtileError(f"affinities {path!r} have shape {shape}: expected (C, Z, Y, X)")
    if meta and not meta.get("complete"):
        raise EmtileError(f"affinities {path!r} are incomplete (their emtile predict run did "
                          f"not finish): run emtile predict again to finish it")
    if offsets is None:
        offsets = meta.get("offsets")
    if offsets is None:
        raise EmtileError(f"affinities {path!r} (shape {shape}) record no offsets: give "
                          f"them, one per channel, e.g. offsets=\"-1,0,0;0,-1,0;0,0,-1\"")
    dtype = np.dtype(arr.dtype)
    if dtype != np.uint8 and dtype.kind != "f":
        raise EmtileError(f"affinities {path!r} have dtype {dtype}: expected uint8 (0..255 "
                          f"meaning 0..1) or floats in [0, 1]")
    offsets, channels = nearest_channels(offsets, shape[0], path)
    return shape[1:], offsets, channels
