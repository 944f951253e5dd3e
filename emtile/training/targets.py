"""What a network learns from the labels: the target fields of the settings, checked, and the
views of id labels that training reads (light to import: NumPy only).

- :func:`check_target_fields`: ``ndim``, ``target``, ``offsets``, ``factors``, ``kernels``,
  ``affinity_loss`` and ``tile`` of a :class:`~emtile.training.settings.TrainSettings`, with
  the command line's text parsed (``"1,2,2;2,2,2"``, ``"Z,Y,X"``).
- :func:`default_tile_3d`: the 3-D training tile when none is given.
- :func:`is_id_volume`: whether labels hold object ids (a store converted with ``--ids``).
- :class:`IdBoundaries`: a lazy view of id labels as binary 2-D targets: interior (1) where a
  labelled voxel's in-plane 4-neighbours all carry its id, boundary (0) elsewhere. Unlabelled
  (0) voxels are boundary: the 2-D loss has weight maps, not a mask, so they stay in the loss
  as membrane.
"""

import math

import numpy as np

from emtile._errors import EmtileError, one_of

__all__ = ["check_target_fields", "default_tile_3d", "is_id_volume", "IdBoundaries",
           "parse_levels", "TARGETS", "TILE_2D", "ELASTIC_SIGMA"]

#: What a network learns: ``boundaries`` (one channel, 1 = cell interior; 2-D, or 3-D with z
#: context) or ``affinities`` (one channel per offset, 1 = same object; 3-D, from object ids).
TARGETS = ("boundaries", "affinities")
#: The 2-D training tile when ``tile`` is None (the paper's 572).
TILE_2D = 572
#: ``elastic_sigma`` when None, per ``ndim``.
ELASTIC_SIGMA = {2: 10.0, 3: 4.0}
_TILE_3D_SPAN = 32  # output voxels of the finest axis that the default 3-D tile spans


def parse_levels(value, name, example):
    """``"1,2,2;2,2,2"`` -> ``((1, 2, 2), (2, 2, 2))`` (an entry may be one int: ``"2;2"``);
    sequences pass through as tuples; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            entries = [tuple(int(v) for v in part.split(",")) for part in value.split(";")]
        except ValueError:
            raise EmtileError(f"{name}={value!r} is not a list of levels: give integers, levels "
                              f"separated by ';', e.g. {example!r}") from None
        return tuple(e[0] if len(e) == 1 else e for e in entries)
    try:
        return tuple(v if isinstance(v, int) else tuple(v) for v in value)
    except TypeError:
        raise EmtileError(f"{name}={value!r} is not a list of levels, e.g. {example!r}") from None


def _tile(value, ndim):
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = tuple(int(v) for v in value.split(","))
        except ValueError:
            raise EmtileError(f"tile={value!r} is not an integer or Z,Y,X integers") from None
        value = value[0] if len(value) == 1 else value
    sizes = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if (len(sizes) not in (1, ndim) or not all(isinstance(v, (int, np.integer))
                                               and not isinstance(v, bool) and v > 0 for v in sizes)):
        what = "a positive integer" if ndim == 2 else "a positive integer or 3 (Z, Y, X)"
        raise EmtileError(f"tile={value!r} must be {what}")
    return int(sizes[0]) if len(sizes) == 1 else tuple(int(v) for v in sizes)


#: Fields that only the 2-D boundary training reads: given for ndim=3 they would be ignored.
ONLY_2D = ("loss", "w0", "sigma", "class_balance", "foreground", "noise", "blur")


def _refuse_2d_only(s):
    """One line for a 2-D-only field set away from its default in a 3-D run."""
    import dataclasses

    for f in dataclasses.fields(s):
        if f.name in ONLY_2D and getattr(s, f.name) != f.default:
            raise EmtileError(f"{f.name}={getattr(s, f.name)!r} applies to 2-D boundary training "
                              f"only; a 3-D run takes affinity_loss= (balanced_bce or dice): "
                              f"leave {f.name} out")


def check_target_fields(s):
    """The target fields of settings ``s`` checked and parsed: a dict of the values to set."""
    from emtile.affinities import check_offsets
    from emtile.geometry import check_factors, check_kernels
    from emtile.losses import AFFINITY_LOSSES

    if s.ndim not in (2, 3) or isinstance(s.ndim, bool):
        raise EmtileError(f"ndim={s.ndim!r} must be 2 (slices) or 3 (volumes)")
    one_of("target", s.target, TARGETS)
    one_of("affinity_loss", s.affinity_loss, AFFINITY_LOSSES)
    if s.ndim == 2 and s.target == "affinities":
        raise EmtileError("target='affinities' needs ndim=3: 2-D affinity training is not "
                          "implemented")
    out = {"tile": _tile(s.tile, s.ndim)}
    if s.elastic_sigma is None:
        out["elastic_sigma"] = ELASTIC_SIGMA[s.ndim]
    if s.ndim == 2:
        for name in ("offsets", "factors", "kernels"):
            if getattr(s, name) is not None:
                raise EmtileError(f"{name}={getattr(s, name)!r} applies to ndim=3 (affinities) "
                                  "only; leave it out in 2-D")
        out["tile"] = TILE_2D if out["tile"] is None else out["tile"]
        return out
    _refuse_2d_only(s)
    if s.target == "boundaries" and s.offsets is not None:
        raise EmtileError(f"offsets={s.offsets!r} apply to target='affinities' only; a 3-D "
                          "boundary network has one output channel: leave them out")
    out["offsets"] = None if s.offsets is None else check_offsets(s.offsets, ndim=3)
    factors = parse_levels(s.factors, "factors", "1,2,2;2,2,2")
    if factors is not None:
        if s.depth is not None and s.depth != len(factors):
            raise EmtileError(f"depth={s.depth!r} differs from the {len(factors)} levels of "
                              f"factors={s.factors!r}; give one of them")
        factors = check_factors(factors, len(factors), 3)
        out["depth"] = len(factors)
    out["factors"] = factors
    kernels = parse_levels(s.kernels, "kernels", "1,3,3;3,3,3;3,3,3")
    if kernels is not None:
        if factors is None:
            raise EmtileError(f"kernels={s.kernels!r} needs factors too (one kernel per "
                              "resolution level: depth + 1)")
        kernels = check_kernels(kernels, factors, 3)
    out["kernels"] = kernels
    return out


def default_tile_3d(net, voxel_size):
    """The smallest valid input (Z, Y, X) whose output spans about 32 voxels of the finest axis
    along each axis (the same physical length; at least 4 voxels)."""
    size = voxel_size or (1.0, 1.0, 1.0)
    tile = []
    for axis, v in enumerate(size):
        want = max(4, math.floor(_TILE_3D_SPAN * min(size) / v + 0.5))
        sizes = net.valid_sizes(1, 4096, axis)
        tile.append(next((n for n in sizes if net.shape_map.output_along(n, axis) >= want),
                         sizes[-1]))
    return tuple(tile)


def is_id_volume(path, array):
    """Whether labels hold object ids: a store converted with ``ids=True``, or (a file or array
    that records nothing) an integer volume of 32 or 64 bits."""
    from emtile.evaluation import is_label_image

    return is_label_image(path, array.dtype)


class IdBoundaries:
    """Binary 2-D targets of id labels, read lazily: ``view[z, y0:y1, x0:x1]`` is 1 where the
    voxel is labelled and its in-plane 4-neighbours (inside the volume) carry its id."""

    def __init__(self, ids):
        self.ids = ids
        self.shape, self.ndim, self.dtype = tuple(ids.shape), 3, np.dtype(np.uint8)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        z = key[0]
        boxes = [k.indices(n)[:2] for k, n in zip(key[1:], self.shape[1:])]
        lo = [max(a - 1, 0) for a, _ in boxes]
        hi = [min(b + 1, n) for (_, b), n in zip(boxes, self.shape[1:])]
        ids = np.asarray(self.ids[z, lo[0]:hi[0], lo[1]:hi[1]])
        inner = _interior(ids if ids.ndim == 3 else ids[None])
        inner = inner if ids.ndim == 3 else inner[0]
        crop = tuple(slice(a - l, b - l) for (a, b), l in zip(boxes, lo))
        return inner[(Ellipsis,) + crop]


def _interior(ids):
    """(Z, Y, X) ids -> uint8: labelled and equal to every in-plane 4-neighbour inside."""
    out = ids != 0
    for axis in (1, 2):
        same = ids[(slice(None),) * axis + (slice(1, None),)] == ids[
            (slice(None),) * axis + (slice(None, -1),)]
        out[(slice(None),) * axis + (slice(1, None),)] &= same
        out[(slice(None),) * axis + (slice(None, -1),)] &= same
    return out.view(np.uint8)
