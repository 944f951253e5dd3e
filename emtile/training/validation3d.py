"""Validation of an affinity model: predict the validation z range, segment it, score VOI.

The validation sections ``z0:z1`` are predicted with :func:`emtile.predictor.predict_array`
(the tiled path of ``emtile predict``; raw context is read across the range's ends, as
prediction reads it), segmented by :func:`emtile.affinity_cc.segment_affinities` (nearest-
neighbour affinity > 0.5, connected components) and scored against the validation ids with
:func:`emtile.scores3d.volume_scores` (truth 0 left out). The best model is the one with the
lowest ``val_voi`` (split + merge). ``val_loss`` is the training loss on the logits of the
stitched probabilities, with the region's own targets (ids outside it unlabelled).

A 3-D boundary model (one channel) is validated as a 2-D one, by V-Rand of its validation slices
(:class:`BoundaryValidator3D`, the 2-D :class:`~emtile.training.validation.Validator` with the
3-D loss's shapes).
"""

import numpy as np
import torch

from emtile.training.validation import Validator

__all__ = ["AffinityValidator", "BoundaryValidator3D", "AFFINITY_COLUMNS",
           "format_affinity_scores"]

#: ``train.csv``'s columns for an affinity run.
AFFINITY_COLUMNS = ("iteration", "loss", "lr", "val_loss", "val_voi_split", "val_voi_merge",
                    "val_voi", "val_rand_error", "elapsed_s")


class AffinityValidator:
    """``validator(model)`` -> ``val_loss``, ``val_voi_split``, ``val_voi_merge``, ``val_voi``,
    ``val_rand_error`` of the validation sections ``z_range``.

    Parameters
    ----------
    raw, ids : array-like, shape (Z, Y, X)
    z_range : (int, int)
    offsets : tuple of (dz, dy, dx)
    loss_fn : callable
        ``loss_fn(logits, aff, mask)``, the training loss.
    tile, device, normalize :
        Of :func:`emtile.predictor.predict_array`.
    threshold : float
        Of :func:`emtile.affinity_cc.segment_affinities`.
    """

    def __init__(self, raw, ids, z_range, *, offsets, loss_fn, tile, device, normalize,
                 threshold=0.5):
        from emtile.affinities import affinities

        self.raw, self.z_range, self.offsets = raw, tuple(z_range), offsets
        self.loss_fn, self.tile, self.device = loss_fn, tile, device
        self.normalize, self.threshold = normalize, threshold
        self.truth = np.asarray(ids[z_range[0]:z_range[1]])
        self.aff, self.mask = affinities(self.truth, offsets)

    def predict(self, model):
        """Affinities of the validation sections, shape (K, Z, Y, X), float32."""
        from emtile.predictor import predict_array

        roi = (slice(*self.z_range), slice(None), slice(None))
        prob = predict_array(model, self.raw, tile=self.tile, device=self.device, roi=roi,
                             normalize=self.normalize)
        return np.asarray(prob, np.float32).reshape(self.aff.shape)

    def __call__(self, model):
        from emtile.affinity_cc import segment_affinities
        from emtile.scores3d import volume_scores

        prob = self.predict(model)
        p = torch.from_numpy(np.clip(prob, 1e-6, 1 - 1e-6))[None]
        logits = torch.log(p) - torch.log1p(-p)
        with torch.no_grad():
            val_loss = float(self.loss_fn(logits, torch.from_numpy(self.aff)[None],
                                          torch.from_numpy(self.mask)[None]))
        seg = segment_affinities(prob, self.offsets, self.threshold)
        s = volume_scores(self.truth, seg)
        split, merge = float(s["voi_split"]), float(s["voi_merge"])
        return {"val_loss": val_loss, "val_voi_split": split, "val_voi_merge": merge,
                "val_voi": split + merge, "val_rand_error": float(s["adapted_rand_error"])}


class BoundaryValidator3D(Validator):
    """:class:`~emtile.training.validation.Validator` for a 3-D network with one output channel:
    the same scores (V-Rand of the validation slices ``zs`` first), its loss the 3-D run's
    ``loss_fn(logits, target, mask)`` on (1, 1, Z, Y, X) with every voxel in."""

    def __init__(self, raw, labels, zs, *, loss_fn, tile, device, normalize=None):
        super().__init__(raw, labels, zs, loss_fn=loss_fn, weight_fn=None, tile=tile,
                         batch_size=1, device=device, normalize=normalize)

    def loss(self, logits):
        target = torch.from_numpy(self.truth).float()[None, None]
        return self.loss_fn(logits[None, None], target, torch.ones_like(target))


def format_affinity_scores(scores):
    """``VOI 1.234 (split 0.800, merge 0.434), adapted Rand error 0.120, loss 0.3000``."""
    if not scores or scores.get("val_voi") is None:
        return ""
    return (f"VOI {scores['val_voi']:.3f} (split {scores['val_voi_split']:.3f}, merge "
            f"{scores['val_voi_merge']:.3f}), adapted Rand error {scores['val_rand_error']:.3f}, "
            f"loss {scores['val_loss']:.4f}")
