"""``emtile bench`` and its helpers (no timing is asserted: benchmarks are never timed tests)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from emtile.bench import mirrored_volume, model_flops, tiles_volume_shape
from emtile.cli.main import main
from emtile.unet import UNet
from emtile.volume import open_volume

TINY = ["bench", "--base", "2", "--depth", "2", "--tile", "92", "--tiles", "4", "--device", "cpu",
        "--no-channels-last", "--workers", "0"]


def test_bench_prints_every_figure():
    result = CliRunner().invoke(main, TINY)
    assert result.exit_code == 0, result.output
    out = result.output
    for field in ("UNet base 2 depth 2, tile 92 -> 52", "GFLOP per tile", "cpu (", "batch 1",
                  "contiguous", "fp32", "1x104x104 (4 tiles, 4 per slice; predict ran 4)",
                  "model alone", "predict", "Mvox/s", "GFLOP/s", "predict / model alone:",
                  "output voxels/s:", "peak RSS:"):
        assert field in out, f"{field!r} missing from:\n{out}"


def test_bench_json(tmp_path, isbi_dir):
    args = TINY + ["--tiles", "2", "--repeat", "2", "--data", str(isbi_dir / "train-volume.tif"),
                   "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["tiles"] == r["predict_tile_runs"] == 2
    assert r["volume_shape"] == [1, 52, 104]  # 1x2 tiles: output 52 = stride (a multiple of 4)
    assert len(r["model_times"]) == len(r["predict_times"]) == 2
    assert r["model_s"] == min(r["model_times"]) > 0 and r["predict_s"] > 0
    assert r["ratio"] == pytest.approx(r["predict_s"] / r["model_s"])
    rounds = sorted(p / m for p, m in zip(r["predict_times"], r["model_times"]))
    assert r["ratio_rounds"] == pytest.approx((rounds[0] + rounds[1]) / 2)
    assert r["out_voxels"] == 2 * 52 * 52
    assert r["peak_rss"] > 0 and r["cuda_peak"] is None
    assert r["data"].endswith("train-volume.tif")


def test_bench_rejects_an_invalid_tile():
    result = CliRunner().invoke(main, ["bench", "--base", "2", "--depth", "2", "--tile", "90",
                                       "--device", "cpu"])
    assert result.exit_code == 1
    assert "Error: --tile 90 is not valid for depth 2: nearest valid sizes are" in result.output


def test_every_bench_option_reaches_the_figures(tmp_path):
    """Each `emtile bench` option, set away from its default, shows in the JSON it prints."""
    import tifffile

    from emtile.cli.bench import bench as command

    tifffile.imwrite(tmp_path / "src.tif", np.arange(2 * 30 * 40, dtype=np.uint8).reshape(2, 30, 40))
    args = ["bench", "--base", "3", "--depth", "2", "--tile", "92", "--batch-size", "2",
            "--device", "cpu", "--tiles", "2", "--no-channels-last", "--amp", "bf16", "--workers", "0",
            "--repeat", "2", "--data", str(tmp_path / "src.tif"), "--seed", "4", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert (r["base"], r["depth"], r["tile"], r["batch_size"], r["device"], r["tiles"]) == (3, 2, 92, 2, "cpu", 2)
    assert (r["channels_last"], r["amp"], r["num_workers"], r["repeat"]) == (False, "bf16", 0, 2)
    assert r["data"] == str(tmp_path / "src.tif") and r["seed"] == 4 and len(r["model_times"]) == 2
    assert r["gflop_per_tile"] == pytest.approx(model_flops(UNet(base=3, depth=2), torch.zeros(1, 1, 92, 92))[0] / 1e9)
    assert {p.name for p in command.params} == {"base", "depth", "tile", "batch_size", "device",
                                                 "tiles", "channels_last", "amp", "num_workers",
                                                 "repeat", "data", "seed", "as_json"}


def test_model_flops_by_hand():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ConvTranspose2d(2, 1, 2, stride=2))
    flops, out = model_flops(net, torch.zeros(1, 1, 5, 5))
    # conv: 2x3x3 outputs, each 1 channel x 9 taps; transposed: 2x3x3 inputs, each to 1 x 4 taps
    assert flops == 2 * (18 * 9) + 2 * (18 * 4)
    assert out.shape == (1, 1, 6, 6)


def test_model_flops_of_the_paper_unet():
    """The paper's U-Net (base 64) at 572: about 301 GFLOP, batch-independent per tile."""
    net = UNet(base=64, depth=4).to("meta")
    flops, out = model_flops(net, torch.empty(1, 1, 572, 572, device="meta"))
    assert out.shape == (1, 1, 388, 388)
    assert flops == pytest.approx(300.8e9, rel=1e-3)


def test_tiles_volume_shape():
    net = UNet(base=2, depth=4)
    assert tiles_volume_shape(net, 572, 8) == (2, 388 + 384, 388 + 384)
    assert tiles_volume_shape(net, 572, 6) == (3, 388, 388 + 384)
    assert tiles_volume_shape(net, 572, 3) == (3, 388, 388)


def test_mirrored_volume_reflects_the_source(tmp_path):
    src = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    mirrored_volume(tmp_path / "v.zarr", (7, 9, 6), source=src)
    got = open_volume(tmp_path / "v.zarr")[:]
    want = np.pad(src, ((0, 4), (0, 5), (0, 1)), mode="reflect")
    np.testing.assert_array_equal(got, want)


def test_mirrored_volume_from_isbi_and_random(tmp_path, isbi_dir):
    mirrored_volume(tmp_path / "isbi.zarr", (31, 600, 520), source=isbi_dir / "train-volume.tif")
    v = open_volume(tmp_path / "isbi.zarr")
    raw = open_volume(isbi_dir / "train-volume.tif")
    np.testing.assert_array_equal(v[30, :512, :512], raw[28])  # slice 30 mirrors slice 28
    np.testing.assert_array_equal(v[0, 512:, 512:], raw[0][510:422:-1, 510:502:-1])
    mirrored_volume(tmp_path / "rand.zarr", (2, 40, 300))
    r = open_volume(tmp_path / "rand.zarr")[:]
    assert r.dtype == np.uint8 and r.std() > 10


def test_mirrored_volume_rejects_a_bad_shape(tmp_path):
    from emtile import EmtileError

    with pytest.raises(EmtileError, match=r"shape=\(5, 5\) must be \(Z, Y, X\)"):
        mirrored_volume(tmp_path / "v.zarr", (5, 5))
