"""Instance colours: a label image's segments in distinct colours, neighbours' hues apart.

:func:`segmentation_rgba` is what ``emtile show`` draws a segmentation (and, in the planes
view, a ground truth's ids) with: a fixed colour table, each id's entry chosen by a hash of the
id (so an object keeps its colour from slice to slice and figure to figure), moved on to another
hue where a neighbouring segment would share it.
"""

import numpy as np

from emtile._errors import EmtileError

__all__ = ["segmentation_rgba", "SEG_ALPHA"]

SEG_ALPHA = 0.55  # opacity of the instance colours over the raw slice
_HUES, _SHADES = 16, ((0.85, 1.0), (1.0, 0.7))  # the instance colour table: hue x (sat, value)
_NEAR = ((0, 1), (1, 0), (0, 2), (2, 0), (1, 1), (1, -1))  # offsets of "neighbouring" segments


def segmentation_rgba(labels, *, seed=0, alpha=1.0):
    """The instances of a label image in distinct colours, 0 transparent: an RGBA image.

    Each id has a colour from a fixed table (16 hues in two shades, shuffled by ``seed``),
    chosen by a hash of the id, so an object keeps its colour from slice to slice and figure to
    figure; where two neighbouring segments (touching, or apart by a one-pixel line) would
    share a hue, the later id takes the next entry whose hue differs from all its neighbours'.
    Slices given together are coloured together: one colour per id in all of them.

    Parameters
    ----------
    labels : ndarray of int, shape (Y, X) or (Z, Y, X)
        Segment ids (>= 0); 0 = no segment (transparent).
    seed : int
        Shuffles the colour table.
    alpha : float
        Opacity of the labelled pixels.

    Returns
    -------
    ndarray of float64, shape ``labels.shape + (4,)``
        RGBA in [0, 1]; alpha 0 where ``labels`` is 0.

    Examples
    --------
    >>> rgba = segmentation_rgba(np.array([[0, 7, 7, 9]]), alpha=0.5)
    >>> rgba[0, 0].tolist(), float(rgba[0, 1, 3]), bool((rgba[0, 1] == rgba[0, 2]).all())
    ([0.0, 0.0, 0.0, 0.0], 0.5, True)
    >>> bool((rgba[0, 2, :3] != rgba[0, 3, :3]).any())      # neighbours differ
    True
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3) or not (np.issubdtype(labels.dtype, np.integer)
                                         or labels.dtype == np.bool_):
        raise EmtileError(f"labels must be a 2-D or 3-D array of integer ids, got shape "
                          f"{labels.shape} and dtype {labels.dtype}")
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    table = _colour_table(seed)
    entries = _pick_entries(ids, _neighbours(inverse if labels.ndim == 3 else inverse[None], ids),
                            seed)
    colours = np.concatenate([table[entries], np.full((ids.size, 1), float(alpha))], axis=1)
    colours[ids == 0] = 0.0
    return colours[inverse]


def _colour_table(seed):
    """``_HUES * len(_SHADES)`` RGB colours; entries ``k`` and ``k + _HUES`` share a hue (the
    hues' order shuffled by ``seed``)."""
    from matplotlib.colors import hsv_to_rgb

    hsv = [((h + 0.5) / _HUES, sat, val) for sat, val in _SHADES for h in range(_HUES)]
    rgb = hsv_to_rgb(np.array(hsv))
    hues = np.random.default_rng(seed).permutation(_HUES)  # which colour each hue slot shows
    return rgb[np.concatenate([hues + k * _HUES for k in range(len(_SHADES))])]


def _neighbours(index, ids):
    """For each position in ``ids``, the set of positions of segments near it in any slice of
    ``index`` (positions into ``ids``, shape (Z, Y, X)): touching, or one pixel apart."""
    zero = 0 if ids.size and ids[0] == 0 else -1  # ids are sorted
    pairs = []
    for dy, dx in _NEAR:
        y1, x1 = index.shape[1] - dy, index.shape[2] - abs(dx)
        if y1 <= 0 or x1 <= 0:
            continue
        a = index[:, :y1, max(0, -dx):max(0, -dx) + x1]
        b = index[:, dy:, max(0, dx):max(0, dx) + x1]
        keep = (a != b) & (a != zero) & (b != zero)
        pairs.append(np.stack([a[keep], b[keep]], axis=1))
    near = [set() for _ in range(ids.size)]
    if pairs:
        for i, j in np.unique(np.sort(np.concatenate(pairs), axis=1), axis=0).tolist():
            near[i].add(j)
            near[j].add(i)
    return near


def _pick_entries(ids, near, seed):
    """Table entry per id: its hashed entry, or the next one whose hue no neighbour has."""
    size = _HUES * len(_SHADES)
    with np.errstate(over="ignore"):
        mixed = (ids.astype(np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
    start = ((mixed >> np.uint64(32)) % np.uint64(size)).astype(np.int64)
    entries = np.full(ids.size, -1, np.int64)
    for i in range(ids.size):  # ascending ids: the earlier id keeps its colour
        taken = {int(entries[j]) for j in near[i] if entries[j] >= 0}
        hues = {e % _HUES for e in taken}
        candidates = [(int(start[i]) + k) % size for k in range(size)]
        entries[i] = next((e for e in candidates if e % _HUES not in hues),
                          next((e for e in candidates if e not in taken), int(start[i])))
    return entries
