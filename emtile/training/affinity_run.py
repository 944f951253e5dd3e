"""The parts of a training run that differ for 3-D networks: affinities (``target="affinities"``)
and, with one output channel, boundaries (``ndim=3, target="boundaries"``).

:func:`emtile.trainer.train` calls these where a 2-D boundary run does its own: the checks of the
id labels and z ranges, the settings resolved from the voxel size (offsets, factors, tile), the
loss, the patch stream (:class:`emtile.sampling3d.AffinityPatchDataset` with
:class:`emtile.augment3d.Augmenter3D`), validation (:mod:`emtile.training.validation3d`:
VOI of the segmented validation range, lower is better) and what the model folders record
(``ndim``, ``target``, ``offsets``; no calibration).

A 3-D boundary run shares the z ranges, the factors from the voxel size, the loss (one channel:
the interior, with the mask of the training range), the augmentation and the model record; its
patches are :class:`emtile.sampling3d.BoundaryPatchDataset`'s and its validation is the 2-D
run's (:class:`emtile.training.validation.Validator`: V-Rand of the validation slices, higher is
better), predicted with the 3-D network.
"""

import dataclasses

from emtile._errors import EmtileError

__all__ = ["check_ids", "z_range", "resolve", "loss_function", "patch_dataset", "validator",
           "model_record", "resumed"]


def check_ids(labels, path):
    """Refuse labels that are not object ids, naming what they are and what to do."""
    import numpy as np

    from emtile.evaluation import store_kind

    kind, meta = store_kind(path)
    where = f"labels {str(path)!r}" if path is not None else "labels"
    if kind == "labels" and not meta.get("ids") and "segment" not in meta:
        raise EmtileError(f"{where} are binary, not object ids: target='affinities' needs ids; "
                          "convert them with --labels --ids")
    if kind not in (None, "labels"):
        raise EmtileError(f"{where} hold {kind}, not object ids: target='affinities' needs ids "
                          "converted with --labels --ids")
    if not np.issubdtype(labels.dtype, np.integer):
        raise EmtileError(f"{where} of dtype {labels.dtype} are not object ids: target="
                          "'affinities' needs integer ids (0 = unlabelled)")


def z_range(zs, name):
    """The sections ``zs`` (sorted) as one range ``(z0, z1)``; a gap is an error."""
    if not zs:
        return None
    if list(zs) != list(range(zs[0], zs[-1] + 1)):
        raise EmtileError(f"{name}={zs!r} must be one z range in 3-D (e.g. 0:150)")
    return (zs[0], zs[-1] + 1)


def resolve(s, voxel_size):
    """``s`` with ``offsets`` and ``factors`` from the voxel size where None (10 nm isotropic
    when the data records none)."""
    from emtile.affinities import default_offsets
    from emtile.training.settings import MODEL_DEFAULTS_3D
    from emtile.unet import default_factors

    size = voxel_size or (10.0, 10.0, 10.0)
    out = {}
    if s.offsets is None and s.target == "affinities":
        out["offsets"] = default_offsets(size)
    if s.factors is None:
        depth = MODEL_DEFAULTS_3D["depth"] if s.depth is None else s.depth
        out["factors"] = default_factors(size, depth)
    return dataclasses.replace(s, **out) if out else s


def loss_function(kind):
    """``loss_fn(logits, aff, mask)`` for :func:`emtile.training.loop.fit` (the batch's ``label``
    and ``weight`` are the affinities and their mask)."""
    from emtile.losses import affinity_loss

    def loss_fn(logits, target, mask):
        return affinity_loss(logits, target, mask, kind=kind)

    return loss_fn


def augmenter(s, voxel_size):
    from emtile.augment3d import Augmenter3D

    return Augmenter3D(voxel_size=tuple(voxel_size or (1.0, 1.0, 1.0)), flip=s.flip,
                       transpose=s.flip, elastic=s.elastic, elastic_sigma=s.elastic_sigma,
                       intensity=s.intensity)


def patch_dataset(data, s, in_shape, out_shape, *, start, scaling, augment):
    from emtile.sampling3d import AffinityPatchDataset, BoundaryPatchDataset

    common = dict(input_size=in_shape, output_size=out_shape,
                  z_range=z_range(data.tz, "train_slices"), batch_size=s.batch_size, seed=s.seed,
                  start=start, augment=augment, paths=data.paths, normalize=scaling)
    if s.target == "boundaries":
        return BoundaryPatchDataset(data.raw, data.labels, **common)
    return AffinityPatchDataset(data.raw, data.labels, offsets=s.offsets, **common)


def patch_shapes(data, s, net):
    """``(in_shape, out_shape)`` of the training patches, checked against the training range."""
    in_shape = tuple(int(v) for v in (s.tile if isinstance(s.tile, tuple) else (s.tile,) * 3))
    out_shape = tuple(net.output_size(in_shape))
    z0, z1 = z_range(data.tz, "train_slices")
    span = (z1 - z0, *data.raw.shape[1:])
    if any(o > n for o, n in zip(out_shape, span)):
        raise EmtileError(f"tile={s.tile!r} gives an output of {out_shape} (Z, Y, X), larger than "
                          f"the training region {span}: choose a smaller tile")
    return in_shape, out_shape


def validator(data, s, loss_fn, dev, scaling):
    from emtile.training.validation3d import AffinityValidator, BoundaryValidator3D

    if s.target == "boundaries":
        return BoundaryValidator3D(data.raw, data.labels, data.vz, loss_fn=loss_fn,
                                   tile=s.val_tile or "auto", device=dev, normalize=scaling)
    return AffinityValidator(data.raw, data.labels, z_range(data.vz, "val_slices"),
                             offsets=s.offsets, loss_fn=loss_fn, tile=s.val_tile or "auto",
                             device=dev, normalize=scaling)


def model_record(s):
    """What a 3-D model's ``metadata.json`` adds: the contract the predictor reads."""
    if s.target == "boundaries":
        return {"ndim": 3, "target": "boundaries",
                "calibration": {"applied": False,
                                "reason": "3-D boundary models are not calibrated"}}
    return {"ndim": 3, "target": "affinities", "offsets": [list(o) for o in s.offsets],
            "calibration": {"applied": False,
                            "reason": "affinity models are not calibrated"}}


def resumed(last, s):
    """``s`` for a resumed run: its target and offsets must be the run's (``last``'s metadata);
    offsets, factors and kernels left as None are the run's (the network's are checked against
    its config by :meth:`~emtile.training.settings.TrainSettings.with_model`)."""
    from emtile.unet import load_metadata

    meta = load_metadata(last).get("emtile", {})
    theirs = tuple(tuple(o) for o in meta.get("offsets") or [])
    if s.offsets is None and theirs:
        s = dataclasses.replace(s, offsets=theirs)
    recorded = meta.get("settings") or {}
    if s.factors is None and recorded.get("factors") and s.depth in (None, recorded.get("depth")):
        s = dataclasses.replace(s, factors=recorded["factors"], depth=recorded.get("depth"),
                                kernels=s.kernels or recorded.get("kernels"))
    if meta.get("target", "boundaries") != s.target:
        raise EmtileError(f"target={s.target!r} differs from the run being resumed (target="
                          f"{meta.get('target', 'boundaries')!r}); leave it out or start a new run")
    if s.offsets is not None and theirs != tuple(s.offsets):
        raise EmtileError(f"offsets={_text(s.offsets)!r} differ from the run being resumed "
                          f"(offsets={_text(theirs)!r}); leave them out or start a new run")
    return s


def _text(offsets):
    return ";".join(",".join(str(v) for v in o) for o in offsets)

