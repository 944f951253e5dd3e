"""Logging callbacks of the training loop: the run clock, ``train.csv``, TensorBoard, tqdm."""

import csv
import os
from pathlib import Path

from emtile.training.loop import Callback
from emtile.training.run import writes

__all__ = ["CSV_COLUMNS", "Clock", "CSVLog", "TensorBoardLog", "ProgressBar"]

#: ``val_vrand`` is the V-Rand at its best threshold of the challenge's grid, which
#: ``val_vrand_threshold`` names; ``val_vrand_05``, ``val_pixel_error`` and ``val_f1`` are at 0.5.
CSV_COLUMNS = ("iteration", "loss", "lr", "val_loss", "val_pixel_error", "val_f1", "val_vrand",
               "val_vrand_threshold", "val_vrand_05", "elapsed_s")


class Clock(Callback):
    """Puts the run's elapsed time (earlier sessions included) at ``state["elapsed"]()``."""

    def __init__(self, elapsed):
        self.elapsed = elapsed

    def on_start(self, state):
        state["elapsed"] = self.elapsed


class CSVLog(Callback):
    """``train.csv``: one row per iteration; a resumed run keeps the rows up to its start (the
    file is replaced whole, so a kill while it is rewritten loses no row)."""

    def __init__(self, path, start, columns=CSV_COLUMNS):
        self.path, self.columns = Path(path), tuple(columns)
        rows = []
        if start > 0 and self.path.exists():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= start]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with writes(self.path.parent):
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.path)
            self.file = self.path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")

    def on_row(self, state, row):
        out = {k: "" for k in self.columns}
        for k, v in row.items():
            if k in out and v is not None:
                # the loss exactly (repr round-trips), so runs can be compared bit for bit
                out[k] = repr(v) if k == "loss" else f"{v:.6g}" if isinstance(v, float) else v
        out["elapsed_s"] = f"{state['elapsed']():.2f}"
        with writes(self.path.parent):
            self.writer.writerow(out)
            self.file.flush()

    def on_end(self, state):
        self.file.close()

    on_interrupt = on_end


class TensorBoardLog(Callback):
    """Scalars to a TensorBoard folder (only if the ``tensorboard`` package is installed)."""

    def __init__(self, directory):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        self.writer = SummaryWriter(str(directory))

    def on_step(self, state, logs):
        self.writer.add_scalar("train/loss", logs["loss"], logs["iteration"])
        self.writer.add_scalar("train/lr", logs["lr"], logs["iteration"])

    def on_validation(self, state, logs):
        for k, v in logs.items():
            if isinstance(v, (int, float)) and v is not None:
                self.writer.add_scalar(f"val/{k[4:] if k.startswith('val_') else k}", v,
                                       state["iteration"])

    def on_end(self, state):
        self.writer.close()

    on_interrupt = on_end


class ProgressBar(Callback):
    """A tqdm bar: steps, the last loss and learning rate, the last validation's scores."""

    def __init__(self, start, iterations):
        from tqdm import tqdm

        self.bar = tqdm(total=iterations, initial=start, unit="it", desc="train", dynamic_ncols=True)
        self.val = {}

    def on_step(self, state, logs):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2g}", **self.val,
                             refresh=False)

    def on_validation(self, state, logs):
        self.val = {}
        if logs.get("val_pixel_error") is not None:
            self.val["pixel_error@0.5"] = f"{logs['val_pixel_error']:.4f}"
        if logs.get("val_vrand") is not None:
            t = logs.get("val_vrand_threshold")
            self.val["vrand@" + (f"{t:g}" if t is not None else "best")] = f"{logs['val_vrand']:.4f}"

    def on_end(self, state):
        self.bar.close()

    on_interrupt = on_end
