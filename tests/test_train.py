import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from emtile import EmtileError, load_model
from emtile.trainer import train
from emtile.training.logs import CSV_COLUMNS
from emtile.training.loop import fit, lr_factor

# a tiny model: depth 2, base 4; tile 68 -> output 28
TINY = dict(base=4, depth=2, tile=68, batch_size=2, val_every=3, workers=0, progress=False,
            tune_segment=False)  # segment tuning: tests/test_segment_tuning.py


@pytest.fixture(scope="module")
def small(synthetic_small, tmp_path_factory):
    """Six 96×96 synthetic EM slices as Zarr arrays (labels 0/1, as `emtile convert --labels`
    stores them): the trainer is tested in any checkout, without the ISBI files."""
    d = tmp_path_factory.mktemp("small")
    out = []
    for name, data in zip(("raw", "labels"), synthetic_small):
        a = zarr.create_array(store=d / f"{name}.zarr", shape=data.shape, chunks=(1, 64, 64), dtype=np.uint8)
        a[...] = data
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


def open_arrays(paths):
    return tuple(zarr.open_array(p, mode="r") for p in paths)


def test_lr_factor():
    assert lr_factor(5, 100, schedule="constant", warmup=10) == 0.5
    assert lr_factor(50, 100, schedule="constant") == 1.0
    assert lr_factor(100, 100, schedule="cosine", final=0.0) == pytest.approx(0.0)
    assert lr_factor(50, 100, schedule="cosine", final=0.0) == pytest.approx(0.5)
    assert lr_factor(1, 100, schedule="poly") > lr_factor(50, 100, schedule="poly") > lr_factor(100, 100, schedule="poly")
    with pytest.raises(EmtileError, match="schedule='step' is not supported"):
        lr_factor(1, 10, schedule="step")


def test_tiny_run_writes_model_folders_and_log(small, tmp_path):
    raw, labels = small
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


def test_resume_reproduces_the_uninterrupted_run(small, tmp_path):
    raw, labels = small
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


def test_bad_inputs(small, tmp_path):
    raw_path, labels_path = small
    raw, labels = open_arrays(small)
    run = dict(TINY, iterations=1)
    with pytest.raises(EmtileError, match=r"raw has shape \(6, 96, 96\) but labels have shape \(6, 96, 90\)"):
        train(raw, np.asarray(labels)[:, :, :90], tmp_path / "o1", train_slices=slice(0, 4), **run)
    three = np.asarray(labels).copy()
    three[2, 0, 0] = 2
    with pytest.raises(EmtileError, match=r"labels are not binary in slice 2: found 3 values: 0, 1, 2"):
        train(raw, three, tmp_path / "o2", train_slices=slice(0, 4), **run)
    with pytest.raises(EmtileError, match="train_slices=0:8 is outside the volume, which has 6 slices"):
        train(raw, labels, tmp_path / "o3", train_slices=slice(0, 8), **run)
    with pytest.raises(EmtileError, match=r"val_slices=7 is outside the volume"):
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


def test_overlapping_slices_warn(small, tmp_path):
    import emtile

    with pytest.warns(UserWarning, match=r"train_slices and val_slices overlap in slices \[3\]"):
        emtile.train(*small, tmp_path / "run", train_slices=slice(0, 4), val_slices=slice(3, 5),
              **dict(TINY, iterations=1))


def test_out_holding_another_run(small, tmp_path):
    out = tmp_path / "run"
    run = dict(TINY, train_slices=slice(0, 4), iterations=2)
    train(*small, out, **run)
    with pytest.raises(EmtileError, match="holds another training run; pass --resume to continue it or "
                                          "--overwrite to replace it"):
        train(*small, out, **run)
    with pytest.raises(EmtileError, match="already did 2 iterations; iterations=2 must be larger"):
        train(*small, out, resume=True, **run)
    with pytest.raises(EmtileError, match=r"base=8 differs from the run being resumed \(base=4\)"):
        train(*small, out, resume=True, **{**run, "iterations": 3, "base": 8})
    with pytest.raises(EmtileError, match="tile=70 is not valid"):  # checked before deleting
        train(*small, out, overwrite=True, **{**run, "tile": 70})
    assert len(read_csv(out / "train.csv")) == 2
    train(*small, out, overwrite=True, **{**run, "iterations": 1})
    assert len(read_csv(out / "train.csv")) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(EmtileError, match="is not empty and holds no emtile training run"):
            train(*small, other, **run, **flags)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(EmtileError, match="nothing to resume"):
        train(*small, tmp_path / "new", resume=True, **run)


def test_nan_loss_names_the_iteration_and_cause(small, tmp_path):
    raw, labels = open_arrays(small)
    bad = np.asarray(raw).astype(np.float32) / 255
    bad[:, 40:60, 40:60] = np.nan
    # refused before training: the normalisation's statistics see the NaN
    with pytest.raises(EmtileError, match="raw holds NaN or infinite values: its intensities cannot "
                                          "be normalised"):
        train(bad, labels, tmp_path / "run", train_slices=slice(0, 4), **dict(TINY, iterations=2, tile=96))
    assert not (tmp_path / "run").exists()
    # a patch holding NaN that reaches the loop anyway
    net = torch.nn.Conv2d(1, 1, 1)
    nan_batches = iter(lambda: {"image": torch.full((1, 1, 4, 4), float("nan")),
                                "label": torch.ones(1, 1, 4, 4)}, None)
    with pytest.raises(EmtileError, match="loss is nan at iteration 1; the raw patch holds NaN or infinite values"):
        fit(net, nan_batches, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            loss_fn=lambda logits, target, weight: logits.mean(), lr_at=lambda it: 0.1, start=0,
            iterations=2, device=torch.device("cpu"))

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


def test_every_cli_option_reaches_the_settings(small, tmp_path):
    """Each `emtile train` option, set away from its default, arrives in run.json's settings."""
    import dataclasses

    from emtile.cli.main import main
    from emtile.cli.train import train as command
    from emtile.training.settings import TrainSettings

    raw, labels = small
    options = {"--train-slices": ("0:4", "0:4"), "--val-slices": ("4,5", [4, 5]),
               "--iterations": ("2", 2), "--base": ("4", 4), "--depth": ("2", 2),
               "--batch-norm": (None, True), "--dropout": ("0.25", 0.25),
               "--bn-momentum": ("0.05", 0.05), "--freeze-bn": ("0.5", 0.5), "--tile": ("68", 68),
               "--batch-size": ("2", 2), "--lr": ("0.002", 0.002), "--optimizer": ("sgd", "sgd"),
               "--momentum": ("0.9", 0.9), "--weight-decay": ("0.0001", 0.0001),
               "--schedule": ("poly", "poly"), "--warmup": ("1", 1), "--loss": ("bce+dice", "bce+dice"),
               "--w0": ("5", 5.0), "--sigma": ("3", 3.0), "--class-balance": ("0.5", 0.5),
               "--workers": ("0", 0), "--device": ("cpu", "cpu"), "--amp": ("bf16", "bf16"),
               "--clip": ("1.5", 1.5), "--val-every": ("1", 1), "--seed": ("3", 3),
               "--no-elastic": (None, False), "--elastic-sigma": ("4", 4.0), "--no-flip": (None, False),
               "--no-intensity": (None, False), "--noise": ("0.01", 0.01), "--blur": ("0.5", 0.5),
               "--foreground": ("0.5", 0.5), "--no-channels-last": (None, False),
               "--normalize": ("minmax", "minmax"), "--no-calibrate": (None, False),
               "--keep-calibrated": (None, True), "--no-tune-segment": (None, False),
               "--ndim": ("2", 2),
               "--target": ("boundaries", "boundaries"), "--affinity-loss": ("dice", "dice")}
    three_d = {"offsets", "factors", "kernels"}  # 3-D only: tests/test_train3d.py passes them
    args = ["train", "--raw", raw, "--labels", labels, "--out", str(tmp_path / "run"), "--no-progress"]
    for option, (text, _) in options.items():
        args += [option] if text is None else [option, text]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    expected = {option.removeprefix("--no-").removeprefix("--").replace("-", "_"): value
                for option, (_, value) in options.items()}
    assert settings == {**TrainSettings(train_slices=0).to_json(), "val_tile": None, **expected}
    # and every setting but val_tile (validation's tile, chosen by the predictor) has an option
    names = {p.name for p in command.params} - {"raw", "labels", "out", "resume", "overwrite", "progress"}
    assert (names - three_d == {f.name for f in dataclasses.fields(TrainSettings)} - {"val_tile"}
            - three_d == set(expected))
    assert three_d <= names


def test_cli_tiny_run_and_errors(small, tmp_path):
    from emtile.cli.main import main

    raw, labels = small
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


def test_tensorboard_log_holds_the_losses_and_scores(small, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(*small, out, train_slices=slice(0, 4), val_slices=[5], **dict(TINY, iterations=4, val_every=2))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = read_csv(out / "train.csv")
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == [float(np.float32(r["loss"])) for r in rows]
    vrand = events.Scalars("val/vrand")
    assert [e.step for e in vrand] == [2, 4]
    assert [e.value for e in vrand] == pytest.approx([float(rows[i]["val_vrand"]) for i in (1, 3)], rel=1e-5)
    assert len(events.Scalars("train/lr")) == 4


def test_bn_momentum_sets_the_running_statistics_rate(small, tmp_path):
    import emtile

    # same seed, same first batch, same initial weights: after one step every running mean is
    # momentum * (first batch mean), so 0.1 gives exactly ten times what 0.01 gives
    means = []
    for m in (0.1, 0.01):
        out = tmp_path / f"bn{m}"
        train(*small, out, train_slices=slice(0, 4), iterations=1,
              **dict(TINY, batch_norm=True, bn_momentum=m))
        model = emtile.load_model(out / "last")
        bn = next(x for x in model.modules() if isinstance(x, torch.nn.BatchNorm2d))
        means.append(bn.running_mean.clone())
    assert means[1].abs().max() > 0
    torch.testing.assert_close(means[0], 10 * means[1], rtol=1e-4, atol=1e-7)
    with pytest.raises(EmtileError, match=r"bn_momentum=0 must be in \(0, 1\]"):
        train(*small, tmp_path / "bad", train_slices=slice(0, 4), iterations=1,
              **dict(TINY, batch_norm=True, bn_momentum=0))


# --------------------------------------------------------------------------- frozen batch norm


def test_precise_norm_stats_average_the_batches_and_restore_momentum():
    from emtile.training.batchnorm import precise_norm_stats

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2, momentum=0.01))
    rng = np.random.default_rng(0)
    xs = [torch.from_numpy(rng.normal(k, 1 + k, (1, 2, 8, 8)).astype(np.float32)) for k in range(4)]
    model.eval()
    precise_norm_stats(model, iter({"image": x} for x in xs), 4, device=torch.device("cpu"))
    bn = model[0]
    expected = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected)
    expected_var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert bn.momentum == 0.01 and not model.training


class NormWatch:
    """Per step: the first batch-norm layer's running mean and whether it normalised per batch."""

    def __init__(self):
        self.means, self.training, self.losses, self.adam_steps = [], [], [], []

    def on_step(self, state, logs):
        first = next(state["model"].parameters())
        self.adam_steps.append(int(state["optimizer"].state[first]["step"]))
        bn = next(m for m in state["model"].modules() if isinstance(m, torch.nn.BatchNorm2d))
        self.means.append(bn.running_mean.clone())
        self.training.append(bn.training)
        self.losses.append(logs["loss"])


def test_freeze_bn_fixes_the_statistics_after_the_given_fraction(small, tmp_path):
    watch = NormWatch()
    train(*small, tmp_path / "run", train_slices=slice(0, 4), iterations=8, callbacks=[watch],
          **dict(TINY, batch_norm=True, freeze_bn=0.5, val_every=0, calibrate=False))
    assert watch.training == [True] * 4 + [False] * 4
    m = watch.means
    assert all(not torch.equal(m[i], m[i + 1]) for i in range(3))  # updated before the freeze
    assert not torch.equal(m[3], m[4])  # recomputed at the freeze
    assert all(torch.equal(m[4], m[i]) for i in range(5, 8))  # then fixed
    assert watch.adam_steps == [1, 2, 3, 4, 1, 2, 3, 4]  # Adam's moments start afresh
    saved = load_model(tmp_path / "run" / "last")
    bn = next(x for x in saved.modules() if isinstance(x, torch.nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_mean, m[-1])


@pytest.mark.parametrize("stop", [2, 6])  # Ctrl-C before and after the freeze at step 4
def test_resume_with_freeze_bn_reproduces_the_run(small, tmp_path, stop):
    kwargs = dict(TINY, train_slices=slice(0, 4), batch_norm=True, freeze_bn=0.5, val_every=2,
                  val_slices=[4], lr=3e-3, seed=5, calibrate=False)
    straight = NormWatch()
    train(*small, tmp_path / "a", iterations=8, callbacks=[straight], **kwargs)

    class CtrlC(NormWatch):
        def on_row(self, state, row):
            if row["iteration"] == stop:
                raise KeyboardInterrupt

    first, second = CtrlC(), NormWatch()
    with pytest.raises(KeyboardInterrupt):
        train(*small, tmp_path / "b", iterations=8, callbacks=[first], **kwargs)
    train(*small, tmp_path / "b", iterations=8, resume=True, callbacks=[second], **kwargs)
    assert first.losses + second.losses == straight.losses
    assert first.training + second.training == [True] * 4 + [False] * 4


def test_freeze_bn_default_is_the_last_30_percent_and_1_means_never(small, tmp_path):
    for freeze, expected in ((None, [True] * 10), (1.0, [True] * 10), ("default", [True] * 7 + [False] * 3)):
        watch = NormWatch()
        kwargs = {} if freeze == "default" else {"freeze_bn": freeze}
        train(*small, tmp_path / f"run{freeze}", train_slices=slice(0, 4), iterations=10,
              callbacks=[watch], **dict(TINY, batch_norm=True, val_every=0, calibrate=False, **kwargs))
        assert watch.training == expected, freeze


def test_with_freeze_bn_best_is_chosen_after_the_freeze(small, tmp_path, monkeypatch):
    from emtile.training.validation import Validator

    real = Validator.__call__
    calls = []

    def falling_scores(self, model):  # real scores, but V-Rand made to fall check by check
        scores = real(self, model)
        calls.append(len(calls) + 1)
        return dict(scores, val_vrand=1.0 - 0.01 * len(calls))

    monkeypatch.setattr(Validator, "__call__", falling_scores)
    out = tmp_path / "run"
    result = train(*small, out, train_slices=slice(0, 4), val_slices=[4, 5], iterations=8,
                   **dict(TINY, batch_norm=True, freeze_bn=0.5, val_every=1, calibrate=False))
    assert calls == list(range(1, 9))
    assert result["best"]["iteration"] == 5  # the first check after the freeze at step 4
    assert json.loads((out / "best" / "metadata.json").read_text())["emtile"]["iteration"] == 5
    # without freezing, the first check wins
    calls.clear()
    result = train(*small, tmp_path / "plain", train_slices=slice(0, 4), val_slices=[4, 5],
                   iterations=8, **dict(TINY, batch_norm=True, freeze_bn=None, val_every=1,
                                        calibrate=False))
    assert result["best"]["iteration"] == 1


def test_freeze_bn_rejects_a_bad_fraction(small, tmp_path):
    with pytest.raises(EmtileError, match=r"freeze_bn=1.5 must be a fraction of the run in \[0, 1\]"):
        train(*small, tmp_path / "bad", train_slices=slice(0, 4), iterations=2,
              **dict(TINY, batch_norm=True, freeze_bn=1.5))


# --------------------------------------------------------------------------- calibration


def test_threshold_offset_finds_the_error_minimising_threshold():
    from emtile.training.calibration import threshold_offset

    rng = np.random.default_rng(0)
    truth = rng.random(10_000) < 0.7
    # cells between 0.3 and 1, membrane below 0.3: every threshold in [0.29, 0.3) separates them
    prob = np.where(truth, rng.uniform(0.301, 1.0, truth.size), rng.uniform(0.0, 0.29, truth.size))
    offset, t, before, after = threshold_offset(prob, truth)
    assert 0.29 <= t < 0.301 and after == 0.0
    assert before == pytest.approx(np.mean((prob > 0.5) != truth)) and before > 0.1
    assert offset == pytest.approx(-np.log(t / (1 - t)))
    # the search stays within [lo, hi]: all-cell truth would want threshold 0
    offset, t, _, _ = threshold_offset(prob, np.ones_like(truth))
    assert t == pytest.approx(0.02)


def test_calibrate_model_moves_the_fitted_thresholds_to_one_half_and_the_v_rand_target(small):
    from emtile.predictor import predict_array
    from emtile.training.calibration import calibrate_model
    from emtile.unet import UNet

    raw, labels = open_arrays(small)
    torch.manual_seed(0)
    model = UNet(1, 1, base=4, depth=2).eval()
    with torch.no_grad():
        model.head.bias += 1.0  # a biased model
    roi = (slice(0, 4), slice(None), slice(None))
    before = predict_array(model, raw, roi=roi, tile="auto")
    record = calibrate_model(model, raw, labels, [0, 1, 2, 3], device="cpu")
    after = predict_array(model, raw, roi=roi, tile="auto")
    truth = np.asarray(labels[0:4]) != 0
    t = record["threshold"]
    assert record["pixel_error_before"] == pytest.approx(np.mean((before > 0.5) != truth))
    assert record["pixel_error_after"] == pytest.approx(np.mean((before > t) != truth))
    assert record["pixel_error_after"] <= record["pixel_error_before"]
    # the map is exact in logit space: p' = sigmoid(scale * logit(p) + offset)
    logit = np.log(before) - np.log1p(-before)
    mapped = record["scale"] * logit + record["offset"]
    np.testing.assert_allclose(after, 1 / (1 + np.exp(-mapped)), atol=2e-5)
    near = np.abs(before - t) < 1e-4  # float rounding may flip pixels exactly at the threshold
    assert np.array_equal((after > 0.5)[~near], (before > t)[~near])
    # and the training slices' best V-Rand threshold is now 0.7 (when the two are apart)
    from emtile.training.calibration import VRAND_TARGET, calibration_map, vrand_logit

    z_vrand, vrand = vrand_logit(before, truth)
    assert (record["vrand"], record["vrand_threshold"]) == pytest.approx(
        (vrand, 1 / (1 + np.exp(-z_vrand))))
    z_pixel = np.log(t / (1 - t))
    assert (record["scale"], record["offset"]) == pytest.approx(calibration_map(z_pixel, z_vrand))
    if abs(z_vrand - z_pixel) >= 0.25:
        assert 1 / (1 + np.exp(-(record["scale"] * z_vrand + record["offset"]))) == pytest.approx(
            VRAND_TARGET if z_vrand > z_pixel else 1 - VRAND_TARGET)


def test_calibration_map_by_hand():
    from emtile.training.calibration import calibration_map

    # pixel error best at p 0.18 (logit -1.5), V-Rand best at p 0.92 (logit 2.5): the case
    scale, offset = calibration_map(-1.5, 2.5)
    assert scale == pytest.approx(np.log(0.7 / 0.3) / 4) and offset == pytest.approx(1.5 * scale)
    assert calibration_map(-1.5, -1.4) == (1.0, 1.5)  # too close: an offset alone
    scale, offset = calibration_map(1.0, -1.0)  # V-Rand below: it goes to 0.3
    assert scale > 0 and 1 / (1 + np.exp(-(scale * -1.0 + offset))) == pytest.approx(0.3)


def test_train_calibrates_best_once_and_leaves_last_as_trained(small, tmp_path):
    import emtile
    from emtile.training.calibration import calibrate_best

    out = tmp_path / "run"
    result = train(*small, out, train_slices=slice(0, 4), iterations=3,
                   **dict(TINY, val_every=0))  # no validation: best is the last model
    record = result["calibration"]
    meta = json.loads((out / "best" / "metadata.json").read_text())["emtile"]
    assert meta["calibration"]["offset"] == pytest.approx(record["offset"])
    assert meta["calibration"]["slices"] == [0, 1, 2, 3]
    best, last = emtile.load_model(out / "best"), emtile.load_model(out / "last")
    for (name, a), (_, b) in zip(best.state_dict().items(), last.state_dict().items()):
        if name == "head.bias":
            torch.testing.assert_close(a, b * record["scale"] + record["offset"])
        elif name == "head.weight":
            torch.testing.assert_close(a, b * record["scale"])
        else:
            assert torch.equal(a, b), name
    # a second call (a resumed run that kept this best) does not shift it again
    raw, labels = open_arrays(small)
    calibrate_best(out / "best", raw, labels, [0, 1, 2, 3], torch.device("cpu"), None)
    assert torch.equal(emtile.load_model(out / "best").head.bias, best.head.bias)
    # and calibrate=False leaves best equal to last
    train(*small, tmp_path / "plain", train_slices=slice(0, 4), iterations=3, calibrate=False,
          **dict(TINY, val_every=0))
    plain = json.loads((tmp_path / "plain" / "best" / "metadata.json").read_text())["emtile"]
    assert "calibration" not in plain


def test_cli_freeze_bn_and_calibrate(small, tmp_path):
    from emtile.cli.main import main

    raw, labels = small
    base = ["train", "--raw", raw, "--labels", labels, "--train-slices", "0:4", "--iterations", "4",
            "--base", "4", "--depth", "2", "--tile", "68", "--workers", "0", "--val-every", "0",
            "--batch-norm", "--no-progress"]
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "a"), "--freeze-bn", "0.5"])
    assert result.exit_code == 0, result.output
    assert "calibrated best/: pixel-error threshold" in result.output
    meta = json.loads((tmp_path / "a" / "best" / "metadata.json").read_text())["emtile"]
    assert meta["settings"]["freeze_bn"] == 0.5 and "calibration" in meta
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "b"), "--no-calibrate"])
    assert result.exit_code == 0, result.output
    assert "calibrated" not in result.output
    assert "calibration" not in json.loads((tmp_path / "b" / "best" / "metadata.json").read_text())["emtile"]
    bad = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "c"), "--freeze-bn", "1.5"])
    assert bad.exit_code == 2 and "--freeze-bn" in bad.output and "1.5 is not in the range" in bad.output
    assert not (tmp_path / "c").exists()


def test_out_that_is_or_lies_in_an_input_is_refused_before_any_work(small, tmp_path):
    raw, labels = small
    run = dict(TINY, train_slices=slice(0, 4), iterations=1)
    for out, how in ((raw, f"output '{raw}' is the input '{raw}'"),
                     (f"{labels}/run", f"output '{labels}/run' lies inside the input '{labels}'")):
        with pytest.raises(EmtileError, match=f"^{re.escape(how)}: writing it could destroy"):
            train(raw, labels, out, overwrite=True, **run)
    assert not (Path(labels) / "run").exists()
    with pytest.raises(EmtileError, match="its folder .*missing' does not exist; create it first"):
        train(raw, labels, tmp_path / "missing" / "run", **run)
    assert not (tmp_path / "missing").exists()
