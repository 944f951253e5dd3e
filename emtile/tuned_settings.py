"""Where ``emtile segment`` starts from: its own defaults, or the settings tuned for the model.

A training run with validation slices records in ``best/`` the threshold and merge threshold
that segmented those slices best (:mod:`emtile.training.segment_tuning`). A prediction store
records the model that made it (``provenance.model``, :mod:`emtile.predictor`), so ``emtile
segment --settings model`` can follow that path back and start from the model's own settings
instead of defaults chosen on other models. :func:`resolve` does only that lookup: it returns
the overrides and one line saying which settings apply, and leaves segmenting to
:func:`emtile.segment`. Options the user gives explicitly win over the recorded ones.

The lookup fails loudly, in one line that says what to do, rather than falling back to the
defaults in silence: a user who asked for the model's settings and got the defaults would read
the wrong scores into the result.

This module imports nothing heavy.
"""

from emtile._errors import EmtileError, one_of

__all__ = ["resolve", "CHOICES", "TUNED"]

#: What ``--settings`` takes: the segmenter's defaults, or the model's tuned settings.
CHOICES = ("default", "model")
#: The settings a tuning record holds (the fields of :class:`emtile.settings.SegmentSettings`).
TUNED = ("threshold", "merge_threshold")


def resolve(prediction_path, choice, explicit=()):
    """``(overrides, note)``: the settings ``emtile segment`` starts from, and one line naming them.

    Parameters
    ----------
    prediction_path : str or Path
        The probability store to segment (written by ``emtile predict``).
    choice : {"default", "model"}
        ``"default"``: the segmenter's defaults (no overrides). ``"model"``: the threshold and
        merge threshold that the model which made the prediction records (``segment`` in its
        metadata).
    explicit : iterable of str
        Names of the settings the user gave explicitly; they are left out of ``overrides``.

    Returns
    -------
    overrides : dict
        Keyword arguments for :func:`emtile.segment` (a subset of :data:`TUNED`).
    note : str
        ``settings: the defaults``, or ``settings: model runs/x/best (tuned on validation slices
        25:30, V-Rand 0.9712 vs 0.9690 with the defaults): threshold 0.9, merge threshold 0.2``
        (a setting given explicitly is named ``as given`` instead).

    Raises
    ------
    EmtileError
        In one line, for a ``choice`` not in :data:`CHOICES`, a prediction that records no
        model, a model folder that is gone, or a model that records no tuned settings.
    """
    one_of("choice", choice, CHOICES)
    if choice == "default":
        return {}, "settings: the defaults"
    model = _model_path(prediction_path)
    record = _record(model)
    explicit = set(explicit)
    overrides = {k: record["settings"][k] for k in TUNED if k not in explicit}
    shown = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in overrides.items())
    given = " and ".join(k.replace("_", " ") for k in TUNED if k in explicit)
    shown = "; ".join(p for p in (shown, given and f"{given} as given") if p)
    note = (f"settings: model {model} (tuned on {record['region']}, V-Rand "
            f"{record['v_rand']:.4f} vs {record['default_v_rand']:.4f} with the defaults): {shown}")
    return overrides, note


def _model_path(prediction_path):
    """The model folder that ``provenance.model`` of the prediction's attributes names."""
    from pathlib import Path

    from emtile.locations import remote
    from emtile.store import emtile_attrs

    if remote(prediction_path) is None and not Path(str(prediction_path)).exists():
        raise EmtileError(f"the prediction {str(prediction_path)!r} does not exist")
    meta = emtile_attrs(prediction_path) or {}
    model = (meta.get("provenance") or {}).get("model")
    if not model or str(model).startswith("("):  # "(a model in memory)"
        why = ("was made from a model in memory" if model else
               "is not an emtile prediction store" if not meta else "records no model")
        raise EmtileError(f"{str(prediction_path)!r} {why}, so it has no model settings to start "
                          f"from: use the defaults (--settings default) or give --threshold and "
                          f"--merge-threshold")
    return str(model)


def _record(model):
    """The tuning record of the model folder (or run folder, or package) ``model``."""
    from pathlib import Path

    from emtile.model import read_metadata

    if not Path(model).exists():
        raise EmtileError(f"the model {model!r} that made this prediction is gone (moved or "
                          f"deleted), so its tuned settings cannot be read: use --settings "
                          f"default, or run from the folder the prediction was made in")
    meta = read_metadata(model)
    record = (meta.get("emtile") or {}).get("segment") if isinstance(meta, dict) else None
    settings = record.get("settings") if isinstance(record, dict) else None
    if not isinstance(settings, dict) or not all(k in settings for k in TUNED):
        raise EmtileError(f"the model {model!r} records no tuned segmentation settings (trained "
                          f"without validation slices, with --no-tune-segment, or by an older "
                          f"emtile): retrain it with --val-slices, or use --settings default")
    return record
