"""Where a model runs and in which precision: one home for the device and autocast choices.

Prediction, training and the benchmark all resolve ``device="auto"`` and pick their autocast
dtype here, so the rules (and their error messages) are written once. torch is imported inside
the functions: importing this module stays light.
"""

import contextlib

from emtile._errors import EmtileError

__all__ = ["DEVICES", "AMPS", "AMP_CHOICES", "resolve_device", "amp_dtype", "default_amp",
           "resolve_amp", "check_amp", "native_bf16", "autocast"]

#: What ``--device`` accepts in every command, besides ``cuda:N`` (the N-th CUDA device).
DEVICES = ("auto", "cpu", "cuda")
#: Mixed-precision modes: off, bfloat16 or float16 autocast.
AMPS = (None, "bf16", "fp16")
#: What ``--amp`` accepts in every command (see :func:`resolve_amp`).
AMP_CHOICES = ("off", "auto", "bf16", "fp16")


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
                          f"device='cpu' or device='auto'")
    if dev.type not in ("cpu", "cuda"):
        raise EmtileError(f"device={device!r} is not supported: choose auto, cpu or cuda")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise EmtileError(f"device={device!r} does not exist: this machine has {n} CUDA "
                          f"device{'s' if n != 1 else ''} (cuda:0 to cuda:{n - 1})")
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


def native_bf16(device):
    """Whether ``device`` runs bfloat16 convolutions natively (fast): a CUDA device with bf16, or
    a CPU with AVX512-BF16 or AMX (on other CPUs bf16 autocast is emulated and slower than
    float32)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                      "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def check_amp(amp):
    """EmtileError unless ``amp`` is a mode :func:`resolve_amp` knows."""
    if amp not in (None, True, False) and amp not in AMP_CHOICES:
        raise EmtileError(f"amp={amp!r} is not supported: choose one of "
                          f"{', '.join(AMP_CHOICES)}")


def resolve_amp(amp, device):
    """The :data:`AMPS` mode that ``amp`` means on ``device`` (the same in every command).

    ``"off"``, None or False: float32. ``"bf16"``, ``"fp16"``: that autocast dtype. ``"auto"``:
    bfloat16 where the device runs it natively (:func:`native_bf16`), float16 on a CUDA device
    without bfloat16, else off. True: on, as :func:`default_amp` (bfloat16, also where it is
    emulated).

    Examples
    --------
    >>> import torch
    >>> resolve_amp("off", torch.device("cpu")), resolve_amp("fp16", torch.device("cpu"))
    (None, 'fp16')
    """
    check_amp(amp)
    if amp in (None, False, "off"):
        return None
    if amp in ("bf16", "fp16"):
        return amp
    if amp is True:
        return default_amp(device)
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else None


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
