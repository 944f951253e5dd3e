"""The region graph of a segmentation from affinities, kept in its output for ``recut``.

The global step of an affinity run (:func:`global_step`) first numbers the *fragments* (the ids
joined across block faces, before any merge) 1..F by first pixel, sums the blocks' edges into
one face per fragment pair, stores that graph, and only then agglomerates it
(:func:`agglomerate`). Pass 3 writes the fragment id of every voxel beside the labels. A
``recut`` (:mod:`emtile.segmenter.recut`) reads the stored graph, agglomerates it at another
``merge_threshold`` and maps the stored fragments: the graph and the merges are the same
functions of the same arrays, so its labels are the bytes a fresh run at that threshold writes.

Layout (inside the output group; a plain Zarr group, not an NGFF image)::

    emtile_graph/fragments  uint64 (Z, Y, X)   fragment id per voxel (0: none), block chunks
    emtile_graph/first      int64 (F,)         first voxel (global C-order index) of fragment i+1
    emtile_graph/size       int64 (F,)         its linked (interior) voxels
    emtile_graph/faces      int64 (E, 5 + 32)  (u, v, altitude_sum, pairs, contact, histogram)
                                               with u < v fragment indices (id - 1)

The group's attributes record what a recut needs: method, merge_quantile, min_size and the
merge_threshold the labels at ``"0"`` were cut at.
"""

import numpy as np

__all__ = ["GRAPH", "fragment_graph", "agglomerate", "write_graph", "read_graph",
           "global_step"]

GRAPH = "emtile_graph"
_CHUNK = 2**20


def fragment_graph(n_ids, pairs, stats, edges):
    """Fragments numbered by first pixel and their faces summed.

    Returns
    -------
    number : ndarray of int64, shape (n_ids,)
        Fragment id (1..F) of every provisional id, 0 for background and unused ids.
    first, size : ndarray of int64, shape (F,)
    faces : ndarray of int64, shape (E, edges' width), fragment indices ``u < v``
    """
    from emtile.segmenter.graph import join_faces
    from emtile.segmenter.kernels import sum_edge_rows

    comp = join_faces(n_ids, pairs)
    objects, node = np.unique(comp[stats[:, 0]], return_inverse=True)
    size = np.zeros(objects.size, np.int64)
    np.add.at(size, node, stats[:, 1])
    first = np.full(objects.size, np.iinfo(np.int64).max)
    np.minimum.at(first, node, stats[:, 2])
    order = np.argsort(first, kind="stable")
    rank = np.empty(objects.size, np.int64)
    rank[order] = np.arange(objects.size)
    u = rank[np.searchsorted(objects, comp[edges[:, 0]])]
    v = rank[np.searchsorted(objects, comp[edges[:, 1]])]
    keep = u != v
    faces = sum_edge_rows(np.minimum(u, v)[keep], np.maximum(u, v)[keep], edges[keep, 2:])
    if not faces.size:
        faces = np.zeros((0, edges.shape[1]), np.int64)
    number = np.zeros(n_ids, np.int64)
    if objects.size:
        pos = np.minimum(np.searchsorted(objects, comp), objects.size - 1)
        hit = objects[pos] == comp
        number[hit] = rank[pos[hit]] + 1
    number[0] = 0
    return number, first[order], size[order], faces


def agglomerate(first, size, faces, *, method, merge_threshold, merge_quantile, min_size):
    """Output id of every fragment id (index 0: background) and the object count."""
    from emtile.segmenter.affinity import quantile_limit
    from emtile.segmenter.agglomerate import merge_objects

    ws = method == "ws"
    ids, count = merge_objects(
        first, size, faces, merge_threshold=merge_threshold if ws else None,
        merge_quantile=merge_quantile if ws else None, min_size=min_size,
        quantile_limit=quantile_limit(merge_threshold) if ws else None)
    return np.concatenate([[0], ids]).astype(np.int64), count


def write_graph(group, first, size, faces, attrs):
    """The graph into ``group[GRAPH]`` (replaced whole: a resumed run writes the same)."""
    graph = group.require_group(GRAPH)
    for name, values in (("first", first), ("size", size), ("faces", faces)):
        rows = max(1, min(len(values), _CHUNK))
        graph.create_array(name, shape=values.shape, chunks=(rows,) + values.shape[1:],
                           dtype="int64", fill_value=0, overwrite=True)
        if values.size:
            graph[name][...] = values
    graph.attrs.update(attrs)


def read_graph(group):
    """``(first, size, faces, attrs)`` of a stored graph."""
    graph = group[GRAPH]
    return (np.asarray(graph["first"][...]), np.asarray(graph["size"][...]),
            np.asarray(graph["faces"][...]), graph.attrs.asdict())


def global_step(group, temp, records, n_blocks, n_ids, *, method, merge_threshold,
                merge_quantile, min_size, table):
    """The affinity run's global step: the fragment graph stored, agglomerated; the provisional
    -> fragment id table (``ftable``) and provisional -> output id table written. Returns N."""
    pairs, stats, edges = records.read(range(n_blocks), cache=False)
    number, first, size, faces = fragment_graph(n_ids, pairs, stats, edges)
    write_graph(group, first, size, faces,
                {"method": method, "merge_quantile": merge_quantile, "min_size": int(min_size),
                 "merge_threshold": merge_threshold, "fragments": int(first.size)})
    ids, count = agglomerate(first, size, faces, method=method,
                             merge_threshold=merge_threshold, merge_quantile=merge_quantile,
                             min_size=min_size)
    table(temp, n_ids, "ftable")[:] = number
    table(temp, n_ids, "table")[:] = ids[number]
    return count
