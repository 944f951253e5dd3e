"""Pixel metrics and the ISBI 2012 connectomics scores (V-Rand, V-Info), computed slab by slab.

Two families of numbers, both against a binary ground truth (1 = cell interior, 0 = membrane):

**Pixel metrics** (:func:`pixel_metrics`, :func:`metrics_from_counts`): the prediction is
thresholded and compared pixel by pixel. Foreground (the positive class) is the cell interior,
label 1. Accuracy, pixel error (1 - accuracy), precision, recall, F1 (= Dice) and IoU (= Jaccard)
of the foreground, the 2x2 confusion matrix ``[[TN, FP], [FN, TP]]`` (rows: truth 0/1, columns:
prediction 0/1, as :func:`sklearn.metrics.confusion_matrix`) and scikit-learn's
``classification_report`` text. :func:`evaluate` accumulates the four counts over z-slabs, so a
volume larger than memory can be scored, and builds the report exactly from them (the four
counts are passed to scikit-learn as ``sample_weight``). A 0/0 ratio (e.g. precision when nothing
is predicted as foreground) is 1.0 when truth and prediction agree that there is no foreground
(TP + FP + FN = 0) and 0.0 otherwise.

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
:func:`is_label_image`) are scored as segmentations: their ids *are* the predicted segments S
(no threshold, no thinning, no connected components: an id is one segment even where it is cut
in two), and step 3 above applies unchanged: truth membrane pixels are left out, and a predicted
0 pixel inside the truth foreground is its own singleton segment (ISBI). ``evaluate`` takes a
prediction as a label image when its store says so (``emtile segment`` marks it: kind
``"labels"`` with ``segment`` settings), or, for arrays and other tools' files, when its dtype is
an integer of 32 or 64 bits (uint32 / uint64 / int32 / int64); bool, uint8, int8, (u)int16 stay
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
- CREMI scores 3-D volumes with 3-D truth ids; emtile's truth is binary and its segments are
  the 4-connected components of each slice, so every score here is per slice.
"""

from fractions import Fraction
from numbers import Integral

import numpy as np

from emtile._errors import EmtileError
from emtile.geometry import Window
from emtile.stacks import LabelChecker, Stack, open_stack, resolve_slices, slab_depth, slice_runs

__all__ = [
    "evaluate",
    "pixel_metrics",
    "metrics_from_counts",
    "classification_report_text",
    "isbi_scores",
    "segmentation_stats",
    "v_rand",
    "v_info",
    "thin_boundaries",
    "truth_segments",
    "format_report",
    "write_csv",
    "write_json",
    "check_threshold",
    "confusion_counts",
    "PredictionDecoder",
    "SWEEP_THRESHOLDS",
    "open_pair",
    "check_kinds",
    "store_kind",
    "label_scores",
    "is_label_image",
    "is_segmentation_store",
    "LABEL_IMAGE_DTYPES",
]

#: The challenge's threshold sweep: 0.0, 0.1, ..., 1.0.
SWEEP_THRESHOLDS = tuple(k / 10 for k in range(11))

_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
_SLAB_BYTES = 64 * 2**20  # how much prediction one read may hold
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
        :func:`evaluate` gives the same numbers for volumes on disk, slab by slab.

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
        _check_ids(seg, name)
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


def _check_ids(seg, name):
    """Segments are non-negative integers (or bool)."""
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


def store_kind(source):
    """``(kind, emtile attributes)`` of an emtile store (``"image"``, ``"labels"``,
    ``"probabilities"``; a predicted mask is ``"labels"`` with a ``threshold``), or
    ``(None, {})`` for anything else (arrays, TIFFs, foreign stores)."""
    import os
    from pathlib import Path

    from emtile.store import emtile_attrs, is_zarr_store

    if not isinstance(source, (str, os.PathLike)):
        return None, {}
    p = Path(str(source))
    for candidate in (p, p.parent):  # a group, or an array inside one (pred.zarr/0)
        if is_zarr_store(candidate):
            meta = emtile_attrs(candidate)
            if meta:
                return meta.get("kind"), meta
    return None, {}


#: Integer dtypes read as label images (ids) when no store says what the prediction is.
LABEL_IMAGE_DTYPES = tuple(np.dtype(t) for t in ("uint32", "uint64", "int32", "int64"))


def is_segmentation_store(source):
    """True when ``source`` is a store written by ``emtile segment`` (a label image): its emtile
    attributes say kind ``"labels"`` and carry the ``segment`` settings."""
    kind, meta = store_kind(source)
    return kind == "labels" and "segment" in meta


def is_label_image(source, dtype):
    """Whether ``evaluate`` scores the prediction ``source`` (of ``dtype``) as a label image.

    The store's own record first: an ``emtile segment`` store is one; any other emtile store
    (probabilities, a predicted mask, converted labels, an image) is not. Otherwise (arrays,
    TIFFs, other tools' stores) an integer dtype of 32 or 64 bits (:data:`LABEL_IMAGE_DTYPES`)
    is one; bool, 8- and 16-bit integers and floats are probabilities or masks.

    Examples
    --------
    >>> is_label_image(np.zeros(3, np.uint32), np.uint32), is_label_image(None, np.uint8)
    (True, False)
    """
    kind, meta = store_kind(source)
    if kind is not None:
        return kind == "labels" and "segment" in meta
    return np.dtype(dtype) in LABEL_IMAGE_DTYPES


def check_kinds(pred, labels, *, command="evaluate"):
    """Refuse a prediction and labels whose stores say they are something else: the raw image
    given as the prediction, the two swapped, an image, a prediction or a segmentation given as
    labels. Sources that record no kind (TIFFs, arrays, other tools' stores) pass."""
    (pk, pmeta), (lk, lmeta) = store_kind(pred), store_kind(labels)
    # converted labels: neither predicted (a mask records its threshold) nor segmented
    truth = pk == "labels" and pmeta.get("threshold") is None and "segment" not in pmeta
    usage = (f"emtile {command} PRED LABELS" if command == "evaluate" else
             "emtile show RAW --pred PRED --labels LABELS")
    if truth and lk == "probabilities":
        raise EmtileError(f"PRED and LABELS are swapped: {str(pred)!r} holds labels and "
                          f"{str(labels)!r} a prediction (their stores say so); {usage} takes "
                          f"the prediction as PRED")
    if pk == "image":
        raise EmtileError(f"pred {str(pred)!r} is an image volume (its store says kind 'image'), "
                          f"not a prediction: {usage} takes the output of emtile predict (or a "
                          f"mask) as PRED")
    if lk in ("image", "probabilities"):
        what = "an image volume" if lk == "image" else "a prediction"
        raise EmtileError(f"labels {str(labels)!r} is {what} (its store says kind {lk!r}), not "
                          f"labels: {usage} takes binary labels (emtile convert --labels) as "
                          f"LABELS")
    if lk == "labels" and "segment" in lmeta:
        raise EmtileError(f"labels {str(labels)!r} is a segmentation (emtile segment wrote it), "
                          f"not binary labels: {usage} takes binary labels (1 = cell interior, "
                          f"0 = membrane; emtile convert --labels) as LABELS; a segmentation is "
                          f"scored by giving it as PRED")


def open_pair(pred, other, *, other_name="labels", command="evaluate"):
    """Open a prediction and a volume to compare it with (labels, or the raw image) on the same
    grid: ``(pred stack, other stack, offset)``.

    When the prediction covers a region of ``other`` (``emtile predict --roi``: a smaller store
    that records its translation), ``other`` is cut to that region (a lazy :class:`Window`) and
    ``offset`` is where the region starts (voxels, one per axis of the stack); else the shapes
    must match and ``offset`` is all zeros.
    """
    from emtile.store import offset_voxels

    pstack, ostack = open_stack(pred, name="pred"), open_stack(other, name=other_name)
    zero = (0,) * 3
    if pstack.shape == ostack.shape:
        return pstack, ostack, zero
    import os

    start = offset_voxels(pred) if isinstance(pred, (str, os.PathLike)) else None
    region = (f"prediction {pstack.display} has shape {tuple(pstack.array.shape)} but "
              f"{other_name} {ostack.display} have shape {tuple(ostack.array.shape)}")
    if start is None:
        raise EmtileError(f"{region}; they must match (a prediction of a region, predict "
                          f"--roi, records where it lies; this one records nothing)")
    start = (0,) * (3 - len(start)) + tuple(start[-3:])
    if (ostack.lead != pstack.lead or any(a < 0 or a + n > m for a, n, m
                                          in zip(start, pstack.shape, ostack.shape))):
        box = ", ".join(f"{ax} {a}:{a + n}" for ax, a, n in zip("zyx", start, pstack.shape))
        raise EmtileError(f"{region}: the prediction covers {box} of its input, which does not "
                          f"fit in the {other_name}")
    inner = {"": start, "2d": start[1:], "c": (0,) + start}[ostack.lead]
    window = Window(ostack.array, inner, pstack.array.shape)
    return pstack, Stack(window, ostack.display), start


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


# --------------------------------------------------------------------------- volumes


def _slab_depth(stack):
    """Slices per read: about ``_SLAB_BYTES`` of prediction, counted as at least float32."""
    return slab_depth(stack.shape, max(stack.dtype.itemsize, 4), budget=_SLAB_BYTES)


def _mean(values):
    return float(np.mean(values)) if len(values) else 1.0


def evaluate(pred, labels, *, slices=None, threshold=None, sweep=False, invert=False,
             progress=True, json_path=None, csv_path=None):
    """Score a prediction or a segmentation against binary labels: the ISBI 2012 scores (V-Rand,
    V-Info), the CREMI ones (VOI split and merge, adapted Rand error) and pixel metrics.

    Reads the two volumes in z-slabs (at most ~64 MB of prediction at a time), so volumes
    larger than memory can be scored; pixel counts are accumulated over the slabs.

    Parameters
    ----------
    pred : str, Path or array-like, shape (Z, Y, X) or (Y, X)
        Cell-interior probabilities: float in [0, 1], or uint8 0-255 (255 = 1.0); or a mask
        (bool, or integers that are all 0/1); or a label image, scored as a segmentation (its
        ids are the segments, 0 = boundary): ``emtile segment``'s store, or any uint32 / uint64
        / int32 / int64 array (:func:`is_label_image`). Paths open with
        :func:`emtile.open_volume` (``pred.zarr`` reads its probabilities at ``"0"``;
        ``pred.zarr/labels/mask`` its mask).
    labels : str, Path or array-like, same shape
        Binary truth: {0, 1} (``emtile convert --labels``) or {0, 255} (the ISBI TIFF);
        non-zero = cell interior. A segmentation store is refused here (instance ids are not
        binary labels).
    slices : None, int, list of int or slice
        Slices (z indices) to score; all by default.
    threshold : float, optional
        Interior where probability > threshold (default 0.5); pixel metrics always use it.
        Refused with a label image, which has no threshold.
    sweep : bool
        Also run the challenge's "maximal" variant over thresholds 0.0, 0.1, ..., 1.0 and
        report the best mean V-Rand and the best mean V-Info, each with its threshold.
        Refused with a label image.
    invert : bool
        The prediction is a membrane probability (0 = interior); use ``1 - p``. (ISBI labels
        are 255 = cell interior; emtile predicts the interior.) Refused with a label image.
    progress : bool
        Show a tqdm progress bar.
    json_path, csv_path : str or Path, optional
        Also write the result there (:func:`write_json`, :func:`write_csv`); both are checked
        before any work (their folders exist and are writable, neither lies in an input).

    Returns
    -------
    dict
        ``settings`` (inputs, slices, threshold (None for a label image), thresholds, sweep,
        invert, ``prediction_kind``, ``label_image``, ``conventions``), ``pixel``
        (:func:`metrics_from_counts` over all scored slices at ``threshold``, with
        ``classification_report``; for a label image, of its labelled pixels, id != 0),
        ``slices`` (one dict per slice: ``z``, ``threshold``, ``v_rand``, ``v_info``,
        ``rand_error``, ``voi_split``, ``voi_merge``, ``adapted_rand_error``, ``pixel_error``,
        ``f1``, counts, ``n``, ``empty``; with ``sweep`` also the per-threshold lists and the
        scores at the best thresholds), ``mean`` (means over non-empty slices; ``pixel_error``
        over all), ``sweep`` (None, or ``thresholds``, mean ``v_rand`` / ``v_info`` /
        ``voi_split`` / ``voi_merge`` / ``adapted_rand_error`` lists, ``best_v_rand`` /
        ``best_v_info`` with ``value`` and ``threshold``). Plain Python numbers, ready for JSON.
        The module docstring states every convention.

    Examples
    --------
    >>> t = np.zeros((2, 8, 8), np.uint8); t[:, :, :3] = 1; t[:, :, 4:] = 1
    >>> r = evaluate(t.astype(np.float32), t, progress=False)
    >>> r["mean"]["v_rand"], r["mean"]["v_info"], r["pixel"]["pixel_error"]
    (1.0, 1.0, 0.0)
    >>> seg = np.where(np.arange(8) < 4, 1, 2).astype(np.uint32) * np.ones((2, 8, 1), np.uint32)
    >>> r = evaluate(seg, t, progress=False)            # a label image: scored as segments
    >>> r["mean"]["v_rand"], r["mean"]["voi_merge"], r["settings"]["label_image"]
    (1.0, 0.0, True)
    """
    from emtile import store

    store.check_output(None, inputs=[pred, labels], files={"--json": json_path, "--csv": csv_path})
    if threshold is not None:
        check_threshold(threshold)
    pstack, lstack, offset = open_pair(pred, labels)  # unfinished or unreadable stores first
    check_kinds(pred, labels)
    zs = _local_slices(slices, pstack.shape[0], offset[0])
    label_image = is_label_image(pred, pstack.dtype)
    if label_image:
        _refuse_map_options(pstack.display, threshold=threshold, sweep=sweep, invert=invert)
        results = _score_label_image(pstack, lstack, zs, progress=progress)
        kind = f"label image ({pstack.dtype}): its ids are the segments"
    else:
        threshold = 0.5 if threshold is None else float(threshold)
        thresholds = sorted(set(SWEEP_THRESHOLDS) | {threshold}) if sweep else [threshold]
        decoder = PredictionDecoder(pstack.dtype, invert=invert)
        results = _score_map(pstack, lstack, zs, thresholds, decoder, progress=progress)
        kind = decoder.describe()

    out = _summarise(results, zs, threshold=threshold, sweep=sweep, invert=invert, kind=kind,
                     label_image=label_image, names=(pstack.display, lstack.display))
    if any(offset):  # a prediction of a region: slices in the labels' numbering
        out["settings"]["offset"] = list(offset)
        out["settings"]["slices"] = [z + offset[0] for z in zs]
        for row in out["slices"]:
            row["z"] += offset[0]
    for path, write in ((json_path, write_json), (csv_path, write_csv)):
        if path is not None:
            write(out, path)
    return out


def _refuse_map_options(name, *, threshold, sweep, invert):
    """A label image has no threshold: refuse the options that only mean something for maps."""
    given = [text for text, on in ((f"--threshold {threshold:g}" if threshold is not None else "",
                                    threshold is not None),
                                   ("--sweep", sweep), ("--invert", invert)) if on]
    if given:
        raise EmtileError(f"{given[0]} does not apply to a label image: pred {name!r} is scored as "
                          f"a segmentation (its ids are the segments), which has no threshold; "
                          f"leave out {given[0].split()[0]}")


def _progress_bar(total, progress):
    from tqdm import tqdm

    return tqdm(total=total, desc="evaluate", unit="slice", disable=not progress)


def _where(z0, z1):
    return f"slices {z0}-{z1 - 1}" if z1 - z0 > 1 else f"slice {z0}"


def _score_map(pstack, lstack, zs, thresholds, decoder, *, progress):
    """``{z: {threshold: stats}}`` of a probability map or mask, thresholded and thinned."""
    checker = LabelChecker()
    results = {}
    tentative = []  # slices scored as a 0/1 mask before any value > 1 was seen

    def score(z, pslice, tslice, scale):
        tfg = checker.foreground(tslice, f"slice {z}")
        tseg = truth_segments(tfg)
        per = {}
        cache = {}
        for t in thresholds:
            fg = decoder.binarize(pslice, t, scale)
            key = "mask" if decoder.is_mask(scale) else t
            if key not in cache:
                stats = _slice_scores(fg, tseg)
                stats["counts"] = confusion_counts(fg, tfg)
                cache[key] = stats
            per[t] = cache[key]
        results[z] = per

    bar = _progress_bar(len(zs), progress)
    try:
        for z0, z1 in slice_runs(zs, _slab_depth(pstack)):
            pslab = pstack.read(z0, z1)
            tslab = lstack.read(z0, z1)
            scale = decoder.inspect(pslab, _where(z0, z1))
            for k in range(z1 - z0):
                score(z0 + k, pslab[k], tslab[k], scale)
                if decoder.kind == "int" and scale == 1:
                    tentative.append(z0 + k)
                bar.update(1)
        if decoder.final_scale() == 255 and tentative:
            # values > 1 appeared after these slices were scored as a 0/1 mask: 0-255 after all
            for z0, z1 in slice_runs(tentative, _slab_depth(pstack)):
                pslab, tslab = pstack.read(z0, z1), lstack.read(z0, z1)
                for k in range(z1 - z0):
                    score(z0 + k, pslab[k], tslab[k], 255)
    finally:
        bar.close()
    return results


def _score_label_image(pstack, lstack, zs, *, progress):
    """``{z: {None: stats}}`` of a label image: its ids are the predicted segments."""
    checker = LabelChecker()
    results = {}
    bar = _progress_bar(len(zs), progress)
    try:
        for z0, z1 in slice_runs(zs, _slab_depth(pstack)):
            pslab, tslab = pstack.read(z0, z1), lstack.read(z0, z1)
            _check_ids(pslab, f"label image {pstack.display!r} in {_where(z0, z1)}")
            for k in range(z1 - z0):
                tfg = checker.foreground(tslab[k], f"slice {z0 + k}")
                stats = segmentation_stats(truth_segments(tfg), pslab[k])
                stats["rand_error"] = 1.0 - stats["v_rand"]
                stats["counts"] = confusion_counts(pslab[k] != 0, tfg)
                results[z0 + k] = {None: stats}
                bar.update(1)
    finally:
        bar.close()
    return results


def _local_slices(slices, depth, z0):
    """``slices`` given in the full volume's numbering -> indices into a prediction of ``depth``
    slices starting at slice ``z0`` (all of them when None)."""
    if not z0:
        return resolve_slices(slices, depth)
    if slices is None:
        return list(range(depth))
    zs = resolve_slices(slices, z0 + depth)
    outside = [z for z in zs if z < z0]
    if outside:
        raise EmtileError(f"slices={','.join(map(str, outside))} are outside the prediction, "
                          f"which covers slices {z0}:{z0 + depth} of the labels")
    return [z - z0 for z in zs]



#: The per-slice scores every row and mean carry (besides the pixel metrics).
_SCORES = ("v_rand", "v_info", "rand_error", "voi_split", "voi_merge", "adapted_rand_error")

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


def _summarise(results, zs, *, threshold, sweep, invert, kind, label_image, names):
    """The result dict of :func:`evaluate` from the per-slice statistics."""
    total = np.zeros(4, np.int64)
    for z in zs:
        total += np.array(results[z][threshold]["counts"], np.int64)
    pixel = metrics_from_counts(*total.tolist())
    pixel["threshold"] = threshold
    pixel["classification_report"] = classification_report_text(*total.tolist())

    scored = [z for z in zs if not results[z][threshold]["empty"]]

    def mean_at(t, key):
        return _mean([results[z][t][key] for z in scored])

    sweep_out = None
    best = {"v_rand": threshold, "v_info": threshold}
    if sweep:
        grid = list(SWEEP_THRESHOLDS)
        means = {key: [mean_at(t, key) for t in grid] for key in _SCORES if key != "rand_error"}
        vr, vi = means["v_rand"], means["v_info"]
        # ties: the first (lowest) threshold wins, as Fiji's strict ">" keeps the first maximum
        ir, ii = int(np.argmax(vr)), int(np.argmax(vi))
        best = {"v_rand": grid[ir], "v_info": grid[ii]}
        sweep_out = {
            "thresholds": grid,
            "v_rand": vr,
            "v_info": vi,
            "rand_error": [1.0 - v for v in vr],
            "voi_split": means["voi_split"],
            "voi_merge": means["voi_merge"],
            "adapted_rand_error": means["adapted_rand_error"],
            "best_v_rand": {"value": vr[ir], "threshold": grid[ir]},
            "best_v_info": {"value": vi[ii], "threshold": grid[ii]},
            "best_rand_error": {"value": 1.0 - vr[ir], "threshold": grid[ir]},
            "selection": "each of mean V-Rand and mean V-Info maximised separately over the "
                         "thresholds; one threshold for all scored slices",
        }

    rows = []
    for z in zs:
        r = results[z][threshold]
        m = metrics_from_counts(*r["counts"])
        row = {"z": z, "threshold": threshold, **{key: r[key] for key in _SCORES},
               "pixel_error": m["pixel_error"], "f1": m["f1"], "iou": m["iou"],
               "tp": m["tp"], "fp": m["fp"], "fn": m["fn"], "tn": m["tn"],
               "n": r["n"], "singletons": r["singletons"],
               "rand_precision": r["rand_precision"], "rand_recall": r["rand_recall"],
               "h_truth": r["h_truth"], "h_pred": r["h_pred"], "mutual_info": r["mutual_info"],
               "empty": r["empty"]}
        if sweep:
            row["sweep_v_rand"] = [results[z][t]["v_rand"] for t in SWEEP_THRESHOLDS]
            row["sweep_v_info"] = [results[z][t]["v_info"] for t in SWEEP_THRESHOLDS]
            row["v_rand_best"] = results[z][best["v_rand"]]["v_rand"]
            row["v_info_best"] = results[z][best["v_info"]]["v_info"]
        rows.append(row)

    pooled = [results[z][threshold] for z in scored]
    den = sum(0.5 * r["sum_s2"] + 0.5 * r["sum_t2"] for r in pooled)
    mean = {
        **{key: mean_at(threshold, key) for key in _SCORES},
        "rand_error": 1.0 - mean_at(threshold, "v_rand"),
        "pixel_error": float(np.mean([row["pixel_error"] for row in rows])),
        "f1": float(np.mean([row["f1"] for row in rows])),
        "v_rand_pooled": sum(r["sum_p2"] for r in pooled) / den if den else 1.0,
        "slices_scored": len(scored),
        "slices_empty": len(zs) - len(scored),
    }
    if sweep:
        mean["v_rand_best"] = sweep_out["best_v_rand"]["value"]
        mean["v_info_best"] = sweep_out["best_v_info"]["value"]
    from emtile import __version__

    settings = {
        "pred": names[0], "labels": names[1], "slices": list(zs), "threshold": threshold,
        "sweep": bool(sweep),
        "thresholds": list(SWEEP_THRESHOLDS) if sweep else [] if label_image else [threshold],
        "invert": bool(invert), "prediction_kind": kind, "label_image": bool(label_image),
        "foreground": ("label 1 (cell interior); for the pixel metrics, predicted ids != 0"
                       if label_image else "label 1 (cell interior); probabilities > threshold"),
        "connectivity": 4,
        "thinning": ("none: the label image's ids are the segments" if label_image
                     else "watershed, flat relief, 1-pixel lines"),
        "conventions": dict(CONVENTIONS),
        "emtile_version": __version__,
    }
    return {"settings": settings, "pixel": pixel, "slices": rows, "mean": mean, "sweep": sweep_out}


# --------------------------------------------------------------------------- reports


_CSV_FIELDS = ["z", "threshold", "v_rand", "v_info", "rand_error", "voi_split", "voi_merge",
               "adapted_rand_error", "pixel_error", "f1", "iou", "tp", "fp", "fn", "tn", "n",
               "singletons", "rand_precision", "rand_recall", "h_truth", "h_pred", "mutual_info",
               "empty"]

#: The report's per-slice table: (heading, key, width).
_TABLE = (("V-Rand", "v_rand", 10), ("V-Info", "v_info", 10), ("RandErr", "rand_error", 11),
          ("VOIsplit", "voi_split", 9), ("VOImerge", "voi_merge", 9),
          ("ARE", "adapted_rand_error", 8), ("pixErr", "pixel_error", 10), ("F1", "f1", 8))


def format_report(result):
    """The report ``emtile evaluate`` prints for the ``result`` of :func:`evaluate`: the settings,
    a per-slice table with the mean, the threshold sweep and the pixel metrics."""
    s, sweep = result["settings"], result["sweep"]
    label_image = s.get("label_image", False)
    region = (f"  (a region: slices {s['slices'][0]}..{s['slices'][-1]} of the labels, offset "
              f"{','.join(map(str, s['offset']))})" if s.get("offset") else "")
    lines = [
        f"prediction  {s['pred']}  ({s['prediction_kind']}{', inverted' if s['invert'] else ''})"
        + region,
        f"labels      {s['labels']}",
        ("scored as   a segmentation: no threshold (predicted 0 = boundary)" if label_image else
         f"threshold   {s['threshold']:g} (cell interior where p > {s['threshold']:g})"
         + ("   (+ sweep 0.0..1.0 step 0.1)" if s["sweep"] else "")),
        "",
    ]
    at = "" if label_image else "@" + format(s["threshold"], "g")
    columns = [(name + at, key, max(width, len(name + at))) for name, key, width in _TABLE]
    head = f"{'slice':>6}" + "".join(f"  {name:>{w}}" for name, _, w in columns)
    if sweep:
        br, bi = sweep["best_v_rand"]["threshold"], sweep["best_v_info"]["threshold"]
        head += f"  {'V-Rand@' + format(br, 'g') + '*':>11}  {'V-Info@' + format(bi, 'g') + '*':>11}"
    lines += [head, "-" * len(head)]

    def row_text(label, d, best=None):
        text = f"{label:>6}" + "".join(f"  {d[key]:{w}.4f}" for _, key, w in columns)
        if best is not None:
            text += f"  {best[0]:11.4f}  {best[1]:11.4f}"
        return text

    for d in result["slices"]:
        best = (d["v_rand_best"], d["v_info_best"]) if sweep else None
        lines.append(row_text(str(d["z"]), d, best) + ("  (empty truth: not in mean)" if d["empty"] else ""))
    m = result["mean"]
    lines.append("-" * len(head))
    lines.append(row_text("mean", m, (m["v_rand_best"], m["v_info_best"]) if sweep else None))
    lines += ["V-Rand, V-Info: ISBI 2012 (truth membrane left out; a predicted 0 inside a cell "
              "is a singleton).",
              "VOIsplit = H(pred|truth), VOImerge = H(truth|pred), in bits; ARE = adapted Rand "
              "error; both CREMI's way",
              "(truth membrane left out; predicted 0 one segment)."]
    if sweep:
        lines += _sweep_lines(sweep, format(s["threshold"], "g"))
    p = result["pixel"]
    what = (f"pixel metrics of the labelled pixels (id != 0 as cell interior; meaningful when the "
            f"segmentation keeps its boundaries), all {len(result['slices'])} slices:"
            if label_image else
            f"pixel metrics at threshold {p['threshold']:g} (foreground = cell interior), "
            f"all {len(result['slices'])} slices:")
    lines += ["", what,
              f"  accuracy {p['accuracy']:.4f}  pixel error {p['pixel_error']:.4f}  "
              f"precision {p['precision']:.4f}  recall {p['recall']:.4f}  "
              f"F1/Dice {p['f1']:.4f}  IoU {p['iou']:.4f}",
              f"  confusion matrix [[TN, FP], [FN, TP]] = {p['confusion_matrix']}", "",
              p["classification_report"].rstrip()]
    return "\n".join(lines)


def _sweep_lines(sweep, t):
    lines = ["", "threshold sweep (mean over slices):",
             "  t        " + "".join(f"{t:>7.1f}" for t in sweep["thresholds"])]
    for name, key in (("V-Rand", "v_rand"), ("V-Info", "v_info"), ("VOIsplit", "voi_split"),
                      ("VOImerge", "voi_merge"), ("ARE", "adapted_rand_error")):
        lines.append(f"  {name:<8} " + "".join(f"{v:7.4f}" for v in sweep[key]))
    lines.append(f"  best V-Rand {sweep['best_v_rand']['value']:.4f} at "
                 f"{sweep['best_v_rand']['threshold']:g} (Rand error "
                 f"{sweep['best_rand_error']['value']:.4f}); best V-Info "
                 f"{sweep['best_v_info']['value']:.4f} at {sweep['best_v_info']['threshold']:g}"
                 f"  (* the sweep's best threshold; the other columns are at {t})")
    edge = sweep["best_v_rand"]["threshold"]
    if edge in (sweep["thresholds"][1], sweep["thresholds"][-2]) and len(sweep["v_rand"]) > 2:
        lines.append(f"  note: the best V-Rand threshold {edge:g} is at the edge of the "
                     f"challenge's grid (0.0 and 1.0 leave no interior or no membrane): the "
                     f"maximum may lie beyond it")
    return lines


def write_csv(result, path):
    """The ``result`` of :func:`evaluate` as CSV: a settings line, one row per slice, a ``mean``
    row, a ``pixel`` row and (with a sweep) one row per threshold. Columns are named in the
    second line (``_CSV_FIELDS``: ``z``, ``threshold`` (empty for a label image), the ISBI and
    CREMI scores, the pixel metrics and counts, the entropies); a row leaves empty what it does
    not have."""
    s = result["settings"]
    import csv

    threshold = "" if s["threshold"] is None else s["threshold"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["# emtile evaluate", f"pred={s['pred']}", f"labels={s['labels']}",
                    f"threshold={threshold}", f"sweep={s['sweep']}", f"invert={s['invert']}",
                    f"prediction_kind={s['prediction_kind']}",
                    f"label_image={s.get('label_image', False)}",
                    f"version={s['emtile_version']}"])
        fields = _CSV_FIELDS + (["v_rand_best", "v_info_best"] if result["sweep"] else [])
        w.writerow(["row"] + fields)

        def row(kind, values):
            w.writerow([kind] + ["" if values.get(k) is None else values[k] for k in fields])

        for d in result["slices"]:
            row("slice", d)
        row("mean", {**result["mean"], "threshold": threshold})
        p = result["pixel"]
        pixel_keys = ("pixel_error", "f1", "iou", "tp", "fp", "fn", "tn")
        row("pixel", {"threshold": threshold, **{k: p[k] for k in pixel_keys}})
        if result["sweep"]:
            sw = result["sweep"]
            for i, t in enumerate(sw["thresholds"]):
                row("sweep", {"threshold": t, **{k: sw[k][i] for k in _SCORES}})


def write_json(result, path):
    """The ``result`` of :func:`evaluate`, every number and setting, as JSON."""
    import json

    with open(path, "w") as f:
        json.dump(result, f, indent=2)
