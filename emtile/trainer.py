"""Streaming, resumable training of a valid-convolution U-Net on annotated slices.

:func:`train` is the entry point (``emtile train`` calls it). It takes the run's settings (one
:class:`~emtile.training.settings.TrainSettings`), checks the data, builds the model (or takes
one), the patch stream (:mod:`emtile.sampling`, augmented and weighted in the DataLoader workers)
and the optimiser, then runs the loop, :func:`emtile.training.loop.fit`, which knows only
``model(x)`` and the loss and reports through callbacks. The parts, one concern each:

=================================  ===============================================================
:mod:`emtile.training.settings`    ``TrainSettings``: what ``run.json`` records, what ``--resume``
                                   checks, what the CLI builds
:mod:`emtile.training.loop`        ``fit``, ``Callback`` (hooks before and after each step),
                                   ``lr_factor``
:mod:`emtile.training.logs`        ``train.csv``, TensorBoard, the progress bar
:mod:`emtile.training.batchnorm`   precise statistics (``update_bn``), ``FreezeNorm``
:mod:`emtile.training.validation`  ``predict_slices`` and ``Validator``: the predictor's tiled path
:mod:`emtile.training.calibration` the logit map (scale, offset) folded into ``best/``
:mod:`emtile.training.segment_tuning` ``emtile segment``'s threshold and merge threshold that
                                   score best on the validation slices, recorded in ``best/``
:mod:`emtile.training.run`         the run folder, ``training_state.pt``, ``Checkpoint``
:mod:`emtile.training.targets`     the target fields (``ndim``, ``target``, offsets, factors,
                                   tile) checked; id labels as 2-D boundaries (``IdBoundaries``)
:mod:`emtile.training.affinity_run` a 3-D run's parts (affinities; boundaries, one channel):
                                   id and z-range checks, offsets and factors from the voxel
                                   size, loss, patches
                                   (:mod:`emtile.sampling3d`, :mod:`emtile.augment3d`),
                                   validation (:mod:`emtile.training.validation3d`: VOI of
                                   :func:`emtile.affinity_cc.segment_affinities`, lower is
                                   better), the model folders' ``ndim``/``target``/``offsets``
=================================  ===============================================================

Two steps go beyond the paper's recipe. With batch norm, the last 30% of the run (``freeze_bn``)
trains with fixed statistics, recomputed first, so that the network is trained as tiled
prediction runs it (per-tile statistics would make the output depend on the tiling). At the end,
``best`` gets a logit scale and offset fitted on the training slices (``calibrate``), because the border
weights bias the probabilities towards membrane. With validation slices, a 2-D run then tries a
small grid of ``emtile segment`` settings on them and records the best in ``best/``
(``tune_segment``, :mod:`emtile.training.segment_tuning`).

Resuming reproduces an uninterrupted run: the patch stream is a pure function of the seed and
the batch index (see :mod:`emtile.sampling`), so no worker RNG state needs saving; the torch RNG
(dropout), the optimizer state and the iteration count are restored from ``last``. Validation
runs under :func:`torch.random.fork_rng`, so it does not perturb the training RNG.
"""

import dataclasses
import functools
import time
import warnings

import torch

from emtile._errors import EmtileError
from emtile.augment import Augmenter
from emtile.device import resolve_amp, resolve_device
from emtile.losses import balanced_class_weights, get_loss, uses_weights, weight_map
from emtile.normalize import record as normalization_record, statistics
from emtile.sampling import PatchDataset, check_patch_geometry
from emtile.training.batchnorm import FREEZE_BN_BATCHES, FreezeNorm, norm_layers, precise_norm_stats
from emtile.training.calibration import calibrate_best
from emtile.training.segment_tuning import tune_best
from emtile.training.logs import Clock, CSVLog, ProgressBar, TensorBoardLog
from emtile.training.loop import fit, lr_factor
from emtile.training.run import (Checkpoint, RunFolder, describe, load_training_state, versions,
                                 writes)
from emtile.training.settings import TrainSettings, jsonable
from emtile.training import affinity_run as aff
from emtile.training.logs import CSV_COLUMNS
from emtile.training.targets import IdBoundaries, default_tile_3d, is_id_volume
from emtile.training.validation import Validator
from emtile.training.validation3d import AFFINITY_COLUMNS
from emtile.stacks import check_labels, resolve_slices
from emtile.volume import open_input

__all__ = ["train", "format_result"]


def train(raw, labels, out, settings=None, *, resume=False, overwrite=False, progress=True,
          model=None, callbacks=(), **options):
    """Train a valid-convolution U-Net on annotated slices; write a model folder and logs.

    Parameters
    ----------
    raw, labels : str, Path or array-like, shape (Z, Y, X)
        Image volume and binary labels (1 = cell interior, 0 = membrane; 0/255 and bool work
        too). Paths open lazily with :func:`emtile.open_volume`; only patches are read.
    out : str or Path
        Output folder (see :mod:`emtile.training.run`). A folder holding another run is refused
        unless ``resume`` or ``overwrite``; a non-empty folder that is not a run is always refused.
    settings : TrainSettings, optional
        The run's settings (see :class:`~emtile.training.settings.TrainSettings` for each one).
    resume, overwrite : bool
        Continue the run in ``out`` from ``last`` (however it was stopped: a run stopped before
        its first checkpoint starts over, one stopped after its last is finished), or replace it.
    progress : bool
        tqdm progress bar.
    model : emtile.unet.UNet, optional
        A model to train (e.g. one loaded to fine-tune) instead of a new one built from the
        settings; the settings' model fields, when given, must match it.
    callbacks : sequence of :class:`~emtile.training.loop.Callback`
        Extra hooks (e.g. to collect the losses in a notebook).
    **options
        Settings as keyword arguments (``train_slices=slice(0, 25), iterations=4000``), on their
        own or overriding fields of ``settings``.

    Returns
    -------
    dict
        ``iteration``, ``loss``, ``scores`` (last validation), ``best`` (best scores),
        ``calibration`` (when calibrated), ``segment`` (the tuned segmentation settings, when
        tuned: :mod:`emtile.training.segment_tuning`; None when tuning failed), ``elapsed_s``, ``setup_s`` and the paths
        ``best_path`` / ``last_path``.
    """
    from emtile import store
    from emtile.locations import local_only

    local_only(out, "out", "a training run writes its model folders on local disk (copy them to "
                           "an object store afterwards; raw and labels may be URLs)")
    store.check_output(out, inputs=[raw, labels])  # before any work
    with store.output_lock(out):  # one live run per folder (a killed run's lock is stale)
        return _train(raw, labels, out, settings, resume=resume, overwrite=overwrite,
                      progress=progress, model=model, callbacks=callbacks, options=options)


def _train(raw, labels, out, settings, *, resume, overwrite, progress, model, callbacks, options):
    """:func:`train`, holding the output folder's lock."""
    t_start = time.perf_counter()
    s = (TrainSettings(**options) if settings is None else
         dataclasses.replace(settings, **options))
    data = _open_data(raw, labels, s)
    dev = resolve_device(s.device)
    amp = resolve_amp(s.amp, dev)
    folder = RunFolder(out)
    last = folder.check(resume=resume, overwrite=overwrite)
    s = _resolve(s, data, last)
    task = _Task(s)
    s, net = _model(s, last, model, data)
    in_shape, out_shape, class_weights, weight_fn = _check_patches(data, s, net)
    norm = statistics(data.raw, s.normalize, name="raw")  # the model's input rule, on raw
    scaling = norm["scaling"]

    if last is None:  # every check passed: only now touch the output folder
        folder.clear()
    else:
        last = folder.recover()  # a save killed between its renames
    net.to(dev)
    if _channels_last(s):
        net.to(memory_format=torch.channels_last)
    opt = _optimizer(net, s)
    state = load_training_state(last, net, opt) if last is not None else {}
    start, elapsed0 = state.get("iteration", 0), state.get("elapsed_s", 0.0)
    if start > s.iterations or (start == s.iterations and folder.finished()):
        raise EmtileError(f"the run in {str(folder.path)!r} already did {start} iterations; "
                          f"iterations={s.iterations} must be larger to resume")
    run_info = {"format": "emtile-train-run", "version": 1, "raw": describe(raw),
                "labels": describe(labels), "settings": s.to_json(), "train_slices": data.tz,
                "val_slices": data.vz, "input_size": list(in_shape),
                "output_size": list(out_shape), "class_weights": list(class_weights),
                "normalization": normalization_record(norm),
                "voxel_size": data.voxel_size, "amp": amp, "versions": versions(),
                **task.record}
    folder.write_run(run_info)

    augment = task.augmenter(s, data)
    loader = _patch_loader(data, s, in_shape, out_shape, augment, weight_fn, start, dev, scaling)
    validator = task.validator(data, s, weight_fn, dev, scaling) if data.vz else None
    t0 = [time.perf_counter()]
    clock = Clock(lambda: elapsed0 + time.perf_counter() - t0[0])
    checkpoint = Checkpoint(
        folder, metadata=functools.partial(_metadata, run_info, clock.elapsed,
                                           task.best_metric if validator is not None else "val_f1"),
        best_metric=task.best_metric, validated=validator is not None,
        eligible_after=s.freeze_step(), best_score=state.get("best_score"),
        best_scores=state.get("best_scores"), lower_is_better=task.lower_is_better)
    cbs = [*_freeze(s, data, in_shape, out_shape, augment, dev, scaling), checkpoint, clock,
           *_logs(folder, start, s.iterations, progress, task.columns), *callbacks]

    t0[0] = time.perf_counter()
    result = fit(net, iter(loader), optimizer=opt, loss_fn=task.loss_fn, start=start,
                 lr_at=lambda it: s.lr * lr_factor(it, s.iterations, schedule=s.schedule,
                                                   warmup=s.warmup_steps()),
                 iterations=s.iterations, device=dev, validate=validator, val_every=s.val_every,
                 callbacks=cbs, amp=amp, clip=s.clip, channels_last=_channels_last(s),
                 scaler_state=state.get("scaler"),
                 cause_hint=f"The last good checkpoint is in {str(folder.path / 'last')!r}.")
    if result["loss"] is None:  # resumed after its last step: only the end of the run was left
        result["loss"] = state.get("loss", float("nan"))
    if s.calibrate and task.calibrated:
        with writes(folder.path):
            result["calibration"] = calibrate_best(folder.path / "best", data.raw, data.labels,
                                                   data.tz, dev, validator, normalize=scaling,
                                                   before=checkpoint.best_scores,
                                                   keep=s.keep_calibrated)
    if s.tune_segment and not task.volumes and validator is not None:  # warns, never raises
        result["segment"] = tune_best(folder.path / "best", validator, progress=progress)
    folder.write_run({**run_info, "finished": True})
    result.update(best=checkpoint.best_scores, elapsed_s=round(clock.elapsed(), 2),
                  best_path=str(folder.path / "best"), last_path=str(folder.path / "last"),
                  setup_s=round(t0[0] - t_start, 2))
    return result


class _Task:
    """What differs between a 2-D boundary run and a 3-D affinity run (:mod:`emtile.training.
    affinity_run`): the loss, augmentation, validation, the best metric, the log's columns,
    calibration and what run.json and the model folders add."""

    def __init__(self, s):
        self.affinities = s.target == "affinities"
        self.volumes = s.ndim == 3  # the 3-D parts (affinity_run), affinities or boundaries
        if self.affinities:
            self.loss_fn = aff.loss_function(s.affinity_loss)
            self.best_metric, self.lower_is_better, self.calibrated = "val_voi", True, False
            self.columns, self.record = AFFINITY_COLUMNS, aff.model_record(s)
        elif self.volumes:  # 3-D boundaries: the 3-D loss and patches, the 2-D scores
            self.loss_fn = aff.loss_function(s.affinity_loss)
            self.best_metric, self.lower_is_better, self.calibrated = "val_vrand", False, False
            self.columns, self.record = CSV_COLUMNS, aff.model_record(s)
        else:
            self.loss_fn = get_loss(s.loss)
            self.best_metric, self.lower_is_better, self.calibrated = "val_vrand", False, True
            self.columns, self.record = CSV_COLUMNS, {}

    def augmenter(self, s, data):
        if self.volumes:
            return aff.augmenter(s, data.voxel_size)
        return Augmenter(elastic=s.elastic, elastic_sigma=s.elastic_sigma, flip=s.flip,
                         intensity=s.intensity, noise=s.noise, blur=s.blur)

    def validator(self, data, s, weight_fn, dev, scaling):
        if self.volumes:
            return aff.validator(data, s, self.loss_fn, dev, scaling)
        return Validator(data.raw, data.labels, data.vz, loss_fn=self.loss_fn, weight_fn=weight_fn,
                         tile=s.val_tile or "auto", batch_size=1, device=dev, normalize=scaling)


@dataclasses.dataclass
class _Data:
    raw: object
    labels: object
    paths: tuple  # (raw path or None, labels path or None): workers re-open paths
    tz: list  # training slices
    vz: list  # validation slices
    voxel_size: tuple = None  # nm (z, y, x), when the raw store records one


def _open_data(raw, labels, s):
    (raw_a, raw_path), (labels_a, labels_path) = (open_input(raw, name="raw"),
                                                  open_input(labels, name="labels"))
    if raw_a.ndim != 3:
        raise EmtileError(f"raw has shape {tuple(raw_a.shape)}; expected a (Z, Y, X) stack")
    if tuple(raw_a.shape) != tuple(labels_a.shape):
        raise EmtileError(f"raw has shape {tuple(raw_a.shape)} but labels have shape "
                          f"{tuple(labels_a.shape)}; they must match")
    tz = resolve_slices(s.train_slices, raw_a.shape[0], name="train_slices")
    vz = ([] if s.val_slices is None else
          resolve_slices(s.val_slices, raw_a.shape[0], name="val_slices"))
    overlap = sorted(set(tz) & set(vz))
    if overlap:
        warnings.warn(f"train_slices and val_slices overlap in slices {overlap}: validation scores "
                      "will be optimistic", UserWarning, stacklevel=3)
    if s.target == "affinities":
        aff.check_ids(labels_a, labels_path)
    elif is_id_volume(labels_path, labels_a):  # 2-D boundaries from object ids
        labels_a, labels_path = IdBoundaries(labels_a), None
    if s.ndim == 3:  # z ranges, not lists of slices
        aff.z_range(tz, "train_slices"), aff.z_range(vz, "val_slices")
    return _Data(raw_a, labels_a, (raw_path, labels_path), tz, vz, _voxel_size(raw_path))


def _resolve(s, data, last):
    """The settings of a 3-D run resolved: offsets (affinities), factors (the resumed run's, or
    from the voxel size)."""
    if s.ndim != 3:
        return s
    if last is not None:
        s = aff.resumed(last, s)
    return aff.resolve(s, data.voxel_size)


def _model(s, last, model, data):
    """``(settings, model)``: the settings with the model's fields, and the model to train (the
    one given, or a new :class:`~emtile.unet.UNet` built after seeding torch with ``seed``)."""
    from emtile.unet import UNet, load_folder

    if model is not None:
        if not isinstance(model, UNet):
            raise EmtileError(f"model must be an emtile UNet (it is saved as a model folder), got "
                              f"{type(model).__name__}")
        s = s.with_model(model.config, source="the model given")
    if last is not None:
        s = s.with_model(load_folder(last).config)
    torch.manual_seed(s.seed)
    out_channels = len(s.offsets) if s.target == "affinities" else 1
    net = model if model is not None else UNet(1, out_channels, **s.model_args())
    if net.out_channels != out_channels:
        raise EmtileError(f"the model has {net.out_channels} output channels; this run needs "
                          f"{out_channels} (one per offset)")
    s = s.with_model(net.config)  # run.json records the model's values, defaults included
    if s.tile is None:  # 3-D: from the network and the voxel size
        s = dataclasses.replace(s, tile=default_tile_3d(net, data.voxel_size))
    for m in norm_layers(net):
        m.momentum = s.bn_momentum
    net.check(s.tile, "tile")
    return s, net


def _check_patches(data, s, net):
    """Patch sizes, labels and class weights: ``(in_shape, out_shape, class_weights, weight_fn)``."""
    if s.target == "affinities":
        return (*aff.patch_shapes(data, s, net), (), None)
    if s.ndim == 3:
        in_shape, out_shape = aff.patch_shapes(data, s, net)
    else:
        in_shape, out_shape = check_patch_geometry(data.raw.shape[1:], s.tile,
                                                   net.output_size(s.tile))
    fg = check_labels(data.labels, data.tz)
    if not 0.0 < fg < 1.0:
        raise EmtileError(f"the labels of the training slices are all {round(fg)}: training needs "
                          "both cell (1) and membrane (0) pixels")
    check_labels(data.labels, [z for z in data.vz if z not in data.tz])
    if s.ndim == 3:
        return in_shape, out_shape, (), None
    class_weights = balanced_class_weights(fg, power=float(s.class_balance))
    weight_fn = (functools.partial(weight_map, w0=s.w0, sigma=s.sigma, class_weights=class_weights)
                 if uses_weights(s.loss) else None)
    return in_shape, out_shape, class_weights, weight_fn


def _optimizer(net, s):
    if s.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(net.parameters(), lr=s.lr, momentum=s.momentum,
                           weight_decay=s.weight_decay)


def _patch_loader(data, s, in_shape, out_shape, augment, weight_fn, start, dev, scaling):
    """A DataLoader of the training batches from ``start`` on, read, normalised, augmented and
    weighted by ``s.workers`` processes."""
    dataset = (aff.patch_dataset(data, s, in_shape, out_shape, start=start, scaling=scaling,
                                 augment=augment)
               if s.ndim == 3 else _patch_dataset(
                   data, s, in_shape, out_shape, augment, weight_fn, start, scaling))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=s.workers, pin_memory=dev.type == "cuda",
        prefetch_factor=4 if s.workers else None, persistent_workers=False,
        generator=torch.Generator().manual_seed(s.seed))  # keeps the global RNG untouched
    return loader


def _patch_dataset(data, s, in_shape, out_shape, augment, weight_fn, start, scaling):
    return PatchDataset(data.raw, data.labels, input_size=in_shape, output_size=out_shape,
                        slices=data.tz, batch_size=s.batch_size, seed=s.seed, start=start,
                        augment=augment, weights=weight_fn, foreground=s.foreground,
                        paths=data.paths, normalize=scaling)


def _freeze(s, data, in_shape, out_shape, augment, dev, scaling):
    """``[FreezeNorm]`` when batch norm freezes in this run, else ``[]``."""
    after = s.freeze_step()
    if after is None:
        return []
    # its own stream (sample indices far beyond any run), read in this process
    if s.ndim == 3:
        calib = aff.patch_dataset(data, s, in_shape, out_shape, start=2**40, scaling=scaling,
                                  augment=augment)
    else:
        calib = PatchDataset(data.raw, data.labels, input_size=in_shape, output_size=out_shape,
                             slices=data.tz, batch_size=s.batch_size, seed=s.seed, start=2**40,
                             augment=augment, normalize=scaling)
    return [FreezeNorm(after, lambda m: precise_norm_stats(
        m, iter(calib), FREEZE_BN_BATCHES, device=dev, channels_last=_channels_last(s)))]


def _channels_last(s):
    """Channels-last memory layout: 2-D networks only (3-D ones keep the default layout)."""
    return s.channels_last and s.ndim == 2


def _logs(folder, start, iterations, progress, columns):
    cbs = [CSVLog(folder.path / "train.csv", start, columns=columns)]
    try:
        cbs.append(TensorBoardLog(folder.path / "tensorboard"))
    except ImportError:
        pass
    if progress:
        cbs.append(ProgressBar(start, iterations))
    return cbs


def _metadata(run, elapsed, best_metric, iteration, scores, kind):
    """The ``metadata.json`` of a checkpoint's model folder; an affinity model's also names
    ``ndim``, ``target`` and ``offsets`` at the top level (what the predictor reads)."""
    extra = {k: run[k] for k in ("ndim", "target", "offsets", "calibration") if k in run}
    contract = {k: extra[k] for k in ("ndim", "target", "offsets") if k in extra}
    return {**contract, "emtile": {**extra, "kind": kind, "raw": run["raw"], "labels": run["labels"],
                       "train_slices": run["train_slices"], "val_slices": run["val_slices"],
                       "iteration": iteration, "iterations": run["settings"]["iterations"],
                       "seed": run["settings"]["seed"], "settings": run["settings"],
                       "input_size": run["input_size"], "output_size": run["output_size"],
                       "metrics": {k: jsonable(v) for k, v in (scores or {}).items()},
                       "best_metric": best_metric, "elapsed_s": round(elapsed(), 2),
                       "normalization": run["normalization"], "voxel_size": run["voxel_size"],
                       "versions": run["versions"]}}


def _voxel_size(path):
    """The training volume's voxel size in nm (z, y, x) when its store records one, else None."""
    from emtile.store import voxel_size_nm

    return voxel_size_nm(path)


def format_result(result):
    """What ``emtile train`` prints about the ``result`` of :func:`train`."""
    from emtile.training.calibration import calibration_text
    from emtile.training.segment_tuning import tuned_text
    from emtile.training.validation import format_scores
    from emtile.training.validation3d import format_affinity_scores

    lines = [f"trained {result['iteration']} iterations in {result['elapsed_s']:.0f} s; "
             f"last loss {result['loss']:.4f}"]
    best = result.get("best") or {}
    if best:
        lines.append(f"best (iteration {best.get('iteration')}), validation: "
                     f"{format_affinity_scores(best) or format_scores(best)}")
    cal = result.get("calibration")
    if cal:
        what = "calibrated best/" if cal.get("kept", True) else "calibration tried and undone"
        lines.append(f"{what}: {calibration_text(cal)}")
        if cal.get("val_after"):
            lines.append(f"  validation after calibration: {format_scores(cal['val_after'])}")
        if cal.get("reason"):
            lines.append(f"  {cal['reason']}")
    if result.get("segment"):
        lines.append(f"segmentation tuned: {tuned_text(result['segment'])}")
    lines.append(f"model: {result['best_path']}  (resume from {result['last_path']})")
    return "\n".join(lines)
