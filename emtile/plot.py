"""Figures (matplotlib, Agg backend, no display needed): prediction vs. truth, training curves.

:func:`comparison_figure` draws, for each chosen slice, one row of panels: raw / probability
(with a colour bar) / thresholded mask / truth / error overlay (false positives and false
negatives of the cell interior in two colours, with a legend), the overlay titled with the
slice's scores. Only the slices and the crop (``roi``) asked for are read.

:func:`training_curve` plots a training log CSV: loss columns on the left axis, the other
numeric columns (validation metrics such as ``val_f1``, ``val_pixel_error``, ``val_vrand``) on
the right one, against ``iteration``.

:func:`show` is the entry point behind ``emtile show``: it builds either figure and saves it
(PNG or PDF, from the file suffix).
"""

from pathlib import Path

import numpy as np

from emtile._errors import EmtileError

__all__ = ["show", "comparison_figure", "training_curve", "read_log", "FP_COLOR", "FN_COLOR"]

FP_COLOR = (1.0, 0.55, 0.0)  # orange: predicted interior, truth membrane
FN_COLOR = (0.0, 0.75, 1.0)  # sky blue: predicted membrane, truth interior
_X_COLUMNS = ("iteration", "step", "epoch")
_NOT_METRICS = {"iteration", "step", "epoch", "time", "elapsed", "elapsed_s", "wall", "wall_time",
                "lr", "learning_rate", "seconds"}
_SUFFIXES = (".png", ".pdf")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _figure(**kwargs):
    # a Figure not registered with pyplot: no global state, freed when dropped
    from matplotlib.figure import Figure

    _pyplot()
    return Figure(**kwargs)


def _open(x, name):
    from emtile.volume import open_stack

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


def _read_slice(stack, z, ys, xs):
    return stack.read(z, z + 1, (ys, xs))[0]


def _read_rows(rstack, pstack, lstack, zs, ys, xs, *, threshold, invert):
    """One dict per slice: ``z``, ``raw``; with a prediction ``prob`` and ``mask``; with labels
    ``truth``; with both the ``scores`` of the region. Returns ``(rows, decoder or None)``."""
    from emtile.metrics import PredictionDecoder, confusion_counts, isbi_scores, metrics_from_counts
    from emtile.volume import LabelChecker

    decoder = PredictionDecoder(pstack.dtype, invert=invert) if pstack is not None else None
    checker = LabelChecker()
    rows = []
    for z in zs:
        row = {"z": z, "raw": _read_slice(rstack, z, ys, xs)}
        if pstack is not None:
            p = _read_slice(pstack, z, ys, xs)
            scale = decoder.inspect(p, f"slice {z}")
            row["prob"] = _prob(p, decoder, scale)
            row["mask"] = decoder.binarize(p, threshold, scale)
        if lstack is not None:
            row["truth"] = checker.foreground(_read_slice(lstack, z, ys, xs), f"slice {z}")
        if pstack is not None and lstack is not None:
            scores = isbi_scores(row["mask"], row["truth"])
            pix = metrics_from_counts(*confusion_counts(row["mask"], row["truth"]))
            row["scores"] = (scores["v_rand"], scores["v_info"], pix["pixel_error"], pix["f1"])
        rows.append(row)
    return rows, decoder


def _prob(pslice, decoder, scale):
    """Probabilities in [0, 1] for display (after ``invert``), or None for masks."""
    if decoder.is_mask(scale):
        return None
    p = pslice.astype(np.float64) / (255.0 if decoder.kind == "int" else 1.0)
    return 1.0 - p if decoder.invert else p


def comparison_figure(raw, *, pred=None, labels=None, slices=None, roi=None, threshold=0.5,
                      invert=False, title=None):
    """Panels raw / probability / mask / truth / error overlay, one row per slice.

    Parameters
    ----------
    raw : str, Path or array-like, shape (Z, Y, X) or (Y, X)
        The EM image.
    pred : str, Path or array-like, optional
        Cell-interior probabilities (float [0, 1] or uint8 0-255) or a mask; same shape.
    labels : str, Path or array-like, optional
        Binary truth ({0, 1} or {0, 255}); same shape.
    slices : int, list of int or slice
        Slices to draw (one row each); default slice 0.
    roi : tuple of slices, optional
        ``(y, x)`` or ``(z, y, x)`` crop; only that region is read. A z range picks the slices
        when ``slices`` is None. With a crop, the scores are those of the region shown.
    threshold : float
        Interior where probability > threshold.
    invert : bool
        The prediction is a membrane probability: use 1 - p.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per panel (plus one colour bar axes when a probability is shown); each panel
        axes has ``emtile_panel`` set to its kind (``raw``, ``probability``, ``mask``,
        ``truth``, ``errors``).
    """
    from emtile.metrics import check_threshold
    from emtile.volume import resolve_slices

    check_threshold(threshold)
    rstack = _open(raw, "raw")
    pstack, lstack = _open(pred, "pred"), _open(labels, "labels")
    for other in (pstack, lstack):
        if other is not None and other.shape != rstack.shape:
            raise EmtileError(f"{other.display} has shape {other.shape} but raw {rstack.display} "
                              f"has shape {rstack.shape}; they must match")
    zpart, ys, xs = _crop(roi, rstack.shape)
    if slices is None:
        slices = zpart if zpart is not None else [0]
    elif zpart is not None:
        raise EmtileError("give the slices either with slices= or as the z range of roi, not both")
    zs = resolve_slices(slices, rstack.shape[0])
    rows, decoder = _read_rows(rstack, pstack, lstack, zs, ys, xs, threshold=threshold,
                               invert=invert)

    kinds = ["raw"]
    if pstack is not None:
        if any(r["prob"] is not None for r in rows):
            kinds.append("probability")
        kinds.append("mask")
    if lstack is not None:
        kinds.append("truth")
    if pstack is not None and lstack is not None:
        kinds.append("errors")

    h, w = rows[0]["raw"].shape
    panel = 3.2
    aspect = h / w
    fig = _figure(figsize=(panel * len(kinds) + (0.6 if "probability" in kinds else 0),
                           panel * aspect * len(rows) + 0.9), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), len(kinds), squeeze=False))
    crop_note = f" [y {ys.start}:{ys.stop}, x {xs.start}:{xs.stop}]" if roi is not None else ""
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
            else:
                ax.imshow(_overlay(raw_img, lo, hi, row["mask"], row["truth"]))
                vr, vi, pe, f1 = row["scores"]
                ax.set_title(f"V-Rand {vr:.4f}  V-Info {vi:.4f}\npixel error {pe:.4f}  F1 {f1:.4f}",
                             fontsize=9)
    if "errors" in kinds:
        from matplotlib.patches import Patch

        axes[0, -1].legend(handles=[Patch(color=FP_COLOR, label="false positive"),
                                    Patch(color=FN_COLOR, label="false negative")],
                           loc="lower right", fontsize=7, framealpha=0.8)
    if image is not None:
        fig.colorbar(image, ax=axes[:, kinds.index("probability")].tolist(), shrink=0.8,
                     label="probability")
    if title:
        fig.suptitle(title)
    return fig


def _overlay(raw_img, lo, hi, mask, truth):
    base = np.clip((raw_img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = np.repeat(base[..., None], 3, axis=2) * 0.6
    rgb[mask & ~truth] = FP_COLOR
    rgb[~mask & truth] = FN_COLOR
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


def training_curve(log, *, title=None):
    """Training curve from a CSV log: losses (left axis) and validation metrics (right axis).

    Parameters
    ----------
    log : str or Path
        CSV with a header; x is ``iteration`` (or ``step``/``epoch``, else the row number).
        Columns with ``loss`` in the name go on the left axis (log scale when all positive),
        other numeric columns (e.g. ``val_f1``, ``val_pixel_error``, ``val_vrand``) on the
        right; ``lr``, ``time`` and similar bookkeeping columns are left out. Empty cells (rows
        without validation) are skipped per column.

    Returns
    -------
    matplotlib.figure.Figure
        Its first axes holds the losses; ``fig.axes[1]`` (a twin) the metrics, if any.
    """
    columns = read_log(log)
    xname = next((c for c in _X_COLUMNS if c in columns), None)
    n = len(next(iter(columns.values())))
    x = columns[xname] if xname else np.arange(n, dtype=float)
    losses = [c for c in columns if "loss" in c.lower()]
    metrics = [c for c in columns if c not in losses and c.lower() not in _NOT_METRICS]
    if not losses and not metrics:
        raise EmtileError(f"training log {str(log)!r} has no loss or metric columns "
                          f"(columns: {', '.join(columns)})")
    fig = _figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    handles = []
    colors = iter(["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"] * 4)
    for name in losses:
        y = columns[name]
        ok = ~np.isnan(y)
        style = "-" if ok.sum() > 0.5 * n else "o-"
        handles += ax.plot(x[ok], y[ok], style, color=next(colors), label=name, markersize=3)
    if losses:
        ally = np.concatenate([columns[c][~np.isnan(columns[c])] for c in losses])
        if ally.size and (ally > 0).all() and ally.max() / ally.min() > 20:
            ax.set_yscale("log")
        ax.set_ylabel("loss")
    ax.set_xlabel(xname or "row")
    if metrics:
        ax2 = ax.twinx() if losses else ax
        for name in metrics:
            y = columns[name]
            ok = ~np.isnan(y)
            handles += ax2.plot(x[ok], y[ok], "s--", color=next(colors), label=name, markersize=3)
        ax2.set_ylabel("validation metric")
    ax.legend(handles=handles, loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"training log {Path(log).name}")
    return fig


def _check_output(output):
    output = Path(output)
    if output.suffix.lower() not in _SUFFIXES:
        raise EmtileError(f"output {str(output)!r} must end in .png or .pdf")
    if not output.parent.exists():
        raise EmtileError(f"output folder {str(output.parent)!r} does not exist")
    return output


def show(raw=None, *, pred=None, labels=None, slices=None, roi=None, threshold=0.5, invert=False,
         log=None, output=None, dpi=150, title=None):
    """Draw a comparison figure (``raw`` given) or a training curve (``log`` given); save it.

    Parameters
    ----------
    raw, pred, labels, slices, roi, threshold, invert, title
        See :func:`comparison_figure`. ``slices`` defaults to slice 0.
    log : str or Path, optional
        A training log CSV: draw :func:`training_curve` instead (``raw`` must then be None).
    output : str or Path, optional
        ``.png`` or ``.pdf`` file to write.
    dpi : int
        Resolution of PNG output.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from emtile import store

    store.check_output(None, inputs=[raw, pred, labels, log], files={"-o": output})
    if output is not None:
        output = _check_output(output)
    if log is not None:
        if raw is not None:
            raise EmtileError("give either RAW (a comparison figure) or --log (a training curve), not both")
        fig = training_curve(log, title=title)
    elif raw is None:
        raise EmtileError("nothing to show: give RAW (with --pred/--labels) or --log TRAIN.csv")
    else:
        fig = comparison_figure(raw, pred=pred, labels=labels, slices=slices, roi=roi,
                                threshold=threshold, invert=invert, title=title)
    if output is not None:
        fig.savefig(output, dpi=dpi)
    return fig
