"""Figures (matplotlib, Agg backend, no display needed): prediction vs. truth, training curves.

:func:`comparison_figure` draws, for each chosen slice, one row of panels: raw / probability
(with a colour bar) / thresholded mask / truth / error overlay in EM terms (missing membrane,
which merges cells; extra membrane, which splits them; merging segments outlined), the overlay
titled with the slice's scores at the threshold used and at the best one. Only the slices and
the crop (``roi``) asked for are read. With a label image (``seg``, ``emtile segment``'s
output) a last panel draws its instances in distinct colours over the raw slice
(:func:`segmentation_rgba`), titled with its scores when the truth is given.

:func:`training_curve` plots a training run (its folder, or its ``train.csv``): the losses
above, the validation scores as lines on a [0, 1] axis below, each V-Rand named by its
threshold, with the batch-norm freeze and the calibration marked when the run folder records
them.

:func:`show` is the entry point behind ``emtile show``: it builds either figure, or the three
orthogonal planes of a 3-D volume (:mod:`emtile.planes`), and saves it (PNG or PDF, from the file
suffix). The instance colours are :mod:`emtile.colours`'.
"""

from pathlib import Path

import numpy as np

from emtile._errors import EmtileError
from emtile.colours import SEG_ALPHA, segmentation_rgba

__all__ = ["show", "comparison_figure", "training_curve", "read_log", "merge_outlines",
           "segmentation_rgba", "FP_COLOR", "FN_COLOR", "MERGE_COLOR", "SEG_ALPHA"]

FP_COLOR = (1.0, 0.55, 0.0)  # orange: missing membrane (predicted interior, truth membrane)
FN_COLOR = (0.0, 0.75, 1.0)  # sky blue: extra membrane (predicted membrane, truth interior)
MERGE_COLOR = (1.0, 0.0, 1.0)  # magenta: outline of a predicted segment that merges cells
_X_COLUMNS = ("iteration", "step", "epoch")
_NOT_METRICS = {"iteration", "step", "epoch", "time", "elapsed", "elapsed_s", "wall", "wall_time",
                "lr", "learning_rate", "seconds"}
_SUFFIXES = (".png", ".pdf")


def _figure(**kwargs):
    # a Figure not registered with pyplot: no backend chosen, no global state (a notebook's inline
    # backend stays as it was), freed when dropped; savefig renders it with Agg
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _open(x, name):
    from emtile.stacks import open_stack

    return None if x is None else open_stack(x, name=name)


def _crop(roi, shape):
    """``roi`` -> (z slice or None, y slice, x slice), bounds checked against (Z, Y, X)."""
    from emtile.geometry import normalize_roi

    if roi is None:
        return None, slice(0, shape[1]), slice(0, shape[2])
    roi = tuple(roi)
    if len(roi) not in (2, 3):
        raise EmtileError(f"roi={roi!r} must have 2 (y, x) or 3 (z, y, x) ranges")
    (y0, y1), (x0, x1) = normalize_roi(roi[-2:], shape[1:])
    return (roi[0] if len(roi) == 3 else None), slice(y0, y1), slice(x0, x1)


def _shift(roi, slices, offset, shape):
    """``roi`` and ``slices`` given in the whole volume's numbering -> the numbering of the
    region at ``offset`` (a prediction of a region) of ``shape`` (Z, Y, X)."""
    if not any(offset):
        return roi, slices
    from emtile.stacks import resolve_slices

    box = ", ".join(f"{ax} {a}:{a + n}" for ax, a, n in zip("zyx", offset, shape))
    if roi is not None:
        roi, moved = tuple(roi), []
        for s, o, n in zip(roi, offset[-len(roi):], shape[-len(roi):]):
            lo, hi = (o if s.start is None else s.start), (o + n if s.stop is None else s.stop)
            if lo < o or hi > o + n:
                text = ",".join(f"{'' if r.start is None else r.start}:"
                                f"{'' if r.stop is None else r.stop}" for r in roi)
                raise EmtileError(f"roi={text} is outside the prediction, which covers {box}")
            moved.append(slice(lo - o, hi - o))
        roi = tuple(moved)
    if slices is not None:
        zs = resolve_slices(slices, offset[0] + shape[0])
        outside = [z for z in zs if z < offset[0]]
        if outside:
            raise EmtileError(f"slices={','.join(map(str, outside))} are outside the prediction, "
                              f"which covers {box}")
        slices = [z - offset[0] for z in zs]
    return roi, slices


def _read_slice(stack, z, ys, xs):
    return stack.read(z, z + 1, (ys, xs))[0]


def _read_rows(rstack, pstack, lstack, zs, ys, xs, *, threshold, invert, z0=0, sstack=None):
    """One dict per slice: ``z`` (in the whole volume's numbering: ``z0`` added), ``raw``; with a
    prediction ``prob`` and ``mask``; with labels ``truth``; with both the ``scores`` of the
    region at ``threshold`` and at the best threshold of the challenge's grid, and the
    ``merges``; with a label image ``seg`` (and with labels its ``seg_scores``). Returns
    ``(rows, decoder or None)``."""
    from emtile.metrics import PredictionDecoder, label_scores
    from emtile.stacks import LabelChecker

    decoder = PredictionDecoder(pstack.dtype, invert=invert) if pstack is not None else None
    checker = LabelChecker()
    rows = []
    for z in zs:
        row = {"z": z + z0, "raw": _read_slice(rstack, z, ys, xs)}
        if pstack is not None:
            p = _read_slice(pstack, z, ys, xs)
            scale = decoder.inspect(p, f"slice {z + z0}")
            row["prob"] = _prob(p, decoder, scale)
            row["mask"] = decoder.binarize(p, threshold, scale)
            row["values"] = (p, scale)
        if lstack is not None:
            row["truth"] = checker.foreground(_read_slice(lstack, z, ys, xs), f"slice {z + z0}")
        if pstack is not None and lstack is not None:
            row["scores"] = _scores(row, decoder, threshold)
            row["merges"], row["merge_outline"] = merge_outlines(row["mask"], row["truth"])
        if sstack is not None:
            row["seg"] = _read_slice(sstack, z, ys, xs)
            if lstack is not None:
                row["seg_scores"] = label_scores(row["seg"], row["truth"])
        rows.append(row)
    return rows, decoder


def _scores(row, decoder, threshold):
    """The slice's scores at ``threshold`` and, for probabilities, the best V-Rand over the
    challenge's thresholds: ``{"threshold", "v_rand", "v_info", "pixel_error", "f1", "best"}``
    (``best`` = ``(V-Rand, its threshold)`` or None for a mask)."""
    from emtile.metrics import SWEEP_THRESHOLDS, confusion_counts, isbi_scores, metrics_from_counts

    s = isbi_scores(row["mask"], row["truth"])
    pix = metrics_from_counts(*confusion_counts(row["mask"], row["truth"]))
    out = {"threshold": threshold, "v_rand": s["v_rand"], "v_info": s["v_info"],
           "pixel_error": pix["pixel_error"], "f1": pix["f1"], "best": None}
    p, scale = row["values"]
    if not decoder.is_mask(scale):
        sweep = [(isbi_scores(decoder.binarize(p, t, scale), row["truth"])["v_rand"], t)
                 for t in SWEEP_THRESHOLDS]
        out["best"] = max(sweep, key=lambda vt: (vt[0], -vt[1]))  # ties: the lowest threshold
    return out


def merge_outlines(mask, truth, *, share=0.5):
    """Predicted segments that merge cells, and their outlines.

    The predicted interior ``mask`` is segmented as the ISBI scores do
    (:func:`emtile.metrics.thin_boundaries`) and the truth's cells labelled; a predicted segment
    *merges* when it holds more than ``share`` of each of two or more true cells.

    Parameters
    ----------
    mask, truth : ndarray of bool, shape (Y, X)
        Predicted and true cell interior.

    Returns
    -------
    (int, ndarray of bool)
        The number of merging segments, and their one-pixel outlines.

    Examples
    --------
    >>> truth = np.ones((5, 9), bool); truth[:, 4] = False      # two cells, one membrane
    >>> n, outline = merge_outlines(np.ones((5, 9), bool), truth)  # the membrane is missing
    >>> n, bool(outline[0, 0]), bool(outline[2, 2])
    (1, True, False)
    """
    from skimage.segmentation import find_boundaries

    from emtile.metrics import thin_boundaries, truth_segments

    pred = thin_boundaries(mask)
    cells = truth_segments(truth)
    inside = cells > 0
    t, s = cells[inside].astype(np.int64), pred[inside].astype(np.int64)
    size = np.bincount(t)
    width = int(s.max()) + 1 if s.size else 1
    pairs, counts = np.unique(t * width + s, return_counts=True)
    ti, sj = pairs // width, pairs % width
    holds = (sj > 0) & (counts > share * size[ti])  # segment sj holds most of cell ti
    merging = np.unique(sj[holds], return_counts=True)
    merged = merging[0][merging[1] >= 2]
    if not merged.size:
        return 0, np.zeros(mask.shape, bool)
    framed = np.pad(np.where(np.isin(pred, merged), pred, 0), 1)  # the image edge outlines too
    return int(merged.size), find_boundaries(framed, mode="inner")[1:-1, 1:-1]


def _prob(pslice, decoder, scale):
    """Probabilities in [0, 1] for display (after ``invert``), or None for masks."""
    if decoder.is_mask(scale):
        return None
    p = pslice.astype(np.float64) / (255.0 if decoder.kind == "int" else 1.0)
    return 1.0 - p if decoder.invert else p


def _stacks(raw, pred, labels, slices, roi, seg=None):
    """The stacks on one grid (cut to a prediction, or a segmentation, of a region), and
    ``slices``, ``roi`` in that grid: ``(rstack, pstack, lstack, sstack, slices, roi, offset)``."""
    from emtile.evaluation import check_kinds, is_label_image, open_pair

    if pred is not None and labels is not None:
        check_kinds(pred, labels, command="show")
    sstack = None if seg is None else _open_seg(seg)
    if pred is not None:
        pstack, rstack, offset = open_pair(pred, raw, other_name="raw", command="show")
        if is_label_image(pred, pstack.dtype):
            raise EmtileError(f"pred {pstack.display!r} is a label image (segment ids, "
                              f"{pstack.dtype}), not a probability map or mask: draw it with "
                              f"seg=")
        lstack = None if labels is None else open_pair(pred, labels, command="show")[1]
        if sstack is not None and sstack.shape != pstack.shape:
            if not any(offset):  # else a full-size seg is cut to the prediction's region
                raise EmtileError(f"seg {sstack.display!r} has shape {sstack.shape} but pred "
                                  f"{pstack.display!r} has shape {pstack.shape}; they must match")
            sstack = open_pair(pred, seg, other_name="seg", command="show")[1]
    elif sstack is not None:  # the segmentation places the figure, as a prediction would
        _check_seg_shape(seg, sstack, raw)
        sstack, rstack, offset = open_pair(seg, raw, other_name="raw", command="show")
        pstack = None
        lstack = None if labels is None else open_pair(seg, labels, command="show")[1]
    else:
        rstack, pstack, lstack, offset = _open(raw, "raw"), None, _open(labels, "labels"), (0, 0, 0)
    if lstack is not None and lstack.shape != rstack.shape:
        raise EmtileError(f"{lstack.display} has shape {lstack.shape} but raw {rstack.display} "
                          f"has shape {rstack.shape}; they must match")
    roi, slices = _shift(roi, slices, offset, rstack.shape)
    return rstack, pstack, lstack, sstack, slices, roi, offset


def _open_seg(seg):
    """The label image to draw, checked: integer ids, not another kind of emtile store."""
    from emtile.evaluation import store_kind

    kind, meta = store_kind(seg)
    if kind in ("image", "probabilities") or meta.get("threshold") is not None:
        what = {"image": "an image volume", "probabilities": "a prediction"}.get(kind,
                                                                              "a predicted mask")
        raise EmtileError(f"seg {str(seg)!r} is {what} (its store says so), not a label image: "
                          f"seg= takes the output of emtile segment")
    sstack = _open(seg, "seg")
    if not (np.issubdtype(sstack.dtype, np.integer) or sstack.dtype == np.bool_):
        raise EmtileError(f"seg {sstack.display!r} has dtype {sstack.dtype}: expected a label "
                          f"image (integer ids, such as emtile segment writes)")
    return sstack


def _check_seg_shape(seg, sstack, raw):
    """A label image of another shape than ``raw`` must record where it lies (a segmentation of
    a region); say so in one line otherwise."""
    import os

    from emtile.store import offset_voxels

    rstack = _open(raw, "raw")
    located = isinstance(seg, (str, os.PathLike)) and offset_voxels(seg) is not None
    if sstack.shape != rstack.shape and not located:
        raise EmtileError(f"seg {sstack.display!r} has shape {sstack.shape} but raw "
                          f"{rstack.display!r} has shape {rstack.shape}; they must match")


def comparison_figure(raw, *, pred=None, labels=None, seg=None, slices=None, roi=None,
                      threshold=0.5, invert=False, title=None):
    """Panels raw / probability / mask / truth / error overlay / segmentation, one row per slice.

    Parameters
    ----------
    raw : str, Path or array-like, shape (Z, Y, X) or (Y, X)
        The EM image.
    pred : str, Path or array-like, optional
        Cell-interior probabilities (float [0, 1] or uint8 0-255) or a mask; same shape, or a
        prediction of a region (``emtile predict --roi``), drawn over the same region of
        ``raw`` and ``labels`` (its offset is in its metadata).
    labels : str, Path or array-like, optional
        Binary truth ({0, 1} or {0, 255}); the shape of ``raw``.
    seg : str, Path or array-like, optional
        A label image (``emtile segment``'s output; integer ids, 0 = none): its instances are
        drawn in distinct colours over the raw slice (:func:`segmentation_rgba`), titled with
        its scores against ``labels`` when given (:func:`emtile.metrics.label_scores`). The
        shape of ``raw`` (or of ``pred``), or a segmentation of a region that records where it
        lies.
    slices : int, list of int or slice
        Slices to draw (one row each), in ``raw``'s numbering; default the first (of the
        prediction's region).
    roi : tuple of slices, optional
        ``(y, x)`` or ``(z, y, x)`` crop in ``raw``'s numbering; only that region is read. A z
        range picks the slices when ``slices`` is None. With a crop, the scores are those of the
        region shown.
    threshold : float
        Interior where probability > threshold (the rule of every emtile command).
    invert : bool
        The prediction is a membrane probability: use 1 - p.
    title : str, optional
        Figure title.

    The error overlay names errors as EM reads them: orange is *missing membrane* (predicted
    interior on a true membrane, what merges cells), cyan *extra membrane* (predicted membrane
    inside a cell, what splits it); predicted segments that merge cells are outlined in magenta
    (:func:`merge_outlines`). Its title gives V-Rand at ``threshold`` and at the best threshold
    of the challenge's grid for this slice, V-Info, pixel error and F1 at ``threshold``.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per panel (plus one colour bar axes when a probability is shown); each panel
        axes has ``emtile_panel`` set to its kind (``raw``, ``probability``, ``mask``,
        ``truth``, ``errors``, ``segmentation``); a segmentation panel's RGBA overlay is its
        second image (``ax.get_images()[1]``).
    """
    from emtile.metrics import check_threshold
    from emtile.stacks import resolve_slices

    check_threshold(threshold)
    rstack, pstack, lstack, sstack, slices, roi, offset = _stacks(raw, pred, labels, slices, roi,
                                                                  seg)
    zpart, ys, xs = _crop(roi, rstack.shape)
    if slices is None:
        slices = zpart if zpart is not None else [0]
    elif zpart is not None:
        raise EmtileError("give the slices either with slices= or as the z range of roi, not both")
    zs = resolve_slices(slices, rstack.shape[0])
    rows, decoder = _read_rows(rstack, pstack, lstack, zs, ys, xs, threshold=threshold,
                               invert=invert, z0=offset[0], sstack=sstack)
    kinds = ["raw"]
    if pstack is not None:
        if any(r["prob"] is not None for r in rows):
            kinds.append("probability")
        kinds.append("mask")
    if lstack is not None:
        kinds.append("truth")
    if pstack is not None and lstack is not None:
        kinds.append("errors")
    if sstack is not None:
        kinds.append("segmentation")
        colours = segmentation_rgba(np.stack([r["seg"] for r in rows]), alpha=SEG_ALPHA)
        for row, rgba in zip(rows, colours):
            row["seg_rgba"] = rgba
    crop = (ys.start + offset[1], ys.stop + offset[1], xs.start + offset[2], xs.stop + offset[2])
    crop_note = (f" [y {crop[0]}:{crop[1]}, x {crop[2]}:{crop[3]}]"
                 if roi is not None or any(offset) else "")
    return _draw(rows, kinds, decoder, threshold, invert, crop_note, title)


def _draw(rows, kinds, decoder, threshold, invert, crop_note, title):
    """The figure of :func:`comparison_figure` (see there)."""
    h, w = rows[0]["raw"].shape
    panel = 3.2
    fig = _figure(figsize=(panel * len(kinds) + (0.6 if "probability" in kinds else 0),
                           panel * h / w * len(rows) + 1.1), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), len(kinds), squeeze=False))
    image = None
    for r, row in enumerate(rows):
        raw_img = row["raw"].astype(np.float64)
        lo, hi = np.percentile(raw_img, (0.5, 99.5)) if raw_img.size else (0, 1)
        for c, kind in enumerate(kinds):
            ax = axes[r, c]
            ax.emtile_panel = kind
            ax.set_xticks([])
            ax.set_yticks([])
            if kind == "raw":
                ax.imshow(raw_img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
                ax.set_title(f"raw z={row['z']}{crop_note}", fontsize=9)
            elif kind == "probability":
                prob = row["prob"] if row["prob"] is not None else row["mask"].astype(float)
                image = ax.imshow(prob, cmap="viridis", vmin=0.0, vmax=1.0)
                ax.set_title("P(cell interior)" + (" (inverted)" if invert else ""), fontsize=9)
            elif kind == "mask":
                ax.imshow(row["mask"], cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"mask (p > {threshold:g})" if not decoder.is_mask(decoder.final_scale())
                             else "mask", fontsize=9)
            elif kind == "truth":
                ax.imshow(row["truth"], cmap="gray", vmin=0, vmax=1)
                ax.set_title("truth (white = cell)", fontsize=9)
            elif kind == "errors":
                ax.imshow(_overlay(raw_img, lo, hi, row["mask"], row["truth"],
                                   row["merge_outline"]))
                ax.set_title(_scores_title(row["scores"], row["merges"]), fontsize=8)
            else:
                ax.imshow(raw_img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
                ax.imshow(row["seg_rgba"], interpolation="nearest")
                ax.set_title(_seg_title(row), fontsize=8)
    if "errors" in kinds:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        axes[0, kinds.index("errors")].legend(handles=[
            Patch(color=FP_COLOR, label="missing membrane (merge)"),
            Patch(color=FN_COLOR, label="extra membrane (split)"),
            Line2D([], [], color=MERGE_COLOR, lw=1.5, label="merged cells (outline)")],
            loc="lower right", fontsize=6, framealpha=0.8)
    if image is not None:
        fig.colorbar(image, ax=axes[:, kinds.index("probability")].tolist(), shrink=0.8,
                     label="probability")
    if title:
        fig.suptitle(title)
    return fig


def _scores_title(s, merges):
    t = f"{s['threshold']:g}"
    first = f"V-Rand {s['v_rand']:.4f} at {t}"
    if s["best"] is not None:
        first += f", {s['best'][0]:.4f} at {s['best'][1]:g} (best)"
    return (f"{first}\nV-Info {s['v_info']:.4f}, pixel error {s['pixel_error']:.4f}, F1 "
            f"{s['f1']:.4f} at {t}\n{merges} merged segment{'s' if merges != 1 else ''} at {t}")


def _seg_title(row):
    seg = row["seg"]
    objects = int(np.count_nonzero(np.unique(seg)))
    text = f"segmentation: {objects} object{'s' if objects != 1 else ''}"
    s = row.get("seg_scores")
    if s is None:
        return text
    return (f"{text}\nV-Rand {s['v_rand']:.4f}, V-Info {s['v_info']:.4f}\n"
            f"VOI split {s['voi_split']:.3f}, merge {s['voi_merge']:.3f}, "
            f"ARE {s['adapted_rand_error']:.4f}")


def _overlay(raw_img, lo, hi, mask, truth, outline=None):
    base = np.clip((raw_img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = np.repeat(base[..., None], 3, axis=2) * 0.6
    rgb[mask & ~truth] = FP_COLOR
    rgb[~mask & truth] = FN_COLOR
    if outline is not None:
        rgb[outline] = MERGE_COLOR
    return rgb


def read_log(path):
    """A training log CSV as ``{column: float ndarray}``, read by :func:`numpy.genfromtxt` with
    the header's names; empty cells (and any other that is not a number) are NaN."""
    path = Path(path)
    if not path.is_file():
        raise EmtileError(f"training log {str(path)!r} does not exist")
    with path.open(newline="") as f:
        if not f.readline().strip():
            raise EmtileError(f"training log {str(path)!r} is empty: expected a CSV with a header")
    data = np.atleast_1d(np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64,
                                       deletechars="", replace_space=" ", autostrip=True,
                                       encoding="utf-8"))
    if data.size == 0:
        raise EmtileError(f"training log {str(path)!r} has no rows")
    return {name: np.array(data[name], dtype=np.float64) for name in data.dtype.names}


#: Known ``train.csv`` validation columns -> what the figure calls them (V-Rand by threshold).
_SCORE_NAMES = {"val_vrand": "V-Rand at its best threshold (number at each point)",
                "val_vrand_05": "V-Rand at 0.5", "val_pixel_error": "pixel error at 0.5",
                "val_f1": "F1 at 0.5"}


def _run_files(log):
    """``(train.csv, run.json dict or None, best/ calibration record or None)`` for a run folder
    or a CSV (a run's, when ``run.json`` lies beside it)."""
    import json

    path = Path(log)
    folder = path if path.is_dir() else path.parent
    csv_path = path / "train.csv" if path.is_dir() else path
    if path.is_dir() and not (path / "run.json").is_file():
        raise EmtileError(f"{str(path)!r} is a folder but not a training run (no run.json): "
                          f"give the run folder emtile train wrote, or its train.csv")
    run = cal = None
    try:
        if (folder / "run.json").is_file():
            run = json.loads((folder / "run.json").read_text())
        best = folder / "best" / "metadata.json"
        if run is not None and best.is_file():
            cal = json.loads(best.read_text()).get("emtile", {}).get("calibration")
    except (OSError, ValueError):
        run = cal = None  # the curve alone, without the run's marks
    return csv_path, run, cal


def _freeze_step(run):
    settings = (run or {}).get("settings") or {}
    f, n = settings.get("freeze_bn"), settings.get("iterations")
    if not settings.get("batch_norm") or f is None or n is None or f >= 1.0:
        return None
    return int(round(f * n))


def training_curve(log, *, title=None):
    """Training curve of a run: losses above, validation scores below, freeze and calibration marked.

    Parameters
    ----------
    log : str or Path
        A training run folder (``emtile train``'s ``--out``) or a CSV log with a header (x is
        ``iteration``, else ``step``/``epoch``, else the row number). Columns with ``loss`` in
        the name go in the upper panel (log scale when they span more than 20x); other numeric
        columns (validation scores) in the lower one as lines on a [0, 1] axis, emtile's named
        by their thresholds (``val_vrand`` at its best threshold, written at each point;
        ``val_vrand_05``, ``val_pixel_error``, ``val_f1`` at 0.5); bookkeeping (``lr``, times,
        thresholds) is left out. With the run's ``run.json``, a vertical line marks where batch
        norm was frozen (statistics recomputed, optimiser restarted: the loss jumps there); with
        ``best/metadata.json``'s calibration record, stars mark the validation scores after it.

    Returns
    -------
    matplotlib.figure.Figure
        ``fig.axes[0]`` the losses (``emtile_panel`` "loss"), ``fig.axes[1]`` the scores
        ("validation"), when there are any. Lines carry their column as ``get_gid()``; the
        marks have gid ``"freeze"`` and ``"calibration"``.
    """
    csv_path, run, cal = _run_files(log)
    columns = read_log(csv_path)
    xname = next((c for c in _X_COLUMNS if c in columns), None)
    n = len(next(iter(columns.values())))
    x = columns[xname] if xname else np.arange(n, dtype=float)
    losses = [c for c in columns if "loss" in c.lower()]
    scores = [c for c in columns if c not in losses and c.lower() not in _NOT_METRICS
              and not c.endswith("_threshold")]
    if not losses and not scores:
        raise EmtileError(f"training log {str(csv_path)!r} has no loss or metric columns "
                          f"(columns: {', '.join(columns)})")
    fig = _figure(figsize=(8, 6 if scores and losses else 4), layout="constrained")
    axes = fig.subplots(2 if scores and losses else 1, 1, sharex=True, squeeze=False)[:, 0]
    top = axes[0]
    if losses:
        top.emtile_panel = "loss"
        _plot_losses(top, x, columns, losses)
    if scores:
        ax = axes[-1]
        ax.emtile_panel = "validation"
        _plot_scores(ax, x, columns, scores, cal)
    for ax in axes:
        _mark_freeze(ax, _freeze_step(run))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    axes[-1].set_xlabel(xname or "row")
    name = Path(log).name if not Path(log).is_dir() else f"{Path(log).name}/train.csv"
    top.set_title(title or f"training run {name}")
    return fig


def _plot_losses(ax, x, columns, losses):
    for name in losses:
        y = columns[name]
        ok = ~np.isnan(y)
        sparse = ok.sum() <= 0.5 * len(y)
        label = "validation loss" if name == "val_loss" else "training loss" if name == "loss" else name
        ax.plot(x[ok], y[ok], "o-" if sparse else "-", markersize=3, lw=1.5 if sparse else 0.8,
                label=label, gid=name)
    ally = np.concatenate([columns[c][~np.isnan(columns[c])] for c in losses])
    if ally.size and (ally > 0).all() and ally.max() / ally.min() > 20:
        ax.set_yscale("log")
    ax.set_ylabel("loss (the training objective)")


def _plot_scores(ax, x, columns, scores, cal):
    for name in scores:
        y = columns[name]
        ok = ~np.isnan(y)
        line, = ax.plot(x[ok], y[ok], "o-", markersize=3, label=_SCORE_NAMES.get(name, name),
                        gid=name)
        t = columns.get(f"{name}_threshold")
        if t is not None:  # write each point's threshold beside it
            for xi, yi, ti in zip(x[ok], y[ok], t[ok]):
                if not np.isnan(ti):
                    ax.annotate(f"{ti:g}", (xi, yi), textcoords="offset points", xytext=(0, 4),
                                ha="center", fontsize=6, color=line.get_color())
    if cal and cal.get("val_after"):
        after = cal["val_after"]
        xs = x[-1] if len(x) else 0
        kept = "kept" if cal.get("kept", True) else "not kept"
        pts = [(after[k], k) for k in ("val_vrand", "val_pixel_error") if k in after]
        ax.plot([xs] * len(pts), [v for v, _ in pts], "*", markersize=10, color="k",
                label=f"after calibration ({kept}): V-Rand {after.get('val_vrand', float('nan')):.3f}"
                      f" at {after.get('val_vrand_threshold', float('nan')):g}, pixel error "
                      f"{after.get('val_pixel_error', float('nan')):.3f} at 0.5", gid="calibration")
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("validation score")


def _mark_freeze(ax, step):
    if step is None:
        return
    ax.axvline(step, color="0.4", ls=":", lw=1.2, gid="freeze",
               label=f"batch norm frozen at {step} (statistics recomputed, optimiser restarted)")


def show(raw=None, *, pred=None, labels=None, seg=None, slices=None, roi=None, threshold=0.5,
         invert=False, log=None, output=None, dpi=150, title=None, planes=False, at=None,
         channel=None):
    """Draw a comparison figure (``raw`` given), the three orthogonal planes of a 3-D volume
    (``planes``) or a training curve (``log`` given); save it.

    Parameters
    ----------
    raw, pred, labels, seg, slices, roi, threshold, invert, title
        See :func:`comparison_figure`. ``slices`` defaults to slice 0.
    planes : bool
        Draw the planes XY, XZ and YZ through ``at`` instead
        (:func:`emtile.planes.read_planes`, :func:`emtile.planes.planes_figure`): ``seg`` and
        ``labels`` are then id volumes (a segmentation and a ground truth, instances coloured
        over ``raw``), ``pred`` a probability map or an affinity prediction. Chosen by itself
        when ``at`` or ``channel`` is given or ``pred`` is an affinity prediction (a
        ``(C, Z, Y, X)`` array, or a store recording ``target: affinities``).
    at : str or tuple of int, optional
        ``(z, y, x)`` (or ``"Z,Y,X"``) where the planes cross; default the volume's centre.
    channel : int, optional
        The channel of an affinity ``pred`` to draw, instead of the mean of its
        nearest-neighbour channels.
    log : str or Path, optional
        A training run folder or its CSV log: draw :func:`training_curve` instead (``raw`` must
        then be None). A run folder given as ``raw`` (with no ``pred`` or ``labels``) is drawn
        the same way.
    output : str or Path, optional
        ``.png`` or ``.pdf`` file to write.
    dpi : int
        Resolution of PNG output.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from emtile import store
    from emtile.locations import local_only

    local_only(output, "output", "figures are written to local disk")
    store.check_output(None, inputs=[raw, pred, labels, seg, log], files={"output": output})
    if output is not None and Path(output).suffix.lower() not in _SUFFIXES:
        raise EmtileError(f"output={str(output)!r} must end in .png or .pdf")
    if raw is not None and log is None and pred is None and labels is None and seg is None:
        from emtile.describe import is_run_folder

        if is_run_folder(raw):
            raw, log = None, raw
    if log is not None:
        if raw is not None:
            raise EmtileError("give either raw= (a comparison figure) or log= (a training curve), "
                              "not both")
        fig = training_curve(log, title=title)
    elif raw is None:
        raise EmtileError("nothing to show: give raw= (with pred=, labels= or seg=) or log= (a "
                          "training run folder or its train.csv)")
    elif planes or at is not None or channel is not None or _is_affinities(pred):
        fig = _planes(raw, pred=pred, labels=labels, seg=seg, slices=slices, roi=roi, at=at,
                      channel=channel, title=title)
    else:
        fig = comparison_figure(raw, pred=pred, labels=labels, seg=seg, slices=slices, roi=roi,
                                threshold=threshold, invert=invert, title=title)
    if output is not None:
        fig.savefig(output, dpi=dpi)
    return fig


def _is_affinities(pred):
    """An affinity prediction: a store that says so, or a (C, Z, Y, X) array."""
    import os

    if pred is None:
        return False
    if isinstance(pred, (str, os.PathLike)):
        from emtile.planes import is_affinity_store

        return is_affinity_store(pred)
    return getattr(pred, "ndim", 0) == 4


def _planes(raw, *, pred, labels, seg, slices, roi, at, channel, title):
    from emtile.planes import planes_figure, read_planes

    for name, value in (("slices", slices), ("roi", roi)):
        if value is not None:
            raise EmtileError(f"{name}= picks slices to draw one by one; the planes view draws "
                              f"the planes through at= instead (give Z,Y,X)")
    views = read_planes(raw, seg=seg, labels=labels, pred=pred, at=at, channel=channel)
    return planes_figure(views, title=title)
