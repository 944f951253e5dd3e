"""Calibration of the output: one logit offset that makes 0.5 the best threshold.

The paper's border weights make thin membranes between cells count up to 11 times more than
other pixels, so a network trained with them says "membrane" more readily than the truth does
(its probabilities are biased, not badly ranked). :func:`calibrate_model` fits one logit offset
on training slices and adds it to the bias of the last layer, so the model folder stays an
ordinary model and ``emtile predict`` needs nothing new.

The offset moves every threshold: the one with the lowest pixel error becomes 0.5, and the one
with the best V-Rand moves too, possibly to the edge of the challenge's grid (0.0-1.0, step 0.1)
where the sweep can no longer reach its maximum. :func:`calibrate_best` therefore measures the
validation scores before and after, and keeps the calibrated model only if its validation V-Rand
(best threshold) is not lower, unless told to keep it anyway.
"""

import math
import shutil

import numpy as np
import torch

from emtile.training.run import replace_folder
from emtile.training.settings import jsonable
from emtile.training.validation import predict_slices

__all__ = ["threshold_offset", "calibrate_model", "calibrate_best"]


def threshold_offset(prob, truth, *, bins=1000, lo=0.02, hi=0.98):
    """The threshold on ``prob`` with the lowest pixel error against ``truth``, as a logit offset.

    Returns ``(offset, threshold, error_at_0.5, error_at_threshold)``: adding ``offset`` to the
    logits (``offset = -logit(threshold)``) moves that threshold to 0.5. Thresholds are searched
    on a grid of ``bins`` steps within ``[lo, hi]``; foreground is ``prob > threshold``.
    """
    prob = np.asarray(prob, np.float32).ravel()
    truth = np.asarray(truth).ravel() != 0
    edges = np.linspace(0.0, 1.0, bins + 1)
    h_fg = np.histogram(prob[truth], edges)[0]
    h_bg = np.histogram(prob[~truth], edges)[0]
    # threshold edges[k]: cells at or below it are missed, membrane above it is taken for cell
    missed = np.concatenate([[0], np.cumsum(h_fg)])
    false = h_bg.sum() - np.concatenate([[0], np.cumsum(h_bg)])
    errors = (missed + false) / prob.size
    k = np.arange(bins + 1)
    ok = (edges >= lo) & (edges <= hi)
    best = int(k[ok][np.argmin(errors[ok])])
    t = float(edges[best])
    offset = -math.log(t / (1.0 - t))
    return offset, t, float(np.mean((prob > 0.5) != truth)), float(errors[best])


def calibrate_model(model, raw, labels, zs, *, device, max_pixels=2**24, normalize=None):
    """Fit the output bias so that threshold 0.5 gives the lowest pixel error on slices ``zs``.

    One logit offset, fitted on at most ``max_pixels`` pixels of those slices (slices spread
    evenly), is added to the bias of ``model.head``, the last layer. ``normalize`` is the
    training volume's :class:`~emtile.normalize.Scaling` (None: the ``dtype`` rule).

    Returns
    -------
    dict
        ``offset`` (added to the logits), ``threshold`` (the fitted threshold before the shift),
        ``pixel_error_before`` / ``pixel_error_after`` on those slices, and ``slices``.
    """
    per_slice = int(np.prod(raw.shape[1:]))
    n = max(1, min(len(zs), max_pixels // per_slice))
    picks = sorted({zs[i] for i in np.linspace(0, len(zs) - 1, n).round().astype(int)})
    prob = predict_slices(model, raw, picks, device=device, normalize=normalize)
    truth = np.stack([np.asarray(labels[z]) != 0 for z in picks])
    offset, t, before, after = threshold_offset(prob, truth)
    head = model.head
    with torch.no_grad():
        head.bias += offset
    return {"offset": offset, "threshold": t, "pixel_error_before": before,
            "pixel_error_after": after, "slices": picks}


def calibrate_best(best, raw, labels, zs, device, validator, *, normalize=None, before=None,
                   keep=False):
    """Calibrate the model folder ``best`` once (see :func:`calibrate_model`); return the record.

    With a ``validator``, the validation scores before (``before``, the scores ``best`` was
    chosen with, or measured now) and after are recorded as ``val_before`` / ``val_after``,
    and the calibrated weights replace ``best``'s only when the validation V-Rand (best
    threshold) does not fall, or when ``keep``; ``kept`` says which, ``reason`` why. The record
    goes into the folder's metadata under ``calibration``; a folder that has one already (a
    resumed run that kept its best model) is left as it is.
    """
    from emtile.unet import load_metadata, load_model, save_model

    meta = load_metadata(best)
    info = meta.setdefault("emtile", {})
    if "calibration" in info:
        return info["calibration"]
    model = load_model(best, device=device)
    if validator is not None and not (before or {}).get("val_vrand"):
        before = validator(model)
    record = calibrate_model(model, raw, labels, zs, device=device, normalize=normalize)
    kept = True
    if validator is not None:
        before = {k: v for k, v in before.items() if k.startswith("val_")}
        after = validator(model)
        record.update(val_before=before, val_after=after)
        fell = after["val_vrand"] < before["val_vrand"]
        kept = keep or not fell
        record["reason"] = (
            f"validation V-Rand {before['val_vrand']:.4f} (best threshold "
            f"{before['val_vrand_threshold']:g}) before, {after['val_vrand']:.4f} (best threshold "
            f"{after['val_vrand_threshold']:g}) after"
            + ("" if not fell else "; kept as asked" if keep else
               "; the calibrated model was not kept"))
    record["kept"] = kept
    info["calibration"] = {k: jsonable(v) for k, v in record.items()}
    if not kept:
        model = load_model(best, device=device)  # the weights as trained
    tmp = best.with_name(best.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, metadata=meta)
    replace_folder(tmp, best)
    return info["calibration"]
