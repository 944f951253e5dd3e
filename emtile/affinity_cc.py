"""The validation segmentation of an affinity map: connected components of nearest neighbours.

The rule, one function (:func:`segment_affinities`), so that training's validation can swap it
for the project's segmenter later: two neighbouring voxels join where the affinity of their
nearest-neighbour offset (``(-1, 0, 0)``, ``(0, -1, 0)``, ``(0, 0, -1)``) exceeds ``threshold``
(strictly); the objects are the connected components of that graph
(:func:`scipy.sparse.csgraph.connected_components`), numbered from 1 in order of their first
voxel. Long-range channels are not used. Every voxel belongs to an object (a voxel joined to
nothing is an object of its own), so VOI split counts what the network leaves unjoined.
"""

import numpy as np

from emtile._errors import EmtileError

__all__ = ["segment_affinities"]


def segment_affinities(aff, offsets, threshold=0.5):
    """Object ids of an affinity map: components of voxels joined by nearest-neighbour affinity.

    Parameters
    ----------
    aff : ndarray, shape (K, Z, Y, X) (or (K, Y, X))
        Affinities, 1 = same object; channel ``k`` belongs to ``offsets[k]``.
    offsets : sequence of int tuples
        Must include the nearest-neighbour offset (-1 along one axis) of every axis longer
        than 1.
    threshold : float
        Pairs with ``aff > threshold`` are joined.

    Returns
    -------
    ndarray of uint32, shape (Z, Y, X)

    Examples
    --------
    One row of 4 voxels; channel (0, -1) pairs each voxel with its left neighbour:

    >>> a = np.array([[[0.0, 0.9, 0.2, 0.7]]])
    >>> segment_affinities(a, [(0, -1)]).tolist()
    [[1, 1, 2, 2]]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    aff = np.asarray(aff)
    offsets = [tuple(int(v) for v in o) for o in offsets]
    shape = aff.shape[1:]
    ndim = len(shape)
    index = np.arange(int(np.prod(shape))).reshape(shape)
    rows, cols = [], []
    for axis in range(ndim):
        nn = tuple(-1 if a == axis else 0 for a in range(ndim))
        if shape[axis] < 2:
            continue
        if nn not in offsets:
            raise EmtileError(f"offsets={offsets!r} lack the nearest-neighbour offset {nn}: the "
                              "validation segmentation joins voxels along it")
        here = tuple(slice(1, None) if a == axis else slice(None) for a in range(ndim))
        there = tuple(slice(None, -1) if a == axis else slice(None) for a in range(ndim))
        joined = aff[offsets.index(nn)][here] > threshold
        rows.append(index[here][joined])
        cols.append(index[there][joined])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows), np.uint8), (rows, cols)), shape=(index.size,) * 2)
    _, comp = connected_components(graph, directed=False)
    _, first, inverse = np.unique(comp, return_index=True, return_inverse=True)
    order = np.empty(len(first), np.int64)
    order[np.argsort(first)] = np.arange(len(first))  # number by first voxel
    return (order[inverse] + 1).astype(np.uint32).reshape(shape)
