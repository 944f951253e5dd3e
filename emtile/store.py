"""OME-Zarr stores: create them, mark them complete, replace them safely.

Every store emtile writes is a Zarr v3 group carrying OME-NGFF 0.5 ``multiscales`` metadata,
with the full-resolution array at ``"0"`` and optional 2× downsampled levels ``"1"``, ``"2"``,
… in y and x. napari (napari-ome-zarr) and neuroglancer open it as an image.

Completeness is a group attribute, ``attrs["emtile"]["complete"]``. It is written ``False`` when
the store is created and set ``True`` by :func:`mark_complete` only after the writer has written
its last chunk, so a killed run never leaves an output that looks complete.
"""

import shutil
from pathlib import Path

import numpy as np

from emtile._errors import EmtileError

FORMAT_VERSION = 1
_UNITS = {"z": "nanometer", "y": "nanometer", "x": "nanometer"}


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


def create_image(path, shape, dtype, *, chunks=None, voxel_size=None, axes=None, levels=1,
                 name=None, kind="image", attrs=None, compression="zstd", compression_level=3,
                 fill_value=0):
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

    # the emtile attributes (complete: False) go in with the group itself, so a run killed while
    # the arrays are being created leaves a store that is recognisably an incomplete emtile one
    emtile_attrs = {"format": FORMAT_VERSION, "kind": kind, "complete": False, **(attrs or {})}
    group = zarr.open_group(str(path), mode="w-", zarr_format=3,
                            attributes={"emtile": emtile_attrs})
    compressor = _compressor(compression, compression_level)
    for level in range(levels):
        group.create_array(
            str(level), shape=level_shape(shape, axes, level), dtype=dtype, chunks=chunks,
            compressors=[compressor] if compressor else None, fill_value=fill_value,
            dimension_names=list(axes),
        )
    group.attrs.update({
        "ome": {"version": "0.5", "multiscales": _multiscales(axes, full_voxel, levels, name)},
        "emtile": emtile_attrs,
    })
    return group


def _emtile_attrs(path):
    """The ``emtile`` attributes of the group at ``path``, or None if it is not an emtile store."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:  # not a group (or not Zarr at all)
        return None
    return group.attrs.asdict().get("emtile")


def is_complete(path):
    """True only for an emtile store whose writer finished; False for incomplete or foreign ones."""
    meta = _emtile_attrs(path)
    return bool(meta and meta.get("complete"))


def mark_complete(group, **extra):
    """Record that the writer has finished (call after the last chunk is written)."""
    meta = dict(group.attrs.get("emtile", {}))
    meta.update(extra, complete=True)
    group.attrs["emtile"] = meta


def is_zarr_store(path):
    path = Path(path)
    return path.is_dir() and ((path / "zarr.json").exists() or (path / ".zgroup").exists()
                              or (path / ".zarray").exists())


def prepare_output(path, *, overwrite=False, resume=False):
    """Make ``path`` ready for a new store, refusing to lose anything the user may want.

    - nothing there: fine;
    - an incomplete emtile store: removed (it is the leftover of an interrupted run) unless
      ``resume`` is True, in which case it is kept and ``"resume"`` is returned;
    - a complete store or another Zarr store: refused unless ``overwrite``;
    - a file, or a folder that is not a Zarr store: always refused (emtile never deletes them).

    Returns ``"new"``, ``"replaced"`` or ``"resume"``.
    """
    path = Path(path)
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
    meta = _emtile_attrs(path) if path.is_dir() else None
    if meta is not None and not meta.get("complete"):
        if resume:
            return "resume"
        remove_store(path)
        return "replaced"
    if not overwrite:
        raise EmtileError(f"output {str(path)!r} already exists; pass --overwrite to replace it")
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


def remove_store(path):
    """Delete the Zarr store at ``path``; anything that is not a Zarr store is never deleted."""
    path = Path(path)
    assert is_zarr_store(path), f"refusing to delete {path}: not a Zarr store"
    shutil.rmtree(path)


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


def voxel_size(path, ndim):
    """The last ``ndim`` spatial voxel sizes of the OME-Zarr group at ``path``, or None when
    ``path`` is None, not a Zarr store, or has no (readable) multiscales metadata."""
    if path is None or not is_zarr_store(path):
        return None
    try:
        import zarr

        attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
        sizes = list(spatial_scale(multiscales(attrs)).values())
    except Exception:  # foreign metadata: the caller keeps its default voxel size
        return None
    return tuple(sizes[-ndim:]) if len(sizes) >= ndim else None


def set_translation(group, starts):
    """Record where the image starts in a larger volume (NGFF 0.5: the ``scale`` transform, then
    a ``translation`` in physical units), so viewers overlay it on that volume.

    ``starts`` gives the first voxel along each spatial axis; all zero leaves the group as it is.
    The group must have one resolution level.
    """
    starts = [int(s) for s in starts]
    if not any(starts):
        return
    ome = dict(group.attrs["ome"])
    ms = [dict(m) for m in ome["multiscales"]]
    names = [a["name"] for a in ms[0]["axes"]]
    (d,) = ms[0]["datasets"]
    scale = d["coordinateTransformations"][0]["scale"]
    it = iter(starts)
    translation = [0.0 if n == "c" else float(next(it) * s) for n, s in zip(names, scale)]
    ms[0]["datasets"] = [dict(d, coordinateTransformations=[
        d["coordinateTransformations"][0], {"type": "translation", "translation": translation}])]
    ome["multiscales"] = ms
    group.attrs["ome"] = ome
