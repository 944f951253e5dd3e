"""``emtile predict`` through click's CliRunner."""

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import emtile
from emtile.cli.main import main
from emtile.store import is_complete
from emtile.unet import UNet, save_model


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model_and_volume(tmp_path):
    torch.manual_seed(0)
    save_model(UNet(base=2, depth=2), tmp_path / "model")
    vol = zarr.create_array(tmp_path / "vol.zarr", shape=(2, 70, 61), chunks=(1, 64, 64),
                            dtype="uint8", zarr_format=3)
    vol[:] = np.random.default_rng(0).integers(0, 256, vol.shape, dtype=np.uint8)
    return tmp_path / "model", tmp_path / "vol.zarr"


def test_help_works():
    """(That every option exists and defaults to its settings field: tests/test_blockwise.py.)"""
    assert run_cli("predict", "--help").exit_code == 0
    assert "predict" in run_cli("--help").output


def test_small_run_writes_a_complete_store(tmp_path, model_and_volume):
    model, vol = model_and_volume
    out = tmp_path / "pred.zarr"
    result = run_cli("predict", "--model", model, "--tile", "64", "--threshold", "0.5",
                     "--roi", "0:2,5:70,:", "--workers", "0", "--no-progress", vol, out)
    assert result.exit_code == 0, result.output
    assert "tile 64x64 -> 24x24 (stride 24x24)" in result.output and "efficiency" in result.output
    assert is_complete(out)
    assert emtile.open_volume(out).shape == (2, 65, 61)
    assert emtile.open_volume(out / "labels" / "mask").dtype == np.uint8


def test_an_interrupted_run_with_other_settings_starts_over_and_says_why(tmp_path,
                                                                          model_and_volume):
    """Resuming needs the interrupted run's settings (its fingerprint); with another one (here
    --threads, which can change torch's rounding) every block is computed again, and one
    Warning line names what differs."""
    model, vol = model_and_volume
    out = tmp_path / "pred.zarr"
    args = ["predict", "--model", model, "--tile", "64", "--workers", "0", "--no-progress", vol,
            out]
    assert run_cli(*args, "--threads", "1").exit_code == 0
    group = zarr.open_group(out, mode="r+")
    group.attrs["emtile"] = {**group.attrs["emtile"], "complete": False}  # as if killed
    group["emtile_blocks"][1:] = 0
    result = run_cli(*args, "--threads", "2")
    assert result.exit_code == 0, result.output
    assert "resumed" not in result.output and is_complete(out)
    warning = result.stderr.strip()
    assert warning.count("\n") == 0, warning
    assert warning.startswith(f"Warning: output '{out}' holds an interrupted run with other "
                              f"settings (threads 1 -> 2): starting over"), warning
    again = run_cli(*args, "--threads", "2")  # a complete output: refused as before
    assert again.exit_code == 1 and "already exists" in again.output


def test_auto_tile_prints_its_choice_and_efficiency(tmp_path, model_and_volume):
    model, vol = model_and_volume
    result = run_cli("predict", "--model", model, "--tile", "auto", "--no-progress", vol,
                     tmp_path / "p.zarr")
    assert result.exit_code == 0, result.output
    assert "tile 112x112 -> 72x72" in result.output  # one tile per slice: output 72 >= 70
    assert "efficiency" in result.output


@pytest.mark.parametrize("args, message", [
    (("--tile", "66"), "Error: --tile 66 is not valid for depth 2: nearest valid sizes are 64 and 68"),
    (("--tile", "abc"), "'abc' is not a tile size"),
    (("--roi", "0:2,0:99,0:10"), "Error: --roi 0:2,0:99,0:10 is outside the volume"),
    (("--model", "nowhere"), "Error: model folder 'nowhere' does not exist"),
])
def test_user_errors_are_one_line(tmp_path, model_and_volume, args, message):
    model, vol = model_and_volume
    base = ["predict", "--model", model, "--no-progress"]
    result = run_cli(*base, *args, vol, tmp_path / "p.zarr")
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_existing_output_needs_overwrite(tmp_path, model_and_volume):
    model, vol = model_and_volume
    out = tmp_path / "p.zarr"
    args = ["predict", "--model", model, "--tile", "64", "--no-progress", vol, out]
    assert run_cli(*args).exit_code == 0
    result = run_cli(*args)
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output
    assert run_cli(*args, "--overwrite").exit_code == 0
