"""Commands that agree with each other (issue 13, deliverable 4) and errors that point the right
way (deliverable 5): one meaning and one set of values per option in every command; train's
defaults are the documented recipe; malformed tuples refused with the right form; a unit for
voxel sizes; messages that name what the user gave and what they can do."""

import dataclasses

import numpy as np
import pytest
import tifffile
import torch
import zarr
from click.testing import CliRunner

from emtile import EmtileError
from emtile.cli.main import COMMANDS, main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def command(name):
    return main.get_command(None, name)


def option(cmd, name):
    return next(p for p in command(cmd).params if p.name == name)


# --------------------------------------------------------------------------- one meaning each


def test_amp_is_one_option_with_one_set_of_values():
    choices = {cmd: tuple(option(cmd, "amp").type.choices) for cmd in ("predict", "train", "bench")}
    assert set(choices.values()) == {("off", "auto", "bf16", "fp16")}
    assert {cmd: option(cmd, "amp").default for cmd in choices} == {
        "predict": "off", "train": "auto", "bench": "off"}
    assert all(option(cmd, "amp").flag_value == "auto" for cmd in choices)  # --amp alone: auto


def test_amp_values_mean_the_same_everywhere():
    from emtile.device import native_bf16, resolve_amp

    cpu = torch.device("cpu")
    assert [resolve_amp(a, cpu) for a in ("off", None, False, "bf16", "fp16", True)] == [
        None, None, None, "bf16", "fp16", "bf16"]
    assert resolve_amp("auto", cpu) == ("bf16" if native_bf16(cpu) else None)
    with pytest.raises(EmtileError, match="amp='fp8' is not supported: choose one of off, auto, bf16, fp16"):
        resolve_amp("fp8", cpu)
    r = cli("predict", "--model", "m", "in.zarr", "out.zarr", "--amp", "fp8")
    assert r.exit_code == 2 and "'fp8' is not one of 'off', 'auto', 'bf16', 'fp16'" in r.output


@pytest.mark.parametrize("cmd", ["predict", "train", "bench"])
def test_device_takes_cuda_n_in_every_command(cmd):
    param = option(cmd, "device")
    assert param.type.convert("cuda:1", param, None) == "cuda:1"
    assert param.type.convert("auto", param, None) == "auto"
    r = cli(cmd, "--device", "gpu0")
    assert r.exit_code == 2 and "'gpu0' is not a device: choose auto, cpu, cuda or cuda:N" in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_n_reaches_predict_and_is_refused_in_one_line_without_cuda(tmp_path):
    from emtile.unet import UNet, save_model

    save_model(UNet(base=2, depth=2), tmp_path / "m")
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((2, 40, 40), np.uint8))
    r = cli("predict", "--model", tmp_path / "m", tmp_path / "v.tif", tmp_path / "p.zarr",
            "--device", "cuda:1")
    assert r.exit_code == 1
    assert r.output == ("Error: --device cuda:1 was asked for but CUDA is not available here; "
                        "use --device cpu or --device auto\n")
    assert not (tmp_path / "p.zarr").exists()


def test_device_index_beyond_the_devices_is_refused(monkeypatch):
    """With CUDA (simulated: the count of devices is all that is asked), cuda:N must exist."""
    from emtile.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(EmtileError, match=r"device='cuda:2' does not exist: this machine has 2 CUDA "
                                          r"devices \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_progress_is_the_same_switch_in_every_command():
    with_progress = []
    for name in COMMANDS:
        params = {p.name: p for p in command(name).params}
        if "progress" in params:
            with_progress.append(name)
            assert params["progress"].opts == ["--progress"]
            assert params["progress"].secondary_opts == ["--no-progress"]
            assert params["progress"].default is True
        assert "no_progress" not in params, name
    assert set(with_progress) == {"convert", "predict", "train", "evaluate", "segment"}


def test_train_defaults_are_the_documented_recipe():
    import importlib.util
    from pathlib import Path

    from emtile.training.settings import TrainSettings

    spec = importlib.util.spec_from_file_location(
        "train_isbi", Path(__file__).resolve().parents[1] / "examples" / "train_isbi.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    s = TrainSettings(train_slices=slice(0, 25), val_slices=slice(25, 30))
    # the recipe is the defaults, with the precision pinned (so every machine runs the same)
    assert dataclasses.replace(recipe.SETTINGS, amp="auto") == s
    assert (s.model_args(), s.lr, s.class_balance, s.freeze_step(), s.iterations, s.normalize) == (
        {"base": 16, "depth": 4, "batch_norm": True, "dropout": 0.0}, 2e-3, 0.0,
        round(0.7 * 3800), 3800, "percentile:1,99.8")
    # every train option's default is the setting's default (the CLI adds nothing)
    import click

    ctx = click.Context(command("train"))
    for p in command("train").params:
        if p.name in {f.name for f in dataclasses.fields(TrainSettings)} and p.name not in (
                "train_slices", "val_slices", "base", "depth", "batch_norm"):
            given = TrainSettings(train_slices=0, **{p.name: p.get_default(ctx)})
            assert getattr(given, p.name) == getattr(TrainSettings(train_slices=0), p.name), p.name
    text = cli("train", "--help").output
    assert "--base 64" in text and "20000" not in text


# --------------------------------------------------------------------------- tuples and units


def test_malformed_tuples_are_refused_with_the_right_form(tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((2, 16, 16), np.uint8))
    src, out = tmp_path / "v.tif", tmp_path / "o.zarr"
    r = cli("convert", src, out, "--chunks", "1,256")
    assert r.exit_code == 2
    assert "1,256 has 2 values; give 3 (Z,Y,X), e.g. 1,1024,1024" in r.output
    r = cli("convert", src, out, "--voxel-size", "0,4,4")
    assert r.exit_code == 2 and "0,4,4: every value must be positive, e.g. 50,4,4" in r.output
    r = cli("convert", src, out, "--voxel-size", "50,4,x")
    assert r.exit_code == 2 and "50,4,x is not a comma-separated list of numbers: give Z,Y,X, e.g. 50,4,4" in r.output
    assert not out.exists()
    from emtile import convert

    with pytest.raises(EmtileError, match=r"^voxel_size=4,4 has 2 values; give 3 \(Z,Y,X\), e.g. 50,4,4$"):
        convert(src, out, voxel_size=(4, 4), progress=False)
    with pytest.raises(EmtileError, match=r"^chunks=1,256 has 2 values; give 3 \(Z,Y,X\), e.g. 1,1024,1024$"):
        convert(src, out, chunks=(1, 256), progress=False)
    with pytest.raises(EmtileError, match=r"unit='parsec' is not a length unit emtile knows: choose nm, um"):
        convert(src, out, voxel_size=(50, 4, 4), unit="parsec", progress=False)
    assert not out.exists()


def test_voxel_sizes_have_a_unit(tmp_path):
    from emtile.store import voxel_size_nm

    tifffile.imwrite(tmp_path / "v.tif", np.zeros((2, 16, 16), np.uint8))
    r = cli("convert", tmp_path / "v.tif", tmp_path / "um.zarr", "--voxel-size", "0.05,0.004,0.004",
            "--unit", "um", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "voxel size    50 x 4 x 4 nm (z,y,x)" in r.output
    assert voxel_size_nm(tmp_path / "um.zarr") == pytest.approx([50.0, 4.0, 4.0])
    assert cli("convert", tmp_path / "v.tif", tmp_path / "nm.zarr", "--no-progress").exit_code == 0
    assert voxel_size_nm(tmp_path / "nm.zarr") is None  # not given: unknown, not 1 nm
    assert "--unit" in cli("convert", "--help").output


# --------------------------------------------------------------------------- errors


def test_multichannel_inputs_point_to_convert(tmp_path):
    from emtile.unet import UNet, save_model

    rgb = np.zeros((2, 20, 24, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    save_model(UNet(base=2, depth=2), tmp_path / "m")
    hint = (f"emtile works on one channel: convert it first, e.g. emtile convert "
            f"{tmp_path / 'rgb.tif'} one_channel.zarr --channel N (N from 0 to 2)")
    for args in (("info", tmp_path / "rgb.tif"),
                 ("predict", "--model", tmp_path / "m", tmp_path / "rgb.tif", tmp_path / "p.zarr")):
        r = cli(*args)
        assert r.exit_code == 1 and hint in r.output and "pick one with" not in r.output, args


def test_hdf5_with_several_datasets_names_the_path_form(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["raw"] = np.zeros((2, 8, 8), np.uint8)
        f["labels"] = np.zeros((2, 8, 8), np.uint8)
    r = cli("info", tmp_path / "two.h5")
    assert r.exit_code == 1
    assert f"name one as {tmp_path / 'two.h5'}/NAME, e.g. {tmp_path / 'two.h5'}/labels" in r.output
    assert "--dataset" not in r.output


@pytest.fixture
def stores(tmp_path, synthetic_small):
    """raw / labels converted, and a prediction of slices 2:5 (a region) through the CLI."""
    from emtile.unet import UNet, save_model

    raw, labels = synthetic_small
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    assert cli("convert", tmp_path / "raw.tif", tmp_path / "raw.zarr", "--no-progress").exit_code == 0
    assert cli("convert", tmp_path / "labels.tif", tmp_path / "labels.zarr", "--labels",
               "--no-progress").exit_code == 0
    torch.manual_seed(0)
    save_model(UNet(base=4, depth=2), tmp_path / "m")
    for name, roi in (("full.zarr", None), ("roi.zarr", "2:5,:,:")):
        args = ["predict", "--model", tmp_path / "m", tmp_path / "raw.zarr", tmp_path / name,
                "--tile", "68", "--no-progress"] + (["--roi", roi] if roi else [])
        assert cli(*args).exit_code == 0
    return tmp_path


def test_a_missing_labels_volume_is_called_labels(stores):
    r = cli("evaluate", stores / "full.zarr", stores / "nope.zarr")
    assert r.exit_code == 1 and r.output == f"Error: labels {str(stores / 'nope.zarr')!r} does not exist\n"
    r = cli("show", stores / "raw.zarr", "--labels", stores / "nope.zarr", "-o", stores / "f.png")
    assert r.exit_code == 1 and r.output == f"Error: labels {str(stores / 'nope.zarr')!r} does not exist\n"


def test_swapped_or_wrong_volumes_are_named(stores):
    d = stores
    r = cli("evaluate", d / "labels.zarr", d / "full.zarr")
    assert r.exit_code == 1 and r.output.startswith("Error: pred and labels are swapped: ")
    r = cli("evaluate", d / "raw.zarr", d / "labels.zarr")
    assert r.exit_code == 1 and (f"pred {str(d / 'raw.zarr')!r} is an image volume (its store says "
                                 f"kind 'image'), not a prediction") in r.output
    r = cli("evaluate", d / "full.zarr", d / "raw.zarr")
    assert r.exit_code == 1 and "is an image volume (its store says kind 'image'), not labels" in r.output
    r = cli("show", d / "raw.zarr", "--pred", d / "labels.zarr", "--labels", d / "full.zarr",
            "-o", d / "f.png")
    assert r.exit_code == 1 and "pred and labels are swapped" in r.output
    # a predicted mask is a fine PRED
    assert cli("predict", "--model", d / "m", d / "raw.zarr", d / "t.zarr", "--tile", "68",
               "--threshold", "0.5", "--no-progress").exit_code == 0
    assert cli("evaluate", d / "t.zarr/labels/mask", d / "labels.zarr", "--no-progress").exit_code == 0


def test_a_region_prediction_is_scored_against_full_labels(stores):
    from emtile.evaluation import evaluate

    d = stores
    part = evaluate(str(d / "roi.zarr"), str(d / "labels.zarr"), sweep=True, progress=False)
    whole = evaluate(str(d / "full.zarr"), str(d / "labels.zarr"), slices=slice(2, 5), sweep=True,
                     progress=False)
    assert [r["z"] for r in part["slices"]] == [2, 3, 4] and part["settings"]["offset"] == [2, 0, 0]
    for a, b in zip(part["slices"], whole["slices"]):
        assert (a["z"], a["v_rand"], a["pixel_error"]) == (b["z"], b["v_rand"], b["pixel_error"])
    assert part["sweep"]["v_rand"] == whole["sweep"]["v_rand"]
    assert [r["z"] for r in evaluate(str(d / "roi.zarr"), str(d / "labels.zarr"), slices=[3],
                                     progress=False)["slices"]] == [3]
    with pytest.raises(EmtileError, match=r"slices=1 are outside the prediction, which covers "
                                          r"slices 2:5 of the labels"):
        evaluate(str(d / "roi.zarr"), str(d / "labels.zarr"), slices=[1, 3], progress=False)
    r = cli("show", d / "raw.zarr", "--pred", d / "roi.zarr", "--labels", d / "labels.zarr",
            "--slices", "3", "-o", d / "roi.png")
    assert r.exit_code == 0, r.output
    # a smaller prediction that records no offset is still refused, saying why
    z = zarr.create_array(str(d / "plain.zarr"), shape=(3, 96, 96), dtype="uint8")
    z[:] = 0
    with pytest.raises(EmtileError, match="they must match \\(a prediction of a region, predict's "
                                          "roi=, records where it lies; this one records nothing\\)"):
        evaluate(str(d / "plain.zarr"), str(d / "labels.zarr"), progress=False)
