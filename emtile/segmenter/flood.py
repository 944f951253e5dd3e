"""Numba kernel of :func:`emtile.segmenter.kernels.flood`: the synchronous rounds, frontier only.

A round evaluates only the domain pixels next to a pixel whose key changed in the previous
round: any other pixel would compute the same minimum as before (its neighbours' keys did not
change), so the result is that of evaluating every pixel every round, at the cost of the pixels
that move. Measured on a 3 x 512 x 512 ISBI-like map: the NumPy version (every pixel, every
round) took 1.4 s of a 2.4 s ws run; this one takes a few hundredths.
"""

import numpy as np
from numba import njit

COST_SHIFT = 44


@njit(cache=True, nogil=True)
def flood_rounds(key, domain, alt, rounds, shape, axes):
    """Run up to ``rounds`` rounds on the flat arrays ``key`` (int64, updated in place),
    ``domain`` (bool) and ``alt`` (uint8) of a C-order array of ``shape`` (3 ints); ``axes``
    (3 bools) says along which axes pixels are neighbours. Returns the rounds that changed
    something."""
    n = key.size
    nz, ny, nx = shape[0], shape[1], shape[2]
    strides = (ny * nx, nx, 1)
    sizes = (nz, ny, nx)
    mark = np.zeros(n, np.int32)
    frontier = np.empty(n, np.int64)
    cand = np.empty(n, np.int64)
    value = np.empty(n, np.int64)
    m = 0
    unset = np.int64(0x7FFFFFFFFFFFFFFF)
    for p in range(n):
        if key[p] != unset:
            frontier[m] = p
            m += 1
    for r in range(1, rounds + 1):
        k = 0  # domain neighbours of the frontier
        for f in range(m):
            p = frontier[f]
            coord = (p // strides[0], (p // strides[1]) % ny, p % nx)
            for ax in range(3):
                if not axes[ax]:
                    continue
                for d in (-1, 1):
                    c = coord[ax] + d
                    if c < 0 or c >= sizes[ax]:
                        continue
                    q = p + d * strides[ax]
                    if domain[q] and mark[q] != r:
                        mark[q] = r
                        cand[k] = q
                        k += 1
        for j in range(k):  # new keys from the previous round's keys only
            q = cand[j]
            best = key[q]
            step = (np.int64(alt[q]) + 1) << COST_SHIFT
            coord = (q // strides[0], (q // strides[1]) % ny, q % nx)
            for ax in range(3):
                if not axes[ax]:
                    continue
                for d in (-1, 1):
                    c = coord[ax] + d
                    if c < 0 or c >= sizes[ax]:
                        continue
                    nb = key[q + d * strides[ax]]
                    if nb == unset:
                        continue
                    v = nb + step
                    if v < best:
                        best = v
            value[j] = best
        m = 0
        for j in range(k):
            q = cand[j]
            if value[j] < key[q]:
                key[q] = value[j]
                frontier[m] = q
                m += 1
        if m == 0:
            return r - 1
    return rounds


@njit(cache=True, nogil=True)
def keep_supported(key, domain, alt, rounds, shape, axes):
    """Unset every domain pixel whose key is not carried by a chain of neighbours back to a
    seed in the final state: ``key[q] == key[p] + step(q)`` along the chain (in place).

    After the last round a pixel can hold a key whose path ran through a neighbour that a
    better path reached in that same last round; such a label would be cut off from its seed.
    A supported chain is at most ``rounds`` long (each link was set a round after the next), so
    ``rounds`` breadth-first rounds from the seeds find every supported pixel. Returns the
    number of pixels unset."""
    n = key.size
    ny, nx = shape[1], shape[2]
    strides = (ny * nx, nx, 1)
    sizes = (shape[0], ny, nx)
    unset = np.int64(0x7FFFFFFFFFFFFFFF)
    ok = np.zeros(n, np.bool_)
    frontier = np.empty(n, np.int64)
    nxt = np.empty(n, np.int64)
    m = 0
    for p in range(n):
        if key[p] != unset and not domain[p]:
            ok[p] = True
            frontier[m] = p
            m += 1
    for _ in range(rounds):
        k = 0
        for f in range(m):
            p = frontier[f]
            coord = (p // strides[0], (p // strides[1]) % ny, p % nx)
            for ax in range(3):
                if not axes[ax]:
                    continue
                for d in (-1, 1):
                    c = coord[ax] + d
                    if c < 0 or c >= sizes[ax]:
                        continue
                    q = p + d * strides[ax]
                    if ok[q] or not domain[q] or key[q] == unset:
                        continue
                    if key[q] == key[p] + ((np.int64(alt[q]) + 1) << COST_SHIFT):
                        ok[q] = True
                        nxt[k] = q
                        k += 1
        if k == 0:
            break
        frontier, nxt = nxt, frontier
        m = k
    dropped = 0
    for p in range(n):
        if domain[p] and key[p] != unset and not ok[p]:
            key[p] = unset
            dropped += 1
    return dropped
