"""Pixel metrics and the ISBI 2012 connectomics scores (V-Rand, V-Info), computed slab by slab.

Two families of numbers, both against a binary ground truth (1 = cell interior, 0 = membrane):

**Pixel metrics** (:func:`pixel_metrics`, :func:`metrics_from_counts`): the prediction is
thresholded and compared pixel by pixel. Foreground (the positive class) is the cell interior,
label 1. Accuracy, pixel error (1 - accuracy), precision, recall, F1 (= Dice) and IoU (= Jaccard)
of the foreground, the 2x2 confusion matrix ``[[TN, FP], [FN, TP]]`` (rows: truth 0/1, columns:
prediction 0/1, as :func:`sklearn.metrics.confusion_matrix`) and scikit-learn's
``classification_report`` text. :func:`emtile.evaluation.evaluate` accumulates the four counts
over z-slabs, so a volume larger than memory can be scored, and builds the report exactly from
them (the four counts are passed to scikit-learn as ``sample_weight``). A 0/0 ratio (e.g.
precision when nothing is predicted as foreground) is 1.0 when truth and prediction agree that
there is no foreground (TP + FP + FN = 0) and 0.0 otherwise.

**ISBI 2012 scores** (:func:`isbi_scores`, :func:`v_rand`, :func:`v_info`), following the
challenge's Fiji evaluation (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142; Fiji's
``trainableSegmentation.metrics.RandError.getMaximalVRandAfterThinning`` and
``VariationOfInformation.getMaximalVInfoAfterThinning``), slice by slice (the challenge is 2-D):

1. *Truth segments* T: the label-1 pixels are split into 4-connected components; membrane
   pixels (label 0) are left out of the score entirely ("foreground-restricted").
2. *Predicted segments* S: the prediction is thresholded (``p > threshold``, strictly, as Fiji
   does), the cell interiors are labelled as 4-connected components, and the predicted
   boundaries are thinned to one pixel by a marker-controlled watershed (markers = the
   interiors; flat relief, so the fronts meet halfway across a boundary; 4-connectivity with
   watershed lines, :func:`thin_boundaries`). Boundary pixels that separate no two segments are
   absorbed into their segment.
3. Only pixels inside the truth foreground are counted (n of them). A predicted boundary pixel
   (a watershed line) that falls inside the truth foreground counts as its own singleton
   segment.
4. With ``p_ij`` the fraction of those n pixels in truth segment i and predicted segment j,
   ``t_i``, ``s_j`` the marginals (singletons included in s and p):

   - ``V-Rand = sum p_ij^2 / (0.5 sum s_j^2 + 0.5 sum t_i^2)``: the F-score of the Rand split
     and merge scores, with Rand precision ``sum p^2 / sum s^2`` and recall
     ``sum p^2 / sum t^2`` (Fiji's N^2 normalisation: pairs are ordered and include a pixel
     paired with itself).
   - ``V-Info = 2 I(S;T) / (H(S) + H(T))``: the F-score of the information-theoretic split and
     merge scores ``I/H(T)`` and ``I/H(S)``; natural logarithms (as Fiji; the ratio does not
     depend on the base).
   - ``Rand error = 1 - V-Rand``.

5. A stack's score is the mean over its scored slices. ``sweep=True`` is the challenge's
   "maximal" variant: thresholds 0.0, 0.1, ..., 1.0 (11 values); the stack's mean V-Rand and
   mean V-Info are computed at each, and each is maximised *separately* over the threshold
   (the Fiji script calls the two maximisations independently, so the best V-Rand threshold
   may differ from the best V-Info threshold). One threshold serves all slices of the stack;
   there is no per-slice choice.

Conventions and documented differences
--------------------------------------
- *Empty truth slice* (no label-1 pixel, n = 0): nothing is left to score after the foreground
  restriction. The slice gets V-Rand = V-Info = 1.0 (no pair can disagree) with
  ``empty=True``, and is left out of the stack means; if every slice is empty the means are 1.0.
  (Fiji divides by zero here.)
- *Single-segment case* (H(S) + H(T) = 0: one truth segment and one predicted segment covering
  it, no singletons): the segmentations agree, V-Info = 1.0. Fiji's code sets the information
  precision/recall to 0/1 when an entropy is 0 and so reports 0.0. When only one of the
  entropies is 0, I = 0 and V-Info = 0.0, as in Fiji.
- *Thresholds*: exact decimals 0.0 ... 1.0. Fiji accumulates ``th += 0.1`` in floating point,
  so its last threshold is 0.9999999999999999 rather than 1.0 (a probability of exactly 1.0
  counts as interior there, not here). Fiji also thresholds the ground truth with the same
  threshold; here the truth is binarised once (label != 0), which is the same for 0/255 labels.
- *uint8 probabilities* (0-255 meaning 0..1) are compared exactly: ``v / 255 > t``.
- *Stack aggregation*: the mean of per-slice scores (what the challenge table reports per
  stack). ``v_rand_pooled`` is also given: the per-slice pair counts summed over slices (each
  slice weighted by its number of foreground pairs) before forming the F-score.
- *scikit-image* ``skimage.metrics.adapted_rand_error(truth, pred, ignore_labels=(0,))``
  restricts to the truth foreground the same way, but (a) counts unordered pairs of distinct
  pixels, ``sum c(c-1)`` instead of ``sum c^2`` (N(N-1) vs. N^2 normalisation), (b) treats
  predicted label 0 as one ordinary segment rather than singletons, (c) does no thinning and
  takes label images, not probabilities, and (d) names its ratios the other way round: its
  ``precision`` divides by the truth's pairs (our recall). It returns ``1 - F``.
  ``skimage.metrics.variation_of_information(truth, pred)`` returns the conditional entropies
  ``[H(pred|truth), H(truth|pred)]`` in bits, with no pixel ignored by default; restricted to the
  truth foreground and with singletons given their own labels it yields the same entropies as
  here (in bits), and V-Info = 2I / (2I + H(T|S) + H(S|T)).
  ``sklearn.metrics.normalized_mutual_info_score(t, s, average_method="arithmetic")`` on the
  foreground pixels (singletons relabelled) equals V-Info, except in the single-segment case.

**Label images** (the output of ``emtile segment``; :func:`label_scores`,
:func:`emtile.evaluation.is_label_image`) are scored as segmentations: their ids *are* the
predicted segments S (no threshold, no thinning, no connected components: an id is one segment
even where it is cut in two), and step 3 above applies unchanged: truth membrane pixels are left out, and a predicted
0 pixel inside the truth foreground is its own singleton segment (ISBI). ``evaluate`` takes a
prediction as a label image when its store says so (kind ``"labels"`` with ``segment`` settings,
or ``ids`` from ``convert(..., ids=True)``), or, for arrays and other tools' files, when its dtype
is an integer of 32 or 64 bits (uint32 / uint64 / int32 / int64); bool, uint8, int8, (u)int16 stay
probabilities (0-255) or 0/1 masks. A threshold, a sweep and ``invert`` mean nothing for a label
image and are refused.

**CREMI scores**, beside V-Rand and V-Info for both label images and thresholded maps (with the
same predicted segments S: the thinned segmentation of a map, the ids of a label image), per
slice and averaged over the scored slices like the ISBI ones:

- *VOI split* ``H(S|T)`` and *VOI merge* ``H(T|S)``, conditional entropies in bits (CREMI's
  ``voi(reconstruction, groundtruth)`` returns ``(H(X|Y), H(Y|X))`` with X the segmentation, Y
  the truth: split grows with over-segmentation, merge with under-segmentation).
- *Adapted Rand error* ``1 - F``, F the F-score of the Rand precision ``P / S2`` and recall
  ``P / T2`` over pairs of *distinct* pixels: ``P = sum c_ij (c_ij - 1)``,
  ``S2 = sum s_j (s_j - 1)``, ``T2 = sum t_i (t_i - 1)``, so ``F = 2P / (S2 + T2)``: exactly
  ``skimage.metrics.adapted_rand_error(truth, pred, ignore_labels=(0,))[0]``.
- CREMI's conventions for the pixels: the truth's label-0 pixels (membrane) are left out; a
  predicted 0 is an ordinary label, *one* segment (CREMI's ``ignore_reconstruction=[]``,
  scikit-image's ``ignore_labels`` applying to the truth only), not singletons as in the ISBI
  scores. So ``adapted Rand error != 1 - V-Rand`` in general: the ISBI score counts ordered
  pairs with a pixel paired with itself (``c^2``) and singletons; for a segmentation with no 0
  inside the truth foreground the two differ only by ``c^2`` vs. ``c (c - 1)``.
- Checked against ``skimage.metrics.variation_of_information(truth, pred,
  ignore_labels=(0,))``, which returns ``[H(pred|truth), H(truth|pred)]`` = ``[split, merge]``
  in bits, and ``adapted_rand_error``. CREMI's own ``adapted_rand`` (the SNEMI3D script) differs:
  it counts ``c^2`` and gives each predicted-0 pixel a weight of ``1/N`` (N all pixels).
- Edge cases: an empty truth slice scores 0, 0, 0 (left out of the means, as above); when every
  segment of both is a single pixel (no pair at all), the adapted Rand error is 0 (scikit-image
  divides by zero).
- CREMI scores 3-D volumes with 3-D truth ids: :mod:`emtile.scores3d` does (``evaluate``'s
  ``mode="volume"``); here the truth is binary, its segments each slice's 4-connected cells.
"""

from fractions import Fraction

import numpy as np

from emtile._errors import EmtileError
from emtile.stacks import LabelChecker

__all__ = [
    "pixel_metrics",
    "metrics_from_counts",
    "classification_report_text",
    "isbi_scores",
    "label_scores",
    "segmentation_stats",
    "v_rand",
    "v_info",
    "thin_boundaries",
    "truth_segments",
    "check_threshold",
    "check_ids",
    "confusion_counts",
    "PredictionDecoder",
    "SWEEP_THRESHOLDS",
    "SCORES",
    "CONVENTIONS",
]

#: The challenge's threshold sweep: 0.0, 0.1, ..., 1.0.
SWEEP_THRESHOLDS = tuple(k / 10 for k in range(11))

_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
_JOINT_BINCOUNT_MAX = 1 << 23  # above this many (i, j) cells, count pairs by sorting instead


# --------------------------------------------------------------------------- pixel metrics


def _ratio(num, den, *, perfect):
    return num / den if den else (1.0 if perfect else 0.0)


def metrics_from_counts(tp, fp, fn, tn):
    """Pixel metrics of the foreground (label 1) from the four confusion counts.

    Parameters
    ----------
    tp, fp, fn, tn : int
        True/false positives/negatives; positive = foreground (cell interior, label 1).

    Returns
    -------
    dict
        ``tp fp fn tn``, ``confusion_matrix`` (``[[tn, fp], [fn, tp]]``), ``accuracy``,
        ``pixel_error``, ``precision``, ``recall``, ``f1``, ``dice`` (= f1), ``iou``. A 0/0 ratio
        is 1.0 when ``tp + fp + fn == 0`` (nothing to find, nothing found) and 0.0 otherwise.

    Examples
    --------
    >>> m = metrics_from_counts(tp=6, fp=2, fn=1, tn=7)
    >>> m["accuracy"], m["precision"], m["recall"], round(m["f1"], 4), m["iou"]
    (0.8125, 0.75, 0.8571428571428571, 0.8, 0.6666666666666666)
    """
    tp, fp, fn, tn = (int(v) for v in (tp, fp, fn, tn))
    total = tp + fp + fn + tn
    perfect = tp + fp + fn == 0
    f1 = _ratio(2 * tp, 2 * tp + fp + fn, perfect=perfect)
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "accuracy": _ratio(tp + tn, total, perfect=True),
        "pixel_error": _ratio(fp + fn, total, perfect=False) if total else 0.0,
        "precision": _ratio(tp, tp + fp, perfect=perfect),
        "recall": _ratio(tp, tp + fn, perfect=perfect),
        "f1": f1,
        "dice": f1,
        "iou": _ratio(tp, tp + fp + fn, perfect=perfect),
    }


def classification_report_text(tp, fp, fn, tn, *, digits=4):
    """scikit-learn's ``classification_report`` for the two classes, exactly, from four counts.

    The report is built from four samples (truth, prediction) = (0,0), (0,1), (1,0), (1,1)
    weighted by TN, FP, FN, TP, which gives exactly the numbers of the full pixel-wise report
    without holding the pixels. Class 0 is ``membrane``, class 1 ``cell``.
    """
    from sklearn.metrics import classification_report

    weights = np.array([tn, fp, fn, tp], dtype=np.float64)
    keep = weights > 0
    if not keep.any():
        return "(no pixels)"
    y_true = np.array([0, 0, 1, 1])[keep]
    y_pred = np.array([0, 1, 0, 1])[keep]
    return classification_report(
        y_true, y_pred, labels=[0, 1], target_names=["membrane (0)", "cell (1)"],
        sample_weight=weights[keep], digits=digits, zero_division=0.0,
    )


def pixel_metrics(pred, truth, *, threshold=0.5, invert=False):
    """Pixel metrics of an in-memory prediction against a binary truth (any shape).

    Parameters
    ----------
    pred : ndarray
        Probabilities of the cell interior (float in [0, 1], or uint8 0-255 meaning 0..1), or a
        mask (bool, or integers in {0, 1}).
    truth : ndarray, same shape
        Binary labels: {0, 1} or {0, 255}; non-zero = cell interior.
    threshold : float
        Foreground where the probability is > threshold (ignored for masks).
    invert : bool
        The prediction has the opposite polarity (membrane probability); use ``1 - p``.

    Returns
    -------
    dict
        As :func:`metrics_from_counts`, plus ``threshold`` and ``classification_report``.
        :func:`emtile.evaluation.evaluate` gives the same numbers for volumes on disk, slab by
        slab.

    Examples
    --------
    >>> p = np.array([[0.9, 0.2], [0.6, 0.4]])
    >>> t = np.array([[1, 0], [0, 1]])
    >>> m = pixel_metrics(p, t)
    >>> m["tp"], m["fp"], m["fn"], m["tn"], m["pixel_error"]
    (1, 1, 1, 1, 0.5)
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    _check_shapes(pred.shape, truth.shape, "pred", "truth")
    check_threshold(threshold)
    decoder = PredictionDecoder(pred.dtype, invert=invert)
    decoder.inspect(pred, "pred")
    fg = decoder.binarize(pred, threshold, decoder.final_scale())
    tfg = LabelChecker().foreground(truth, "truth")
    out = metrics_from_counts(*confusion_counts(fg, tfg))
    out["threshold"] = float(threshold)
    out["classification_report"] = classification_report_text(out["tp"], out["fp"], out["fn"], out["tn"])
    return out


def confusion_counts(fg, tfg):
    """``(tp, fp, fn, tn)`` of a predicted foreground mask ``fg`` against the truth's ``tfg``."""
    tp = int(np.count_nonzero(fg & tfg))
    npred = int(np.count_nonzero(fg))
    ntrue = int(np.count_nonzero(tfg))
    return tp, npred - tp, ntrue - tp, fg.size - npred - ntrue + tp


# --------------------------------------------------------------------------- segmentations


def truth_segments(truth):
    """Label the cell interiors of a binary 2-D truth as 4-connected segments (0 = membrane)."""
    from scipy import ndimage

    labels, _ = ndimage.label(np.asarray(truth) != 0, structure=_FOUR)
    return labels


def thin_boundaries(foreground):
    """Label a predicted interior mask and thin its boundaries to one pixel (the ISBI way).

    The interiors (``foreground``, 2-D bool) are labelled as 4-connected components, which then
    flood the boundary pixels by a marker-controlled watershed on a flat relief
    (:func:`skimage.segmentation.watershed`, 4-connectivity, ``watershed_line=True``): the
    fronts advance one pixel per step and meet halfway, where a one-pixel watershed line (label
    0) keeps the segments apart. Boundary pixels that separate no two segments are absorbed.

    Returns
    -------
    ndarray of int32, shape of ``foreground``
        Segment labels 1..k; 0 on the thinned boundaries (and everywhere when there is no
        interior at all).

    Examples
    --------
    >>> fg = np.ones((3, 7), bool); fg[:, 2:5] = False   # a 3-pixel-wide boundary
    >>> thin_boundaries(fg)[0]
    array([1, 1, 1, 0, 2, 2, 2], dtype=int32)
    """
    from scipy import ndimage

    fg = np.asarray(foreground, dtype=bool)
    markers, count = ndimage.label(fg, structure=_FOUR)
    markers = markers.astype(np.int32, copy=False)
    if count == 0 or fg.all():
        return markers
    from skimage.segmentation import watershed

    relief = np.zeros(fg.shape, np.uint8)
    return watershed(relief, markers, connectivity=1, watershed_line=True).astype(np.int32, copy=False)


def _compact(ids, n):
    """``ids`` (>= 0) renumbered 0, 1, 2, ... in order (0 stays 0) when any exceeds ``n``, so
    that the tables below never index by a large id (a label image's ids run over the volume)."""
    if not ids.size or int(ids.max()) <= n:
        return ids.astype(np.int64, copy=False)
    values, inverse = np.unique(ids, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64) + (0 if values[0] == 0 else 1)


def _tables(truth_seg, pred_seg):
    """Counts restricted to the truth foreground: (a_i, b_j, c_ij, z_i, singletons, n), all
    int64; b and c leave out the predicted-0 pixels, z_i counts them per truth segment."""
    t = np.asarray(truth_seg).ravel()
    s = np.asarray(pred_seg).ravel()
    inside = t > 0
    n = int(np.count_nonzero(inside))
    if n == 0:
        return None
    t, s = _compact(t[inside], n), _compact(s[inside], n)
    a = np.bincount(t)
    a = a[a > 0]
    labelled = s > 0
    singles = n - int(np.count_nonzero(labelled))
    z = np.bincount(t[~labelled]) if singles else np.zeros(0, np.int64)
    z = z[z > 0]
    t, s = t[labelled], s[labelled]
    if s.size:
        b = np.bincount(s)
        b = b[b > 0]
        width = int(s.max()) + 1
        if (int(t.max()) + 1) * width <= _JOINT_BINCOUNT_MAX:
            c = np.bincount(t * width + s)
            c = c[c > 0]
        else:
            c = np.unique(t * width + s, return_counts=True)[1]
    else:
        b = c = np.zeros(0, np.int64)
    return a, b, c, z, singles, n


def _entropy(counts, n, singles):
    """-sum q log q over q = counts/n, plus ``singles`` segments of one pixel each (nats)."""
    q = counts[counts > 0] / n
    h = float(-np.sum(q * np.log(q)))
    return float(h + singles * np.log(n) / n)


def segmentation_stats(truth_seg, pred_seg):
    """Foreground-restricted Rand and information statistics of two 2-D (or n-D) segmentations.

    Parameters
    ----------
    truth_seg : ndarray of int
        Truth segments; 0 = excluded (membrane), each other value one segment.
    pred_seg : ndarray of int, same shape
        Predicted segments; 0 = predicted boundary: each such pixel inside the truth foreground
        is a singleton segment.

    Returns
    -------
    dict
        ``n`` (truth-foreground pixels), ``singletons``; Rand sums in pixel-pair counts
        ``sum_p2`` (= sum c_ij^2 + singletons), ``sum_s2``, ``sum_t2``; ``rand_precision``
        (sum_p2 / sum_s2), ``rand_recall`` (sum_p2 / sum_t2), ``v_rand``; entropies in nats
        ``h_truth``, ``h_pred``, ``h_joint``, ``mutual_info``, ``v_info``; ``empty`` (n == 0).
        The CREMI scores, with predicted 0 as one ordinary segment instead of singletons:
        ``voi_split`` (H(pred|truth)) and ``voi_merge`` (H(truth|pred)) in bits,
        ``adapted_rand_error`` (over pairs of distinct pixels, as scikit-image).
        See the module docstring for the conventions (empty slices, single segments).

    Examples
    --------
    Truth: two cells of 2 pixels. The prediction splits the second cell into a segment and a
    0 pixel (ISBI: a singleton; CREMI: the segment "0"):

    >>> st = segmentation_stats(np.array([[1, 1, 0, 2, 2]]), np.array([[3, 3, 3, 4, 0]]))
    >>> keys = ("voi_split", "voi_merge", "adapted_rand_error")
    >>> st["singletons"], [round(st[k], 12) for k in keys]
    (1, [0.5, 0.0, 0.333333333333])
    """
    truth_seg, pred_seg = np.asarray(truth_seg), np.asarray(pred_seg)
    _check_shapes(truth_seg.shape, pred_seg.shape, "truth_seg", "pred_seg")
    for name, seg in (("truth_seg", truth_seg), ("pred_seg", pred_seg)):
        check_ids(seg, name)
    tables = _tables(truth_seg, pred_seg)
    if tables is None:
        return {"n": 0, "singletons": 0, "sum_p2": 0, "sum_s2": 0, "sum_t2": 0,
                "rand_precision": 1.0, "rand_recall": 1.0, "v_rand": 1.0, "h_truth": 0.0,
                "h_pred": 0.0, "h_joint": 0.0, "mutual_info": 0.0, "v_info": 1.0,
                "voi_split": 0.0, "voi_merge": 0.0, "adapted_rand_error": 0.0, "empty": True}
    a, b, c, z, singles, n = tables
    sum_t2 = int(a @ a)
    sum_s2 = int(b @ b) + singles
    sum_p2 = int(c @ c) + singles
    h_truth = _entropy(a, n, 0)
    h_pred = _entropy(b, n, singles)
    h_joint = _entropy(c, n, singles)
    mutual = h_truth + h_pred - h_joint
    h_sum = h_truth + h_pred
    return {
        "n": n, "singletons": singles, "sum_p2": sum_p2, "sum_s2": sum_s2, "sum_t2": sum_t2,
        "rand_precision": sum_p2 / sum_s2,
        "rand_recall": sum_p2 / sum_t2,
        "v_rand": sum_p2 / (0.5 * sum_s2 + 0.5 * sum_t2),
        "h_truth": h_truth, "h_pred": h_pred, "h_joint": h_joint, "mutual_info": float(mutual),
        "v_info": float(2.0 * mutual / h_sum) if h_sum > 0 else 1.0,
        **_cremi(a, b, c, z, singles, n, h_truth),
        "empty": False,
    }


def _cremi(a, b, c, z, singles, n, h_truth):
    """VOI split / merge (bits) and adapted Rand error with predicted 0 one segment (CREMI)."""
    if singles:
        b = np.append(b, singles)  # the pixels labelled 0: one segment ...
        c = np.concatenate([c, z])  # ... meeting each truth segment it covers
    pairs_t, pairs_s, pairs_p = int(a @ a) - n, int(b @ b) - n, int(c @ c) - n
    den = pairs_s + pairs_t
    h_joint = _entropy(c, n, 0)
    return {
        "voi_split": float(max(h_joint - h_truth, 0.0) / np.log(2)),
        "voi_merge": float(max(h_joint - _entropy(b, n, 0), 0.0) / np.log(2)),
        "adapted_rand_error": 1.0 - 2.0 * pairs_p / den if den else 0.0,
    }


def check_ids(seg, name):
    """EmtileError unless the segment ids ``seg`` (named ``name``) are non-negative integers
    (or bool)."""
    if seg.dtype != np.bool_ and not np.issubdtype(seg.dtype, np.integer):
        raise EmtileError(f"{name} has dtype {seg.dtype}: segment ids must be integers "
                          "(0 = boundary / left out)")
    if seg.size and seg.dtype.kind == "i" and int(seg.min()) < 0:
        raise EmtileError(f"{name} has negative ids (down to {int(seg.min())}): segment ids "
                          "must be 0 (boundary / left out) or positive")


def v_rand(truth_seg, pred_seg):
    """Foreground-restricted V-Rand of two segmentations: sum p^2 / (sum s^2/2 + sum t^2/2).

    ``truth_seg`` 0 = excluded; ``pred_seg`` 0 = boundary pixels, singletons inside the truth
    foreground. 1.0 for identical segmentations and for an empty truth (see module docstring).

    Examples
    --------
    Two truth cells of 2 pixels; the prediction merges them: p = (1/4)*[2, 2] in one
    column, sum p^2 = 8/16, sum s^2 = 16/16, sum t^2 = 8/16 -> 0.5 / 0.75:

    >>> t = np.array([[1, 1, 0, 2, 2]])
    >>> s = np.array([[1, 1, 1, 1, 1]])
    >>> round(v_rand(t, s), 12)
    0.666666666667
    """
    return segmentation_stats(truth_seg, pred_seg)["v_rand"]


def v_info(truth_seg, pred_seg):
    """Foreground-restricted V-Info of two segmentations: 2 I(S;T) / (H(S) + H(T)).

    Same conventions as :func:`v_rand`. Merging two equal truth cells into one predicted
    segment: H(T) = log 2, H(S) = 0, I = 0, V-Info = 0.

    >>> v_info(np.array([[1, 1, 0, 2, 2]]), np.array([[1, 1, 1, 1, 1]]))
    0.0
    """
    return segmentation_stats(truth_seg, pred_seg)["v_info"]


# --------------------------------------------------------------------------- prediction decoding


class PredictionDecoder:
    """Validates prediction values slab by slab and turns them into a foreground mask.

    kinds: ``mask`` (bool), ``float`` (probabilities in [0, 1]), ``int`` (0-255 probabilities,
    or a {0, 1} mask when no value above 1 is ever seen: ``scale`` 255 or 1).
    """

    def __init__(self, dtype, *, invert=False):
        dtype = np.dtype(dtype)
        self.invert = bool(invert)
        if dtype == np.bool_:
            self.kind = "mask"
        elif np.issubdtype(dtype, np.floating):
            self.kind = "float"
        elif np.issubdtype(dtype, np.integer):
            self.kind = "int"
        else:
            raise EmtileError(f"prediction dtype {dtype} is not supported: expected float "
                              "probabilities in [0, 1], uint8 0-255, or a 0/1 mask")
        self.seen_above_one = False

    def inspect(self, data, where):
        """Check a block's values; returns the scale to use for it (1 or 255; None for others)."""
        if self.kind == "float":
            if data.size:
                lo, hi = float(np.min(data)), float(np.max(data))
                if np.isnan(lo) or np.isnan(hi):
                    raise EmtileError(f"prediction has NaN values in {where}; expected "
                                      "probabilities in [0, 1]")
                if lo < 0 or hi > 1:
                    raise EmtileError(
                        f"prediction values in {where} span [{lo:g}, {hi:g}]: float predictions "
                        "must be probabilities in [0, 1] (store 0-255 values as uint8)")
            return None
        if self.kind == "int":
            if data.size:
                lo, hi = int(np.min(data)), int(np.max(data))
                if lo < 0 or hi > 255:
                    raise EmtileError(
                        f"prediction values in {where} span [{lo}, {hi}]: integer predictions "
                        "must be 0-255 probabilities (255 = 1.0) or a 0/1 mask (a label image "
                        "is scored as segments when it is uint32, uint64, int32 or int64, or "
                        "emtile segment's store)")
                if hi > 1:
                    self.seen_above_one = True
            return 255 if self.seen_above_one else 1
        return None

    def final_scale(self):
        if self.kind != "int":
            return None
        return 255 if self.seen_above_one else 1

    def describe(self):
        if self.kind == "mask":
            return "mask (bool)"
        if self.kind == "float":
            return "probability (float, 0-1)"
        return "probability (integer, 0-255 = 0..1)" if self.seen_above_one else "mask (integer 0/1)"

    def is_mask(self, scale):
        return self.kind == "mask" or (self.kind == "int" and scale == 1)

    def binarize(self, data, threshold, scale):
        """Foreground (cell interior) mask: probability > threshold, after ``invert``."""
        if self.is_mask(scale):
            return (data == 0) if self.invert else (data != 0)
        if self.kind == "float":
            p = data.astype(np.float64, copy=False)
            return (1.0 - p > threshold) if self.invert else (p > threshold)
        # v / 255 > t  <=>  v > 255 t  <=>  v > floor(255 t) for integer v (exact, in decimals)
        cut = int((Fraction(repr(float(threshold))) * 255) // 1)
        v = data.astype(np.int32, copy=False)
        return (255 - v > cut) if self.invert else (v > cut)


# --------------------------------------------------------------------------- ISBI scores per slice


def check_threshold(threshold):
    """EmtileError unless ``threshold`` is a number in [0, 1]."""
    try:
        ok = 0.0 <= float(threshold) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise EmtileError(f"threshold={threshold!r} is not valid: expected a number in [0, 1]")


def _check_shapes(a, b, name_a, name_b):
    if tuple(a) != tuple(b):
        raise EmtileError(f"{name_a} has shape {tuple(a)} but {name_b} has shape {tuple(b)}; "
                          "they must have the same shape")



def _slice_scores(fg, truth_seg):
    stats = segmentation_stats(truth_seg, thin_boundaries(fg))
    stats["rand_error"] = 1.0 - stats["v_rand"]
    return stats


def isbi_scores(pred_slice, truth_slice, *, threshold=0.5, invert=False):
    """ISBI 2012 V-Rand, V-Info and Rand error of one 2-D slice (see the module docstring).

    Parameters
    ----------
    pred_slice : ndarray, shape (Y, X)
        Cell-interior probabilities (float [0, 1] or uint8 0-255) or a mask (bool or 0/1).
    truth_slice : ndarray, shape (Y, X)
        Binary labels ({0, 1} or {0, 255}; non-zero = cell interior).
    threshold : float
        Interior where probability > threshold.
    invert : bool
        The prediction is a membrane probability (opposite polarity): use 1 - p.

    Returns
    -------
    dict
        ``v_rand``, ``v_info``, ``rand_error`` and the statistics of
        :func:`segmentation_stats` (``n``, ``singletons``, entropies, ...), plus ``threshold``.

    Examples
    --------
    >>> t = np.zeros((5, 5), np.uint8); t[:, :2] = 1; t[:, 3:] = 1   # two cells, one membrane
    >>> isbi_scores(t.astype(float), t)["v_rand"]
    1.0
    """
    pred_slice, truth_slice = np.asarray(pred_slice), np.asarray(truth_slice)
    if pred_slice.ndim != 2:
        raise EmtileError(f"pred_slice must be 2-D (Y, X), got shape {pred_slice.shape}")
    _check_shapes(pred_slice.shape, truth_slice.shape, "pred_slice", "truth_slice")
    check_threshold(threshold)
    decoder = PredictionDecoder(pred_slice.dtype, invert=invert)
    scale = decoder.inspect(pred_slice, "pred_slice")
    fg = decoder.binarize(pred_slice, threshold, scale)
    tseg = truth_segments(LabelChecker().foreground(truth_slice, "truth_slice"))
    out = _slice_scores(fg, tseg)
    out["threshold"] = float(threshold)
    return out


def label_scores(seg_slice, truth_slice):
    """V-Rand, V-Info, Rand error and the CREMI scores of one 2-D slice of a label image.

    The ids of ``seg_slice`` are the predicted segments (0 = boundary: singletons inside the
    truth foreground for the ISBI scores, one segment for the CREMI ones); the truth's segments
    are the 4-connected components of its cell interior, its membrane left out (see the module
    docstring).

    Parameters
    ----------
    seg_slice : ndarray of int, shape (Y, X)
        Segment ids (e.g. a slice of ``emtile segment``'s output), >= 0.
    truth_slice : ndarray, shape (Y, X)
        Binary labels ({0, 1} or {0, 255}; non-zero = cell interior).

    Returns
    -------
    dict
        As :func:`segmentation_stats`, plus ``rand_error``.

    Examples
    --------
    >>> t = np.zeros((4, 5), np.uint8); t[:, :2] = 1; t[:, 3:] = 1   # two cells, one membrane
    >>> seg = np.array([[1, 1, 1, 2, 2]] * 4, np.uint32)            # ids; the membrane given away
    >>> s = label_scores(seg, t)
    >>> s["v_rand"], s["voi_split"], s["voi_merge"], s["adapted_rand_error"]
    (1.0, 0.0, 0.0, 0.0)
    """
    seg_slice, truth_slice = np.asarray(seg_slice), np.asarray(truth_slice)
    if seg_slice.ndim != 2:
        raise EmtileError(f"seg_slice must be 2-D (Y, X), got shape {seg_slice.shape}")
    _check_shapes(seg_slice.shape, truth_slice.shape, "seg_slice", "truth_slice")
    tseg = truth_segments(LabelChecker().foreground(truth_slice, "truth_slice"))
    out = segmentation_stats(tseg, seg_slice)
    out["rand_error"] = 1.0 - out["v_rand"]
    return out


# --------------------------------------------------------------------------- what a result carries


#: The per-slice scores every row and mean carry (besides the pixel metrics).
SCORES = ("v_rand", "v_info", "rand_error", "voi_split", "voi_merge", "adapted_rand_error")

#: What ``settings["conventions"]`` says, once, in every JSON.
CONVENTIONS = {
    "v_rand, v_info, rand_error": "ISBI 2012: per slice; truth segments = 4-connected cell "
                                  "interiors, truth membrane left out; a predicted 0 inside the "
                                  "truth foreground is its own singleton segment; pairs counted "
                                  "as sum c^2; natural log",
    "voi_split, voi_merge, adapted_rand_error": "CREMI: per slice; truth membrane left out; a "
                                                "predicted 0 is one ordinary segment; "
                                                "voi_split = H(pred|truth), voi_merge = "
                                                "H(truth|pred), in bits; adapted_rand_error = "
                                                "1 - F-score of Rand precision and recall over "
                                                "pairs of distinct pixels (as "
                                                "skimage.metrics.adapted_rand_error)",
    "mean": "mean over the slices whose truth has cell interior",
}

