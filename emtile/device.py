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


_ALLOCATOR_TUNED = False


def keep_large_allocations():
    """Serve large allocations from the heap and keep freed memory for reuse (glibc only).

    glibc hands every allocation above 32 MiB straight to ``mmap`` and back to the system on
    ``free``, so each forward pass of a large tile maps its activations afresh and takes a page
    fault for every 4 KiB of them. Measured here (UNet base 16, one 1212-px tile on the CPU,
    ``mallopt`` off/on): 213,450 page faults and 2.11 s of CPU time per pass, 0.54 s of it in
    the kernel, against no page faults and 1.44 s. 572-px tiles (activations under 32 MiB) had
    no page faults either way. This sets ``M_MMAP_MAX=0`` (no mmap for allocations) and
    ``M_TRIM_THRESHOLD`` to 1 GiB (freed memory at the top of the heap is kept up to that).
    It is process-wide and cannot be undone; prediction calls it in the processes that run the
    model. Returns True if it applied (once per process), False elsewhere (other C libraries).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc, not musl
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**30))
    return _ALLOCATOR_TUNED
