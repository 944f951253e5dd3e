"""``examples/large_volume/run.py`` end to end on a tiny volume: the real commands in child
processes, their table (JSON and text), complete and valid OME-Zarr stores, the ratio between
sizes, and a failing step reported with its log."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from emtile import store
from emtile.geometry import reflect_index

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "large_volume" / "run.py"
ROW_KEYS = {"step", "gb", "seconds", "s_per_gb", "peak_rss_mb", "tree_rss_mb", "output", "disk_mb"}


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True)


def validate(path, kind):
    from ome_zarr_models import open_ome_zarr

    node = open_ome_zarr(zarr.open_group(path, mode="r"))
    assert isinstance(node, kind), f"{path} is a {type(node).__name__}, expected {kind.__name__}"
    return node


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("large_volume_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_step_on_a_tiny_volume(isbi_dir, isbi_raw, tmp_path):
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    out = tmp_path / "out"
    # no --model: a tiny one is trained first, on the ISBI data, by emtile train
    done = run("--size-gb", 0.002, "--side", 600, "--out", out, "--data", isbi_dir,
               "--train-iterations", 2, "--base", 2, "--levels", 2, "--cluster-workers", 2)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["model"]["step"] == "model" and result["model"]["seconds"] > 0
    (r,) = result["runs"]
    assert r["shape"] == [6, 600, 600] and r["gb"] == pytest.approx(6 * 600 * 600 / 1e9)
    assert [row["step"] for row in r["steps"]] == ["build", "convert", "predict", "cluster",
                                                   "segment"]
    for row in r["steps"]:
        assert set(row) == ROW_KEYS
        assert row["seconds"] > 0  # both rounded to 0.01: compare to that
        assert row["s_per_gb"] == pytest.approx(row["seconds"] / r["gb"], abs=0.006 / r["gb"])
        assert 10 < row["peak_rss_mb"] <= row["tree_rss_mb"] < 64_000
        assert row["disk_mb"] > 0 or row["step"] not in ("build", "convert")
    assert json.loads((out / "0.002gb" / "results.json").read_text()) == r
    cluster = next(row for row in r["steps"] if row["step"] == "cluster")
    assert cluster["tree_rss_mb"] > cluster["peak_rss_mb"]  # the workers are counted together
    for name in ("build", "predict", "cluster", "segment"):
        assert f"\n{name} " in done.stdout  # the table's rows

    folder = out / "0.002gb"
    stack = tifffile.imread(folder / "stack.tif")
    expected = isbi_raw[:6][:, reflect_index(np.arange(600), 512)][:, :, reflect_index(
        np.arange(600), 512)]
    np.testing.assert_array_equal(stack, expected)  # ISBI slices mirrored in y and x
    for name in ("vol.zarr", "pred.zarr", "pred-cluster.zarr", "seg.zarr"):
        assert store.is_complete(folder / name), name
        assert list(store.voxel_size_nm(folder / name)) == [50, 4, 4], name
    np.testing.assert_array_equal(zarr.open_array(folder / "vol.zarr" / "0")[:], stack)
    for name, kind in (("vol.zarr", Image), ("pred.zarr", Image), ("pred-cluster.zarr", Image),
                       ("seg.zarr", ImageLabel)):
        node = validate(folder / name, kind)
        assert len(node.attributes.ome.multiscales[0].datasets) == 2, name
    assert zarr.open_array(folder / "pred.zarr" / "0").shape == (6, 600, 600)
    assert zarr.open_array(folder / "pred-cluster.zarr" / "0").shape == (6, 600, 600)
    assert zarr.open_array(folder / "seg.zarr" / "0").shape == (6, 600, 600)


def test_memory_ratio_between_two_sizes(isbi_dir, tmp_path):
    out = tmp_path / "out"
    done = run("--size-gb", 0.001, 0.002, "--side", 400, "--out", out, "--data", isbi_dir,
               "--steps", "build,convert", "--levels", 1, "--cleanup")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "results.json").read_text())
    assert [r["shape"][0] for r in result["runs"]] == [6, 12]
    assert result["model"] is None  # nothing to predict: no model trained
    assert not (out / "0.001gb").exists() and not (out / "0.002gb").exists()  # --cleanup
    ratios = result["rss_ratios"]
    assert set(ratios) == {"build", "convert"}
    small, large = ({row["step"]: row for row in r["steps"]} for r in result["runs"])
    assert ratios["convert"]["peak"] == pytest.approx(
        large["convert"]["peak_rss_mb"] / small["convert"]["peak_rss_mb"])
    assert "peak RSS, 0.002 GB / 0.001 GB" in done.stdout  # 12 and 6 slices of 400 x 400

    # the same table from the JSON, run nothing
    again = run("--compare", out / "results.json")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() and again.stdout.strip() in done.stdout


def test_a_failing_step_stops_the_run_with_its_log(isbi_dir, tmp_path):
    import torch

    from emtile.unet import UNet, save_model

    torch.manual_seed(0)
    save_model(UNet(base=2, depth=2), tmp_path / "model")
    out = tmp_path / "out"
    done = run("--size-gb", 0.0005, "--side", 256, "--out", out, "--data", isbi_dir,
               "--model", tmp_path / "model", "--tile", 570, "--steps", "build,convert,predict")
    assert done.returncode == 1
    assert "step predict failed (exit 1)" in done.stderr
    assert "--tile 570 is not valid" in done.stderr  # the command's own line, from its log
    assert (out / "0.0005gb" / "predict.log").exists()
    assert not (out / "results.json").exists()  # no table that looks complete


def test_bad_arguments(script, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--steps", "convert,predcit"])
    assert e.value.code == 2 and "unknown predcit" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a model folder"):
        script.main(["--out", str(tmp_path), "--model", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit) as e:
        script.main(["--size-gb", "0"])
    assert e.value.code == 2


def test_volume_shape(script):
    assert script.volume_shape(4, 2048) == (954, 2048, 2048)  # 4e9 / 2048^2 = 953.7
    assert script.volume_shape(0.5, 2048) == (119, 2048, 2048)
    assert script.volume_shape(1e-9, 64) == (1, 64, 64)
