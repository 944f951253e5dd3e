"""Numba kernels of the per-pixel passes of :mod:`emtile.segmenter.kernels` and
:mod:`emtile.segmenter.blocks`: labels read at the keys' sources, region-graph
edges, fragment statistics, ids mapped through a table.

Each is one pass over a block in C order that computes what the NumPy expressions it replaces
computed, without their temporaries (an int64 array of global indices, masked copies, sorts of
every pixel pair): ``tests/test_segment.py`` compares every kernel with a NumPy reference on
random inputs. Each is serial and releases the GIL (``nogil``): blocks run one per Dask worker
process, or one per thread of this process.
Arrays are 3-D ``(Z, Y, X)``; a view (a block's write region in its read box) is read in place.

Block-sized outputs are allocated by NumPy and passed in (``out``). Fresh memory is the cost
here (first touching a 42 MB array took 18 ms in 4 KiB pages, 5 ms in huge pages); a stage
therefore keeps freed memory in the process for the next block (:mod:`emtile._allocator`), which
took a fresh 8 x 2048² run from about 4.4 s to 3.1 s.
"""

import numpy as np
from numba import njit, types
from numba.typed import Dict

COST_SHIFT = 44
UNSET = np.int64(0x7FFFFFFFFFFFFFFF)


@njit(cache=True, nogil=True)
def _divmod(g, d, inv):
    """``(g // d, g % d)`` for ``0 <= g < 2**50`` and ``d >= 1``, with ``inv = 1.0 / d``.

    The float quotient is within 1 of the true one (its relative error is a few 2**-53, and the
    quotient is below 2**50), so one correction of the remainder makes it exact. Measured on an
    AMD EPYC: a global index to (z, y, x) by two 64-bit integer divisions took 5.4 ns, this way
    0.7 ns; the source lookups below do one per keyed pixel."""
    q = np.int64(g * inv)
    r = g - q * d
    if r < 0:
        q -= 1
        r += d
    elif r >= d:
        q += 1
        r -= d
    return q, r


@njit(cache=True, nogil=True)
def _coords(g, plane, inv_plane, row, inv_row):
    """Global (z, y, x) of the C-order global index ``g`` (``plane = Y * X``, ``row = X``)."""
    sz, rest = _divmod(g, plane, inv_plane)
    sy, sx = _divmod(rest, row, inv_row)
    return sz, sy, sx


@njit(cache=True, nogil=True)
def labels_at_sources(key, labels, fill, origin, volume_shape, out):
    """``out`` (int64, shape of ``key``) = ``labels`` read at each key's source (a global index
    inside the box at ``origin``); ``fill`` (same shape) where the key is UNSET."""
    nz, ny, nx = key.shape
    mask = (np.int64(1) << COST_SHIFT) - 1
    plane = np.int64(volume_shape[1]) * volume_shape[2]
    row = np.int64(volume_shape[2])
    inv_plane, inv_row = 1.0 / plane, 1.0 / row
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                k = key[z, y, x]
                if k == UNSET:
                    out[z, y, x] = fill[z, y, x]
                    continue
                sz, sy, sx = _coords(k & mask, plane, inv_plane, row, inv_row)
                out[z, y, x] = labels[sz - origin[0], sy - origin[1], sx - origin[2]]


@njit(cache=True, nogil=True)
def add_offsets(labels, boxes, offsets):
    """In place: ``labels[box] += offset`` where ``labels > 0``, for each row ``(z0, y0, x0, z1,
    y1, x1)`` of ``boxes`` and its ``offsets`` entry (a block's labels made provisional ids in a
    read box that overlaps several blocks). The NumPy expression (a mask, then a masked update)
    took 36 ms on a 2112² int64 slice, this one pass a few."""
    for i in range(boxes.shape[0]):
        off = offsets[i]
        for z in range(boxes[i, 0], boxes[i, 3]):
            for y in range(boxes[i, 1], boxes[i, 4]):
                for x in range(boxes[i, 2], boxes[i, 5]):
                    v = labels[z, y, x]
                    if v > 0:
                        labels[z, y, x] = v + off


@njit(cache=True, nogil=True)
def _vector(s, gz, gy, gx, plane, inv_plane, row, inv_row):
    """(dz, dy, dx) from the pixel at global (gz, gy, gx) to the global index ``s``."""
    sz, sy, sx = _coords(s, plane, inv_plane, row, inv_row)
    return sz - gz, sy - gy, sx - gx


_EMPTY = np.int64(-(1 << 63))  # an unused slot of a pair table


@njit(cache=True, nogil=True)
def _probe(table, u, v):
    """Slot of the pair ``(u, v)`` in the open-addressing table ``table`` (rows ``(u, v,
    sums...)``, ``u`` = _EMPTY where unused; rows a power of two): where it is, or the empty slot
    where it goes. One row holds the keys and the sums, so a lookup reads one cache line."""
    mask = table.shape[0] - 1
    h = np.uint64(u) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(v) * np.uint64(0xC2B2AE3D27D4EB4F)
    pos = np.int64((h ^ (h >> np.uint64(29))) & np.uint64(mask))
    while table[pos, 0] != _EMPTY and (table[pos, 0] != u or table[pos, 1] != v):
        pos = (pos + 1) & mask
    return pos


@njit(cache=True, nogil=True)
def _new_table(rows, columns):
    table = np.zeros((rows, columns), np.int64)
    table[:, 0] = _EMPTY
    return table


@njit(cache=True, nogil=True)
def _slot(table, k, u, v):
    """Slot of the pair ``(u, v)``, added (sums 0) if new: ``(slot, pairs held, table)``, the
    table doubled when it is half full."""
    pos = _probe(table, u, v)
    if table[pos, 0] != _EMPTY:
        return pos, k, table
    if 2 * (k + 1) > table.shape[0]:
        grown = _new_table(2 * table.shape[0], table.shape[1])
        for j in range(table.shape[0]):
            if table[j, 0] != _EMPTY:
                grown[_probe(grown, table[j, 0], table[j, 1])] = table[j]
        table = grown
        pos = _probe(table, u, v)
    table[pos, 0] = u
    table[pos, 1] = v
    return pos, k + 1, table


@njit(cache=True, nogil=True)
def _rows(table):
    """The used rows of a pair table (in slot order)."""
    k = 0
    for j in range(table.shape[0]):
        k += table[j, 0] != _EMPTY
    out = np.empty((k, table.shape[1]), np.int64)
    k = 0
    for j in range(table.shape[0]):
        if table[j, 0] != _EMPTY:
            out[k] = table[j]
            k += 1
    return out


@njit(cache=True, nogil=True)
def edge_sums(frag, alt, source, start, stop, axes, origin, volume_shape, sampling, bins,
              n_bins):
    """The unsorted rows ``(u, v, altitude_sum, pixels, contact, histogram...)`` of
    :func:`emtile.segmenter.kernels.adjacent_pairs`, each fragment pair once (int64
    (k, 5 + n_bins)); ``bins[level]`` is an altitude level's histogram bin, -1 for none."""
    shape = frag.shape
    plane, row = np.int64(volume_shape[1]) * volume_shape[2], np.int64(volume_shape[2])
    inv_plane, inv_row = 1.0 / plane, 1.0 / row
    s2 = (sampling[0] * sampling[0], sampling[1] * sampling[1], sampling[2] * sampling[2])
    rows = _new_table(1 << 12, 5 + n_bins)
    k = 0
    last_u, last_v, last = np.int64(-1), np.int64(-1), np.int64(-1)
    for ax in range(3):
        if not axes[ax]:
            continue
        dz, dy, dx = np.int64(ax == 0), np.int64(ax == 1), np.int64(ax == 2)
        end = min(stop[ax] + 1, shape[ax])  # the neighbour may be one plane past the box
        hz = end - 1 if ax == 0 else stop[0]
        hy = end - 1 if ax == 1 else stop[1]
        hx = end - 1 if ax == 2 else stop[2]
        for z in range(start[0], hz):
            for y in range(start[1], hy):
                z2, y2 = z + dz, y + dy  # the neighbour, fixed per row: no branch per pixel
                for x in range(start[2], hx):
                    a = frag[z, y, x]
                    if a <= 0:
                        continue
                    x2 = x + dx
                    b = frag[z2, y2, x2]
                    if b <= 0 or b == a:
                        continue
                    u, v = min(a, b), max(a, b)
                    if u != last_u or v != last_v:
                        last = _probe(rows, u, v)
                        if rows[last, 0] == _EMPTY:  # a new pair (the table may grow)
                            last, k, rows = _slot(rows, k, u, v)
                        last_u, last_v = u, v
                    gz, gy, gx = z + origin[0], y + origin[1], x + origin[2]
                    az, ay, ax_ = _vector(source[z, y, x], gz, gy, gx, plane, inv_plane, row,
                                          inv_row)
                    bz, by, bx = _vector(source[z2, y2, x2], gz + dz, gy + dy, gx + dx, plane,
                                         inv_plane, row, inv_row)
                    dot = s2[0] * az * bz + s2[1] * ay * by + s2[2] * ax_ * bx
                    still = az == 0 and ay == 0 and ax_ == 0 and bz == 0 and by == 0 and bx == 0
                    if dot < 0 or still:
                        la, lb = alt[z, y, x], alt[z2, y2, x2]
                        rows[last, 2] += np.int64(la) + np.int64(lb)
                        rows[last, 3] += 2
                        if n_bins:
                            if bins[la] >= 0:
                                rows[last, 5 + bins[la]] += 1
                            if bins[lb] >= 0:
                                rows[last, 5 + bins[lb]] += 1
                    rows[last, 4] += 1
    return _rows(rows)


@njit(cache=True, nogil=True)
def group_sums(u, v, values):
    """Rows ``(u, v, *sums of values' columns)`` per distinct pair, in order of first
    appearance (int64 (k, 2 + m))."""
    m = values.shape[1]
    rows = _new_table(1 << 12, 2 + m)
    k = 0
    for i in range(u.size):
        j, k, rows = _slot(rows, k, u[i], v[i])
        for c in range(m):
            rows[j, 2 + c] += values[i, c]
    return _rows(rows)


@njit(cache=True, nogil=True)
def fragment_table(frag, inside, origin, volume_shape):
    """``(id, interior pixels, first global index)`` per nonzero id of ``frag`` (int64 (k, 3));
    see :func:`emtile.segmenter.kernels.fragment_stats`. Rows with a first index of -1 are
    unused; the others are in order of id when ``span <= 4 * frag.size``, else of first pixel."""
    nz, ny, nx = frag.shape
    lo, hi = np.int64(0), np.int64(-1)
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                f = frag[z, y, x]
                if f > 0:
                    if hi < 0 or f < lo:
                        lo = f
                    if f > hi:
                        hi = f
    if hi < 0:
        return np.zeros((0, 3), np.int64)
    span = hi - lo + 1
    dense = span <= 4 * frag.size  # ids are dense here (a block's and its neighbours')
    slot = Dict.empty(key_type=types.int64, value_type=types.int64)
    rows = np.zeros((span if dense else 64, 3), np.int64)
    rows[:, 2] = -1
    k = 0
    Y, X = np.int64(volume_shape[1]), np.int64(volume_shape[2])
    for z in range(nz):
        for y in range(ny):
            row = ((z + origin[0]) * Y + y + origin[1]) * X + origin[2]
            for x in range(nx):
                f = frag[z, y, x]
                if f <= 0:
                    continue
                if dense:
                    j = f - lo
                else:
                    j = slot[f] if f in slot else np.int64(-1)
                    if j < 0:
                        if k == rows.shape[0]:
                            grown = np.zeros((2 * k, 3), np.int64)
                            grown[:k] = rows
                            grown[k:, 2] = -1
                            rows = grown
                        j = k
                        slot[f] = j
                        k += 1
                if rows[j, 2] < 0:  # C order: the first pixel seen is the first
                    rows[j, 0] = f
                    rows[j, 2] = row + x
                if inside[z, y, x]:
                    rows[j, 1] += 1
    return rows


def stored_ids(frag, inside, boundary_bit):
    """``frag`` as uint64 with ``boundary_bit`` set where not ``inside`` (what pass 2 stores)."""
    out = np.empty(frag.shape, np.uint64)  # see the module docstring: NumPy allocates outputs
    _stored_ids(frag, inside, np.uint64(boundary_bit), out)
    return out


@njit(cache=True, nogil=True)
def _stored_ids(frag, inside, boundary_bit, out):
    nz, ny, nx = frag.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                f = np.uint64(frag[z, y, x])
                out[z, y, x] = f if inside[z, y, x] else f | boundary_bit


@njit(cache=True, nogil=True)
def id_range(stored, boundary_bit):
    """Smallest and largest nonzero id of ``stored`` (``boundary_bit`` cleared); (0, -1) if none."""
    id_mask = ~boundary_bit
    lo, hi = np.int64(0), np.int64(-1)
    nz, ny, nx = stored.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                f = np.int64(stored[z, y, x] & id_mask)
                if f > 0:
                    if hi < 0 or f < lo:
                        lo = f
                    if f > hi:
                        hi = f
    return lo, hi


@njit(cache=True, nogil=True)
def map_stored(stored, lut, lo, boundary_bit, drop_boundaries, out):
    """``out = lut[id - lo]`` for the ids of ``stored`` (provisional ids, ``boundary_bit`` set on
    boundary pixels), 0 for id 0 and, with ``drop_boundaries``, for boundary pixels."""
    id_mask = ~boundary_bit
    nz, ny, nx = stored.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                s = stored[z, y, x]
                f = s & id_mask
                if f == 0 or (drop_boundaries and (s & boundary_bit) != 0):
                    out[z, y, x] = 0
                else:
                    out[z, y, x] = lut[np.int64(f) - lo]
