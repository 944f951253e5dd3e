"""The run folder and its state files, and the callback that saves ``best/`` and ``last/``.

The output folder of a run::

    out/run.json         the settings of the run (marks the folder as an emtile training run)
    out/train.csv        iteration, loss, lr, val_loss, val_pixel_error, val_f1, val_vrand,
                         val_vrand_threshold, val_vrand_05, elapsed_s (V-Rand at its best threshold,
                         which the next column names, then at 0.5; pixel error and F1 at 0.5)
    out/best/            model folder (emtile.load_model / emtile predict --model out/best)
    out/last/            model folder + training_state.pt (optimizer, RNG, iteration) for --resume
    out/tensorboard/     if TensorBoard is installed

A folder is replaced by writing ``NAME.tmp`` and renaming (:func:`replace_folder`), so a complete
``best/`` or ``last/`` exists at every moment. emtile deletes only the files it writes.
"""

import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from emtile._errors import EmtileError
from emtile.training.loop import Callback
from emtile.training.settings import jsonable

__all__ = ["RunFolder", "Checkpoint", "replace_folder", "RUN_FILE", "STATE_FILE"]

RUN_FILE = "run.json"
STATE_FILE = "training_state.pt"
_WRITTEN = ("best", "last", "last.tmp", "last.old", "best.tmp", "best.old", "tensorboard")


def replace_folder(tmp, final):
    """Move the folder ``tmp`` to ``final``, keeping a complete copy at every moment."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


class RunFolder:
    """The output folder of a training run (see the module docstring)."""

    def __init__(self, path):
        self.path = Path(path)

    def check(self, *, resume, overwrite):
        """Check the folder without touching it; return the ``last`` folder to resume, or None."""
        out = self.path
        if resume and overwrite:
            raise EmtileError("resume=True and overwrite=True contradict each other: choose one")
        if out.exists() and not out.is_dir():
            raise EmtileError(f"out={str(out)!r} exists and is not a folder")
        if resume:
            last = self.last()
            if last is None:
                raise EmtileError(f"nothing to resume in out={str(out)!r}: it has no last/ "
                                  "checkpoint (run without --resume to start a new run)")
            return last
        if out.exists() and any(out.iterdir()):
            if not (out / RUN_FILE).exists():
                raise EmtileError(
                    f"out={str(out)!r} is not empty and holds no emtile training run; choose an "
                    "empty or new folder (emtile will not delete files it did not write)")
            if not overwrite:
                raise EmtileError(
                    f"out={str(out)!r} holds another training run; pass --resume to continue it "
                    "or --overwrite to replace it")
        return None

    def clear(self):
        """Create the folder, removing the files of an earlier run (only those emtile writes)."""
        for name in _WRITTEN:
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in (RUN_FILE, "train.csv"):
            (self.path / name).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def last(self):
        """The folder to resume from: ``last/`` (or ``last.old/`` after a crash between the two
        renames of a save), or None."""
        for name in ("last", "last.old"):
            if (self.path / name / STATE_FILE).exists():
                return self.path / name
        return None

    def write_run(self, info):
        (self.path / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")

    def save(self, name, model, metadata, *, state=None):
        """Write the model folder ``name`` (with ``training_state.pt`` when ``state`` is given)."""
        from emtile.unet import save_model

        tmp = self.path / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp, metadata=metadata)
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
        replace_folder(tmp, self.path / name)

    def copy_last_to_best(self):
        shutil.rmtree(self.path / "best", ignore_errors=True)
        shutil.copytree(self.path / "last", self.path / "best",
                        ignore=shutil.ignore_patterns(STATE_FILE))


def training_state(state, best_score, best_scores, elapsed):
    """What ``last/training_state.pt`` holds: optimizer, scaler, RNG and counters, as tensors and
    plain containers loadable with ``torch.load(weights_only=True)`` (no pickled code)."""
    return {
        "iteration": int(state["iteration"]),
        "optimizer": state["optimizer"].state_dict(),
        "scaler": state["scaler"].state_dict() if state.get("scaler") is not None else {},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "best_score": None if best_score is None else float(best_score),
        "best_scores": json.dumps({k: jsonable(v) for k, v in (best_scores or {}).items()}),
        "elapsed_s": float(elapsed),
    }


def load_training_state(folder, model, optimizer):
    """Restore ``model``'s weights, ``optimizer`` and the torch RNG from the folder ``folder``;
    return the state dict (``iteration``, ``best_score``, ``best_scores``, ``elapsed_s``,
    ``scaler``)."""
    from emtile.unet import load_model

    model.load_state_dict(load_model(folder).state_dict())
    try:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it is refused by weights_only=True
        raise EmtileError(f"{str(Path(folder) / STATE_FILE)!r} is not a plain tensor file and "
                          f"was not loaded (weights_only=True refused it: "
                          f"{type(exc).__name__})") from None
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    state["best_scores"] = json.loads(state.get("best_scores") or "{}")
    return state


def versions():
    """The versions that a run's results depend on."""
    import emtile

    return {"emtile": emtile.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def describe(x):
    """A volume as ``run.json`` names it: its path, or ``<type shape>`` for an array."""
    return str(x) if isinstance(x, (str, os.PathLike)) else f"<{type(x).__name__} {tuple(x.shape)}>"


class Checkpoint(Callback):
    """Saves ``last/`` at every checkpoint and on Ctrl-C, and ``best/`` when a validation beats
    the best score so far.

    Parameters
    ----------
    folder : RunFolder
    metadata : callable
        ``metadata(iteration, scores, kind)`` -> the model folder's metadata dict.
    best_metric : str
        The score to maximise (``"val_vrand"``).
    validated : bool
        False when the run validates nothing: ``best/`` is then a copy of ``last/``.
    eligible_after : int, optional
        Only models validated after this step compete for ``best/`` (with frozen batch norm:
        before the freeze, scores swing from one check to the next and a maximum picks noise).
    best_score, best_scores :
        Of a resumed run.
    """

    def __init__(self, folder, *, metadata, best_metric, validated, eligible_after=None,
                 best_score=None, best_scores=None):
        self.folder, self.metadata, self.best_metric = folder, metadata, best_metric
        self.validated, self.eligible_after = validated, eligible_after
        self.best_score, self.best_scores = best_score, dict(best_scores or {})

    def on_checkpoint(self, state, scores):
        it, model = state["iteration"], state["model"]
        if scores and (self.eligible_after is None or it > self.eligible_after):
            value = scores.get(self.best_metric)
            if value is not None and (self.best_score is None or value > self.best_score):
                self.best_score, self.best_scores = value, dict(scores, iteration=it)
                self.folder.save("best", model, self.metadata(it, scores, "best"))
        self.folder.save("last", model, self.metadata(it, scores or state.get("scores"), "last"),
                         state=training_state(state, self.best_score, self.best_scores,
                                              state["elapsed"]()))
        best_missing = not (self.folder.path / "best").exists()
        if not self.validated or (it == state["iterations"] and best_missing):
            self.folder.copy_last_to_best()

    def on_interrupt(self, state):
        if state["iteration"] > state["start"]:  # the steps since the last checkpoint
            self.on_checkpoint(state, None)
