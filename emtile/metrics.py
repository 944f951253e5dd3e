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
"""

from fractions import Fraction
from numbers import Integral

import numpy as np

from emtile._errors import EmtileError
from emtile.volume import LabelChecker, Stack, Window, open_stack, resolve_slices, slab_depth, slice_runs

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


def _tables(truth_seg, pred_seg):
    """Counts restricted to the truth foreground: (a_i, b_j, c_ij, singletons, n), all int64."""
    t = np.asarray(truth_seg).ravel()
    s = np.asarray(pred_seg).ravel()
    inside = t > 0
    t, s = t[inside].astype(np.int64), s[inside].astype(np.int64)
    n = t.size
    if n == 0:
        return None
    a = np.bincount(t)
    a = a[a > 0]
    labelled = s > 0
    singles = n - int(np.count_nonzero(labelled))
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
    return a, b, c, singles, n


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
        See the module docstring for the conventions (empty slices, single segments).
    """
    truth_seg, pred_seg = np.asarray(truth_seg), np.asarray(pred_seg)
    _check_shapes(truth_seg.shape, pred_seg.shape, "truth_seg", "pred_seg")
    tables = _tables(truth_seg, pred_seg)
    if tables is None:
        return {"n": 0, "singletons": 0, "sum_p2": 0, "sum_s2": 0, "sum_t2": 0,
                "rand_precision": 1.0, "rand_recall": 1.0, "v_rand": 1.0, "h_truth": 0.0,
                "h_pred": 0.0, "h_joint": 0.0, "mutual_info": 0.0, "v_info": 1.0, "empty": True}
    a, b, c, singles, n = tables
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
        "empty": False,
    }


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
                        "must be 0-255 probabilities (255 = 1.0) or a 0/1 mask")
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


def check_kinds(pred, labels, *, command="evaluate"):
    """Refuse a prediction and labels whose stores say they are something else: the raw image
    given as the prediction, the two swapped, an image or a prediction given as labels.
    Sources that record no kind (TIFFs, arrays, other tools' stores) pass."""
    (pk, pmeta), (lk, _) = store_kind(pred), store_kind(labels)
    truth = pk == "labels" and pmeta.get("threshold") is None  # converted, not predicted
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


# --------------------------------------------------------------------------- volumes


def _slab_depth(stack):
    """Slices per read: about ``_SLAB_BYTES`` of prediction, counted as at least float32."""
    return slab_depth(stack.shape, max(stack.dtype.itemsize, 4), budget=_SLAB_BYTES)


def _mean(values):
    return float(np.mean(values)) if len(values) else 1.0


def evaluate(pred, labels, *, slices=None, threshold=0.5, sweep=False, invert=False, progress=True,
             json_path=None, csv_path=None):
    """Score a prediction against binary labels: pixel metrics and the ISBI 2012 scores.

    Reads the two volumes in z-slabs (at most ~64 MB of prediction at a time), so volumes
    larger than memory can be scored; pixel counts are accumulated over the slabs.

    Parameters
    ----------
    pred : str, Path or array-like, shape (Z, Y, X) or (Y, X)
        Cell-interior probabilities: float in [0, 1], or uint8 0-255 (255 = 1.0); or a mask
        (bool, or integers that are all 0/1). Paths open with :func:`emtile.open_volume`
        (``pred.zarr`` reads its probabilities at ``"0"``; ``pred.zarr/labels/mask`` its mask).
    labels : str, Path or array-like, same shape
        Binary truth: {0, 1} (``emtile convert --labels``) or {0, 255} (the ISBI TIFF);
        non-zero = cell interior.
    slices : None, int, list of int or slice
        Slices (z indices) to score; all by default.
    threshold : float
        Interior where probability > threshold (default 0.5); pixel metrics always use it.
    sweep : bool
        Also run the challenge's "maximal" variant over thresholds 0.0, 0.1, ..., 1.0 and
        report the best mean V-Rand and the best mean V-Info, each with its threshold.
    invert : bool
        The prediction is a membrane probability (0 = interior); use ``1 - p``. (ISBI labels
        are 255 = cell interior; emtile predicts the interior.)
    progress : bool
        Show a tqdm progress bar.
    json_path, csv_path : str or Path, optional
        Also write the result there (:func:`write_json`, :func:`write_csv`); both are checked
        before any work (their folders exist and are writable, neither lies in an input).

    Returns
    -------
    dict
        ``settings`` (inputs, slices, threshold, thresholds, sweep, invert, prediction kind),
        ``pixel`` (:func:`metrics_from_counts` over all scored slices at ``threshold``, with
        ``classification_report``), ``slices`` (one dict per slice: ``z``, ``v_rand``,
        ``v_info``, ``rand_error``, ``pixel_error``, ``f1``, counts, ``n``, ``empty``; with
        ``sweep`` also the per-threshold lists and the scores at the best thresholds),
        ``mean`` (means over non-empty slices; ``pixel_error`` over all), ``sweep`` (None, or
        ``thresholds``, mean ``v_rand``/``v_info`` lists, ``best_v_rand``/``best_v_info``
        with ``value`` and ``threshold``). Plain Python numbers, ready for JSON.

    Examples
    --------
    >>> t = np.zeros((2, 8, 8), np.uint8); t[:, :, :3] = 1; t[:, :, 4:] = 1
    >>> r = evaluate(t.astype(np.float32), t, progress=False)
    >>> r["mean"]["v_rand"], r["mean"]["v_info"], r["pixel"]["pixel_error"]
    (1.0, 1.0, 0.0)
    """
    from tqdm import tqdm

    from emtile import store

    store.check_output(None, inputs=[pred, labels], files={"--json": json_path, "--csv": csv_path})
    check_threshold(threshold)
    threshold = float(threshold)
    check_kinds(pred, labels)
    pstack, lstack, offset = open_pair(pred, labels)
    pname, lname = pstack.display, lstack.display
    zs = _local_slices(slices, pstack.shape[0], offset[0])
    thresholds = sorted(set(SWEEP_THRESHOLDS) | {threshold}) if sweep else [threshold]
    decoder = PredictionDecoder(pstack.dtype, invert=invert)
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

    bar = tqdm(total=len(zs), desc="evaluate", unit="slice", disable=not progress)
    try:
        for z0, z1 in slice_runs(zs, _slab_depth(pstack)):
            where = f"slices {z0}-{z1 - 1}" if z1 - z0 > 1 else f"slice {z0}"
            pslab = pstack.read(z0, z1)
            tslab = lstack.read(z0, z1)
            scale = decoder.inspect(pslab, where)
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

    out = _summarise(results, zs, thresholds, threshold, sweep, invert, decoder, pname, lname)
    if any(offset):  # a prediction of a region: slices in the labels' numbering
        out["settings"]["offset"] = list(offset)
        out["settings"]["slices"] = [z + offset[0] for z in zs]
        for row in out["slices"]:
            row["z"] += offset[0]
    for path, write in ((json_path, write_json), (csv_path, write_csv)):
        if path is not None:
            write(out, path)
    return out


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


def _summarise(results, zs, thresholds, threshold, sweep, invert, decoder, pname, lname):
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
        vr = [mean_at(t, "v_rand") for t in grid]
        vi = [mean_at(t, "v_info") for t in grid]
        # ties: the first (lowest) threshold wins, as Fiji's strict ">" keeps the first maximum
        ir, ii = int(np.argmax(vr)), int(np.argmax(vi))
        best = {"v_rand": grid[ir], "v_info": grid[ii]}
        sweep_out = {
            "thresholds": grid,
            "v_rand": vr,
            "v_info": vi,
            "rand_error": [1.0 - v for v in vr],
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
        row = {
            "z": z, "threshold": threshold,
            "v_rand": r["v_rand"], "v_info": r["v_info"], "rand_error": r["rand_error"],
            "pixel_error": m["pixel_error"], "f1": m["f1"], "iou": m["iou"],
            "tp": m["tp"], "fp": m["fp"], "fn": m["fn"], "tn": m["tn"],
            "n": r["n"], "singletons": r["singletons"],
            "rand_precision": r["rand_precision"], "rand_recall": r["rand_recall"],
            "h_truth": r["h_truth"], "h_pred": r["h_pred"], "mutual_info": r["mutual_info"],
            "empty": r["empty"],
        }
        if sweep:
            row["sweep_v_rand"] = [results[z][t]["v_rand"] for t in SWEEP_THRESHOLDS]
            row["sweep_v_info"] = [results[z][t]["v_info"] for t in SWEEP_THRESHOLDS]
            row["v_rand_best"] = results[z][best["v_rand"]]["v_rand"]
            row["v_info_best"] = results[z][best["v_info"]]["v_info"]
        rows.append(row)

    pooled = [results[z][threshold] for z in scored]
    den = sum(0.5 * r["sum_s2"] + 0.5 * r["sum_t2"] for r in pooled)
    mean = {
        "v_rand": mean_at(threshold, "v_rand"),
        "v_info": mean_at(threshold, "v_info"),
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
        "pred": pname, "labels": lname, "slices": list(zs), "threshold": threshold,
        "sweep": bool(sweep), "thresholds": list(SWEEP_THRESHOLDS) if sweep else [threshold],
        "invert": bool(invert), "prediction_kind": decoder.describe(),
        "foreground": "label 1 (cell interior); probabilities > threshold",
        "connectivity": 4, "thinning": "watershed, flat relief, 1-pixel lines",
        "emtile_version": __version__,
    }
    return {"settings": settings, "pixel": pixel, "slices": rows, "mean": mean, "sweep": sweep_out}


# --------------------------------------------------------------------------- reports


_CSV_FIELDS = ["z", "threshold", "v_rand", "v_info", "rand_error", "pixel_error", "f1", "iou",
               "tp", "fp", "fn", "tn", "n", "singletons", "rand_precision", "rand_recall",
               "h_truth", "h_pred", "mutual_info", "empty"]


def format_report(result):
    """The report ``emtile evaluate`` prints for the ``result`` of :func:`evaluate`: the settings,
    a per-slice table with the mean, the threshold sweep and the pixel metrics."""
    s, sweep = result["settings"], result["sweep"]
    region = (f"  (a region: slices {s['slices'][0]}..{s['slices'][-1]} of the labels, offset "
              f"{','.join(map(str, s['offset']))})" if s.get("offset") else "")
    lines = [
        f"prediction  {s['pred']}  ({s['prediction_kind']}{', inverted' if s['invert'] else ''})"
        + region,
        f"labels      {s['labels']}",
        f"threshold   {s['threshold']:g} (cell interior where p > {s['threshold']:g})"
        + ("   (+ sweep 0.0..1.0 step 0.1)" if s["sweep"] else ""),
        "",
    ]
    t = format(s["threshold"], "g")
    head = (f"{'slice':>6}  {'V-Rand@' + t:>10}  {'V-Info@' + t:>10}  {'RandErr@' + t:>11}  "
            f"{'pixErr@' + t:>10}  {'F1@' + t:>8}")
    if sweep:
        br, bi = sweep["best_v_rand"]["threshold"], sweep["best_v_info"]["threshold"]
        head += f"  {'V-Rand@' + format(br, 'g') + '*':>11}  {'V-Info@' + format(bi, 'g') + '*':>11}"
    lines += [head, "-" * len(head)]

    def row_text(label, d, best=None):
        text = (f"{label:>6}  {d['v_rand']:10.4f}  {d['v_info']:10.4f}  {d['rand_error']:11.4f}  "
                f"{d['pixel_error']:10.4f}  {d['f1']:8.4f}")
        if best is not None:
            text += f"  {best[0]:11.4f}  {best[1]:11.4f}"
        return text

    for d in result["slices"]:
        best = (d["v_rand_best"], d["v_info_best"]) if sweep else None
        lines.append(row_text(str(d["z"]), d, best) + ("  (empty truth: not in mean)" if d["empty"] else ""))
    m = result["mean"]
    lines.append("-" * len(head))
    lines.append(row_text("mean", m, (m["v_rand_best"], m["v_info_best"]) if sweep else None))
    if sweep:
        lines += ["", "threshold sweep (mean over slices):",
                  "  t      " + "".join(f"{t:>7.1f}" for t in sweep["thresholds"]),
                  "  V-Rand " + "".join(f"{v:7.4f}" for v in sweep["v_rand"]),
                  "  V-Info " + "".join(f"{v:7.4f}" for v in sweep["v_info"]),
                  f"  best V-Rand {sweep['best_v_rand']['value']:.4f} at {sweep['best_v_rand']['threshold']:g}"
                  f" (Rand error {sweep['best_rand_error']['value']:.4f}); "
                  f"best V-Info {sweep['best_v_info']['value']:.4f} at {sweep['best_v_info']['threshold']:g}"
                  f"  (* the sweep's best threshold; the other columns are at {t})"]
        edge = sweep["best_v_rand"]["threshold"]
        if edge in (sweep["thresholds"][1], sweep["thresholds"][-2]) and len(sweep["v_rand"]) > 2:
            lines.append(f"  note: the best V-Rand threshold {edge:g} is at the edge of the "
                         f"challenge's grid (0.0 and 1.0 leave no interior or no membrane): the "
                         f"maximum may lie beyond it")
    p = result["pixel"]
    lines += ["", f"pixel metrics at threshold {p['threshold']:g} (foreground = cell interior), "
                  f"all {len(result['slices'])} slices:",
              f"  accuracy {p['accuracy']:.4f}  pixel error {p['pixel_error']:.4f}  "
              f"precision {p['precision']:.4f}  recall {p['recall']:.4f}  "
              f"F1/Dice {p['f1']:.4f}  IoU {p['iou']:.4f}",
              f"  confusion matrix [[TN, FP], [FN, TP]] = {p['confusion_matrix']}", "",
              p["classification_report"].rstrip()]
    return "\n".join(lines)


def write_csv(result, path):
    """The ``result`` of :func:`evaluate` as CSV: a settings line, one row per slice, a ``mean``
    row, a ``pixel`` row and (with a sweep) one row per threshold."""
    s = result["settings"]
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["# emtile evaluate", f"pred={s['pred']}", f"labels={s['labels']}",
                    f"threshold={s['threshold']}", f"sweep={s['sweep']}", f"invert={s['invert']}",
                    f"prediction_kind={s['prediction_kind']}", f"version={s['emtile_version']}"])
        extra = ["v_rand_best", "v_info_best"] if result["sweep"] else []
        w.writerow(["row"] + _CSV_FIELDS + extra)
        for d in result["slices"]:
            w.writerow(["slice"] + [d[k] for k in _CSV_FIELDS + extra])
        m = result["mean"]
        w.writerow(["mean"] + [m.get(k, "") if k not in ("z", "threshold") else
                               ("" if k == "z" else s["threshold"]) for k in _CSV_FIELDS + extra])
        p = result["pixel"]
        w.writerow(["pixel"] + ["", s["threshold"], "", "", "", p["pixel_error"], p["f1"], p["iou"],
                                p["tp"], p["fp"], p["fn"], p["tn"]] + [""] * (len(_CSV_FIELDS) - 12 + len(extra)))
        if result["sweep"]:
            sw = result["sweep"]
            for t, vr, vi in zip(sw["thresholds"], sw["v_rand"], sw["v_info"]):
                row = {"threshold": t, "v_rand": vr, "v_info": vi, "rand_error": 1.0 - vr}
                w.writerow(["sweep"] + [row.get(k, "") for k in _CSV_FIELDS + extra])


def write_json(result, path):
    """The ``result`` of :func:`evaluate`, every number and setting, as JSON."""
    import json

    with open(path, "w") as f:
        json.dump(result, f, indent=2)
