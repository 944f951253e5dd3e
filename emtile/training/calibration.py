"""Calibration of the output: one logit offset that makes 0.5 the best threshold.

The paper's border weights make thin membranes between cells count up to 11 times more than
other pixels, so a network trained with them says "membrane" more readily than the truth does
(its probabilities are biased, not badly ranked). :func:`calibrate_model` fits one logit offset
on training slices and adds it to the bias of the last layer, so the model folder stays an
ordinary model and ``emtile predict`` needs nothing new.
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


def calibrate_model(model, raw, labels, zs, *, device, max_pixels=2**24):
    """Fit the output bias so that threshold 0.5 gives the lowest pixel error on slices ``zs``.

    One logit offset, fitted on at most ``max_pixels`` pixels of those slices (slices spread
    evenly), is added to the bias of ``model.head``, the last layer.

    Returns
    -------
    dict
        ``offset`` (added to the logits), ``threshold`` (the fitted threshold before the shift),
        ``pixel_error_before`` / ``pixel_error_after`` on those slices, and ``slices``.
    """
    per_slice = int(np.prod(raw.shape[1:]))
    n = max(1, min(len(zs), max_pixels // per_slice))
    picks = sorted({zs[i] for i in np.linspace(0, len(zs) - 1, n).round().astype(int)})
    prob = predict_slices(model, raw, picks, device=device)
    truth = np.stack([np.asarray(labels[z]) != 0 for z in picks])
    offset, t, before, after = threshold_offset(prob, truth)
    head = model.head
    with torch.no_grad():
        head.bias += offset
    return {"offset": offset, "threshold": t, "pixel_error_before": before,
            "pixel_error_after": after, "slices": picks}


def calibrate_best(best, raw, labels, zs, device, validator):
    """Calibrate the model folder ``best`` once (see :func:`calibrate_model`); return the record.

    The record (with ``val_after``, the validation scores after calibration, when there is a
    ``validator``) goes into the folder's metadata under ``calibration``; a folder that has one
    already (a resumed run that kept its best model) is left as it is.
    """
    from emtile.unet import load_metadata, load_model, save_model

    meta = load_metadata(best)
    info = meta.setdefault("emtile", {})
    if "calibration" in info:
        return info["calibration"]
    model = load_model(best, device=device)
    record = calibrate_model(model, raw, labels, zs, device=device)
    if validator is not None:
        record["val_after"] = validator(model)
    info["calibration"] = {k: jsonable(v) for k, v in record.items()}
    tmp = best.with_name(best.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, metadata=meta)
    replace_folder(tmp, best)
    return info["calibration"]
