"""Whole-volume scores of two id volumes: VOI split and merge and the adapted Rand error over
every voxel at once (not per slice), from a contingency table accumulated slab by slab.

The conventions are CREMI's (``cremi.evaluation``: ``voi`` and ``adapted_rand``, scored on 3-D
truth ids), with scikit-image's pair counting:

- *Ids as given.* An id is one object wherever its voxels lie, in one piece or in several: no
  connected components are computed (VOI and the Rand scores are functions of the contingency
  table, so connectivity does not enter). Renaming ids changes nothing.
- *Truth 0 is unlabelled* and left out: only voxels whose truth id is > 0 count (n of them). A
  predicted 0 is an ordinary id, *one* object (CREMI's ``ignore_reconstruction=[]``;
  scikit-image's ``ignore_labels=(0,)`` applies to the truth only).
- With ``c_ij`` the voxels of truth id i and predicted id j, ``a_i`` and ``b_j`` its row and
  column sums: *VOI split* ``H(pred | truth)`` and *VOI merge* ``H(truth | pred)``, in bits
  (split grows with over-segmentation, merge with under-segmentation); the *adapted Rand error*
  ``1 - 2P / (S + T)`` over pairs of distinct voxels, ``P = sum c_ij (c_ij - 1)``,
  ``S = sum b_j (b_j - 1)``, ``T = sum a_i (a_i - 1)``. With ``m = truth > 0`` these are exactly
  ``skimage.metrics.variation_of_information(truth[m], pred[m])`` (= ``[split, merge]``) and
  ``skimage.metrics.adapted_rand_error(truth[m], pred[m])[0]``. ``rand_precision`` is ``P / S``
  (low when objects are merged) and ``rand_recall`` ``P / T`` (low when they are split);
  scikit-image names its two ratios the other way round.
- *Edge cases*: no voxel with truth > 0 scores 0, 0, 0 with ``empty=True``; when no two counted
  voxels share an id (no pair at all) the adapted Rand error is 0 (scikit-image divides by zero).

The per-slice scores of binary labels (ISBI and CREMI, 2-D) are :mod:`emtile.metrics`';
:func:`emtile.evaluation.evaluate` reads the volumes in slabs and calls :class:`Contingency`.
"""

import numpy as np

from emtile._errors import EmtileError

__all__ = ["Contingency", "volume_scores", "VOLUME_SCORES", "VOLUME_CONVENTIONS"]

#: The scores a whole-volume result carries, in the order reports show them.
VOLUME_SCORES = ("voi_split", "voi_merge", "voi", "adapted_rand_error", "rand_precision",
                 "rand_recall")

#: What ``settings["conventions"]`` says for whole-volume scores, once, in every JSON.
VOLUME_CONVENTIONS = {
    "voi_split, voi_merge, adapted_rand_error": "CREMI, over the whole volume (not per slice): "
                                                "ids as given (an id is one object wherever its "
                                                "voxels lie; no connected components); truth 0 "
                                                "left out; a predicted 0 is one ordinary object; "
                                                "voi_split = H(pred|truth), voi_merge = "
                                                "H(truth|pred), in bits; adapted_rand_error = "
                                                "1 - F-score of Rand precision and recall over "
                                                "pairs of distinct voxels (as "
                                                "skimage.metrics.adapted_rand_error on the "
                                                "voxels where truth > 0)",
    "rand_precision, rand_recall": "P / S and P / T (pairs in one predicted object, one truth "
                                   "object): low precision = merges, low recall = splits",
}

_LOW = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_EXACT_N = 3_000_000_000  # below this many voxels, sums of squared counts fit in int64


def _starts(*sorted_keys):
    """Indices where a run of equal values begins in arrays sorted together."""
    change = np.zeros(sorted_keys[0].size, bool)
    change[0] = True
    for k in sorted_keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def _group(t, s, weights=None):
    """The distinct ``(t, s)`` pairs, sorted by t then s, as uint64 arrays, with their counts
    (or summed ``weights``), int64."""
    if not t.size:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64)
    if int(t.max()) <= int(_LOW) and int(s.max()) <= int(_LOW):  # one 64-bit key per voxel
        key = (t.astype(np.uint64) << _SHIFT) | s.astype(np.uint64)
        if weights is None:
            key = np.sort(key)
        else:
            order = np.argsort(key, kind="stable")
            key, weights = key[order], weights[order]
        first = _starts(key)
        ts, ss = key[first] >> _SHIFT, key[first] & _LOW
    else:  # ids past 2^32: sort by the two columns
        order = np.lexsort((s, t))
        t, s = t[order], s[order]
        weights = None if weights is None else weights[order]
        first = _starts(t, s)
        ts, ss = t[first].astype(np.uint64), s[first].astype(np.uint64)
    if weights is None:
        counts = np.diff(np.append(first, t.size)).astype(np.int64)
    else:
        counts = np.add.reduceat(weights, first).astype(np.int64)
    return ts, ss, counts


def _sum_squares(x, n):
    """``sum x^2``, exact (Python ints past what int64 holds)."""
    if n < _EXACT_N:
        return int(x @ x)
    return sum(int(v) * int(v) for v in x)


def _entropy(x, n):
    """``-sum q log2 q`` over ``q = x / n`` (bits)."""
    q = x[x > 0] / n
    return _nonneg(-np.sum(q * np.log2(q)))


def _nonneg(x):
    """``x`` as a float >= 0 (a difference of entropies a rounding error below 0 is 0; no -0)."""
    return max(float(x), 0.0) + 0.0


class Contingency:
    """The contingency table of a truth and a predicted id volume, added to slab by slab.

    Only voxels whose truth id is > 0 are counted; ids are taken as given (see the module
    docstring). Memory: the slab being added, and one row per distinct (truth, predicted) pair.

    Examples
    --------
    >>> table = Contingency()
    >>> table.add(np.array([[1, 1, 0, 2]]), np.array([[5, 5, 5, 5]]))  # two objects merged
    >>> s = table.scores()
    >>> s["voi_split"], round(s["voi_merge"], 6), s["adapted_rand_error"], s["n"]
    (0.0, 0.918296, 0.5, 3)
    """

    def __init__(self):
        self.t = np.zeros(0, np.uint64)
        self.s = np.zeros(0, np.uint64)
        self.counts = np.zeros(0, np.int64)
        self.voxels = 0

    def add(self, truth, pred):
        """Count one slab: ``truth`` and ``pred`` arrays of the same shape, ids >= 0."""
        truth, pred = np.asarray(truth), np.asarray(pred)
        if truth.shape != pred.shape:
            raise EmtileError(f"truth has shape {truth.shape} but pred has shape {pred.shape}; "
                              "they must have the same shape")
        self.voxels += truth.size
        inside = truth != 0
        t, s, c = _group(truth[inside], pred[inside])
        if self.counts.size:
            t, s, c = _group(np.concatenate([self.t, t]), np.concatenate([self.s, s]),
                             np.concatenate([self.counts, c]))
        self.t, self.s, self.counts = t, s, c

    def scores(self):
        """VOI split / merge and the adapted Rand error of what was added, as a dict of plain
        numbers: the :data:`VOLUME_SCORES`, ``n`` (voxels with truth > 0), ``voxels`` (all),
        ``truth_ids``, ``pred_ids`` (distinct ids on the n voxels, 0 included), ``pred_zero``
        (of the n voxels, those predicted 0), ``h_truth``, ``h_pred``, ``mutual_info`` (bits) and
        ``empty``."""
        c = self.counts
        n = int(c.sum())
        out = {"n": n, "voxels": int(self.voxels), "truth_ids": 0, "pred_ids": 0, "pred_zero": 0}
        if n == 0:
            return {"voi_split": 0.0, "voi_merge": 0.0, "voi": 0.0, "adapted_rand_error": 0.0,
                    "rand_precision": 1.0, "rand_recall": 1.0, **out, "h_truth": 0.0,
                    "h_pred": 0.0, "mutual_info": 0.0, "empty": True}
        a = np.add.reduceat(c, _starts(self.t))  # the table is sorted by truth id
        order = np.argsort(self.s, kind="stable")
        b = np.add.reduceat(c[order], _starts(self.s[order]))
        h_t, h_s, h_ts = _entropy(a, n), _entropy(b, n), _entropy(c, n)
        split, merge = _nonneg(h_ts - h_t), _nonneg(h_ts - h_s)
        pairs_p = _sum_squares(c, n) - n
        pairs_s, pairs_t = _sum_squares(b, n) - n, _sum_squares(a, n) - n
        den = pairs_s + pairs_t
        out.update(truth_ids=int(a.size), pred_ids=int(b.size),
                   pred_zero=int(c[self.s == 0].sum()))
        return {"voi_split": split, "voi_merge": merge, "voi": split + merge,
                "adapted_rand_error": 1.0 - 2.0 * pairs_p / den if den else 0.0,
                "rand_precision": pairs_p / pairs_s if pairs_s else 1.0,
                "rand_recall": pairs_p / pairs_t if pairs_t else 1.0,
                **out, "h_truth": h_t, "h_pred": h_s, "mutual_info": _nonneg(h_t + h_s - h_ts),
                "empty": False}


def volume_scores(truth, pred):
    """VOI split / merge and the adapted Rand error of two id volumes held in memory, over
    every voxel at once (see the module docstring for the conventions).

    Parameters
    ----------
    truth : ndarray of int, any shape, e.g. (Z, Y, X)
        Truth ids; 0 = unlabelled (left out).
    pred : ndarray of int, same shape
        Predicted ids; 0 is an ordinary id.

    Returns
    -------
    dict
        As :meth:`Contingency.scores`.

    Examples
    --------
    One truth object split in two halves: VOI split 1 bit, nothing merged.

    >>> t = np.ones((2, 2, 2), np.uint16)
    >>> p = np.arange(2, dtype=np.uint32).reshape(2, 1, 1) * np.ones((2, 2, 2), np.uint32)
    >>> s = volume_scores(t, p)
    >>> s["voi_split"], s["voi_merge"], s["adapted_rand_error"]
    (1.0, 0.0, 0.4)
    """
    from emtile.metrics import check_ids

    truth, pred = np.asarray(truth), np.asarray(pred)
    check_ids(truth, "truth")
    check_ids(pred, "pred")
    table = Contingency()
    table.add(truth, pred)
    return table.scores()
