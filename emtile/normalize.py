"""Input normalisation: how raw pixels become the numbers a model sees, recorded with the model.

A model is trained on normalised pixels, so the normalisation is part of the model: ``emtile
train --normalize RULE`` computes it on the training volume, records the rule and the training
data's statistics in the model folder (``metadata.json``, ``emtile.normalization``), and
``emtile predict`` applies the same rule to the volume it predicts, computing its statistics on
that volume. Three rules:

``dtype``
    Integers divided by their dtype's maximum (uint8 / 255, uint16 / 65535), booleans 0/1, floats
    unchanged. What emtile did before rules were recorded; a model folder that records nothing
    uses it. It depends on how the pixels are stored: a float TIFF in 0-255 reaches the model
    255 times brighter than the same image in uint8, and 12-bit data in uint16 uses 6% of the
    range.
``minmax``
    ``(x - min) / (max - min)``, with the minimum and maximum of the whole volume (one streamed
    pass, slab by slab).
``percentile`` (``percentile:LOW,HIGH``; default 1 and 99.8)
    ``(x - p_low) / (p_high - p_low)``, the percentiles of a sample of the volume: the whole
    volume when it has at most :data:`SAMPLE_PIXELS` pixels, else up to :data:`SAMPLE_SLICES`
    slices spread evenly through it, each read strided (small slices) or as four windows
    (large ones), about :data:`SAMPLE_PIXELS` pixels in all. Robust to a few saturated or dead
    pixels.

``minmax`` and ``percentile`` give a model the same numbers whatever the storage type: the same
image as uint8, as float 0-255, as uint16 over the full range or as 12-bit data in uint16 is
mapped to the same values (up to the rounding of 12-bit values). The statistics are those of
the whole volume, also when only a region is predicted, so a region's probabilities equal the
same region of a whole-volume prediction. Values are not clipped.

Every rule also measures where the normalised pixels lie (their 1st and 99th percentiles on the
sample): the model records the training data's, and prediction warns in one line when the
input's are far from them (:func:`range_warning`), e.g. float 0-255 pixels given to a ``dtype``
model.
"""

import math
from typing import NamedTuple

import numpy as np

from emtile._errors import EmtileError

__all__ = ["NORMALIZATIONS", "Rule", "Scaling", "InputWarning", "parse", "statistics", "apply",
           "dtype_scaled", "record", "rule_of", "model_record", "for_prediction", "range_warning",
           "voxel_warning", "describe", "SAMPLE_PIXELS", "SAMPLE_SLICES", "apply_inplace",
           "apply_torch"]

NORMALIZATIONS = ("dtype", "minmax", "percentile")
DEFAULT_PERCENTILES = (1.0, 99.8)
SAMPLE_PIXELS = 2**22  # pixels in the percentile sample (at most)
SAMPLE_SLICES = 64  # slices the sample is spread over (at most)
#: A normalised 1st or 99th percentile further than this fraction of the training data's spread
#: from the training data's is "far" (see :func:`range_warning`).
FAR = 0.25
#: A pixel size more than this factor from the training data's is "far" (:func:`voxel_warning`).
FAR_VOXEL = 1.5


class InputWarning(UserWarning):
    """An input far from the model's training data (intensities or voxel size): one line."""


class Rule(NamedTuple):
    """A normalisation rule: ``method`` and, for ``percentile``, the ``low`` and ``high``
    percentiles."""

    method: str
    low: float = None
    high: float = None

    def __str__(self):
        if self.method == "percentile":
            return f"percentile:{self.low:g},{self.high:g}"
        return self.method

    def to_json(self):
        out = {"method": self.method}
        if self.method == "percentile":
            out.update(low=self.low, high=self.high)
        return out


class Scaling(NamedTuple):
    """A rule resolved on one volume: ``x -> (x - lo) / (hi - lo)`` in float32 (``lo``, ``hi``
    None for ``dtype``). A plain tuple: picklable, hashable, JSON as a list."""

    method: str
    lo: float = None
    hi: float = None


def parse(rule):
    """A :class:`Rule` from ``"dtype"``, ``"minmax"``, ``"percentile"``, ``"percentile:1,99.8"``,
    a dict (``{"method": ..., "low": ..., "high": ...}``, as recorded) or a :class:`Rule`.

    Examples
    --------
    >>> parse("percentile:0.5,99.5")
    Rule(method='percentile', low=0.5, high=99.5)
    >>> str(parse("percentile"))
    'percentile:1,99.8'
    """
    if isinstance(rule, Rule):
        return rule
    if rule is None:
        return Rule("dtype")
    if isinstance(rule, dict):
        method, low, high = rule.get("method"), rule.get("low"), rule.get("high")
    elif isinstance(rule, str):
        method, _, params = rule.strip().partition(":")
        low = high = None
        if params:
            try:
                low, high = (float(v) for v in params.split(","))
            except ValueError:
                raise EmtileError(f"normalize={rule!r} is not valid: give the percentiles as "
                                  f"percentile:LOW,HIGH, e.g. percentile:1,99.8") from None
            if method != "percentile":
                raise EmtileError(f"normalize={rule!r} is not valid: only percentile takes "
                                  f"values (percentile:1,99.8)")
    else:
        raise EmtileError(f"normalize={rule!r} is not valid: choose one of "
                          f"{', '.join(NORMALIZATIONS)} (or percentile:LOW,HIGH)")
    if method not in NORMALIZATIONS:
        raise EmtileError(f"normalize={rule!r} is not valid: choose one of "
                          f"{', '.join(NORMALIZATIONS)} (or percentile:LOW,HIGH)")
    if method != "percentile":
        return Rule(method)
    low, high = DEFAULT_PERCENTILES if low is None and high is None else (low, high)
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise EmtileError(f"normalize={rule!r} is not valid: the percentiles must be numbers, "
                          f"e.g. percentile:1,99.8") from None
    if not 0.0 <= low < high <= 100.0:
        raise EmtileError(f"normalize={str(Rule(method, low, high))!r} is not valid: the "
                          f"percentiles must satisfy 0 <= LOW < HIGH <= 100, e.g. percentile:1,99.8")
    return Rule("percentile", low, high)


# --------------------------------------------------------------------------- statistics


def dtype_scaled(a):
    """The ``dtype`` rule on pixels: integers scaled by their dtype's maximum (uint8 / 255),
    booleans to 0/1, floats unchanged, as float32 (``apply(a, Scaling("dtype"))``; a float32
    array is returned as it is). What a model that records no normalisation sees, and what an
    exported package's pre-processing reproduces."""
    a = np.asarray(a)
    if a.dtype == np.float32:
        return a
    if a.dtype.kind in "ui":
        return a.astype(np.float32) * np.float32(1.0 / np.iinfo(a.dtype).max)
    return a.astype(np.float32)


def apply(data, scaling):
    """Normalise pixels: ``data`` (any shape, any numeric dtype) -> float32, same shape.

    Parameters
    ----------
    data : ndarray
    scaling : Scaling, Rule or str
        A resolved :class:`Scaling`; a rule without statistics is only valid for ``dtype``.

    Examples
    --------
    >>> apply(np.array([0, 51, 255], np.uint8), Scaling("dtype")).tolist()
    [0.0, 0.20000001788139343, 1.0]
    >>> apply(np.array([10.0, 60.0]), Scaling("minmax", 10.0, 110.0)).tolist()
    [0.0, 0.5]
    """
    method, lo, hi = _scaling(scaling)
    if method == "dtype":
        return dtype_scaled(data)
    a = np.asarray(data)
    if a.dtype == np.bool_:
        a = a.view(np.uint8)
    span = hi - lo
    gain = np.float32(1.0 / span if span > 0 else 1.0)
    out = a.astype(np.float32)
    out -= np.float32(lo)
    out *= gain
    return out


def apply_inplace(out, dtype, scaling):
    """:func:`apply` on pixels of ``dtype`` already cast into the float32 array ``out``: the
    same arithmetic (float32, elementwise, so the same bytes) without a float32 copy of a
    whole window; returns ``out``."""
    method, lo, hi = _scaling(scaling)
    dtype = np.dtype(dtype)
    if method == "dtype":
        if dtype.kind in "ui":
            out *= np.float32(1.0 / np.iinfo(dtype).max)
        return out
    span = hi - lo
    out -= np.float32(lo)
    out *= np.float32(1.0 / span if span > 0 else 1.0)
    return out


def apply_torch(x, scaling):
    """:func:`apply` on a torch tensor (on any device): float32, the same arithmetic and
    bytes as :func:`apply` on the same pixels."""
    import torch

    method, lo, hi = _scaling(scaling)
    if method == "dtype":
        if x.dtype == torch.float32:
            return x
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            return x.to(torch.float32)
        return x.to(torch.float32) * float(np.float32(1.0 / torch.iinfo(x.dtype).max))
    span = hi - lo
    gain = np.float32(1.0 / span if span > 0 else 1.0)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    return (x.to(torch.float32) - float(np.float32(lo))) * float(gain)


def _scaling(scaling):
    if isinstance(scaling, Scaling):
        return scaling
    if isinstance(scaling, (tuple, list)) and len(scaling) == 3 and scaling[0] in NORMALIZATIONS:
        return Scaling(*scaling)
    rule = parse(scaling)
    if rule.method != "dtype":
        raise EmtileError(f"normalisation {str(rule)!r} needs statistics of the volume: compute "
                          f"them with emtile.normalize.statistics")
    return Scaling("dtype")


def _sample(array, max_pixels=SAMPLE_PIXELS, max_slices=SAMPLE_SLICES):
    """A deterministic sample of ``array``'s pixels (1-D): the whole array when it has at most
    ``max_pixels`` pixels; else up to ``max_slices`` evenly spread slices, each read whole and
    strided when it is small (at most 16 times its share of the sample), or as a 2x2 grid of
    windows spread over it when it is large (only those windows are read)."""
    shape = tuple(int(s) for s in array.shape)
    ny, nx = shape[-2:]
    lead = shape[:-2]
    n = math.prod(lead)
    count = min(n, max_slices) if math.prod(shape) > max_pixels else n
    planes = [np.unravel_index(int(i), lead) if lead else ()
              for i in np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))]
    per = max(1, max_pixels // len(planes))
    parts = []
    for p in planes:
        index = tuple(int(i) for i in p)
        if ny * nx <= 16 * per:
            step = max(1, math.ceil(math.sqrt(ny * nx / per)))
            parts.append(np.asarray(array[index])[::step, ::step].ravel())
            continue
        w = max(1, int(math.sqrt(per / 4)))
        for y0 in np.linspace(0, ny - w, 2).astype(int):
            for x0 in np.linspace(0, nx - w, 2).astype(int):
                window = index + (slice(int(y0), int(y0) + w), slice(int(x0), int(x0) + w))
                parts.append(np.asarray(array[window]).ravel())
    return np.concatenate(parts)


def _minmax(array):
    """The minimum and maximum of the whole volume, slab by slab."""
    from emtile.stacks import slab_depth

    shape = tuple(int(s) for s in array.shape)
    if len(shape) < 3:
        data = np.asarray(array[...])
        return float(data.min()), float(data.max())
    depth = slab_depth(shape, np.dtype(array.dtype).itemsize,
                       chunk_z=(getattr(array, "chunks", None) or (1,))[0])
    lo, hi = math.inf, -math.inf
    for z0 in range(0, shape[0], depth):
        slab = np.asarray(array[z0:z0 + depth])
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    return lo, hi


def statistics(array, rule="dtype", *, name="the volume"):
    """Resolve ``rule`` on a volume and measure where its normalised pixels lie.

    Parameters
    ----------
    array : array-like, shape (Z, Y, X) or (Y, X)
        Read lazily: a sample of slices (and, for ``minmax``, the whole volume slab by slab).
    rule : str, dict or Rule
        See :func:`parse`.
    name : str
        What messages call the volume (``"raw"``).

    Returns
    -------
    dict
        ``scaling`` (the :class:`Scaling` to :func:`apply`), ``rule`` (the :class:`Rule`),
        ``dtype`` (the volume's), ``lo`` / ``hi`` (the raw values mapped to 0 and 1; None for
        ``dtype``), ``p01`` / ``p99`` (the normalised sample's 1st and 99th percentiles).

    Examples
    --------
    >>> s = statistics(np.arange(101, dtype=np.float32).reshape(1, 1, 101), "minmax")
    >>> s["scaling"], round(s["p99"], 2)
    (Scaling(method='minmax', lo=0.0, hi=100.0), 0.99)
    """
    rule = parse(rule)
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biuf":
        raise EmtileError(f"{name} has dtype {dtype}, which is not numeric: expected integer "
                          f"or floating-point pixels")
    sample = _sample(array)
    if sample.size == 0:
        raise EmtileError(f"{name} is empty (shape {tuple(array.shape)})")
    if dtype.kind == "f" and not np.isfinite(sample).all():
        raise EmtileError(f"{name} holds NaN or infinite values: its intensities cannot be "
                          f"normalised (replace them first)")
    if rule.method == "dtype":
        scaling = Scaling("dtype")
    elif rule.method == "minmax":
        scaling = Scaling("minmax", *_minmax(array))
    else:
        lo, hi = np.percentile(sample.astype(np.float64), [rule.low, rule.high])
        scaling = Scaling("percentile", float(lo), float(hi))
    p01, p99 = np.percentile(apply(sample, scaling).astype(np.float64), [1.0, 99.0])
    return {"scaling": scaling, "rule": rule, "dtype": str(dtype), "lo": scaling.lo,
            "hi": scaling.hi, "p01": float(p01), "p99": float(p99)}


def record(stats):
    """What a model folder records (``metadata.json``, ``emtile.normalization``) for the
    :func:`statistics` of its training volume."""
    return dict(stats["rule"].to_json(),
                training={"dtype": stats["dtype"], "lo": stats["lo"], "hi": stats["hi"],
                          "p01": stats["p01"], "p99": stats["p99"]})


def rule_of(recorded):
    """The :class:`Rule` of a model's recorded normalisation (None or missing: ``dtype``)."""
    return parse(recorded if recorded else "dtype")


def model_record(model):
    """A model's record as far as prediction needs it: ``{"normalization": ..., "voxel_size":
    ...}`` (a dict; a tuple of floats in nm), each when recorded; {} when nothing is.

    Parameters
    ----------
    model : emtile.model.Model, dict or None
        A loaded model (:func:`emtile.model.load`: its ``normalization`` and ``voxel_size``);
        a model's metadata (``metadata.json``: its ``emtile`` section) or such a record itself;
        anything else (a network in memory, None) records nothing. This module reads no model
        files: load a path with :func:`emtile.model.load` (or its metadata with
        :func:`emtile.model.read_metadata`) first.
    """
    import os

    if isinstance(model, (str, os.PathLike)):
        raise EmtileError(f"model={str(model)!r} is a path: give the loaded model "
                          f"(emtile.model.load) or its metadata (emtile.model.read_metadata)")
    if isinstance(model, dict):
        info = model.get("emtile", model)
        info = info if isinstance(info, dict) else {}
    else:
        info = {k: getattr(model, k, None) for k in ("normalization", "voxel_size")}
    out = {k: info.get(k) for k in ("normalization", "voxel_size") if info.get(k) is not None}
    if "voxel_size" in out:
        try:
            out["voxel_size"] = tuple(float(v) for v in out["voxel_size"])
        except (TypeError, ValueError):
            raise EmtileError(f"the model's recorded voxel_size={out['voxel_size']!r} is not a "
                              f"list of numbers (nm)") from None
    return out


def for_prediction(model, array, *, path=None, rule=None, model_ndim=None, name="input"):
    """How to normalise ``array`` for ``model``, and what to warn about.

    Parameters
    ----------
    model : emtile.model.Model, dict or None
        What the model recorded (see :func:`model_record`): a loaded model, its metadata, or
        a network in memory / None (``dtype``, nothing to compare with).
    array : array-like
        The whole input volume (statistics are those of the volume, whatever region is
        predicted).
    path : str, optional
        The input's path, for its voxel size.
    rule : str, dict, Rule or Scaling, optional
        None: the model's recorded rule. A :class:`Scaling` is used as it is (no warnings).
    model_ndim : int, optional
        The model's spatial dimensions (voxel sizes are compared along these, the last axes);
        None: ``model.ndim`` when the model has one, else 2.

    Returns
    -------
    (Scaling, list of str)
        The scaling to :func:`apply` and the warning lines (:func:`range_warning`,
        :func:`voxel_warning`).
    """
    if isinstance(rule, Scaling):
        return rule, []
    rec = model_record(model)
    if model_ndim is None:
        model_ndim = getattr(model, "ndim", 2)
    recorded = rec.get("normalization")
    chosen = rule_of(recorded) if rule is None else parse(rule)
    stats = statistics(array, chosen, name=name)
    notes = []
    if chosen == rule_of(recorded):
        notes.append(range_warning(stats, recorded, name=name))
    if path is not None:
        from emtile.store import voxel_size_nm

        known = voxel_size_nm(path)
        trained = rec.get("voxel_size")
        if known and trained:
            notes.append(voxel_warning(known[-model_ndim:], trained[-model_ndim:], name=name))
    return stats["scaling"], [n for n in notes if n]


def describe(recorded):
    """One line for ``emtile info``: the rule and the training data's statistics."""
    rule = rule_of(recorded)
    text = str(rule)
    training = (recorded or {}).get("training") if isinstance(recorded, dict) else None
    if not recorded:
        return text + " (not recorded: a model from before emtile recorded it)"
    if training:
        if training.get("lo") is not None:
            text += (f"; training data {training['dtype']}, {training['lo']:.6g} -> 0 and "
                     f"{training['hi']:.6g} -> 1")
        else:
            text += f"; training data {training['dtype']}"
        text += f" (normalised 1st-99th percentile {training['p01']:.3g} to {training['p99']:.3g})"
    return text


# --------------------------------------------------------------------------- warnings


def range_warning(stats, recorded, *, name="input"):
    """One line when the input's normalised intensities are far from the training data's, else None.

    Far: the normalised 1st or 99th percentile of the input differs from the training data's by
    more than :data:`FAR` (25%) of the training data's spread. A model that records no training
    statistics (``dtype``, from before they were recorded) is compared with pixels in [0, 1].
    """
    training = (recorded or {}).get("training") if isinstance(recorded, dict) else None
    t01, t99 = ((training["p01"], training["p99"]) if training else (0.0, 1.0))
    spread = max(t99 - t01, 1e-6)
    i01, i99 = stats["p01"], stats["p99"]
    if abs(i01 - t01) <= FAR * spread and abs(i99 - t99) <= FAR * spread:
        return None
    rule = stats["rule"]
    hint = ("retrain with normalize='percentile', or store the input as the training data "
            "were stored" if rule.method == "dtype" else
            "check that this is the kind of image the model was trained on")
    what = (f"the model's training data {t01:.3g} to {t99:.3g}" if training else
            "the model expects about 0 to 1")
    return (f"{name} ({stats['dtype']}) is far from the model's training data in intensity: after "
            f"the model's {str(rule)!r} normalisation its 1st-99th percentiles are {i01:.3g} to "
            f"{i99:.3g}, {what}; {hint}")


def voxel_warning(input_voxel, recorded_voxel, *, name="input"):
    """One line when the input's voxel size (nm, the model's axes) differs from the training
    data's by more than :data:`FAR_VOXEL` along an axis, else None (also when either is
    unknown)."""
    if not input_voxel or not recorded_voxel:
        return None
    k = min(len(input_voxel), len(recorded_voxel))
    a, b = [float(v) for v in input_voxel[-k:]], [float(v) for v in recorded_voxel[-k:]]
    ratios = [x / y for x, y in zip(a, b) if x > 0 and y > 0]
    if all(1 / FAR_VOXEL <= r <= FAR_VOXEL for r in ratios):
        return None
    fmt = " x ".join
    return (f"{name}'s voxel size ({fmt(f'{v:g}' for v in a)} nm) is far from the model's "
            f"training data's ({fmt(f'{v:g}' for v in b)} nm): the model sees structures at "
            f"another scale; resample the input to the training voxel size")
