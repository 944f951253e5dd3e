"""Keep freed memory in the process for the next block's arrays (``emtile segment``).

A segment pass allocates the same large temporaries block after block (tens of MB each). By
default two things make every one of them fresh memory from the kernel, zeroed page by page:

- glibc returns a freed block above its mmap threshold (or at the heap's top, beyond its trim
  threshold) to the kernel at once, so the next block's array is mapped anew;
- NumPy asks for transparent huge pages on arrays of 4 MB and more (``madvise``), so each fault
  zeroes 2 MB, touched or not.

Measured on the 2-core development VM (``emtile segment`` of an 8 x 2048² map in a fresh
process, ``perf``): a quarter of all CPU time was the kernel zeroing pages, 3.4 s of system time
in a 4.4 s run; with the settings below the run took 3.0-3.2 s with about 1 s of system time.

:func:`keep_freed_memory` sets them once per process (the segment driver, or a Dask worker at
its first segment task): glibc keeps up to 1 GiB of freed memory, maps only allocations above
256 MiB, and uses one arena (with one per thread, each thread kept its own freed memory and the
peak grew with the number of blocks: 1.13 GiB for a 0.4 GB map, 1.41 GiB for 4 GB; with one,
1.27 and 1.31 GiB, against 1.14 and 1.21 GiB before any setting), and NumPy stops asking for
huge pages. A process keeps its resident size near its peak until it exits. Other platforms and
C libraries are left as they are; ``EMTILE_ALLOCATOR=default`` turns it off. Predict and convert
do not set it: neither ran faster with it (``emtile bench --pipeline``, ``bench_convert.py``).
"""

import ctypes
import os
import sys
import threading

__all__ = ["keep_freed_memory", "ENV"]

ENV = "EMTILE_ALLOCATOR"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
_KEEP = 1 << 30
_MAP_ABOVE = 256 << 20
_lock = threading.Lock()
_done = False


def keep_freed_memory():
    """Set this process's allocator as the module docstring says (once; later calls return at
    once). Returns True when it changed something."""
    global _done
    if _done:
        return False
    with _lock:
        if _done:
            return False
        _done = True
        if os.environ.get(ENV, "").lower() == "default":
            return False
        changed = _no_numpy_hugepages()
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
                ok = libc.mallopt(_M_MMAP_THRESHOLD, _MAP_ABOVE) == 1 and ok
                changed = (libc.mallopt(_M_TRIM_THRESHOLD, _KEEP) == 1 and ok) or changed
            except (OSError, AttributeError):  # not glibc (musl): nothing to set
                pass
        return changed


def _no_numpy_hugepages():
    import numpy as np

    core = getattr(np, "_core", None) or getattr(np, "core", None)
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if setter is None:
        return False
    setter(False)
    return True
