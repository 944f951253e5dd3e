"""What a TIFF file promises and what it holds: the checks :func:`emtile.open_volume` runs first.

A TIFF is refused, in one line naming what was expected and what was found, when its page chain
is cut, its metadata (shaped, ImageJ, OME) promise more values than its pages hold, or its
strip / tile byte counts point past the end of the file. :func:`inspect` lists every such reason;
:func:`salvage` says which whole 2-D slices the file still holds (what ``allow_partial=True``
reads). tifffile's log records and warnings are captured while a file is parsed
(:func:`tifffile_records`), never the only sign. The readers themselves (pages, raw slices,
tifffile's Zarr view) are :mod:`emtile.volume`'s; :func:`contiguous_layout` and
:func:`read_contiguous` read a checked file's uncompressed, contiguous slices with one plain
read per slab (convert's fast path: no per-page decoding, no Zarr view).
"""

import contextlib
import logging
import os
import re
import warnings

import numpy as np

__all__ = ["TIFF_SUFFIXES", "tifffile_records", "single_page_series", "inspect", "salvage",
           "contiguous_layout", "read_contiguous"]

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")


def single_page_series(tf):
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
def tifffile_records(catch_warnings=True):
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


def inspect(tf, path, paged, records=()):
    """Every way the file disagrees with what it promises, and what it promises.

    Parameters
    ----------
    tf : tifffile.TiffFile
    path : str or Path
        The file (its size on disk is what the pages are checked against).
    paged : tuple or None
        :func:`single_page_series`'s answer when the file is read as all its one-page series.
    records : list
        What :func:`tifffile_records` collected while ``tf`` was parsed: when no check here finds
        a problem, tifffile's errors there are the reasons (it gave up on something).

    Returns
    -------
    problems : list of str
        One-line reasons, empty for a file that holds what it promises.
    promise : str or None
        What the file's metadata promise, and which metadata (None when they promise nothing
        beyond the pages).
    """
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
    problems = [p for p in problems if p]
    if not problems:  # tifffile gave up on something no check above names
        problems = [f"tifffile: {_strip_repr(m)}" for level, m in records
                    if level >= logging.ERROR]
    return problems, promise


def salvage(tf, series, size):
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


def contiguous_layout(path):
    """``(offset, shape, dtype)`` of the first series of the TIFF at ``path`` when its pixels
    are stored uncompressed in one contiguous run of bytes in their final form (tifffile's
    ``dataoffset``), else None. ``dtype`` carries the file's byte order.

    Only for a file :func:`emtile.open_volume` has checked (page chain and byte counts): this
    says where the bytes are, not that they are all there (:func:`read_contiguous` says that).
    """
    import tifffile

    with tifffile_records(), tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        offset = series.dataoffset
        if offset is None or series.dtype is None:
            return None
        dtype = np.dtype(series.dtype).newbyteorder(tf.byteorder)
        return int(offset), tuple(int(n) for n in series.shape), dtype


def read_contiguous(path, layout, z0, z1):
    """Slices ``z0:z1`` (a 2-D image: the whole of it, as one slice) of a contiguous TIFF, as
    a NumPy array of shape ``(z1 - z0, Y, X)`` in native byte order, with one read of the file.

    ``layout`` is :func:`contiguous_layout`'s. A file shorter than the layout says raises
    ``OSError`` naming the bytes missing.
    """
    offset, shape, dtype = layout
    plane = shape[-2:]
    out = np.empty((z1 - z0,) + plane, dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as f:
        f.seek(offset + z0 * int(np.prod(plane)) * dtype.itemsize)
        done = 0
        while done < len(view):  # a read may return less than asked (e.g. past 2 GiB)
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"the file ends {len(view) - done} bytes before slice {z1 - 1}'s "
                              f"last pixel")
            done += n
    return out if dtype.isnative else out.astype(dtype.newbyteorder("="))


def _strip_repr(message):
    """tifffile's log line without its leading ``<tifffile.X ...>`` object repr."""
    return re.sub(r"^<[^>]*>\s*", "", message)
