"""The run folder and its state files, and the callback that saves ``best/`` and ``last/``.

The output folder of a run::

    out/run.json         the settings of the run (marks the folder as an emtile training run;
                         ``"finished": true`` once its last step, checkpoint, calibration ran)
    out/train.csv        iteration, loss, lr, val_loss, val_pixel_error, val_f1, val_vrand,
                         val_vrand_threshold, val_vrand_05, elapsed_s (V-Rand at its best threshold,
                         which the next column names, then at 0.5; pixel error and F1 at 0.5)
    out/best/            model folder (emtile.load_model / emtile predict --model out/best)
    out/last/            model folder + training_state.pt (optimizer, RNG, iteration) for --resume
    out/tensorboard/     if TensorBoard is installed

A folder is replaced by writing ``NAME.tmp`` and renaming (:func:`replace_folder`), so a complete
``best/`` or ``last/`` exists at every moment (a kill between the two renames leaves it as
``NAME.old``, which :meth:`RunFolder.recover` puts back); ``run.json`` and ``train.csv`` are
replaced whole the same way. emtile deletes only the files it writes. A write that fails (disk
full, permission denied) is one line (:func:`writes`) and the run stays resumable.
"""

import contextlib
import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from emtile import _faults
from emtile._errors import EmtileError
from emtile.training.loop import Callback
from emtile.training.settings import jsonable

__all__ = ["RunFolder", "Checkpoint", "replace_folder", "writes", "RUN_FILE", "STATE_FILE"]

RUN_FILE = "run.json"
STATE_FILE = "training_state.pt"
_WRITTEN = ("best", "last", "last.tmp", "last.old", "best.tmp", "best.old", "tensorboard")
RESUME = "run with --resume to continue"


@contextlib.contextmanager
def writes(folder, *, point=True):
    """Around a write into the run folder ``folder``: the test-only fault point ``train.write``
    first (see :mod:`emtile._faults`), and an ``OSError`` (disk full, permission denied) becomes
    one :class:`emtile.store.StoreWriteError` line saying to resume."""
    from emtile import store

    with store.write_errors(folder, then=RESUME, left="the run keeps its last checkpoint"):
        if point:
            _faults.point("train.write")
        yield


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
            if last is None and not (out / RUN_FILE).exists():
                raise EmtileError(f"nothing to resume in out={str(out)!r}: it has no last/ "
                                  "checkpoint (run without --resume to start a new run)")
            return last  # None: a run stopped before its first checkpoint starts over
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
        with writes(self.path, point=False):
            for name in _WRITTEN:
                shutil.rmtree(self.path / name, ignore_errors=True)
            # run.json last: a folder killed part-way through is still recognisably a run
            for name in ("train.csv", "train.csv.tmp", RUN_FILE + ".tmp", RUN_FILE):
                (self.path / name).unlink(missing_ok=True)
            self.path.mkdir(parents=True, exist_ok=True)

    def recover(self):
        """Before resuming: put back a ``last/`` or ``best/`` that a kill between the two renames
        of a save left as ``NAME.old``, and remove the copies a killed save left; return
        :meth:`last`."""
        with writes(self.path, point=False):
            for name in ("last", "best"):
                final, old = self.path / name, self.path / f"{name}.old"
                if not final.exists() and old.exists():
                    old.rename(final)
                shutil.rmtree(old, ignore_errors=True)  # only ever beside a complete final
                shutil.rmtree(self.path / f"{name}.tmp", ignore_errors=True)
        return self.last()

    def finished(self):
        """Whether the run in the folder ended: its last step, checkpoint and calibration done."""
        try:
            return bool(json.loads((self.path / RUN_FILE).read_text()).get("finished"))
        except (OSError, ValueError, AttributeError):
            return False

    def last(self):
        """The folder to resume from: ``last/`` (or ``last.old/`` after a crash between the two
        renames of a save), or None."""
        for name in ("last", "last.old"):
            if (self.path / name / STATE_FILE).exists():
                return self.path / name
        return None

    def write_run(self, info):
        tmp = self.path / (RUN_FILE + ".tmp")
        with writes(self.path):
            tmp.write_text(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, self.path / RUN_FILE)

    def save(self, name, model, metadata, *, state=None):
        """Write the model folder ``name`` (with ``training_state.pt`` when ``state`` is given)."""
        from emtile.unet import save_model

        tmp = self.path / f"{name}.tmp"
        with writes(self.path):
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(model, tmp, metadata=metadata)
        if state is not None:
            with writes(self.path):
                torch.save(state, tmp / STATE_FILE)
        with writes(self.path):
            replace_folder(tmp, self.path / name)

    def copy_last_to_best(self):
        tmp = self.path / "best.tmp"
        with writes(self.path):
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.path / "last", tmp, ignore=shutil.ignore_patterns(STATE_FILE))
        with writes(self.path):
            replace_folder(tmp, self.path / "best")


def training_state(state, best_score, best_scores, elapsed):
    """What ``last/training_state.pt`` holds: optimizer, scaler, RNG and counters, as tensors and
    plain containers loadable with ``torch.load(weights_only=True)`` (no pickled code)."""
    return {
        "iteration": int(state["iteration"]),
        "loss": None if state.get("loss") is None else float(state["loss"]),
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
    from emtile.unet import load_folder

    model.load_state_dict(load_folder(folder).state_dict())
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
        The score to maximise (``"val_vrand"``), or to minimise with ``lower_is_better``
        (``"val_voi"``).
    validated : bool
        False when the run validates nothing: ``best/`` is then a copy of ``last/``.
    eligible_after : int, optional
        Only models validated after this step compete for ``best/`` (with frozen batch norm:
        before the freeze, scores swing from one check to the next and a maximum picks noise).
    best_score, best_scores :
        Of a resumed run.
    lower_is_better : bool
        Minimise ``best_metric`` instead.
    """

    def __init__(self, folder, *, metadata, best_metric, validated, eligible_after=None,
                 best_score=None, best_scores=None, lower_is_better=False):
        self.folder, self.metadata, self.best_metric = folder, metadata, best_metric
        self.sign = -1.0 if lower_is_better else 1.0
        self.validated, self.eligible_after = validated, eligible_after
        self.best_score, self.best_scores = best_score, dict(best_scores or {})

    def on_checkpoint(self, state, scores):
        it, model = state["iteration"], state["model"]
        if scores and (self.eligible_after is None or it > self.eligible_after):
            value = scores.get(self.best_metric)
            if value is not None and (self.best_score is None
                                      or self.sign * value > self.sign * self.best_score):
                self.best_score, self.best_scores = value, dict(scores, iteration=it)
                self.folder.save("best", model, self.metadata(it, scores, "best"))
        self.folder.save("last", model, self.metadata(it, scores or state.get("scores"), "last"),
                         state=training_state(state, self.best_score, self.best_scores,
                                              state["elapsed"]()))
        best_missing = not (self.folder.path / "best").exists()
        if not self.validated or (it == state["iterations"] and best_missing):
            self.folder.copy_last_to_best()
        _faults.point("train.checkpoint")  # test-only: a run killed here

    def on_end(self, state):
        if state["start"] == state["iterations"]:  # resumed after its last checkpoint was saved:
            if not self.validated or not (self.folder.path / "best").exists():  # finish it
                self.folder.copy_last_to_best()

    def on_interrupt(self, state):
        if state["iteration"] > state["start"]:  # the steps since the last checkpoint
            self.on_checkpoint(state, None)
