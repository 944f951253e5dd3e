"""The segmentation settings that suit the model: a small grid tried on the validation slices.

``emtile segment``'s threshold and merge threshold are model dependent (the defaults were chosen
on three ISBI models, and the best pair moved between them: :mod:`emtile.segmenter` says how
much). A run that kept validation slices can measure this for its own ``best/`` at little
cost: the slices are predicted (as the validation does, :func:`emtile.training.validation.
predict_slices` through the predictor's tiled path), written to a temporary probability store
(uint8, as ``emtile predict`` writes by default), segmented by :func:`emtile.segment` itself at
each point of :data:`GRID` and once with no overrides (the defaults), and each segmentation is
scored by its mean V-Rand over the slices, with the conventions of
``examples/bench_segment.py`` (truth cells are the 4-connected components of the truth interior,
:func:`emtile.metrics.segmentation_stats`). The best pair goes into ``best/``'s metadata under
``segment``, where ``emtile info`` shows it and ``emtile segment --settings model``
(:mod:`emtile.tuned_settings`) finds it. Ties go to the pair closest to the defaults, so a flat
grid changes nothing.

Only 2-D probability models with validation slices are tuned; 3-D affinity models (their
validation already segments, :mod:`emtile.training.validation3d`) and runs without validation
record nothing. The grid is small on purpose: 30 segmentations (the defaults' pair, 0.88 and
0.2, is in it and reuses the defaults' run) of 5 slices of 512 x 512 took about 20 s on 2 loaded
cores, and a finer grid would fit the validation slices' noise (one merge of two
large cells moves V-Rand by 0.003-0.04). A failure here must never cost the trained model:
:func:`tune_best` warns in one line and records nothing.
"""

import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

__all__ = ["GRID", "THRESHOLDS", "MERGE_THRESHOLDS", "tune_segmentation", "tune_best",
           "region_text", "tuned_text"]

#: The interior thresholds tried (``emtile segment --threshold``).
THRESHOLDS = (0.75, 0.8, 0.85, 0.88, 0.9, 0.95)
#: The merge thresholds tried (``--merge-threshold``; component seeds, median linkage).
MERGE_THRESHOLDS = (0.15, 0.2, 0.25, 0.3, 0.35)
#: Every ``(threshold, merge_threshold)`` pair tried, besides the defaults.
GRID = tuple((t, m) for t in THRESHOLDS for m in MERGE_THRESHOLDS)


def region_text(zs):
    """``validation slices 25:30`` (runs of the sorted slice indices ``zs``, comma-separated).

    Examples
    --------
    >>> region_text([25, 26, 27, 28, 29]), region_text([9, 4, 5])
    ('validation slices 25:30', 'validation slices 4:6,9')
    """
    from emtile.stacks import slice_runs

    runs = ",".join(str(a) if b == a + 1 else f"{a}:{b}" for a, b in slice_runs(sorted(zs)))
    return f"validation slices {runs}"


def _mean_v_rand(seg, truth):
    """Mean V-Rand over the slices of the label stack ``seg`` against the binary ``truth``."""
    from emtile.metrics import segmentation_stats, truth_segments

    return float(np.mean([segmentation_stats(truth_segments(t), s)["v_rand"]
                          for s, t in zip(seg, truth)]))


def _write_probabilities(path, prob):
    """A complete probability store of ``prob`` (Z, Y, X) in [0, 1], stored as uint8."""
    from emtile.store import create_image, mark_complete

    p = np.round(np.clip(prob, 0.0, 1.0) * 255).astype(np.uint8)
    group = create_image(path, p.shape, p.dtype, kind="probabilities")
    group["0"][...] = p
    mark_complete(group)


def _pick(rows, default):
    """The best row of ``rows`` ``[threshold, merge_threshold, v_rand]``: highest V-Rand, ties
    (within 1e-12) to the pair closest to ``default`` ``(threshold, merge_threshold)``."""
    top = max(r[2] for r in rows)
    tied = [r for r in rows if r[2] >= top - 1e-12]
    return min(tied, key=lambda r: (math.hypot(r[0] - default[0], r[1] - default[1]), r[0], r[1]))


def tune_segmentation(prob, truth, *, zs, grid=GRID, progress=False):
    """Segment the probabilities ``prob`` at each pair of ``grid`` and with the defaults; score.

    Parameters
    ----------
    prob : ndarray, shape (Z, Y, X)
        Probabilities of cell interior of the validation slices, in [0, 1].
    truth : ndarray, shape (Z, Y, X)
        Their binary labels (1 = cell interior).
    zs : list of int
        The slices' indices in the training volume (for the record's ``region``).
    grid : sequence of (threshold, merge_threshold)
    progress : bool
        A tqdm bar over the segmentations.

    Returns
    -------
    dict
        The record :func:`tune_best` stores: ``region``, ``settings`` (``threshold``,
        ``merge_threshold`` of the best pair), ``v_rand`` (its mean V-Rand), ``default_v_rand``,
        ``grid`` (``[threshold, merge_threshold, v_rand]`` per pair) and ``emtile`` (version).
    """
    import zarr
    from tqdm.auto import tqdm

    import emtile
    from emtile.settings import SegmentSettings

    prob, truth = np.asarray(prob), np.asarray(truth)
    if prob.shape != truth.shape or prob.ndim != 3:
        raise ValueError(f"prob {prob.shape} and truth {truth.shape} must be one (Z, Y, X) shape")
    d = SegmentSettings()
    default = (d.threshold, d.merge_threshold)
    with tempfile.TemporaryDirectory(prefix="emtile-tune-") as tmp:
        pred, seg = Path(tmp) / "prob.zarr", Path(tmp) / "seg.zarr"
        _write_probabilities(pred, prob)

        def score(**overrides):
            emtile.segment(pred, seg, overwrite=True, progress=False, **overrides)
            return _mean_v_rand(np.asarray(zarr.open_array(str(seg / "0"), mode="r")[...]), truth)

        runs = [None, *grid]  # None: no overrides at all
        scores = {}
        for pair in tqdm(runs, desc="tune segment", unit="run", disable=not progress,
                         dynamic_ncols=True):
            if pair is None:
                scores[default] = score()
            elif tuple(pair) not in scores:  # a pair equal to the defaults is that run
                scores[tuple(pair)] = score(threshold=pair[0], merge_threshold=pair[1])
    default_v_rand = scores[default]
    rows = [[float(t), float(m), scores[(t, m)]] for t, m in grid]
    best = _pick(rows + [[*default, default_v_rand]], default)
    return {"region": region_text(zs),
            "settings": {"threshold": best[0], "merge_threshold": best[1]},
            "v_rand": best[2], "default_v_rand": default_v_rand, "grid": rows,
            "emtile": emtile.__version__}


def tune_best(best, validator, *, device=None, progress=False):
    """Tune the segmentation of the model folder ``best`` on the validator's slices; record it.

    ``validator`` is the run's :class:`~emtile.training.validation.Validator` (its slices,
    truth, tile and normalisation). The record (:func:`tune_segmentation`) goes into ``best``'s
    ``metadata.json`` under ``emtile.segment``; a folder that has one already (a resumed run
    that kept its best model) is left as it is. Returns the record, or None when tuning failed:
    then one warning line says why, and ``best`` is left untouched.
    """
    from emtile._errors import one_line
    from emtile.unet import load_folder, load_metadata

    best = Path(best)
    try:
        meta = load_metadata(best)
        info = meta.setdefault("emtile", {})
        if "segment" in info:
            return info["segment"]
        model = load_folder(best, device=device or validator.device)
        prob = validator.predict(model)
        record = tune_segmentation(prob, validator.truth, zs=list(validator.zs), progress=progress)
        info["segment"] = record
        _write_metadata(best, meta)
        return record
    except Exception as exc:  # the trained model matters more than the tuning
        warnings.warn(f"segmentation settings not tuned ({one_line(exc)}); {best} keeps the "
                      f"model, with no tuned settings", UserWarning, stacklevel=2)
        return None


def tuned_text(record):
    """One line for a tuning record: ``threshold 0.9, merge threshold 0.2 (tuned on validation
    slices 25:30: V-Rand 0.9712, 0.9690 with the defaults)``."""
    st = record["settings"]
    return (f"threshold {st['threshold']:g}, merge threshold {st['merge_threshold']:g} (tuned on "
            f"{record['region']}: V-Rand {record['v_rand']:.4f}, {record['default_v_rand']:.4f} "
            f"with the defaults)")


def _write_metadata(folder, meta):
    """``metadata.json`` of ``folder`` replaced atomically (the weights stay as they are)."""
    path = folder / "metadata.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
