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
"""

import glob as _glob
import math
import os
import queue
import re
import threading
from pathlib import Path

import numpy as np

from emtile._errors import EmtileError
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
                    f"pick one with --channel N (0 to {shape[2] - 1})"
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


def _check_channel(channel, n, what):
    if not 0 <= channel < n:
        raise EmtileError(f"--channel {channel} is out of range for {what!r}: it has channels 0 to {n - 1}")


# --------------------------------------------------------------------------- open_volume


def open_volume(path, *, channel=None, dataset=None):
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

    Returns
    -------
    array-like, shape (Z, Y, X) or (Y, X)
        A ``zarr.Array`` or a :class:`LazyArray`; slicing reads only what it asks for.

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
        return _open_hdf5(h5[0], dataset or h5[1], channel)
    p = Path(text)
    if not p.exists():
        raise EmtileError(f"input {text!r} does not exist")
    if p.is_dir():
        if _store.is_zarr_store(p):
            return _select_channel(_open_zarr(p), channel, text)
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
                        and not f.name.startswith(".")), key=_natural_key)
        if not files:
            raise EmtileError(
                f"folder {text!r} holds no PNG, TIFF or JPEG images (and is not a Zarr store)"
            )
        return ImageStack(files, channel=channel)
    suffix = p.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return _open_tiff(p, channel)
    if suffix in IMAGE_SUFFIXES:
        return ImageStack([p], channel=channel, squeeze=True)
    raise EmtileError(
        f"input {text!r} has an unknown format: expected a TIFF, a folder of PNG/TIFF images, "
        "a Zarr store or an HDF5 file"
    )


class TiffPageStack(LazyArray):
    """A TIFF whose 2-D pages were written as separate series (one ``write`` per page), read as
    a ``(Z, Y, X)`` stack page by page. The file is opened per read, so it survives forking."""

    def __init__(self, path, n, shape, dtype):
        self.path, self.shape, self.dtype = str(path), (n,) + tuple(shape), np.dtype(dtype)

    def _read(self, key):
        import tifffile

        zkey, yx = key[0], tuple(key[1:])
        indices = [zkey] if isinstance(zkey, int) else list(range(self.shape[0])[zkey])
        if not indices:
            return np.empty((0,) + np.empty(self.shape[1:], self.dtype)[yx].shape, self.dtype)
        with tifffile.TiffFile(self.path) as tf:
            data = np.stack([tf.pages[i].asarray()[yx] for i in indices])
        return data[0] if isinstance(zkey, int) else data


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


def _open_tiff(path, channel):
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            axes, shape = series.axes, tuple(series.shape)
            paged = _single_page_series(tf) if channel is None else None
            last = tf.pages[-1] if paged else (series.pages[-1] if len(series.pages) else None)
            end = 0
            if last is not None and hasattr(last, "dataoffsets"):
                end = max((o + n for o, n in zip(last.dataoffsets, last.databytecounts)), default=0)
            if not paged and getattr(series, "dataoffset", None) is not None:
                end = max(end, series.dataoffset + series.nbytes)
            if end > os.path.getsize(path):
                raise EmtileError(
                    f"TIFF {str(path)!r} is truncated: its image data needs {end} bytes "
                    f"but the file has {os.path.getsize(path)}"
                )
        if paged:
            return TiffPageStack(path, *paged)
        store = tifffile.imread(path, aszarr=True, series=0, level=0)
        arr = zarr.open_array(store, mode="r")
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
                f"pick one with --channel N (0 to {shape[axis] - 1})"
            )
        _check_channel(channel, shape[axis], str(path))
        return ChannelView(arr, axis, channel)
    if channel is not None:
        raise EmtileError(f"--channel {channel} was given but {str(path)!r} has one channel")
    return arr


def _open_zarr(path):
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise EmtileError(f"cannot open Zarr store {str(path)!r}: {exc}") from None
    if isinstance(node, zarr.Array):
        return node
    multiscales = _store.multiscales(node.attrs.asdict())
    if multiscales:
        return node[multiscales["datasets"][0]["path"]]
    arrays = sorted(name for name, _ in node.arrays())
    if "0" in arrays:
        return node["0"]
    if len(arrays) == 1:
        return node[arrays[0]]
    raise EmtileError(
        f"Zarr group {str(path)!r} has no OME multiscales and {len(arrays)} arrays "
        f"({', '.join(arrays) or 'none'}); open one of them as {str(path)}/NAME"
    )


def _select_channel(arr, channel, text):
    if channel is None:
        return arr
    _check_channel(channel, arr.shape[0], text)
    return ChannelView(arr, 0, channel)


def split_hdf5(text):
    """``'a/b.h5/raw/data'`` -> (``'a/b.h5'``, ``'raw/data'``); None if not an HDF5 path."""
    m = re.match(r"^(.*?\.(?:h5|hdf5|hdf))(?:/(.*))?$", str(text), flags=re.IGNORECASE)
    if m is None:
        return None
    return m.group(1), m.group(2)


_split_hdf5 = split_hdf5  # the name emtile/predictor.py imports until it switches to split_hdf5


class HDF5Dataset(LazyArray):
    """An HDF5 dataset opened per read, so it survives forking into DataLoader workers."""

    def __init__(self, filename, name, shape, dtype):
        self.filename, self.name, self.shape, self.dtype = filename, name, shape, dtype

    def _read(self, key):
        import h5py

        with h5py.File(self.filename, "r") as f:
            return np.asarray(f[self.name][tuple(key)])


def _open_hdf5(filename, name, channel):
    try:
        import h5py
    except ImportError:
        raise EmtileError(
            f"reading {filename!r} needs h5py: pip install 'emtile[hdf5]'"
        ) from None
    if not Path(filename).exists():
        raise EmtileError(f"input {filename!r} does not exist")
    with h5py.File(filename, "r") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if name is None:
            if len(names) != 1:
                raise EmtileError(
                    f"{filename!r} holds {len(names)} datasets ({', '.join(names)}); "
                    f"pick one as {filename}/NAME or with --dataset"
                )
            name = names[0]
        if name not in names:
            raise EmtileError(
                f"{filename!r} has no dataset {name!r}; it has: {', '.join(names) or 'none'}"
            )
        ds = f[name]
        arr = HDF5Dataset(filename, name, tuple(ds.shape), np.dtype(ds.dtype))
    return _select_channel(arr, channel, filename) if channel is not None else arr


# --------------------------------------------------------------------------- convert


def _downsample(a, labels):
    """Halve the last two axes: 2×2 mean for images, top-left sample for labels."""
    if labels:
        return a[..., ::2, ::2]
    pad = [(0, 0)] * (a.ndim - 2) + [(0, a.shape[-2] % 2), (0, a.shape[-1] % 2)]
    b = np.pad(a, pad, mode="edge").astype(np.float32)
    b = 0.25 * (b[..., ::2, ::2] + b[..., 1::2, ::2] + b[..., ::2, 1::2] + b[..., 1::2, 1::2])
    if np.issubdtype(a.dtype, np.integer):
        return np.rint(b).astype(a.dtype)
    return b.astype(a.dtype)


def convert(input, output, *, labels=False, threshold=None, channel=None, dataset=None,
            chunks=None, voxel_size=None, levels=1, compression="zstd", compression_level=3,
            overwrite=False, progress=True):
    """Convert a stack to a chunked, compressed OME-Zarr store, streaming in bounded memory.

    Parameters
    ----------
    input : str or Path
        Anything :func:`open_volume` reads.
    output : str or Path
        The new store (a folder). An existing complete output is refused unless ``overwrite``;
        an incomplete one (an interrupted conversion) is replaced.
    labels : bool
        Store a binary mask as uint8 {0, 1}. Accepts 0/1, 0/255 and bool input; more than two
        values is an error that names them, unless ``threshold`` is given (``value > threshold``).
    chunks : tuple of int, optional
        Chunk shape ``(Z, Y, X)``; default one slice by up to 1024×1024.
    voxel_size : tuple of float, optional
        ``(Z, Y, X)`` in nanometres; default ``(1, 1, 1)`` (recorded as unknown).
    levels : int
        Resolution levels for viewers: level ``k`` is 2^k times smaller in y and x.

    Returns
    -------
    dict
        What :func:`info` reports for the new store.

    Memory stays bounded by a few 64 MB slabs whatever the stack size. The store is marked
    complete only after its last chunk is written.
    """
    from tqdm.auto import tqdm

    src = open_volume(input, channel=channel, dataset=dataset)
    dtype = np.dtype(src.dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise EmtileError(f"input {str(input)!r} has non-numeric dtype {dtype}")
    if src.ndim not in (2, 3):
        raise EmtileError(
            f"input {str(input)!r} has shape {src.shape}: expected a 2-D image or a 3-D stack "
            "(for multi-channel data pick one with --channel N)"
        )
    if threshold is not None and not labels:
        raise EmtileError("--threshold only applies to --labels")
    out_dtype = np.uint8 if labels else (np.uint8 if dtype == np.bool_ else dtype)
    squeeze = src.ndim == 2
    shape = (1,) + tuple(src.shape) if squeeze else tuple(src.shape)
    if chunks is not None and len(chunks) == 2:
        chunks = (1,) + tuple(chunks)
    if chunks is not None and len(chunks) != 3:
        raise EmtileError(f"chunks={tuple(chunks)} must have 3 values (Z,Y,X)")
    if voxel_size is not None and len(voxel_size) == 2:
        voxel_size = (1.0,) + tuple(voxel_size)
    if levels < 1 or 2 ** (levels - 1) > max(shape[1:]):
        raise EmtileError(f"levels={levels} is not valid for slices of {shape[1:]}: "
                          f"at most {int(math.log2(max(shape[1:]))) + 1}")

    _store.prepare_output(output, overwrite=overwrite)
    group = _store.create_image(
        output, shape, out_dtype, chunks=chunks, voxel_size=voxel_size, levels=levels,
        kind="labels" if labels else "image", name=Path(str(output)).stem,
        compression=compression, compression_level=compression_level,
        attrs={"source": str(input), "source_dtype": str(dtype),
               "voxel_size_given": voxel_size is not None},
    )
    arrays = [group[str(level)] for level in range(levels)]
    chunk_z = arrays[0].chunks[0]
    depth = slab_depth(shape, dtype.itemsize, chunk_z=chunk_z)
    checker = LabelChecker() if labels and threshold is None else None

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
        for level, arr in enumerate(arrays):
            if level:
                slab = _downsample(slab, labels)
            arr[z0:z1] = slab

    try:
        with tqdm(total=shape[0], unit="slice", desc=f"convert {Path(str(input)).name}",
                  disable=not progress, delay=1.0) as bar:
            _pipeline(((z0, min(z0 + depth, shape[0])) for z0 in range(0, shape[0], depth)),
                      read, write, on_done=lambda z0, z1: bar.update(z1 - z0))
    except EmtileError:
        _store.remove_store(output)  # bad input: leave nothing behind
        raise
    _store.mark_complete(group)
    return info(output)


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
        ``complete`` is True/False for stores emtile wrote and None for other sources.
    """
    arr = open_volume(path)
    out = {
        "path": str(path),
        "shape": tuple(int(s) for s in arr.shape),
        "dtype": str(arr.dtype),
        "chunks": None,
        "compressor": None,
        "bytes_uncompressed": int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize,
        "bytes_on_disk": _du(split_hdf5(path)[0] if split_hdf5(path) else path)
        if Path(str(path)).exists() else None,
        "voxel_size": None,
        "levels": None,
        "kind": None,
        "complete": None,
    }
    p = Path(str(path))
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
        ms = _store.multiscales(attrs)
        if ms:
            out["levels"] = len(ms["datasets"])
            out["bytes_on_disk_level0"] = _du(p / ms["datasets"][0]["path"])
            out["voxel_size"] = _store.spatial_scale(ms)
            if meta is not None and not meta.get("voxel_size_given", True):
                out["voxel_size_note"] = "not given at conversion; recorded as 1 nm"
    if stats:
        out.update(_stats(arr, progress=progress))
    return out


def _size(n):
    """Bytes as tqdm writes them (three significant digits, SI prefixes: ``7.86MB``)."""
    from tqdm import tqdm

    return "-" if n is None else tqdm.format_sizeof(n, "B")


def format_info(d):
    """What ``emtile info`` prints for the dict that :func:`info` returns."""
    complete = {True: "yes", False: "NO (interrupted or still being written)", None: "-"}[d["complete"]]
    lines = [
        f"path          {d['path']}",
        f"shape         {d['shape']}",
        f"dtype         {d['dtype']}",
        f"chunks        {d['chunks'] or '-'}",
        f"compressor    {d['compressor'] or '-'}",
        f"uncompressed  {_size(d['bytes_uncompressed'])}",
    ]
    if d.get("bytes_on_disk_level0") is not None:
        ratio = d["bytes_uncompressed"] / max(d["bytes_on_disk_level0"], 1)
        lines.append(f"on disk       {_size(d['bytes_on_disk_level0'])} (ratio {ratio:.2f}); "
                     f"whole store {_size(d['bytes_on_disk'])}")
    else:
        lines.append(f"on disk       {_size(d['bytes_on_disk'])}")
    if d["voxel_size"]:
        vs = " x ".join(f"{v:g}" for v in d["voxel_size"].values())
        note = f"  ({d['voxel_size_note']})" if d.get("voxel_size_note") else ""
        lines.append(f"voxel size    {vs} nm ({','.join(d['voxel_size'])}){note}")
    if d["levels"]:
        lines.append(f"levels        {d['levels']}")
    if d["kind"]:
        lines.append(f"kind          {d['kind']}")
    lines.append(f"complete      {complete}")
    for key in ("min", "max", "mean"):
        if key in d:
            lines.append(f"{key:<13} {d[key]:.6g}")
    return "\n".join(lines)


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
    chunk_z = arr.chunks[0] if hasattr(arr, "chunks") else 1
    depth = slab_depth(arr.shape, np.dtype(arr.dtype).itemsize, chunk_z=chunk_z)
    lo, hi, total = math.inf, -math.inf, 0.0
    for z0 in tqdm(range(0, arr.shape[0], depth), disable=not progress, desc="stats"):
        slab = np.asarray(arr[z0:z0 + depth])
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
        total += float(slab.sum(dtype=np.float64))
    return {"min": lo, "max": hi, "mean": total / max(int(np.prod(arr.shape)), 1)}


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


def open_input(source, *, name="input"):
    """A path or an array -> ``(array, path or None)``; what every entry point accepts.

    Parameters
    ----------
    source : str, Path, array-like or sequence
        A path opens lazily with :func:`open_volume`. An object with ``shape``, ``dtype`` and
        slicing (NumPy, Zarr, :class:`LazyArray`) is used as it is; a list becomes a NumPy array.
    name : str
        The parameter's name, for the error message.

    Returns
    -------
    array : array-like
    path : str or None
        The path, for re-opening in worker processes; None for an in-memory array.
    """
    if isinstance(source, (str, os.PathLike)):
        return open_volume(source), str(source)
    if isinstance(source, (list, tuple)):
        return np.asarray(source), None
    if not all(hasattr(source, a) for a in ("shape", "dtype", "__getitem__")):
        raise EmtileError(f"{name} must be a path or an array (with shape, dtype and slicing), got "
                          f"{type(source).__name__}")
    return source, None


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
    slices : None, int, slice or sequence of int
        None: all; ``3``; ``slice(25, 30)`` (open ends allowed, no step); ``[25, 27]``.
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
    """
    def outside(text):
        return EmtileError(f"{name}={text} is outside the volume, which has {depth} slice"
                           f"{'s' if depth != 1 else ''} (0 to {depth - 1})")

    if slices is None:
        return list(range(depth))
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


def slab_depth(shape, itemsize, *, chunk_z=1, budget=SLAB_BYTES):
    """Slices per slab of a ``(Z, Y, X)`` stack: whole z-chunks, about ``budget`` bytes, at most Z.

    ``itemsize`` is the bytes per pixel the reader holds (e.g. 4 where it works in float32).
    """
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
