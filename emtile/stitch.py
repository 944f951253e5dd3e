"""Numba kernels that stitch overlapping output tiles into a block buffer.

The predictor keeps, per block, an accumulator ``acc`` of shape ``(C, *S)`` and a weight sum
``wsum`` of shape ``S`` (both float32). Every output tile is added with :func:`accumulate`
(``acc += weight * tile``, ``wsum += weight`` over the tile's footprint, clipped to the buffer),
and the block is divided once with :func:`normalize` when all its tiles are in. The weights come
from :func:`weight_window`: all ones when tiles do not overlap (valid-convolution tiling is exact),
or a linear / cosine / gaussian window for blending.

Without blending, tiles own disjoint windows (weight 1 on their own pixels, 0 on the rest), so
a pixel's sum is its owner's value: :func:`place_owned` quantises each tile straight into a uint8
block (no float32 buffers, no second pass), giving the bytes of :func:`accumulate` and
:func:`normalize`, NaN and all (:func:`finish_owned`).

Everything is N-dimensional with 1 to 3 spatial axes: 2-D tiles ``(C, Y, X)`` today, 3-D tiles
``(C, Z, Y, X)`` later. Internally every array is viewed as 3-D spatial (a leading axis of length 1
is inserted, never a copy), so one set of parallel kernels serves all cases; they run over the
buffer's rows with ``prange`` and never loop over pixels in Python.

Numba has no float16 type on the CPU: float16 tiles are cast to float32 with NumPy (one tile, in
cache) and float16 output is produced in the kernel by rounding float32 bits to half precision
(round to nearest even, as NumPy's ``astype(np.float16)``).
"""

import numpy as np
from numba import njit, prange

from emtile._errors import EmtileError

BLENDS = ("none", "linear", "cosine", "gaussian")
OUT_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32))
MAX_SPATIAL = 3
# smallest value of a 1-D gaussian profile: every pixel keeps a positive weight, so a pixel covered
# by any tile is defined (nnU-Net and MONAI clamp their importance maps the same way)
GAUSSIAN_FLOOR = 1e-4


# --------------------------------------------------------------------------------------------
# weights


def _profile(n, blend, overlap):
    """1-D weight profile of length ``n`` (float64)."""
    if blend == "none":
        return np.ones(n)
    if blend == "gaussian":
        sigma = n / 8.0
        x = np.arange(n) - (n - 1) / 2.0  # exact half-integers: the profile is exactly symmetric
        p = np.exp(-0.5 * (x / sigma) ** 2)
        return np.maximum(p / p.max(), GAUSSIAN_FLOOR)
    p = np.ones(n)
    if overlap:
        t = np.arange(1, overlap + 1) / (overlap + 1.0)  # in (0, 1): never exactly 0 or 1
        ramp = t if blend == "linear" else 0.5 - 0.5 * np.cos(np.pi * t)
        p[:overlap] = ramp
        p[n - overlap:] = ramp[::-1]
    return p


def weight_window(shape, *, blend="none", overlap=0):
    """Blending weights for one output tile: the outer product of 1-D profiles.

    Parameters
    ----------
    shape : tuple of int
        Spatial tile shape, e.g. ``(388, 388)`` or ``(Z, Y, X)``.
    blend : {"none", "linear", "cosine", "gaussian"}
        ``"none"``: all ones (non-overlapping valid tiles). ``"linear"`` / ``"cosine"``: ramp from
        near 0 up to 1 over ``overlap`` pixels at each edge, 1 inside; the ramps of two tiles that
        overlap by ``overlap`` pixels sum to 1. ``"gaussian"``: ``exp(-x²/2σ²)`` with
        ``σ = size / 8`` per axis (as nnU-Net and MONAI), scaled to a maximum of 1 and floored at
        ``GAUSSIAN_FLOOR``; it ignores ``overlap``.
    overlap : int or tuple of int
        Ramp width in pixels, one value for every axis or one per axis. For linear and cosine,
        ``0 <= overlap <= (size - 1) // 2``, so at least the centre pixel has weight 1.

    Returns
    -------
    ndarray, shape ``shape``, float32
        Strictly positive weights, symmetric along every axis, maximum 1.

    Examples
    --------
    >>> weight_window((5,), blend="linear", overlap=2)
    array([0.33333334, 0.6666667 , 1.        , 0.6666667 , 0.33333334],
          dtype=float32)
    """
    if blend not in BLENDS:
        raise EmtileError(f"blend={blend!r} is not supported: choose one of {', '.join(BLENDS)}")
    shape = _int_tuple("shape", shape)
    if not shape or any(n < 1 for n in shape):
        raise EmtileError(f"shape={shape} is not a tile shape: expected one or more positive sizes")
    if isinstance(overlap, (int, np.integer)) and not isinstance(overlap, bool):
        overlap = (int(overlap),) * len(shape)
    overlap = _int_tuple("overlap", overlap)
    if len(overlap) != len(shape):
        raise EmtileError(f"overlap={overlap} has {len(overlap)} values for a {len(shape)}-D shape "
                          f"{shape}: give one value or one per axis")
    for n, o in zip(shape, overlap):
        if o < 0:
            raise EmtileError(f"overlap={o} is negative: expected 0 or more pixels")
        if blend in ("linear", "cosine") and 2 * o >= n:
            raise EmtileError(f"overlap={o} does not fit a {blend} window of size {n}: expected "
                              f"0 <= overlap <= {(n - 1) // 2}")
    w = np.ones((), dtype=np.float64)
    for n, o in zip(shape, overlap):
        w = np.multiply.outer(w, _profile(n, blend, o))
    return w.astype(np.float32)


def _int_tuple(name, value):
    try:
        out = tuple(value)
    except TypeError:
        raise EmtileError(f"{name}={value!r} is not a tuple of integers") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in out):
        raise EmtileError(f"{name}={value!r} is not a tuple of integers")
    return tuple(int(v) for v in out)


# --------------------------------------------------------------------------------------------
# kernels (3-D spatial; 1-D and 2-D inputs arrive as views with leading length-1 axes)


@njit(parallel=True, fastmath=False, cache=True)
def _accumulate3(acc, wsum, tile, weight, bz, by, bx, tz, ty, tx, nz, ny, nx):
    channels = acc.shape[0]
    for r in prange(nz * ny):
        z = r // ny
        y = r - z * ny
        wrow = weight[tz + z, ty + y, tx:tx + nx]
        srow = wsum[bz + z, by + y, bx:bx + nx]
        arow = acc[0, bz + z, by + y, bx:bx + nx]
        trow = tile[0, tz + z, ty + y, tx:tx + nx]
        for i in range(nx):
            w = wrow[i]
            srow[i] += w
            arow[i] += w * trow[i]
        for c in range(1, channels):
            arow = acc[c, bz + z, by + y, bx:bx + nx]
            trow = tile[c, tz + z, ty + y, tx:tx + nx]
            for i in range(nx):
                arow[i] += wrow[i] * trow[i]


@njit(parallel=True, fastmath=False, cache=True)
def _normalize3_f32(acc, wsum, out):
    channels, nz, ny, nx = acc.shape
    for r in prange(nz * ny):
        z = r // ny
        y = r - z * ny
        srow = wsum[z, y]
        for c in range(channels):
            arow = acc[c, z, y]
            orow = out[c, z, y]
            for i in range(nx):
                s = srow[i]
                q = arow[i] / s  # computed unconditionally (no trap): the select vectorises
                orow[i] = q if s > 0 else np.float32(0)


@njit(parallel=True, fastmath=False, cache=True)
def _normalize3_u8(acc, wsum, out):
    channels, nz, ny, nx = acc.shape
    for r in prange(nz * ny):
        z = r // ny
        y = r - z * ny
        srow = wsum[z, y]
        for c in range(channels):
            arow = acc[c, z, y]
            orow = out[c, z, y]
            for i in range(nx):
                s = srow[i]
                p = arow[i] / s
                if not (s > 0 and p > 0):  # uncovered pixels and NaN -> 0
                    p = np.float32(0)
                elif p > 1:
                    p = np.float32(1)
                orow[i] = np.uint8(np.rint(p * np.float32(255)))


@njit(parallel=True, fastmath=False, cache=True)
def _place3_u8(out, nan, tile, bz, by, bx, tz, ty, tx, nz, ny, nx, oz, oy, ox):
    channels = out.shape[0]
    for r in prange(nz * ny):
        z = r // ny
        y = r - z * ny
        owned = min(nx, max(0, ox - tx)) if tz + z < oz and ty + y < oy else 0
        for c in range(channels):
            orow = out[c, bz + z, by + y, bx:bx + nx]
            frow = nan[c, bz + z, by + y, bx:bx + nx]
            trow = tile[c, tz + z, ty + y, tx:tx + nx]
            for i in range(owned):  # weight 1
                p = trow[i]
                if not p > 0:  # NaN -> 0, as _normalize3_u8
                    p = np.float32(0)
                elif p > 1:
                    p = np.float32(1)
                orow[i] = np.uint8(np.rint(p * np.float32(255)))
            for i in range(owned, nx):  # weight 0: 0 * NaN or inf makes the sum NaN (-> 0)
                p = trow[i]
                if not p - p == 0:
                    frow[i] = 1


@njit(inline="always")
def _f32_bits_to_f16_bits(x, v):
    """float32 bits ``x`` (value ``v``) -> float16 bits, round to nearest even."""
    sign = (x >> np.uint32(16)) & np.uint32(0x8000)
    a = x & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf or NaN (keep NaN quiet)
        h = np.uint32(0x7C00) | (np.uint32(0x200) if a > np.uint32(0x7F800000) else np.uint32(0))
    elif a >= np.uint32(0x477FF000):  # rounds past 65504: inf
        h = np.uint32(0x7C00)
    elif a >= np.uint32(0x38800000):  # normal half: rebias exponent (127 -> 15), round mantissa
        a = a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))
        h = (a - np.uint32(0x38000000)) >> np.uint32(13)
    else:  # subnormal half (or zero): |v| * 2**24 is exact; rint rounds half to even
        h = np.uint32(np.rint(abs(v) * np.float32(16777216.0)))
    return np.uint16(sign | h)


@njit(parallel=True, fastmath=False, cache=True)
def _normalize3_f16(acc, wsum, out_bits):
    channels, nz, ny, nx = acc.shape
    for r in prange(nz * ny):
        z = r // ny
        y = r - z * ny
        srow = wsum[z, y]
        tmp = np.empty(nx, dtype=np.float32)
        bits = tmp.view(np.uint32)
        for c in range(channels):
            arow = acc[c, z, y]
            orow = out_bits[c, z, y]
            for i in range(nx):
                s = srow[i]
                q = arow[i] / s
                tmp[i] = q if s > 0 else np.float32(0)
            for i in range(nx):
                orow[i] = _f32_bits_to_f16_bits(bits[i], tmp[i])


# --------------------------------------------------------------------------------------------
# public functions


def _as3(a, channel_axis):
    """View ``a`` with 3 spatial axes by inserting length-1 axes (after the channel axis)."""
    missing = MAX_SPATIAL - (a.ndim - channel_axis)
    return a[(slice(None),) * channel_axis + (None,) * missing]


def _check_array(name, a, dtypes, ndims, *, writable=False):
    if not isinstance(a, np.ndarray):
        raise EmtileError(f"{name} must be a NumPy array, got {type(a).__name__}")
    if a.dtype not in dtypes:
        allowed = " or ".join(np.dtype(d).name for d in dtypes)
        raise EmtileError(f"{name} has dtype {a.dtype}; expected {allowed}")
    if a.ndim not in ndims:
        raise EmtileError(f"{name} has {a.ndim} dimensions (shape {a.shape}); expected "
                          f"{' or '.join(map(str, ndims))}")
    if writable and not a.flags.writeable:
        raise EmtileError(f"{name} is read-only; it must be a writable array")


_F32 = (np.dtype(np.float32),)


def accumulate(acc, wsum, tile, weight, origin):
    """Add one weighted tile into the buffers, in place: ``acc += weight * tile``, ``wsum += weight``.

    Parameters
    ----------
    acc : ndarray, shape (C, *S), float32
        Weighted sum of tiles over the block; ``S`` has 1 to 3 axes (``(Y, X)`` or ``(Z, Y, X)``).
    wsum : ndarray, shape S, float32
        Sum of weights over the block.
    tile : ndarray, shape (C, *T), float32 or float16
        One output tile (float16 is cast to float32 first).
    weight : ndarray, shape T, float32
        Its weights, e.g. from :func:`weight_window`.
    origin : tuple of int
        Position of ``tile[:, 0, 0]`` in the buffer. Parts of the tile outside the buffer (a
        negative origin, or an overhang past the end) are skipped.

    Examples
    --------
    >>> acc = np.zeros((1, 2, 3), np.float32); wsum = np.zeros((2, 3), np.float32)
    >>> accumulate(acc, wsum, np.ones((1, 2, 2), np.float32), np.ones((2, 2), np.float32), (1, 2))
    >>> wsum
    array([[0., 0., 0.],
           [0., 0., 1.]], dtype=float32)
    """
    _check_array("acc", acc, _F32, range(2, MAX_SPATIAL + 2), writable=True)
    spatial = acc.ndim - 1
    _check_array("wsum", wsum, _F32, (spatial,), writable=True)
    if wsum.shape != acc.shape[1:]:
        raise EmtileError(f"wsum has shape {wsum.shape}; expected acc's spatial shape {acc.shape[1:]}")
    _check_array("tile", tile, (np.dtype(np.float32), np.dtype(np.float16)), (acc.ndim,))
    if tile.shape[0] != acc.shape[0]:
        raise EmtileError(f"tile has {tile.shape[0]} channels (shape {tile.shape}); acc has "
                          f"{acc.shape[0]}")
    _check_array("weight", weight, _F32, (spatial,))
    if weight.shape != tile.shape[1:]:
        raise EmtileError(f"weight has shape {weight.shape}; expected the tile's spatial shape "
                          f"{tile.shape[1:]}")
    origin = _int_tuple("origin", origin)
    if len(origin) != spatial:
        raise EmtileError(f"origin={origin} has {len(origin)} values; expected {spatial} (one per "
                          f"spatial axis)")

    # clip the tile's footprint to the buffer
    b0, t0, n = [0] * MAX_SPATIAL, [0] * MAX_SPATIAL, [1] * MAX_SPATIAL
    pad = MAX_SPATIAL - spatial
    for ax, (o, size, tsize) in enumerate(zip(origin, acc.shape[1:], tile.shape[1:])):
        lo, hi = max(o, 0), min(o + tsize, size)
        if hi <= lo:
            return  # the tile lies entirely outside the buffer
        b0[pad + ax], t0[pad + ax], n[pad + ax] = lo, lo - o, hi - lo
    if tile.dtype != np.float32:
        tile = tile.astype(np.float32)
    _accumulate3(_as3(acc, 1), _as3(wsum, 0), _as3(tile, 1), _as3(weight, 0), *b0, *t0, *n)


def place_owned(out, nan, tile, origin, owned):
    """Quantise a tile into a uint8 block where it owns the pixels: the bytes that
    :func:`accumulate` with 0/1 weights and :func:`normalize` to uint8 give, in one pass.

    For grids whose tiles own disjoint windows (no blending): the tile's weight is 1 on
    ``tile[..., :owned[0], :owned[1], ...]`` and 0 elsewhere, so a pixel's sum is its owner's
    probability exactly, unless a tile that weights it 0 holds NaN or inf there (``0 * NaN``): such
    pixels are flagged in ``nan``, and :func:`finish_owned` sets them to 0 as
    :func:`normalize` does.

    Parameters
    ----------
    out : ndarray, shape (C, *S), uint8
    nan : ndarray, shape (C, *S), uint8
        Flags of NaN under weight 0 (zeros to start).
    tile : ndarray, shape (C, *T), float32
    origin : tuple of int
        Where the tile's first pixel lies in the block (may be negative).
    owned : tuple of int
        Per spatial axis, how many leading pixels of the tile have weight 1.
    """
    _check_array("out", out, (np.dtype(np.uint8),), range(2, MAX_SPATIAL + 2), writable=True)
    spatial = out.ndim - 1
    b0, t0, n = [0] * MAX_SPATIAL, [0] * MAX_SPATIAL, [1] * MAX_SPATIAL
    own = [1] * MAX_SPATIAL
    pad = MAX_SPATIAL - spatial
    for ax, (o, size, tsize) in enumerate(zip(origin, out.shape[1:], tile.shape[1:])):
        lo, hi = max(o, 0), min(o + tsize, size)
        if hi <= lo:
            return
        b0[pad + ax], t0[pad + ax], n[pad + ax] = lo, lo - o, hi - lo
        own[pad + ax] = owned[ax]
    if tile.dtype != np.float32:
        tile = tile.astype(np.float32)
    _place3_u8(_as3(out, 1), _as3(nan, 1), _as3(tile, 1), *b0, *t0, *n, *own)


def finish_owned(out, nan):
    """Set the pixels :func:`place_owned` flagged to 0; returns ``out``."""
    if nan.any():
        out[nan != 0] = 0
    return out


def normalize(acc, wsum, *, out=None, dtype=None):
    """Divide the accumulated tiles by their weights, in one pass: ``acc / wsum`` where ``wsum > 0``.

    Parameters
    ----------
    acc : ndarray, shape (C, *S), float32
    wsum : ndarray, shape S, float32
        Pixels with ``wsum == 0`` (no tile covered them) become 0.
    out : ndarray, shape (C, *S), optional
        Written in place and returned; its dtype selects the output type.
    dtype : {uint8, float16, float32}, optional
        Output type when ``out`` is not given (default float32). uint8 stores
        ``rint(clip(p, 0, 1) * 255)`` (NaN -> 0); float16 rounds to nearest even.

    Returns
    -------
    ndarray, shape (C, *S)

    Examples
    --------
    >>> acc = np.array([[1.0, 3.0, 0.0]], np.float32); wsum = np.array([2.0, 3.0, 0.0], np.float32)
    >>> normalize(acc, wsum, dtype=np.uint8)
    array([[128, 255,   0]], dtype=uint8)
    """
    _check_array("acc", acc, _F32, range(2, MAX_SPATIAL + 2))
    _check_array("wsum", wsum, _F32, (acc.ndim - 1,))
    if wsum.shape != acc.shape[1:]:
        raise EmtileError(f"wsum has shape {wsum.shape}; expected acc's spatial shape {acc.shape[1:]}")
    if out is None:
        dtype = np.dtype(np.float32 if dtype is None else dtype)
        if dtype not in OUT_DTYPES:
            raise EmtileError(f"dtype={dtype} is not supported: choose uint8, float16 or float32")
        out = np.empty(acc.shape, dtype=dtype)
    else:
        _check_array("out", out, OUT_DTYPES, (acc.ndim,), writable=True)
        if out.shape != acc.shape:
            raise EmtileError(f"out has shape {out.shape}; expected acc's shape {acc.shape}")
        if dtype is not None and np.dtype(dtype) != out.dtype:
            raise EmtileError(f"dtype={np.dtype(dtype)} differs from out's dtype {out.dtype}; give "
                              f"one or the other")
    a3, s3 = _as3(acc, 1), _as3(wsum, 0)
    if out.dtype == np.uint8:
        _normalize3_u8(a3, s3, _as3(out, 1))
    elif out.dtype == np.float16:
        _normalize3_f16(a3, s3, _as3(out.view(np.uint16), 1))
    else:
        _normalize3_f32(a3, s3, _as3(out, 1))
    return out


def load_kernels():
    """Compile (or load from Numba's cache) every kernel now, on one pixel, rather than at the
    first tile: a process about to start DataLoader workers does this first, so that no worker
    dies while a kernel is being loaded (torch then raises inside Numba's loader, and the error
    is printed as an ignored exception with a traceback)."""
    acc = np.zeros((1, 1, 1), np.float32)
    wsum = np.zeros((1, 1), np.float32)
    accumulate(acc, wsum, np.ones((1, 1, 1), np.float32), np.ones((1, 1), np.float32), (0, 0))
    for dtype in OUT_DTYPES:
        normalize(acc, wsum, dtype=dtype)
    u8 = np.zeros((1, 1, 1), np.uint8)
    place_owned(u8, u8.copy(), np.ones((1, 1, 1), np.float32), (0, 0), (1, 1))
