import csv
import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from emtile import EmtileError, load_model
from emtile.trainer import CSV_COLUMNS, fit, lr_factor, train

# a tiny model: depth 2, base 4; tile 68 -> output 28
TINY = dict(base=4, depth=2, tile=68, batch_size=2, val_every=3, workers=0, progress=False)


@pytest.fixture(scope="module")
def isbi_small(isbi_raw, isbi_labels, tmp_path_factory):
    """Six 96×96 ISBI crops as Zarr arrays (labels stored 0/1 as `emtile convert --labels` does)."""
    d = tmp_path_factory.mktemp("isbi_small")
    out = []
    for name, data in (("raw", isbi_raw[:6, :96, :96]), ("labels", (isbi_labels[:6, :96, :96] > 0))):
        a = zarr.create_array(store=d / f"{name}.zarr", shape=data.shape, chunks=(1, 64, 64), dtype=np.uint8)
        a[...] = data.astype(np.uint8)
        out.append(d / f"{name}.zarr")
    return tuple(str(p) for p in out)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Losses:
    def __init__(self):
        self.values = []

    def on_step(self, state, logs):
        self.values.append(logs["loss"])


def open_arrays(isbi_small):
    return tuple(zarr.open_array(p, mode="r") for p in isbi_small)


def test_lr_factor():
    assert lr_factor(5, 100, schedule="constant", warmup=10) == 0.5
    assert lr_factor(50, 100, schedule="constant") == 1.0
    assert lr_factor(100, 100, schedule="cosine", final=0.0) == pytest.approx(0.0)
    assert lr_factor(50, 100, schedule="cosine", final=0.0) == pytest.approx(0.5)
    assert lr_factor(1, 100, schedule="poly") > lr_factor(50, 100, schedule="poly") > lr_factor(100, 100, schedule="poly")
    with pytest.raises(EmtileError, match="schedule='step' is not supported"):
        lr_factor(1, 10, schedule="step")


def test_tiny_run_writes_model_folders_and_log(isbi_small, tmp_path):
    raw, labels = isbi_small
    out = tmp_path / "run"
    result = train(raw, labels, out, train_slices=slice(0, 4), val_slices=[4, 5], iterations=4, seed=1,
                   **TINY)
    rows = read_csv(out / "train.csv")
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    assert rows[0]["val_loss"] == "" and rows[2]["val_loss"] != "" and rows[3]["val_vrand"] != ""
    assert 0 <= float(rows[3]["val_pixel_error"]) <= 1 and float(rows[3]["elapsed_s"]) > 0
    model = load_model(out / "best")
    assert model.config["base"] == 4 and model.config["depth"] == 2
    meta = json.loads((out / "last" / "metadata.json").read_text())["emtile"]
    assert meta["iteration"] == 4 and meta["train_slices"] == [0, 1, 2, 3] and meta["val_slices"] == [4, 5]
    assert meta["seed"] == 1 and meta["raw"] == raw and "torch" in meta["versions"]
    assert "val_vrand" in meta["metrics"] and meta["best_metric"] == "val_vrand"
    assert result["iteration"] == 4 and result["best"]["iteration"] in (3, 4)
    # the optimizer/RNG state loads without unpickling code
    state = torch.load(out / "last" / "training_state.pt", weights_only=True)
    assert state["iteration"] == 4 and "state" in state["optimizer"]
    assert not (out / "best" / "training_state.pt").exists()


def test_resume_reproduces_the_uninterrupted_run(isbi_small, tmp_path):
    raw, labels = isbi_small
    kwargs = dict(TINY, train_slices=slice(0, 4), val_slices=[4, 5], seed=3, dropout=0.3,
                  lr=3e-3, schedule="cosine", warmup=2)
    straight = Losses()
    train(raw, labels, tmp_path / "a", iterations=8, callbacks=[straight], **kwargs)
    first, second = Losses(), Losses()

    class CtrlC(Losses):  # Ctrl-C after the 4th step
        def on_row(self, state, row):
            if row["iteration"] == 4:
                raise KeyboardInterrupt

    first = CtrlC()
    with pytest.raises(KeyboardInterrupt):
        train(raw, labels, tmp_path / "b", iterations=8, callbacks=[first], **kwargs)
    # the patch stream depends only on (seed, batch index): the resumed half may use workers
    train(raw, labels, tmp_path / "b", iterations=8, resume=True, callbacks=[second],
          **{**kwargs, "workers": 2})
    assert len(straight.values) == 8
    assert first.values + second.values == straight.values  # bit for bit
    rows = read_csv(tmp_path / "b" / "train.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, 9))
    assert [float(r["loss"]) for r in rows] == straight.values


@pytest.mark.slow
def test_short_training_on_isbi_lowers_the_loss(isbi_raw, isbi_labels, tmp_path):
    losses = Losses()
    train(isbi_raw[:25], isbi_labels[:25], tmp_path / "run", train_slices=slice(0, 25), iterations=60,
          base=8, depth=2, tile=132, batch_size=4, lr=1e-2, w0=0, elastic=False, workers=0, seed=0,
          progress=False, callbacks=[losses])
    v = np.array(losses.values)
    assert v[-15:].mean() < v[:15].mean() - 0.05, v


# --------------------------------------------------------------------------- bad input


def test_bad_inputs(isbi_small, tmp_path):
    raw_path, labels_path = isbi_small
    raw, labels = open_arrays(isbi_small)
    run = dict(TINY, iterations=1)
    with pytest.raises(EmtileError, match=r"raw has shape \(6, 96, 96\) but labels have shape \(6, 96, 90\)"):
        train(raw, np.asarray(labels)[:, :, :90], tmp_path / "o1", train_slices=slice(0, 4), **run)
    three = np.asarray(labels).copy()
    three[2, 0, 0] = 2
    with pytest.raises(EmtileError, match=r"labels are not binary: slice 2 brings the values seen to \{0, 1, 2\}"):
        train(raw, three, tmp_path / "o2", train_slices=slice(0, 4), **run)
    with pytest.raises(EmtileError, match="train_slices=0:8 lies outside the volume: it has 6 slices"):
        train(raw, labels, tmp_path / "o3", train_slices=slice(0, 8), **run)
    with pytest.raises(EmtileError, match=r"val_slices \[7\] lie outside the volume"):
        train(raw, labels, tmp_path / "o3", train_slices=slice(0, 4), val_slices=[7], **run)
    with pytest.raises(EmtileError, match=r"the volume's slices \(96×96 px\) are smaller than the tile's "
                                          r"output \(100×100 px for input 140×140\): choose a smaller --tile"):
        train(raw, labels, tmp_path / "o4", train_slices=slice(0, 4), **{**run, "tile": 140})
    with pytest.raises(EmtileError, match="tile=70 is not valid for depth 2: nearest valid sizes are 68 and 72"):
        train(raw, labels, tmp_path / "o4", train_slices=slice(0, 4), **{**run, "tile": 70})
    with pytest.raises(EmtileError, match=r"class_balance=2 must be a bool or a number in \[0, 1\]"):
        train(raw, labels, tmp_path / "o4", train_slices=slice(0, 4), **{**run, "class_balance": 2})
    for name in ("o1", "o2", "o3", "o4"):  # nothing was written for refused input
        assert not (tmp_path / name).exists()


def test_overlapping_slices_warn(isbi_small, tmp_path):
    import emtile

    with pytest.warns(UserWarning, match=r"train_slices and val_slices overlap in slices \[3\]"):
        emtile.train(*isbi_small, tmp_path / "run", train_slices=slice(0, 4), val_slices=slice(3, 5),
              **dict(TINY, iterations=1))


def test_out_holding_another_run(isbi_small, tmp_path):
    out = tmp_path / "run"
    run = dict(TINY, train_slices=slice(0, 4), iterations=2)
    train(*isbi_small, out, **run)
    with pytest.raises(EmtileError, match="holds another training run; pass --resume to continue it or "
                                          "--overwrite to replace it"):
        train(*isbi_small, out, **run)
    with pytest.raises(EmtileError, match="already did 2 iterations; iterations=2 must be larger"):
        train(*isbi_small, out, resume=True, **run)
    with pytest.raises(EmtileError, match=r"base=8 differs from the run being resumed \(base=4\)"):
        train(*isbi_small, out, resume=True, **{**run, "iterations": 3, "base": 8})
    with pytest.raises(EmtileError, match="tile=70 is not valid"):  # checked before deleting
        train(*isbi_small, out, overwrite=True, **{**run, "tile": 70})
    assert len(read_csv(out / "train.csv")) == 2
    train(*isbi_small, out, overwrite=True, **{**run, "iterations": 1})
    assert len(read_csv(out / "train.csv")) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(EmtileError, match="is not empty and holds no emtile training run"):
            train(*isbi_small, other, **run, **flags)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(EmtileError, match="nothing to resume"):
        train(*isbi_small, tmp_path / "new", resume=True, **run)


def test_nan_loss_names_the_iteration_and_cause(isbi_small, tmp_path):
    raw, labels = open_arrays(isbi_small)
    bad = np.asarray(raw).astype(np.float32) / 255
    bad[:, 40:60, 40:60] = np.nan
    with pytest.raises(EmtileError, match="loss is nan at iteration 1; the raw patch holds NaN or infinite values"):
        train(bad, labels, tmp_path / "run", train_slices=slice(0, 4), **dict(TINY, iterations=2, tile=96))

    # divergence: a loss that turns NaN at the third step
    model = torch.nn.Conv2d(1, 1, 1)
    batches = iter(lambda: {"image": torch.ones(1, 1, 4, 4), "label": torch.ones(1, 1, 4, 4)}, None)
    calls = []

    def loss_fn(logits, target, weight):
        calls.append(1)
        return logits.mean() * (float("nan") if len(calls) == 3 else 1.0)

    with pytest.raises(EmtileError, match=r"loss is nan at iteration 3; training diverged, most likely a "
                                          r"learning rate too high for this setup \(lr=0.1\): lower --lr"):
        fit(model, batches, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_fn,
            lr_at=lambda it: 0.1, start=0, iterations=5, device=torch.device("cpu"))


# --------------------------------------------------------------------------- CLI


def test_cli_help():
    from emtile.cli.main import main

    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--raw", "--labels", "--out", "--train-slices", "--val-slices", "--iterations",
                   "--base", "--depth", "--tile", "--batch-size", "--lr", "--loss", "--workers",
                   "--resume", "--overwrite", "--seed"):
        assert option in result.output


def test_cli_tiny_run_and_errors(isbi_small, tmp_path):
    from emtile.cli.main import main

    raw, labels = isbi_small
    out = tmp_path / "run"
    args = ["train", "--raw", raw, "--labels", labels, "--out", str(out), "--train-slices", "0:4",
            "--val-slices", "4:6", "--iterations", "2", "--base", "4", "--depth", "2", "--tile", "68",
            "--workers", "0", "--val-every", "2", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "trained 2 iterations" in result.output and (out / "best" / "model.safetensors").exists()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1
    assert again.output.startswith("Error: ") and "holds another training run" in again.output
    more = [a if a != "2" or args[i - 1] != "--iterations" else "3" for i, a in enumerate(args)]
    resumed = CliRunner().invoke(main, [*more, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert len(read_csv(out / "train.csv")) == 3


def test_tensorboard_log_when_installed(isbi_small, tmp_path):
    pytest.importorskip("tensorboard")
    train(*isbi_small, tmp_path / "run", train_slices=slice(0, 4), val_slices=[5], **dict(TINY, iterations=3))
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_bn_momentum_sets_the_running_statistics_rate(isbi_small, tmp_path):
    import emtile

    # same seed, same first batch, same initial weights: after one step every running mean is
    # momentum * (first batch mean), so 0.1 gives exactly ten times what 0.01 gives
    means = []
    for m in (0.1, 0.01):
        out = tmp_path / f"bn{m}"
        train(*isbi_small, out, train_slices=slice(0, 4), iterations=1,
              **dict(TINY, batch_norm=True, bn_momentum=m))
        model = emtile.load_model(out / "last")
        bn = next(x for x in model.modules() if isinstance(x, torch.nn.BatchNorm2d))
        means.append(bn.running_mean.clone())
    assert means[1].abs().max() > 0
    torch.testing.assert_close(means[0], 10 * means[1], rtol=1e-4, atol=1e-7)
    with pytest.raises(EmtileError, match=r"bn_momentum=0 must be in \(0, 1\]"):
        train(*isbi_small, tmp_path / "bad", train_slices=slice(0, 4), iterations=1,
              **dict(TINY, batch_norm=True, bn_momentum=0))
