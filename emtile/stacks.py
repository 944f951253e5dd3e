"""Stacks read slab by slab: which slices (``"25:30"``, ``[25, 27]``), in how many slabs, checked
as binary labels or as instance ids, and written behind the reader.

:class:`Stack` views a 2-D, 3-D or single-channel 4-D array as ``(Z, Y, X)``;
:func:`resolve_slices` checks a slice selection against it (every command's ``slices=``);
:func:`slab_depth` sizes a slab to about :data:`SLAB_BYTES`; :class:`LabelChecker` checks that
labels are binary as the slabs go by; :func:`check_id_values`, :func:`smallest_unsigned` and
:class:`IdCounter` check instance ids (whole numbers >= 0, 0 = unlabelled), choose the type that
holds them and count them (convert's ``ids=True``); :class:`WriterThread` writes (or computes) one item while
the caller reads the next (convert, predict).
"""

import queue
import threading

import numpy as np

from emtile._errors import EmtileError
from emtile.volume import open_input

__all__ = ["Stack", "open_stack", "resolve_slices", "parse_slices", "slice_runs", "slab_depth",
           "SLAB_BYTES", "LabelChecker", "check_labels", "check_id_values", "smallest_unsigned",
           "IdCounter", "WriterThread"]

SLAB_BYTES = 64 * 2**20  # how much one slab read holds (convert, info, evaluate)


class Stack:
    """A ``(Z, Y, X)`` view of a 2-D, 3-D or single-channel 4-D array, read slab by slab.

    Parameters
    ----------
    array : array-like, shape (Y, X), (Z, Y, X) or (1, Z, Y, X)
    display : str
        How messages name it (its path, or e.g. ``"labels array"``).
    """

    def __init__(self, array, display):
        self.array = array
        self.display = display
        shape = tuple(int(s) for s in array.shape)
        if len(shape) == 2:
            self.lead = "2d"
            shape = (1,) + shape
        elif len(shape) == 3:
            self.lead = ""
        elif len(shape) == 4 and shape[0] == 1:
            self.lead = "c"
            shape = shape[1:]
        else:
            raise EmtileError(f"{display} has shape {tuple(array.shape)}: expected (Z, Y, X), "
                              "(Y, X) or one channel (1, Z, Y, X)")
        self.shape = shape
        self.dtype = np.dtype(array.dtype)

    def read(self, z0, z1, yx=(slice(None), slice(None))):
        """Slices ``z0:z1`` (cropped to ``yx``) as a NumPy array, shape (z1 - z0, Y', X')."""
        if self.lead == "2d":
            return np.asarray(self.array[yx])[None]
        if self.lead == "c":
            return np.asarray(self.array[(0, slice(z0, z1)) + tuple(yx)])
        return np.asarray(self.array[(slice(z0, z1),) + tuple(yx)])


def open_stack(source, *, name):
    """A path or an array (see :func:`open_input`) as a :class:`Stack` named by its path or
    ``"<name> array"``."""
    array, path = open_input(source, name=name)
    return Stack(array, path if path is not None else f"{name} array")


def resolve_slices(slices, depth, *, name="slices"):
    """Slice indices as a sorted list of ints, checked against a stack of ``depth`` slices.

    Parameters
    ----------
    slices : None, int, slice, sequence of int or str
        None: all; ``3``; ``slice(25, 30)`` (open ends allowed, no step); ``[25, 27]``; or the
        CLI's text, ``"25:30"``, ``"25,27"``.
    depth : int
        Number of slices in the volume.
    name : str
        The parameter's name, for error messages.

    Examples
    --------
    >>> resolve_slices(slice(25, 30), 30)
    [25, 26, 27, 28, 29]
    >>> resolve_slices([4, 1, 1], 5)
    [1, 4]
    >>> resolve_slices("25:30", 30), resolve_slices("3,1", 5)
    ([25, 26, 27, 28, 29], [1, 3])
    """
    def outside(text):
        return EmtileError(f"{name}={text} is outside the volume, which has {depth} slice"
                           f"{'s' if depth != 1 else ''} (0 to {depth - 1})")

    if slices is None:
        return list(range(depth))
    if isinstance(slices, str):  # the CLI's spelling: "25:30", "25,27", "3"
        slices = parse_slices(slices, name)
    if isinstance(slices, slice):
        start = 0 if slices.start is None else int(slices.start)
        stop = depth if slices.stop is None else int(slices.stop)
        if slices.step not in (None, 1):
            raise EmtileError(f"{name}={start}:{stop}:{slices.step} has a step, which is not "
                              "supported: give a range such as 25:30 or a list such as 25,27")
        if not 0 <= start < stop <= depth:
            raise outside(f"{'' if slices.start is None else start}:"
                          f"{'' if slices.stop is None else stop}")
        return list(range(start, stop))
    if isinstance(slices, (int, np.integer)):
        slices = [slices]
    out = sorted({int(z) for z in slices})
    if not out:
        raise EmtileError(f"{name} is empty: give at least one slice index in 0..{depth - 1}")
    wrong = [z for z in out if not 0 <= z < depth]
    if wrong:
        raise outside(",".join(str(z) for z in wrong))
    return out


def parse_slices(text, name="slices"):
    """``"25:30"`` -> ``slice(25, 30)``; ``"25,27"`` -> ``[25, 27]``; a one-line error otherwise."""
    try:
        if ":" in text:
            parts = [p.strip() for p in text.split(":")]
            if len(parts) != 2:
                raise ValueError
            return slice(*(int(p) if p else None for p in parts))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise EmtileError(f"{name}={text!r} is not a slice range like 25:30 or a list like "
                          f"25,27") from None


def slice_runs(zs, max_len=None):
    """Sorted slice indices -> contiguous ``(start, stop)`` runs, each at most ``max_len`` long.

    Examples
    --------
    >>> slice_runs([0, 1, 2, 5, 6, 9], max_len=2)
    [(0, 2), (2, 3), (5, 7), (9, 10)]
    """
    runs = []
    for z in zs:
        if runs and runs[-1][1] == z and (max_len is None or runs[-1][1] - runs[-1][0] < max_len):
            runs[-1][1] = z + 1
        else:
            runs.append([z, z + 1])
    return [tuple(r) for r in runs]


def slab_depth(shape, itemsize, *, chunk_z=1, budget=None):
    """Slices per slab of a ``(Z, Y, X)`` stack: whole z-chunks, about ``budget`` bytes (default
    :data:`SLAB_BYTES`), at most Z.

    ``itemsize`` is the bytes per pixel the reader holds (e.g. 4 where it works in float32).
    """
    budget = SLAB_BYTES if budget is None else budget
    per_slice = int(np.prod(shape[1:])) * int(itemsize)
    n = max(1, budget // max(per_slice, 1) // chunk_z) * chunk_z
    return min(n, max(shape[0], 1))

# --------------------------------------------------------------------------- binary labels


class LabelChecker:
    """Checks that labels are binary, slab after slab, and returns their foreground.

    Labels are binary when every value seen so far is in {0, 1}, or every one in {0, 255}, or the
    data are bool; non-zero is the cell interior. The first slab that breaks this raises one
    :class:`EmtileError` naming where, the values seen and how to binarise them.
    """

    def __init__(self):
        self.values = set()

    def foreground(self, data, where):
        """``data != 0`` (bool) after checking ``data``'s values; ``where`` names it in errors."""
        data = np.asarray(data)
        if data.dtype == np.bool_:
            return data
        if data.dtype == np.uint8:  # a histogram is much cheaper than sorting a large slab
            values = np.flatnonzero(np.bincount(data.ravel(), minlength=256))
        else:
            values = np.unique(data)
        self.values.update(values.tolist())
        if not (self.values <= {0, 1} or self.values <= {0, 255}):
            shown = sorted(self.values)
            listing = ", ".join(f"{v:g}" for v in shown[:8]) + (", ..." if len(shown) > 8 else "")
            found = f"{len(shown)} value{'s' if len(shown) > 1 else ''}"
            raise EmtileError(
                f"labels are not binary in {where}: found {found}: {listing}; expected 0/1 "
                "(1 = cell interior), 0/255 or bool; binarise them with threshold=T "
                "(convert(LABELS, 'labels.zarr', labels=True, threshold=T): values > T become 1)")
        return data != 0


def check_labels(labels, zs):
    """Check that ``labels[z]`` for ``z`` in ``zs`` are binary (see :class:`LabelChecker`),
    reading one slice at a time; return the fraction of foreground (non-zero) pixels."""
    checker, ones, total = LabelChecker(), 0, 0
    for z in zs:
        fg = checker.foreground(labels[z], f"slice {z}")
        ones += int(np.count_nonzero(fg))
        total += fg.size
    return ones / max(total, 1)


# --------------------------------------------------------------------------- instance ids


def _value_text(v):
    """A value as an error message shows it: ``-3``, ``2.5``, ``nan``."""
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def check_id_values(data, where):
    """``(min, max)`` of a slab of instance ids (0 for an empty one), after checking that every
    value is a whole number >= 0 (0 = unlabelled) that a uint64 holds; else one
    :class:`EmtileError` naming the offending value and ``where`` it is (e.g. ``"'x.tif'
    slices 0:8"``).

    Examples
    --------
    >>> check_id_values(np.array([0, 3, 7], np.int64), "here")
    (0, 7)
    >>> check_id_values(np.array([0.0, 2.5]), "'x.tif' slices 0:1")
    Traceback (most recent call last):
    ...
    emtile._errors.EmtileError: labels 'x.tif' slices 0:1 hold 2.5: instance ids must be whole numbers >= 0 (0 = unlabelled)
    """
    data = np.asarray(data)
    if not data.size:
        return 0, 0
    if data.dtype == np.bool_ or data.dtype.kind == "u":
        return int(data.min()), int(data.max())
    if data.dtype.kind not in "if":
        raise EmtileError(f"labels {where} have dtype {data.dtype}: instance ids must be whole "
                          "numbers >= 0 (0 = unlabelled)")

    def refuse(value, extra=""):
        return EmtileError(f"labels {where} hold {_value_text(value)}{extra}: instance ids must "
                           "be whole numbers >= 0 (0 = unlabelled)")

    lo = data.min()
    if lo < 0:
        raise refuse(lo)
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        bad |= np.floor(data, where=~bad, out=np.zeros_like(data)) != data
        if bad.any():
            raise refuse(data[bad].flat[0])
        hi = data.max()
        if hi >= 2.0 ** 64:
            raise refuse(hi, ", more than the largest uint64")
        return int(lo), int(hi)
    return int(lo), int(data.max())


def smallest_unsigned(max_id):
    """The smallest unsigned integer dtype that holds ``max_id``.

    >>> smallest_unsigned(255), smallest_unsigned(256), smallest_unsigned(2**40)
    (dtype('uint8'), dtype('uint16'), dtype('uint64'))
    """
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_id <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise EmtileError(f"max id {max_id} does not fit in uint64")


class IdCounter:
    """The largest id and the number of distinct non-zero ids of a volume, slab after slab.

    Counting stays cheap (one ``bincount`` per slab) while every id is at most :attr:`COUNTED`;
    past that only the largest id is kept (``count`` is None).
    """

    COUNTED = 2**20

    def __init__(self):
        self.max_id = 0
        self._seen = np.zeros(0, bool)

    def update(self, slab):
        if not slab.size:
            return
        top = int(slab.max())
        self.max_id = max(self.max_id, top)
        if self._seen is None or self.max_id > self.COUNTED:
            self._seen = None
            return
        present = np.bincount(slab.ravel().astype(np.intp, copy=False),
                              minlength=self.max_id + 1) > 0
        present[: self._seen.size] |= self._seen
        self._seen = present

    @property
    def count(self):
        """Distinct non-zero ids seen, or None when they ran past :attr:`COUNTED`."""
        return None if self._seen is None else int(np.count_nonzero(self._seen[1:]))


# --------------------------------------------------------------------------- the writer thread


class WriterThread:
    """Runs ``work(*item)`` on a background thread for every item :meth:`put` hands over, in order,
    so the caller reads (or computes) the next item meanwhile; at most ``depth`` items wait.

    The first exception in ``work`` stops the work (later items are skipped) and is raised on
    the caller's thread by the next :meth:`put` / :meth:`check`, or by :meth:`close`. Used as a
    context manager, it closes (waiting for every item) on success and aborts on an exception.

    Parameters
    ----------
    work : callable
    depth : int
        Items that may wait in the queue.
    initializer : callable, optional
        Called once on the thread before the first item (e.g. a thread-local setting).
    """

    def __init__(self, work, *, depth=2, initializer=None, name="emtile-writer"):
        self.work, self.initializer, self.error = work, initializer, None
        self._skip = False
        self.queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self):
        if self.initializer is not None:
            self.initializer()
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None and not self._skip:
                try:
                    self.work(*item)
                except BaseException as exc:  # re-raised on the caller's thread
                    self.error = exc

    def check(self):
        """Raise the work's first error, if there was one."""
        if self.error is not None:
            raise self.error

    def put(self, *item):
        """Queue ``item`` (waits while ``depth`` items are queued)."""
        self.check()
        self.queue.put(item)

    def close(self):
        """Wait until every queued item is done; raise the work's first error."""
        self.queue.put(None)
        self.thread.join()
        self.check()

    def abort(self):
        """Skip the queued items, wait for the one in progress; never raises."""
        self._skip = True
        self.queue.put(None)
        self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None:
            self.close()
        else:
            self.abort()
