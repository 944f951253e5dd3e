"""``emtile.convert``: any stack -> a chunked, compressed OME-Zarr store, in bounded memory.

The input is read slab by slab (:func:`emtile.stacks.slab_depth`, about 64 MB each) on the
calling thread while a :class:`~emtile.stacks.WriterThread` hands the previous slab and its
downsampled levels to a pool of threads, one per core (up to :data:`WRITE_THREADS`), that
compress and write its rows of chunks side by side (the codecs release the GIL); an
uncompressed, contiguous TIFF is read with one plain read per slab
(:func:`emtile.tiff.read_contiguous`) instead of page by page through tifffile's Zarr view.
Labels are checked binary as they stream (:class:`~emtile.stacks.LabelChecker`), or kept as
instance ids (``ids=True``: whole numbers >= 0, checked by
:func:`~emtile.stacks.check_id_values`; the store is an NGFF label image recording ``ids:
true``, its largest id and, when cheap, how many there are). The voxel size is
``voxel_size=`` if given, else what the input's metadata records
(:func:`emtile.voxels.read_voxel_size`), recorded with its source. The store is written in the
order every writing command follows (``docs/ARCHITECTURE.md``, Stores) and marked complete only
after its last chunk.

(Not ``convert.py``: a submodule of that name would replace the lazily exported function
``emtile.convert`` as soon as anything imported it.)
"""

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from emtile import _faults, tiff
from emtile import store as _store
from emtile._errors import EmtileError
from emtile._process import usable_cores
from emtile.convert_shards import SHARDS, resolve_shards
from emtile.describe import describe_volume
from emtile.locations import at
from emtile.stacks import (IdCounter, LabelChecker, WriterThread, check_id_values, slab_depth,
                           smallest_unsigned)
from emtile.volume import open_volume
from emtile.voxels import SOURCE_WORDS, MetadataWarning, read_voxel_size

__all__ = ["convert"]

WRITE_THREADS = 8  # the most threads compressing and writing chunks at once


def _conversion_voxel_size(input, ndim, voxel_size, unit):
    """``(voxel size (z, y, x) nm or None, source, known)`` of a conversion: ``voxel_size``
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
    warnings.warn(f"{str(input)!r}: the pixel size {y:g} x {x:g} nm ({SOURCE_WORDS[source]}) "
                  f"comes with no slice spacing: z is recorded as {x:g} nm (as x) and the voxel "
                  f"size counts as not given; pass voxel_size=Z,{y:g},{x:g} to set it",
                  MetadataWarning, stacklevel=3)
    return (x, y, x), source, False






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


def convert(input, output, *, labels=False, ids=False, threshold=None, channel=None, dataset=None,
            chunks=None, voxel_size=None, unit="nm", levels=1, compression="zstd",
            compression_level=3, overwrite=False, allow_partial=False, progress=True,
            shards=SHARDS, storage_options=None):
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
    ids : bool
        With ``labels``: keep the object ids instead of binarising (instance labels, 0 =
        unlabelled). An unsigned source keeps its type (uint8 / uint16 / uint32 / uint64; bool
        becomes uint8); a signed or float source whose values are all whole numbers >= 0 is
        stored in the smallest unsigned type that holds its largest value (found by a first
        pass over the input); a negative or fractional value is a one-line error naming it.
        The store is an NGFF label image with ``attrs["emtile"]["ids"] = True``, ``max_id``
        and ``id_count`` (None when the ids run past 2^20: counting them would cost a sort);
        pyramid levels take every other voxel, so they hold only ids of level 0. Not with
        ``threshold``.
    chunks : tuple of int, optional
        Chunk shape ``(Z, Y, X)``; default one slice by up to 1024×1024.
    voxel_size : tuple of float, optional
        ``(Z, Y, X)`` (``(Y, X)`` for a single image) in ``unit``. Default: what the input's
        own metadata records (:func:`read_voxel_size`: OME-XML, ImageJ, TIFF resolution tags,
        an OME-Zarr input's scale), else ``(1, 1, 1)`` nm recorded as unknown. The store
        records where it came from (``attrs["emtile"]["voxel_size_source"]``, one of
        :data:`emtile.voxels.VOXEL_SOURCES`), and :func:`emtile.info` says it.
    unit : str
        Unit of ``voxel_size``: ``"nm"`` (default), ``"um"`` / ``"µm"``, ``"mm"`` or
        ``"angstrom"``. The store records nanometres.
    levels : int
        Resolution levels for viewers: level ``k`` is 2^k times smaller in y and x.
    allow_partial : bool
        Convert the complete pages of a TIFF cut short instead of refusing it; the store records
        what was expected and what was found (``attrs["emtile"]["partial"]``, shown by
        :func:`emtile.info`).
    shards : {"auto", "none"} or tuple of int
        Zarr v3 sharding at every level (:mod:`emtile.convert_shards`): ``"auto"`` (default)
        one slab deep, one row of chunks high (a few where levels halve the chunks), the whole
        slice wide, so each shard file is written once, whole, by one thread; ``"none"``
        unsharded (a file per chunk); or a shard shape ``(Z, Y, X)`` of whole chunks (slabs are
        then whole shards deep). The chunks stay the shards' inner chunks, so the arrays and
        what readers read are the same either way.
    storage_options : dict, optional
        Options of the object stores (``s3://``, ``gs://``; ``https://`` inputs) that ``input``
        and ``output`` name (:func:`emtile.locations.parse_storage_options`); the endpoint and
        credentials also come from the environment.

    Returns
    -------
    dict
        What :func:`emtile.info` reports for the new store
        (:func:`emtile.describe.describe_volume`).

    Memory stays bounded by a few 64 MB slabs whatever the stack size. The store is marked
    complete only after its last chunk is written; a write that fails (disk full, permission
    denied) is a :class:`emtile.store.StoreWriteError` and leaves it incomplete. A re-run
    replaces an incomplete store: a conversion is one streaming pass, so starting over costs at
    most that pass and gives the same bytes.
    """
    input, output = at(input, storage_options), at(output, storage_options)
    _store.check_output(output, inputs=[input])
    src = open_volume(input, channel=channel, dataset=dataset, allow_partial=allow_partial,
                      require_complete=True)
    dtype = np.dtype(src.dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise EmtileError(f"input {str(input)!r} has non-numeric dtype {dtype}")
    if src.ndim not in (2, 3):
        raise EmtileError(
            f"input {str(input)!r} has shape {src.shape}: expected a 2-D image or a 3-D stack "
            "(for multi-channel data keep one with channel=N)"
        )
    _check_label_options(labels=labels, ids=ids, threshold=threshold)
    shape = (1,) + tuple(src.shape) if src.ndim == 2 else tuple(src.shape)
    chunks = _check_tuple("chunks", chunks, 3, "1,1024,1024", cast=int)
    resolve_shards(shards, shape, (1, 1, 1), 1)  # its spelling, before any work
    voxel_size, voxel_source, known = _conversion_voxel_size(input, src.ndim, voxel_size, unit)
    if levels < 1 or 2 ** (levels - 1) > max(shape[1:]):
        raise EmtileError(f"levels={levels} is not valid for slices of {shape[1:]}: "
                          f"at most {int(math.log2(max(shape[1:]))) + 1}")
    attrs = {"source": str(input), "source_dtype": str(dtype), "voxel_size_given": known,
             "voxel_size_source": voxel_source}
    if getattr(src, "partial", None):
        attrs["partial"] = src.partial
    with _store.output_lock(output) as lock:
        _store.prepare_output(output, overwrite=overwrite)
        read_slab = _slab_reader(src, input, plain=channel is None and dataset is None)
        out_dtype = (_id_dtype(src, input, read_slab) if ids else  # signed/float ids: a pass
                     np.dtype(np.uint8) if labels or dtype == np.bool_ else dtype)
        chunks, shard = _layout(shape, chunks, shards, np.dtype(src.dtype), out_dtype,
                                levels=levels, ids=ids)
        with _store.write_errors(output):
            group = _create_store(output, shape, out_dtype, ids=ids, labels=labels,
                                  chunks=chunks, shards=shard, voxel_size=voxel_size, levels=levels,
                                  compression=compression, compression_level=compression_level,
                                  attrs=attrs)
        try:
            counter = _copy_slabs(src, read_slab, [group[str(level)] for level in range(levels)],
                                  input, output, labels=labels, ids=ids, threshold=threshold,
                                  progress=progress)
        except _store.StoreWriteError:
            raise  # the output stays, incomplete: a re-run replaces it
        except EmtileError as exc:
            _store.remove_store(output)  # bad input: leave nothing behind
            if str(exc).startswith("labels are not binary"):
                raise EmtileError(f"{exc}; or keep them as instance ids with ids=True") from None
            raise
        with _store.write_errors(output):
            _faults.point("convert.before_complete")
            extra = {} if counter is None else {"max_id": counter.max_id,
                                                "id_count": counter.count}
            if hasattr(lock, "check"):  # an object store's lock: still this run's?
                lock.check()
            _store.mark_complete(group, **extra)
    return describe_volume(output)


def _check_label_options(*, labels, ids, threshold):
    """One line for options that do not go together."""
    if ids and not labels:
        raise EmtileError("ids=True only applies with labels=True (instance labels: "
                          "convert(LABELS, 'labels.zarr', labels=True, ids=True))")
    if ids and threshold is not None:
        raise EmtileError(f"threshold={threshold:g} does not apply with ids=True, which keeps "
                          "the ids as they are instead of binarising them: give one or the other")
    if threshold is not None and not labels:
        raise EmtileError("threshold= only applies with labels=True")


def _id_dtype(src, input, read_slab):
    """The dtype a conversion with ``ids=True`` stores: an unsigned source's own (bool: uint8);
    for a signed or float source, the smallest unsigned type that holds its largest value, after
    a pass over it that checks every value is a whole number >= 0."""
    dtype = np.dtype(src.dtype)
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype.kind == "u":
        return dtype
    shape = (1,) + tuple(src.shape) if src.ndim == 2 else tuple(src.shape)
    depth = slab_depth(shape, max(dtype.itemsize, 1))
    top = 0
    for z0 in range(0, shape[0], depth):
        z1 = min(z0 + depth, shape[0])
        slab = read_slab(z0, z1)
        top = max(top, check_id_values(slab, f"{str(input)!r} slices {z0}:{z1}")[1])
    return smallest_unsigned(top)


def _layout(shape, chunks, shards, src_dtype, out_dtype, *, levels, ids):
    """``(chunks, shards)`` of the store: the chunks (default :func:`emtile.store.default_chunks`,
    clipped to the shape) and the level-0 shard shape or None (:func:`resolve_shards`, whose
    ``"auto"`` is one slab of :func:`_copy_slabs` deep)."""
    chunks = chunks or _store.default_chunks(shape, out_dtype)
    chunks = tuple(min(c, n) if n else c for c, n in zip(chunks, shape))
    depth = slab_depth(shape, src_dtype.itemsize, chunk_z=chunks[0])
    return chunks, resolve_shards(shards, shape, chunks, depth, levels=levels, halve=ids)


def _create_store(output, shape, dtype, *, ids, labels, attrs, **kwargs):
    """The new store: an image, binary labels, or (``ids``) an NGFF label image of ids."""
    name = Path(str(output)).stem
    if ids:
        return _store.create_label_image(output, shape, dtype, source=None, name=name,
                                         attrs={**attrs, "ids": True}, **kwargs)
    return _store.create_image(output, shape, dtype, kind="labels" if labels else "image",
                               name=name, attrs=attrs, **kwargs)


def _read_slab(src, input, z0, z1):
    """Slices ``z0:z1`` of ``src`` (the whole of a 2-D image) as a NumPy array, (Z, Y, X)."""
    squeeze = src.ndim == 2
    try:
        slab = np.asarray(src[...] if squeeze else src[z0:z1])
    except EmtileError:
        raise
    except Exception as exc:  # a corrupt or truncated file shows itself only when read
        raise EmtileError(f"cannot read {str(input)!r} at slices {z0}:{z1}: {exc}") from None
    return slab[None] if squeeze else slab


def _slab_reader(src, input, *, plain):
    """``read(z0, z1)``: slices ``z0:z1`` of ``src`` as a NumPy array (Z, Y, X). For a TIFF
    (``plain``: no channel or dataset chosen) whose pixels are one uncompressed, contiguous run
    of bytes, one read of the file per slab (:func:`emtile.tiff.read_contiguous`); else through
    ``src`` (:func:`_read_slab`). Either way the same values."""
    layout = None
    if plain and isinstance(input, (str, os.PathLike)) and not getattr(src, "partial", None) \
            and Path(input).suffix.lower() in tiff.TIFF_SUFFIXES:
        try:
            layout = tiff.contiguous_layout(input)
        except Exception:  # open_volume read it: let its reader say what is wrong, if anything
            layout = None
        if layout is not None and (layout[1] != tuple(src.shape)
                                   or layout[2].newbyteorder("=") != np.dtype(src.dtype)):
            layout = None  # not the array open_volume made of it (pages, channels)
    if layout is None:
        return lambda z0, z1: _read_slab(src, input, z0, z1)

    def read(z0, z1):
        try:
            return tiff.read_contiguous(input, layout, z0, z1)
        except Exception as exc:  # a file cut short since it was checked
            raise EmtileError(f"cannot read {str(input)!r} at slices {z0}:{z1}: {exc}") from None

    return read


def _write_threads():
    """Threads that compress and write chunks: one per core this process may use."""
    return max(1, min(WRITE_THREADS, usable_cores()))


def _put(arr, z0, slab, pool):
    """``arr[z0:z0 + len(slab)] = slab`` as rows of whole chunks (one z-chunk by one y-chunk,
    every x), written side by side in ``pool`` (one after the other without one); the bytes
    are those of one assignment. Even one after the other, rows cost less than one assignment
    of the slab (measured: 0.8-0.95x the CPU time, 2048^2 slices in 1024^2 chunks, zarr 3.1).
    A sharded ``arr``: rows of whole shards instead, so each shard is written in one
    assignment by one thread (a slab starts and ends on shard boundaries in z)."""
    cz, cy = (arr.shards or arr.chunks)[:2]
    z1 = z0 + slab.shape[0]
    pieces, a = [], z0
    while a < z1:
        b = min(a + cz - a % cz, z1)  # to the end of a's z-chunk
        pieces += [(a, b, y, y + cy) for y in range(0, slab.shape[1], cy)]
        a = b

    def put(piece):
        a, b, y0, y1 = piece
        arr[a:b, y0:y1] = slab[a - z0:b - z0, y0:y1]

    for _ in (map if pool is None else pool.map)(put, pieces):  # raises the first error
        pass


def _copy_slabs(src, read_slab, arrays, input, output, *, labels, ids, threshold, progress):
    """Stream ``src`` (read by ``read_slab(z0, z1)``) into the level arrays slab by slab (a
    reader, a writer thread and its pool); with ``ids``, return the :class:`IdCounter` of what
    was written (else None)."""
    from tqdm.auto import tqdm

    depth = slab_depth(arrays[0].shape, np.dtype(src.dtype).itemsize,
                       chunk_z=(arrays[0].shards or arrays[0].chunks)[0])  # whole shards in z
    checker = LabelChecker() if labels and not ids and threshold is None else None
    counter = IdCounter() if ids else None
    out_dtype = arrays[0].dtype

    def read(z0, z1):
        slab = read_slab(z0, z1)
        if ids:  # checked whole and >= 0 by _id_dtype's pass (an unsigned source needs none)
            slab = slab.astype(out_dtype, copy=False)
            counter.update(slab)
        elif labels:
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
                _put(arr, z0, slab, pool)
            _faults.point("convert.slab")

    n = arrays[0].shape[0]
    threads = _write_threads()
    with tqdm(total=n, unit="slice", desc=f"convert {Path(str(input)).name}",
              disable=not progress, delay=1.0) as bar, \
            ThreadPoolExecutor(threads, thread_name_prefix="emtile-chunks") as pool:
        pool = pool if threads > 1 else None
        _pipeline(((z0, min(z0 + depth, n)) for z0 in range(0, n, depth)),
                  read, write, on_done=lambda z0, z1: bar.update(z1 - z0))
    return counter


def _pipeline(ranges, read, write, *, on_done):
    """Read slabs on this thread while a :class:`WriterThread` writes the previous ones."""
    with WriterThread(lambda z0, z1, slab: (write(z0, z1, slab), on_done(z0, z1))) as writer:
        for z0, z1 in ranges:
            writer.check()  # a failed write stops the reading too
            writer.put(z0, z1, read(z0, z1))
