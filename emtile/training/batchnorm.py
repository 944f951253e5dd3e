"""Batch norm during training: its layers, exact statistics, and freezing it as a callback.

With one patch per step, each patch is normalised by its own statistics while training, but
validation and tiled prediction use the running averages. :class:`FreezeNorm` ends that mismatch
for the last part of a run: it recomputes the statistics over a few batches with the current
weights (:func:`precise_norm_stats`, PyTorch's :func:`torch.optim.swa_utils.update_bn`), then
keeps the layers in evaluation mode, so the network trains as prediction runs it.
"""

import torch

from emtile.training.loop import Callback

__all__ = ["norm_layers", "precise_norm_stats", "FreezeNorm", "FREEZE_BN_BATCHES"]

#: Batches that set the batch-norm statistics before they are frozen (``freeze_bn``).
FREEZE_BN_BATCHES = 32


def norm_layers(model):
    """The batch-norm layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def precise_norm_stats(model, batches, n, *, device, channels_last=False):
    """Replace the batch-norm running statistics by their exact average over ``n`` batches.

    Training normalises each batch by its own statistics; validation and prediction use the
    running averages, which trail the changing weights and, with batches of one patch, differ
    from any single patch's statistics. This recomputes them with the current weights
    (cumulative averages, as in "precise BN") with :func:`torch.optim.swa_utils.update_bn`,
    e.g. just before the layers are frozen. Momentum and training mode are restored.

    Parameters
    ----------
    model : torch.nn.Module
    batches : iterator of dict
        Batches with an ``image`` tensor (N, 1, *input); ``n`` of them are read.
    n : int
    device : torch.device
    channels_last : bool
        Feed the images in channels-last memory layout.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = (next(batches)["image"].to(device).contiguous(memory_format=fmt) for _ in range(n))
    torch.optim.swa_utils.update_bn(images, model)


class FreezeNorm(Callback):
    """Batch norm in evaluation mode (fixed statistics) from step ``after + 1`` on.

    Before that step, ``recompute(model)`` sets the statistics (under the loop's autocast), and
    the optimiser's state (Adam's moments, SGD's momentum) is cleared: frozen layers no longer
    divide the gradients by each batch's spread, so the moment estimates of before no longer fit
    (they made a run that froze at 30% diverge, loss 0.18 -> 0.59). A run resumed after that
    step does not recompute: its statistics are in the checkpoint.

    Parameters
    ----------
    after : int
        Steps trained with per-batch statistics.
    recompute : callable, optional
        ``recompute(model)``, e.g. a :func:`precise_norm_stats` over fresh batches.
    """

    def __init__(self, after, recompute=None):
        self.after, self.recompute, self.norms = after, recompute, []

    def on_start(self, state):
        self.norms = norm_layers(state["model"])

    def on_step_begin(self, state, logs):
        it = logs["iteration"]
        if it <= self.after or not self.norms:
            return
        if it == self.after + 1:
            if self.recompute is not None:
                with state["autocast"]():
                    self.recompute(state["model"])
            state["optimizer"].state.clear()
        for m in self.norms:
            m.eval()
