"""The evaluate driver: a prediction (or a segmentation) and binary labels opened on one grid,
checked by the kinds their stores record, scored slab by slab with :mod:`emtile.metrics`' per-slice
scores and summarised in one result (:func:`evaluate`; :mod:`emtile.reports` prints and writes it);
or two id volumes (a segmentation and instance labels) scored as one whole volume with
:mod:`emtile.scores3d` (``mode="volume"``, chosen by itself when both are id volumes).

Whether a prediction is a label image (scored as segments) or a probability map or mask
(thresholded and thinned) is decided here (:func:`is_label_image`), and so is the mode
(:func:`choose_mode`); the scores and their conventions are :mod:`emtile.metrics`' (per slice) and
:mod:`emtile.scores3d`' (whole volume).
"""

import numpy as np

from emtile._errors import EmtileError
from emtile.metrics import (CONVENTIONS, SCORES, SWEEP_THRESHOLDS, PredictionDecoder,
                            check_ids, check_threshold, classification_report_text,
                            confusion_counts, metrics_from_counts, segmentation_stats,
                            thin_boundaries, truth_segments)
from emtile.reports import write_csv, write_json
from emtile.scores3d import VOLUME_CONVENTIONS, Contingency
from emtile.geometry import Window
from emtile.stacks import (LabelChecker, Stack, open_stack, resolve_slices, slab_depth,
                           slice_runs)

__all__ = [
    "evaluate",
    "open_pair",
    "check_kinds",
    "store_kind",
    "is_label_image",
    "is_segmentation_store",
    "choose_mode",
    "check_volume_kinds",
    "LABEL_IMAGE_DTYPES",
    "EVALUATE_MODES",
]

#: ``evaluate``'s modes: chosen from the inputs, per slice (binary labels), whole volume (ids).
EVALUATE_MODES = ("auto", "slices", "volume")

_SLAB_BYTES = 64 * 2**20  # how much prediction one read may hold


# --------------------------------------------------------------------------- what the inputs are


def store_kind(source):
    """``(kind, emtile attributes)`` of an emtile store (``"image"``, ``"labels"``,
    ``"probabilities"``; a predicted mask is ``"labels"`` with a ``threshold``), or
    ``(None, {})`` for anything else (arrays, TIFFs, foreign stores)."""
    import os
    from pathlib import Path

    from emtile.locations import Location, is_url
    from emtile.store import emtile_attrs, is_zarr_store

    if isinstance(source, Location) and not source.is_local or is_url(source):
        loc = Location(source)  # a URL: the store, or the group holding an array of it
        candidates = (loc, loc.parent) if "/" in loc.path else (loc,)
    elif not isinstance(source, (str, os.PathLike)):
        return None, {}
    else:
        p = Path(str(source))
        candidates = (p, p.parent)
    for candidate in candidates:  # a group, or an array inside one (pred.zarr/0)
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
    """Whether ``evaluate`` scores the prediction ``source`` (of ``dtype``) as a label image, and
    whether a volume holds ids (both sides of ``mode="volume"``).

    The store's own record first: an ``emtile segment`` store is one, and so are labels
    converted with ``ids=True`` (instance ids); any other emtile store (probabilities, a
    predicted mask, binary labels, an image) is not. Otherwise (arrays, TIFFs, other tools'
    stores) an integer dtype of 32 or 64 bits (:data:`LABEL_IMAGE_DTYPES`) is one; bool, 8- and
    16-bit integers and floats are probabilities or masks (``mode="volume"`` takes them as ids
    all the same).

    Examples
    --------
    >>> is_label_image(np.zeros(3, np.uint32), np.uint32), is_label_image(None, np.uint8)
    (True, False)
    """
    kind, meta = store_kind(source)
    if kind is not None:
        return kind == "labels" and ("segment" in meta or bool(meta.get("ids")))
    return np.dtype(dtype) in LABEL_IMAGE_DTYPES


def check_kinds(pred, labels, *, command="evaluate"):
    """Refuse a prediction and labels whose stores say they are something else: the raw image
    given as the prediction, the two swapped, an image, a prediction or a segmentation given as
    labels. Sources that record no kind (TIFFs, arrays, other tools' stores) pass."""
    (pk, pmeta), (lk, lmeta) = store_kind(pred), store_kind(labels)
    # converted labels: neither predicted (a mask records its threshold) nor segmented
    truth = pk == "labels" and pmeta.get("threshold") is None and "segment" not in pmeta
    if truth and lk == "probabilities":
        raise EmtileError(f"pred and labels are swapped: {str(pred)!r} holds labels and "
                          f"{str(labels)!r} a prediction (their stores say so); {command} takes "
                          f"the prediction as pred=")
    if pk == "image":
        raise EmtileError(f"pred {str(pred)!r} is an image volume (its store says kind 'image'), "
                          f"not a prediction: {command} takes the output of predict (or a "
                          f"mask) as pred=")
    if lk in ("image", "probabilities"):
        what = "an image volume" if lk == "image" else "a prediction"
        raise EmtileError(f"labels {str(labels)!r} is {what} (its store says kind {lk!r}), not "
                          f"labels: {command} takes binary labels (converted with the labels "
                          f"option) as labels=")
    if lk == "labels" and "segment" in lmeta:
        raise EmtileError(f"labels {str(labels)!r} is a segmentation (emtile segment wrote it), "
                          f"not binary labels: {command} takes binary labels (1 = cell interior, "
                          f"0 = membrane; converted with the labels option) as labels=; a "
                          f"segmentation is scored by giving it as pred=")
    if lk == "labels" and lmeta.get("ids"):
        hint = ("; instance ids are scored against a segmentation (emtile segment's output) as "
                "one volume, mode='volume'" if command == "evaluate" else "")
        raise EmtileError(f"labels {str(labels)!r} holds instance ids (converted with the ids option), not "
                          f"binary labels: {command} takes binary labels (1 = cell interior, "
                          f"0 = membrane) as labels={hint}")


def _what_store_holds(kind, meta):
    """How a refusal names an emtile store that holds no ids."""
    if kind == "probabilities":
        return "a prediction (probabilities): segment it first (emtile segment)"
    if kind == "labels" and meta.get("threshold") is not None:
        return "a predicted mask"
    if kind == "labels":
        return "binary labels (converted without ids=True)"
    return f"an image volume (its store says kind {kind!r})"


def check_volume_kinds(pred, labels, pstack, lstack):
    """Refuse what whole-volume scores cannot compare: an emtile store that records something
    other than ids (a prediction, a mask, binary labels, an image), or a non-integer array."""
    for name, source, stack in (("pred", pred, pstack), ("labels", labels, lstack)):
        kind, meta = store_kind(source)
        if kind is not None and not (kind == "labels" and ("segment" in meta or meta.get("ids"))):
            raise EmtileError(f"{name} {str(source)!r} is {_what_store_holds(kind, meta)}, not "
                              f"an id volume: whole-volume scores (mode='volume') compare two "
                              f"id volumes (emtile segment's output, labels converted with "
                              f"ids=True, or integer arrays)")
        if not (np.issubdtype(stack.dtype, np.integer) or stack.dtype == np.bool_):
            raise EmtileError(f"{name} {stack.display!r} has dtype {stack.dtype}: whole-volume "
                              f"scores (mode='volume') compare integer ids (0 = unlabelled in "
                              f"the labels)")


def _check_mode(mode):
    if mode not in EVALUATE_MODES:
        raise EmtileError(f"mode={mode!r} is not valid: choose auto, slices (per-slice scores "
                          f"against binary labels) or volume (one score of two id volumes)")


def choose_mode(mode, pred, labels, pdtype, ldtype):
    """``"slices"`` or ``"volume"``: ``mode`` itself, or for ``"auto"``, ``"volume"`` when both
    the prediction and the labels are id volumes (:func:`is_label_image`: emtile segment's
    output, labels converted with ``ids=True``, 32/64-bit integer arrays), else ``"slices"``."""
    _check_mode(mode)
    if mode != "auto":
        return mode
    ids = is_label_image(pred, pdtype) and is_label_image(labels, ldtype)
    return "volume" if ids else "slices"


def open_pair(pred, other, *, other_name="labels", command="evaluate"):
    """Open a prediction and a volume to compare it with (labels, or the raw image) on the same
    grid: ``(pred stack, other stack, offset)``.

    When the prediction covers a region of ``other`` (``predict(..., roi=...)``: a smaller store
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

    from emtile.locations import Location

    start = offset_voxels(pred) if isinstance(pred, (str, os.PathLike, Location)) else None
    region = (f"prediction {pstack.display} has shape {tuple(pstack.array.shape)} but "
              f"{other_name} {ostack.display} have shape {tuple(ostack.array.shape)}")
    if start is None:
        raise EmtileError(f"{region}; they must match (a prediction of a region, predict's "
                          f"roi=, records where it lies; this one records nothing)")
    start = (0,) * (3 - len(start)) + tuple(start[-3:])
    if (ostack.lead != pstack.lead or any(a < 0 or a + n > m for a, n, m
                                          in zip(start, pstack.shape, ostack.shape))):
        box = ", ".join(f"{ax} {a}:{a + n}" for ax, a, n in zip("zyx", start, pstack.shape))
        raise EmtileError(f"{region}: the prediction covers {box} of its input, which does not "
                          f"fit in the {other_name}")
    inner = {"": start, "2d": start[1:], "c": (0,) + start}[ostack.lead]
    window = Window(ostack.array, inner, pstack.array.shape)
    return pstack, Stack(window, ostack.display), start



# --------------------------------------------------------------------------- scoring volumes


def _slab_depth(stack):
    """Slices per read: about ``_SLAB_BYTES`` of prediction, counted as at least float32."""
    return slab_depth(stack.shape, max(stack.dtype.itemsize, 4), budget=_SLAB_BYTES)


def _mean(values):
    return float(np.mean(values)) if len(values) else 1.0


def evaluate(pred, labels, *, slices=None, threshold=None, sweep=False, invert=False,
             mode="auto", progress=True, json_path=None, csv_path=None, storage_options=None):
    """Score a prediction or a segmentation against binary labels: the ISBI 2012 scores (V-Rand,
    V-Info), the CREMI ones (VOI split and merge, adapted Rand error) and pixel metrics, per
    slice; or a segmentation against instance ids over the whole volume (``mode="volume"``).

    Reads the two volumes in z-slabs (at most ~64 MB of prediction at a time), so volumes
    larger than memory can be scored; pixel counts are accumulated over the slabs.

    Parameters
    ----------
    pred : str, Path or array-like, shape (Z, Y, X) or (Y, X)
        Cell-interior probabilities, from emtile or any other tool (TIFF, HDF5, Zarr without
        emtile metadata): float in [0, 1], uint8 0-255 (255 = 1.0) or uint16 0-65535
        (65535 = 1.0; :mod:`emtile.maps`); or a mask
        (bool, or integers that are all 0/1); or a label image, scored as a segmentation (its
        ids are the segments, 0 = boundary): ``emtile segment``'s store, or any uint32 / uint64
        / int32 / int64 array (:func:`is_label_image`). Paths open with
        :func:`emtile.open_volume` (``pred.zarr`` reads its probabilities at ``"0"``;
        ``pred.zarr/labels/mask`` its mask).
    labels : str, Path or array-like, same shape
        Binary truth: {0, 1} (``emtile convert --labels``) or {0, 255} (the ISBI TIFF);
        non-zero = cell interior. A segmentation store is refused here (instance ids are not
        binary labels), except in ``mode="volume"``, where ``labels`` are instance ids (labels
        converted with ``ids=True``, or any integer volume; 0 = unlabelled, left out).
    slices : None, int, list of int or slice
        Slices (z indices) to score; all by default. In volume mode, the slices scored together
        as one volume (e.g. ``slice(150, 250)``: a held-out block).
    threshold : float, optional
        Interior where probability > threshold (default 0.5); pixel metrics always use it.
        Refused with a label image, which has no threshold.
    sweep : bool
        Also run the challenge's "maximal" variant over thresholds 0.0, 0.1, ..., 1.0 and
        report the best mean V-Rand and the best mean V-Info, each with its threshold.
        Refused with a label image.
    invert : bool
        The prediction is a boundary map (1 = membrane, 0 = interior); use ``1 - p``. (ISBI labels
        are 255 = cell interior; emtile predicts the interior.) Refused with a label image.
    mode : {"auto", "slices", "volume"}
        ``"slices"``: the per-slice scores above, against binary labels. ``"volume"``: ``pred``
        and ``labels`` are both id volumes, scored as one volume (every scored slice together,
        not slice by slice): VOI split, VOI merge and the adapted Rand error, truth 0 left out,
        ids as given, CREMI's way (:mod:`emtile.scores3d`); any integer ids are accepted (a
        uint16 TIFF too), a store that records something else is refused, and ``threshold``,
        ``sweep`` and ``invert`` are refused. ``"auto"`` (default): ``"volume"`` when both are
        id volumes by :func:`is_label_image` (``emtile segment``'s output, labels converted with
        ``ids=True``, 32/64-bit integer arrays), else ``"slices"``.
    progress : bool
        Show a tqdm progress bar.
    json_path, csv_path : str or Path, optional
        Also write the result there (:func:`emtile.reports.write_json`, ``write_csv``); both
        are checked before any work (their folders exist and are writable, neither lies in an
        input).

    Returns
    -------
    dict
        ``settings`` (inputs, slices, threshold (None for a label image), thresholds, sweep,
        invert, ``prediction_kind``, ``label_image``, ``conventions``), ``pixel``
        (:func:`emtile.metrics.metrics_from_counts` over all scored slices at ``threshold``, with
        ``classification_report``; for a label image, of its labelled pixels, id != 0),
        ``slices`` (one dict per slice: ``z``, ``threshold``, ``v_rand``, ``v_info``,
        ``rand_error``, ``voi_split``, ``voi_merge``, ``adapted_rand_error``, ``pixel_error``,
        ``f1``, counts, ``n``, ``empty``; with ``sweep`` also the per-threshold lists and the
        scores at the best thresholds), ``mean`` (means over non-empty slices; ``pixel_error``
        over all), ``sweep`` (None, or ``thresholds``, mean ``v_rand`` / ``v_info`` /
        ``voi_split`` / ``voi_merge`` / ``adapted_rand_error`` lists, ``best_v_rand`` /
        ``best_v_info`` with ``value`` and ``threshold``). Plain Python numbers, ready for JSON.
        :mod:`emtile.metrics`' docstring states every convention. ``settings["mode"]`` is
        ``"slices"`` or ``"volume"``; in volume mode the scores are under ``volume``
        (:meth:`emtile.scores3d.Contingency.scores`: ``voi_split``, ``voi_merge``, ``voi``,
        ``adapted_rand_error``, ``rand_precision``, ``rand_recall``, ``n``, ``voxels``,
        ``truth_ids``, ``pred_ids``, ``pred_zero``, entropies, ``empty``), ``slices`` is
        empty and ``pixel``, ``mean`` and ``sweep`` are None.

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
    from emtile.locations import at

    pred, labels = at(pred, storage_options), at(labels, storage_options)
    store.check_output(None, inputs=[pred, labels], files={"json_path": json_path,
                                                                "csv_path": csv_path})
    if threshold is not None:
        check_threshold(threshold)
    _check_mode(mode)
    pstack, lstack, offset = open_pair(pred, labels)  # unfinished or unreadable stores first
    if choose_mode(mode, pred, labels, pstack.dtype, lstack.dtype) == "volume":
        _refuse_map_options(pstack.display, threshold=threshold, sweep=sweep, invert=invert)
        check_volume_kinds(pred, labels, pstack, lstack)
        zs = _local_slices(slices, pstack.shape[0], offset[0])
        out = _evaluate_volume(pstack, lstack, zs, progress=progress)
    else:
        check_kinds(pred, labels)
        zs = _local_slices(slices, pstack.shape[0], offset[0])
        out = _evaluate_slices(pred, pstack, lstack, zs, threshold=threshold, sweep=sweep,
                               invert=invert, progress=progress)
    if any(offset):  # a prediction of a region: slices in the labels' numbering
        out["settings"]["offset"] = list(offset)
        out["settings"]["slices"] = [z + offset[0] for z in zs]
        for row in out["slices"]:
            row["z"] += offset[0]
    for path, write in ((json_path, write_json), (csv_path, write_csv)):
        if path is not None:
            write(out, path)
    return out


def _evaluate_slices(pred, pstack, lstack, zs, *, threshold, sweep, invert, progress):
    """The result of per-slice scoring (``mode="slices"``)."""
    label_image = is_label_image(pred, pstack.dtype)
    if label_image:
        _refuse_map_options(pstack.display, threshold=threshold, sweep=sweep, invert=invert)
        try:
            results = _score_label_image(pstack, lstack, zs, progress=progress)
        except EmtileError as exc:
            if not str(exc).startswith("labels are not binary"):
                raise
            raise EmtileError(f"{exc}; or, if they are instance ids, score the two id volumes "
                              f"as one with mode='volume'") from None
        kind = f"label image ({pstack.dtype}): its ids are the segments"
    else:
        threshold = 0.5 if threshold is None else float(threshold)
        thresholds = sorted(set(SWEEP_THRESHOLDS) | {threshold}) if sweep else [threshold]
        pstack, kind = _map_stack(pstack)
        decoder = PredictionDecoder(pstack.dtype, invert=invert)
        results = _score_map(pstack, lstack, zs, thresholds, decoder, progress=progress)
        kind = kind or decoder.describe()
    return _summarise(results, zs, threshold=threshold, sweep=sweep, invert=invert, kind=kind,
                      label_image=label_image, names=(pstack.display, lstack.display))


def _map_stack(pstack):
    """``(stack, kind)``: a uint16 map read through :mod:`emtile.maps` (``v / 65535``, in float64
    so that ``p > threshold`` is exact for decimal thresholds) and how the report names it; any
    other dtype as it is, with None (uint8 0-255 and 0/1 masks are the decoder's, exactly)."""
    if pstack.dtype != np.uint16:
        return pstack, None
    from emtile.maps import ProbabilityMap

    pmap = ProbabilityMap(pstack.array, pstack.display, dtype=np.float64)
    return Stack(pmap, pstack.display), "probability (uint16, 0-65535 = 0..1)"


def _evaluate_volume(pstack, lstack, zs, *, progress):
    """The result of whole-volume scoring (``mode="volume"``): one contingency table over the
    slices ``zs``, read in slabs."""
    from emtile import __version__

    table = Contingency()
    # the two slabs and the working arrays (mask, ids as uint64, their keys) within the budget
    depth = slab_depth(pstack.shape, pstack.dtype.itemsize + lstack.dtype.itemsize + 24,
                       budget=_SLAB_BYTES)
    bar = _progress_bar(len(zs), progress)
    try:
        for z0, z1 in slice_runs(zs, depth):
            pslab, tslab = pstack.read(z0, z1), lstack.read(z0, z1)
            check_ids(pslab, f"label image {pstack.display!r} in {_where(z0, z1)}")
            check_ids(tslab, f"labels {lstack.display!r} in {_where(z0, z1)}")
            table.add(tslab, pslab)
            bar.update(z1 - z0)
    finally:
        bar.close()
    settings = {
        "pred": str(pstack.display), "labels": str(lstack.display), "mode": "volume",
        "slices": list(zs),
        "threshold": None, "sweep": False, "thresholds": [], "invert": False,
        "prediction_kind": f"label image ({pstack.dtype}): its ids are the segments",
        "truth_kind": f"instance ids ({lstack.dtype}), 0 = unlabelled",
        "label_image": True, "ignored": "truth 0 (unlabelled)",
        "connectivity": "none: ids as given (an id is one object wherever its voxels lie)",
        "conventions": dict(VOLUME_CONVENTIONS), "emtile_version": __version__,
    }
    return {"settings": settings, "volume": table.scores(), "pixel": None, "slices": [],
            "mean": None, "sweep": None}


def _refuse_map_options(name, *, threshold, sweep, invert):
    """A label image has no threshold: refuse the options that only mean something for maps."""
    given = [text for text, on in ((f"threshold={threshold:g}" if threshold is not None else "",
                                    threshold is not None),
                                   ("sweep=True", sweep), ("invert=True", invert)) if on]
    if given:
        raise EmtileError(f"{given[0]} does not apply to a label image: pred {name!r} is scored as "
                          f"a segmentation (its ids are the segments), which has no threshold; "
                          f"leave out {given[0].split('=')[0]}=")


def _scores(truth_seg, pred_seg):
    """:func:`emtile.metrics.segmentation_stats` with ``rand_error``."""
    stats = segmentation_stats(truth_seg, pred_seg)
    stats["rand_error"] = 1.0 - stats["v_rand"]
    return stats


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
                stats = _scores(tseg, thin_boundaries(fg))
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
            check_ids(pslab, f"label image {pstack.display!r} in {_where(z0, z1)}")
            for k in range(z1 - z0):
                tfg = checker.foreground(tslab[k], f"slice {z0 + k}")
                stats = _scores(truth_segments(tfg), pslab[k])
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




def _summarise(results, zs, *, threshold, sweep, invert, kind, label_image, names):
    """The result dict of :func:`evaluate` from the per-slice statistics."""
    total = np.zeros(4, np.int64)
    for z in zs:
        total += np.array(results[z][threshold]["counts"], np.int64)
    pixel = metrics_from_counts(*total.tolist())
    pixel["threshold"] = threshold
    pixel["classification_report"] = classification_report_text(*total.tolist())

    scored = [z for z in zs if not results[z][threshold]["empty"]]
    sweep_out, best = None, {"v_rand": threshold, "v_info": threshold}
    if sweep:
        sweep_out = _sweep_summary(results, scored)
        best = {key: sweep_out[f"best_{key}"]["threshold"] for key in ("v_rand", "v_info")}
    rows = [_row(z, results, threshold, best if sweep else None) for z in zs]

    pooled = [results[z][threshold] for z in scored]
    den = sum(0.5 * r["sum_s2"] + 0.5 * r["sum_t2"] for r in pooled)
    mean = {
        **{key: _mean_at(results, scored, threshold, key) for key in SCORES},
        "rand_error": 1.0 - _mean_at(results, scored, threshold, "v_rand"),
        "pixel_error": float(np.mean([row["pixel_error"] for row in rows])),
        "f1": float(np.mean([row["f1"] for row in rows])),
        "v_rand_pooled": sum(r["sum_p2"] for r in pooled) / den if den else 1.0,
        "slices_scored": len(scored),
        "slices_empty": len(zs) - len(scored),
    }
    if sweep:
        mean["v_rand_best"] = sweep_out["best_v_rand"]["value"]
        mean["v_info_best"] = sweep_out["best_v_info"]["value"]
    settings = _settings(zs, threshold=threshold, sweep=sweep, invert=invert, kind=kind,
                         label_image=label_image, names=names)
    return {"settings": settings, "pixel": pixel, "slices": rows, "mean": mean, "sweep": sweep_out}


def _mean_at(results, scored, t, key):
    """The mean of ``key`` at threshold ``t`` over the ``scored`` slices (1.0 if none)."""
    return _mean([results[z][t][key] for z in scored])


def _sweep_summary(results, scored):
    """The sweep's mean scores per threshold and its best V-Rand and V-Info, each maximised
    separately."""
    grid = list(SWEEP_THRESHOLDS)
    means = {key: [_mean_at(results, scored, t, key) for t in grid]
             for key in SCORES if key != "rand_error"}
    vr, vi = means["v_rand"], means["v_info"]
    # ties: the first (lowest) threshold wins, as Fiji's strict ">" keeps the first maximum
    ir, ii = int(np.argmax(vr)), int(np.argmax(vi))
    return {
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


def _row(z, results, threshold, best):
    """One slice's row of the result; ``best`` (the sweep's thresholds) adds the sweep's."""
    r = results[z][threshold]
    m = metrics_from_counts(*r["counts"])
    row = {"z": z, "threshold": threshold, **{key: r[key] for key in SCORES},
           "pixel_error": m["pixel_error"], "f1": m["f1"], "iou": m["iou"],
           "tp": m["tp"], "fp": m["fp"], "fn": m["fn"], "tn": m["tn"],
           "n": r["n"], "singletons": r["singletons"],
           "rand_precision": r["rand_precision"], "rand_recall": r["rand_recall"],
           "h_truth": r["h_truth"], "h_pred": r["h_pred"], "mutual_info": r["mutual_info"],
           "empty": r["empty"]}
    if best is not None:
        row["sweep_v_rand"] = [results[z][t]["v_rand"] for t in SWEEP_THRESHOLDS]
        row["sweep_v_info"] = [results[z][t]["v_info"] for t in SWEEP_THRESHOLDS]
        row["v_rand_best"] = results[z][best["v_rand"]]["v_rand"]
        row["v_info_best"] = results[z][best["v_info"]]["v_info"]
    return row


def _settings(zs, *, threshold, sweep, invert, kind, label_image, names):
    """The result's ``settings``: inputs, slices, thresholds and every convention."""
    from emtile import __version__

    return {
        "pred": str(names[0]), "labels": str(names[1]), "mode": "slices", "slices": list(zs),
        "threshold": threshold, "sweep": bool(sweep),
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
