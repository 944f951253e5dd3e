"""The parts of emtile.training: the settings object, the loop's hooks, batch-norm freezing as a
callback, the run folder, and train() with a settings object or a model it did not build."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import zarr

from emtile import EmtileError, load_model
from emtile.trainer import train
from emtile.training.batchnorm import FreezeNorm
from emtile.training.loop import Callback, fit
from emtile.training.settings import TrainSettings

TINY = dict(base=4, depth=2, tile=68, batch_size=2, val_every=3, workers=0,
            tune_segment=False)  # segment tuning: tests/test_segment_tuning.py


@pytest.fixture(scope="module")
def small(synthetic_small, tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    out = []
    for name, data in zip(("raw", "labels"), synthetic_small):
        a = zarr.create_array(store=d / f"{name}.zarr", shape=data.shape, chunks=(1, 96, 96), dtype=np.uint8)
        a[...] = data
        out.append(str(d / f"{name}.zarr"))
    return tuple(out)


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_step(self, state, logs):
        self.values.append(logs["loss"])


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kwargs, match", [
    (dict(iterations=0), "iterations=0 must be an integer >= 1"),
    (dict(workers=-1), "workers=-1 must be an integer >= 0"),
    (dict(batch_size=1.5), "batch_size=1.5 must be an integer >= 1"),
    (dict(optimizer="lbfgs"), "optimizer='lbfgs' is not supported: choose one of adam, sgd"),
    (dict(schedule="step"), "schedule='step' is not supported: choose one of constant, cosine, poly"),
    (dict(loss="focal"), r"loss='focal' is not supported: choose one of bce, dice, bce\+dice"),
    (dict(lr=0), "lr=0 must be positive"),
    (dict(bn_momentum=1.5), r"bn_momentum=1.5 must be in \(0, 1\]"),
    (dict(freeze_bn=-0.1), r"freeze_bn=-0.1 must be a fraction of the run in \[0, 1\]"),
    (dict(class_balance="yes"), r"class_balance='yes' must be a bool or a number in \[0, 1\]"),
])
def test_settings_are_checked_when_built(kwargs, match):
    with pytest.raises(EmtileError, match=match):
        TrainSettings(train_slices=slice(0, 4), **kwargs)


def test_settings_json_round_trip_and_derived_values():
    s = TrainSettings(train_slices=slice(None, 4), val_slices=[4, 5], iterations=500, batch_norm=True,
                      freeze_bn=0.75, base=8)
    data = json.loads(json.dumps(s.to_json()))
    assert data["train_slices"] == ":4" and data["val_slices"] == [4, 5]
    assert TrainSettings.from_json({**data, "resume": True}) == s  # unknown keys are ignored
    assert s.model_args() == {"base": 8, "depth": 4, "batch_norm": True, "dropout": 0.0}
    assert s.warmup_steps() == 10 and dataclasses.replace(s, warmup=3).warmup_steps() == 3
    assert s.freeze_step() == 375
    assert dataclasses.replace(s, batch_norm=False).freeze_step() is None  # no batch norm
    assert dataclasses.replace(s, batch_norm=None).freeze_step() == 375  # the default: on
    assert dataclasses.replace(s, freeze_bn=1.0).freeze_step() is None


def test_settings_with_an_existing_model():
    config = {"base": 8, "depth": 3, "batch_norm": True, "dropout": 0.5}
    s = TrainSettings(train_slices=0, depth=3).with_model(config)
    assert s.model_args() == config
    with pytest.raises(EmtileError, match=r"base=16 differs from the model given \(base=8\); leave it out"):
        TrainSettings(train_slices=0, base=16).with_model(config, source="the model given")


def test_run_json_records_the_settings_object(small, tmp_path):
    s = TrainSettings(train_slices=slice(0, 4), val_slices=[5], iterations=2, **TINY)
    losses = Losses()
    train(*small, tmp_path / "a", s, progress=False, callbacks=[losses])
    recorded = json.loads((tmp_path / "a" / "run.json").read_text())["settings"]
    assert TrainSettings.from_json(recorded) == dataclasses.replace(s, batch_norm=True)
    # keywords and the object are the same run, bit for bit
    again = Losses()
    train(*small, tmp_path / "b", train_slices=slice(0, 4), val_slices=[5], iterations=2,
          progress=False, callbacks=[again], **TINY)
    assert again.values == losses.values
    # keywords override fields of the object
    train(*small, tmp_path / "c", s, iterations=1, progress=False)
    assert json.loads((tmp_path / "c" / "run.json").read_text())["settings"]["iterations"] == 1


# --------------------------------------------------------------------------- the loop


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return lambda state, *args: object.__getattribute__(self, "calls").append(
                (name, state["iteration"],
                 *(a["iteration"] for a in args if isinstance(a, dict) and "iteration" in a)))
        return object.__getattribute__(self, name)


def tiny_loop(callbacks, *, iterations=3, model=None, start=0, **kwargs):
    model = model or torch.nn.Conv2d(1, 1, 1)
    batches = iter(lambda: {"image": torch.ones(1, 1, 4, 4), "label": torch.ones(1, 1, 4, 4)}, None)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    return fit(model, batches, optimizer=opt, loss_fn=lambda x, y, w: ((x - y) ** 2).mean(),
               lr_at=lambda it: 0.1, start=start, iterations=iterations, device=torch.device("cpu"),
               callbacks=callbacks, **kwargs)


def test_callbacks_see_every_point_of_a_step_in_order():
    rec = Recorder()
    tiny_loop([rec], iterations=2, validate=lambda m: {"val_x": 1.0}, val_every=2)
    assert rec.calls == [
        ("on_start", 0),
        ("on_step_begin", 0, 1), ("on_step", 1, 1), ("on_row", 1, 1),
        ("on_step_begin", 1, 2), ("on_step", 2, 2), ("on_validation", 2), ("on_row", 2, 2),
        ("on_checkpoint", 2),  # after the row: the log holds every step a checkpoint holds
        ("on_end", 2),
    ]


def test_ctrl_c_logs_the_step_then_interrupts():
    rec = Recorder()

    class Stop(Callback):  # Ctrl-C while the checkpoint after step 2 is being saved
        def on_checkpoint(self, state, scores):
            if state["iteration"] == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_loop([rec, Stop()], iterations=5, validate=lambda m: {"val_x": 1.0}, val_every=2)
    assert rec.calls[-3:] == [("on_row", 2, 2), ("on_checkpoint", 2), ("on_interrupt", 2)]

    class StopInValidation(Callback):  # Ctrl-C during the validation of step 2: logged once
        def on_validation(self, state, logs):
            raise KeyboardInterrupt

    rec = Recorder()
    with pytest.raises(KeyboardInterrupt):
        tiny_loop([StopInValidation(), rec], iterations=5, validate=lambda m: {"val_x": 1.0},
                  val_every=2)
    assert rec.calls[-3:] == [("on_step", 2, 2), ("on_row", 2, 2), ("on_interrupt", 2)]


def test_freeze_norm_is_a_callback_on_any_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2), torch.nn.Conv2d(2, 1, 1))
    recomputed = []

    class Watch(Callback):
        def __init__(self):
            self.modes, self.steps = [], []

        def on_step(self, state, logs):
            self.modes.append(model[1].training)
            first = next(model.parameters())
            self.steps.append(int(state["optimizer"].state[first]["step"]))

    watch = Watch()
    freeze = FreezeNorm(2, recompute=lambda m: recomputed.append(torch.is_autocast_enabled("cpu")))
    tiny_loop([freeze, watch], iterations=4, model=model, amp=True)
    assert watch.modes == [True, True, False, False]
    assert recomputed == [True]  # once, under the loop's autocast
    assert watch.steps == [1, 2, 1, 2]  # the optimiser's state starts afresh at the freeze
    # a run resumed after the freeze does not recompute
    recomputed.clear()
    tiny_loop([FreezeNorm(2, recompute=lambda m: recomputed.append(1))], iterations=4, model=model,
              start=3)
    assert recomputed == [] and not model[1].training


# --------------------------------------------------------------------------- train()


def test_train_takes_a_model_it_did_not_build(small, tmp_path):
    first = tmp_path / "first"
    train(*small, first, train_slices=slice(0, 4), iterations=2, progress=False, calibrate=False,
          **dict(TINY, batch_norm=True, dropout=0.25))
    given = load_model(first / "last")
    before = {k: v.clone() for k, v in given.state_dict().items()}
    out = tmp_path / "tuned"
    train(*small, out, train_slices=slice(0, 4), iterations=1, lr=1e-12, progress=False,
          calibrate=False, model=given, **{k: v for k, v in TINY.items() if k != "base"})
    tuned = load_model(out / "last")
    for k, v in tuned.state_dict().items():  # one step of lr 1e-12 from the given weights
        if v.is_floating_point() and "running" not in k:
            torch.testing.assert_close(v, before[k], rtol=0, atol=1e-9)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["base"], settings["batch_norm"], settings["dropout"]) == (4, True, 0.25)
    with pytest.raises(EmtileError, match=r"base=8 differs from the model given \(base=4\)"):
        train(*small, tmp_path / "bad", train_slices=slice(0, 4), iterations=1, model=given,
              **dict(TINY, base=8))
    with pytest.raises(EmtileError, match="model must be an emtile UNet"):
        train(*small, tmp_path / "bad", train_slices=slice(0, 4), iterations=1,
              model=torch.nn.Conv2d(1, 1, 1), **TINY)
    assert not (tmp_path / "bad").exists()


def test_resume_from_last_old_after_a_crash_between_renames(small, tmp_path):
    out = tmp_path / "run"
    kwargs = dict(TINY, train_slices=slice(0, 4), progress=False, calibrate=False, val_every=2,
                  schedule="constant", warmup=0,  # the same learning rates whatever `iterations`
                  batch_norm=False)  # and no freeze, whose step depends on `iterations`
    straight = Losses()
    train(*small, tmp_path / "straight", iterations=4, callbacks=[straight], **kwargs)
    first = Losses()
    train(*small, out, iterations=2, callbacks=[first], **kwargs)
    (out / "last").rename(out / "last.old")  # as if killed between the two renames of a save
    second = Losses()
    train(*small, out, iterations=4, resume=True, callbacks=[second], **kwargs)
    assert first.values + second.values == straight.values
