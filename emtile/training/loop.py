"""The training loop: optimiser steps on a stream of batches, reported through callbacks.

:func:`fit` knows only ``model(x)``, the loss and the optimiser; it builds nothing. Everything
else hooks in through :class:`Callback`, which sees every point of a step: logging
(:mod:`emtile.training.logs`), saving ``best/`` and ``last/`` (:mod:`emtile.training.run`) and
freezing batch norm (:mod:`emtile.training.batchnorm`) are all callbacks.
"""

import math

import torch

from emtile import _faults
from emtile._errors import EmtileError
from emtile.device import autocast, default_amp
from emtile.training.settings import SCHEDULES

__all__ = ["fit", "Callback", "lr_factor"]


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
        raise EmtileError(f"schedule={schedule!r} is not supported: choose one of "
                          f"{', '.join(SCHEDULES)}")
    if warmup and iteration <= warmup:
        return iteration / warmup
    if schedule == "constant":
        return 1.0
    span = max(iterations - warmup, 1)
    t = min(max(iteration - warmup, 0) / span, 1.0)
    if schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))
    return final + (1.0 - final) * (1.0 - t) ** 0.9


class Callback:
    """Hooks of :func:`fit`; subclass and override what you need (all optional).

    ``state`` is a dict shared by the loop and every callback: ``iteration`` (steps done),
    ``loss`` (of the last step), ``scores`` (of the last validation), ``model``, ``optimizer``,
    ``scaler`` (the gradient scaler), ``device``, ``start`` and ``iterations`` (the steps done
    before and to reach), and ``autocast()``, a context manager running the forward pass's
    precision. Callbacks may add their own keys (:class:`emtile.training.logs.Clock` adds
    ``elapsed()``).

    The hooks of one step, in order: ``on_step_begin``, ``on_step``, then, when the step
    validates, ``on_validation``, then ``on_row``, and last, when it validated, ``on_checkpoint``
    (so the log holds every step a checkpoint holds, whenever the run is killed).
    """

    def on_start(self, state):
        """Before the first step."""

    def on_step_begin(self, state, logs):
        """Before a step's forward pass (the model is in training mode, the learning rate set);
        ``logs`` has the ``iteration`` about to run and its ``lr``."""

    def on_step(self, state, logs):
        """After each optimiser step; ``logs`` has ``iteration``, ``loss``, ``lr``."""

    def on_validation(self, state, logs):
        """After a validation; ``logs`` has the ``val_*`` scores."""

    def on_row(self, state, row):
        """Once per iteration with the complete log row (validation columns may be missing)."""

    def on_checkpoint(self, state, scores):
        """Every ``val_every`` steps and at the end, after validation and the step's row
        (``scores`` is {} when nothing is validated): the time to save."""

    def on_end(self, state):
        """After the last step."""

    def on_interrupt(self, state):
        """On Ctrl-C, after the last finished step's row (``KeyboardInterrupt`` then propagates)."""


def _emit(callbacks, name, *args):
    for cb in callbacks:
        getattr(cb, name, lambda *a: None)(*args)


def fit(model, batches, *, optimizer, loss_fn, lr_at, start, iterations, device, validate=None,
        val_every=0, callbacks=(), amp=False, clip=None, channels_last=False, scaler_state=None,
        cause_hint=""):
    """Run optimiser steps ``start + 1 .. iterations`` on ``batches``.

    Parameters
    ----------
    model : torch.nn.Module
        Maps an image batch (N, 1, *input) to logits (N, C, *output); any model.
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
        ``validate(model) -> dict`` of ``val_*`` scores, every ``val_every`` steps and at the
        end, under :func:`torch.random.fork_rng` (it does not perturb the training RNG).
    val_every : int
        Validation and checkpoint interval (0: only at the end).
    callbacks : sequence of :class:`Callback`
    amp : bool or {"bf16", "fp16"}
        Autocast the forward pass: True is bfloat16 (float16 with a gradient scaler on CUDA
        without bf16, see :func:`emtile.device.default_amp`); weights and optimiser state stay
        float32.
    clip : float, optional
        Clip the gradient norm to this value.
    channels_last : bool
        Feed inputs in channels-last memory layout; the model is put (back) in that layout
        after each validation.
    scaler_state : dict, optional
        Gradient-scaler state of a resumed run.
    cause_hint : str
        Appended to the NaN-loss message (e.g. where the last good checkpoint is).

    Returns
    -------
    dict
        ``iteration``, ``loss`` (last), ``scores`` (last validation).
    """
    amp = amp if amp in ("bf16", "fp16") else default_amp(device) if amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    state = {"iteration": start, "loss": None, "scores": {}, "model": model, "optimizer": optimizer,
             "scaler": scaler, "device": device, "start": start, "iterations": iterations,
             "autocast": lambda: autocast(device, amp)}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    _emit(callbacks, "on_start", state)
    row = None  # the current iteration's log row, until it is emitted
    try:
        for it in range(start + 1, iterations + 1):
            x, y, w = _to_device(next(batches), device, fmt)
            lr = lr_at(it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            _emit(callbacks, "on_step_begin", state, {"iteration": it, "lr": lr})
            value = _step(state, x, y, w, loss_fn=loss_fn, clip=clip, lr=lr, it=it,
                          cause_hint=cause_hint)
            state["iteration"], state["loss"] = it, value
            logs = {"iteration": it, "loss": value, "lr": lr}
            _emit(callbacks, "on_step", state, logs)
            _faults.point("train.step")  # test-only: a run killed here
            row = dict(logs)
            checkpoint = (val_every and it % val_every == 0) or it == iterations
            scores = {}
            if checkpoint and validate is not None:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    scores = validate(model)
                if channels_last:
                    model.to(memory_format=torch.channels_last)
                state["scores"] = scores
                row.update(scores)
                _emit(callbacks, "on_validation", state, scores)
            row, pending = None, row
            _emit(callbacks, "on_row", state, pending)
            if checkpoint:
                _emit(callbacks, "on_checkpoint", state, scores)
    except KeyboardInterrupt:
        if row is not None:  # the step was taken: log it before the state after it is saved
            _emit(callbacks, "on_row", state, row)
        _emit(callbacks, "on_interrupt", state)
        raise
    _emit(callbacks, "on_end", state)
    return {"iteration": state["iteration"], "loss": state["loss"], "scores": state["scores"]}


def _to_device(batch, device, fmt):
    non_blocking = device.type == "cuda"
    x = batch["image"].to(device, non_blocking=non_blocking).contiguous(memory_format=fmt)
    y = batch["label"].to(device, non_blocking=non_blocking)
    w = batch.get("weight")
    return x, y, (w.to(device, non_blocking=non_blocking) if w is not None else None)


def _step(state, x, y, w, *, loss_fn, clip, lr, it, cause_hint):
    """One forward/backward/optimiser step; returns the loss (EmtileError if it is not finite)."""
    model, optimizer, scaler = state["model"], state["optimizer"], state["scaler"]
    with state["autocast"]():
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
    return value


def _nan_message(it, value, lr, bad_input, hint):
    if bad_input:
        cause = "the raw patch holds NaN or infinite values: check the raw volume"
    else:
        cause = (f"training diverged, most likely a learning rate too high for this setup "
                 f"(lr={lr:.3g}): lower --lr, set --clip (e.g. 1.0), or turn off --amp")
    return f"loss is {value} at iteration {it}; {cause}.{(' ' + hint) if hint else ''}"
