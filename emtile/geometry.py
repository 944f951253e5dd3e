"""Pure arithmetic of tiled valid-convolution inference: sizes, the global tile grid, the block plan.

A valid-convolution U-Net maps an input tile of ``n`` pixels per axis to ``n - 2 * halo`` output
pixels, and only some ``n`` are valid (every feature map must be a multiple of the factor of each
max-pool). :class:`ShapeMap` holds that arithmetic, per axis: a 3-D U-Net for serial sections
down-samples z less than y and x (``factors=((1, 2, 2), (2, 2, 2))``, :func:`default_factors`) and
convolves less across sections (``kernels``), so each axis has its own valid sizes, halo and
alignment. :class:`emtile.unet.UNet` delegates to it, so tests and planners can use it without
torch.

The **tile grid** (:func:`tile_grid`) covers a region of a volume with output tiles whose origins
lie on multiples of the alignment (the product of an axis's factors: ``2 ** depth`` for the
paper's 2-D U-Net) in *volume* coordinates. Max-pooling is shift-equivariant for
such shifts only, so every tile computes exactly what one forward pass over the whole
(mirror-padded) volume computes at the same pixels, and a region's result is the crop of the
whole volume's result. Context outside the volume is mirrored (NumPy ``"reflect"``) per tile at
read time (:func:`read_window`); the volume is never padded as a whole.

The **block plan** (:func:`block_plan`) groups the grid into blocks of whole output chunks. A block
is the unit of work, of writing and of resumption: it owns its chunks, and it lists every tile
whose output reaches into it. Local, multi-worker and distributed prediction all iterate over the
same plan, so the output does not depend on how the work is split.

Every function is N-dimensional: a 2-D model over a ``(Z, Y, X)`` stack is a grid whose tiles are
one slice deep (tile 1, halo 0, alignment 1 along Z).

Boxes of arrays: :func:`center_crop` (the centre of the last axes, a view: the U-Net's skip
connections, training patches) and :class:`Window` (a box of an array as a lazy array of its own).
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np

from emtile._errors import EmtileError

__all__ = ["ShapeMap", "default_factors", "default_kernels", "check_factors", "check_kernels",
           "Grid", "Block", "BlockPlan", "tile_grid", "block_plan", "choose_tile",
           "normalize_roi", "reflect_index", "read_window", "per_axis", "tile_costs",
           "center_crop", "Window", "LazyArray", "check_levels"]


# --------------------------------------------------------------------------- shape map

AXIS_NAMES = {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x")}
MAX_FACTOR = 4  # down-sampling per level per axis (a 4x4 max-pool is already coarse)
MAX_KERNEL = 7


def _axis_names(ndim):
    return AXIS_NAMES.get(ndim, tuple(f"axis {a}" for a in range(ndim)))


def _fmt_levels(levels):
    """``((1, 2, 2), (2, 2, 2))`` as the user would type it (ints, no spaces lost)."""
    return "(" + ", ".join("(" + ", ".join(str(v) for v in lv) + ")" for lv in levels) + ")"


def _per_level(value, count, ndim, name, what):
    """``value``: one entry per level, each an int (every axis) or ``ndim`` ints -> tuples."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise EmtileError(f"{name}={value!r} must give {count} {what}, one per level, each an "
                          f"integer or {ndim} integers")
    if len(value) != count:
        raise EmtileError(f"{name}={value!r} has {len(value)} entries; expected {count} ({what})")
    out = []
    for entry in value:
        if isinstance(entry, bool):
            entry = None  # a bool is not a size
        if isinstance(entry, (int, np.integer)):
            out.append((int(entry),) * ndim)
            continue
        try:
            sizes = tuple(entry)
        except TypeError:
            sizes = ()
        if len(sizes) != ndim or not all(isinstance(v, (int, np.integer))
                                         and not isinstance(v, bool) for v in sizes):
            raise EmtileError(f"{name}={value!r}: the entry {entry!r} is not an integer or "
                              f"{ndim} integers (one per axis, {''.join(_axis_names(ndim))})")
        out.append(tuple(int(v) for v in sizes))
    return tuple(out)


def check_factors(factors, depth, ndim):
    """Per-level down-sampling factors, checked: ``depth`` tuples of ``ndim`` integers from 1 to
    ``MAX_FACTOR``, each level down-sampling some axis. None: 2 along every axis (the paper's
    2×2 max-pools)."""
    if factors is None:
        return ((2,) * ndim,) * depth
    out = _per_level(factors, depth, ndim, "factors", f"down-sampling factors for depth={depth}")
    for level, f in enumerate(out):
        if not all(1 <= v <= MAX_FACTOR for v in f) or max(f) < 2:
            raise EmtileError(f"factors={_fmt_levels(out)}: level {level} has {f}; each factor "
                              f"must be from 1 to {MAX_FACTOR}, and each level must down-sample "
                              f"some axis by 2 or more")
    return out


def default_kernels(factors, ndim, kernel=3):
    """Kernel sizes per resolution level (``depth + 1``): 1 along the axes a level down-samples
    less than its others (the coarse z of serial sections: no convolution across sections
    there), ``kernel`` elsewhere; the bottom level as the level above it.

    Examples
    --------
    >>> default_kernels(((1, 2, 2), (2, 2, 2)), 3)
    ((1, 3, 3), (3, 3, 3), (3, 3, 3))
    >>> default_kernels(((2, 2),) * 2, 2)
    ((3, 3), (3, 3), (3, 3))
    """
    if not factors:
        return ((kernel,) * ndim,)
    levels = list(factors) + [factors[-1]]
    return tuple(tuple(1 if v < max(f) else kernel for v in f) for f in levels)


def check_kernels(kernels, factors, ndim, kernel=3):
    """Per-level convolution kernel sizes, checked: ``len(factors) + 1`` tuples of ``ndim`` odd
    integers from 1 to ``MAX_KERNEL``. None: :func:`default_kernels`."""
    if kernels is None:
        return default_kernels(factors, ndim, kernel)
    depth = len(factors)
    out = _per_level(kernels, depth + 1, ndim, "kernels",
                     f"kernel sizes for depth={depth} (one per resolution level: depth + 1)")
    for level, k in enumerate(out):
        if not all(1 <= v <= MAX_KERNEL and v % 2 for v in k):
            raise EmtileError(f"kernels={_fmt_levels(out)}: level {level} has {k}; each kernel "
                              f"size must be odd, from 1 to {MAX_KERNEL}")
    return out


def default_factors(voxel_size, depth):
    """Down-sampling factors per level for a voxel size ``(z, y, x)`` in nm: ``(1, 2, 2)`` while
    the in-plane size at that level is below half the z size (serial sections), then
    ``(2, 2, 2)`` (isotropic).

    Examples
    --------
    >>> default_factors((40, 4, 4), 4)
    ((1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    >>> default_factors((10, 10, 10), 2)
    ((2, 2, 2), (2, 2, 2))
    """
    try:
        z, y, x = (float(v) for v in voxel_size)
    except (TypeError, ValueError):
        raise EmtileError(f"voxel_size={voxel_size!r} must be 3 numbers (z, y, x) in nm") from None
    if not all(math.isfinite(v) and v > 0 for v in (z, y, x)):
        raise EmtileError(f"voxel_size={voxel_size!r} must be 3 positive numbers (z, y, x) in nm")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or not 1 <= depth <= 8:
        raise EmtileError(f"depth={depth!r} must be an integer from 1 to 8")
    factors = []
    for _ in range(int(depth)):
        f = (1, 2, 2) if max(y, x) < 0.5 * z else (2, 2, 2)
        z, y, x = z * f[0], y * f[1], x * f[2]
        factors.append(f)
    return tuple(factors)


class ShapeMap:
    """Input -> output size arithmetic of a valid-convolution U-Net, per axis.

    Parameters
    ----------
    depth : int
        Number of down-sampling steps (4 in the U-Net paper).
    ndim : int
        Spatial dimensions of the model (2 for a 2-D U-Net, 3 for a 3-D one).
    convs : int
        Unpadded convolutions per level (2).
    kernel : int
        Convolution kernel size where ``kernels`` does not say otherwise (3).
    factors : sequence, optional
        Down-sampling factor per level (``depth`` entries, each an int or one per axis), e.g.
        ``((1, 2, 2), (2, 2, 2))``; default 2 along every axis (:func:`check_factors`).
    kernels : sequence, optional
        Kernel size per resolution level (``depth + 1`` entries, odd); default
        :func:`default_kernels` of the factors.

    Every axis has its own valid sizes, halo and alignment (``min_sizes``, ``halos``,
    ``aligns``); ``min_size``, ``halo`` and ``align`` are the one number they share when they
    are the same along every axis (every 2-D model), and an error otherwise.

    Examples
    --------
    >>> m = ShapeMap(depth=4)
    >>> m.output_size(572), m.input_size(388), m.halo, m.align
    (388, 572, 92, 16)
    >>> m.valid_sizes(550, 590)
    [556, 572, 588]
    >>> a = ShapeMap(depth=2, ndim=3, factors=((1, 2, 2), (2, 2, 2)))
    >>> a.kernels
    ((1, 3, 3), (3, 3, 3), (3, 3, 3))
    >>> a.halos, a.aligns, a.min_sizes, a.output_size((18, 44, 44))
    ((8, 20, 20), (2, 4, 4), (18, 44, 44), (2, 4, 4))
    """

    def __init__(self, depth=4, ndim=2, *, convs=2, kernel=3, factors=None, kernels=None):
        if depth < 0:
            raise EmtileError(f"depth={depth} must be 0 or more")
        self.depth, self.ndim, self.convs, self.kernel = int(depth), int(ndim), convs, kernel
        self.factors = check_factors(factors, self.depth, self.ndim)
        self.kernels = check_kernels(kernels, self.factors, self.ndim, kernel)
        # per axis: (factor, pixels lost by the level's convolutions) per level, the bottom's loss
        self._axes = tuple(
            (tuple((f[a], convs * (k[a] - 1)) for f, k in zip(self.factors, self.kernels)),
             convs * (self.kernels[-1][a] - 1)) for a in range(self.ndim))
        self.uniform = len(set(self._axes)) <= 1  # every axis the same arithmetic (2-D models)
        self.min_sizes = tuple(self._smallest(a) for a in range(self.ndim))

    def _smallest(self, axis):
        """The smallest valid input along ``axis``: built up from the smallest bottom size whose
        expanding path stays positive (valid sizes are exactly those built from a bottom size)."""
        levels, bottom = self._axes[axis]
        for m in itertools.count(1):
            n = m + bottom
            for f, loss in reversed(levels):
                n = n * f + loss
            if self._out(n, axis) is not None:
                return n

    def _out(self, n, axis=0):
        """Output size for input ``n`` along ``axis``, or None if ``n`` is not valid there."""
        levels, bottom = self._axes[axis]
        for f, loss in levels:
            n -= loss
            if n < f or n % f:
                return None
            n //= f
        n -= bottom
        if n < 1:
            return None
        for f, loss in reversed(levels):
            n = f * n - loss
            if n < 1:
                return None
        return n

    def output_along(self, n, axis):
        """Output size for input size ``n`` along ``axis``, or None where ``n`` is not valid."""
        return self._out(int(n), axis)

    def _shared(self, values, name):
        if len(set(values)) == 1:
            return values[0]
        per = ", ".join(f"{a} {v}" for a, v in zip(_axis_names(self.ndim), values))
        raise EmtileError(f"the {name} differs per axis ({per}) for factors="
                          f"{_fmt_levels(self.factors)}: use {name}s")

    @property
    def aligns(self):
        """Per axis: tile origins must be multiples of this (the product of that axis's
        factors; ``2 ** depth`` by default) for exact stitching."""
        return tuple(math.prod(f for f, _ in levels) for levels, _ in self._axes)

    @property
    def halos(self):
        """Per axis: context pixels per side, ``(input - output) / 2``, the same for every valid
        size."""
        return tuple((m - self._out(m, a)) // 2 for a, m in enumerate(self.min_sizes))

    @property
    def align(self):
        """Tile origins must be multiples of this (``2 ** depth``) for exact stitching (the one
        value of :attr:`aligns`)."""
        return self._shared(self.aligns, "align")

    @property
    def halo(self):
        """Context pixels per side (the one value of :attr:`halos`)."""
        return self._shared(self.halos, "halo")

    @property
    def min_size(self):
        """The smallest valid input size (the one value of :attr:`min_sizes`)."""
        return self._shared(self.min_sizes, "min_size")

    def _valid(self, n, axis):
        axes = range(self.ndim) if axis is None else (axis,)
        return all(self._out(n, a) is not None for a in axes)

    def is_valid(self, n):
        """True if ``n`` (an int for every axis, or one per axis) is a valid input size."""
        return all(self._out(int(v), a) is not None
                   for a, v in enumerate(per_axis(n, self.ndim, "n")))

    def nearest_valid(self, n, axis=None):
        """The valid input sizes just below and just above ``n`` (below is None if there is
        none), along ``axis`` (None: valid along every axis)."""
        least = min(self.min_sizes) if axis is None else self.min_sizes[axis]
        lo = next((m for m in range(n - 1, least - 1, -1) if self._valid(m, axis)), None)
        hi = next(m for m in itertools.count(max(n + 1, least)) if self._valid(m, axis))
        return lo, hi

    def check(self, n, name="tile"):
        """Return ``n`` as a tuple (one per axis), raising :class:`EmtileError` if not valid."""
        sizes = per_axis(n, self.ndim, name)
        for a, v in enumerate(sizes):
            if self._out(v, a) is None:
                lo, hi = self.nearest_valid(v, a)
                near = (f"nearest valid sizes are {lo} and {hi}" if lo is not None
                        else f"the smallest valid size is {hi}")
                if self.uniform and self.ndim == 2:
                    raise EmtileError(f"{name}={v} is not valid for depth {self.depth}: {near}")
                ax = _axis_names(self.ndim)[a]
                raise EmtileError(f"{name}={n!r} is not valid: {v} along {ax} for depth "
                                  f"{self.depth} with factors={_fmt_levels(self.factors)}; along "
                                  f"{ax}, {near}")
        return sizes

    def output_size(self, n):
        """Output size for a valid input size ``n`` (tuple -> tuple; int -> int, or a tuple
        where the axes' halos differ)."""
        out = tuple(self._out(v, a) for a, v in enumerate(self.check(n, "input size")))
        if isinstance(n, (int, np.integer)) and len(set(out)) == 1:
            return out[0]
        return out

    def input_size(self, n):
        """Input size that gives output size ``n`` (tuple -> tuple; int -> int, or a tuple
        where the axes' halos differ)."""
        sizes = per_axis(n, self.ndim, "output size")
        ins = []
        for a, (v, h) in enumerate(zip(sizes, self.halos)):
            m = v + 2 * h
            if v < 1 or self._out(m, a) is None:
                below = next((o for o in range(v - 1, 0, -1) if self._out(o + 2 * h, a)), None)
                above = next(o for o in itertools.count(v + 1) if self._out(o + 2 * h, a))
                near = f"{below} and {above}" if below else f"{above}"
                where = "" if self.uniform else f" along {_axis_names(self.ndim)[a]}"
                raise EmtileError(f"output size {v} is not reachable{where} at depth "
                                  f"{self.depth}: nearest output sizes are {near}")
            ins.append(m)
        if isinstance(n, (int, np.integer)) and len(set(ins)) == 1:
            return ins[0]
        return tuple(ins)

    def valid_sizes(self, lo, hi, axis=None):
        """Valid input sizes ``n`` with ``lo <= n <= hi``, along ``axis`` (None: valid along
        every axis)."""
        least = max(self.min_sizes) if axis is None else self.min_sizes[axis]
        return [n for n in range(max(lo, least), hi + 1) if self._valid(n, axis)]


def per_axis(value, ndim, name):
    """``value`` (one integer, or one per axis) -> a tuple of ``ndim`` integers; ``name`` is
    the parameter named in the error."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),) * ndim
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise EmtileError(f"{name}={value!r} is not an integer or a tuple of integers") from None
    if len(out) != ndim:
        raise EmtileError(f"{name}={value!r} has {len(out)} values; expected 1 or {ndim}")
    return out


# --------------------------------------------------------------------------- regions


def normalize_roi(roi, shape):
    """``roi`` (slices, ``(start, stop)`` pairs or None per axis) -> ``((start, stop), ...)``.

    None (or a missing ``roi``) means the whole axis. Raises :class:`EmtileError` when the ROI has the
    wrong number of axes, is empty, has a step, or reaches outside ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if roi is None:
        return tuple((0, s) for s in shape)
    roi = tuple(roi)
    text = ",".join(_fmt_slice(r) for r in roi)
    if len(roi) != len(shape):
        raise EmtileError(f"roi={text} has {len(roi)} axes; the volume of shape {shape} has "
                          f"{len(shape)} (give start:stop for each axis)")
    out = []
    for axis, (r, n) in enumerate(zip(roi, shape)):
        if r is None:
            r = slice(None)
        if isinstance(r, slice):
            if r.step not in (None, 1):
                raise EmtileError(f"roi={text}: steps are not supported (axis {axis})")
            start, stop = r.start, r.stop
        else:
            start, stop = r
        start = 0 if start is None else int(start)
        stop = n if stop is None else int(stop)
        if start < 0 or stop > n or start >= stop:
            raise EmtileError(f"roi={text} is outside the volume of shape {shape}: axis {axis} "
                              f"needs 0 <= start < stop <= {n}, got {start}:{stop}")
        out.append((start, stop))
    return tuple(out)


def _fmt_slice(r):
    if r is None:
        return ":"
    if isinstance(r, slice):
        return f"{'' if r.start is None else r.start}:{'' if r.stop is None else r.stop}"
    return f"{r[0]}:{r[1]}"


# --------------------------------------------------------------------------- the tile grid


@dataclass(frozen=True)
class Grid:
    """The global tile grid over a region of a volume (all coordinates are volume coordinates).

    Tile ``k`` along an axis has its output window at ``[origin + k * stride, ... + out_tile)`` and
    reads its input from ``halo`` pixels further on each side. Tiles are indexed by a tuple (one
    index per axis). With ``owned=True`` (no blending) each tile contributes only its first
    ``stride`` output pixels (the last tile: all of them), so every region pixel comes from exactly
    one tile; otherwise every tile contributes its whole output window, weighted.
    """

    volume_shape: tuple
    region: tuple  # ((start, stop), ...)
    in_tile: tuple
    out_tile: tuple
    halo: tuple
    stride: tuple
    origin: tuple
    counts: tuple
    owned: bool = True

    @property
    def ndim(self):
        return len(self.volume_shape)

    @property
    def overlap(self):
        """Output pixels shared by neighbouring tiles, per axis (``out_tile - stride``)."""
        return tuple(o - s for o, s in zip(self.out_tile, self.stride))

    @property
    def n_tiles(self):
        return math.prod(self.counts)

    @property
    def region_shape(self):
        return tuple(b - a for a, b in self.region)

    def tiles(self):
        """Every tile index, in C order."""
        return itertools.product(*(range(n) for n in self.counts))

    def out_window(self, idx):
        """``(start, stop)`` of tile ``idx``'s full output window (may pass the region's end)."""
        start = tuple(o + k * s for o, k, s in zip(self.origin, idx, self.stride))
        return start, tuple(a + n for a, n in zip(start, self.out_tile))

    def in_window(self, idx):
        """``(start, stop)`` of tile ``idx``'s input window (may reach outside the volume)."""
        start, stop = self.out_window(idx)
        return (tuple(a - h for a, h in zip(start, self.halo)),
                tuple(b + h for b, h in zip(stop, self.halo)))

    def own_window(self, idx):
        """``(start, stop)`` of the region pixels tile ``idx`` contributes to."""
        ends = [self._own_axis(ax, k) for ax, k in enumerate(idx)]
        return tuple(a for a, _ in ends), tuple(b for _, b in ends)

    def _axis_range(self, axis, lo, hi):
        """Tile indices along ``axis`` whose full output window meets ``[lo, hi)`` (a superset)."""
        o, s, n, w = self.origin[axis], self.stride[axis], self.counts[axis], self.out_tile[axis]
        first = max(0, (lo - w - o) // s + 1)
        last = min(n - 1, (hi - 1 - o) // s)
        return range(first, last + 1)

    def _own_axis(self, axis, k):
        """``(start, stop)`` of tile ``k``'s own window along ``axis`` (see :meth:`own_window`)."""
        o, s, n = self.origin[axis], self.stride[axis], self.counts[axis]
        r0, r1 = self.region[axis]
        a = o + k * s
        b = a + (s if self.owned and k != n - 1 else self.out_tile[axis])
        return max(a, r0), min(b, r1)

    def axis_tiles(self, axis, lo, hi):
        """Tile indices along ``axis`` whose own window meets ``[lo, hi)``. Own windows are a
        product of per-axis intervals, so :meth:`tiles_in` is the product of these."""
        out = []
        for k in self._axis_range(axis, lo, hi):
            a, b = self._own_axis(axis, k)
            if max(a, lo) < min(b, hi):
                out.append(k)
        return out

    def tiles_in(self, start, stop):
        """Tile indices whose own window intersects the box ``[start, stop)``, in C order."""
        return list(itertools.product(*(self.axis_tiles(ax, a, b)
                                        for ax, (a, b) in enumerate(zip(start, stop)))))


def tile_grid(volume_shape, shape_map, tile, *, roi=None, overlap=0, owned=None):
    """The global tile grid for ``tile`` (input size) over a region of a volume.

    Parameters
    ----------
    volume_shape : tuple of int
        ``(Y, X)`` or ``(Z, Y, X)``: the model's spatial axes are the last ``shape_map.ndim``; any
        leading axes are tiled one slice at a time.
    shape_map : ShapeMap (or a UNet)
        Anything with ``ndim``, ``halos``, ``aligns``, ``check`` and ``output_size``.
    tile : int or tuple of int
        Valid input tile size along the model axes (one size for every axis, or one per axis).
    roi : tuple, optional
        Region to predict (see :func:`normalize_roi`); default the whole volume.
    overlap : int or tuple of int
        Minimum output overlap between neighbouring tiles, along the model axes.
    owned : bool, optional
        Each region pixel from exactly one tile (True, for no blending) or from every tile that
        covers it (False). Default: True when ``overlap == 0``.

    Returns
    -------
    Grid

    Examples
    --------
    >>> g = tile_grid((512, 512), ShapeMap(depth=4), 572)
    >>> g.out_tile, g.stride, g.counts, g.overlap
    ((388, 388), (384, 384), (2, 2), (4, 4))
    """
    volume_shape = tuple(int(s) for s in volume_shape)
    k = shape_map.ndim
    lead = len(volume_shape) - k
    if lead < 0:
        raise EmtileError(f"a {k}-D model cannot tile a {len(volume_shape)}-D volume of shape "
                          f"{volume_shape}")
    region = normalize_roi(roi, volume_shape)
    tile = tuple(shape_map.check(tile))
    out = tuple(shape_map.output_size(tile))
    overlap = per_axis(overlap, k, "overlap")
    aligns, halos = tuple(shape_map.aligns), tuple(shape_map.halos)
    stride = []
    for t, o, ov, a in zip(tile, out, overlap, aligns):
        s = _stride(o, ov, a)
        if s is None:
            raise EmtileError(f"overlap={ov} is too large for tile={t} (output {o}): the "
                              f"stride must stay at least {a}, so overlap <= {o - a}")
        stride.append(s)
    in_tile = (1,) * lead + tile
    out_tile = (1,) * lead + out
    stride = (1,) * lead + tuple(stride)
    align = (1,) * lead + aligns
    layout = [_axis_layout(r, o, s, al) for r, o, s, al in zip(region, out_tile, stride, align)]
    if owned is None:
        owned = not any(overlap)
    return Grid(volume_shape, region, in_tile, out_tile, (0,) * lead + halos, stride,
                tuple(g for g, _ in layout), tuple(n for _, n in layout), bool(owned))


def _stride(out, overlap, align):
    """The tile stride along an axis: ``out - overlap`` rounded down to a multiple of ``align``;
    None where that leaves less than ``align`` (or the overlap is negative)."""
    s = (out - overlap) // align * align
    return None if overlap < 0 or s < align else s


def _axis_layout(region, out, stride, align):
    """``(origin, count)`` of the tiles along an axis covering ``region = (start, stop)``: the
    first origin is the start rounded down to a multiple of ``align``."""
    r0, r1 = region
    origin = r0 // align * align
    return origin, max(1, -(-(r1 - origin - out) // stride) + 1)


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Block:
    """One unit of work: whole output chunks ``[start, stop)`` (volume coordinates) and its tiles."""

    index: int
    start: tuple
    stop: tuple
    tiles: tuple

    @property
    def shape(self):
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def slices(self, region):
        """Slices of this block in an output array that covers ``region`` (region coordinates)."""
        return tuple(slice(a - r0, b - r0) for a, b, (r0, _) in zip(self.start, self.stop, region))


@dataclass(frozen=True)
class BlockPlan:
    """The blocks of a grid, computed on demand: ``len(plan)``, ``plan[i]``, ``iter(plan)``.

    Blocks are a regular grid of ``block_shape`` from the region's start; the last block along
    each axis ends at the region's end (it may be a little longer than ``block_shape`` where
    :func:`block_plan` merged a short tail into it). Nothing is materialised: a plan of
    millions of blocks costs nothing until a block is asked for.
    """

    grid: Grid
    chunks: tuple  # output chunk shape (region coordinates)
    block_shape: tuple
    counts: tuple

    def __len__(self):
        return math.prod(self.counts)

    def _axis_box(self, axis, p):
        r0, r1 = self.grid.region[axis]
        start = r0 + p * self.block_shape[axis]
        return start, (r1 if p == self.counts[axis] - 1 else min(start + self.block_shape[axis], r1))

    def box(self, i):
        """``(start, stop)`` of block ``i`` (volume coordinates), without listing its tiles."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        ends = [self._axis_box(ax, int(p)) for ax, p in enumerate(np.unravel_index(i, self.counts))]
        return tuple(a for a, _ in ends), tuple(b for _, b in ends)

    def __getitem__(self, i):
        start, stop = self.box(i)
        return Block(i, start, stop, tuple(self.grid.tiles_in(start, stop)))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def n_tiles(self, i):
        """How many tiles block ``i`` runs (without listing them)."""
        start, stop = self.box(i)
        return math.prod(len(self.grid.axis_tiles(ax, a, b))
                         for ax, (a, b) in enumerate(zip(start, stop)))

    @property
    def n_tile_runs(self):
        """Tiles computed over the whole plan (tiles that straddle blocks count once per block).

        Blocks and tiles are products of per-axis intervals, so this is a product of per-axis
        sums: instant for any plan size."""
        total = 1
        for ax, n in enumerate(self.counts):
            total *= sum(len(self.grid.axis_tiles(ax, *self._axis_box(ax, p))) for p in range(n))
        return total


def block_plan(grid, chunks, *, max_block_px=2**22):
    """Group ``grid`` into blocks of whole output chunks, at most ``max_block_px`` pixels each.

    Blocks grow one chunk at a time along the model axes, keeping them as square as possible
    (fewer tiles straddle two blocks), then along the slice axes; every block holds at least one
    chunk, and a block spans the whole region along an axis when it fits.

    A tile that straddles two blocks runs in both. Chunks are multiples of the tile stride, so
    block edges fall on tile edges, except where the last tile along an axis owns more than a
    stride (its output reaches past the last chunk boundary): a last block that would start
    inside the last tile's own window is merged into the block before it (it is at most one
    tile's output longer), so that tile runs once, not twice.
    """
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != grid.ndim or any(c < 1 for c in chunks):
        raise EmtileError(f"chunks={chunks} must give one positive size per axis of "
                          f"{grid.region_shape}")
    shape = grid.region_shape
    full = [-(-n // c) * c for n, c in zip(shape, chunks)]
    block = list(chunks)
    budget = max(1, int(max_block_px))
    model_axes = [ax for ax in range(grid.ndim) if grid.halo[ax] > 0 or grid.out_tile[ax] > 1]
    while True:  # model axes: one chunk at a time, the smallest first
        size = math.prod(block)
        grow = [ax for ax in model_axes if block[ax] < full[ax]
                and size // block[ax] * (block[ax] + chunks[ax]) <= budget]
        if not grow:
            break
        ax = min(grow, key=lambda a: (min(block[a], shape[a]), -a))
        block[ax] += chunks[ax]
    for ax in reversed([a for a in range(grid.ndim) if a not in model_axes]):  # then the others
        rest = math.prod(block) // block[ax]
        block[ax] = min(full[ax], max(chunks[ax], budget // rest // chunks[ax] * chunks[ax]))
    counts = []
    for ax, (n, b) in enumerate(zip(shape, block)):
        count = -(-n // b)
        last_tile_start = grid._own_axis(ax, grid.counts[ax] - 1)[0]
        if count > 1 and grid.region[ax][0] + (count - 1) * b > last_tile_start:
            count -= 1  # the tail joins the block before it
        counts.append(count)
    return BlockPlan(grid, chunks, tuple(block), tuple(counts))


# --------------------------------------------------------------------------- auto tile


def check_levels(levels, sizes, units, *, unit="output chunks"):
    """``levels`` resolution levels of an image of ``sizes`` (y, x) written by work units of
    ``units`` (y, x) pixels, each writing whole chunks of every level: level ``levels - 1``
    halves y and x ``levels - 1`` times, so ``2 ** (levels - 1)`` must divide a unit (unless it
    is the whole axis) and the image must keep a pixel. Returns ``levels``; one line otherwise.
    """
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise EmtileError(f"levels={levels!r} must be a positive whole number")
    f = 2 ** (levels - 1)
    for axis, u, n in zip("yx", units, sizes):
        if n < f:
            raise EmtileError(f"levels={levels} would halve the {n}-px {axis} axis below one "
                              f"pixel: use at most {n.bit_length()} levels")
        if u % f and u < n:
            raise EmtileError(f"levels={levels} needs {unit} whose size in y and x is divisible "
                              f"by {f} (each writes whole chunks of every level), but the {unit} "
                              f"are {u} px in {axis}: use at most {(u & -u).bit_length()} levels")
    return int(levels)


def tile_costs(volume_shape, shape_map, *, roi=None, overlap=0, max_tile=None, min_tile=None,
               max_voxels=None, limit=64):
    """Valid tile sizes with their cost for this region, cheapest first.

    A 2-D model's tiles are square, as always: every valid size from ``min_tile`` (default the
    smallest) to ``max_tile`` (default: a size whose output covers the region's largest model
    axis in one tile). A 3-D model's tiles have a size per axis (a volume is rarely as deep as it
    is wide, and the axes' valid sizes differ): see :func:`_tile_costs_per_axis`.

    Returns
    -------
    list of (tile, n_tiles, pixels)
        Input tile size (an int, the same along both axes, for a 2-D model; a tuple per axis
        for a 3-D one), the tiles of its grid and the input pixels they compute, sorted by
        pixels (then by tile size).
    """
    region = normalize_roi(roi, volume_shape)
    if shape_map.ndim != 2:
        return _tile_costs_per_axis(volume_shape, shape_map, region, overlap, max_tile=max_tile,
                                    min_tile=min_tile, max_voxels=max_voxels, limit=limit)
    k = shape_map.ndim
    spatial = [b - a for a, b in region[len(region) - k:]]
    halo, align = max(shape_map.halos), max(shape_map.aligns)
    lo = max(shape_map.min_sizes) if min_tile is None else int(min_tile)
    # larger tiles than one covering the region gain nothing; but at least one size from lo up
    need = max(max(spatial) + 2 * halo + 2 * align, lo + align)
    hi = need if max_tile is None else min(int(max_tile), need)
    sizes = shape_map.valid_sizes(lo, hi)
    if not sizes:
        raise EmtileError(f"no valid tile size between {lo} and {hi} at depth {shape_map.depth} "
                          f"(the smallest is {max(shape_map.min_sizes)}); raise the memory budget")
    costs = []
    for t in sizes:
        try:
            g = tile_grid(volume_shape, shape_map, t, roi=region, overlap=overlap)
        except EmtileError:  # overlap too large for this tile
            continue
        costs.append((t, g.n_tiles, g.n_tiles * math.prod(g.in_tile)))
    if not costs:
        raise EmtileError(f"overlap={overlap} is too large for every tile size up to {hi}")
    return sorted(costs, key=lambda c: (c[2], c[0]))


def _axis_costs(shape_map, axis, region, overlap, lo, hi):
    """``[(size, tiles, pixels)]`` along one axis for the valid sizes in ``[lo, hi]``, only
    those that compute fewer pixels than every smaller size (a larger tile with no fewer pixels
    only costs memory)."""
    align = shape_map.aligns[axis]
    out = []
    for t in shape_map.valid_sizes(lo, hi, axis=axis):
        stride = _stride(shape_map._out(t, axis), overlap, align)
        if stride is None:
            continue
        n = _axis_layout(region, shape_map._out(t, axis), stride, align)[1]
        if not out or n * t < out[-1][2]:
            out.append((t, n, n * t))
    return out


def _tile_costs_per_axis(volume_shape, shape_map, region, overlap, *, max_tile, min_tile,
                         max_voxels, limit):
    """Tile sizes per axis for a model of 3 (or more) axes: the cost (tiles x input voxels) is
    the product of one cost per axis, so each axis offers its valid sizes that no smaller size
    beats; the combinations whose tile has at most ``max_voxels`` voxels are ranked, and the
    ``limit`` cheapest returned. ``min_tile`` / ``max_tile``: an int or one per axis."""
    k = shape_map.ndim
    lead = len(region) - k
    extents = [b - a for a, b in region[lead:]]
    halos, aligns = shape_map.halos, shape_map.aligns
    ov = per_axis(overlap, k, "overlap")
    lo = shape_map.min_sizes if min_tile is None else per_axis(min_tile, k, "min_tile")
    top = (None,) * k if max_tile is None else per_axis(max_tile, k, "max_tile")
    axes = []
    for a in range(k):
        need = max(extents[a] + 2 * halos[a] + 2 * aligns[a], lo[a] + aligns[a])
        hi = need if top[a] is None else min(top[a], need)
        costs = _axis_costs(shape_map, a, region[lead + a], ov[a], lo[a], hi)
        if not costs:
            raise EmtileError(f"no valid tile size along {_axis_names(k)[a]} between {lo[a]} and "
                              f"{hi} for overlap={ov[a]} at depth {shape_map.depth} (the "
                              f"smallest is {shape_map.min_sizes[a]})")
        axes.append(np.array(costs, dtype=np.float64))
    grids = np.meshgrid(*[c[:, 0] for c in axes], indexing="ij")
    voxels = np.prod(grids, axis=0)
    pixels = np.prod(np.meshgrid(*[c[:, 2] for c in axes], indexing="ij"), axis=0)
    ok = voxels <= (np.inf if max_voxels is None else max_voxels)
    if not ok.any():
        raise EmtileError(f"no valid tile fits in {max_voxels} voxels (the smallest has "
                          f"{int(voxels.min())}); raise the memory budget")
    flat = np.flatnonzero(ok.ravel())
    order = flat[np.lexsort((voxels.ravel()[flat], pixels.ravel()[flat]))][:limit]
    lead_px = math.prod(b - a for a, b in region[:lead])
    out = []
    for i in order:
        idx = np.unravel_index(i, voxels.shape)
        tile = tuple(int(axes[a][j, 0]) for a, j in enumerate(idx))
        n = math.prod(int(axes[a][j, 1]) for a, j in enumerate(idx)) * lead_px
        out.append((tile, n, n * math.prod(tile)))
    return out


def choose_tile(volume_shape, shape_map, *, roi=None, overlap=0, max_tile=None, min_tile=None,
                max_voxels=None):
    """The valid tile size that computes the fewest input pixels for this region (the first of
    :func:`tile_costs`).

    Returns
    -------
    tile : int or tuple of int
        Input tile size: an int (both axes) for a 2-D model, one per axis for a 3-D one.
    efficiency : float
        Region pixels / input pixels computed, in (0, 1].

    Examples
    --------
    >>> choose_tile((512, 512), ShapeMap(depth=4), max_tile=800)  # one 700 tile beats four 572s
    (700, 0.5349877551020408)
    """
    region = normalize_roi(roi, volume_shape)
    tile, _, pixels = tile_costs(volume_shape, shape_map, roi=region, overlap=overlap,
                                 max_tile=max_tile, min_tile=min_tile, max_voxels=max_voxels)[0]
    return tile, math.prod(b - a for a, b in region) / pixels


# --------------------------------------------------------------------------- reading


def reflect_index(idx, n):
    """Map indices (any integers) into ``[0, n)`` by mirroring without repeating the edge.

    The same as NumPy's ``np.pad(..., mode="reflect")``: -1 -> 1, n -> n - 2, for any distance.
    """
    idx = np.asarray(idx)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


def read_window(array, start, stop):
    """Read ``array[start:stop]`` (per axis), mirroring where the window leaves the array.

    Only the bounding box of the pixels needed is read, so an interior window is one plain read.
    """
    shape = array.shape
    box, take = [], []
    for a, b, n in zip(start, stop, shape):
        if 0 <= a and b <= n:
            box.append(slice(a, b))
            take.append(None)
        else:
            idx = reflect_index(np.arange(a, b), n)
            lo, hi = int(idx.min()), int(idx.max()) + 1
            box.append(slice(lo, hi))
            take.append(idx - lo)
    data = np.asarray(array[tuple(box)])
    for axis, idx in enumerate(take):
        if idx is not None:
            data = np.take(data, idx, axis=axis)
    return data


# --------------------------------------------------------------------------- boxes of arrays


def center_crop(array, shape):
    """The centre ``shape`` of the last ``len(shape)`` axes of ``array`` (a view).

    Works on NumPy arrays and torch tensors alike. An odd size difference leaves the extra pixel
    at the end (the U-Net's skip connections and training patches always differ by even sizes).
    """
    sizes = tuple(array.shape[-len(shape):])
    assert all(n >= s for n, s in zip(sizes, shape)), (tuple(array.shape), tuple(shape))
    box = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(sizes, shape))
    return array[(Ellipsis, *box)]


# --------------------------------------------------------------------------- lazy views


def _normalize_key(key, shape):
    """Expand a basic-indexing key into one int or slice per axis (bounds-checked ints)."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    if len(key) > len(shape):
        raise IndexError(f"too many indices ({len(key)}) for an array of shape {shape}")
    key = key + (slice(None),) * (len(shape) - len(key))
    out = []
    for k, n in zip(key, shape):
        if isinstance(k, (int, np.integer)):
            k = int(k)
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
            out.append(k % n)
        elif isinstance(k, slice):
            out.append(k)
        else:
            raise TypeError(f"only ints and slices are supported, got {k!r}")
    return out


class LazyArray:
    """Base of emtile's lazy views: subclasses define ``shape``, ``dtype`` and ``_read(key)``."""

    shape: tuple
    dtype: np.dtype

    @property
    def ndim(self):
        return len(self.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        return self._read(_normalize_key(key, self.shape))

    def __array__(self, dtype=None, copy=None):
        data = self[...]
        return data.astype(dtype) if dtype is not None else data

    def __repr__(self):
        return f"<{type(self).__name__} shape={self.shape} dtype={self.dtype}>"


class Window(LazyArray):
    """The box ``start : start + shape`` of ``array``, as an array of its own (lazy: reads go to
    ``array``, shifted). E.g. the labels under a prediction of a region.

    Examples
    --------
    >>> w = Window(np.arange(20).reshape(4, 5), (1, 2), (2, 3))
    >>> w[...].tolist(), w[1, ::2].tolist()
    ([[7, 8, 9], [12, 13, 14]], [12, 14])
    """

    def __init__(self, array, start, shape):
        self.array, self.start = array, tuple(int(s) for s in start)
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(array.dtype)
        if len(self.start) != len(array.shape) or any(
                a < 0 or a + n > m for a, n, m in zip(self.start, self.shape, array.shape)):
            raise EmtileError(f"the box at {self.start} of shape {self.shape} does not fit in "
                              f"an array of shape {tuple(array.shape)}")

    def _read(self, key):
        shifted = []
        for k, a, n in zip(key, self.start, self.shape):
            if isinstance(k, int):
                shifted.append(a + k)
            else:
                lo, hi, step = k.indices(n)
                shifted.append(slice(a + lo, a + max(hi, lo), step))
        return np.asarray(self.array[tuple(shifted)])
