"""Array operations of one block: masks, labels, seeds, the bounded flood, faces and edges.

Everything here takes NumPy arrays of one read region (a block's write region plus its halo) and
plain keyword parameters; nothing opens a store. Arrays are always 3-D ``(Z, Y, X)`` (a 2-D image
is one slice). ``axes`` lists the axes along which pixels are neighbours: ``(1, 2)`` for
``mode="2d"`` (each slice on its own, 4-connected), ``(0, 1, 2)`` for ``mode="3d"``
(6-connected).

The flood (:func:`flood`) is the one operator that moves labels. It is defined as a fixed number
of synchronous rounds of a rule that looks only at a pixel's direct neighbours, so its value at a
pixel depends only on the pixels within ``rounds`` steps: computed on any region that holds that
neighbourhood it gives the same bits (see the package docstring for why that makes the blockwise
result exact).
"""

import numpy as np

from emtile._errors import EmtileError

__all__ = ["interior_mask", "altitude", "label_components", "seed_maxima", "flood",
           "source_labels", "sum_edges", "sum_edge_rows", "altitude_bins", "face_limit", "COST_SHIFT",
           "INDEX_LIMIT", "UNSET", "MAX_ROUNDS", "FACE_BINS"]

# A flood key packs (cost, source) into one int64, compared as a whole:
#   cost   = sum over the path's pixels (seed excluded) of 1 + altitude, bits 44..62
#            (at most MAX_ROUNDS * 256 < 2**19)
#   source = global linear index of the seed pixel (< 2**44), bits 0..43
# so np.minimum picks the cheapest path, then the lowest seed index.
COST_SHIFT = 44
INDEX_LIMIT = 1 << COST_SHIFT
MAX_ROUNDS = 255
UNSET = np.int64((1 << 63) - 1)  # above every key
_INDEX_MASK = np.int64(INDEX_LIMIT - 1)
FACE_BINS = 8  # bins of a face's altitude histogram (quantile linkage), over [0, merge limit]


def interior_mask(p, threshold):
    """Cell interior: ``p > threshold``, with ``p`` as :func:`emtile.predict` stores it.

    Parameters
    ----------
    p : ndarray
        Probabilities of cell interior: uint8 (``v`` means ``v / 255``), float16 or float32.
    threshold : float
        In [0, 1]. The comparison is done in float32, as ``emtile predict --threshold`` does.

    Returns
    -------
    ndarray of bool, shape of ``p``
    """
    p = np.asarray(p)
    t = np.float32(threshold)
    if p.dtype == np.uint8:
        lut = (np.arange(256, dtype=np.float32) / np.float32(255)) > t
        return lut[p]
    return p.astype(np.float32, copy=False) > t


def altitude(p):
    """Boundary probability ``1 - p`` as integers 0..255 (uint8), the relief the flood climbs.

    uint8 probabilities map exactly (``255 - v``); floats are rounded to the nearest 1/255.
    """
    p = np.asarray(p)
    if p.dtype == np.uint8:
        return np.uint8(255) - p
    q = np.rint((1.0 - p.astype(np.float32)) * np.float32(255))
    return np.clip(q, 0, 255).astype(np.uint8)


def face_limit(merge_threshold):
    """The highest altitude level (0..255) at or below ``merge_threshold * 255``."""
    return int(np.floor(np.float64(merge_threshold) * 255))


def altitude_bins(limit, n_bins=FACE_BINS):
    """Bin of each altitude level for a face's histogram: levels ``0..limit`` in ``n_bins``
    equal runs (``level * n_bins // (limit + 1)``), levels above ``limit`` -1 (not counted).

    Parameters
    ----------
    limit : int
        Highest altitude (0..255) that may be merged: ``floor(merge_threshold * 255)``.
    n_bins : int

    Returns
    -------
    ndarray of int64, shape (256,)
    """
    level = np.arange(256, dtype=np.int64)
    return np.where(level <= limit, level * n_bins // (int(limit) + 1), -1)


def _structure(axes):
    s = np.zeros((3, 3, 3), bool)
    s[1, 1, 1] = True
    for ax in axes:
        idx = [1, 1, 1]
        for d in (0, 2):
            idx[ax] = d
            s[tuple(idx)] = True
    return s


def label_components(mask, *, axes):
    """Connected components of ``mask`` (face-connected along ``axes``) -> (uint32 labels, count)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=_structure(axes))
    return labels.astype(np.uint32, copy=False), int(count)


def seed_maxima(mask, *, cap, radius, axes, sampling=(1.0, 1.0, 1.0)):
    """Seed pixels: local maxima of the interior's distance to the boundary, capped at ``cap``.

    ``d = min(EDT(mask), cap)`` (Euclidean distance to the nearest non-interior pixel, in
    in-plane pixels; ``sampling`` scales the axes), and a pixel is a seed when it is interior,
    ``d`` is at least 1 and ``d`` equals the maximum of ``d`` over the box of ``radius`` pixels
    around it (along ``axes``). Inside cells wider than ``2 * cap`` the whole core
    ``{d == cap}`` is one plateau of seeds.

    The value at a pixel depends only on the pixels within ``cap + radius`` (per axis, scaled by
    ``sampling``), so the function is exact on any region with that much context. The volume
    edge is not a boundary (as in :func:`scipy.ndimage.distance_transform_edt`); a region with no
    boundary pixel at all has ``d = cap`` everywhere (SciPy would measure from a virtual
    boundary outside the array's first corner).
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    d = np.full(mask.shape, np.float64(cap))
    if 0 in axes:
        if not mask.all():
            d = np.minimum(ndimage.distance_transform_edt(mask, sampling=sampling), cap)
    else:
        for z in range(mask.shape[0]):
            if not mask[z].all():
                d[z] = np.minimum(ndimage.distance_transform_edt(mask[z], sampling=sampling[1:]),
                                  cap)
    size = [1, 1, 1]
    for ax in axes:
        size[ax] = 2 * _axis_radius(radius, sampling, ax) + 1
    peak = ndimage.maximum_filter(d, size=size, mode="nearest")
    return mask & (d >= 1) & (d == peak)


def _axis_radius(radius, sampling, ax):
    """``radius`` in-plane pixels along axis ``ax`` (fewer along a coarser axis)."""
    return int(np.ceil(radius / sampling[ax] - 1e-9))


def flood(seeds, domain, alt, *, rounds, axes, origin, volume_shape, levels=None):
    """Give domain pixels the seed they reach most cheaply over the boundary map, in ``rounds``
    local rounds (a seeded watershed on topographic distance, bounded).

    A pixel's key is ``(cost, source)`` (packed, see ``COST_SHIFT``): a seed pixel starts at
    ``(0, its global index)``, every other pixel unset. Each round, every domain pixel takes the
    smallest of its own key and, from each neighbour along ``axes``, the neighbour's key *of the
    previous round* extended by one step into the pixel: ``(cost + 1 + alt[pixel], source)``.
    Pixels outside the domain keep their key (seeds) or stay unset (walls). The rounds stop
    early when a round changes nothing (later rounds would change nothing either). The rounds
    run in Numba, evaluating only the pixels next to a change (:mod:`emtile.segmenter.flood`).

    This is Bellman-Ford with a hop limit: a pixel ends with the seed of the cheapest path of
    at most ``rounds`` steps, ties going to the lower seed index. Steps cost more the higher the
    boundary probability, so fronts from two cells meet where the boundary peaks (the ridge a
    watershed follows). The extension keeps the order of keys, so once the rounds converge every
    pixel's key is carried by a neighbour's (same seed, one step cheaper): each label is
    connected to its seed. When the last round still changed keys, a pixel can be left with a
    key whose path ran through a neighbour that has since taken a better one; those pixels
    (and any carried only by them) are unset, so labels stay connected.

    Because each round looks one step away, the keys at a pixel are a function of the pixels
    within ``rounds`` steps, and the check of a chain of at most ``rounds`` links needs the keys
    along it: the result at a pixel is a function of the pixels within ``2 * rounds`` steps,
    whatever the array around them. (An unbounded watershed is not local: a label can travel
    along a valley of the boundary map arbitrarily far.)

    Parameters
    ----------
    seeds : ndarray of bool, shape (Z, Y, X)
    domain : ndarray of bool, shape (Z, Y, X)
        Pixels that may take a seed (disjoint from ``seeds``).
    alt : ndarray of uint8, shape (Z, Y, X)
        Boundary altitude (:func:`altitude`).
    rounds : int
        At most :data:`MAX_ROUNDS`.
    axes : tuple of int
    origin : tuple of int
        Position of the array's first pixel in the volume (for global seed indices).
    volume_shape : tuple of int
        The whole volume's shape (3-D).
    levels : ndarray of uint8, shape (3, Z + 1, Y + 1, X + 1), optional
        Affinity levels of the box (:func:`emtile.segmenter.affinity.read_levels`; all three
        axes): a step then costs ``1 + 255 - level`` of the pair it crosses instead of
        ``1 + alt`` of the pixel it enters (:func:`emtile.segmenter.flood.pad_pairs`).

    Returns
    -------
    ndarray of int64, shape (Z, Y, X)
        The keys; :data:`UNSET` where no seed arrived. :func:`source_labels` reads a label at
        each key's seed.
    """
    if not 0 <= rounds <= MAX_ROUNDS:
        raise EmtileError(f"rounds={rounds} must be between 0 and {MAX_ROUNDS}")
    from emtile.segmenter.flood import run_flood

    return run_flood(seeds, domain, alt, rounds, axes, origin, volume_shape, levels)[0]


def source_labels(key, labels, *, origin, volume_shape, fill=0, out=None):
    """The label at each pixel's seed: ``labels`` (same shape as ``key``, at ``origin`` in the
    volume) read at the source of ``key``; ``fill`` where no seed arrived.

    Every source must lie inside the array (a flood's sources always do). ``out`` (int64, shape
    of ``key``) may be ``key`` itself: each pixel's key is read before its label is written.

    Returns
    -------
    ndarray of int64, shape of ``key``
    """
    from emtile.segmenter.pixels import labels_at_sources

    fill = np.broadcast_to(np.asarray(fill, np.int64), key.shape)
    out = np.empty(key.shape, np.int64) if out is None else out
    labels = np.asarray(labels)
    if labels.dtype not in (np.uint32, np.int64):  # the provisional ids' types, compiled once
        labels = labels.astype(np.int64)
    labels_at_sources(key, labels, fill, np.array(origin, np.int64),
                      np.array(volume_shape, np.int64), out)
    return out


def face_pairs(labels, *, start, stop, axes):
    """Label pairs that touch across the upper faces of the box ``[start, stop)`` of ``labels``.

    For each axis in ``axes`` whose ``stop`` is inside the array, the box's last plane is paired
    with the plane just after it; pairs where both labels are nonzero are returned (unique,
    shape (k, 2), int64). Counting only upper faces gives every face of a block plan once.
    """
    out = []
    for ax in axes:
        if stop[ax] >= labels.shape[ax]:
            continue
        lo = [slice(a, b) for a, b in zip(start, stop)]
        hi = list(lo)
        lo[ax] = stop[ax] - 1
        hi[ax] = stop[ax]
        a = labels[tuple(lo)].ravel()
        b = labels[tuple(hi)].ravel()
        keep = (a > 0) & (b > 0)
        if keep.any():
            out.append(np.stack([a[keep], b[keep]], axis=1).astype(np.int64))
    if not out:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(out), axis=0)


def adjacent_pairs(frag, alt, source, *, start, stop, axes, origin, volume_shape,
                   sampling=(1.0, 1.0, 1.0), bins=None, n_bins=FACE_BINS):
    """Region-graph edges of the box ``[start, stop)``: neighbouring pixels with two fragments.

    Pairs ``(x, x + e)`` with ``x`` in the box and ``x + e`` in the box or one plane past its
    upper face (inside the array), along each axis in ``axes``, both fragments nonzero and
    different. Every pair counts as *contact*; a pair is *evidence* (its altitudes are summed
    into the face's mean) when it lies on a boundary between the two fragments rather than
    along it: both pixels interior (their ``source`` is themselves), or both boundary pixels
    whose labels arrived from opposite sides (the vectors from each pixel to its ``source``
    point away from each other, negative dot product). Boundary pixels that two fragments of
    one cell split side by side (the vectors point the same way) are contact only, so a cell's
    fragments are not kept apart by the membrane around the cell.

    Parameters
    ----------
    frag : ndarray of int64, shape (Z, Y, X)
    alt : ndarray of uint8, shape (Z, Y, X)
    source : ndarray of int64, shape (Z, Y, X)
        Global index of the pixel each pixel's label came from (the boundary flood's source;
        itself for interior pixels); read only where ``frag`` is nonzero.
    bins : ndarray of int64, shape (256,), optional
        The histogram bin of each altitude level, -1 for none (:func:`altitude_bins`): the
        evidence pixels are also counted per bin, in ``n_bins`` more columns.
    n_bins : int

    Returns
    -------
    ndarray of int64, shape (k, 5) (or (k, 5 + n_bins) with ``bins``)
        ``(u, v, altitude_sum, pixels, contact[, histogram...])`` per fragment pair ``u < v``:
        the altitudes of both pixels of every evidence pair are summed and ``pixels`` counts
        them (2 per pair), so the mean boundary probability on the face is
        ``altitude_sum / pixels / 255``; ``contact`` counts all touching pairs; the histogram
        counts the evidence pixels per altitude bin.
    """
    from emtile.segmenter.pixels import edge_sums

    n_bins = 0 if bins is None else int(n_bins)
    bins = np.full(256, -1, np.int64) if bins is None else np.asarray(bins, np.int64)

    rows = edge_sums(frag, alt, source, np.array(start, np.int64), np.array(stop, np.int64),
                     np.array([ax in axes for ax in range(3)]), np.array(origin, np.int64),
                     np.array(volume_shape, np.int64), np.array(sampling, np.float64), bins,
                     n_bins)
    return _by_pair(rows)


def sum_edges(u, v, *values):
    """Sum each of ``values`` over repeated ``(u, v)`` pairs -> (k, 2 + len(values)) int64,
    sorted by ``(u, v)``."""
    columns = np.empty((np.size(u), len(values)), np.int64)
    for k, x in enumerate(values):
        columns[:, k] = x
    return sum_edge_rows(u, v, columns)


def sum_edge_rows(u, v, values):
    """:func:`sum_edges` of the columns of ``values`` (int64, shape (k, m), C order): the same
    rows, without a copy of each column first."""
    from emtile.segmenter.pixels import group_sums

    u, v = np.asarray(u, np.int64).reshape(-1), np.asarray(v, np.int64).reshape(-1)
    values = np.ascontiguousarray(values, np.int64)
    if u.size == 0:
        return np.zeros((0, 2 + values.shape[1]), np.int64)
    return _by_pair(group_sums(u, v, values))


def _by_pair(rows):
    """Rows with distinct ``(u, v)`` in their first two columns, sorted by them: one sort of
    ``u * span + v`` when that fits in int64 (ids of a block or a group of blocks), else two."""
    if len(rows) < 2:
        return rows
    u, v = rows[:, 0], rows[:, 1]
    lo = int(min(u.min(), v.min()))
    span = int(max(u.max(), v.max())) - lo + 1
    if span < 2**31:
        return rows[np.argsort((u - lo) * span + (v - lo))]
    return rows[np.lexsort((v, u))]


def fragment_stats(frag, inside, *, origin, volume_shape):
    """Per fragment of a write region: ``(id, interior pixels, first global index)``, int64 (k, 3).

    The size counts the fragment's interior pixels (``inside``), not the boundary it was given,
    so a speck of noise in a wide membrane stays small however much membrane it floods. The
    first global index (C order) is the smallest over all the fragment's pixels in this region:
    the block's C order is the volume's.
    """
    from emtile.segmenter.pixels import fragment_table

    rows = fragment_table(frag, np.asarray(inside, bool), np.array(origin, np.int64),
                          np.array(volume_shape, np.int64))
    rows = rows[rows[:, 2] >= 0]
    return rows[np.argsort(rows[:, 0], kind="stable")]
