"""Probability maps from any tool: the one rule that turns stored values into probabilities.

A map is read as cell-interior probabilities ``p`` in [0, 1], scaled by its dtype, whatever
wrote it (emtile predict, ilastik, a TIFF from Fiji, an HDF5 file, another tool's Zarr store)::

    uint8     v / 255        (255 = 1.0)
    uint16    v / 65535      (65535 = 1.0)
    float     v as it is     (16, 32 or 64 bits; every value must lie in [0, 1])

``invert=True`` reads a boundary map (1 = membrane) as ``1 - p``. Any other dtype (int16, a
label image's uint32...) is refused in one line, and so is a float value outside [0, 1] (NaN
too), named with where it was found; integer maps cannot be out of range. Nothing is read until
asked: :class:`ProbabilityMap` is a lazy view that checks, scales and inverts each read.
"""

import numpy as np

from emtile._errors import EmtileError

__all__ = ["open_probability_map", "ProbabilityMap", "map_scale", "MAP_DTYPES", "check_values"]

#: The dtypes a probability map may have, with the value that means 1.0 (None: floats, as is).
MAP_DTYPES = {np.dtype("uint8"): 255, np.dtype("uint16"): 65535, np.dtype("float16"): None,
              np.dtype("float32"): None, np.dtype("float64"): None}


def map_scale(dtype, display="pred"):
    """The stored value that means probability 1.0 for ``dtype`` (255, 65535, or None for
    floats); a one-line error for any other dtype.

    Examples
    --------
    >>> map_scale(np.uint16), map_scale("float32")
    (65535, None)
    """
    dtype = np.dtype(dtype)
    if dtype not in MAP_DTYPES:
        raise EmtileError(f"prediction {display!r} has dtype {dtype}: a probability map is uint8 "
                          f"(0-255 = 0..1), uint16 (0-65535 = 0..1) or float (16, 32 or 64 bits, "
                          f"values in [0, 1])")
    return MAP_DTYPES[dtype]


def check_values(data, display, where=""):
    """Refuse float values outside [0, 1] (or NaN) in ``data``, a block of a map, in one line
    naming the first value found and where; integer blocks always pass."""
    if data.dtype.kind != "f" or not data.size:
        return
    bad = ~((data >= 0) & (data <= 1))  # NaN is bad too
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        at = f" at {index} of {where}" if where else f" at {index}"
        raise EmtileError(f"prediction {display!r} holds {float(data[index])}{at}: a float "
                          f"probability map has values in [0, 1] (is it a raw image? 0-255 "
                          f"values are stored as uint8, 0-65535 as uint16)")


class ProbabilityMap:
    """A lazy view of a stored map as probabilities: ``shape``, ``ndim``, ``dtype`` (the
    result's) and basic-slicing ``__getitem__`` returning NumPy arrays in [0, 1].

    Parameters
    ----------
    array : array-like
        The stored map (anything with ``shape``, ``dtype`` and slicing).
    display : str
        How messages name it (its path, or ``"pred array"``).
    invert : bool
        A boundary map: read ``1 - p``.
    dtype : dtype
        Of what reads return: float32 (default) or float64 (exact comparisons of ``v / 65535``
        with decimal thresholds).
    native_uint8 : bool
        uint8 maps read as uint8 (``255 - v`` when inverted), exactly: for callers that
        handle ``v / 255`` themselves (the segmenter's kernels).
    """

    def __init__(self, array, display, *, invert=False, dtype=np.float32, native_uint8=False):
        self.array, self.display, self.invert = array, display, bool(invert)
        self.stored_dtype = np.dtype(array.dtype)
        self.scale = map_scale(self.stored_dtype, display)
        self.native = bool(native_uint8) and self.scale == 255
        self.dtype = self.stored_dtype if self.native else np.dtype(dtype)
        if self.dtype.kind != "f" and not self.native:
            raise EmtileError(f"dtype={self.dtype} is not valid: probabilities are read as "
                              f"float32 or float64")
        self.shape = tuple(int(s) for s in array.shape)
        self.ndim = len(self.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        data = np.asarray(self.array[key])
        if self.native:
            return np.uint8(255) - data if self.invert else data
        if self.scale is None:
            check_values(data, self.display, _where(key))
            p = data.astype(self.dtype, copy=False)
        else:
            p = data.astype(self.dtype) / self.dtype.type(self.scale)
        return (self.dtype.type(1) - p) if self.invert else p

    def describe(self):
        """How a report names what the map holds."""
        what = "boundary map, read as 1 - p" if self.invert else "cell-interior probability"
        if self.scale is None:
            return f"{what} ({self.stored_dtype}, 0-1)"
        return f"{what} ({self.stored_dtype}, 0-{self.scale} = 0..1)"


def _where(key):
    """A read's box, as messages name it."""
    if not isinstance(key, tuple):
        key = (key,)
    parts = []
    for k in key:
        if isinstance(k, slice):
            parts.append(f"{'' if k.start is None else k.start}:{'' if k.stop is None else k.stop}")
        else:
            parts.append(str(k))
    return "[" + ", ".join(parts) + "]"


def open_probability_map(source, *, invert=False, name="pred", dtype=np.float32,
                         native_uint8=False):
    """Open a probability map from any tool, lazily: a path (TIFF, HDF5, Zarr / OME-Zarr, with
    or without emtile's metadata) or an array.

    Parameters
    ----------
    source : str, Path or array-like, shape (Z, Y, X) or (Y, X)
        uint8 (``v / 255``), uint16 (``v / 65535``) or float in [0, 1] (checked as it is
        read: a value outside is one line naming it and where it lies).
    invert : bool
        The map is a boundary map (1 = membrane): read ``1 - p``.
    name : str
        The parameter's name, for messages about the source itself.
    dtype, native_uint8
        What reads return; see :class:`ProbabilityMap`.

    Returns
    -------
    ProbabilityMap

    Examples
    --------
    >>> m = open_probability_map(np.array([[0, 32768, 65535]], np.uint16), invert=True)
    >>> m[0].round(3).tolist(), m.dtype
    ([1.0, 0.5, 0.0], dtype('float32'))
    """
    from emtile.volume import open_input

    array, path = open_input(source, name=name)
    return ProbabilityMap(array, path if path is not None else f"{name} array", invert=invert,
                          dtype=dtype, native_uint8=native_uint8)
