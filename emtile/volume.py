"""Open any EM stack as a lazy array: "a path or an array" for every entry point.

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

What a TIFF promises is checked by :mod:`emtile.tiff`; converting to OME-Zarr is
:mod:`emtile.converter`'s, describing a volume :mod:`emtile.describe`'s, its recorded voxel size
:mod:`emtile.voxels`', and reading stacks slab by slab :mod:`emtile.stacks`'.
"""

import contextlib
import glob as _glob
import itertools
import os
import re
from pathlib import Path

import numpy as np

from emtile import store as _store
from emtile import tiff
from emtile._errors import EmtileError, one_line
from emtile.geometry import LazyArray
from emtile.tiff import TIFF_SUFFIXES

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


# --------------------------------------------------------------------------- lazy views


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
                f"cannot be read ({one_line(chunk_exc)}); restore it, or the whole input, "
                f"from a good copy", store, key, [tuple(b) for b in box])
    return EmtileError(f"cannot read {store!r} at voxels {_format_region(region, axes)}: "
                       f"{one_line(exc)}")


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


def natural_key(path):
    """Sort key of file names in natural order (``slice2`` before ``slice10``)."""
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
            raise EmtileError(f"channel={channel} was given but {self.files[0]!r} has one "
                              f"channel")
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
        raise EmtileError(f"channel={channel} is out of range for {what!r}: it has channels 0 "
                          f"to {n - 1}")


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
    from emtile.locations import Location, is_url

    if isinstance(path, Location) and not path.is_local or is_url(path):
        return _select_channel(_open_zarr_url(Location(path), require_complete, name), channel,
                               str(path))
    text = str(path)
    if any(ch in text for ch in "*?["):
        files = sorted(_glob.glob(text), key=natural_key)
        files = [f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise EmtileError(f"no PNG or TIFF images match {text!r}")
        return ImageStack(files, channel=channel)
    h5 = _store.split_hdf5_path(text)
    if h5 is not None:
        return _open_hdf5(h5[0], dataset or h5[1], channel, name_as=name)
    p = Path(text)
    if not p.exists():
        raise EmtileError(f"{name} {text!r} does not exist")
    if p.is_dir():
        if _store.is_zarr_store(p):
            return _select_channel(_open_zarr(p, require_complete), channel, text)
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
                        and not f.name.startswith(".")), key=natural_key)
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
        with tiff.tifffile_records(catch_warnings=False), tifffile.TiffFile(self.path) as tf:
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
                f"{_format_region(region, 'zyx')}) cannot be read ({one_line(exc)}); restore "
                f"the file from a good copy", self.path, f"page {i}", region) from None



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
        with tiff.tifffile_records() as records, tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            axes, shape = series.axes, tuple(series.shape)
            paged = tiff.single_page_series(tf) if channel is None else None
            problems, promise = tiff.inspect(tf, path, paged, records)
            if problems:
                salvage = tiff.salvage(tf, series, os.path.getsize(path))
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
        raise EmtileError(f"channel={channel} was given but {str(path)!r} has one channel")
    return arr


def _partial_tiff(path, problems, salvage, channel, promise, allow_partial):
    """The error for a TIFF that disagrees with itself or, with ``allow_partial``, the complete
    slices it holds (:func:`emtile.tiff.salvage`) as a stack whose ``partial`` says what was expected and
    what was found."""
    n, shape, dtype, offset = salvage
    found = f"{n} complete slice{'s' if n != 1 else ''} of shape {shape}"
    if not allow_partial:
        hint = " (pass allow_partial=True to read the complete slices there are)" if n else ""
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


def _open_zarr_url(loc, require_complete, name):
    """A Zarr array or OME-Zarr group at a URL (``s3://``, ``gs://``, ``https://``), opened as
    :func:`_open_zarr` opens a local one: the emtile attributes read from the group that holds
    the array."""
    import zarr

    try:
        node = _store.open_zarr(loc)
    except FileNotFoundError:
        raise EmtileError(f"{name} {loc.url!r} does not exist (no Zarr store there)") from None
    except EmtileError:
        raise
    except Exception as exc:
        raise EmtileError(f"cannot open Zarr store {loc.url!r}: {exc}") from None
    meta = None
    with contextlib.suppress(Exception):  # an array with no group above it has no emtile attrs
        group = node if not isinstance(node, zarr.Array) else \
            zarr.open_group(loc.parent.zarr_store("r"), mode="r",
                            zarr_format=node.metadata.zarr_format)
        meta = group.attrs.asdict().get("emtile")
    if require_complete and meta is not None and not meta.get("complete"):
        raise EmtileError(
            f"{name} {loc.url!r} is an emtile store whose writer has not finished (interrupted, "
            f"or still running; 'emtile info' shows complete NO): run the command that writes "
            f"it again to finish it")
    if isinstance(node, zarr.Array):
        return CheckedArray(node, loc.url)
    ms = _store.multiscales(node.attrs.asdict())
    inner = ms["datasets"][0]["path"] if ms else "0"
    try:
        return CheckedArray(node[inner], loc.url)
    except KeyError:
        raise EmtileError(f"Zarr group {loc.url!r} has no OME multiscales and no array '0'; "
                          f"open one of its arrays as {loc.url}/NAME") from None


def _select_channel(arr, channel, text):
    if channel is None:
        return arr
    _check_channel(channel, arr.shape[0], text)
    return ChannelView(arr, 0, channel)


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
    from emtile.locations import Location

    if isinstance(source, Location):  # kept whole: its storage options travel to workers
        return open_volume(source, name=name, require_complete=require_complete), source
    if isinstance(source, (str, os.PathLike)):
        return open_volume(source, name=name, require_complete=require_complete), str(source)
    if isinstance(source, (list, tuple)):
        return np.asarray(source), None
    if not all(hasattr(source, a) for a in ("shape", "dtype", "__getitem__")):
        raise EmtileError(f"{name} must be a path or an array (with shape, dtype and slicing), got "
                          f"{type(source).__name__}")
    return source, None

