"""OME-Zarr stores: create them, mark them complete, replace them safely.

Every store emtile writes is a Zarr v3 group carrying OME-NGFF 0.5 ``multiscales`` metadata,
with the full-resolution array at ``"0"`` and optional 2× downsampled levels ``"1"``, ``"2"``,
… in y and x. napari (napari-ome-zarr) and neuroglancer open it as an image. Arrays can be
stored with Zarr v3's sharding codec (``create_image(shards=...)``: the chunks become the
shards' inner chunks; zarr writes a shard assigned whole as one file, replaced atomically), and
a channel axis can name its channels (NGFF ``omero.channels[].label``).

Completeness is a group attribute, ``attrs["emtile"]["complete"]``. It is written ``False`` when
the store is created and set ``True`` by :func:`mark_complete` only after the writer has written
its last chunk, so a killed run never leaves an output that looks complete.

The rules every writing command follows, in this order (``convert`` is the model)::

    check_output(output, inputs=[...], files={...})   # before any work: not an input, writable
    with output_lock(output):                          # one live run per output
        prepare_output(output, overwrite=...)          # refuse / replace / resume
        with write_errors(output):                     # a failed write is one line
            ... write, then mark_complete(group)
"""

import contextlib
import datetime
import errno
import glob
import json
import os
import posixpath
import re
import shutil
import socket
from pathlib import Path

import numpy as np

from emtile import _faults  # noqa: F401  (in emtile's fault tests: hooks zarr's store writes)
from emtile._errors import EmtileError
from emtile._process import alive, pid_start
from emtile.locations import remote

FORMAT_VERSION = 1
_UNITS = {"z": "nanometer", "y": "nanometer", "x": "nanometer"}
NGFF_VERSION = "0.5"  # the OME-Zarr version of every store emtile writes


def _local(path):
    """A local path as the local code paths take it (a local Location as its path)."""
    from emtile.locations import Location

    return path.path if isinstance(path, Location) else path


def zarr_target(path, mode="r"):
    """What ``zarr.open_group`` / ``zarr.open`` take for ``path``: the local path as a string,
    or an object-store URL's Zarr store (:meth:`emtile.locations.Location.zarr_store`, with its
    storage options). Opening to write (any ``mode`` but ``"r"``) first installs emtile's
    faster fill-value check for zarr's chunk writes (:func:`emtile._zarr_buffer.use`)."""
    if mode != "r":
        from emtile import _zarr_buffer

        _zarr_buffer.use()
    loc = remote(path)
    return str(_local(path)) if loc is None else loc.zarr_store(mode)


def open_zarr(path, mode="r", *, group=False):
    """``zarr.open`` (``zarr.open_group`` with ``group=True``) of ``path`` as
    :func:`zarr_target` gives it, Zarr v3 first: one ``zarr.json`` read, where letting zarr
    guess the format also probes v2's keys (14 requests instead of 4 on an object store);
    a store that is not v3 is then opened as zarr finds it."""
    import zarr

    opener = zarr.open_group if group else zarr.open
    target = zarr_target(path, mode)
    try:
        return opener(target, mode=mode, zarr_format=3)
    except FileNotFoundError:  # zarr's NodeNotFoundError too: no v3 node there
        return opener(target, mode=mode)


def default_chunks(shape, dtype=np.uint8):
    """Chunks that suit 2-D tiles: one slice deep, up to 512×512 (1024×1024 for 1-byte data)."""
    side = 1024 if np.dtype(dtype).itemsize == 1 else 512
    spatial = shape[-2:]
    lead = tuple(1 for _ in shape[:-2])
    return lead + tuple(min(side, s) for s in spatial)


def _compressor(compression, level):
    from zarr.codecs import BloscCodec, BloscShuffle

    if compression in (None, "none"):
        return None
    if compression not in ("zstd", "lz4", "zlib", "blosclz", "lz4hc"):
        raise EmtileError(
            f"compression={compression!r} is not supported: choose zstd, lz4, lz4hc, zlib, blosclz or none"
        )
    return BloscCodec(cname=compression, clevel=level, shuffle=BloscShuffle.shuffle)


def _multiscales(axes, voxel_size, levels, name):
    datasets = []
    for level in range(levels):
        scale = [
            float(v) * (2**level if ax in "yx" else 1) for ax, v in zip(axes, voxel_size)
        ]
        datasets.append({
            "path": str(level),
            "coordinateTransformations": [{"type": "scale", "scale": scale}],
        })
    ome_axes = [
        {"name": ax, "type": "channel"} if ax == "c" else
        {"name": ax, "type": "space", "unit": _UNITS[ax]}
        for ax in axes
    ]
    return [{"name": name or "image", "axes": ome_axes, "datasets": datasets}]


def level_shape(shape, axes, level):
    """Shape of downsampled ``level`` (y and x halved per level, rounding up)."""
    return tuple(-(-s // 2**level) if ax in "yx" else s for s, ax in zip(shape, axes))


def downsample(a, *, labels):
    """Halve the last two axes (y, x) for the next pyramid level: the 2×2 mean for images and
    probabilities (an odd edge is padded by repeating it; integers are rounded), the top-left
    sample for labels and masks, which never invents a value.

    Examples
    --------
    >>> downsample(np.array([[0, 2, 4], [2, 4, 8]], np.uint8), labels=False)
    array([[2, 6]], dtype=uint8)
    >>> downsample(np.array([[1, 2, 3], [4, 5, 6]]), labels=True)
    array([[1, 3]])
    """
    if labels:
        return a[..., ::2, ::2]
    pad = [(0, 0)] * (a.ndim - 2) + [(0, a.shape[-2] % 2), (0, a.shape[-1] % 2)]
    b = np.pad(a, pad, mode="edge").astype(np.float32)
    b = 0.25 * (b[..., ::2, ::2] + b[..., 1::2, ::2] + b[..., ::2, 1::2] + b[..., 1::2, 1::2])
    if np.issubdtype(a.dtype, np.integer):
        return np.rint(b).astype(a.dtype)
    return b.astype(a.dtype)


def level_chunks(chunks, axes, level):
    """Chunks of pyramid level ``level`` when each level's chunks are halved in y and x, so that
    a writer that owns whole level-0 chunks owns whole chunks at every level."""
    return tuple(max(1, c // 2**level) if ax in "yx" else c for c, ax in zip(chunks, axes))


def level_shards(shards, chunks, shape, axes, level, *, halve):
    """The shard shape of pyramid level ``level`` (a multiple of its chunks ``chunks``, which are
    already the level's): ``shards`` halved in y and x like the chunks when ``halve``; along an
    axis where one shard holds the whole full-resolution axis, one shard holds the whole level
    (its halving may leave a last pixel that a halved shard would put in a shard of its own)."""
    lshape = level_shape(shape, axes, level)
    out = []
    for s, c, n, ln, ax in zip(shards, chunks, shape, lshape, axes):
        f = 2**level if halve and ax in "yx" else 1
        if s >= n:
            out.append(-(-ln // c) * c)  # the whole axis in one shard
        elif s % f or (s // f) % c:
            raise EmtileError(f"shards={tuple(shards)} cannot be halved to whole chunks at level "
                              f"{level} along {ax}: use shards divisible by {f * c} there")
        else:
            out.append(s // f)
    return tuple(out)


def _check_shards(shards, chunks, shape):
    """Level-0 ``shards``: one whole multiple of the chunk per axis (clipped to the shape like
    the chunks), or a one-line error naming ``shards=``."""
    shards = tuple(int(s) for s in shards)
    if len(shards) != len(shape) or any(s <= 0 for s in shards):
        raise EmtileError(f"shards={shards} must give one positive size per axis of shape {shape}")
    shards = tuple(min(s, -(-n // c) * c) if n else s for s, c, n in zip(shards, chunks, shape))
    bad = [k for k, (s, c) in enumerate(zip(shards, chunks)) if s % c]
    if bad:
        raise EmtileError(f"shards={shards} must be whole multiples of the chunks {chunks} along "
                          f"every axis (a shard holds whole chunks)")
    return shards


def create_image(path, shape, dtype, *, chunks=None, voxel_size=None, axes=None, levels=1,
                 name=None, kind="image", attrs=None, compression="zstd", compression_level=3,
                 fill_value=0, halve_chunks=False, shards=None, channel_names=None):
    """Create an incomplete OME-Zarr image group at ``path`` and return it (opened for writing).

    Parameters
    ----------
    path : str or Path
        Folder of the new store; must not exist (see :func:`prepare_output`).
    shape : tuple of int
        Full-resolution shape, ``(Z, Y, X)``, ``(Y, X)`` or ``(C, Z, Y, X)``.
    dtype : numpy dtype
    chunks : tuple of int, optional
        Full-resolution chunk shape; default :func:`default_chunks`.
    voxel_size : tuple of float, optional
        Physical size of a voxel in nanometres, one per spatial axis; default 1 each.
    axes : str, optional
        Axis names, e.g. ``"zyx"`` (default from ``len(shape)``: ``yx``, ``zyx``, ``czyx``).
    levels : int
        Number of resolution levels (``1`` = full resolution only).
    kind : str
        ``"image"``, ``"labels"`` or ``"probabilities"``; recorded in ``attrs["emtile"]``.
    attrs : dict, optional
        Extra entries for ``attrs["emtile"]``.
    halve_chunks : bool
        Level ``k``'s chunks are ``chunks // 2**k`` in y and x (:func:`level_chunks`) instead of
        ``chunks``: for blockwise writers, whose blocks then own whole chunks at every level.
    shards : tuple of int, optional
        Store each array with Zarr v3's sharding codec: level 0's shard shape (whole multiples
        of ``chunks``, which become the shards' inner chunks); every other level's follows as
        the chunks do (:func:`level_shards`). A writer that writes a whole shard in one
        assignment writes its file once, whole (zarr replaces it atomically). None: unsharded,
        one file per chunk.
    channel_names : sequence of str, optional
        Names of the channels of a ``c`` axis, in order: NGFF ``omero.channels[].label`` (with a
        grey colour and a 0..1 window in the stored units, as viewers expect).
    """
    import zarr

    shape = tuple(int(s) for s in shape)
    axes = axes or {2: "yx", 3: "zyx", 4: "czyx"}[len(shape)]
    if len(axes) != len(shape):
        raise EmtileError(f"axes={axes!r} does not match a {len(shape)}-D shape {shape}")
    spatial = [ax for ax in axes if ax != "c"]
    if voxel_size is None:
        voxel_size = (1.0,) * len(spatial)
    voxel_size = tuple(float(v) for v in voxel_size)
    if len(voxel_size) != len(spatial) or any(v <= 0 for v in voxel_size):
        raise EmtileError(
            f"voxel_size={voxel_size} must give one positive size per spatial axis ({''.join(spatial)})"
        )
    full_voxel = tuple(1.0 if ax == "c" else voxel_size[spatial.index(ax)] for ax in axes)
    chunks = tuple(chunks) if chunks is not None else default_chunks(shape, dtype)
    if len(chunks) != len(shape) or any(c <= 0 for c in chunks):
        raise EmtileError(f"chunks={chunks} must give one positive size per axis of shape {shape}")
    chunks = tuple(min(c, s) if s else c for c, s in zip(chunks, shape))
    if levels < 1:
        raise EmtileError(f"levels={levels} must be at least 1")
    if shards is not None:
        shards = _check_shards(shards, chunks, shape)

    # the emtile attributes (complete: False) go in with the group itself, so a run killed while
    # the arrays are being created leaves a store that is recognisably an incomplete emtile one
    emtile_attrs = {"format": FORMAT_VERSION, "kind": kind, "complete": False, **(attrs or {})}
    group = zarr.open_group(zarr_target(path, "w"), mode="w-", zarr_format=3,
                            attributes={"emtile": emtile_attrs})
    compressor = _compressor(compression, compression_level)
    for level in range(levels):
        level_chunk = level_chunks(chunks, axes, level) if halve_chunks else chunks
        group.create_array(
            str(level), shape=level_shape(shape, axes, level), dtype=dtype, chunks=level_chunk,
            shards=None if shards is None else level_shards(shards, level_chunk, shape, axes,
                                                            level, halve=halve_chunks),
            compressors=[compressor] if compressor else None, fill_value=fill_value,
            dimension_names=list(axes),
        )
    ome = {"version": NGFF_VERSION, "multiscales": _multiscales(axes, full_voxel, levels, name)}
    if channel_names is not None:
        ome["omero"] = _omero(channel_names, shape[axes.index("c")] if "c" in axes else None,
                              dtype)
    group.attrs.update({"ome": ome, "emtile": emtile_attrs})
    return group


def _omero(names, channels, dtype):
    """NGFF ``omero`` metadata naming each channel (a grey colour and a window over 0..1 in the
    stored units: 0..255 for uint8 probabilities)."""
    names = [str(n) for n in names]
    if channels is None or len(names) != channels:
        raise EmtileError(f"channel_names={names} must name each of the {channels or 0} channels "
                          f"of the c axis")
    top = 255.0 if np.dtype(dtype) == np.uint8 else 1.0
    window = {"min": 0.0, "max": top, "start": 0.0, "end": top}
    return {"channels": [{"label": n, "color": "FFFFFF", "active": True, "window": window}
                         for n in names]}


def emtile_attrs(path):
    """The ``emtile`` attributes of the group at ``path``, or None if it is not an emtile store."""
    import zarr

    if remote(path) is not None:
        from emtile import objoutput

        return objoutput.emtile_attrs(remote(path))

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:  # not a group (or not Zarr at all)
        return None
    return group.attrs.asdict().get("emtile")


def is_complete(path):
    """True only for an emtile store whose writer finished; False for incomplete or foreign ones."""
    meta = emtile_attrs(path)
    return bool(meta and meta.get("complete"))


def mark_complete(group, **extra):
    """Record that the writer has finished (call after the last chunk is written)."""
    meta = dict(group.attrs.get("emtile", {}))
    meta.update(extra, complete=True)
    group.attrs["emtile"] = meta


def is_zarr_store(path):
    if remote(path) is not None:
        from emtile import objoutput

        return objoutput.is_zarr_store(remote(path))
    path = Path(_local(path))
    return path.is_dir() and ((path / "zarr.json").exists() or (path / ".zgroup").exists()
                              or (path / ".zarray").exists())


def prepare_output(path, *, overwrite=False, resume=False):
    """Make ``path`` ready for a new store, refusing to lose anything the user may want.

    - nothing there, or an empty folder: fine;
    - an incomplete emtile store: removed (it is the leftover of an interrupted run) unless
      ``resume`` is True, in which case it is kept and ``"resume"`` is returned;
    - a complete store or another Zarr store: refused unless ``overwrite``;
    - a file, or a folder that is not a Zarr store: always refused (emtile never deletes them).

    Returns ``"new"``, ``"replaced"`` or ``"resume"``.
    """
    if remote(path) is not None:
        from emtile import objoutput

        return objoutput.prepare_output(remote(path), overwrite=overwrite, resume=resume)
    path = Path(_local(path))
    _sweep_trash(path)
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        path.rmdir()  # empty (a run killed as it created the store): nothing to lose
    if not path.exists():
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.exists():
            raise EmtileError(f"output folder {str(parent)!r} does not exist")
        if not _writable(parent):
            raise EmtileError(f"output location {str(parent)!r} is not writable")
        return "new"
    if not is_zarr_store(path):
        what = "folder" if path.is_dir() else "file"
        raise EmtileError(
            f"output {str(path)!r} is an existing {what} that is not a Zarr store; "
            f"choose another output path (emtile never deletes such a {what})"
        )
    meta = emtile_attrs(path) if path.is_dir() else None
    if meta is not None and not meta.get("complete"):
        if resume:
            return "resume"
        remove_store(path)
        return "replaced"
    if not overwrite:
        raise EmtileError(f"output {str(path)!r} already exists; pass overwrite=True to replace it")
    remove_store(path)
    return "replaced"


def _writable(folder):
    """Try it: os.access says yes to root even where writes fail (read-only or virtual file systems)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


TRASH = ".emtile-trash-"


def remove_store(path):
    """Delete the Zarr store at ``path`` so that a kill part-way never leaves half a store.

    The store is first renamed (atomically) to a hidden ``.NAME.emtile-trash-ID`` beside it and
    then deleted; a kill during the deletion leaves only that hidden folder, which the next
    :func:`prepare_output` of the same output removes. Anything that is not a Zarr store is
    refused (an internal error: callers check first). An object-store URL has no rename:
    :func:`emtile.objremove.remove_store` marks the store as being removed, then deletes it.
    """
    if remote(path) is not None:
        from emtile import objremove

        return objremove.remove_store(remote(path))
    path = Path(_local(path))
    assert is_zarr_store(path), f"refusing to delete {path}: not a Zarr store"
    import uuid

    trash = path.parent / f".{path.name}{TRASH}{uuid.uuid4().hex[:12]}"
    os.rename(path, trash)
    _faults.point("store.removing")
    shutil.rmtree(trash)


def _sweep_trash(path):
    """Remove what a killed :func:`remove_store` of ``path`` left beside it."""
    if remote(path) is not None:
        return  # no rename on an object store: nothing is left beside it
    path = Path(_local(path))
    for trash in path.parent.glob(f".{glob.escape(path.name)}{TRASH}*"):
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)




# --------------------------------------------------------------------------- output rules

_HDF5_PATH = re.compile(r"^(.*?\.(?:h5|hdf5|hdf))(?:/(.*))?$", flags=re.IGNORECASE)


def split_hdf5_path(text):
    """``'a/b.h5/raw/data'`` -> (``'a/b.h5'``, ``'raw/data'``); None if not an HDF5 path."""
    m = _HDF5_PATH.match(str(text))
    return None if m is None else (m.group(1), m.group(2))


def input_locations(spec):
    """The files and folders an input reads, as paths (unresolved).

    A glob gives the files it matches; ``file.h5/dataset`` the HDF5 file; a path inside a Zarr
    store (``pred.zarr/labels/mask``) itself and the outermost store that holds it; anything
    else itself.
    A non-path input (an array, None) gives nothing, and so does a URL (the object-store
    rules compare URLs: :func:`emtile.objoutput.check_output`).
    """
    from emtile.locations import Location, is_url

    if isinstance(spec, Location):
        spec = spec.path if spec.is_local else None
    if is_url(spec):
        return []
    if spec is None or not isinstance(spec, (str, os.PathLike)):
        return []
    text = os.fspath(spec)
    if any(ch in text for ch in "*?["):
        return [Path(f) for f in sorted(glob.glob(text))]
    h5 = split_hdf5_path(text)
    if h5 is not None:
        return [Path(h5[0])]
    path = root = Path(text)
    while is_zarr_store(root.parent) and root.parent != root:
        root = root.parent
    return [path] if root == path else [path, root]


def _forms(path):
    """The path spelled out (``..`` removed) and resolved (symlinks followed)."""
    return {Path(os.path.abspath(path)), Path(os.path.realpath(path))}


def _relation(out, inp):
    """How ``out`` relates to ``inp`` on disk: "is", "holds", "lies inside" or None."""
    for o in _forms(out):
        for i in _forms(inp):
            if o == i:
                return "is"
            if o in i.parents:
                return "holds"
            if i in o.parents:
                return "lies inside"
    return None


def _via(spec, loc, target, how):
    """Where the clash is, when the input's spelling does not show it."""
    text = os.fspath(spec)
    if os.path.normpath(loc) == os.path.normpath(text):
        if how == "is" and os.path.normpath(target) != os.path.normpath(text):
            return f" (both are {os.path.realpath(target)!r})"
        return ""
    if any(ch in text for ch in "*?["):
        return f" (it matches {str(loc)!r})"
    if split_hdf5_path(text) is not None:
        return f" (the file {str(loc)!r})"
    return f" (in its store {str(loc)!r})"


def check_output(output, *, inputs=(), files=None, overwrite=True):
    """Refuse, before any work, outputs that could destroy an input or cannot be written.

    Parameters
    ----------
    output : str or Path or None
        The store or folder the command writes (None if it writes only ``files``).
    inputs : sequence
        What the command reads: paths, globs, ``file.h5/dataset``, Zarr stores or arrays nested
        in them (see :func:`input_locations`); arrays and None are skipped.
    files : dict or sequence, optional
        Single files the command writes, as ``{keyword: path}`` (e.g. ``{"json_path": p}``,
        named ``json_path='p'`` in the errors) or a list of paths.
    overwrite : bool
        Whether an existing file of ``files`` may be replaced (the default); if False it is
        refused. (Whether an existing output store may be replaced is :func:`prepare_output`'s.)

    Raises
    ------
    EmtileError
        If an output (or file) is, holds or lies inside an input, after resolving ``..``,
        symlinks and trailing slashes; if its folder does not exist or is not writable; if a
        file to write is an existing folder, or an existing file and ``overwrite`` is False.
    """
    if remote(output) is not None:
        from emtile import objoutput

        objoutput.check_output(remote(output), inputs=inputs)
        output = None  # checked; the files below as for a local output
    named = ([(f"{key}={str(f)!r}", f) for key, f in files.items()] if isinstance(files, dict)
             else [(f"output file {str(f)!r}", f) for f in files or ()])
    targets = ([(f"output {str(output)!r}", output, False)] if output is not None else []) + \
        [(label, f, True) for label, f in named if f is not None]
    located = [(spec, loc) for spec in inputs for loc in input_locations(spec)]
    for label, target, is_file in targets:
        for spec, loc in located:
            how = _relation(target, loc)
            if how is not None:
                raise EmtileError(
                    f"{label} {how} the input {os.fspath(spec)!r}"
                    f"{_via(spec, loc, target, how)}: writing it could destroy the input; "
                    f"choose a path outside the input")
        _check_writable_location(label, target, is_file=is_file, overwrite=overwrite)


def _check_writable_location(label, target, *, is_file, overwrite):
    path = Path(target)
    if is_file and path.is_dir():
        raise EmtileError(f"{label} is an existing folder; give a file path")
    if is_file and not overwrite and path.exists():
        raise EmtileError(f"{label} already exists; pass overwrite=True to replace it")
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        raise EmtileError(f"{label}: its folder {str(path.parent)!r} does not exist; create it "
                          f"first")
    if not _writable(parent):
        raise EmtileError(f"{label}: its folder {str(path.parent)!r} is not writable")


class StoreWriteError(EmtileError):
    """Writing an output failed part-way (disk full, permission denied): left incomplete."""


@contextlib.contextmanager
def write_errors(output, *, then="run the same command again to finish it",
                 left="the output is left incomplete ('emtile info' shows complete NO)"):
    """Turn an ``OSError`` raised while writing ``output`` into one :class:`StoreWriteError` line.

    Wrap the writes and the final :func:`mark_complete`, not the reads (a failed read is about
    the input). The output is left as it is: incomplete, so a re-run replaces or resumes it.
    ``then`` says what to do next and ``left`` what state the output is in (a training run's
    folder is not a store: it keeps its last checkpoint).
    """
    try:
        yield
    except OSError as exc:
        _quiet_abandoned_writes()
        code = errno.errorcode.get(exc.errno or 0)
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise StoreWriteError(
            f"writing {str(output)!r} failed: {reason}{f' ({code})' if code else ''}; {left}: "
            f"free space or fix permissions, then {then}") from None


_ABANDONED = ("Task exception was never retrieved", "Task was destroyed but it is pending")


def _quiet_abandoned_writes():
    """zarr writes a slab's chunks as concurrent asyncio tasks; when one fails, the error reaches
    the caller and the others are abandoned, and asyncio logs each of them (with a traceback)
    when it is collected, often as the process exits. The one-line error has said it all: drop
    those two records from the ``asyncio`` logger (nothing else)."""
    import logging

    log = logging.getLogger("asyncio")
    if not any(getattr(f, "emtile", False) for f in log.filters):
        drop = logging.Filter()
        drop.filter = lambda record: not str(record.msg).startswith(_ABANDONED)
        drop.emtile = True
        log.addFilter(drop)


# --------------------------------------------------------------------------- locks

LOCK_SUFFIX = ".emtile-lock"


def lock_path(output):
    """The lock file of ``output``: hidden, beside it (``.NAME.emtile-lock``), so replacing the
    output never removes the lock, and every spelling of the output shares one lock."""
    real = Path(os.path.realpath(output))
    return real.parent / f".{real.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(output):
    """Hold ``output``'s lock while writing it; refuse if another live run holds it.

    The lock is ``fcntl.flock`` on :func:`lock_path` (released by the kernel when its process
    dies, however it dies), and the file records the holder: pid, host, the pid's start time
    and the start of the run. A lock whose holder is dead on this host is stale and taken over
    (this also covers a lock kept by reader processes that a killed run left behind). Where the
    file system has no ``flock`` the record alone decides, best effort. Take the lock after
    :func:`check_output` and before :func:`prepare_output`, which may replace the output.

    An object-store URL takes :func:`emtile.objlock.object_lock` instead (a conditional put
    with a heartbeat; it yields the :class:`emtile.objlock.ObjectLock`, whose ``check()`` says
    whether the lock is still this run's).

    Yields
    ------
    Path
        The lock file (removed on exit).

    Raises
    ------
    EmtileError
        If another live run holds the lock.
    """
    if remote(output) is not None:
        from emtile import objlock

        with objlock.object_lock(remote(output)) as lock:
            yield lock
        return
    output = _local(output)
    path = lock_path(output)
    record = _lock_record(output)
    fd = _acquire(path, output, record)
    try:
        yield path
    finally:
        _release(path, fd, record)


def _acquire(path, output, record):
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        got = _try_flock(fd)
        if got is None:  # no flock on this file system
            os.close(fd)
            return _acquire_by_record(path, output, record)
        if not got:
            os.close(fd)
            holder = _read_record(path)
            if _stale(holder, recheck=path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # held only by orphans of a dead run: a fresh file
                continue
            raise EmtileError(_busy_message(output, path, holder))
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(record).encode())
            return fd
        os.close(fd)  # the previous holder removed the file after we opened it: again
    raise EmtileError(f"could not take the lock {str(path)!r} of output {str(output)!r}: it "
                      f"keeps changing; is another emtile run starting on it?")


def _try_flock(fd):
    """True if locked, False if another holds it, None if this file system has no flock."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _acquire_by_record(path, output, record):
    holder = _read_record(path)
    if holder and not _stale(holder):
        raise EmtileError(_busy_message(output, path, holder))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return None


def _release(path, fd, record):
    try:
        if _read_record(path).get("token") == record["token"]:
            os.unlink(path)
    except (OSError, ValueError):
        pass
    finally:
        if fd is not None:
            os.close(fd)


def _same_file(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock_record(output):
    import uuid

    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "pid_start": pid_start(pid),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "output": str(output), "token": uuid.uuid4().hex}


def _read_record(path):
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _stale(holder, recheck=None):
    """A recorded holder that is dead on this host (re-read once after a moment, so a run that
    has just taken the lock and not yet written its record is not mistaken for its dead
    predecessor)."""
    if not holder or alive(holder):
        return False
    if recheck is not None:
        import time

        time.sleep(0.2)
        again = _read_record(recheck)
        return again.get("token") == holder.get("token") and not alive(again)
    return True


def _busy_message(output, path, holder):
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
           if holder else "a run that has not written its record yet")
    return (f"output {str(output)!r} is being written by another emtile run ({who}); wait for "
            f"it to finish or stop it, then run again (if that run is gone, delete "
            f"{str(path)!r})")


# --------------------------------------------------------------------------- NGFF metadata


def multiscales(attrs):
    """The first ``multiscales`` entry of a group's attributes (NGFF 0.5 nests it under ``ome``,
    0.4 keeps it at the top level), or None."""
    ms = attrs.get("ome", attrs).get("multiscales")
    return ms[0] if ms else None


def spatial_scale(ms):
    """``{axis name: size}`` of level 0 of a :func:`multiscales` entry, channel axis left out."""
    names = [a["name"] for a in ms["axes"]]
    scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
    return {n: s for n, s in zip(names, scale) if n != "c"}


def placement(attrs):
    """``(voxel size, translation)`` of an image's full-resolution level, from its group's
    attributes, each as (z, y, x) in its units (a 2-D image gets z = 1 and 0); defaults
    ``(1, 1, 1)`` and None (no translation, or no metadata emtile can read)."""
    voxel, translation = (1.0,) * 3, None
    try:
        ms = multiscales(attrs)
        names = [a["name"] for a in ms["axes"]]
        spatial = [k for k, n in enumerate(names) if n in "zyx"]
        for t in ms["datasets"][0]["coordinateTransformations"]:
            values = [float(t[t["type"]][k]) for k in spatial]
            values = [1.0 if t["type"] == "scale" else 0.0] * (3 - len(values)) + values
            if t["type"] == "scale":
                voxel = tuple(values)
            elif t["type"] == "translation":
                translation = tuple(values)
    except (KeyError, IndexError, TypeError, AttributeError):
        pass
    return voxel, translation


def voxel_size(path, ndim):
    """The last ``ndim`` spatial voxel sizes of the OME-Zarr group at ``path``, in nm where its
    axes name a unit emtile knows (:data:`UNITS_NM`; as written otherwise), or None when
    ``path`` is None, not a Zarr store, or has no (readable) multiscales metadata. What a
    stage copies from its input to its output (predict, segment)."""
    if path is None or not is_zarr_store(path):
        return None
    try:
        ms = multiscales(open_zarr(path, group=True).attrs.asdict())
        units = {a["name"]: UNITS_NM.get(a.get("unit"), 1.0) for a in ms["axes"]}
        sizes = [s * units[n] for n, s in spatial_scale(ms).items()]
    except Exception:  # foreign metadata: the caller keeps its default voxel size
        return None
    return tuple(sizes[-ndim:]) if len(sizes) >= ndim else None


def set_translation(group, starts=None, *, physical=None):
    """Record where the image starts in a larger volume (NGFF 0.5: the ``scale`` transform, then
    a ``translation`` in physical units), so viewers overlay it on that volume.

    ``starts`` gives the first voxel along each spatial axis, in full-resolution voxels;
    ``physical`` gives the translation itself, in the image's units, one per spatial axis. All
    zero leaves the group as it is. Every resolution level gets the same translation (the
    physical place of its first voxel's corner at full resolution).
    """
    ome = dict(group.attrs["ome"])
    ms = [dict(m) for m in ome["multiscales"]]
    names = [a["name"] for a in ms[0]["axes"]]
    scale = ms[0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    if physical is None:
        starts = [int(s) for s in starts]
        if not any(starts):
            return
        it = iter(starts)
        translation = [0.0 if n == "c" else float(next(it) * s) for n, s in zip(names, scale)]
    else:
        if not any(physical):
            return
        it = iter(physical)
        translation = [0.0 if n == "c" else float(next(it)) for n in names]
    ms[0]["datasets"] = [dict(d, coordinateTransformations=[
        d["coordinateTransformations"][0], {"type": "translation", "translation": translation}])
        for d in ms[0]["datasets"]]
    ome["multiscales"] = ms
    group.attrs["ome"] = ome


def create_label_image(path, shape, dtype, *, source, starts=None, physical=None,
                       register=False, **kwargs):
    """Create an incomplete NGFF 0.5 label image at ``path`` (:func:`create_image` with
    ``kind="labels"`` and chunks halved per level) whose ``image-label`` names its image by the
    relative path ``source`` (None: labels with no image beside them, e.g. converted ones), placed as :func:`set_translation` says (``starts`` in voxels or
    ``physical``). ``register``: also list it in its parent ``labels`` group (created when
    missing), as a label image inside an image's ``labels/`` folder must be."""
    import zarr

    if register and remote(path) is not None:
        _register_label(remote(path))
    elif register:
        parent = os.path.dirname(os.path.abspath(str(path)))
        name = os.path.basename(os.path.abspath(str(path)))
        if os.path.exists(os.path.join(parent, "zarr.json")):
            labels = zarr.open_group(parent, mode="r+")
            names = list(labels.attrs.get("ome", {}).get("labels", [])) + [name]
        else:
            labels, names = zarr.open_group(parent, mode="a"), [name]
        labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": names}
    group = create_image(path, shape, dtype, kind="labels", halve_chunks=True, **kwargs)
    if starts is not None or physical is not None:
        set_translation(group, starts, physical=physical)
    ome = dict(group.attrs["ome"])
    # NGFF 0.5: the version is ome's; "source" is optional
    ome["image-label"] = {} if source is None else {"source": {"image": source}}
    group.attrs["ome"] = ome
    return group


def relative_source(source, output):
    """Where the store ``source`` is as seen from the store ``output`` (NGFF
    ``image-label.source``): a relative path on the same disk or in the same bucket, else
    ``source``'s URL."""
    from emtile.locations import Location

    if remote(source) is None and remote(output) is None:
        return os.path.relpath(os.path.abspath(_local(source)), os.path.abspath(_local(output)))
    src, out = Location(source), Location(output)
    if src.is_local or out.is_local or src.scheme != out.scheme or \
            src.path.split("/")[0] != out.path.split("/")[0]:
        return src.url
    return posixpath.relpath(src.path, out.path)


def _register_label(loc):
    """List the label image at the URL ``loc`` in its parent ``labels`` group (created when
    missing), as :func:`create_label_image` does for a local path."""
    import zarr

    parent = loc.parent
    if parent.exists("zarr.json"):
        labels = zarr.open_group(parent.zarr_store("r+"), mode="r+", zarr_format=3)
        names = list(labels.attrs.get("ome", {}).get("labels", [])) + [loc.name]
    else:
        labels = zarr.open_group(parent.zarr_store("a"), mode="a", zarr_format=3)
        names = [loc.name]
    labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": names}


#: Length units of voxel sizes: the name the user gives (``--unit``) or NGFF writes, in nm.
UNITS_NM = {"nm": 1.0, "nanometer": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "micrometer": 1e3,
            "micron": 1e3, "mm": 1e6, "millimeter": 1e6, "angstrom": 0.1, "Å": 0.1, "pm": 1e-3,
            "picometer": 1e-3}


def unit_to_nm(unit):
    """Nanometres per ``unit`` (``"nm"``, ``"um"``/``"µm"``, ``"mm"``, ``"angstrom"``, or an NGFF
    unit name such as ``"micrometer"``); a one-line error for anything else."""
    try:
        return UNITS_NM[str(unit).strip()]
    except KeyError:
        raise EmtileError(f"unit={unit!r} is not a length unit emtile knows: choose nm, um "
                          f"(or µm), mm or angstrom") from None


def inherited_voxel_attrs(path, source):
    """The voxel-size record of a store written from the store at ``path`` (predict from its
    input, segment from its prediction): ``{"voxel_size_source": source}``, or the input's own
    record when the input's size was not known (so ``info`` keeps saying so downstream)."""
    meta = emtile_attrs(path) if path is not None and is_zarr_store(path) else None
    if meta is not None and meta.get("voxel_size_given") is False:
        return {"voxel_size_given": False,
                "voxel_size_source": meta.get("voxel_size_source", "not given")}
    return {"voxel_size_source": source}


def voxel_size_nm(path):
    """The voxel size in nm (spatial axes, in the store's order) that the OME-Zarr store at
    ``path`` records, or None when it records none, records an emtile default (a conversion
    given no ``--voxel-size``), or uses units emtile does not know."""
    if path is None or not is_zarr_store(path):
        return None
    meta = emtile_attrs(path)
    if meta is not None and meta.get("voxel_size_given") is False:
        return None
    try:
        ms = multiscales(open_zarr(path, group=True).attrs.asdict())
        scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
        axes = ms["axes"]
        out = [float(s) * UNITS_NM[a.get("unit", "nanometer")]
               for a, s in zip(axes, scale) if a.get("type") == "space"]
    except Exception:  # foreign or partial metadata, an unknown unit: unknown
        return None
    return out or None


def offset_voxels(path):
    """Where the image of the OME-Zarr group at ``path`` starts in a larger volume, in voxels
    of each spatial axis (its NGFF ``translation`` divided by its ``scale``; what
    :func:`set_translation` writes for a prediction of a region), or None when it records none."""
    if path is None or not is_zarr_store(path):
        return None
    try:
        ms = multiscales(open_zarr(path, group=True).attrs.asdict())
        transforms = ms["datasets"][0]["coordinateTransformations"]
        scale = transforms[0]["scale"]
        shift = next((t["translation"] for t in transforms if t.get("type") == "translation"),
                     None)
        kinds = [a.get("type") for a in ms["axes"]]
    except Exception:  # not NGFF, or foreign metadata
        return None
    if shift is None:
        return None
    return tuple(int(round(t / s)) for t, s, k in zip(shift, scale, kinds) if k == "space")


def level_scale(path):
    """``[(axis, scale), ...]`` of the spatial axes of the OME-Zarr image at ``path``: a group's
    first level, or the level an array of one is (``store.zarr/1``); each ``axis`` its NGFF
    entry (``name``, ``type``, ``unit`` when written), each ``scale`` a float, as written (no
    unit conversion). None when ``path`` records no scale emtile can read (not NGFF, foreign
    metadata, an array outside a store) or records emtile's placeholder (a conversion given no
    voxel size: ``voxel_size_given`` false)."""
    import zarr

    try:
        loc = remote(path)
        node = open_zarr(path)
        if loc is not None:
            group_path, level = (loc, None) if isinstance(node, zarr.Group) else \
                (loc.parent, loc.name)
        else:
            group_path, level = (Path(path), None) if isinstance(node, zarr.Group) else \
                (Path(path).parent, Path(path).name)
        if level is not None and not is_zarr_store(group_path):
            return None
        attrs = open_zarr(group_path, group=True).attrs.asdict()
        ms = multiscales(attrs)
        datasets = ms["datasets"] if ms else []
        dataset = datasets[0] if level is None and datasets else \
            next((d for d in datasets if d["path"] == level), None)
        meta = attrs.get("emtile")
        if dataset is None or (meta is not None and meta.get("voxel_size_given") is False):
            return None
        scale = next(t["scale"] for t in dataset["coordinateTransformations"]
                     if t["type"] == "scale")
        return [(a, float(s)) for a, s in zip(ms["axes"], scale) if a.get("type") == "space"]
    except Exception:  # not NGFF, or foreign metadata
        return None
