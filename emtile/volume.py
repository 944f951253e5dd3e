"""Open any EM stack as a lazy array; convert it to a chunked OME-Zarr store; describe a store.

Sources that :func:`open_volume` reads, each without loading it whole:

- a TIFF file (multi-page, BigTIFF, compressed, tiled), read page by page through tifffile's
  Zarr interface;
- a folder (or glob pattern) of 2-D PNG / TIFF / JPEG images, one per slice, in natural order
  (``slice2`` before ``slice10``);
- a Zarr array, or an OME-Zarr group (its full-resolution array), Zarr v2 or v3;
- an HDF5 dataset (``file.h5`` with one dataset, ``file.h5/path/to/dataset`` or ``dataset=``),
  if h5py is installed.

Everything returned follows one small contract: ``.shape``, ``.dtype``, ``.ndim`` and basic
slicing (ints and slices) returning a NumPy array.

Every reader checks what it was promised: a TIFF whose page chain, metadata (shaped, ImageJ,
OME) or strip / tile byte counts disagree with what is in the file is an error naming the file,
what was expected and what was found (``allow_partial=True`` reads the complete pages that are
there and says so in ``.partial``); tifffile's log records are captured, never the only sign. A
chunk that cannot be read (Zarr, OME-Zarr, HDF5, a TIFF page) is a :class:`DamagedChunkError`
naming the store, the chunk key and the voxels it covers, raised by the reader itself, so it is
the same one line in the main process, a DataLoader worker or a Dask worker. With
``require_complete=True`` an emtile store whose writer has not finished is refused.
"""

import contextlib
import glob as _glob
import hashlib
import itertools
import logging
import math
import os
import queue
import re
import threading
import warnings
from pathlib import Path

import numpy as np

from emtile._errors import EmtileError
from emtile import _faults
from emtile import store as _store

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
SLAB_BYTES = 64 * 2**20  # how much one slab read holds (convert, info, evaluate)


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


class ChannelView(LazyArray):
    """One channel (``index`` along ``axis``) of a multi-channel array, read lazily."""

    def __init__(self, array, axis, index):
        self.array, self.axis, self.index = array, axis, index
        self.shape = tuple(s for i, s in enumerate(array.shape) if i != axis)
        self.dtype = np.dtype(array.dtype)

    def _read(self, key):
        full = list(key)
        full.insert(self.axis, self.index)
        return np.asarray(self.array[tuple(full)])


# --------------------------------------------------------------------------- damaged chunks


class DamagedChunkError(EmtileError):
    """A chunk of an input cannot be read.

    The message is one line naming the store, the chunk key and the voxels the chunk covers;
    ``store``, ``key`` and ``region`` (one ``(start, stop)`` per axis) hold the same. The error
    pickles whole (Dask, multiprocessing), and keeps its message when torch re-raises it from a
    DataLoader worker (see :class:`emtile.EmtileError`).
    """

    def __init__(self, message, store=None, key=None, region=None):
        super().__init__(message)
        self.store, self.key, self.region = store, key, region

    def __reduce__(self):
        return type(self), (self.args[0], self.store, self.key, self.region)


def _one_line(exc, limit=200):
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _span(k, n):
    """``(start, stop)`` of the voxels an int or slice ``k`` touches on an axis of size ``n``."""
    if isinstance(k, int):
        return k, k + 1
    r = range(*k.indices(n))
    return (min(r[0], r[-1]), max(r[0], r[-1]) + 1) if len(r) else (0, 0)


def _format_region(region, axes):
    return ", ".join(f"{ax} {a}:{b}" for ax, (a, b) in zip(axes, region))


def _default_axes(ndim):
    return {1: "x", 2: "yx", 3: "zyx", 4: "czyx"}.get(ndim, "abcdefgh"[:ndim])


def _chunk_boxes(region, grid, shape):
    """``(index, box)`` of every chunk of ``grid`` that ``region`` touches, in C order."""
    ranges = [range(a // c, -(-b // c)) if b > a else range(0)
              for (a, b), c in zip(region, grid)]
    for index in itertools.product(*ranges):
        yield index, [(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, grid, shape)]


def _locate(read_box, region, grid, shape, exc, *, store, axes, describe):
    """Re-read the chunks ``region`` touches one by one; the first that fails is the damaged one.

    Runs only after a read has failed, so it costs nothing on the good path. Returns the error
    to raise: a :class:`DamagedChunkError`, or a plain :class:`EmtileError` if every chunk reads
    on its own (the failure was not one chunk's).
    """
    for index, box in _chunk_boxes(region, grid, shape):
        try:
            read_box(tuple(slice(a, b) for a, b in box))
        except (EmtileError, MemoryError):
            raise
        except Exception as chunk_exc:
            key = describe(index)
            return DamagedChunkError(
                f"damaged input {store!r}: chunk {key!r} (voxels {_format_region(box, axes)}) "
                f"cannot be read ({_one_line(chunk_exc)}); restore it, or the whole input, "
                f"from a good copy", store, key, [tuple(b) for b in box])
    return EmtileError(f"cannot read {store!r} at voxels {_format_region(region, axes)}: "
                       f"{_one_line(exc)}")


class CheckedArray(LazyArray):
    """A Zarr array (or tifffile's Zarr view of a TIFF) whose failed reads name the bad chunk.

    Reads go straight to the wrapped array; only when one fails are the storage chunks (shards,
    if the array is sharded) it covers read again one by one, to name the first that cannot be
    read in a :class:`DamagedChunkError`. Any other attribute (``chunks``, ``path``,
    ``compressors``, ``attrs``, ``metadata``...) is the wrapped array's.

    Parameters
    ----------
    array : zarr.Array
    name : str
        How the store is named in errors (the path the user gave).
    """

    def __init__(self, array, name):
        self.array, self.name = array, str(name)
        self.shape, self.dtype = tuple(array.shape), np.dtype(array.dtype)
        names = getattr(array.metadata, "dimension_names", None)
        self.axes = list(names) if names and all(names) else _default_axes(len(self.shape))

    def __getattr__(self, attr):
        if attr.startswith("__") or "array" not in self.__dict__:
            raise AttributeError(attr)
        return getattr(self.array, attr)

    def _read(self, key):
        try:
            return np.asarray(self.array[tuple(key)])
        except (EmtileError, MemoryError):
            raise
        except Exception as exc:
            region = [_span(k, n) for k, n in zip(key, self.shape)]
            grid = getattr(self.array, "shards", None) or self.array.chunks
            raise _locate(self.array.__getitem__, region, grid, self.shape, exc,
                          store=self.name, axes=self.axes, describe=self._key) from None

    def _key(self, index):
        key = self.array.metadata.encode_chunk_key(tuple(index))
        return f"{self.array.path}/{key}" if self.array.path else key


def _natural_key(path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(path).name)]


def _read_image_file(path):
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            return tifffile.imread(path)
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as exc:  # corrupt file: say which
        raise EmtileError(f"cannot read image {str(path)!r}: {exc}") from None


def _image_header(path):
    """(shape, dtype) of a 2-D image file from its header only."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tf:
                series = tf.series[0]
                return tuple(series.shape), np.dtype(series.dtype)
        from PIL import Image

        with Image.open(path) as im:
            mode_dtype = {"1": np.bool_, "L": np.uint8, "P": np.uint8, "RGB": np.uint8,
                          "RGBA": np.uint8, "LA": np.uint8, "I;16": np.uint16,
                          "I;16B": np.uint16, "I": np.int32, "F": np.float32}
            bands = len(im.getbands())
            shape = (im.height, im.width) + ((bands,) if bands > 1 else ())
            if im.mode not in mode_dtype:
                raise EmtileError(f"image {str(path)!r} has unsupported mode {im.mode!r}")
            return shape, np.dtype(mode_dtype[im.mode])
    except EmtileError:
        raise
    except Exception as exc:
        raise EmtileError(f"cannot read image {str(path)!r}: {exc}") from None


class ImageStack(LazyArray):
    """A folder or glob of 2-D images as a ``(Z, Y, X)`` array (or ``(Y, X)`` for one file).

    Reads only the files a slice asks for. All images must have the first one's shape and dtype;
    the first that does not is named in the error.
    """

    def __init__(self, files, *, channel=None, squeeze=False):
        self.files = [str(f) for f in files]
        shape, dtype = _image_header(self.files[0])
        for f in self.files[1:]:
            s, d = _image_header(f)
            if s != shape or d != dtype:
                raise EmtileError(
                    f"slice {f!r} has shape {s} and dtype {d}, but the first slice "
                    f"{self.files[0]!r} has shape {shape} and dtype {dtype}; all slices must match"
                )
        if len(shape) == 3:
            if channel is None:
                raise EmtileError(
                    f"{self.files[0]!r} has {shape[2]} channels (shape {shape}); "
                    f"{_one_channel_hint(self.files[0], shape[2])}"
                )
            _check_channel(channel, shape[2], self.files[0])
            shape = shape[:2]
        elif channel is not None:
            raise EmtileError(f"--channel {channel} was given but {self.files[0]!r} has one channel")
        self.channel = channel
        self.squeeze = squeeze
        self.shape = shape if squeeze else (len(self.files),) + shape
        self.dtype = dtype

    def _read(self, key):
        if self.squeeze:
            key = [0] + list(key)
        zkey, yx = key[0], tuple(key[1:])
        indices = [zkey] if isinstance(zkey, int) else range(len(self.files))[zkey]
        slabs = []
        for i in indices:
            img = _read_image_file(self.files[i])
            if self.channel is not None:
                img = img[..., self.channel]
            slabs.append(img[yx])
        if isinstance(zkey, int):
            return slabs[0]
        if not slabs:
            probe = np.empty(self.shape[1:], self.dtype)[yx]
            return np.empty((0,) + probe.shape, self.dtype)
        return np.stack(slabs)


def _one_channel_hint(path, n):
    """How to get one channel of a multi-channel source, in words every command can use."""
    return (f"emtile works on one channel: convert it first, e.g. emtile convert "
            f"{str(path)} one_channel.zarr --channel N (N from 0 to {n - 1})")


def _check_channel(channel, n, what):
    if not 0 <= channel < n:
        raise EmtileError(f"--channel {channel} is out of range for {what!r}: it has channels 0 to {n - 1}")


# --------------------------------------------------------------------------- open_volume


def open_volume(path, *, channel=None, dataset=None, allow_partial=False,
                require_complete=False, name="input"):
    """Open an image stack lazily, whatever its format.

    Parameters
    ----------
    path : str or Path
        A TIFF file, a folder or glob of 2-D images, a Zarr array or OME-Zarr group (its
        full-resolution array; ``store.zarr/labels/mask`` for a nested one), or an HDF5 file
        (``file.h5/dataset`` picks a dataset).
    channel : int, optional
        For multi-channel (RGB, ``C`` or ``S`` axis) sources, the channel to read.
    dataset : str, optional
        HDF5 dataset path inside the file.
    allow_partial : bool
        A TIFF that holds fewer complete pages than it promises (a copy cut short) is an error;
        with ``allow_partial`` its leading complete pages are read, and the array's ``partial``
        attribute says what was expected and what was found.
    require_complete : bool
        Refuse an emtile store whose writer has not finished (its unwritten chunks would read as
        zeros). ``convert`` asks for it, and every command through :func:`open_input`.
    name : str
        What the caller calls this volume in its messages (``"labels"``, ``"pred"``).

    Returns
    -------
    array-like, shape (Z, Y, X) or (Y, X)
        A :class:`LazyArray` (a :class:`CheckedArray` over Zarr for Zarr, OME-Zarr and most
        TIFF sources); slicing reads only what it asks for.

    Examples
    --------
    >>> vol = open_volume("../shared/data/isbi2012/train-volume.tif")  # doctest: +SKIP
    >>> vol.shape, vol[0, :2, :2]                                        # doctest: +SKIP
    ((30, 512, 512), array([[...]], dtype=uint8))
    """
    text = str(path)
    if any(ch in text for ch in "*?["):
        files = sorted(_glob.glob(text), key=_natural_key)
        files = [f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise EmtileError(f"no PNG or TIFF images match {text!r}")
        return ImageStack(files, channel=channel)
    h5 = split_hdf5(text)
    if h5 is not None:
        return _open_hdf5(h5[0], dataset or h5[1], channel, name_as=name)
    p = Path(text)
    if not p.exists():
        raise EmtileError(f"{name} {text!r} does not exist")
    if p.is_dir():
        if _store.is_zarr_store(p):
            return _select_channel(_open_zarr(p, require_complete), channel, text)
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
                        and not f.name.startswith(".")), key=_natural_key)
        if not files:
            raise EmtileError(
                f"folder {text!r} holds no PNG, TIFF or JPEG images (and is not a Zarr store)"
            )
        return ImageStack(files, channel=channel)
    suffix = p.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return _open_tiff(p, channel, allow_partial)
    if suffix in IMAGE_SUFFIXES:
        return ImageStack([p], channel=channel, squeeze=True)
    raise EmtileError(
        f"input {text!r} has an unknown format: expected a TIFF, a folder of PNG/TIFF images, "
        "a Zarr store or an HDF5 file"
    )


class TiffPageStack(LazyArray):
    """A TIFF's first ``n`` 2-D pages as a ``(Z, Y, X)`` stack, read page by page: pages written
    as separate series (one ``write`` per page), or the complete pages of a file cut short
    (``partial`` says what was expected and found). The file is opened per read, so it
    survives forking; a page that cannot be decoded is a :class:`DamagedChunkError`."""

    def __init__(self, path, n, shape, dtype, partial=None):
        self.path, self.shape, self.dtype = str(path), (n,) + tuple(shape), np.dtype(dtype)
        self.partial = partial

    def _read(self, key):
        import tifffile

        zkey, yx = key[0], tuple(key[1:])
        indices = [zkey] if isinstance(zkey, int) else list(range(self.shape[0])[zkey])
        if not indices:
            return np.empty((0,) + np.empty(self.shape[1:], self.dtype)[yx].shape, self.dtype)
        with _tifffile_records(catch_warnings=False), tifffile.TiffFile(self.path) as tf:
            data = np.stack([self._page(tf, i)[yx] for i in indices])
        return data[0] if isinstance(zkey, int) else data

    def _page(self, tf, i):
        try:
            page = tf.pages[i].asarray()
            if page.shape != self.shape[1:]:
                raise ValueError(f"page decodes to shape {page.shape}, not {self.shape[1:]}")
            return page
        except Exception as exc:
            region = [(i, i + 1)] + [(0, n) for n in self.shape[1:]]
            raise DamagedChunkError(
                f"damaged input {self.path!r}: page {i} (voxels "
                f"{_format_region(region, 'zyx')}) cannot be read ({_one_line(exc)}); restore "
                f"the file from a good copy", self.path, f"page {i}", region) from None


def _single_page_series(tf):
    """(n, shape, dtype) if every series is one 2-D page of one shape and dtype, else None."""
    series = tf.series
    if len(series) < 2:
        return None
    first = series[0]
    if len(first.shape) != 2 or any(
        tuple(s.shape) != tuple(first.shape) or s.dtype != first.dtype or len(s.pages) != 1
        for s in series
    ):
        return None
    return len(series), tuple(first.shape), first.dtype


@contextlib.contextmanager
def _tifffile_records(catch_warnings=True):
    """Collect what tifffile logs (its ``tifffile`` logger) and warns while a file is parsed,
    instead of printing it: the caller's own checks decide, and name these in their errors.
    (``catch_warnings=False`` off the main thread: ``warnings.catch_warnings`` is process-wide.)
    """
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append((record.levelno, record.getMessage()))

    logger = logging.getLogger("tifffile")
    handler, propagate = Collect(level=logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        if not catch_warnings:
            yield records
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend((logging.WARNING, str(w.message)) for w in caught
                       if not issubclass(w.category, DeprecationWarning))
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _tiff_promise(tf, paged):
    """``(number of values, what was promised and by what)`` from the file's own metadata, or
    ``(None, None)`` when it promises nothing beyond its pages. ``paged``: the file is read as
    all its one-page series, so all their shaped metadata count."""
    page = tf.pages.first
    shaped = [m["shape"] for m in (tf.shaped_metadata or ()) if "shape" in m]
    if tf.is_shaped and shaped and paged:
        return sum(int(np.prod(m)) for m in shaped), \
            f"{len(shaped)} series of shape {tuple(shaped[0])} (its shaped metadata)"
    if tf.is_shaped and shaped:
        shape = tuple(shaped[0])
        return int(np.prod(shape)), f"shape {shape} (its shaped metadata)"
    if tf.is_imagej and (tf.imagej_metadata or {}).get("images"):
        images = int(tf.imagej_metadata["images"])
        return images * int(np.prod(page.shape)), \
            f"{images} images of {tuple(page.shape)} (its ImageJ metadata)"
    if tf.is_ome and tf.ome_metadata:
        try:
            import xml.etree.ElementTree as ET

            pixels = next(e for e in ET.fromstring(tf.ome_metadata).iter()
                          if e.tag.rsplit("}", 1)[-1] == "Pixels")
            sizes = {a: int(pixels.get(f"Size{a}", 1)) for a in "TCZYX"}
        except (StopIteration, ValueError, SyntaxError):  # unreadable OME-XML: no promise
            return None, None
        text = ", ".join(f"{a}={n}" for a, n in sizes.items())
        return int(np.prod(list(sizes.values()))), f"sizes {text} (its OME-XML metadata)"
    return None, None


def _chain_cut(tf):
    """The page after the last one tifffile could read, if the file says there is one."""
    import struct

    len(tf.pages)  # index every page
    where = tf.pages.next_page_offset
    fh = tf.filehandle
    fh.seek(where)
    data = fh.read(tf.tiff.offsetsize)
    if len(data) < tf.tiff.offsetsize:
        return f"its page chain is cut after page {len(tf.pages) - 1} (the file ends at byte " \
               f"{fh.size}, inside the pointer to the next page)"
    nxt = struct.unpack(tf.tiff.offsetformat, data)[0]
    if nxt:
        return f"its page chain is cut after page {len(tf.pages) - 1} (page {len(tf.pages)} " \
               f"should start at byte {nxt}, but the file has {fh.size} bytes)"
    return None


def _page_problem(page, index, size):
    """Why the image data of ``page`` are not all in a file of ``size`` bytes, or None."""
    if page is None:
        return f"page {index} is missing"
    offsets, counts = page.dataoffsets, page.databytecounts
    if len(offsets) != len(counts):
        return f"page {index} has {len(offsets)} strip/tile offsets but {len(counts)} byte counts"
    end = max((o + n for o, n in zip(offsets, counts)), default=0)
    if end > size:
        return f"page {index}'s image data end at byte {end}, past the end of the {size}-byte file"
    key = getattr(page, "keyframe", page)
    if key.compression == 1 and sum(counts) < _raw_bytes(key):
        return f"page {index} holds {sum(counts)} bytes of uncompressed image data, " \
               f"expected {_raw_bytes(key)}"
    return None


def _raw_bytes(page):
    """Bytes of a page's uncompressed image data (rows padded to whole bytes, as TIFF stores
    them)."""
    spp, bps = page.samplesperpixel, page.bitspersample
    depth = max(getattr(page, "imagedepth", 1), 1)
    if page.planarconfig == 2:  # separate planes
        return -(-page.imagewidth * bps // 8) * page.imagelength * depth * spp
    return -(-page.imagewidth * spp * bps // 8) * page.imagelength * depth


def _inspect_tiff(tf, path, paged):
    """Every way the file disagrees with what it promises: a list of one-line reasons."""
    size = os.path.getsize(path)
    series = tf.series[0]
    problems = [_chain_cut(tf)]
    try:
        pages = list(tf.pages) if paged else list(series.pages)
    except (IndexError, KeyError, ValueError) as exc:  # the series lists pages that are not there
        pages = list(tf.pages)
        problems.append(f"its first series needs pages the file does not hold ({exc})")
    expected, promise = _tiff_promise(tf, paged)
    shape = (paged[0],) + tuple(paged[1]) if paged else tuple(series.shape)
    if expected is not None and expected != int(np.prod(shape)):
        problems.append(f"it promises {promise} but its pages hold {shape}")
    if not paged and getattr(series, "dataoffset", None) is not None \
            and series.dataoffset + series.nbytes > size:
        problems.append(f"its image data need {series.dataoffset + series.nbytes} bytes but the "
                        f"file has {size}")
    problems += [_page_problem(p, i, size) for i, p in enumerate(pages)]
    return [p for p in problems if p], promise


def _salvage(tf, series, size):
    """What a damaged TIFF still holds as whole 2-D slices: ``(n, slice shape, dtype, offset)``.

    The leading pages that are complete (the first page's shape and dtype, all their data in
    the file), or, for uncompressed contiguous data (offset not None), the slices whose bytes
    are all in the file even where the pages that describe them are lost.
    """
    first, n = tf.pages.first, 0
    for i, page in enumerate(tf.pages):
        key = getattr(page, "keyframe", page)
        if key.shape != first.shape or key.dtype != first.dtype or _page_problem(page, i, size):
            break
        n += 1
    offset = getattr(series, "dataoffset", None)
    if offset is not None and first.compression == 1 and len(first.shape) == 2 \
            and first.bitspersample % 8 == 0:
        dtype = np.dtype(first.dtype).newbyteorder(tf.byteorder)
        whole = max(0, size - offset) // (int(np.prod(first.shape)) * dtype.itemsize)
        total = int(np.prod(series.shape)) // int(np.prod(first.shape))
        if min(whole, total) > n:
            return min(whole, total), tuple(first.shape), dtype, offset
    return n, tuple(first.shape), np.dtype(first.dtype), None


class TiffRawStack(LazyArray):
    """Uncompressed, contiguous slices of a TIFF read straight from their byte offset (a file cut
    short whose later pages are lost but whose data are there). Opened per read."""

    def __init__(self, path, offset, n, shape, dtype, partial=None):
        self.path, self.offset = str(path), int(offset)
        self.shape, self.file_dtype = (n,) + tuple(shape), np.dtype(dtype)
        self.dtype = self.file_dtype.newbyteorder("=")
        self.partial = partial

    def _read(self, key):
        data = np.memmap(self.path, self.file_dtype, "r", self.offset, self.shape)
        return np.array(data[tuple(key)], dtype=self.dtype)


def _open_tiff(path, channel, allow_partial=False):
    import tifffile
    import zarr

    try:
        with _tifffile_records() as records, tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            axes, shape = series.axes, tuple(series.shape)
            paged = _single_page_series(tf) if channel is None else None
            problems, promise = _inspect_tiff(tf, path, paged)
            if not problems:  # tifffile gave up on something no check above names
                problems = [f"tifffile: {_strip_repr(m)}" for level, m in records
                            if level >= logging.ERROR]
            if problems:
                salvage = _salvage(tf, series, os.path.getsize(path))
        if problems:
            return _partial_tiff(path, problems, salvage, channel, promise, allow_partial)
        if paged:
            return TiffPageStack(path, *paged)
        store = tifffile.imread(path, aszarr=True, series=0, level=0)
        arr = CheckedArray(zarr.open_array(store, mode="r"), path)
    except EmtileError:
        raise
    except Exception as exc:
        raise EmtileError(f"{str(path)!r} is not a readable TIFF file: {exc}") from None
    channel_axes = [i for i, a in enumerate(axes) if a in "SC"]
    if channel_axes:
        axis = channel_axes[0]
        if channel is None:
            raise EmtileError(
                f"{str(path)!r} has {shape[axis]} channels (shape {shape}, axes {axes}); "
                f"{_one_channel_hint(path, shape[axis])}"
            )
        _check_channel(channel, shape[axis], str(path))
        return ChannelView(arr, axis, channel)
    if channel is not None:
        raise EmtileError(f"--channel {channel} was given but {str(path)!r} has one channel")
    return arr


def _strip_repr(message):
    """tifffile's log line without its leading ``<tifffile.X ...>`` object repr."""
    return re.sub(r"^<[^>]*>\s*", "", message)


def _partial_tiff(path, problems, salvage, channel, promise, allow_partial):
    """The error for a TIFF that disagrees with itself or, with ``allow_partial``, the complete
    slices it holds (:func:`_salvage`) as a stack whose ``partial`` says what was expected and
    what was found."""
    n, shape, dtype, offset = salvage
    found = f"{n} complete slice{'s' if n != 1 else ''} of shape {shape}"
    if not allow_partial:
        hint = " (pass --allow-partial to convert the complete slices there are)" if n else ""
        raise EmtileError(f"TIFF {str(path)!r} is damaged or cut short: {'; '.join(problems)}; "
                          f"found {found}{hint}")
    if not n or len(shape) != 2 or channel is not None:
        raise EmtileError(f"TIFF {str(path)!r} is damaged or cut short ({'; '.join(problems)}), "
                          f"and its {found} cannot be read as a stack of 2-D slices")
    partial = {"expected": promise or "more pages than the file holds",
               "found": [n] + list(shape), "problems": problems}
    if offset is not None:
        return TiffRawStack(path, offset, n, shape, dtype, partial=partial)
    return TiffPageStack(path, n, shape, dtype, partial=partial)


def _open_zarr(path, require_complete=False):
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise EmtileError(f"cannot open Zarr store {str(path)!r}: {exc}") from None
    group_path = Path(path) if not isinstance(node, zarr.Array) else Path(path).parent
    meta = _store.emtile_attrs(group_path)
    if require_complete and meta is not None and not meta.get("complete"):
        raise EmtileError(
            f"input {str(path)!r} is an emtile store whose writer has not finished (interrupted, "
            f"or still running; 'emtile info' shows complete NO): run the command that writes "
            f"it again to finish it")
    if isinstance(node, zarr.Array):
        return CheckedArray(node, path)
    multiscales = _store.multiscales(node.attrs.asdict())
    if multiscales:
        return CheckedArray(node[multiscales["datasets"][0]["path"]], path)
    arrays = sorted(name for name, _ in node.arrays())
    if "0" in arrays:
        return CheckedArray(node["0"], path)
    if len(arrays) == 1:
        return CheckedArray(node[arrays[0]], path)
    raise EmtileError(
        f"Zarr group {str(path)!r} has no OME multiscales and {len(arrays)} arrays "
        f"({', '.join(arrays) or 'none'}); open one of them as {str(path)}/NAME"
    )


def _select_channel(arr, channel, text):
    if channel is None:
        return arr
    _check_channel(channel, arr.shape[0], text)
    return ChannelView(arr, 0, channel)


split_hdf5 = _store.split_hdf5_path  # one home (the store needs it too); re-exported here


class HDF5Dataset(LazyArray):
    """An HDF5 dataset opened per read, so it survives forking into DataLoader workers. A chunk
    that cannot be read is a :class:`DamagedChunkError`."""

    def __init__(self, filename, name, shape, dtype, chunks=None):
        self.filename, self.name, self.shape, self.dtype = filename, name, shape, dtype
        self.chunks = chunks

    def _read(self, key):
        import h5py

        try:
            with h5py.File(self.filename, "r") as f:
                return np.asarray(f[self.name][tuple(key)])
        except (EmtileError, MemoryError):
            raise
        except Exception as exc:
            region = [_span(k, n) for k, n in zip(key, self.shape)]
            with h5py.File(self.filename, "r") as f:
                ds = f[self.name]
                grid = ds.chunks or self.shape

                def describe(index):
                    offset = tuple(i * c for i, c in zip(index, grid))
                    if ds.chunks is None:
                        return "contiguous data"
                    info = ds.id.get_chunk_info_by_coord(offset)
                    return f"chunk at {offset} (file bytes {info.byte_offset}+{info.size})"

                raise _locate(ds.__getitem__, region, grid, self.shape, exc,
                              store=f"{self.filename}/{self.name}",
                              axes=_default_axes(len(self.shape)), describe=describe) from None


def _open_hdf5(filename, name, channel, *, name_as="input"):
    try:
        import h5py
    except ImportError:
        raise EmtileError(
            f"reading {filename!r} needs h5py: pip install 'emtile[hdf5]'"
        ) from None
    if not Path(filename).exists():
        raise EmtileError(f"{name_as} {filename!r} does not exist")
    try:
        f = h5py.File(filename, "r")
    except OSError as exc:
        reason = re.sub(r"^Unable to (synchronously )?open file \((.*)\)$", r"\2", str(exc))
        raise EmtileError(f"cannot open HDF5 file {filename!r}: {reason} (not an HDF5 file, or "
                          f"a damaged or truncated one)") from None
    with f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if name is None:
            if len(names) != 1:
                raise EmtileError(
                    f"{filename!r} holds {len(names)} datasets ({', '.join(names)}); "
                    f"name one as {filename}/NAME, e.g. {filename}/{names[0] if names else 'raw'}"
                )
            name = names[0]
        if name not in names:
            raise EmtileError(
                f"{filename!r} has no dataset {name!r}; it has: {', '.join(names) or 'none'}"
            )
        ds = f[name]
        arr = HDF5Dataset(filename, name, tuple(ds.shape), np.dtype(ds.dtype), ds.chunks)
    return _select_channel(arr, channel, filename) if channel is not None else arr


# --------------------------------------------------------------------------- voxel sizes


class MetadataWarning(UserWarning):
    """A voxel size in an input's metadata that emtile cannot use (zero, negative, not finite,
    an unknown unit, a print resolution): one line; the value is ignored."""


#: Where a store's voxel size came from (``attrs["emtile"]["voxel_size_source"]``); the order is
#: the precedence of :func:`convert` (``--voxel-size`` first, then the input's own metadata).
VOXEL_SOURCES = ("--voxel-size", "OME-XML", "ImageJ", "TIFF resolution tags", "OME-Zarr",
                 "not given")
_SOURCE_WORDS = {"--voxel-size": "given at conversion (--voxel-size)",
                 "OME-XML": "from the input's OME-XML",
                 "ImageJ": "from the input's ImageJ metadata",
                 "TIFF resolution tags": "from the input's TIFF resolution tags",
                 "OME-Zarr": "from the input's OME-Zarr metadata", "input": "from the input",
                 "prediction": "from the prediction"}

#: Length units as the metadata formats spell them (OME symbols, ImageJ and NGFF names), in nm.
_LENGTH_NM = {**_store.UNITS_NM, "nanometre": 1.0, "micrometre": 1e3, "microns": 1e3,
              "cm": 1e7, "centimeter": 1e7, "m": 1e9, "meter": 1e9, "in": 2.54e7, "inch": 2.54e7}
_UNCALIBRATED = {"", "pixel", "pixels", "px", "reference frame"}
_PLAUSIBLE_NM = (1e-3, 1e7)  # a voxel between 1 pm and 1 cm
#: TIFF resolutions of at most this many pixels per inch (pixels of 10 µm or more) are the print
#: or screen settings that image software writes by default (72, 96, 300 dpi), not pixel sizes.
_PRINT_DPI = 2540
_TIFF_UNITS = {2: "inch", 3: "cm", 4: "mm", 5: "um"}  # ResolutionUnit: INCH ... MICROMETER


def read_voxel_size(path):
    """The voxel size that ``path``'s own metadata records, and where it was found.

    TIFF files are read in this order, the first that gives the in-plane size winning: OME-XML
    (``Pixels`` ``PhysicalSizeX/Y/Z`` and their units, micrometres by default), ImageJ
    (``unit``, ``spacing`` and the resolution tags), the TIFF resolution tags (centimetre, inch,
    millimetre or micrometre units; a unit of NONE or a resolution of 1/1 is no size). An
    OME-Zarr store (or an array in one) gives its level's ``scale`` in its axes' units; a
    folder or glob of images its first file's in-plane size. A value that cannot be a voxel
    size is ignored with one :class:`MetadataWarning` line.

    Parameters
    ----------
    path : str or Path
        Anything :func:`open_volume` reads (HDF5 datasets record no voxel size emtile reads).

    Returns
    -------
    sizes : dict
        ``{"z": nm, "y": nm, "x": nm}``, the axes the metadata gives: empty when none, ``y`` and
        ``x`` only when it has no slice spacing (resolution tags, a folder of images).
    source : str
        One of :data:`VOXEL_SOURCES` (``"not given"`` when ``sizes`` is empty).

    Examples
    --------
    >>> import tifffile, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.tif")
    >>> tifffile.imwrite(path, np.zeros((4, 8, 8), np.uint8), imagej=True, resolution=(250, 250),
    ...                  metadata={"axes": "ZYX", "spacing": 0.05, "unit": "um"})
    >>> read_voxel_size(path)
    ({'z': 50.0, 'y': 4.0, 'x': 4.0}, 'ImageJ')
    """
    text = str(path)
    if split_hdf5(text) is not None:
        return {}, "not given"
    p, stack = Path(text), False
    if any(ch in text for ch in "*?["):
        files = sorted(_glob.glob(text), key=_natural_key)
        p, stack = (Path(files[0]) if files else None), True
    elif p.is_dir():
        if _store.is_zarr_store(p):
            return _ngff_voxel_size(p)
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
                        and not f.name.startswith(".")), key=_natural_key)
        p, stack = (files[0] if files else None), True
    if p is None or p.suffix.lower() not in TIFF_SUFFIXES or not p.is_file():
        return {}, "not given"
    sizes, source = _tiff_voxel_size(p)
    if stack:  # one slice per file: a file's own z spacing is not the stack's
        sizes.pop("z", None)
    return sizes, source


def _tiff_voxel_size(path):
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page, axes = tf.pages[0], tf.series[0].axes
            # the slice spacing is the z axis's only when the stack's one non-plane axis is z
            # (ImageJ calls a plain stack of images I)
            lead = [a for a in axes if a not in "YXSC"]
            readers = []
            if tf.is_ome:
                readers.append(("OME-XML", lambda: _ome_sizes(tf.ome_metadata, lead == ["Z"])))
            if tf.is_imagej:
                readers.append(("ImageJ", lambda: _imagej_sizes(
                    tf.imagej_metadata or {}, page, lead in (["Z"], ["I"], ["Q"]))))
            readers.append(("TIFF resolution tags", lambda: _tag_sizes(page)))
            for source, read in readers:
                sizes = _checked(read(), source, path)
                if "y" in sizes and "x" in sizes:
                    return {a: sizes[a] for a in "zyx" if a in sizes}, source
    except Exception as exc:  # unreadable metadata: the reader says what is wrong with the file
        warnings.warn(f"{str(path)!r}: its voxel size metadata cannot be read "
                      f"({_one_line(exc)}); ignored", MetadataWarning, stacklevel=3)
    return {}, "not given"


def _ome_sizes(xml, has_z):
    """``{axis: (value, unit, name)}`` of the first OME ``Image``'s ``Pixels``."""
    import tifffile

    image = tifffile.xml2dict(xml).get("OME", {}).get("Image") or {}
    pixels = (image[0] if isinstance(image, list) else image).get("Pixels") or {}
    out = {}
    for ax in ("zyx" if has_z else "yx"):
        key = f"PhysicalSize{ax.upper()}"
        if key in pixels:
            unit = pixels.get(f"{key}Unit", "µm")
            out[ax] = (pixels[key], unit, f"{key} {pixels[key]} {unit}")
    return out


def _imagej_unit(text):
    """ImageJ writes µ and Å as the six characters ``\\u00B5`` / ``\\u00C5``."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), str(text))


def _imagej_sizes(meta, page, has_z):
    """ImageJ: the resolution tags in pixels per ``unit`` and ``spacing`` for z."""
    unit = _imagej_unit(meta.get("unit", ""))
    if unit.strip() in _UNCALIBRATED or "XResolution" not in page.tags:
        return {}
    xres, yres = page.resolution
    yunit = _imagej_unit(meta.get("yunit", unit))
    out = {"y": _per_pixel(yres, yunit, "YResolution"), "x": _per_pixel(xres, unit, "XResolution")}
    if has_z and "spacing" in meta:
        zunit = _imagej_unit(meta.get("zunit", unit))
        out["z"] = (meta["spacing"], zunit, f"spacing {meta['spacing']} {zunit}")
    return out


def _per_pixel(resolution, unit, name):
    """A resolution tag (pixels per ``unit``) as ``(size, unit, what the file says)``."""
    return (1 / resolution if resolution else math.inf, unit,
            f"{name} {resolution:g} pixels per {unit}")


def _tag_sizes(page):
    """Plain TIFF: XResolution / YResolution in pixels per ResolutionUnit."""
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return {}
    unit = _TIFF_UNITS.get(int(page.resolutionunit))  # NONE (1): no physical size
    xres, yres = page.resolution
    if unit is None or (xres, yres) == (1, 1):
        return {}
    if unit == "inch" and 0 < min(xres, yres) and max(xres, yres) <= _PRINT_DPI:
        return {"x": (None, None, f"{xres:g} x {yres:g} dpi is a print or screen "
                                  f"setting, not a pixel size")}
    return {"y": _per_pixel(yres, unit, "YResolution"), "x": _per_pixel(xres, unit, "XResolution")}


def _checked(entries, source, path):
    """``{axis: nm}`` of the plausible ``(value, unit, what the file says)`` entries, and one
    warning line naming the others (``value`` None: refused by the reader, ``shown`` says why;
    ``unit`` None: the metadata gives none)."""
    out, problems = {}, []
    for ax, (value, unit, shown) in entries.items():
        if value is None:
            problems.append(shown)
        elif unit is not None and str(unit).strip() in _UNCALIBRATED:
            continue  # uncalibrated: no size, nothing wrong
        elif (factor := _LENGTH_NM.get(str(unit).strip()) if unit is not None else None) is None:
            problems.append(f"{shown}: " + ("no unit" if unit is None else
                                            f"{unit!r} is not a length unit emtile knows"))
        elif not _PLAUSIBLE_NM[0] <= (nm := _as_float(value) * factor) <= _PLAUSIBLE_NM[1]:
            problems.append(f"{shown} is not a voxel size (a voxel is from 1 pm to 1 cm)")
        else:
            out[ax] = nm
    if problems:
        warnings.warn(f"{str(path)!r}: {source}: {'; '.join(problems)}; ignored (pass "
                      f"--voxel-size to give one)", MetadataWarning, stacklevel=4)
    return out


def _as_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _ngff_voxel_size(path):
    """An OME-Zarr group's (or an array of one's) level scale in its axes' units, as nm."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
        group_path, level = (Path(path), None) if isinstance(node, zarr.Group) else \
            (Path(path).parent, Path(path).name)
        if level is not None and not _store.is_zarr_store(group_path):
            return {}, "not given"
        attrs = zarr.open_group(str(group_path), mode="r").attrs.asdict()
        ms = _store.multiscales(attrs)
        datasets = ms["datasets"] if ms else []
        dataset = datasets[0] if level is None and datasets else \
            next((d for d in datasets if d["path"] == level), None)
        if dataset is None:
            return {}, "not given"
        meta = attrs.get("emtile")
        if meta is not None and meta.get("voxel_size_given") is False:
            return {}, "not given"  # emtile's placeholder of a conversion given none
        scale = next(t["scale"] for t in dataset["coordinateTransformations"]
                     if t["type"] == "scale")
        space = [(a, float(s)) for a, s in zip(ms["axes"], scale) if a.get("type") == "space"]
    except Exception:  # not NGFF, or foreign metadata: no voxel size
        return {}, "not given"
    if not any("unit" in a for a, _ in space) and all(s == 1 for _, s in space):
        return {}, "not given"  # a writer's default, not a measurement
    entries = {ax: (s, a.get("unit"), f"{a.get('name', ax)} scale {s:g} {a.get('unit', '')}"
                    .rstrip()) for ax, (a, s) in zip("zyx"[-len(space):], space[-3:])}
    sizes = _checked(entries, "OME-Zarr metadata", path)
    return (sizes, "OME-Zarr") if "y" in sizes and "x" in sizes else ({}, "not given")


def _conversion_voxel_size(input, ndim, voxel_size, unit):
    """``(voxel size (z, y, x) nm or None, source, known)`` of a conversion: ``--voxel-size``
    if given, else the input's own metadata (:func:`read_voxel_size`). A stack whose metadata
    gives the in-plane size only gets z recorded as x, and counts as unknown (one warning)."""
    given = _voxel_size_nm(voxel_size, unit, ndim)
    if given is not None:
        return given, "--voxel-size", True
    sizes, source = read_voxel_size(input)
    if "y" not in sizes or "x" not in sizes:
        return None, "not given", False
    y, x = sizes["y"], sizes["x"]
    if ndim == 2:
        return (1.0, y, x), source, True
    if "z" in sizes:
        return (sizes["z"], y, x), source, True
    warnings.warn(f"{str(input)!r}: the pixel size {y:g} x {x:g} nm ({_SOURCE_WORDS[source]}) "
                  f"comes with no slice spacing: z is recorded as {x:g} nm (as x) and the voxel "
                  f"size counts as not given; pass --voxel-size Z,{y:g},{x:g} to set it",
                  MetadataWarning, stacklevel=3)
    return (x, y, x), source, False


# --------------------------------------------------------------------------- convert


def _text(values):
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _check_tuple(name, values, n, example, *, cast):
    """``values`` as a tuple of ``n`` positive numbers, or a one-line error in the user's form
    (``chunks=1,256 has 2 values; give 3 (Z,Y,X), e.g. 1,1024,1024``)."""
    if values is None:
        return None
    try:
        out = tuple(cast(v) for v in values)
    except (TypeError, ValueError):
        raise EmtileError(f"{name}={values!r} is not a list of numbers: give Z,Y,X, e.g. "
                          f"{example}") from None
    axes = "Z,Y,X"[-(2 * n - 1):]
    if len(out) != n:
        raise EmtileError(f"{name}={_text(out)} has {len(out)} value"
                          f"{'s' if len(out) != 1 else ''}; give {n} ({axes}), e.g. {example}")
    if any(not v > 0 for v in out):
        raise EmtileError(f"{name}={_text(out)}: every value must be positive, e.g. {example}")
    return out


def _voxel_size_nm(voxel_size, unit, ndim):
    """The voxel size (Z, Y, X) in nm of a ``voxel_size`` given in ``unit`` for an input of
    ``ndim`` dimensions (Y, X is enough for a single image)."""
    nm = _store.unit_to_nm(unit)
    if voxel_size is None:
        return None
    n = 2 if ndim == 2 and len(voxel_size) == 2 else 3
    sizes = _check_tuple("voxel_size", voxel_size, n, "50,4,4" if n == 3 else "4,4",
                         cast=float)
    sizes = (1.0,) * (3 - n) + sizes
    return tuple(v * nm for v in sizes)


def convert(input, output, *, labels=False, threshold=None, channel=None, dataset=None,
            chunks=None, voxel_size=None, unit="nm", levels=1, compression="zstd",
            compression_level=3, overwrite=False, allow_partial=False, progress=True):
    """Convert a stack to a chunked, compressed OME-Zarr store, streaming in bounded memory.

    Parameters
    ----------
    input : str or Path
        Anything :func:`open_volume` reads.
    output : str or Path
        The new store (a folder). An existing complete output is refused unless ``overwrite``;
        an incomplete one (an interrupted conversion) is replaced. An output that is, holds or
        lies inside the input is refused, and so is one that another live run is writing.
    labels : bool
        Store a binary mask as uint8 {0, 1}. Accepts 0/1, 0/255 and bool input; more than two
        values is an error that names them, unless ``threshold`` is given (``value > threshold``).
    chunks : tuple of int, optional
        Chunk shape ``(Z, Y, X)``; default one slice by up to 1024×1024.
    voxel_size : tuple of float, optional
        ``(Z, Y, X)`` (``(Y, X)`` for a single image) in ``unit``. Default: what the input's
        own metadata records (:func:`read_voxel_size`: OME-XML, ImageJ, TIFF resolution tags,
        an OME-Zarr input's scale), else ``(1, 1, 1)`` nm recorded as unknown. The store
        records where it came from (``attrs["emtile"]["voxel_size_source"]``, one of
        :data:`VOXEL_SOURCES`), and :func:`info` says it.
    unit : str
        Unit of ``voxel_size``: ``"nm"`` (default), ``"um"`` / ``"µm"``, ``"mm"`` or
        ``"angstrom"``. The store records nanometres.
    levels : int
        Resolution levels for viewers: level ``k`` is 2^k times smaller in y and x.
    allow_partial : bool
        Convert the complete pages of a TIFF cut short instead of refusing it; the store records
        what was expected and what was found (``attrs["emtile"]["partial"]``, shown by
        :func:`info`).

    Returns
    -------
    dict
        What :func:`info` reports for the new store.

    Memory stays bounded by a few 64 MB slabs whatever the stack size. The store is marked
    complete only after its last chunk is written; a write that fails (disk full, permission
    denied) is a :class:`emtile.store.StoreWriteError` and leaves it incomplete. A re-run
    replaces an incomplete store: a conversion is one streaming pass, so starting over costs at
    most that pass and gives the same bytes.
    """
    _store.check_output(output, inputs=[input])
    src = open_volume(input, channel=channel, dataset=dataset, allow_partial=allow_partial,
                      require_complete=True)
    dtype = np.dtype(src.dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise EmtileError(f"input {str(input)!r} has non-numeric dtype {dtype}")
    if src.ndim not in (2, 3):
        raise EmtileError(
            f"input {str(input)!r} has shape {src.shape}: expected a 2-D image or a 3-D stack "
            "(for multi-channel data keep one with --channel N)"
        )
    if threshold is not None and not labels:
        raise EmtileError("--threshold only applies to --labels")
    shape = (1,) + tuple(src.shape) if src.ndim == 2 else tuple(src.shape)
    chunks = _check_tuple("chunks", chunks, 3, "1,1024,1024", cast=int)
    voxel_size, voxel_source, known = _conversion_voxel_size(input, src.ndim, voxel_size, unit)
    if levels < 1 or 2 ** (levels - 1) > max(shape[1:]):
        raise EmtileError(f"levels={levels} is not valid for slices of {shape[1:]}: "
                          f"at most {int(math.log2(max(shape[1:]))) + 1}")
    attrs = {"source": str(input), "source_dtype": str(dtype), "voxel_size_given": known,
             "voxel_size_source": voxel_source}
    if getattr(src, "partial", None):
        attrs["partial"] = src.partial
    with _store.output_lock(output):
        _store.prepare_output(output, overwrite=overwrite)
        with _store.write_errors(output):
            group = _store.create_image(
                output, shape, np.uint8 if labels or dtype == np.bool_ else dtype, chunks=chunks,
                voxel_size=voxel_size, levels=levels, kind="labels" if labels else "image",
                name=Path(str(output)).stem, compression=compression,
                compression_level=compression_level, attrs=attrs)
        try:
            _copy_slabs(src, [group[str(level)] for level in range(levels)], input, output,
                        labels=labels, threshold=threshold, progress=progress)
        except _store.StoreWriteError:
            raise  # the output stays, incomplete: a re-run replaces it
        except EmtileError:
            _store.remove_store(output)  # bad input: leave nothing behind
            raise
        with _store.write_errors(output):
            _faults.point("convert.before_complete")
            _store.mark_complete(group)
    return info(output)


def _copy_slabs(src, arrays, input, output, *, labels, threshold, progress):
    """Stream ``src`` into the level arrays slab by slab (a reader and a writer thread)."""
    from tqdm.auto import tqdm

    squeeze = src.ndim == 2
    depth = slab_depth(arrays[0].shape, np.dtype(src.dtype).itemsize,
                       chunk_z=arrays[0].chunks[0])
    checker = LabelChecker() if labels and threshold is None else None
    out_dtype = arrays[0].dtype

    def read(z0, z1):
        try:
            slab = np.asarray(src[...] if squeeze else src[z0:z1])
        except EmtileError:
            raise
        except Exception as exc:  # a corrupt or truncated file shows itself only when read
            raise EmtileError(f"cannot read {str(input)!r} at slices {z0}:{z1}: {exc}") from None
        slab = slab[None] if squeeze else slab
        if labels:
            fg = slab > threshold if checker is None else checker.foreground(slab, f"slices {z0}:{z1}")
            slab = fg.astype(np.uint8)
        elif slab.dtype != out_dtype:
            slab = slab.astype(out_dtype)
        return slab

    def write(z0, z1, slab):
        with _store.write_errors(output):
            for level, arr in enumerate(arrays):
                if level:
                    slab = _store.downsample(slab, labels=labels)
                arr[z0:z1] = slab
            _faults.point("convert.slab")

    n = arrays[0].shape[0]
    with tqdm(total=n, unit="slice", desc=f"convert {Path(str(input)).name}",
              disable=not progress, delay=1.0) as bar:
        _pipeline(((z0, min(z0 + depth, n)) for z0 in range(0, n, depth)),
                  read, write, on_done=lambda z0, z1: bar.update(z1 - z0))


def _pipeline(ranges, read, write, *, on_done):
    """Read slabs on this thread while a :class:`WriterThread` writes the previous ones."""
    with WriterThread(lambda z0, z1, slab: (write(z0, z1, slab), on_done(z0, z1))) as writer:
        for z0, z1 in ranges:
            writer.check()  # a failed write stops the reading too
            writer.put(z0, z1, read(z0, z1))


# --------------------------------------------------------------------------- info


def _du(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def info(path, *, stats=False, progress=False):
    """Describe a volume: shape, dtype, chunks, compression, sizes, voxel size, completeness.

    Parameters
    ----------
    path : str or Path
        Anything :func:`open_volume` reads.
    stats : bool
        Also compute min / max / mean, reading the volume slab by slab (bounded memory).

    Returns
    -------
    dict
        ``complete`` is True/False for stores emtile wrote and None for other sources;
        ``partial`` (stores converted with ``allow_partial`` from a TIFF cut short) says what
        was expected and what was found, else None.
    """
    p = Path(str(path))
    meta = _store.emtile_attrs(p) if _store.is_zarr_store(p) else None
    try:
        arr = open_volume(path)
    except EmtileError:
        if meta is None or meta.get("complete"):
            raise
        arr = None  # an emtile store killed before its arrays were written: say so
    out = {
        "path": str(path),
        "shape": tuple(int(s) for s in arr.shape) if arr is not None else None,
        "dtype": str(arr.dtype) if arr is not None else None,
        "chunks": None,
        "compressor": None,
        "bytes_uncompressed": int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
        if arr is not None else None,
        "bytes_on_disk": _du(split_hdf5(path)[0] if split_hdf5(path) else path)
        if Path(str(path)).exists() else None,
        "voxel_size": None,
        "levels": None,
        "kind": None,
        "complete": None,
        "partial": None,
    }
    if hasattr(arr, "chunks") and hasattr(arr, "compressors"):
        out["chunks"] = tuple(int(c) for c in arr.chunks)
        out["compressor"] = ", ".join(_codec_name(c) for c in arr.compressors) or "none"
    if p.suffix.lower() in TIFF_SUFFIXES and p.is_file():
        import tifffile

        with tifffile.TiffFile(p) as tf:
            page = tf.pages[0]
            out["compressor"] = f"TIFF {page.compression.name.lower()}"
            out["chunks"] = (1,) + (tuple(page.chunks) if page.is_tiled else tuple(page.shape[:2]))
    if _store.is_zarr_store(p):
        import zarr

        node = zarr.open(str(p), mode="r")
        attrs = node.attrs.asdict()
        meta = attrs.get("emtile")
        if meta is not None:
            out["complete"] = bool(meta.get("complete"))
            out["kind"] = meta.get("kind")
            out["partial"] = meta.get("partial")
            if meta.get("provenance"):  # a prediction: what made it
                out["provenance"] = meta["provenance"]
            if meta.get("kind") == "labels" and meta.get("threshold") is not None:
                out["threshold"] = meta["threshold"]  # a predicted mask
        ms = _store.multiscales(attrs)
        if ms:
            out["levels"] = len(ms["datasets"])
            out["bytes_on_disk_level0"] = _du(p / ms["datasets"][0]["path"])
            out["voxel_size"] = _store.spatial_scale(ms)
            out["voxel_unit"] = _axes_unit(ms)
            out.update(_voxel_origin(meta))
    if stats and arr is not None:
        out.update(_stats(arr, progress=progress))
    return out


def _axes_unit(ms):
    """The unit of a multiscales entry's spatial axes as ``info`` prints it (``nm``), or None
    when they have none or differ."""
    units = {a.get("unit") for a in ms["axes"] if a.get("type") == "space"}
    unit = units.pop() if len(units) == 1 else None
    return "nm" if unit == "nanometer" else unit


def _voxel_origin(meta):
    """``voxel_size_source`` (one of :data:`VOXEL_SOURCES`, or ``"input"`` / ``"prediction"``
    for what predict and segment wrote) and a ``voxel_size_note`` when the size is not known,
    from an emtile store's attributes."""
    if meta is None:
        return {}
    source = meta.get("voxel_size_source")
    if source is None:  # predict and segment copy their input's; older stores recorded none
        source = ("input" if meta.get("provenance") or meta.get("threshold") is not None else
                  "prediction" if meta.get("segment") else None)
    out = {"voxel_size_source": source}
    if meta.get("voxel_size_given", True) is False:
        out["voxel_size_note"] = (
            "not given at conversion; recorded as 1 nm" if source in (None, "not given") else
            f"y, x {_SOURCE_WORDS[source]}; no slice spacing there, z recorded as x")
    return out


def _size(n):
    """Bytes as tqdm writes them (three significant digits, SI prefixes: ``7.86MB``)."""
    from tqdm import tqdm

    return "-" if n is None else tqdm.format_sizeof(n, "B")


def _format_partial(partial):
    """One line for a store converted with --allow-partial: what was expected, what was found."""
    found = "x".join(str(n) for n in partial["found"])
    return f"converted {found} (the complete pages); expected {partial['expected']}"


def format_info(d):
    """What ``emtile info`` prints for the dict that :func:`info` returns."""
    complete = {True: "yes", False: "NO (interrupted or still being written)", None: "-"}[d["complete"]]
    lines = [
        f"path          {d['path']}",
        f"shape         {d['shape'] or '-'}",
        f"dtype         {d['dtype'] or '-'}",
        f"chunks        {d['chunks'] or '-'}",
        f"compressor    {d['compressor'] or '-'}",
        f"uncompressed  {_size(d['bytes_uncompressed'])}",
    ]
    if d.get("bytes_on_disk_level0") is not None and d["bytes_uncompressed"] is not None:
        ratio = d["bytes_uncompressed"] / max(d["bytes_on_disk_level0"], 1)
        lines.append(f"on disk       {_size(d['bytes_on_disk_level0'])} (ratio {ratio:.2f}); "
                     f"whole store {_size(d['bytes_on_disk'])}")
    else:
        lines.append(f"on disk       {_size(d['bytes_on_disk'])}")
    if d["voxel_size"]:
        vs = " x ".join(f"{v:g}" for v in d["voxel_size"].values())
        unit = d.get("voxel_unit", "nm") or "(no unit)"
        source = d.get("voxel_size_source")
        note = (f"  ({d['voxel_size_note']})" if d.get("voxel_size_note") else
                f", {_SOURCE_WORDS[source]}" if source in _SOURCE_WORDS else "")
        lines.append(f"voxel size    {vs} {unit} ({','.join(d['voxel_size'])}){note}")
    if d["levels"]:
        lines.append(f"levels        {d['levels']}")
    if d["kind"]:
        lines.append(f"kind          {d['kind']}")
    lines.append(f"complete      {complete}")
    if d.get("partial"):
        lines.append(f"partial       YES: {_format_partial(d['partial'])}")
    if d.get("provenance"):
        lines += _format_provenance(d["path"], d["provenance"])
    if d.get("threshold") is not None:
        lines.append(f"mask of       cell interior where p > {d['threshold']:g}")
    for key in ("min", "max", "mean"):
        if key in d:
            lines.append(f"{key:<13} {d[key]:.6g}")
    return "\n".join(lines)


def _format_provenance(path, p):
    """The lines of a prediction store's provenance (``emtile predict``'s record)."""
    region = p.get("region") or []
    names = "zyx"[-len(region):] if 0 < len(region) <= 3 else None
    where = ", ".join(f"{names[i] if names else i} {a}:{b}" for i, (a, b) in enumerate(region))
    offset = [a for a, _ in region]
    norm = p.get("normalization") or ["dtype", None, None]
    norm_text = (norm[0] if norm[1] is None else
                 f"{norm[0]} ({norm[1]:.6g} -> 0, {norm[2]:.6g} -> 1)")
    options = (f"tile {'x'.join(str(t) for t in p.get('tile', []))}, tta "
               f"{'on' if p.get('tta') else 'off'}, amp {p.get('amp', 'off')}, blend "
               f"{p.get('blend')}, overlap {','.join(str(o) for o in p.get('overlap', []))}, "
               f"dtype {p.get('dtype')}, normalisation {norm_text}, device {p.get('device')}")
    mask = (f"{path.rstrip('/')}/{p['mask']} (cell interior where p > {p['threshold']:g})"
            if p.get("mask") else "none (predict --threshold T writes one)")
    return [f"model         {p.get('model')}",
            f"input         {p.get('input')}",
            f"region        {where}" + (f" (offset {','.join(map(str, offset))} in the input)"
                                        if any(offset) else " (the whole input)"),
            f"options       {options}",
            f"mask          {mask}"]


def _codec_name(codec):
    name = type(codec).__name__
    cname = getattr(codec, "cname", None)
    level = getattr(codec, "clevel", None)
    if cname is not None:
        cname = getattr(cname, "value", cname)
        return f"{name}({cname}, level {level})"
    return name


def _stats(arr, *, progress=False):
    from tqdm.auto import tqdm

    if arr.ndim < 3:
        data = np.asarray(arr[...], dtype=np.float64)
        return {"min": float(data.min()), "max": float(data.max()), "mean": float(data.mean())}
    chunk_z = (getattr(arr, "chunks", None) or (1,))[0]
    depth = slab_depth(arr.shape, np.dtype(arr.dtype).itemsize, chunk_z=chunk_z)
    lo, hi, total = math.inf, -math.inf, 0.0
    for z0 in tqdm(range(0, arr.shape[0], depth), disable=not progress, desc="stats", delay=1.0):
        slab = np.asarray(arr[z0:z0 + depth])
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
        total += float(slab.sum(dtype=np.float64))
    return {"min": lo, "max": hi, "mean": total / max(int(np.prod(arr.shape)), 1)}


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
    path : str or Path
        Anything :func:`open_volume` reads.

    Returns
    -------
    str
        64 hex digits.
    """
    text = str(path)
    h = hashlib.sha256()
    if any(ch in text for ch in "*?["):
        files = sorted(_glob.glob(text), key=_natural_key)
        folders = []
    else:
        h5 = split_hdf5(text)
        p = Path(h5[0] if h5 is not None else text)
        if not p.exists():
            raise EmtileError(f"input {text!r} does not exist")
        if p.is_dir() and _store.is_zarr_store(p):
            files = [p / n for n in ("zarr.json", ".zarray", ".zgroup", ".zattrs")
                     if (p / n).exists()]
            inner = getattr(_open_zarr(p), "path", "") or ""
            folders = [p / inner] if inner else [p]
        elif p.is_dir():
            files, folders = sorted((f for f in p.iterdir() if f.is_file()), key=_natural_key), []
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
# --------------------------------------------------------------------------- inputs


def input_to_float(a):
    """Input pixels -> float32 as the model sees them: integers scaled by their dtype's maximum
    (uint8 / 255), booleans to 0/1, floats unchanged. Training and prediction both use it."""
    a = np.asarray(a)
    if a.dtype == np.float32:
        return a
    if a.dtype.kind in "ui":
        return a.astype(np.float32) * np.float32(1.0 / np.iinfo(a.dtype).max)
    return a.astype(np.float32)


def open_input(source, *, name="input", require_complete=True):
    """A path or an array -> ``(array, path or None)``; what every entry point accepts.

    Parameters
    ----------
    source : str, Path, array-like or sequence
        A path opens lazily with :func:`open_volume`. An object with ``shape``, ``dtype`` and
        slicing (NumPy, Zarr, :class:`LazyArray`) is used as it is; a list becomes a NumPy array.
    name : str
        The parameter's name, for the error message.
    require_complete : bool
        Refuse an emtile store whose writer has not finished (see :func:`open_volume`); every
        command's inputs do.

    Returns
    -------
    array : array-like
    path : str or None
        The path, for re-opening in worker processes; None for an in-memory array.
    """
    if isinstance(source, (str, os.PathLike)):
        return open_volume(source, name=name, require_complete=require_complete), str(source)
    if isinstance(source, (list, tuple)):
        return np.asarray(source), None
    if not all(hasattr(source, a) for a in ("shape", "dtype", "__getitem__")):
        raise EmtileError(f"{name} must be a path or an array (with shape, dtype and slicing), got "
                          f"{type(source).__name__}")
    return source, None


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


# --------------------------------------------------------------------------- stacks slab by slab


class Stack:
    """A ``(Z, Y, X)`` view of a 2-D, 3-D or single-channel 4-D array, read slab by slab.

    Parameters
    ----------
    array : array-like, shape (Y, X), (Z, Y, X) or (1, Z, Y, X)
    display : str
        How messages name it (its path, or e.g. ``"labels array"``).
    """

    def __init__(self, array, display):
        self.array = array
        self.display = display
        shape = tuple(int(s) for s in array.shape)
        if len(shape) == 2:
            self.lead = "2d"
            shape = (1,) + shape
        elif len(shape) == 3:
            self.lead = ""
        elif len(shape) == 4 and shape[0] == 1:
            self.lead = "c"
            shape = shape[1:]
        else:
            raise EmtileError(f"{display} has shape {tuple(array.shape)}: expected (Z, Y, X), "
                              "(Y, X) or one channel (1, Z, Y, X)")
        self.shape = shape
        self.dtype = np.dtype(array.dtype)

    def read(self, z0, z1, yx=(slice(None), slice(None))):
        """Slices ``z0:z1`` (cropped to ``yx``) as a NumPy array, shape (z1 - z0, Y', X')."""
        if self.lead == "2d":
            return np.asarray(self.array[yx])[None]
        if self.lead == "c":
            return np.asarray(self.array[(0, slice(z0, z1)) + tuple(yx)])
        return np.asarray(self.array[(slice(z0, z1),) + tuple(yx)])


def open_stack(source, *, name):
    """A path or an array (see :func:`open_input`) as a :class:`Stack` named by its path or
    ``"<name> array"``."""
    array, path = open_input(source, name=name)
    return Stack(array, path if path is not None else f"{name} array")


def resolve_slices(slices, depth, *, name="slices"):
    """Slice indices as a sorted list of ints, checked against a stack of ``depth`` slices.

    Parameters
    ----------
    slices : None, int, slice, sequence of int or str
        None: all; ``3``; ``slice(25, 30)`` (open ends allowed, no step); ``[25, 27]``; or the
        CLI's text, ``"25:30"``, ``"25,27"``.
    depth : int
        Number of slices in the volume.
    name : str
        The parameter's name, for error messages.

    Examples
    --------
    >>> resolve_slices(slice(25, 30), 30)
    [25, 26, 27, 28, 29]
    >>> resolve_slices([4, 1, 1], 5)
    [1, 4]
    >>> resolve_slices("25:30", 30), resolve_slices("3,1", 5)
    ([25, 26, 27, 28, 29], [1, 3])
    """
    def outside(text):
        return EmtileError(f"{name}={text} is outside the volume, which has {depth} slice"
                           f"{'s' if depth != 1 else ''} (0 to {depth - 1})")

    if slices is None:
        return list(range(depth))
    if isinstance(slices, str):  # the CLI's spelling: "25:30", "25,27", "3"
        slices = parse_slices(slices, name)
    if isinstance(slices, slice):
        start = 0 if slices.start is None else int(slices.start)
        stop = depth if slices.stop is None else int(slices.stop)
        if slices.step not in (None, 1):
            raise EmtileError(f"{name}={start}:{stop}:{slices.step} has a step, which is not "
                              "supported: give a range such as 25:30 or a list such as 25,27")
        if not 0 <= start < stop <= depth:
            raise outside(f"{'' if slices.start is None else start}:"
                          f"{'' if slices.stop is None else stop}")
        return list(range(start, stop))
    if isinstance(slices, (int, np.integer)):
        slices = [slices]
    out = sorted({int(z) for z in slices})
    if not out:
        raise EmtileError(f"{name} is empty: give at least one slice index in 0..{depth - 1}")
    wrong = [z for z in out if not 0 <= z < depth]
    if wrong:
        raise outside(",".join(str(z) for z in wrong))
    return out


def parse_slices(text, name="slices"):
    """``"25:30"`` -> ``slice(25, 30)``; ``"25,27"`` -> ``[25, 27]``; a one-line error otherwise."""
    try:
        if ":" in text:
            parts = [p.strip() for p in text.split(":")]
            if len(parts) != 2:
                raise ValueError
            return slice(*(int(p) if p else None for p in parts))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise EmtileError(f"{name}={text!r} is not a slice range like 25:30 or a list like "
                          f"25,27") from None


def slice_runs(zs, max_len=None):
    """Sorted slice indices -> contiguous ``(start, stop)`` runs, each at most ``max_len`` long.

    Examples
    --------
    >>> slice_runs([0, 1, 2, 5, 6, 9], max_len=2)
    [(0, 2), (2, 3), (5, 7), (9, 10)]
    """
    runs = []
    for z in zs:
        if runs and runs[-1][1] == z and (max_len is None or runs[-1][1] - runs[-1][0] < max_len):
            runs[-1][1] = z + 1
        else:
            runs.append([z, z + 1])
    return [tuple(r) for r in runs]


def slab_depth(shape, itemsize, *, chunk_z=1, budget=None):
    """Slices per slab of a ``(Z, Y, X)`` stack: whole z-chunks, about ``budget`` bytes (default
    :data:`SLAB_BYTES`), at most Z.

    ``itemsize`` is the bytes per pixel the reader holds (e.g. 4 where it works in float32).
    """
    budget = SLAB_BYTES if budget is None else budget
    per_slice = int(np.prod(shape[1:])) * int(itemsize)
    n = max(1, budget // max(per_slice, 1) // chunk_z) * chunk_z
    return min(n, max(shape[0], 1))


def center_crop(array, shape):
    """The centre ``shape`` of the last ``len(shape)`` axes of ``array`` (a view).

    Works on NumPy arrays and torch tensors alike. An odd size difference leaves the extra pixel
    at the end (the U-Net's skip connections and training patches always differ by even sizes).
    """
    sizes = tuple(array.shape[-len(shape):])
    assert all(n >= s for n, s in zip(sizes, shape)), (tuple(array.shape), tuple(shape))
    box = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(sizes, shape))
    return array[(Ellipsis, *box)]


# --------------------------------------------------------------------------- binary labels


class LabelChecker:
    """Checks that labels are binary, slab after slab, and returns their foreground.

    Labels are binary when every value seen so far is in {0, 1}, or every one in {0, 255}, or the
    data are bool; non-zero is the cell interior. The first slab that breaks this raises one
    :class:`EmtileError` naming where, the values seen and how to binarise them.
    """

    def __init__(self):
        self.values = set()

    def foreground(self, data, where):
        """``data != 0`` (bool) after checking ``data``'s values; ``where`` names it in errors."""
        data = np.asarray(data)
        if data.dtype == np.bool_:
            return data
        if data.dtype == np.uint8:  # a histogram is much cheaper than sorting a large slab
            values = np.flatnonzero(np.bincount(data.ravel(), minlength=256))
        else:
            values = np.unique(data)
        self.values.update(values.tolist())
        if not (self.values <= {0, 1} or self.values <= {0, 255}):
            shown = sorted(self.values)
            listing = ", ".join(f"{v:g}" for v in shown[:8]) + (", ..." if len(shown) > 8 else "")
            found = f"{len(shown)} value{'s' if len(shown) > 1 else ''}"
            raise EmtileError(
                f"labels are not binary in {where}: found {found}: {listing}; expected 0/1 "
                "(1 = cell interior), 0/255 or bool; binarise them with --threshold T "
                "(emtile convert LABELS labels.zarr --labels --threshold T: values > T become 1)")
        return data != 0


def check_labels(labels, zs):
    """Check that ``labels[z]`` for ``z`` in ``zs`` are binary (see :class:`LabelChecker`),
    reading one slice at a time; return the fraction of foreground (non-zero) pixels."""
    checker, ones, total = LabelChecker(), 0, 0
    for z in zs:
        fg = checker.foreground(labels[z], f"slice {z}")
        ones += int(np.count_nonzero(fg))
        total += fg.size
    return ones / max(total, 1)


# --------------------------------------------------------------------------- the writer thread


class WriterThread:
    """Runs ``work(*item)`` on a background thread for every item :meth:`put` hands over, in order,
    so the caller reads (or computes) the next item meanwhile; at most ``depth`` items wait.

    The first exception in ``work`` stops the work (later items are skipped) and is raised on
    the caller's thread by the next :meth:`put` / :meth:`check`, or by :meth:`close`. Used as a
    context manager, it closes (waiting for every item) on success and aborts on an exception.

    Parameters
    ----------
    work : callable
    depth : int
        Items that may wait in the queue.
    initializer : callable, optional
        Called once on the thread before the first item (e.g. a thread-local setting).
    """

    def __init__(self, work, *, depth=2, initializer=None, name="emtile-writer"):
        self.work, self.initializer, self.error = work, initializer, None
        self._skip = False
        self.queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self):
        if self.initializer is not None:
            self.initializer()
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None and not self._skip:
                try:
                    self.work(*item)
                except BaseException as exc:  # re-raised on the caller's thread
                    self.error = exc

    def check(self):
        """Raise the work's first error, if there was one."""
        if self.error is not None:
            raise self.error

    def put(self, *item):
        """Queue ``item`` (waits while ``depth`` items are queued)."""
        self.check()
        self.queue.put(item)

    def close(self):
        """Wait until every queued item is done; raise the work's first error."""
        self.queue.put(None)
        self.thread.join()
        self.check()

    def abort(self):
        """Skip the queued items, wait for the one in progress; never raises."""
        self._skip = True
        self.queue.put(None)
        self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None:
            self.close()
        else:
            self.abort()
