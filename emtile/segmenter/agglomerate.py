"""Numba kernels of the region graph's merges: :class:`emtile.segmenter.graph.RegionGraph`'s
decisions, in the same order, compiled.

:class:`~emtile.segmenter.graph.RegionGraph` is the definition (readable Python, a heap of faces
and a dict of faces per object); :func:`merge_objects` makes the same merges with a typed dict per
object, face sums in arrays and a heap of the same tuples, so its output is identical
(``tests/test_segment.py`` compares them on random graphs, ties everywhere included). On a random
planar-like graph of 350,000 fragments and 800,000 faces (``examples/bench_segment.py graph
--reference``), the whole global step took 5.3 s against 25 s for the Python merges alone, both
on a loaded 2-core machine (to be re-taken on a quiet one).
"""

import heapq

import numpy as np
from numba import njit, types
from numba.typed import Dict, List

__all__ = ["merge_objects"]


@njit(cache=True, nogil=True)
def _mean(s, c):
    return s / c if c else np.inf


@njit(cache=True, nogil=True)
def _value(f, s, c, h, q):
    """The mean altitude of face ``f``, or with ``q > 0`` (quantile linkage) the first bin of its
    histogram whose cumulative count reaches ``q * pixels`` (inf when none does)."""
    if q <= 0:
        return _mean(s[f], c[f])
    need = q * c[f]
    cum = 0
    for b in range(h.shape[1]):
        cum += h[f, b]
        if c[f] and cum >= need:
            return float(b)
    return np.inf


@njit(cache=True, nogil=True)
def _build(n, edges):
    """One dict per object: neighbour -> face number (a row of ``edges``)."""
    adj = List()
    for _ in range(n):
        adj.append(Dict.empty(types.int64, types.int64))
    for e in range(edges.shape[0]):
        adj[edges[e, 0]][edges[e, 1]] = e
        adj[edges[e, 1]][edges[e, 0]] = e
    return adj


@njit(cache=True, nogil=True)
def _merge(a, b, adj, parent, first, size, s, c, t, h):
    """Join roots ``a`` and ``b`` as ``RegionGraph._merge``: the one with fewer faces is folded
    into the other (ties: into the smaller first pixel). Returns the new root and the neighbours
    whose face with it changed."""
    if len(adj[a]) < len(adj[b]) or (len(adj[a]) == len(adj[b]) and first[a] > first[b]):
        a, b = b, a
    parent[b] = a
    size[a] += size[b]
    first[a] = min(first[a], first[b])
    if b in adj[a]:
        del adj[a][b]
    changed = List.empty_list(types.int64)
    for w, e in adj[b].items():
        if w == a:
            continue
        if w in adj[a]:
            f = adj[a][w]
            s[f] += s[e]
            c[f] += c[e]
            t[f] += t[e]
            for k in range(h.shape[1]):
                h[f, k] += h[e, k]
        else:
            f = e
            adj[a][w] = f
        del adj[w][b]
        adj[w][a] = f
        changed.append(w)
    adj[b].clear()
    return a, changed


@njit(cache=True, nogil=True)
def _entry(u, v, adj, first, s, c, h, q):
    f = adj[u][v]
    fu, fv = first[u], first[v]
    return (_value(f, s, c, h, q), min(fu, fv), max(fu, fv), s[f], c[f], u, v)


@njit(cache=True, nogil=True)
def _agglomerate(limit, q, adj, parent, first, size, s, c, t, h):
    # Faces above the limit (or with no evidence: infinite) never merge: RegionGraph pops them
    # only to stop, so they are left out of the heap (the same merges, a smaller heap)
    heap = [(0.0, 0, 0, 0, 0, 0, 0)]  # typed by its first entry, removed below
    heap.pop()
    for u in range(len(adj)):
        for v in adj[u].keys():
            if u < v:
                entry = _entry(u, v, adj, first, s, c, h, q)
                if entry[0] <= limit and entry[0] != np.inf:
                    heap.append(entry)
    heapq.heapify(heap)
    merges = 0
    while heap:
        mean, _, _, hs, hc, u, v = heapq.heappop(heap)
        if parent[u] != u or parent[v] != v or v not in adj[u]:
            continue  # stale: one side was merged
        f = adj[u][v]
        if s[f] != hs or c[f] != hc:
            continue  # stale: the face changed since
        r, changed = _merge(u, v, adj, parent, first, size, s, c, t, h)
        merges += 1
        for w in changed:
            entry = _entry(r, w, adj, first, s, c, h, q)
            if entry[0] <= limit and entry[0] != np.inf:
                heapq.heappush(heap, entry)
    return merges


@njit(cache=True, nogil=True)
def _absorb_small(min_size, adj, parent, dropped, first, size, s, c, t, h):
    heap = [(0, 0, 0)]
    heap.pop()
    for i in range(len(adj)):
        if parent[i] == i and not dropped[i] and size[i] < min_size:
            heap.append((size[i], first[i], i))
    heapq.heapify(heap)
    while heap:
        sz, _, i = heapq.heappop(heap)
        if parent[i] != i or dropped[i] or size[i] != sz:
            continue
        if len(adj[i]) == 0:
            dropped[i] = True
            continue
        best, key_t, key_m, key_f = -1, 0, 0.0, 0
        for w, e in adj[i].items():  # the largest contact, then the lowest mean, then first
            m = _mean(s[e], c[e])
            if best < 0 or (-t[e], m, first[w]) < (key_t, key_m, key_f):
                best, key_t, key_m, key_f = w, -t[e], m, first[w]
        r, _ = _merge(i, best, adj, parent, first, size, s, c, t, h)
        if size[r] < min_size:
            heapq.heappush(heap, (size[r], first[r], r))


@njit(cache=True, nogil=True)
def _roots(parent):
    out = np.empty(parent.size, np.int64)
    for i in range(parent.size):
        r = i
        while parent[r] != r:
            r = parent[r]
        out[i] = r
    return out


def merge_objects(first, size, edges, *, merge_threshold=None, merge_quantile=None, min_size=0,
                  quantile_limit=None):
    """Agglomerate (``merge_threshold``), absorb small objects (``min_size``) and number the
    objects by first pixel: ``RegionGraph(first, size, edges, quantile=merge_quantile)`` then
    ``agglomerate``, ``absorb_small`` and ``final_ids``, with the same result.

    Parameters
    ----------
    first, size : ndarray of int64, shape (n,)
    edges : ndarray of int64, shape (e, 5) or (e, 5 + bins)
        ``(u, v, altitude_sum, pixels, contact[, histogram...])``, each pair once, ``u != v``.
    merge_threshold : float, optional
    merge_quantile : float, optional
        Quantile linkage on the edges' histograms (binned up to ``merge_threshold``).
    min_size : int
    quantile_limit : int, optional
        Quantile linkage on histograms over the whole altitude range (affinities,
        :mod:`emtile.segmenter.affinity`): merge faces whose quantile bin is at most this.

    Returns
    -------
    ids : ndarray of int64, shape (n,)
        Output id of every node (1..N by first pixel, 0 for dropped ones).
    count : int
    """
    first = np.array(first, np.int64)
    size = np.array(size, np.int64)
    edges = np.asarray(edges, np.int64)
    edges = edges.reshape(-1, max(5, edges.shape[-1]))
    n = first.size
    s, c, t = (np.ascontiguousarray(edges[:, k]) for k in (2, 3, 4))
    h = np.ascontiguousarray(edges[:, 5:])
    adj = _build(n, np.ascontiguousarray(edges[:, :2]))
    parent = np.arange(n, dtype=np.int64)
    dropped = np.zeros(n, np.bool_)
    if merge_threshold is not None:
        q = -1.0 if merge_quantile is None else float(merge_quantile)
        limit = float(merge_threshold) * 255.0 if merge_quantile is None else np.inf
        if merge_quantile is not None and quantile_limit is not None:
            limit = float(quantile_limit)
        _agglomerate(limit, q, adj, parent, first, size, s, c, t, h)
    if min_size > 1:
        _absorb_small(int(min_size), adj, parent, dropped, first, size, s, c, t, h)
    roots = _roots(parent)
    alive = np.flatnonzero((roots == np.arange(n)) & ~dropped)
    order = alive[np.argsort(first[alive], kind="stable")]
    number = np.zeros(n, np.int64)
    number[order] = np.arange(1, order.size + 1)
    return number[roots], int(order.size)
