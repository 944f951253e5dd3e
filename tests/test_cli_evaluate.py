"""`emtile evaluate`: table, JSON and CSV output, exit codes."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from emtile import EmtileError
from emtile.cli.main import main
from emtile.evaluation import evaluate


@pytest.fixture
def files(tmp_path, isbi_labels):
    import tifffile
    import zarr
    from scipy import ndimage

    labels = isbi_labels[:4, :96, :96]
    pred = ndimage.gaussian_filter((labels > 0).astype(np.float32), (0, 1.5, 1.5))
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    z = zarr.create_array(str(tmp_path / "pred.zarr"), shape=pred.shape, dtype="float32",
                          chunks=(1, 96, 96))
    z[:] = pred
    return tmp_path, pred, labels


def test_table_json_csv(files):
    d, pred, labels = files
    res = CliRunner().invoke(main, [
        "evaluate", str(d / "pred.zarr"), str(d / "labels.tif"), "--slices", "1:4",
        "--json", str(d / "s.json"), "--csv", str(d / "s.csv"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "V-Rand" in res.output and "mean" in res.output
    assert "membrane (0)" in res.output  # the classification report
    data = json.loads((d / "s.json").read_text())
    direct = evaluate(pred, labels, slices=slice(1, 4), progress=False)
    assert data["mean"] == pytest.approx(direct["mean"])
    assert [r["z"] for r in data["slices"]] == [1, 2, 3]
    assert data["settings"]["threshold"] == 0.5 and data["settings"]["slices"] == [1, 2, 3]
    assert data["pixel"]["confusion_matrix"] == direct["pixel"]["confusion_matrix"]
    rows = list(csv.reader((d / "s.csv").open()))
    assert rows[0][0] == "# emtile evaluate" and "threshold=0.5" in rows[0]
    header = rows[1]
    kinds = [r[0] for r in rows[2:]]
    assert kinds == ["slice"] * 3 + ["mean", "pixel"]
    mean_row = dict(zip(header, rows[5]))
    assert float(mean_row["v_rand"]) == pytest.approx(direct["mean"]["v_rand"], abs=1e-12)
    for line in res.output.splitlines():
        if line.strip().startswith("mean"):
            assert f"{direct['mean']['v_rand']:.4f}" in line


def test_sweep_and_invert(files):
    d, pred, labels = files
    import tifffile

    tifffile.imwrite(d / "inv.tif", (1 - pred).astype(np.float32), photometric="minisblack")
    res = CliRunner().invoke(main, ["evaluate", str(d / "inv.tif"), str(d / "labels.tif"),
                                    "--invert", "--sweep", "--slices", "0,2", "--no-progress",
                                    "--json", str(d / "w.json")])
    assert res.exit_code == 0, res.output
    assert "threshold sweep" in res.output and "best V-Rand" in res.output
    data = json.loads((d / "w.json").read_text())
    assert data["settings"]["invert"] is True and data["settings"]["sweep"] is True
    assert len(data["sweep"]["v_rand"]) == 11
    assert len(data["slices"][0]["sweep_v_rand"]) == 11


def test_user_errors_exit_1(files):
    d, pred, labels = files
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", str(d / "pred.zarr"), str(d / "labels.tif"),
                               "--slices", "25:30", "--no-progress"])
    assert res.exit_code == 1 and "Error:" in res.output and "outside the volume" in res.output
    import tifffile

    tifffile.imwrite(d / "small.tif", labels[:, :50], photometric="minisblack")
    res = runner.invoke(main, ["evaluate", str(d / "pred.zarr"), str(d / "small.tif"), "--no-progress"])
    assert res.exit_code == 1 and "pred.zarr" in res.output and "small.tif" in res.output
    res = runner.invoke(main, ["evaluate", str(d / "pred.zarr"), str(d / "labels.tif"),
                               "--threshold", "2"])
    assert res.exit_code == 2
    assert runner.invoke(main, ["evaluate", "--help"]).exit_code == 0


@pytest.mark.parametrize("option, keyword", [("--json", "json_path"), ("--csv", "csv_path")])
def test_files_that_cannot_be_written_are_refused_before_any_work(files, monkeypatch, option,
                                                                   keyword):
    """`--json missing_dir/s.json` used to score every slice and then die with a traceback."""
    import emtile.evaluation

    d, pred, labels = files

    def no_reading(*args, **kwargs):
        raise AssertionError("the inputs were opened before the output files were checked")

    monkeypatch.setattr(emtile.evaluation, "open_stack", no_reading)
    args = ["evaluate", str(d / "pred.zarr"), str(d / "labels.tif"), "--no-progress"]
    # the library names the keyword (json_path=...); the CLI root names the flag
    cases = {str(d / "missing_dir" / "s.out"): f"{option} '{d / 'missing_dir' / 's.out'}': its "
                                               f"folder '{d / 'missing_dir'}' does not exist",
             str(d / "pred.zarr" / "s.out"): f"{option} '{d / 'pred.zarr' / 's.out'}' lies "
                                             f"inside the input '{d / 'pred.zarr'}'"}
    for path, message in cases.items():
        res = CliRunner().invoke(main, [*args, option, path])
        assert res.exit_code == 1, res.output
        assert res.output.strip() == res.output.strip().splitlines()[0]  # one line
        assert res.output.startswith(f"Error: {message}"), res.output
    assert not (d / "pred.zarr" / "s.out").exists()
    with pytest.raises(EmtileError, match="json_path=.* lies inside the input"):
        evaluate(str(d / "pred.zarr"), str(d / "labels.tif"),
                 json_path=d / "pred.zarr" / "zarr.json")
    (d / "folder").mkdir()
    with pytest.raises(EmtileError, match="csv_path=.* is an existing folder"):
        evaluate(str(d / "pred.zarr"), str(d / "labels.tif"), csv_path=d / "folder")


# --------------------------------------------------------------------------- other tools' maps


def _json_of(d, name, *args):
    res = CliRunner().invoke(main, ["evaluate", *map(str, args), str(d / "labels.tif"),
                                    "--no-progress", "--threshold", "0.3",
                                    "--json", str(d / name)])
    assert res.exit_code == 0, res.output
    return json.loads((d / name).read_text())


def _scores(data):
    return data["mean"], [{k: r[k] for k in ("v_rand", "v_info", "tp", "fp")}
                          for r in data["slices"]]


def test_foreign_uint8_and_uint16_maps_score_as_their_float_maps(files):
    """uint8 (TIFF) and uint16 (HDF5, and a Zarr array without emtile metadata) maps are read as
    v / 255 and v / 65535: the same scores as the float maps they stand for; --invert on the
    boundary map (1 = membrane) gives the same scores as the probability map."""
    import h5py
    import tifffile
    import zarr

    d, pred, _ = files
    u8 = np.rint(pred * 255).astype(np.uint8)
    u16 = np.rint(pred * 65535).astype(np.uint16)
    assert u16.max() > 255  # not readable as 0-255 values
    tifffile.imwrite(d / "p8.tif", u8, photometric="minisblack")
    tifffile.imwrite(d / "b8.tif", 255 - u8, photometric="minisblack")
    tifffile.imwrite(d / "f8.tif", u8 / np.float64(255), photometric="minisblack")
    with h5py.File(d / "maps.h5", "w") as f:
        f["p16"], f["b16"] = u16, 65535 - u16
        f["f16"] = u16 / np.float64(65535)
    z = zarr.create_array(str(d / "b16.zarr"), shape=u16.shape, dtype="uint16", chunks=(1, 48, 48))
    z[:] = 65535 - u16

    float8 = _scores(_json_of(d, "f8.json", d / "f8.tif"))
    assert _scores(_json_of(d, "p8.json", d / "p8.tif")) == float8
    assert _scores(_json_of(d, "b8.json", d / "b8.tif", "--invert")) == float8
    float16 = _scores(_json_of(d, "f16.json", d / "maps.h5/f16"))
    p16 = _json_of(d, "p16.json", d / "maps.h5/p16")
    assert _scores(p16) == float16
    assert p16["settings"]["prediction_kind"] == "probability (uint16, 0-65535 = 0..1)"
    assert _scores(_json_of(d, "b16.json", d / "maps.h5/b16", "--invert")) == float16
    assert _scores(_json_of(d, "z16.json", d / "b16.zarr", "--invert")) == float16
    # and not as if it were read any other way: inverted twice, or as 0-255 values
    assert _scores(_json_of(d, "wrong.json", d / "maps.h5/b16")) != float16


def test_an_out_of_range_float_map_is_one_line(files):
    import tifffile

    d, pred, _ = files
    bad = pred.copy()
    bad[2, 5, 7] = 1.5
    tifffile.imwrite(d / "bad.tif", bad, photometric="minisblack")
    res = CliRunner().invoke(main, ["evaluate", str(d / "bad.tif"), str(d / "labels.tif"),
                                    "--invert", "--no-progress"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "span [" in res.output and "1.5]" in res.output and "[0, 1]" in res.output
