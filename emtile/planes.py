"""Three orthogonal planes of a 3-D volume: ``emtile show --planes``.

:func:`read_planes` reads, from a ``(Z, Y, X)`` volume and what lies on its grid, only the three
planes through one voxel ``at`` (default the centre): XY at ``z``, XZ at ``y``, YZ at ``x``.
Each source is read plane by plane (``a[z]``, ``a[:, y]``, ``a[:, :, x]``), so a chunked store
reads only the chunks those planes cross. :func:`planes_figure` draws them: one column per plane,
one row per layer,

* ``segmentation``: a label image's instances (``emtile segment``'s store, converted ids, any
  integer id volume) coloured over the raw planes, one colour per id in all three planes
  (:func:`emtile.colours.segmentation_rgba`);
* ``truth``: a ground truth's ids drawn the same way, beside it;
* ``affinities``: for an affinity prediction ``(C, Z, Y, X)`` (its store says
  ``target: affinities``), the mean of its nearest-neighbour channels (offsets with one entry
  of size 1) as a heat map in [0, 1], or the ``channel`` chosen; a ``(Z, Y, X)`` probability
  map is drawn as it is;
* ``raw`` alone when none is given.

Panels keep the physical aspect of the voxels (the voxel size the stores record, in nm, as
``emtile info`` reads it): in XZ a row is ``vz / vx`` as tall as a column is wide. Dashed lines
mark where the other two planes cut each panel.

Why a flag and not automatic for label images: a stack of 2-D segmentations (ISBI: slices
segmented one by one) and a 3-D one have the same ``(Z, Y, X)`` shape and store, and
``emtile show --seg`` must keep drawing the former slice by slice. Only a ``(C, Z, Y, X)``
affinity prediction, which has no slice view, picks the planes by itself.
"""

from dataclasses import dataclass, field

import numpy as np

from emtile._errors import EmtileError

__all__ = ["read_planes", "planes_figure", "parse_at", "plane_aspects", "affinity_channels",
           "is_affinity_store", "PlaneViews", "PLANES"]

#: The planes, in the order drawn: name -> (the axis it cuts, its image's (rows, columns) axes).
PLANES = {"xy": (0, (1, 2)), "xz": (1, (0, 2)), "yz": (2, (0, 1))}
_AXES = "zyx"


@dataclass
class PlaneViews:
    """What :func:`read_planes` read: per layer, ``{plane: 2-D array}`` (planes as in
    :data:`PLANES`; an XZ image has rows z and columns x, a YZ image rows z and columns y)."""

    at: tuple  # (z, y, x)
    shape: tuple  # (Z, Y, X)
    voxel_size: tuple  # (z, y, x) in nm
    voxel_known: bool  # False: no store records one, drawn as isotropic
    raw: dict
    seg: dict = None
    truth: dict = None
    affinity: dict = None  # float64 in [0, 1]
    affinity_label: str = ""
    names: dict = field(default_factory=dict)  # layer -> its source, for titles


def parse_at(at, shape):
    """``at`` (``"Z,Y,X"`` text or three integers; None = the centre) -> ``(z, y, x)`` inside
    ``shape``, or a one-line error naming the value and the valid ranges."""
    valid = ", ".join(f"0 <= {a} < {n}" for a, n in zip(_AXES, shape))
    if at is None:
        return tuple(n // 2 for n in shape)
    text = at if isinstance(at, str) else ",".join(str(v) for v in at)
    try:
        values = tuple(int(v) for v in text.split(","))
    except (TypeError, ValueError):
        raise EmtileError(f"at={text} is not three comma-separated integers: give Z,Y,X with "
                          f"{valid}") from None
    if len(values) != 3:
        raise EmtileError(f"at={text} has {len(values)} values: give Z,Y,X with {valid}")
    if any(not 0 <= v < n for v, n in zip(values, shape)):
        raise EmtileError(f"at={text} is outside the volume of shape {tuple(shape)}: give Z,Y,X "
                          f"with {valid}")
    return values


def plane_aspects(voxel_size):
    """``{plane: matplotlib aspect}``: a pixel's height over its width in each plane, for
    ``voxel_size`` (z, y, x). XY: vy / vx; XZ: vz / vx; YZ: vz / vy."""
    return {name: voxel_size[rows] / voxel_size[cols] for name, (_, (rows, cols)) in PLANES.items()}


def _index(plane, at, lead=()):
    axis = PLANES[plane][0]
    return tuple(lead) + tuple(at[a] if a == axis else slice(None) for a in range(3))


def _read(arr, at, lead=()):
    return {p: np.asarray(arr[_index(p, at, lead)]) for p in PLANES}


def is_affinity_store(source):
    """True when ``source`` is a store whose emtile attributes say ``target: affinities``."""
    from emtile.evaluation import store_kind

    return store_kind(source)[1].get("target") == "affinities"


def affinity_channels(offsets, channels, channel=None, *, name="pred"):
    """The channels to draw of a ``channels``-channel prediction and how to title them: the one
    ``channel`` chosen, else those of ``offsets`` (one ``(dz, dy, dx)`` per channel) that are
    nearest neighbours (one entry of size 1, the rest 0). ``(list of int, label)``."""
    if channel is not None:
        if not isinstance(channel, (int, np.integer)) or not 0 <= channel < channels:
            raise EmtileError(f"channel={channel} is not a channel of {name}, which has "
                              f"{channels}: give 0 to {channels - 1}")
        what = f" (offset {tuple(offsets[channel])})" if offsets is not None else ""
        return [int(channel)], f"channel {channel}{what}"
    if channels == 1:
        return [0], "channel 0"
    if offsets is None:
        raise EmtileError(f"{name} has {channels} channels and records no affinity offsets: "
                          f"give channel= (0 to {channels - 1})")
    near = [k for k, o in enumerate(offsets) if sorted(abs(int(v)) for v in o) == [0, 0, 1]]
    if not near:
        raise EmtileError(f"{name} has no nearest-neighbour offset among {list(offsets)}: give "
                          f"channel= (0 to {channels - 1})")
    listed = ", ".join(str(tuple(offsets[k])) for k in near)
    return near, f"mean of the nearest-neighbour affinities {listed}"


def _open(source, name):
    from emtile.volume import open_input

    return None if source is None else open_input(source, name=name)


def _voxel_size(sources, voxel_size):
    """The voxel size (z, y, x) to draw with: ``voxel_size`` given, else the first store among
    ``sources`` that records one, else isotropic (``known`` False)."""
    from emtile.store import voxel_size_nm

    if voxel_size is not None:
        vs = tuple(float(v) for v in voxel_size)
        if len(vs) != 3 or any(not v > 0 for v in vs):
            raise EmtileError(f"voxel_size={voxel_size} must be three positive sizes (z, y, x)")
        return vs, True
    for path in sources:
        vs = voxel_size_nm(path) if path is not None else None
        if vs is not None and len(vs) == 3:
            return tuple(vs), True
    return (1.0, 1.0, 1.0), False


def _check_ids(arr, name, display):
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise EmtileError(f"{name} {display} has dtype {arr.dtype}: expected a label image "
                          f"(integer ids, 0 = none)")


def _affinity_planes(arr, path, at, channel, offsets=None):
    """``({plane: float64 map in [0, 1]}, label)`` of a ``(C, Z, Y, X)`` or ``(Z, Y, X)`` pred;
    ``offsets`` given, or those its store records."""
    from emtile.evaluation import store_kind

    meta = store_kind(path)[1] if path is not None else {}
    scale = 255.0 if np.dtype(arr.dtype) == np.uint8 else 1.0
    if np.dtype(arr.dtype).kind not in "uf":
        raise EmtileError(f"pred has dtype {arr.dtype}: expected probabilities or affinities "
                          f"(float in [0, 1] or uint8 0-255)")
    if arr.ndim == 3:
        if channel is not None:
            raise EmtileError(f"channel={channel} does not apply: pred is a (Z, Y, X) map")
        return {p: v / scale for p, v in _read(arr, at).items()}, "probability"
    if offsets is not None and len(offsets) != arr.shape[0]:
        raise EmtileError(f"offsets= gives {len(offsets)} offsets but pred has "
                          f"{arr.shape[0]} channels")
    if offsets is None and meta.get("target") == "affinities":
        offsets = meta.get("offsets")
        if offsets is not None and len(offsets) != arr.shape[0]:
            offsets = None  # a record that does not match the channels is not used
    chs, label = affinity_channels(offsets, arr.shape[0], channel)
    maps = [_read(arr, at, (c,)) for c in chs]
    return {p: np.mean([m[p] for m in maps], axis=0) / scale for p in PLANES}, label


def read_planes(raw, *, seg=None, labels=None, pred=None, at=None, channel=None,
                voxel_size=None, offsets=None):
    """Read the three orthogonal planes through ``at`` of ``raw`` and what is on its grid.

    Parameters
    ----------
    raw : str, Path or array-like, shape (Z, Y, X)
        The EM volume.
    seg, labels : str, Path or array-like, shape (Z, Y, X), optional
        Label images (integer ids, 0 = none): a segmentation and a ground truth.
    pred : str, Path or array-like, shape (C, Z, Y, X) or (Z, Y, X), optional
        An affinity prediction (drawn: :func:`affinity_channels`) or a probability map.
    at : str or tuple of int, optional
        ``(z, y, x)`` (or ``"Z,Y,X"``) where the planes cross; default the centre voxel.
    channel : int, optional
        The channel of ``pred`` to draw instead of the nearest-neighbour mean.
    voxel_size : tuple of float, optional
        ``(z, y, x)`` in nm; default what the stores record (seg, labels, pred, raw, in that
        order), else isotropic.
    offsets : list of (dz, dy, dx), optional
        The affinity offsets of ``pred``'s channels; default what its store records (an array
        records none: give them, or ``channel``).

    Returns
    -------
    PlaneViews
    """
    rarr, rpath = _open(raw, "raw")
    if rarr.ndim != 3:
        raise EmtileError(f"raw has shape {tuple(rarr.shape)}: the planes view needs a (Z, Y, X) "
                          f"volume")
    shape = tuple(int(s) for s in rarr.shape)
    opened = {}
    for name, source in (("seg", seg), ("labels", labels), ("pred", pred)):
        if source is None:
            continue
        arr, path = _open(source, name)
        spatial = tuple(int(s) for s in arr.shape[-3:])
        display = repr(path) if path else "(an array)"
        if spatial != shape or arr.ndim not in ((3, 4) if name == "pred" else (3,)):
            raise EmtileError(f"{name} {display} has shape {tuple(arr.shape)} but raw has shape "
                              f"{shape}; the planes view needs them on one (Z, Y, X) grid")
        if name != "pred":
            _check_ids(arr, name, display)
        opened[name] = (arr, path)
    where = parse_at(at, shape)
    if channel is not None and "pred" not in opened:
        raise EmtileError(f"channel={channel} needs pred= (an affinity prediction)")
    paths = [opened[n][1] for n in ("seg", "labels", "pred") if n in opened] + [rpath]
    vs, known = _voxel_size(paths, voxel_size)
    views = PlaneViews(at=where, shape=shape, voxel_size=vs, voxel_known=known,
                       raw=_read(rarr, where))
    if "seg" in opened:
        views.seg = _read(opened["seg"][0], where)
    if "labels" in opened:
        views.truth = _read(opened["labels"][0], where)
    if "pred" in opened:
        views.affinity, views.affinity_label = _affinity_planes(*opened["pred"], where, channel,
                                                                offsets)
    views.names = {n: p for n, (_, p) in opened.items()}
    return views


def colour_planes(planes, *, alpha):
    """RGBA of each plane's ids, coloured together (one colour per id in all three): the planes
    stacked on one zero-padded canvas for :func:`emtile.colours.segmentation_rgba` (0 is
    transparent and touches nothing, so the padding changes no colour)."""
    from emtile.colours import segmentation_rgba

    h = max(p.shape[0] for p in planes.values())
    w = max(p.shape[1] for p in planes.values())
    canvas = np.zeros((len(planes), h, w), np.result_type(*planes.values(), np.uint8))
    for k, p in enumerate(planes.values()):
        canvas[k, :p.shape[0], :p.shape[1]] = p
    rgba = segmentation_rgba(canvas, alpha=alpha)
    return {name: rgba[k, :p.shape[0], :p.shape[1]] for k, (name, p) in enumerate(planes.items())}


_TITLES = {"xy": "XY at z={}", "xz": "XZ at y={}", "yz": "YZ at x={}"}


def _layers(views):
    """The rows to draw: ``[(kind, {plane: overlay or map})]``."""
    from emtile.colours import SEG_ALPHA

    rows = []
    if views.seg is not None:
        rows.append(("segmentation", colour_planes(views.seg, alpha=SEG_ALPHA)))
    if views.truth is not None:
        rows.append(("truth", colour_planes(views.truth, alpha=SEG_ALPHA)))
    if views.affinity is not None:
        rows.append(("affinities", views.affinity))
    return rows or [("raw", None)]


def _row_title(kind, views, plane):
    if kind in ("segmentation", "truth"):
        ids = views.seg if kind == "segmentation" else views.truth
        n = int(np.count_nonzero(np.unique(ids[plane])))
        return f"{kind}: {n} object{'s' if n != 1 else ''}"
    if kind == "affinities":
        label = views.affinity_label
        return ("affinities: mean of the nearest neighbours" if label.startswith("mean")
                else f"affinities: {label}")
    return "raw"


def _cursor(ax, plane, at):
    """Dashed lines where the other two planes cut this one."""
    rows, cols = PLANES[plane][1]
    ax.axhline(at[rows], color="w", lw=0.6, ls="--", alpha=0.7, gid="cursor")
    ax.axvline(at[cols], color="w", lw=0.6, ls="--", alpha=0.7, gid="cursor")


def _wrap(text, width=48):
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def planes_figure(views, *, title=None):
    """The figure of a :class:`PlaneViews` (see the module docstring).

    Returns
    -------
    matplotlib.figure.Figure
        One axes per panel, row by row (``segmentation``, ``truth``, ``affinities``, or ``raw``),
        column by column (``xy``, ``xz``, ``yz``), plus a colour bar for affinities. Each panel
        axes has ``emtile_panel`` (the row's kind) and ``emtile_plane``; its first image is the
        raw plane (an affinity row's only image is the map), an overlay row's second image the
        RGBA of its ids.
    """
    from matplotlib.figure import Figure

    rows = _layers(views)
    aspects = plane_aspects(views.voxel_size)
    vs = views.voxel_size
    z, y, x = (n * v for n, v in zip(views.shape, vs))  # physical extents
    widths = {"xy": x, "xz": x, "yz": y}
    heights = {"xy": y, "xz": z, "yz": z}
    scale = 3.2 / max(widths.values())
    fig = Figure(figsize=(scale * sum(widths.values()) + 1.0,
                          len(rows) * (scale * max(heights.values()) + 0.6) + 0.6),
                 layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False,
                        gridspec_kw={"width_ratios": [widths[p] for p in PLANES]})
    mapped = None
    for r, (kind, layer) in enumerate(rows):
        for c, plane in enumerate(PLANES):
            ax = axes[r, c]
            ax.emtile_panel, ax.emtile_plane = kind, plane
            ax.set_xticks([])
            ax.set_yticks([])
            raw = views.raw[plane].astype(np.float64)
            if kind == "affinities":
                mapped = ax.imshow(layer[plane], cmap="magma", vmin=0.0, vmax=1.0,
                                   aspect=aspects[plane], interpolation="nearest")
            else:
                lo, hi = np.percentile(raw, (0.5, 99.5)) if raw.size else (0.0, 1.0)
                ax.imshow(raw, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
                          aspect=aspects[plane], interpolation="nearest")
                if layer is not None:
                    ax.imshow(layer[plane], aspect=aspects[plane], interpolation="nearest")
            _cursor(ax, plane, views.at)
            where = _TITLES[plane].format(views.at[PLANES[plane][0]])
            ax.set_title(f"{where}\n{_row_title(kind, views, plane)}", fontsize=8)
    if mapped is not None:
        fig.colorbar(mapped, ax=axes[[k for k, _ in rows].index("affinities"), :].tolist(),
                     shrink=0.8, label=_wrap(f"{views.affinity_label} (1 = same object)"))
    size = "x".join(f"{v:g}" for v in vs)
    note = f"voxel {size} nm" if views.voxel_known else "voxel size not recorded: drawn isotropic"
    fig.suptitle(f"{title + ' - ' if title else ''}planes through (z, y, x) = {views.at}, "
                 f"{note}", fontsize=9)
    return fig
