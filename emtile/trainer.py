"""Streaming, resumable training of a valid-convolution U-Net on annotated slices.

:func:`train` is the entry point (``emtile train`` calls it). It checks the data, builds the
model, the patch stream (:mod:`emtile.sampling`, augmented and weighted in the DataLoader workers)
and the optimiser, then runs :func:`fit`, a loop that knows only ``model(x)`` and the loss and
reports through callbacks (CSV, TensorBoard, progress bar, checkpoints).

Validation predicts the validation slices with :func:`emtile.predictor.predict_array`, the same
tiled path as ``emtile predict``, so the scores are what users will get. With
:mod:`emtile.metrics` the best checkpoint is the one with the highest V-Rand (the ISBI score,
best over thresholds 0.0-1.0), which punishes the thin membrane gaps that merge cells and that
pixel accuracy hides; without it, the highest F1.

The output folder::

    out/run.json         the settings of the run (marks the folder as an emtile training run)
    out/train.csv        iteration, loss, lr, val_loss, val_pixel_error, val_f1, val_vrand, elapsed_s
    out/best/            model folder (emtile.load_model / emtile predict --model out/best)
    out/last/            model folder + training_state.pt (optimizer, RNG, iteration) for --resume
    out/tensorboard/     if TensorBoard is installed

Two steps go beyond the paper's recipe. With batch norm, the last 30% of the run (``freeze_bn``)
trains with fixed statistics, recomputed first, so that the network is trained as tiled
prediction runs it (per-tile statistics would make the output depend on the tiling). At the end,
``best`` gets one logit offset fitted on the training slices (``calibrate``), because the border
weights bias the probabilities towards membrane.

Resuming reproduces an uninterrupted run: the patch stream is a pure function of the seed and
the batch index (see :mod:`emtile.sampling`), so no worker RNG state needs saving; the torch RNG
(dropout), the optimizer state and the iteration count are restored from ``last``. Validation
runs under :func:`torch.random.fork_rng`, so it does not perturb the training RNG.
"""

import csv
import functools
import json
import math
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from emtile._errors import EmtileError
from emtile.augment import Augmenter
from emtile.losses import balanced_class_weights, get_loss, uses_weights, weight_map
from emtile.sampling import PatchDataset, check_patch_geometry
from emtile.volume import check_labels, open_input, resolve_slices, slice_runs

__all__ = ["train", "fit", "lr_factor", "CSV_COLUMNS"]

CSV_COLUMNS = ("iteration", "loss", "lr", "val_loss", "val_pixel_error", "val_f1", "val_vrand",
               "elapsed_s")
RUN_FILE = "run.json"
STATE_FILE = "training_state.pt"
SCHEDULES = ("constant", "cosine", "poly")
OPTIMIZERS = ("adam", "sgd")


# --------------------------------------------------------------------------- learning rate


def lr_factor(iteration, iterations, *, schedule="cosine", warmup=0, final=0.01):
    """Multiplier of the base learning rate at ``iteration`` (1-based) of ``iterations``.

    ``constant``; ``cosine``: from 1 down to ``final`` along a half cosine; ``poly``:
    ``(1 - t) ** 0.9`` down to ``final``. All start with ``warmup`` iterations of linear ramp.

    Examples
    --------
    >>> [round(lr_factor(i, 100, schedule="cosine", warmup=10), 3) for i in (1, 10, 55, 100)]
    [0.1, 1.0, 0.505, 0.01]
    """
    if schedule not in SCHEDULES:
        raise EmtileError(f"schedule={schedule!r} is not supported: choose one of {', '.join(SCHEDULES)}")
    if warmup and iteration <= warmup:
        return iteration / warmup
    if schedule == "constant":
        return 1.0
    span = max(iterations - warmup, 1)
    t = min(max(iteration - warmup, 0) / span, 1.0)
    if schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))
    return final + (1.0 - final) * (1.0 - t) ** 0.9


# --------------------------------------------------------------------------- the loop


class Callback:
    """Hooks of :func:`fit`; subclass and override what you need (all optional)."""

    def on_start(self, state):
        pass

    def on_step(self, state, logs):
        """After each optimiser step; ``logs`` has ``iteration``, ``loss``, ``lr``."""

    def on_validation(self, state, logs):
        """After a validation; ``logs`` has the ``val_*`` scores."""

    def on_row(self, state, row):
        """Once per iteration with the complete CSV row (validation columns may be empty)."""

    def on_end(self, state):
        pass

    def on_interrupt(self, state):
        pass


def _emit(callbacks, name, *args):
    for cb in callbacks:
        getattr(cb, name, lambda *a: None)(*args)


def fit(model, batches, *, optimizer, loss_fn, lr_at, start, iterations, device, validate=None,
        val_every=0, checkpoint=None, callbacks=(), amp=False, clip=None, channels_last=False,
        scaler_state=None, cause_hint="", freeze_norm_at=None, calibrate_norm=None):
    """Run optimiser steps ``start + 1 .. iterations`` on ``batches``.

    Parameters
    ----------
    model : torch.nn.Module
        Maps an image batch (N, 1, *input) to logits (N, C, *output).
    batches : iterator of dict
        ``image``, ``label`` and optionally ``weight`` tensors (batch ``start`` first).
    optimizer : torch.optim.Optimizer
    loss_fn : callable
        ``loss_fn(logits, target, weight) -> scalar``.
    lr_at : callable
        ``lr_at(iteration) -> learning rate``, set before each step.
    start, iterations : int
        Steps already done and the total to reach.
    device : torch.device
    validate : callable, optional
        ``validate(model) -> dict`` of ``val_*`` scores, every ``val_every`` steps and at the end.
    val_every : int
        Validation and checkpoint interval (0: only at the end).
    checkpoint : callable, optional
        ``checkpoint(state, scores)``: every ``val_every`` steps (after validation), at the end,
        and on Ctrl-C (with ``scores=None``).
    callbacks : sequence of :class:`Callback`
    amp : bool
        Autocast the forward pass to bfloat16 (on CUDA without bf16: float16 with a gradient
        scaler); weights and optimiser state stay float32.
    clip : float, optional
        Clip the gradient norm to this value.
    channels_last : bool
        Feed inputs in channels-last memory layout; the model is put (back) in that layout
        after each validation.
    scaler_state : dict, optional
        Gradient-scaler state of a resumed run.
    cause_hint : str
        Appended to the NaN-loss message (e.g. where the last good checkpoint is).
    freeze_norm_at : int, optional
        After this many steps the batch-norm layers stay in evaluation mode: they normalise with
        fixed statistics, exactly as at validation and prediction, and stop updating them.
    calibrate_norm : callable, optional
        ``calibrate_norm(model)`` sets those statistics; called once, before step
        ``freeze_norm_at + 1`` (not again when a run resumes after that point: the statistics are
        in the checkpoint). The optimiser's state (Adam's moments, SGD's momentum) is cleared
        at that point too: without batch statistics the gradients change scale, and stale
        moments made a run that froze at 30% diverge (loss 0.18 -> 0.59).

    Returns
    -------
    dict
        ``iteration``, ``loss`` (last), ``scores`` (last validation).
    """
    state = {"iteration": start, "loss": None, "scores": {}, "model": model, "optimizer": optimizer}
    from emtile.device import autocast, default_amp

    amp = default_amp(device) if amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    state["scaler"] = scaler
    non_blocking = device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    norms = norm_layers(model)
    _emit(callbacks, "on_start", state)
    row = None  # the current iteration's log row, until it is emitted
    try:
        for it in range(start + 1, iterations + 1):
            batch = next(batches)
            x = batch["image"].to(device, non_blocking=non_blocking).contiguous(memory_format=fmt)
            y = batch["label"].to(device, non_blocking=non_blocking)
            w = batch.get("weight")
            w = w.to(device, non_blocking=non_blocking) if w is not None else None
            lr = lr_at(it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            if freeze_norm_at is not None and it > freeze_norm_at and norms:
                if it == freeze_norm_at + 1:
                    if calibrate_norm is not None:
                        with autocast(device, amp):
                            calibrate_norm(model)
                    # frozen layers no longer divide the gradients by each batch's spread, so
                    # the moment estimates of before no longer fit: start them afresh
                    optimizer.state.clear()
                for m in norms:
                    m.eval()
            with autocast(device, amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y, w)
            value = float(loss.detach())
            if not math.isfinite(value):
                bad_input = not bool(torch.isfinite(x).all())
                raise EmtileError(_nan_message(it, value, lr, bad_input, cause_hint))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
            state["iteration"], state["loss"] = it, value
            logs = {"iteration": it, "loss": value, "lr": lr}
            _emit(callbacks, "on_step", state, logs)
            row = dict(logs)
            if (val_every and it % val_every == 0) or it == iterations:
                scores = {}
                if validate is not None:
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        scores = validate(model)
                    if channels_last:
                        model.to(memory_format=torch.channels_last)
                    state["scores"] = scores
                    row.update(scores)
                    _emit(callbacks, "on_validation", state, scores)
                if checkpoint is not None:
                    checkpoint(state, scores)
            row, pending = None, row
            _emit(callbacks, "on_row", state, pending)
    except KeyboardInterrupt:
        if row is not None:  # the step was taken: log it before saving the state after it
            _emit(callbacks, "on_row", state, row)
        if checkpoint is not None and state["iteration"] > start:
            checkpoint(state, None)
        _emit(callbacks, "on_interrupt", state)
        raise
    _emit(callbacks, "on_end", state)
    return {"iteration": state["iteration"], "loss": state["loss"], "scores": state["scores"]}


def _nan_message(it, value, lr, bad_input, hint):
    if bad_input:
        cause = "the raw patch holds NaN or infinite values: check the raw volume"
    else:
        cause = (f"training diverged, most likely a learning rate too high for this setup "
                 f"(lr={lr:.3g}): lower --lr, set --clip (e.g. 1.0), or turn off --amp")
    return f"loss is {value} at iteration {it}; {cause}.{(' ' + hint) if hint else ''}"


# --------------------------------------------------------------------------- logging callbacks


class _Clock(Callback):
    """Puts the run's elapsed time (earlier sessions included) at ``state["elapsed"]()``."""

    def __init__(self, elapsed):
        self.elapsed = elapsed

    def on_start(self, state):
        state["elapsed"] = self.elapsed


class CSVLog(Callback):
    """``train.csv``: one row per iteration; a resumed run keeps the rows up to its start."""

    def __init__(self, path, start):
        self.path = Path(path)
        rows = []
        if start > 0 and self.path.exists():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= start]
        self.file = self.path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def on_row(self, state, row):
        out = {k: "" for k in CSV_COLUMNS}
        for k, v in row.items():
            if k in out and v is not None:
                # the loss exactly (repr round-trips), so runs can be compared bit for bit
                out[k] = repr(v) if k == "loss" else f"{v:.6g}" if isinstance(v, float) else v
        out["elapsed_s"] = f"{state['elapsed']():.2f}"
        self.writer.writerow(out)
        self.file.flush()

    def on_end(self, state):
        self.file.close()

    on_interrupt = on_end


class TensorBoardLog(Callback):
    """Scalars to ``out/tensorboard`` (only if the ``tensorboard`` package is installed)."""

    def __init__(self, directory):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        self.writer = SummaryWriter(str(directory))

    def on_step(self, state, logs):
        self.writer.add_scalar("train/loss", logs["loss"], logs["iteration"])
        self.writer.add_scalar("train/lr", logs["lr"], logs["iteration"])

    def on_validation(self, state, logs):
        for k, v in logs.items():
            if isinstance(v, (int, float)) and v is not None:
                self.writer.add_scalar(f"val/{k[4:] if k.startswith('val_') else k}", v,
                                       state["iteration"])

    def on_end(self, state):
        self.writer.close()

    on_interrupt = on_end


class ProgressBar(Callback):
    def __init__(self, start, iterations):
        from tqdm import tqdm

        self.bar = tqdm(total=iterations, initial=start, unit="it", desc="train", dynamic_ncols=True)
        self.val = {}

    def on_step(self, state, logs):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2g}", **self.val,
                             refresh=False)

    def on_validation(self, state, logs):
        self.val = {k[4:]: f"{v:.4f}" for k, v in logs.items()
                    if k in ("val_pixel_error", "val_vrand") and v is not None}

    def on_end(self, state):
        self.bar.close()

    on_interrupt = on_end


# --------------------------------------------------------------------------- validation


def norm_layers(model):
    """The batch-norm layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def precise_norm_stats(model, batches, n, *, device, channels_last=False):
    """Replace the batch-norm running statistics by their exact average over ``n`` batches.

    Training normalises each batch by its own statistics; validation and prediction use the
    running averages, which trail the changing weights and, with batches of one patch, differ
    from any single patch's statistics. This recomputes them with the current weights
    (cumulative averages, as in "precise BN"), e.g. just before the layers are frozen.
    """
    norms = norm_layers(model)
    if not norms:
        return
    saved = [m.momentum for m in norms]
    was_training = model.training
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
        model.train()
        with torch.no_grad():
            for _ in range(n):
                batch = next(batches)
                model(batch["image"].to(device).contiguous(memory_format=fmt))
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.train(was_training)


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

    The paper's border weights make thin membranes between cells count up to 11 times more than
    other pixels, so a network trained with them says "membrane" more readily than the truth
    does (probabilities are biased, not badly ranked). One logit offset, fitted on training
    slices (at most ``max_pixels`` of them, spread evenly), is added to the bias of the last
    layer: the model folder stays an ordinary model and ``emtile predict`` needs nothing new.

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


#: Batches that set the batch-norm statistics before they are frozen (``freeze_bn``).
FREEZE_BN_BATCHES = 32


def predict_slices(model, raw, zs, *, tile="auto", batch_size=1, device="auto"):
    """Probabilities of the sorted slices ``zs`` of ``raw``, shape (len(zs), Y, X), float32.

    Each contiguous run of slices is one :func:`emtile.predictor.predict_array` call, the tiled
    path of ``emtile predict``.
    """
    from emtile.predictor import predict_array

    full = (slice(None),) * (raw.ndim - 1)
    prob = np.concatenate([
        np.asarray(predict_array(model, raw, tile=tile, batch_size=batch_size, device=device,
                                 roi=(slice(z0, z1), *full), progress=False))
        for z0, z1 in slice_runs(zs)]).astype(np.float32)
    return prob.reshape((len(zs), *raw.shape[1:]))


class Validator:
    """Predicts the validation slices through the predictor and scores them.

    The loss (same function as training, with the full-slice weight maps, computed once) is
    evaluated on the logits of the stitched probabilities; pixel error and F1 of the cell
    interior at threshold 0.5; V-Rand (best over thresholds 0.0-1.0, as the ISBI challenge scores
    it) when :mod:`emtile.metrics` is available.
    """

    def __init__(self, raw, labels, zs, *, loss_fn, weight_fn, tile, batch_size, device):
        self.raw, self.zs, self.tile = raw, zs, tile
        self.batch_size, self.device, self.loss_fn = batch_size, device, loss_fn
        self.truth = np.stack([(np.asarray(labels[z]) != 0).astype(np.uint8) for z in zs])
        self.weights = (np.stack([weight_fn(t) for t in self.truth]) if weight_fn is not None
                        else None)

    def predict(self, model):
        return predict_slices(model, self.raw, self.zs, tile=self.tile,
                              batch_size=self.batch_size, device=self.device)

    def __call__(self, model):
        prob = self.predict(model)
        p = torch.from_numpy(np.clip(prob, 1e-6, 1 - 1e-6))
        logits = torch.log(p) - torch.log1p(-p)
        w = torch.from_numpy(self.weights) if self.weights is not None else None
        with torch.no_grad():
            val_loss = float(self.loss_fn(logits, torch.from_numpy(self.truth).float(), w))
        from emtile.metrics import evaluate

        r = evaluate(prob, self.truth, sweep=True, progress=False)
        return {"val_loss": val_loss, "val_pixel_error": float(r["pixel"]["pixel_error"]),
                "val_f1": float(r["pixel"]["f1"]),
                "val_vrand": float(r["sweep"]["best_v_rand"]["value"]),
                "val_vrand_threshold": float(r["sweep"]["best_v_rand"]["threshold"]),
                "val_vrand_05": float(r["mean"]["v_rand"])}


# --------------------------------------------------------------------------- checks


def _check_out(out, *, resume, overwrite):
    """Check the output folder (no side effects); return the ``last`` folder to resume, or None."""
    out = Path(out)
    if resume and overwrite:
        raise EmtileError("resume=True and overwrite=True contradict each other: choose one")
    if out.exists() and not out.is_dir():
        raise EmtileError(f"out={str(out)!r} exists and is not a folder")
    if resume:
        last = _last_folder(out)
        if last is None:
            raise EmtileError(f"nothing to resume in out={str(out)!r}: it has no last/ checkpoint "
                              "(run without --resume to start a new run)")
        return last
    if out.exists() and any(out.iterdir()):
        if not (out / RUN_FILE).exists():
            raise EmtileError(
                f"out={str(out)!r} is not empty and holds no emtile training run; choose an "
                "empty or new folder (emtile will not delete files it did not write)")
        if not overwrite:
            raise EmtileError(
                f"out={str(out)!r} holds another training run; pass --resume to continue it or "
                "--overwrite to replace it")
    return None


def _clear_out(out):
    """Create ``out``, removing the files of an earlier run (only those emtile writes)."""
    out = Path(out)
    for name in ("best", "last", "last.tmp", "last.old", "best.tmp", "best.old", "tensorboard"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (RUN_FILE, "train.csv"):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _last_folder(out):
    for name in ("last", "last.old"):  # last.old: a crash between the two renames of a save
        if (out / name / STATE_FILE).exists():
            return out / name
    return None


def _replace_folder(tmp, final):
    """Move the folder ``tmp`` to ``final``, keeping a complete copy at every moment."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _versions():
    import emtile

    return {"emtile": emtile.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _describe(x):
    return str(x) if isinstance(x, (str, os.PathLike)) else f"<{type(x).__name__} {tuple(x.shape)}>"


# --------------------------------------------------------------------------- entry point


def train(raw, labels, out, *, train_slices, val_slices=None, iterations=2000, base=None,
          depth=None, batch_norm=None, dropout=0.0, bn_momentum=0.01, tile=572, batch_size=1, lr=1e-3,
          optimizer="adam", momentum=0.99, weight_decay=0.0, schedule="cosine", warmup=None,
          loss="bce", w0=10.0, sigma=5.0, class_balance=True, workers=1, device="auto", amp=None,
          clip=None, val_every=250, val_tile=None, seed=0, resume=False, overwrite=False,
          elastic=True, elastic_sigma=10.0, flip=True, intensity=True, noise=0.0, blur=0.0,
          foreground=None, progress=True, channels_last=True, freeze_bn=0.7, calibrate=True,
          callbacks=()):
    """Train a valid-convolution U-Net on annotated slices; write a model folder and logs.

    Parameters
    ----------
    raw, labels : str, Path or array-like, shape (Z, Y, X)
        Image volume and binary labels (1 = cell interior, 0 = membrane; 0/255 and bool work
        too). Paths open lazily with :func:`emtile.open_volume`; only patches are read.
    out : str or Path
        Output folder (see the module docstring). A folder holding another run is refused unless
        ``resume`` or ``overwrite``; a non-empty folder that is not a run is always refused.
    train_slices, val_slices : slice, int or list of int
        Slices to train on and to validate on (``slice(0, 25)``, ``[25, 27]``); ``val_slices``
        ``None`` skips validation (``best`` is then the last model). Overlap gives a warning.
    iterations : int
        Total optimiser steps (a resumed run continues up to this number).
    base, depth, batch_norm, dropout :
        The :class:`emtile.unet.UNet` (defaults 64, 4, False). On ``resume`` they come from the
        checkpoint; giving a different value is an error.
    bn_momentum : float
        Momentum of the batch-norm running statistics (PyTorch's default is 0.1). With small
        batches of augmented patches, 0.1 makes the statistics used at validation and prediction
        follow the last ~10 patches: validation loss then swung 0.41 -> 0.72 -> 0.56 between
        checks at a learning rate of 2e-5 in the ISBI run. 0.01 averages over ~100 patches.
    tile : int
        Training input patch size (a valid size for ``depth``); the label patch is the model's
        output size for it (572 -> 388 at depth 4).
    batch_size : int
    lr, optimizer, momentum, weight_decay :
        Base learning rate; ``"adam"`` or ``"sgd"`` (with ``momentum``, 0.99 as in the paper).
    schedule, warmup :
        ``"constant"``, ``"cosine"`` or ``"poly"`` (see :func:`lr_factor`) with ``warmup``
        linear-ramp iterations (default: 2% of ``iterations``, at most 200).
    loss : {"bce", "dice", "bce+dice"}
        ``bce`` is weighted by the paper's map (class balance + ``w0``, ``sigma`` border term;
        ``w0=0`` turns the border term off). ``class_balance`` is the exponent of the
        inverse-frequency class weights: ``True``/1 balances the classes (the paper), ``False``/0
        turns class weights off, e.g. 0.5 balances halfway.
    workers : int
        DataLoader worker processes reading, augmenting and weighting patches (0: in-process).
    device : {"auto", "cpu", "cuda", ...}
    amp : bool, optional
        Mixed precision: bfloat16 autocast of the forward pass (CUDA without bf16: float16 with
        loss scaling). Default: on with CUDA, off on CPU. On CPUs with AVX512-BF16 or AMX it is
        much faster there too (2.6× per step on this project's 2-core Zen 4 machine).
        Validation always predicts in float32, as ``emtile predict`` does by default.
    clip : float, optional
        Gradient-norm clipping.
    val_every : int
        Validate (and save ``last``) every this many iterations, and at the end.
    val_tile : int or "auto", optional
        Tile size of validation prediction (default: ``"auto"``, the predictor's choice).
    seed : int
        Seeds the model initialisation and the patch stream.
    resume, overwrite : bool
        Continue the run in ``out`` from ``last``, or replace it.
    elastic, elastic_sigma, flip, intensity, noise, blur :
        Augmentation switches (see :class:`emtile.augment.Augmenter`).
    foreground : float, optional
        Foreground balance of the patch sampler (see :class:`emtile.sampling.PatchDataset`).
    progress : bool
        tqdm progress bar.
    channels_last : bool
        Channels-last memory layout (faster convolutions on CPU).
    freeze_bn : float or None
        Fraction of the run after which batch norm is frozen (with ``batch_norm`` only): its
        statistics are recomputed over ``FREEZE_BN_BATCHES`` (32) augmented training batches
        with the current weights, then stay fixed, the optimiser's moments restart, and the rest
        of the run trains the network as validation and prediction use it. Without it, a
        network trained on batches of one patch learns to rely on each patch's own statistics,
        which tiled prediction cannot use (on ISBI, validation V-Rand swung between 0.98 and
        0.41 from one check to the next). Only models validated after the freeze compete for
        ``best``. ``1.0`` or ``None``: never.
    calibrate : bool
        At the end, fit one logit offset on the training slices so that threshold 0.5 gives
        the lowest pixel error, and fold it into ``best``'s last-layer bias (see
        :func:`calibrate_model`; ``last`` stays as trained, for resuming). The offset, the
        training-slice errors before and after, and the validation scores after are recorded in
        ``best``'s metadata under ``calibration``.
    callbacks : sequence of :class:`Callback`
        Extra hooks (e.g. to collect the losses in a notebook).

    Returns
    -------
    dict
        ``iteration``, ``loss``, ``scores`` (last validation), ``best`` (best scores),
        ``elapsed_s`` and the paths ``best``/``last``.
    """
    t_start = time.perf_counter()
    out = Path(out)
    settings = {k: v for k, v in locals().items() if k not in ("raw", "labels", "out", "callbacks",
                                                               "t_start")}
    (raw_a, _), (labels_a, _) = open_input(raw, name="raw"), open_input(labels, name="labels")
    if raw_a.ndim != 3:
        raise EmtileError(f"raw has shape {tuple(raw_a.shape)}; expected a (Z, Y, X) stack")
    if tuple(raw_a.shape) != tuple(labels_a.shape):
        raise EmtileError(f"raw has shape {tuple(raw_a.shape)} but labels have shape "
                          f"{tuple(labels_a.shape)}; they must match")
    tz = resolve_slices(train_slices, raw_a.shape[0], name="train_slices")
    vz = resolve_slices(val_slices, raw_a.shape[0], name="val_slices") if val_slices is not None else []
    overlap = sorted(set(tz) & set(vz))
    if overlap:
        warnings.warn(f"train_slices and val_slices overlap in slices {overlap}: validation scores "
                      "will be optimistic", UserWarning, stacklevel=2)
    for name, value, lo in (("iterations", iterations, 1), ("batch_size", batch_size, 1),
                            ("workers", workers, 0), ("val_every", val_every, 0)):
        if not isinstance(value, (int, np.integer)) or value < lo:
            raise EmtileError(f"{name}={value!r} must be an integer >= {lo}")
    if optimizer not in OPTIMIZERS:
        raise EmtileError(f"optimizer={optimizer!r} is not supported: choose adam or sgd")
    if not lr > 0:
        raise EmtileError(f"lr={lr!r} must be positive")
    loss_fn = get_loss(loss)
    lr_factor(1, iterations, schedule=schedule)  # validates the name
    from emtile.device import resolve_device

    dev = resolve_device(device)
    amp = (dev.type == "cuda") if amp is None else bool(amp)

    last = _check_out(out, resume=resume, overwrite=overwrite)
    arch = {"base": base, "depth": depth, "batch_norm": batch_norm}
    if last is not None:
        from emtile.unet import load_model

        saved = load_model(last).config
        for k, v in arch.items():
            if v is not None and v != saved[k]:
                raise EmtileError(f"{k}={v!r} differs from the run being resumed ({k}={saved[k]!r}); "
                                  f"leave it out or start a new run")
        arch = {k: saved[k] for k in arch}
        dropout = saved.get("dropout", dropout)
    arch = {"base": 64 if arch["base"] is None else arch["base"],
            "depth": 4 if arch["depth"] is None else arch["depth"],
            "batch_norm": bool(arch["batch_norm"])}
    settings.update(arch)

    from emtile.unet import UNet

    torch.manual_seed(seed)
    model = UNet(1, 1, dropout=dropout, **arch)
    if not 0.0 < bn_momentum <= 1.0:
        raise EmtileError(f"bn_momentum={bn_momentum!r} must be in (0, 1]")
    if freeze_bn is not None and not 0.0 <= freeze_bn <= 1.0:
        raise EmtileError(f"freeze_bn={freeze_bn!r} must be a fraction of the run in [0, 1] "
                          "(e.g. 0.7; 1 or None: never)")
    for module in norm_layers(model):
        module.momentum = bn_momentum
    model.check(tile, "tile")
    out_size = model.output_size(tile)
    in_shape, out_shape = check_patch_geometry(raw_a.shape[1:], tile, out_size)
    fg = check_labels(labels_a, tz)
    if not 0.0 < fg < 1.0:
        raise EmtileError(f"the labels of the training slices are all {round(fg)}: training needs "
                          "both cell (1) and membrane (0) pixels")
    check_labels(labels_a, [z for z in vz if z not in tz])
    power = float(class_balance)  # True -> 1 (balanced), False -> 0 (off)
    if not 0.0 <= power <= 1.0:
        raise EmtileError(f"class_balance={class_balance!r} must be a bool or a number in [0, 1]")
    class_weights = balanced_class_weights(fg, power=power)
    weight_fn = (functools.partial(weight_map, w0=w0, sigma=sigma, class_weights=class_weights)
                 if uses_weights(loss) else None)

    if last is None:  # every check passed: only now touch the output folder
        _clear_out(out)
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = model.parameters()
    opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if optimizer == "adam" else
           torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay))
    warmup = min(200, iterations // 50) if warmup is None else int(warmup)
    lr_at = lambda it: lr * lr_factor(it, iterations, schedule=schedule, warmup=warmup)  # noqa: E731

    start, best_score, elapsed0, state = 0, None, 0.0, None
    if last is not None:
        state = _load_state(last, model, opt, dev)
        start, best_score, elapsed0 = state["iteration"], state["best_score"], state["elapsed_s"]
        if start >= iterations:
            raise EmtileError(f"the run in {str(out)!r} already did {start} iterations; "
                              f"iterations={iterations} must be larger to resume")
    run_info = {"format": "emtile-train-run", "version": 1, "raw": _describe(raw),
                "labels": _describe(labels), "settings": _jsonable(settings),
                "train_slices": tz, "val_slices": vz, "input_size": list(in_shape),
                "output_size": list(out_shape), "class_weights": list(class_weights),
                "versions": _versions()}
    (out / RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n")

    augment = Augmenter(elastic=elastic, elastic_sigma=elastic_sigma, flip=flip,
                        intensity=intensity, noise=noise, blur=blur)
    dataset = PatchDataset(raw_a, labels_a, input_size=in_shape, output_size=out_shape, slices=tz,
                           batch_size=batch_size, seed=seed, start=start, augment=augment,
                           weights=weight_fn, foreground=foreground,
                           paths=tuple(str(x) if isinstance(x, (str, os.PathLike)) else None
                                       for x in (raw, labels)))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=False,
        generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched
    freeze_at = set_norm_stats = None
    if freeze_bn is not None and freeze_bn < 1.0 and arch["batch_norm"]:
        freeze_at = int(round(freeze_bn * iterations))
        # its own stream (sample indices far beyond any run), read in this process
        calib_data = PatchDataset(raw_a, labels_a, input_size=in_shape, output_size=out_shape,
                                  slices=tz, batch_size=batch_size, seed=seed, start=2**40,
                                  augment=augment)

        def set_norm_stats(m):
            precise_norm_stats(m, iter(calib_data), FREEZE_BN_BATCHES, device=dev,
                               channels_last=channels_last)
    validator = (Validator(raw_a, labels_a, vz, loss_fn=loss_fn, weight_fn=weight_fn,
                           tile=val_tile or "auto", batch_size=1, device=dev) if vz else None)
    score_key = "val_vrand"

    clock = {"t0": time.perf_counter()}
    elapsed = lambda: elapsed0 + time.perf_counter() - clock["t0"]  # noqa: E731
    best_scores = dict(state.get("best_scores", {})) if state else {}

    def metadata(it, scores, kind):
        return {"emtile": {"kind": kind, "raw": run_info["raw"], "labels": run_info["labels"],
                           "train_slices": tz, "val_slices": vz, "iteration": it,
                           "iterations": iterations, "seed": seed, "settings": run_info["settings"],
                           "input_size": list(in_shape), "output_size": list(out_shape),
                           "metrics": _jsonable(scores or {}), "best_metric": score_key,
                           "elapsed_s": round(elapsed(), 2), "versions": run_info["versions"]}}

    def checkpoint(st, scores):
        nonlocal best_score, best_scores
        from emtile.unet import save_model

        it = st["iteration"]
        # with frozen batch norm, only models validated after the freeze compete for best/:
        # before it, scores swing from one check to the next and a maximum picks noise
        eligible = freeze_at is None or it > freeze_at
        if scores and eligible:  # after a validation: is it the best so far?
            value = scores.get(score_key)
            if value is not None and (best_score is None or value > best_score):
                best_score, best_scores = value, dict(scores, iteration=it)
                tmp = out / "best.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                save_model(model, tmp, metadata=metadata(it, scores, "best"))
                _replace_folder(tmp, out / "best")
        tmp = out / "last.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp, metadata=metadata(it, scores or st.get("scores"), "last"))
        _save_state(tmp, st, opt, best_score, best_scores, elapsed())
        _replace_folder(tmp, out / "last")
        if validator is None or (it == iterations and not (out / "best").exists()):
            shutil.rmtree(out / "best", ignore_errors=True)
            shutil.copytree(out / "last", out / "best", ignore=shutil.ignore_patterns(STATE_FILE))

    cbs = [_Clock(elapsed), CSVLog(out / "train.csv", start)]
    try:
        cbs.append(TensorBoardLog(out / "tensorboard"))
    except ImportError:
        pass
    if progress:
        cbs.append(ProgressBar(start, iterations))
    cbs.extend(callbacks)

    clock["t0"] = time.perf_counter()
    result = fit(model, iter(loader), optimizer=opt, loss_fn=loss_fn, lr_at=lr_at, start=start,
                 iterations=iterations, device=dev, validate=validator, val_every=val_every,
                 checkpoint=checkpoint, callbacks=cbs, amp=amp, clip=clip,
                 channels_last=channels_last, scaler_state=state.get("scaler") if state else None,
                 freeze_norm_at=freeze_at, calibrate_norm=set_norm_stats,
                 cause_hint=f"The last good checkpoint is in {str(out / 'last')!r}.")
    if calibrate:
        result["calibration"] = _calibrate_best(out / "best", raw_a, labels_a, tz, dev, validator)
    result.update(best=best_scores, elapsed_s=round(elapsed(), 2), best_path=str(out / "best"),
                  last_path=str(out / "last"), setup_s=round(clock["t0"] - t_start, 2))
    return result


def _calibrate_best(best, raw, labels, zs, device, validator):
    """Calibrate the model in ``best`` once (see :func:`calibrate_model`); return the record."""
    from emtile.unet import load_metadata, load_model, save_model

    meta = load_metadata(best)
    info = meta.setdefault("emtile", {})
    if "calibration" in info:  # a resumed run kept the best model of before: done already
        return info["calibration"]
    model = load_model(best, device=device)
    record = calibrate_model(model, raw, labels, zs, device=device)
    if validator is not None:
        record["val_after"] = validator(model)
    info["calibration"] = _jsonable(record)
    tmp = best.with_name(best.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, metadata=meta)
    _replace_folder(tmp, best)
    return info["calibration"]


# --------------------------------------------------------------------------- state files


def _jsonable(d):
    out = {}
    for k, v in d.items():
        if isinstance(v, slice):
            v = f"{'' if v.start is None else v.start}:{'' if v.stop is None else v.stop}"
        elif isinstance(v, range):
            v = list(v)
        elif isinstance(v, (np.integer, np.floating)):
            v = v.item()
        elif isinstance(v, (tuple, list)):
            v = [x.item() if isinstance(x, (np.integer, np.floating)) else x for x in v]
        elif v is not None and not isinstance(v, (bool, int, float, str, dict)):
            v = repr(v)
        out[k] = v
    return out


def _save_state(folder, st, opt, best_score, best_scores, elapsed):
    """Optimizer, scaler, RNG and counters: tensors and plain containers, loadable with
    ``torch.load(weights_only=True)`` (no pickled code)."""
    state = {
        "iteration": int(st["iteration"]),
        "optimizer": opt.state_dict(),
        "scaler": st["scaler"].state_dict() if st.get("scaler") is not None else {},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "best_score": None if best_score is None else float(best_score),
        "best_scores": json.dumps(_jsonable(best_scores or {})),
        "elapsed_s": float(elapsed),
    }
    torch.save(state, Path(folder) / STATE_FILE)


def _load_state(folder, model, opt, device):
    from emtile.unet import load_model

    model.load_state_dict(load_model(folder).state_dict())
    try:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it is refused by weights_only=True
        raise EmtileError(f"{str(Path(folder) / STATE_FILE)!r} is not a plain tensor file and "
                          f"was not loaded (weights_only=True refused it: {type(exc).__name__})") from None
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    state["best_scores"] = json.loads(state.get("best_scores") or "{}")
    return state
