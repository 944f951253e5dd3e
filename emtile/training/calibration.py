"""Calibration of the output: two numbers on the logits that put the thresholds where the
scores look for them.

The paper's border weights make thin membranes between cells count up to 11 times more than
other pixels, so a network trained with them says "membrane" more readily than the truth does:
its threshold of lowest pixel error lies well below 0.5 (0.18-0.22 on ISBI after 600 steps).
The ISBI V-Rand, which punishes every gap that merges two cells, wants the opposite: its best
threshold lies high (0.88-0.92, logit 2.0-2.5), so high that one logit offset moving the first to
0.5 moves the second beyond 0.9, the top of the challenge's grid (0.0, 0.1, ..., 1.0), where the
sweep cannot reach it (validation V-Rand 0.954 before such an offset, 0.843 after, in that run).

:func:`calibrate_model` therefore fits, on training slices, both thresholds and maps the logits
``z -> scale * z + offset`` so that the threshold of lowest pixel error becomes 0.5 and the
threshold of best V-Rand becomes :data:`VRAND_TARGET` (0.7, a point of the grid well inside it).
Both numbers are folded into the last layer (its weights and bias), so the model folder stays
an ordinary model and ``emtile predict`` needs nothing new. The map is monotone: it changes no
segmentation, only which threshold gives it. :func:`calibrate_best` then measures the validation
scores before and after and keeps the calibrated model unless it is worse there.
"""

import math
import shutil

import numpy as np
import torch

from emtile.training.run import replace_folder
from emtile.training.settings import jsonable
from emtile.training.validation import predict_slices

__all__ = ["threshold_offset", "vrand_logit", "calibration_map", "calibrate_model",
           "calibrate_best", "calibration_text", "VRAND_TARGET", "VRAND_TOLERANCE"]

#: Where calibration puts the training slices' best V-Rand threshold: on the challenge's grid.
VRAND_TARGET = 0.7
#: Logits searched for the best V-Rand (the challenge's thresholds 0.02-0.998, finer).
VRAND_LOGITS = np.arange(-4.0, 6.01, 0.5)
#: The calibrated model counts as worse when its validation V-Rand is lower by more than this
#: (the challenge's 11-point grid samples a broad maximum; smaller changes are its rounding).
VRAND_TOLERANCE = 0.01


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


def vrand_logit(prob, truth, *, logits=VRAND_LOGITS):
    """The logit threshold with the best mean V-Rand over the slices of ``prob`` (Z, Y, X)
    against ``truth``: ``(logit, v_rand)``; ties go to the lower threshold."""
    from emtile.metrics import isbi_scores

    scores = [np.mean([isbi_scores(p, t, threshold=float(1 / (1 + math.exp(-z))))["v_rand"]
                       for p, t in zip(prob, truth)]) for z in logits]
    best = int(np.argmax(scores))
    return float(logits[best]), float(scores[best])


def calibration_map(z_pixel, z_vrand, *, target=VRAND_TARGET, min_gap=0.25):
    """``(scale, offset)`` of the logit map that sends ``z_pixel`` to 0 (threshold 0.5) and
    ``z_vrand`` to ``logit(target)`` (or ``logit(1 - target)`` when it lies below ``z_pixel``).

    With the two closer than ``min_gap`` the scale stays 1 (an offset alone).

    Examples
    --------
    >>> scale, offset = calibration_map(-1.5, 2.5)
    >>> round(scale * -1.5 + offset, 6), round(1 / (1 + math.exp(-(scale * 2.5 + offset))), 6)
    (0.0, 0.7)
    """
    gap = z_vrand - z_pixel
    if abs(gap) < min_gap:
        return 1.0, -z_pixel
    goal = math.log(target / (1 - target)) * (1 if gap > 0 else -1)
    scale = goal / gap
    return scale, -scale * z_pixel


def calibrate_model(model, raw, labels, zs, *, device, max_pixels=2**24, normalize=None,
                    vrand_slices=6):
    """Fit the output map on slices ``zs``: 0.5 becomes the threshold of lowest pixel error, and
    :data:`VRAND_TARGET` the threshold of best V-Rand (see the module docstring).

    The pixel error is fitted on at most ``max_pixels`` pixels of those slices (slices spread
    evenly), the V-Rand on ``vrand_slices`` of them. ``normalize`` is the training volume's
    :class:`~emtile.normalize.Scaling` (None: the ``dtype`` rule). The map
    ``z -> scale * z + offset`` is folded into ``model.head``, the last layer.

    Returns
    -------
    dict
        ``scale`` and ``offset`` (of the logit map), ``threshold`` and ``vrand_threshold``
        (the two fitted thresholds before the map), ``vrand`` (the training slices' best
        V-Rand), ``pixel_error_before`` (at 0.5) / ``pixel_error_after`` on those slices, and
        ``slices``.
    """
    per_slice = int(np.prod(raw.shape[1:]))
    n = max(1, min(len(zs), max_pixels // per_slice))
    picks = sorted({zs[i] for i in np.linspace(0, len(zs) - 1, n).round().astype(int)})
    prob = predict_slices(model, raw, picks, device=device, normalize=normalize)
    truth = np.stack([np.asarray(labels[z]) != 0 for z in picks])
    _, t, before, after = threshold_offset(prob, truth)
    some = sorted({int(i) for i in np.linspace(0, len(picks) - 1, min(vrand_slices, len(picks)))
                   .round()})
    z_vrand, vrand = vrand_logit(prob[some], truth[some])
    scale, offset = calibration_map(math.log(t / (1 - t)), z_vrand)
    head = model.head
    with torch.no_grad():
        head.weight *= scale
        head.bias.mul_(scale).add_(offset)
    return {"scale": scale, "offset": offset, "threshold": t,
            "vrand_threshold": 1 / (1 + math.exp(-z_vrand)), "vrand": vrand,
            "pixel_error_before": before, "pixel_error_after": after, "slices": picks}


def calibrate_best(best, raw, labels, zs, device, validator, *, normalize=None, before=None,
                   keep=False):
    """Calibrate the model folder ``best`` once (see :func:`calibrate_model`); return the record.

    With a ``validator``, the validation scores before (``before``, the scores ``best`` was
    chosen with, or measured now) and after are recorded as ``val_before`` / ``val_after``,
    and the calibrated weights replace ``best``'s unless the validation V-Rand (best threshold)
    falls by more than :data:`VRAND_TOLERANCE`, or when ``keep``; ``kept`` says which,
    ``reason`` why. The record
    goes into the folder's metadata under ``calibration``; a folder that has one already (a
    resumed run that kept its best model) is left as it is.
    """
    from emtile.unet import load_folder, load_metadata, save_model

    meta = load_metadata(best)
    info = meta.setdefault("emtile", {})
    if "calibration" in info:
        return info["calibration"]
    model = load_folder(best, device=device)
    if validator is not None and not (before or {}).get("val_vrand"):
        before = validator(model)
    record = calibrate_model(model, raw, labels, zs, device=device, normalize=normalize)
    kept = True
    if validator is not None:
        before = {k: v for k, v in before.items() if k.startswith("val_")}
        after = validator(model)
        record.update(val_before=before, val_after=after)
        fell = after["val_vrand"] < before["val_vrand"] - VRAND_TOLERANCE
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
        model = load_folder(best, device=device)  # the weights as trained
    tmp = best.with_name(best.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, metadata=meta)
    replace_folder(tmp, best)
    return info["calibration"]


def calibration_text(cal):
    """One line for a calibration record: the thresholds moved and the pixel error (or, for a
    model that is not calibrated, e.g. an affinity model, why not)."""
    if "threshold" not in cal:
        return f"none ({cal.get('reason', 'not calibrated')})"
    moved = f"pixel-error threshold {cal['threshold']:.3f} -> 0.5"
    if cal.get("vrand_threshold") is not None:
        moved += f", V-Rand threshold {cal['vrand_threshold']:.3f} -> {VRAND_TARGET:g}"
    return (f"{moved} (logit map x{cal.get('scale', 1.0):.3f} {cal['offset']:+.3f}); "
            f"training-slice pixel error {cal['pixel_error_before']:.4f} -> "
            f"{cal['pixel_error_after']:.4f}")
