"""The voxel size an input's own metadata records, and where it was found.

TIFF files: OME-XML, then ImageJ (``unit``, ``spacing`` and the resolution tags), then the plain
TIFF resolution tags; an OME-Zarr store: its level's ``scale`` in its axes' units (read through
:mod:`emtile.store`, the one reader of NGFF metadata); a folder or glob of images: its first
file's in-plane size. A value that cannot be a voxel size (zero, negative, not finite, an
unknown unit, a print resolution) is ignored with one :class:`MetadataWarning` line.
:func:`emtile.convert` records the size with its source (:data:`VOXEL_SOURCES`), and
``emtile info`` says it (:data:`SOURCE_WORDS`).
"""

import glob as _glob
import math
import re
import warnings
from pathlib import Path

from emtile import store as _store
from emtile._errors import one_line
from emtile.tiff import TIFF_SUFFIXES
from emtile.volume import IMAGE_SUFFIXES, natural_key

__all__ = ["MetadataWarning", "VOXEL_SOURCES", "SOURCE_WORDS", "read_voxel_size"]


class MetadataWarning(UserWarning):
    """A voxel size in an input's metadata that emtile cannot use (zero, negative, not finite,
    an unknown unit, a print resolution): one line; the value is ignored."""


#: Where a store's voxel size came from (``attrs["emtile"]["voxel_size_source"]``); the order is
#: the precedence of :func:`emtile.convert` (``voxel_size=``, recorded as ``"--voxel-size"``,
#: first, then the input's own metadata).
VOXEL_SOURCES = ("--voxel-size", "OME-XML", "ImageJ", "TIFF resolution tags", "OME-Zarr",
                 "not given")
#: How ``emtile info`` words each source (and ``"input"`` / ``"prediction"``, what predict and
#: segment record for the size they copy).
SOURCE_WORDS = {"--voxel-size": "given at conversion (--voxel-size)",
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
    >>> import numpy as np, tifffile, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.tif")
    >>> tifffile.imwrite(path, np.zeros((4, 8, 8), np.uint8), imagej=True, resolution=(250, 250),
    ...                  metadata={"axes": "ZYX", "spacing": 0.05, "unit": "um"})
    >>> read_voxel_size(path)
    ({'z': 50.0, 'y': 4.0, 'x': 4.0}, 'ImageJ')
    """
    from emtile.locations import Location, is_url

    if isinstance(path, Location) and not path.is_local or is_url(path):
        return _ngff_voxel_size(path)  # an object store holds OME-Zarr only
    text = str(path)
    if _store.split_hdf5_path(text) is not None:
        return {}, "not given"
    p, stack = Path(text), False
    if any(ch in text for ch in "*?["):
        files = sorted(_glob.glob(text), key=natural_key)
        p, stack = (Path(files[0]) if files else None), True
    elif p.is_dir():
        if _store.is_zarr_store(p):
            return _ngff_voxel_size(p)
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
                        and not f.name.startswith(".")), key=natural_key)
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
                      f"({one_line(exc)}); ignored", MetadataWarning, stacklevel=3)
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
                      f"voxel_size= to give one)", MetadataWarning, stacklevel=4)
    return out


def _as_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _ngff_voxel_size(path):
    """An OME-Zarr group's (or an array of one's) level scale in its axes' units, as nm."""
    space = _store.level_scale(path)
    if space is None:  # not NGFF, foreign metadata, or emtile's placeholder of none given
        return {}, "not given"
    if not any("unit" in a for a, _ in space) and all(s == 1 for _, s in space):
        return {}, "not given"  # a writer's default, not a measurement
    entries = {ax: (s, a.get("unit"), f"{a.get('name', ax)} scale {s:g} {a.get('unit', '')}"
                    .rstrip()) for ax, (a, s) in zip("zyx"[-len(space):], space[-3:])}
    sizes = _checked(entries, "OME-Zarr metadata", path)
    return (sizes, "OME-Zarr") if "y" in sizes and "x" in sizes else ({}, "not given")


