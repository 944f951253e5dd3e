"""The global step: join ids across block faces, agglomerate, absorb small objects, number them.

It runs once per row of blocks (:func:`emtile.segmenter.blocks.run_graph_rows`, a task of its
own, in a worker; for affinities once, in the driver), on compact arrays gathered from the row's
blocks (never on pixels):
face pairs (ids that are one object), per-fragment sizes and first pixels, and region-graph edges
(altitude sums and pixel counts on the faces between fragments).

Every decision is made on block-invariant quantities only: an object's identity for tie-breaks
and for the final numbering is its *first pixel* (smallest global C-order index), sizes and face
sums are exact integer sums over blocks, so the result does not depend on how the volume was cut
(or on the order of the provisional ids the blocks handed in).

:class:`RegionGraph` is the definition of the merges, in Python; :func:`number_objects` runs the
same merges compiled (:func:`emtile.segmenter.agglomerate.merge_objects`, identical output).

Memory: the graph of a row of blocks is held whole in the process that numbers it (a z-row of
blocks in 2d mode, the whole volume in 3d mode). Measured with :func:`number_objects` on random planar-like graphs
(``examples/bench_segment.py graph``, 300,000 fragments with 2 and 6 faces each): the records
take 24 B per fragment and 40 B per face (per block that sees them), and the step adds at its
peak about 250 B per fragment and 380 B per face (id arrays, the sorted faces, a typed dict of
faces per object, the heap). A 3-D graph has about 6 faces per fragment: about 2.8 kB per
fragment in all, so 10^8 fragments need about 280 GB in one process; segment volumes that large
in parts (predict a region of interest) or in 2d mode, whose graph is one row of blocks'.
"""

import heapq

import numpy as np

__all__ = ["join_faces", "RegionGraph", "number_objects"]


def join_faces(n_ids, pairs):
    """Connected components of ids ``1..n_ids - 1`` joined by ``pairs`` -> component per id.

    Parameters
    ----------
    n_ids : int
        Size of the id space (id 0 is background and stays alone).
    pairs : ndarray of int, shape (k, 2)

    Returns
    -------
    ndarray of int64, shape (n_ids,)
        A component number per id (arbitrary numbering; equal for joined ids).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])),
                       shape=(n_ids, n_ids))
    _, comp = connected_components(graph, directed=False)
    return comp.astype(np.int64)


class RegionGraph:
    """Objects (nodes) with sizes and first pixels, and faces between them (edges).

    Parameters
    ----------
    first : ndarray of int64, shape (n,)
        First pixel (global index) of each node; unique; the node's identity.
    size : ndarray of int64, shape (n,)
        Pixels each node shows in the output.
    edges : ndarray of int64, shape (e, 5) or (e, 5 + bins)
        ``(u, v, altitude_sum, pixels, contact[, histogram...])`` with ``u != v`` node numbers,
        each pair once: the face's mean boundary altitude is ``altitude_sum / pixels`` (no
        evidence when ``pixels`` is 0), ``contact`` counts the touching pixel pairs, the
        histogram counts the evidence pixels per altitude bin up to the merge threshold
        (:func:`emtile.segmenter.kernels.altitude_bins`).
    quantile : float, optional
        Quantile linkage: a face is measured by the bin of its ``quantile``-th evidence pixel
        (:meth:`value`) instead of its mean.

    Merging keeps a union-find forest; a merged object's first pixel is the smaller of the two.
    """

    def __init__(self, first, size, edges, *, quantile=None):
        self.first = np.asarray(first, np.int64).copy()
        self.size = np.asarray(size, np.int64).copy()
        self.quantile = quantile
        n = self.first.size
        self.parent = np.arange(n)
        self.dropped = np.zeros(n, bool)
        self.adj = [dict() for _ in range(n)]
        edges = np.asarray(edges, np.int64)
        for u, v, *face in edges.reshape(-1, max(5, edges.shape[-1])).tolist():
            self.adj[u][v] = list(face)
            self.adj[v][u] = self.adj[u][v]

    def find(self, i):
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def _merge(self, a, b):
        """Join roots ``a`` and ``b``: faces summed, sizes added.

        The one with fewer faces is folded into the other (ties: into the smaller first pixel,
        so the choice depends on the graph alone, never on node numbers). Returns the new root
        and the neighbours whose face with it changed.
        """
        if (len(self.adj[a]), -self.first[a]) < (len(self.adj[b]), -self.first[b]):
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]
        self.first[a] = min(self.first[a], self.first[b])
        self.adj[a].pop(b, None)
        for w, other in self.adj[b].items():
            if w == a:
                continue
            face = self.adj[a].setdefault(w, [0] * len(other))
            face[:] = [x + y for x, y in zip(face, other)]
            nb = self.adj[w]
            del nb[b]
            nb[a] = face
        changed = [w for w in self.adj[b] if w != a]
        self.adj[b] = {}
        return a, changed

    @staticmethod
    def _mean(face):
        return face[0] / face[1] if face[1] else float("inf")

    def value(self, face):
        """What agglomeration compares: the mean altitude, or with ``quantile`` the first
        histogram bin whose cumulative count reaches ``quantile * pixels`` (inf when none does:
        the quantile is above the merge threshold, or there is no evidence)."""
        if self.quantile is None:
            return self._mean(face)
        need, cum = self.quantile * face[1], 0
        for b, count in enumerate(face[3:]):
            cum += count
            if face[1] and cum >= need:
                return float(b)
        return float("inf")

    def _entry(self, u, v):
        face = self.adj[u][v]
        fu, fv = self.first[u], self.first[v]
        return (self.value(face), min(fu, fv), max(fu, fv), face[0], face[1], u, v)

    def agglomerate(self, threshold):
        """Merge neighbours while the lowest mean boundary probability on a face is at most
        ``threshold``, lowest first, re-measuring faces after every merge (mean linkage).
        Faces without evidence (``pixels`` 0) are never merged. With ``quantile`` (quantile
        linkage) the faces' histograms, binned up to the threshold, decide instead: a face
        merges when its ``quantile``-th evidence pixel falls in a bin, lowest bin first.

        Ties go to the pair with the smaller first pixels. Returns the number of merges.
        """
        limit = float(threshold) * 255.0 if self.quantile is None else float("inf")
        heap = [self._entry(u, v) for u in range(len(self.adj)) for v in self.adj[u] if u < v]
        heapq.heapify(heap)
        merges = 0
        while heap:
            mean, _, _, s, c, u, v = heapq.heappop(heap)
            if mean > limit or mean == float("inf"):
                break
            face = self.adj[u].get(v)
            if self.parent[u] != u or self.parent[v] != v or face is None or face[:2] != [s, c]:
                continue  # stale: one side was merged, or the face changed since
            r, changed = self._merge(u, v)
            merges += 1
            for w in changed:  # the survivor's other faces and their heap entries are unchanged
                heapq.heappush(heap, self._entry(r, w))
        return merges

    def absorb_small(self, min_size):
        """Objects smaller than ``min_size`` pixels join the neighbour they share the largest face
        with (``contact``; ties: the lower mean boundary probability, then the smaller first
        pixel), smallest objects first; one with no neighbour is dropped (0 in the output).

        Returns ``(merged, dropped)`` counts.
        """
        if min_size <= 1:
            return 0, 0
        roots = [i for i in range(self.first.size) if self.parent[i] == i and not self.dropped[i]]
        heap = [(int(self.size[i]), int(self.first[i]), i) for i in roots if self.size[i] < min_size]
        heapq.heapify(heap)
        merged = dropped = 0
        while heap:
            size, first, i = heapq.heappop(heap)
            if self.parent[i] != i or self.dropped[i] or self.size[i] != size:
                continue
            if not self.adj[i]:
                self.dropped[i] = True
                dropped += 1
                continue
            best = min(self.adj[i].items(),
                       key=lambda kv: (-kv[1][2], self._mean(kv[1]), self.first[kv[0]]))[0]
            r, _ = self._merge(i, best)
            merged += 1
            if self.size[r] < min_size:
                heapq.heappush(heap, (int(self.size[r]), int(self.first[r]), r))
        return merged, dropped

    def final_ids(self):
        """Output id of every node: objects numbered 1..N by first pixel, 0 for dropped ones.

        Returns
        -------
        ids : ndarray of int64, shape (n,)
        count : int
            N, the number of objects.
        """
        n = self.first.size
        roots = np.array([self.find(i) for i in range(n)], np.int64)
        alive = np.flatnonzero((roots == np.arange(n)) & ~self.dropped)
        order = alive[np.argsort(self.first[alive], kind="stable")]
        number = np.zeros(n, np.int64)
        number[order] = np.arange(1, order.size + 1)
        return number[roots], int(order.size)


def number_objects(n_ids, pairs, stats, edges, *, merge_threshold=None, merge_quantile=None,
                   min_size=0, report=None):
    """The whole global step on compact arrays: ids joined across faces -> objects, agglomerated
    (``merge_threshold``, ws), small ones absorbed, numbered 1..N by first pixel.

    Parameters
    ----------
    n_ids : int
        Size of the id space (0 is background).
    pairs : ndarray of int64, shape (k, 2)
        Ids that are one object (they touch across a block face).
    stats : ndarray of int64, shape (m, 3)
        ``(id, interior pixels, first global index)`` per fragment and block.
    edges : ndarray of int64, shape (e, 5) or (e, 5 + bins)
        ``(u, v, altitude_sum, pixels, contact[, histogram...])`` per fragment pair and block.
    merge_threshold : float, optional
        Agglomerate while the mean boundary probability on a face is at most this.
    merge_quantile : float, optional
        Quantile linkage instead (:class:`RegionGraph`): the edges carry histograms binned up to
        ``merge_threshold``.
    min_size : int
    report : emtile.segmenter.report.SegmentReport, optional
        Given: the fragments, objects and the faces' first scores are added to it.

    Returns
    -------
    number : ndarray of int64, shape (n_ids,)
        Output id of every id (0 for background, unused and dropped ids).
    count : int
    """
    comp = join_faces(n_ids, pairs)
    objects, node = np.unique(comp[stats[:, 0]], return_inverse=True)
    size = np.zeros(objects.size, np.int64)
    np.add.at(size, node, stats[:, 1])
    first = np.full(objects.size, np.iinfo(np.int64).max)
    np.minimum.at(first, node, stats[:, 2])
    if merge_threshold is None and min_size <= 1:  # nothing merges: number by first pixel
        ids = np.zeros(objects.size, np.int64)
        ids[np.argsort(first, kind="stable")] = np.arange(1, objects.size + 1)
        count = objects.size
    else:
        from emtile.segmenter.agglomerate import merge_objects
        from emtile.segmenter.kernels import sum_edge_rows

        u = np.searchsorted(objects, comp[edges[:, 0]])
        v = np.searchsorted(objects, comp[edges[:, 1]])
        keep = u != v
        faces = sum_edge_rows(np.minimum(u, v)[keep], np.maximum(u, v)[keep], edges[keep, 2:])
        ids, count = merge_objects(first, size, faces, merge_threshold=merge_threshold,
                                   merge_quantile=merge_quantile, min_size=min_size)
        if report is not None and merge_threshold is not None:
            from emtile.segmenter.report import face_scores

            report.add_graph(objects.size, count, face_scores(
                faces, merge_threshold, merge_quantile, faces.shape[1] - 5), merge_threshold)
            report = None
    if report is not None:
        report.add_graph(objects.size, count, (), 0.0)
    number = np.zeros(n_ids, np.int64)
    if objects.size:
        pos = np.minimum(np.searchsorted(objects, comp), objects.size - 1)
        hit = objects[pos] == comp
        number[hit] = ids[pos[hit]]
    number[0] = 0
    return number, int(count)
