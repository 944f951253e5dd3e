"""Numba kernels of :func:`emtile.segmenter.kernels.flood`: the synchronous rounds, frontier only.

A round evaluates only the domain pixels next to a pixel whose key changed in the previous
round: any other pixel would compute the same minimum as before (its neighbours' keys did not
change), so the result is that of evaluating every pixel every round, at the cost of the pixels
that move. Measured on a 3 x 512 x 512 ISBI-like map: the NumPy version (every pixel, every
round) took 1.4 s of a 2.4 s ws run; this one takes a few hundredths.

The kernels work on arrays padded by one pixel on both sides of every neighbour axis (padding:
domain False, key UNSET), flattened. A pixel's neighbour is then its flat index plus an offset,
with no bounds check: only interior pixels are ever visited (a padding pixel is never in the
domain and never holds a key), and an interior pixel's neighbours all lie in the padded array.
The bounds checks of an unpadded array cost three 64-bit integer divisions per visited pixel
(slow: see ``pixels._divmod``). With the padding, the pushes and the scratch below, a 4 x 1154 x
1154 block's flood went from 0.77 s to 0.37 s (``examples/bench_segment_kernels.py``).

With affinity levels (distance seeds), a step's cost is that of the pair it crosses: six more
padded arrays (:func:`pad_pairs`, one per direction) that the kernels read instead of the entered
pixel's cost; the probability map's floods pass an empty table and run as before.

The scratch arrays (the padded keys and costs, the changed pixels and their new keys, a slot
per pixel) are kept per thread and reused, sized to the domain where they can be: allocating and
zeroing block-sized arrays per call cost about as much in page faults as the rounds themselves.
The keys returned are a new array, allocated by NumPy (see :mod:`emtile.segmenter.pixels`).
"""

import threading

import numpy as np
from numba import njit

COST_SHIFT = 44
UNSET = np.int64(0x7FFFFFFFFFFFFFFF)


@njit(cache=True, nogil=True)
def padded_keys(seeds, pad, origin, volume_shape, key):
    """Write into the flat ``key`` the flood keys of a box at ``origin``, padded by ``pad[ax]``
    (0 or 1) pixels on both sides of each axis, in C order: the global C-order index at
    ``seeds``, UNSET elsewhere and in the padding."""
    nz, ny, nx = seeds.shape
    pz, py, px = pad[0], pad[1], pad[2]
    NY, NX = ny + 2 * py, nx + 2 * px
    key[:(nz + 2 * pz) * NY * NX] = UNSET
    Y, X = volume_shape[1], volume_shape[2]
    for z in range(nz):
        for y in range(ny):
            row = ((z + origin[0]) * Y + y + origin[1]) * X + origin[2]
            at = ((z + pz) * NY + y + py) * NX + px
            for x in range(nx):
                if seeds[z, y, x]:
                    key[at + x] = row + x


@njit(cache=True, nogil=True)
def unpadded(key, pad, check, cost, out):
    """The keys of the flat padded ``key`` without the padding, into ``out`` (int64, (Z, Y, X));
    with ``check``, UNSET at the keyed domain pixels that :func:`mark_supported` did not mark.
    Returns the pixels unset: the unsetting rides on the copy, one pass."""
    nz, ny, nx = out.shape
    pz, py, px = pad[0], pad[1], pad[2]
    NY, NX = ny + 2 * py, nx + 2 * px
    dropped = 0
    for z in range(nz):
        for y in range(ny):
            at = ((z + pz) * NY + y + py) * NX + px
            for x in range(nx):
                k = key[at + x]
                if check and k != UNSET and cost[at + x] != 0 and not cost[at + x] & _OK:
                    k = UNSET
                    dropped += 1
                out[z, y, x] = k
    return dropped


@njit(cache=True, nogil=True)
def pad_inputs(domain, alt, pad, cost):
    """Write into the flat ``cost`` (uint16, at least the padded size) the C-order padded array of
    the cost of entering each pixel, ``1 + alt``, at the domain pixels; 0 elsewhere and in the
    padding. One array tells both whether a pixel may move and what entering it costs, so a
    visit reads one cache line for both. Returns the number of domain pixels."""
    nz, ny, nx = domain.shape
    pz, py, px = pad[0], pad[1], pad[2]
    NY, NX = ny + 2 * py, nx + 2 * px
    cost[:(nz + 2 * pz) * NY * NX] = 0
    count = 0
    for z in range(nz):
        for y in range(ny):
            at = ((z + pz) * NY + y + py) * NX + px
            for x in range(nx):
                if domain[z, y, x]:
                    cost[at + x] = np.uint16(alt[z, y, x]) + 1
                    count += 1
    return count


@njit(cache=True, nogil=True)
def pad_pairs(levels, pad, out):
    """Write into ``out`` (uint8, (6, padded size)) the altitude ``255 - level`` of the pair
    between each pixel and its neighbour in direction ``d`` (the order of :func:`run_flood`'s
    offsets: -z, +z, -y, +y, -x, +x), from the affinity ``levels`` of the box (``(3, Z + 1,
    Y + 1, X + 1)``: ``levels[k, v]`` links ``v`` and ``v - e_k``). 255 in the padding."""
    nz, ny, nx = levels.shape[1] - 1, levels.shape[2] - 1, levels.shape[3] - 1
    pz, py, px = pad[0], pad[1], pad[2]
    NY, NX = ny + 2 * py, nx + 2 * px
    out[:, :(nz + 2 * pz) * NY * NX] = 255
    for z in range(nz):
        for y in range(ny):
            at = ((z + pz) * NY + y + py) * NX + px
            for x in range(nx):
                out[0, at + x] = 255 - levels[0, z, y, x]
                out[1, at + x] = 255 - levels[0, z + 1, y, x]
                out[2, at + x] = 255 - levels[1, z, y, x]
                out[3, at + x] = 255 - levels[1, z, y + 1, x]
                out[4, at + x] = 255 - levels[2, z, y, x]
                out[5, at + x] = 255 - levels[2, z, y, x + 1]


@njit(cache=True, nogil=True)
def _step(c):
    """The cost ``c`` (``1 + alt``) in key units."""
    return np.int64(c) << COST_SHIFT


@njit(cache=True, nogil=True)
def _edge(cost, pairs, d, p, q):
    """The step from ``p`` to its neighbour ``q = p + offsets[d]`` (a domain pixel): ``1 +`` the
    altitude of ``q`` or, with ``pairs`` (:func:`pad_pairs`), of the pair ``(p, q)``."""
    if pairs.shape[0] == 0:
        return _step(cost[q] & ~_OK)
    return _step(np.uint16(pairs[d, p]) + 1)


@njit(cache=True, nogil=True)
def _best(key, cost, pairs, q, offsets, back):
    """The smallest of ``key[q]`` and each set neighbour's key plus its step into ``q``."""
    best = key[q]
    for d in range(offsets.size):
        p = q + offsets[d]
        nb = key[p]
        if nb != UNSET:
            v = nb + _edge(cost, pairs, back[d], p, q)
            if v < best:
                best = v
    return best


@njit(cache=True, nogil=True)
def _first_changes(key, cost, pairs, offsets, back, n, cand, value):
    """Round 1: the domain pixels (in C order) whose key a keyed neighbour lowers, and their new
    keys. Returns how many."""
    k = 0
    for q in range(n):
        if cost[q]:
            v = _best(key, cost, pairs, q, offsets, back)
            if v < key[q]:
                cand[k] = q
                value[k] = v
                k += 1
    return k


@njit(cache=True, nogil=True)
def flood_rounds(key, cost, pairs, rounds, offsets, back, n, slot, frontier, cand, value):
    """Run up to ``rounds`` rounds on the flat padded arrays ``key`` (int64, updated in place) and
    ``cost`` (:func:`pad_inputs`), of ``n`` pixels; ``offsets`` are the flat offsets of a
    pixel's neighbours (``back[d]``: the direction of ``-offsets[d]``); ``pairs`` (empty, or
    :func:`pad_pairs`) the steps' altitudes. ``frontier``, ``cand`` and ``value`` hold at least
    the domain's pixels; ``slot`` (``n``, any values) is scratch. Returns the rounds that
    changed something.

    Round 1 evaluates every domain pixel. Later rounds push the keys that changed to their
    neighbours: a pixel's key is already at most each neighbour's previous key plus its step
    (it was evaluated after that neighbour last changed), so the minimum over the changed
    neighbours is the minimum over all of them. A round's lowered keys are gathered in
    ``cand``/``value`` (``slot[q]`` is ``q``'s place there, trusted only if ``cand`` agrees) and
    written after the round, so every push reads the previous round's keys."""
    if rounds == 0:
        return 0
    k = _first_changes(key, cost, pairs, offsets, back, n, cand, value)
    for r in range(1, rounds + 1):
        if r > 1:
            frontier, cand = cand, frontier
            m = k
            k = 0
            for f in range(m):
                p = frontier[f]
                kp = key[p]
                for d in range(offsets.size):
                    q = p + offsets[d]
                    if cost[q] == 0:
                        continue
                    v = kp + _edge(cost, pairs, d, p, q)
                    if v >= key[q]:  # most pushes (back where a key came from) stop here
                        continue
                    j = slot[q]
                    if 0 <= j < k and cand[j] == q:
                        if v < value[j]:
                            value[j] = v
                    else:
                        slot[q] = k
                        cand[k] = q
                        value[k] = v
                        k += 1
        if k == 0:
            return r - 1
        for j in range(k):
            key[cand[j]] = value[j]
    return rounds


_OK = np.uint16(0x8000)  # a cost's flag: the pixel is carried back to a seed (mark_supported)


@njit(cache=True, nogil=True)
def mark_supported(key, cost, pairs, rounds, offsets, back, n, frontier, nxt):
    """Flag (``_OK`` in ``cost``) every domain pixel whose key is carried by a chain of
    neighbours back to a seed in the final state: ``key[q] == key[p] + step(q)`` along the chain.
    :func:`unpadded` unsets the others.

    After the last round a pixel can hold a key whose path ran through a neighbour that a
    better path reached in that same last round; such a label would be cut off from its seed.
    A supported chain is at most ``rounds`` long (each link was set a round after the next), so
    ``rounds`` breadth-first rounds from the seeds find every supported pixel. The arrays are
    those of :func:`flood_rounds`."""
    m = 0
    if rounds > 0:  # round 1: the domain pixels carried by a seed (a keyed non-domain pixel)
        for q in range(n):
            c = cost[q]
            if c != 0 and key[q] != UNSET:
                for d in range(offsets.size):
                    p = q + offsets[d]
                    if cost[p] == 0 and key[p] != UNSET and \
                            key[q] == key[p] + _edge(cost, pairs, back[d], p, q):
                        cost[q] = c | _OK
                        frontier[m] = q
                        m += 1
                        break
    for _ in range(1, rounds):
        if m == 0:
            break
        k = 0
        for f in range(m):
            p = frontier[f]
            kp = key[p]
            for d in range(offsets.size):
                q = p + offsets[d]
                c = cost[q]
                if c == 0 or c & _OK:
                    continue
                if key[q] == kp + _edge(cost, pairs, d, p, q):  # (UNSET never equals a sum)
                    cost[q] = c | _OK
                    nxt[k] = q
                    k += 1
        frontier, nxt = nxt, frontier
        m = k


# --------------------------------------------------------------------------- per-thread scratch

_NO_PAIRS = np.zeros((0, 0), np.uint8)  # steps cost their target pixel's altitude

_local = threading.local()


def _buffer(name, size, dtype, spare=1.0):
    """This thread's flat scratch array ``name`` of ``dtype``, with room for ``size`` items
    (any values), kept for the thread's next blocks. When short it grows to ``size``, or to
    ``spare`` times its old size if that is more. Arrays sized by the read box (keys, costs,
    slots: 14 bytes a voxel) take exactly the largest box so far: a plan has a few box sizes,
    the edges' and the inside's, and growing them by half again kept up to half as much again
    as any block needed, per thread. Arrays sized by the domain, which differs from block to
    block, take ``spare=1.5``."""
    name = f"{name}_{np.dtype(dtype).name}"
    buf = getattr(_local, name, None)
    if buf is None or buf.size < size:
        old = 0 if buf is None else buf.size
        buf = None
        setattr(_local, name, None)  # the old one freed before the larger one is allocated
        buf = np.empty(max(size, int(spare * old)), dtype)
        setattr(_local, name, buf)
    return buf


def run_flood(seeds, domain, alt, rounds, axes, origin, volume_shape, levels=None):
    """The flood of :func:`emtile.segmenter.kernels.flood` (its arguments; ``rounds`` at most
    :data:`emtile.segmenter.kernels.MAX_ROUNDS`): ``(key, rounds that changed something,
    keyed pixels unset as not carried back to a seed)``."""
    seeds = np.asarray(seeds, bool)
    shape = np.array(seeds.shape, np.int64)
    pad = np.array([1 if ax in axes else 0 for ax in range(3)], np.int64)
    dims = shape + 2 * pad
    n = int(np.prod(dims))
    flat = _buffer("key", n, np.int64)
    padded_keys(seeds, pad, np.array(origin, np.int64), np.array(volume_shape, np.int64), flat)
    cost = _buffer("cost", n, np.uint16)
    done = -1
    if seeds.any() and domain.any():
        nd = pad_inputs(np.asarray(domain, bool), np.asarray(alt, np.uint8), pad, cost)
        strides = (dims[1] * dims[2], dims[2], 1)
        offsets = np.array([d * strides[ax] for ax in range(3) if pad[ax] for d in (-1, 1)],
                           np.int64)
        back = np.arange(offsets.size, dtype=np.int64) ^ 1  # -z <-> +z, ...
        pairs = _NO_PAIRS
        if levels is not None:
            if not pad.all():
                raise ValueError("pair costs need all three axes")
            pairs = _buffer("pairs", 6 * n, np.uint8)[:6 * n].reshape(6, n)
            pad_pairs(np.asarray(levels, np.uint8), pad, pairs)
        index = np.int32 if n < 2**31 else np.int64
        frontier = _buffer("frontier", nd, index, spare=1.5)
        cand = _buffer("cand", nd, index, spare=1.5)
        value = _buffer("value", nd, np.int64, spare=1.5)
        done = flood_rounds(flat, cost, pairs, int(rounds), offsets, back, n,
                            _buffer("slot", n, index), frontier, cand, value)
        if done == rounds:  # still moving at the limit: keep only the keys that a chain of
            # final keys carries back to a seed (unpadded unsets the others)
            mark_supported(flat, cost, pairs, int(rounds), offsets, back, n, frontier, cand)
    key = np.empty(seeds.shape, np.int64)  # by NumPy (see emtile.segmenter.pixels)
    dropped = unpadded(flat, pad, done == rounds, cost, key)
    return key, max(done, 0), dropped
