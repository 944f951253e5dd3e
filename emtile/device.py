"""Where a model runs and in which precision: one home for the device and autocast choices.

Prediction, training and the benchmark all resolve ``device="auto"`` and pick their autocast
dtype here, so the rules (and their error messages) are written once. torch is imported inside
the functions: importing this module stays light.
"""

import contextlib

from emtile._errors import EmtileError

__all__ = ["DEVICES", "AMPS", "resolve_device", "amp_dtype", "default_amp", "autocast"]

#: What ``--device`` accepts on the command line (``cuda:N`` is accepted by :func:`resolve_device`).
DEVICES = ("auto", "cpu", "cuda")
#: Mixed-precision modes: off, bfloat16 or float16 autocast.
AMPS = (None, "bf16", "fp16")


def resolve_device(device, net=None):
    """The ``torch.device`` to run on.

    Parameters
    ----------
    device : str, torch.device or None
        ``"auto"`` / None: ``net``'s device if it is not the CPU, else CUDA when there is one,
        else the CPU. ``"cpu"``, ``"cuda"`` and ``"cuda:N"`` are checked (CUDA must exist).
    net : torch.nn.Module, optional
        A model whose device ``"auto"`` keeps.

    Returns
    -------
    torch.device
    """
    import torch

    if device in (None, "auto"):
        if net is not None and next(net.parameters()).device.type != "cpu":
            return next(net.parameters()).device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EmtileError(f"device={device!r} is not a device: choose auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EmtileError(f"device={device!r} was asked for but CUDA is not available here; use "
                          f"--device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise EmtileError(f"device={device!r} is not supported: choose auto, cpu or cuda")
    return dev


def amp_dtype(amp):
    """The autocast dtype of an :data:`AMPS` mode: None (off), bfloat16 or float16."""
    import torch

    table = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in table:
        raise EmtileError(f"amp={amp!r} is not supported: choose one of None, bf16, fp16")
    return table[amp]


def default_amp(device):
    """The mode that "mixed precision on" means on ``device``: ``"bf16"``, except ``"fp16"`` on a
    CUDA device without bfloat16 (whose float16 then needs a gradient scaler when training)."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def autocast(device, amp):
    """A context that autocasts to the :data:`AMPS` mode ``amp`` on ``device`` (a no-op for None)."""
    import torch

    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
