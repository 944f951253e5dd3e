"""The per-block records of pass 2, stored grouped: a few files per flush, never one per block.

Pass 2 of ``emtile segment`` gives, per block, a *record*: the ids joined across its faces
(pairs, shape (k, 2)), its fragments' sizes and first pixels (stats, (m, 3)) and its region-graph
edges (edges, (e, 5), or (e, 5 + bins) with face histograms: the store's ``edge_width``), all
int64, which the global step needs from every block. The worker that computed the block returns
its record with the block's result (:func:`pack`); the driver, the only process that writes here
(as for the markers, :mod:`emtile.markers`), buffers the records and writes each flush's records
as one *part*, then their rows of the index, and only then records the blocks as done. So a plan
of 10^6 blocks writes one part per flush (up to :data:`PART_BLOCKS` blocks or :data:`PART_BYTES`
bytes, or what arrived in the driver's flush interval), not 10^6 arrays; reading a row of blocks
back reads the few parts that hold it.

Layout (inside the run's working group)::

    records         attribute edge_width  columns of the edges table (5, or 5 + histogram bins)
    records/index   int64 (n_blocks, 5)   part, offset, pairs, stats, edges per block; -1: none
    records/pK      int64 (L,), one chunk  the records of the K-th flush, one after the other

A driver killed after writing a part and before its index rows leaves that part unreferenced; the
next run numbers its parts from one past the largest part referenced, so it replaces it.
"""

import collections
import threading

import numpy as np

__all__ = ["pack", "record_nbytes", "RecordStore", "PARTS", "PART_BLOCKS", "PART_BYTES",
           "CACHE_BYTES"]

PARTS = (("pairs", 2), ("stats", 3), ("edges", 5))  # name and width of each table of a record
# (the edges' width is the store's edge_width)
PART_BLOCKS = 1024  # blocks' records per part at most (the driver flushes when either is reached)
PART_BYTES = 32 * 2**20  # bytes of records per part, about
INDEX_ROWS = 4096  # index rows per chunk
CACHE_BYTES = 2**28  # parts a reader keeps in memory (the most recently used)


def pack(*, pairs, stats, edges):
    """One block's record: ``(rows per table, flat int64 vector)``, small and picklable."""
    tables = {"pairs": pairs, "stats": stats, "edges": edges}
    flat = np.concatenate([np.asarray(tables[name], np.int64).reshape(-1) for name, _ in PARTS])
    return tuple(len(tables[name]) for name, _ in PARTS), flat


def record_nbytes(record):
    """Bytes of a packed record's tables."""
    return int(record[1].nbytes)


class RecordStore:
    """The records of a plan of ``n`` blocks in the Zarr group ``group``; see the module
    docstring. Use :meth:`create` or :meth:`open`, not the constructor."""

    def __init__(self, group):
        self.group = group
        self.index = group["index"]
        width = int(group.attrs.get("edge_width", 5))
        self.parts = tuple((name, width if name == "edges" else w) for name, w in PARTS)
        self.n = int(self.index.shape[0])
        parts = np.asarray(self.index[:, 0])
        self.next_part = int(parts.max(initial=-1)) + 1
        self._cache = collections.OrderedDict()  # part -> its data, least recently used first
        self._cached = 0  # bytes in the cache
        self._lock = threading.Lock()

    @classmethod
    def create(cls, parent, n_blocks, *, name="records", edge_width=5):
        """A new, empty record store ``name`` in the Zarr group ``parent``, for edges of
        ``edge_width`` columns."""
        group = parent.create_group(name)
        group.attrs["edge_width"] = int(edge_width)
        n = int(n_blocks)
        group.create_array("index", shape=(n, 5), chunks=(max(1, min(n, INDEX_ROWS)), 5),
                           dtype="int64", fill_value=-1, compressors=None)
        return cls(group)

    @classmethod
    def open(cls, parent, n_blocks, *, name="records"):
        """The record store ``name`` of ``parent``, or None when it is missing or not for
        ``n_blocks`` blocks."""
        try:
            group = parent[name]
            index = group["index"]
        except (KeyError, FileNotFoundError, ValueError, OSError):
            return None
        if getattr(index, "shape", None) != (int(n_blocks), 5):
            return None
        return cls(group)

    def write(self, records):
        """Write ``records`` (``{block id: packed record}``) as one part, then their index rows.

        Only the driver calls this, for blocks not yet recorded as done."""
        if not records:
            return
        ids = np.array(sorted(records), np.int64)
        flats = [records[int(i)][1] for i in ids]
        sizes = np.array([f.size for f in flats], np.int64)
        rows = np.array([records[int(i)][0] for i in ids], np.int64).reshape(-1, 3)
        data = np.concatenate(flats) if sizes.sum() else np.zeros(1, np.int64)
        part = self.next_part
        self.group.create_array(f"p{part}", shape=data.shape, chunks=data.shape, dtype="int64",
                                compressors=None, overwrite=True)[:] = data
        self.next_part += 1
        values = np.column_stack([np.full(ids.size, part), np.cumsum(sizes) - sizes, rows])
        chunk = int(self.index.chunks[0])
        for c in np.unique(ids // chunk).tolist():  # one read-modify-write per index chunk
            lo, hi = c * chunk, min(self.n, (c + 1) * chunk)
            sel = (ids >= lo) & (ids < hi)
            rows_c = np.asarray(self.index[lo:hi])
            rows_c[ids[sel] - lo] = values[sel]
            self.index[lo:hi] = rows_c

    def read(self, block_ids, *, cache=True):
        """Concatenated ``(pairs, stats, edges)`` of the records of ``block_ids``, in their
        order. Parts are read whole; with ``cache`` the most recently used are kept
        (:data:`CACHE_BYTES`), so reading the rows of a plan one after the other reads each part
        about once. ``cache=False`` (one pass over every block, the affinity run's global step)
        keeps only the part being copied: the tables are allocated once and filled part by part,
        so the peak is the tables and one part, not twice the records."""
        ids = np.asarray(block_ids, np.int64).reshape(-1)
        if not ids.size:
            return tuple(np.zeros((0, w), np.int64) for _, w in self.parts)
        lo, hi = int(ids.min()), int(ids.max()) + 1
        index = np.asarray(self.index[lo:hi])[ids - lo]
        missing = np.flatnonzero(index[:, 0] < 0)
        if missing.size:  # the markers say done only after the record is written
            raise RuntimeError(f"internal error: no record for block {int(ids[missing[0]])}")
        out = [np.empty((int(index[:, 2 + j].sum()), width), np.int64)
               for j, (_, width) in enumerate(self.parts)]
        filled = [0] * len(self.parts)
        last = (None, None)  # the part read last (blocks of one part follow each other)
        for part, offset, *rows in index.tolist():
            if part != last[0]:
                last = (part, self._part(part) if cache else self._read_part(part))
            data, pos = last[1], offset
            for j, ((_, width), n) in enumerate(zip(self.parts, rows)):
                out[j][filled[j]:filled[j] + n] = data[pos:pos + n * width].reshape(n, width)
                filled[j] += n
                pos += n * width
        return tuple(out)

    def _read_part(self, part):
        return np.asarray(self.group[f"p{part}"][:])

    def _part(self, part):
        with self._lock:  # rows of one process may be read in several threads
            data = self._cache.get(part)
            if data is not None:
                self._cache.move_to_end(part)
                return data
        data = self._read_part(part)
        with self._lock:
            if part not in self._cache:
                self._cache[part] = data
                self._cached += data.nbytes
            while self._cached > CACHE_BYTES and len(self._cache) > 1:
                self._cached -= self._cache.popitem(last=False)[1].nbytes
        return data
