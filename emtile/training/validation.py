"""Validation during training, through the same tiled path as ``emtile predict``.

The scores are what users will get: the validation slices are predicted with
:func:`emtile.predictor.predict_array` and scored with :func:`emtile.evaluation.evaluate`. The best
checkpoint is the one with the highest V-Rand (the ISBI score, best over thresholds 0.0-1.0),
which punishes the thin membrane gaps that merge cells and that pixel accuracy hides.
"""

import numpy as np
import torch

from emtile.stacks import slice_runs

__all__ = ["predict_slices", "Validator", "format_scores"]


def predict_slices(model, raw, zs, *, tile="auto", batch_size=1, device="auto", normalize=None):
    """Probabilities of the sorted slices ``zs`` of ``raw``, shape (len(zs), Y, X), float32.

    Each contiguous run of slices is one :func:`emtile.predictor.predict_array` call, the tiled
    path of ``emtile predict``; ``normalize`` is the :class:`~emtile.normalize.Scaling`
    resolved on the whole of ``raw`` (None: the ``dtype`` rule).
    """
    from emtile.normalize import Scaling, statistics

    if not isinstance(normalize, Scaling):
        normalize = statistics(raw, normalize or "dtype")["scaling"]
    from emtile.predictor import predict_array

    full = (slice(None),) * (raw.ndim - 1)
    prob = np.concatenate([
        np.asarray(predict_array(model, raw, tile=tile, batch_size=batch_size, device=device,
                                 roi=(slice(z0, z1), *full), progress=False,
                                 normalize=normalize))
        for z0, z1 in slice_runs(zs)]).astype(np.float32)
    return prob.reshape((len(zs), *raw.shape[1:]))


class Validator:
    """Predicts the validation slices through the predictor and scores them.

    The loss (same function as training, with the full-slice weight maps, computed once) is
    evaluated on the logits of the stitched probabilities; pixel error and F1 of the cell
    interior at threshold 0.5 (interior where p > 0.5); V-Rand best over thresholds 0.0-1.0, as
    the ISBI challenge scores it, with its threshold, and V-Rand at 0.5.

    Parameters
    ----------
    raw, labels : array-like, shape (Z, Y, X)
    zs : list of int
        The validation slices.
    loss_fn : callable
        ``loss_fn(logits, target, weight)``, the training loss.
    weight_fn : callable or None
        ``weight_fn(label_slice)``: the loss's weight map, or None.
    tile, batch_size, device, normalize :
        Of :func:`predict_slices`.
    """

    def __init__(self, raw, labels, zs, *, loss_fn, weight_fn, tile, batch_size, device,
                 normalize=None):
        self.raw, self.zs, self.tile, self.normalize = raw, zs, tile, normalize
        self.batch_size, self.device, self.loss_fn = batch_size, device, loss_fn
        self.truth = np.stack([(np.asarray(labels[z]) != 0).astype(np.uint8) for z in zs])
        self.weights = (np.stack([weight_fn(t) for t in self.truth]) if weight_fn is not None
                        else None)

    def predict(self, model):
        return predict_slices(model, self.raw, self.zs, tile=self.tile,
                              batch_size=self.batch_size, device=self.device,
                              normalize=self.normalize)

    def loss(self, logits):
        """The training loss of the validation slices' logits (Z, Y, X)."""
        w = torch.from_numpy(self.weights) if self.weights is not None else None
        return self.loss_fn(logits, torch.from_numpy(self.truth).float(), w)

    def __call__(self, model):
        """``val_loss``, ``val_pixel_error``, ``val_f1``, ``val_vrand``,
        ``val_vrand_threshold`` and ``val_vrand_05`` of ``model``."""
        from emtile.evaluation import evaluate

        prob = self.predict(model)
        p = torch.from_numpy(np.clip(prob, 1e-6, 1 - 1e-6))
        with torch.no_grad():
            val_loss = float(self.loss(torch.log(p) - torch.log1p(-p)))
        r = evaluate(prob, self.truth, sweep=True, progress=False)
        return {"val_loss": val_loss, "val_pixel_error": float(r["pixel"]["pixel_error"]),
                "val_f1": float(r["pixel"]["f1"]),
                "val_vrand": float(r["sweep"]["best_v_rand"]["value"]),
                "val_vrand_threshold": float(r["sweep"]["best_v_rand"]["threshold"]),
                "val_vrand_05": float(r["mean"]["v_rand"])}


def format_scores(scores):
    """Validation scores in words, each V-Rand named by its threshold, e.g. ``pixel error 0.0812
    at 0.5, V-Rand 0.8630 at 0.5, V-Rand 0.9410 at 0.7 (best threshold)``."""
    scores = scores or {}
    parts = []
    if scores.get("val_loss") is not None:
        parts.append(f"loss {scores['val_loss']:.4f}")
    if scores.get("val_pixel_error") is not None:
        parts.append(f"pixel error {scores['val_pixel_error']:.4f} at 0.5")
    if scores.get("val_f1") is not None:
        parts.append(f"F1 {scores['val_f1']:.4f} at 0.5")
    t = scores.get("val_vrand_threshold")
    if scores.get("val_vrand_05") is not None and t != 0.5:
        parts.append(f"V-Rand {scores['val_vrand_05']:.4f} at 0.5")
    if scores.get("val_vrand") is not None:
        at = f" at {t:g} (best threshold)" if t is not None else " (best threshold)"
        parts.append(f"V-Rand {scores['val_vrand']:.4f}{at}")
    return ", ".join(parts)
