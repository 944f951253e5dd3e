"""``emtile bench`` and its helpers (no timing is asserted: benchmarks are never timed tests)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from emtile.bench import mirrored_volume, model_flops, tile_counts, tiles_volume_shape
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
                  "output voxels/s:", "peak RSS:", "inside predict: the forward passes",
                  "of the model alone (median)"):
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
    # the forward passes timed inside each predict: part of it, the rest is outside
    assert len(r["forward_times"]) == 2
    assert all(0 < f < p for f, p in zip(r["forward_times"], r["predict_times"]))
    outside = sorted(p - f for p, f in zip(r["predict_times"], r["forward_times"]))
    assert r["outside_s"] == pytest.approx((outside[0] + outside[1]) / 2)
    assert r["outside_ratio"] == pytest.approx(r["outside_s"] / r["model_s"])
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
                                                 "repeat", "data", "seed", "pipeline",
                                                 "shape", "as_json", "ndim", "factors",
                                                 "voxel_size", "out_channels"}


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


# --------------------------------------------------------------------------- --pipeline


def test_null_unet_crops_to_the_valid_output():
    from emtile.bench_pipeline import NullUNet

    net = NullUNet(depth=2)
    assert net.shape_map.halo == UNet(base=8, depth=2).shape_map.halo == 20
    x = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16).repeat(1, 1, 4, 4)
    x = x[..., :60, :60] / 255  # every uint8 value, scaled as predict scales it
    y = torch.sigmoid(net(x))
    assert y.shape == (1, 1, 20, 20)
    np.testing.assert_array_equal(np.rint(y.numpy() * 255),
                                  np.rint(x[..., 20:40, 20:40].numpy() * 255))
    with pytest.raises(Exception, match="not valid for depth 2"):
        net(torch.zeros(1, 1, 61, 61))


@pytest.mark.parametrize("blend", ["linear", "none"])
def test_null_model_prediction_equals_the_input(tmp_path, blend):
    """Through emtile.predict (mirrored borders, a shape no tile divides, every uint8 value):
    the written uint8 probabilities are the input itself."""
    import emtile
    from emtile.bench_pipeline import NullUNet

    vol = np.random.default_rng(1).integers(0, 256, (2, 101, 75), dtype=np.uint8)
    vol[0, :16, :16] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    mirrored_volume(tmp_path / "v.zarr", vol.shape, source=vol)  # the same shape: a copy
    emtile.predict(NullUNet(depth=2), tmp_path / "v.zarr", tmp_path / "p.zarr", tile=60,
                   blend=blend, device="cpu", progress=False, num_workers=0)
    np.testing.assert_array_equal(open_volume(tmp_path / "p.zarr")[:], vol)


def test_timed_parts_are_exclusive_and_removed():
    """Nested timed functions: each part gets its own time only; the wrappers go away after."""
    import time

    from emtile import geometry, predictor
    from emtile.bench_pipeline import _Parts

    parts = _Parts()
    inner = parts.wrap("read_decode", lambda: time.sleep(0.05))
    outer = parts.wrap("tiles", lambda: (time.sleep(0.03), inner()))
    outer()
    t = parts.totals()
    assert 0.05 <= t["read_decode"] < 0.09 and 0.03 <= t["tiles"] < 0.07
    assert t["model"] == t["write"] == 0

    from emtile.bench_pipeline import timed_parts

    from emtile import tile_reader

    before = (geometry.read_window, predictor._Forward.__call__, tile_reader.apply_inplace)
    with timed_parts():
        assert geometry.read_window is not before[0]
        assert hasattr(geometry.read_window, "__wrapped__")
    assert (geometry.read_window, predictor._Forward.__call__, tile_reader.apply_inplace) == before


def test_bench_pipeline_json(isbi_dir):
    """`emtile bench --pipeline --json`: the keys, the output equal to the input, the parts
    about the whole run (the data path is most of it on a volume of 2 Mvoxel)."""
    from emtile.bench_pipeline import PARTS

    args = ["bench", "--pipeline", "--depth", "2", "--tile", "188", "--shape", "8,512,512",
            "--device", "cpu", "--workers", "0", "--data", str(isbi_dir / "train-volume.tif"),
            "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["output_equals_input"] is True
    assert r["volume_shape"] == [8, 512, 512] and r["out_voxels"] == 8 * 512 * 512
    assert r["pipeline_mvox_per_s"] == pytest.approx(r["out_voxels"] / r["wall_s"] / 1e6)
    assert r["mvox_per_s_per_core"] == pytest.approx(r["pipeline_mvox_per_s"] / r["cores"])
    assert set(r["parts"]) == set(PARTS) and all(v > 0 for v in r["parts"].values())
    assert r["other_s"] == pytest.approx(r["wall_s"] - sum(r["parts"].values()))
    assert 0.5 * r["wall_s"] < sum(r["parts"].values()) < 2.0 * r["wall_s"]


def test_bench_pipeline_table_and_tiles():
    result = CliRunner().invoke(main, TINY + ["--pipeline"])
    assert result.exit_code == 0, result.output
    for field in ("null U-Net, depth 2, tile 92", "1x104x104 uint8", "Mvoxel/s", "per core",
                  "output equals input: yes", "read and decode", "normalise",
                  "tile assembly and mirroring", "model (null) and transfers", "stitch",
                  "encode and write", "other (wall - parts)"):
        assert field in result.output, f"{field!r} missing from:\n{result.output}"


def test_shape_only_with_pipeline():
    result = CliRunner().invoke(main, TINY + ["--shape", "2,64,64"])
    assert result.exit_code == 1
    assert "Error: --shape 2,64,64 only applies with --pipeline" in result.output


def test_pipeline_parts_come_back_from_reader_processes():
    """With DataLoader workers (CUDA's default), reading happens in other processes: their
    seconds come back through shared memory."""
    from emtile.bench_pipeline import run_pipeline

    r = run_pipeline(depth=2, tile=188, shape=(4, 256, 256), device="cpu", num_workers=1)
    assert r["output_equals_input"] and r["num_workers"] == 1
    assert r["parts"]["read_decode"] > 0 and r["parts"]["normalize"] > 0 and r["parts"]["tiles"] > 0


# --------------------------------------------------------------------------- 3-D


TINY_3D = ["bench", "--ndim", "3", "--base", "2", "--depth", "2", "--device", "cpu",
           "--no-channels-last", "--workers", "0"]


def test_tile_counts():
    assert [tile_counts(n) for n in (1, 2, 3, 4, 6, 8, 12)] == [
        (1, 1, 1), (1, 1, 2), (1, 1, 3), (1, 2, 2), (1, 2, 3), (2, 2, 2), (2, 2, 3)]


def test_tiles_volume_shape_3d_holds_exactly_the_tiles():
    from emtile.geometry import default_factors, tile_grid

    net = UNet(ndim=3, base=2, depth=2, factors=((1, 2, 2), (2, 2, 2)))
    tile = (20, 52, 60)  # output (4, 12, 20), also the stride (no overlap; z kernels 1 at level 0)
    out = net.output_size(tile)
    assert out == (4, 12, 20)
    for n in (1, 2, 4, 8, 6):
        shape = tiles_volume_shape(net, tile, n)
        g = tile_grid(shape, net, tile)
        assert g.n_tiles == n and g.counts == tile_counts(n)
        # the last tile ends at the volume's end: no tile sticks out, none is missing
        assert all(o + (c - 1) * s == v for o, c, s, v in zip(g.out_tile, g.counts, g.stride, shape))
    assert tiles_volume_shape(net, tile, 8) == (2 * 4, 2 * 12, 2 * 20)
    cube = UNet(ndim=3, base=2, depth=2, factors=default_factors((10, 10, 10), 2))
    assert tiles_volume_shape(cube, 52, 2) == (12, 12, 12 + 12)


def test_bench_3d_json():
    args = TINY_3D + ["--tile", "20,52,60", "--factors", "1,2,2;2,2,2", "--tiles", "2",
                      "--out-channels", "5", "--repeat", "2", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["ndim"] == 3 and r["factors"] == [[1, 2, 2], [2, 2, 2]] and r["out_channels"] == 5
    assert r["tile"] == [20, 52, 60] and r["out_tile"] == [4, 12, 20]
    assert r["tile_counts"] == [1, 1, 2] and r["volume_shape"] == [4, 12, 2 * 20]
    assert r["tiles"] == r["predict_tile_runs"] == 2 and r["out_voxels"] == 2 * 4 * 12 * 20
    assert r["voxel_size"] is None  # factors given, not derived from a voxel size
    assert r["ratio"] == pytest.approx(r["predict_s"] / r["model_s"])
    assert len(r["predict_times"]) == 2 and r["model_s"] == min(r["model_times"]) > 0
    net = UNet(ndim=3, base=2, depth=2, factors=((1, 2, 2), (2, 2, 2)), out_channels=5)
    assert r["gflop_per_tile"] == pytest.approx(model_flops(net, torch.zeros(1, 1, 20, 52, 60))[0] / 1e9)
    assert r["model_gflops"] == pytest.approx(r["gflop_per_tile"] * 2 / r["model_s"])


def test_bench_3d_default_factors_and_table():
    """One size is a cube; the factors follow --voxel-size; the table names the 3-D net."""
    result = CliRunner().invoke(main, TINY_3D + ["--tile", "52", "--tiles", "1", "--voxel-size",
                                                 "40,10,10"])
    assert result.exit_code == 0, result.output
    for field in ("3-D UNet base 2 depth 2 factors 1,2,2;2,2,2, 1 channel, tile 52x52x52",
                  "tile 52x52x52 -> 36x12x12", "36x12x12 (1 tiles, 1x1x1 (z x y x x); predict ran 1)", "predict / model alone:"):
        assert field in result.output, f"{field!r} missing from:\n{result.output}"


@pytest.mark.parametrize("args, message", [
    (["--tile", "52,53,52"], "Error: --tile 52,53,52 is not valid: 53 along y for depth 2"),
    (["--tile", "52,52"], "Error: --tile 52,52 has 2 values; expected 1 or 3"),
    (["--factors", "2,2;2,2,2"], "Error: --factors"),
])
def test_bench_3d_rejects_bad_tiles_in_one_line(args, message):
    result = CliRunner().invoke(main, TINY_3D + args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(message) and result.output.count("\n") == 1, result.output


def test_3d_options_only_with_ndim_3():
    result = CliRunner().invoke(main, TINY + ["--factors", "2,2,2"])
    assert result.exit_code == 1
    assert result.output == "Error: --factors 2,2,2 only applies with --ndim 3\n"
    result = CliRunner().invoke(main, TINY_3D + ["--pipeline"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: --pipeline times the 2-D path only")
