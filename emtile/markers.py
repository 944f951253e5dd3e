"""Done-markers of a block plan: which blocks have every one of their chunks written.

A blockwise stage (prediction, segmentation) records a block as done only after all of its output
chunks are on disk, so a run that is killed and started again computes only the blocks that are
not recorded, and its output is the same as an uninterrupted run's.

The markers are one ``uint8`` Zarr array inside the output group (1 = done), one byte per block,
**chunked by** :data:`CHUNK` **blocks and written only by the driver** (the process that started the
run): workers never write it, so no two processes ever write one marker chunk. The driver records
a block when its worker reports the chunks written; a block whose worker died after writing but
before reporting is simply computed again (the same bytes). Recording is buffered:
:meth:`BlockMarkers.record` marks blocks in memory and writes the touched marker chunks at most
every ``flush_every`` seconds (and on :meth:`~BlockMarkers.flush`), so a plan of millions of small
blocks does not rewrite a marker chunk per block; a killed driver loses at most that many seconds
of records, which the next run recomputes.

Why grouped, not one marker file per block: resuming reads the whole array. With one chunk per
block a 10^6-block plan is 10^6 files to open on every resume; grouped in chunks of 16,384 it is 62
reads (``examples/bench_markers.py`` measures both).

Beside the markers, :func:`content_token`: the token of an input that a resumed run compares
with the one its interrupted run recorded, so blocks marked done are kept only while the input
they were computed from is unchanged.
"""

import glob as _glob
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np

from emtile._errors import EmtileError

__all__ = ["BlockMarkers", "MARKERS", "CHUNK", "content_token"]

MARKERS = "emtile_blocks"  # the array's name inside the output group
CHUNK = 16384  # blocks per marker chunk


class BlockMarkers:
    """The done-markers of ``n`` blocks, stored in a Zarr array; see the module docstring.

    Use :meth:`create` (a new output) or :meth:`open` (resuming), not the constructor.
    """

    def __init__(self, array, *, flush_every=0.0):
        self.array = array
        self.n = int(array.shape[0])
        self.chunk = int(array.chunks[0])
        self.flush_every = float(flush_every)
        self._dirty = {}  # marker chunk index -> its values, recorded but not yet written
        self._last_flush = -math.inf  # the first record is written at once: progress is durable
        # from the first block on, whatever flush_every is

    @classmethod
    def create(cls, group, n_blocks, *, name=MARKERS, chunk=CHUNK, flush_every=0.0):
        """A new all-zero marker array ``name`` in the Zarr ``group`` (opened for writing)."""
        n = int(n_blocks)
        array = group.create_array(name, shape=(n,), chunks=(max(1, min(chunk, n)),),
                                   dtype="uint8", fill_value=0, compressors=None)
        return cls(array, flush_every=flush_every)

    @classmethod
    def open(cls, group, n_blocks, *, name=MARKERS, flush_every=0.0):
        """The markers ``name`` of ``group``, or None when they are missing or not for
        ``n_blocks`` blocks (a store whose set-up did not finish, or another plan)."""
        try:
            array = group[name]
        except (KeyError, FileNotFoundError, ValueError, OSError):
            return None
        if getattr(array, "shape", None) != (int(n_blocks),) or array.dtype != np.uint8:
            return None
        return cls(array, flush_every=flush_every)

    def __len__(self):
        return self.n

    def done(self):
        """Boolean array, one entry per block: recorded as done (on disk or pending)."""
        flags = self.array[:] != 0
        for c, values in self._dirty.items():
            flags[c * self.chunk:c * self.chunk + len(values)] |= values != 0
        return flags

    def count(self):
        """How many blocks are recorded as done."""
        return int(self.done().sum())

    def todo(self):
        """Block indices not yet done, in order, read one marker chunk at a time (a plan of
        any size is never held in memory whole)."""
        for c in range(-(-self.n // self.chunk)):
            a = c * self.chunk
            values = self._dirty.get(c)
            if values is None:
                values = self.array[a:a + self.chunk]
            for i in np.flatnonzero(values == 0):
                yield a + int(i)

    def record(self, ids):
        """Mark blocks ``ids`` as done; written now or within ``flush_every`` seconds."""
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        bad = ids[(ids < 0) | (ids >= self.n)]
        if bad.size:
            raise IndexError(f"block {int(bad[0])} is outside the plan of {self.n} blocks")
        chunks = ids // self.chunk
        for c in np.unique(chunks).tolist():
            values = self._dirty.get(c)
            if values is None:
                a = c * self.chunk
                values = self._dirty[c] = np.array(self.array[a:a + self.chunk])
            values[ids[chunks == c] - c * self.chunk] = 1
        if time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def flush(self):
        """Write every marker chunk touched since the last flush."""
        for c, values in sorted(self._dirty.items()):
            a = c * self.chunk
            self.array[a:a + len(values)] = values
        self._dirty.clear()
        self._last_flush = time.monotonic()


# --------------------------------------------------------------------------- content token


def content_token(path):
    """A cheap token that changes whenever the data an input path reads change, even in place.

    The SHA-256 of the name, size, ``mtime_ns`` and ``ctime_ns`` of every file the input reads:
    a TIFF or HDF5 file itself; the images of a folder or glob; for a Zarr store the metadata
    documents at the path given and every file (chunks and metadata) under the array read.
    Any write to a file changes its ctime (which no user can set back), so a chunk rewritten in
    place with the same size and a restored mtime still changes the token; reading no data keeps
    it cheap (one ``stat`` per file: see ``docs/GUARANTEES.md`` for its cost on 10^5 chunks).

    Parameters
    ----------
    path : str, Path or Location
        Anything :func:`emtile.open_volume` reads. On an object store (``s3://``, ``gs://``,
        ``https://``) the same, from one listing: every object's key, size, ETag and
        last-modified time (S3 and GCS give each rewrite a new time; an ETag that stays is the
        same bytes); over ``http(s)://``, which lists nothing, only the metadata documents'.

    Returns
    -------
    str
        64 hex digits.
    """
    from emtile import store
    from emtile.locations import Location, is_url
    from emtile.volume import natural_key, open_volume

    if isinstance(path, Location) and not path.is_local or is_url(path):
        return _url_token(Location(path))
    text = str(path)
    h = hashlib.sha256()
    if any(ch in text for ch in "*?["):
        files = sorted(_glob.glob(text), key=natural_key)
        folders = []
    else:
        h5 = store.split_hdf5_path(text)
        p = Path(h5[0] if h5 is not None else text)
        if not p.exists():
            raise EmtileError(f"input {text!r} does not exist")
        if p.is_dir() and store.is_zarr_store(p):
            files = [p / n for n in ("zarr.json", ".zarray", ".zgroup", ".zattrs")
                     if (p / n).exists()]
            inner = getattr(open_volume(p), "path", "") or ""  # the array read (a CheckedArray)
            folders = [p / inner] if inner else [p]
        elif p.is_dir():
            files, folders = sorted((f for f in p.iterdir() if f.is_file()), key=natural_key), []
        else:
            files, folders = [p], []
    for f in files:
        _hash_stat(h, str(f), os.stat(f))
    for folder in folders:
        _hash_tree(h, str(folder))
    return h.hexdigest()


def _hash_stat(h, name, st):
    h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())


def _hash_tree(h, folder):
    """Every file under ``folder`` (names relative to it, in sorted order): ``os.scandir``
    recursion, one ``stat`` per file."""
    stack = [("", folder)]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)
        for e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir():
                stack.append((name, e.path))
            else:
                _hash_stat(h, name, e.stat())


def _url_token(loc):
    """:func:`content_token` of a Zarr store at a URL: its metadata documents at the path given
    and every object under the array read, from the store's listing (no data read)."""
    from emtile.volume import open_volume

    inner = getattr(open_volume(loc), "path", "") or ""
    fs = loc.filesystem()
    h = hashlib.sha256()
    base = loc.fs_path().rstrip("/")
    for name in ("zarr.json", ".zarray", ".zgroup", ".zattrs"):
        try:
            _hash_info(h, name, fs.info(f"{base}/{name}"))
        except FileNotFoundError:
            pass
    if loc.read_only:  # http(s): no listing to rely on; published data, metadata only
        return h.hexdigest()
    root = f"{base}/{inner}".rstrip("/") + "/"
    for key, info in sorted(fs.find(root, detail=True).items()):
        _hash_info(h, key[len(root):], info)
    return h.hexdigest()


def _hash_info(h, name, info):
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or ""
    when = info.get("LastModified") or info.get("updated") or info.get("mtime") or ""
    h.update(f"{name}\0{info.get('size')}\0{tag}\0{when}\n".encode())
