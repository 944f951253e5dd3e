"""Input normalisation as part of the model (issue 13, deliverable 1): the rules, their statistics
(streamed, sampled), what a model folder records, and prediction that applies the model's rule to
any storage type of the same image, warning when an input is far from the training data."""

import json
import warnings

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from emtile import EmtileError
from emtile.cli.main import main
from emtile.normalize import (InputWarning, Rule, Scaling, apply, parse, range_warning, record,
                              statistics, voxel_warning)
from emtile.unet import UNet, load_metadata, save_model

TINY = dict(base=4, depth=2, tile=68, batch_size=2, val_every=0, workers=0, progress=False,
            calibrate=False)


def as_float_0_255(a):
    return a.astype(np.float32)


def as_uint16_full(a):
    return a.astype(np.uint16) * np.uint16(257)  # 0..255 -> 0..65535


def as_12_bit(a):
    return np.round(a.astype(np.float64) * 4095 / 255).astype(np.uint16)  # 0..4095 in uint16


# --------------------------------------------------------------------------- rules


def test_parse_rules():
    assert parse("dtype") == Rule("dtype") and parse(None) == Rule("dtype")
    assert parse("minmax") == Rule("minmax")
    assert parse("percentile") == Rule("percentile", 1.0, 99.8)
    assert parse(" percentile:0.5,99.5") == Rule("percentile", 0.5, 99.5)
    assert parse({"method": "percentile", "low": 2, "high": 98, "training": {}}) == Rule(
        "percentile", 2.0, 98.0)
    assert str(parse("percentile:2,98")) == "percentile:2,98"


@pytest.mark.parametrize("rule, match", [
    ("zscore", r"normalize='zscore' is not valid: choose one of dtype, minmax, percentile"),
    ("percentile:99,1", r"0 <= LOW < HIGH <= 100, e.g. percentile:1,99.8"),
    ("percentile:a,b", r"give the percentiles as percentile:LOW,HIGH, e.g. percentile:1,99.8"),
    ("minmax:0,100", r"only percentile takes values"),
    (3, r"normalize=3 is not valid"),
])
def test_bad_rules_are_one_line(rule, match):
    with pytest.raises(EmtileError, match=match):
        parse(rule)


def test_apply_by_hand():
    u8 = np.array([0, 51, 255], np.uint8)
    np.testing.assert_array_equal(apply(u8, Scaling("dtype")),  # x * float32(1 / 255)
                                  np.float32([0, 51, 255]) * np.float32(1 / 255))
    np.testing.assert_array_equal(apply(np.float32([0, 51, 255]), "dtype"), [0, 51, 255])
    out = apply(np.array([10, 60, 110, 160], np.uint16), Scaling("minmax", 10.0, 110.0))
    assert out.dtype == np.float32 and out.tolist() == [0.0, 0.5, 1.0, 1.5]  # not clipped
    with pytest.raises(EmtileError, match="needs statistics of the volume"):
        apply(u8, "percentile")


def test_minmax_sees_the_whole_volume_and_percentile_a_sample():
    vol = np.full((200, 256, 256), 100, np.uint8)  # more than the sample's 2**22 pixels
    vol[:, :, :128] = 50
    vol[137, 5, 5] = 250  # one bright pixel in a slice the sample leaves out
    s = statistics(vol, "minmax")
    assert s["scaling"] == Scaling("minmax", 50.0, 250.0)

    class Spy:
        def __init__(self, a):
            self.a, self.shape, self.dtype, self.keys = a, a.shape, a.dtype, []

        def __getitem__(self, key):
            self.keys.append(key)
            return self.a[key]

    spy = Spy(vol)
    p = statistics(spy, "percentile:1,99")
    assert p["scaling"] == Scaling("percentile", 50.0, 100.0)  # the bright pixel is ignored
    assert len(spy.keys) == 64 and 137 not in [k[0] if isinstance(k, tuple) else k for k in spy.keys]

    class Big:  # 1000 slices of 8192 x 8192 (64 GB), made up where read
        shape, dtype, keys = (1000, 8192, 8192), np.dtype(np.uint8), []

        def __getitem__(self, key):
            self.keys.append(key)
            return np.zeros([len(range(*k.indices(n))) for k, n in zip(key[1:], self.shape[1:])],
                            np.uint8)

    big = Big()
    statistics(big, "percentile")
    # large slices are read as four windows each, from 64 slices: about 2**22 pixels in all
    assert len(big.keys) == 4 * 64 and all(isinstance(k[1], slice) for k in big.keys)
    assert sum((k[1].stop - k[1].start) * (k[2].stop - k[2].start) for k in big.keys) <= 2**22


def test_statistics_of_every_storage_type_map_to_the_same_numbers(synthetic_small):
    raw = synthetic_small[0]
    ref = statistics(raw, "percentile")
    for convert in (as_float_0_255, as_uint16_full, as_12_bit):
        other = statistics(convert(raw), "percentile")
        a, b = apply(raw, ref["scaling"]), apply(convert(raw), other["scaling"])
        assert np.abs(a - b).max() < (2e-3 if convert is as_12_bit else 1e-5), convert.__name__
    # the dtype rule does not: float 0-255 reaches the model 255x brighter
    assert statistics(as_float_0_255(raw), "dtype")["p99"] > 100 * ref["p99"]


def test_bad_volumes(synthetic_small):
    raw = synthetic_small[0].astype(np.float32)
    raw[0, 0, 0] = np.inf
    with pytest.raises(EmtileError, match="raw holds NaN or infinite values"):
        statistics(raw, "percentile", name="raw")
    with pytest.raises(EmtileError, match="is not numeric"):
        statistics(np.array(["a"]), "dtype")


# --------------------------------------------------------------------------- prediction


@pytest.fixture(scope="module")
def trained(synthetic_small, tmp_path_factory):
    """A tiny model trained a few steps with percentile normalisation, and its data as Zarr."""
    from emtile import convert, train

    d = tmp_path_factory.mktemp("norm")
    raw, labels = synthetic_small
    tifffile.imwrite(d / "raw.tif", raw)
    tifffile.imwrite(d / "labels.tif", labels)
    convert(d / "raw.tif", d / "raw.zarr", voxel_size=(50, 4, 4), progress=False)
    convert(d / "labels.tif", d / "labels.zarr", labels=True, progress=False)
    train(str(d / "raw.zarr"), str(d / "labels.zarr"), d / "run", train_slices=slice(0, 4),
          val_slices=[4, 5], iterations=4, normalize="percentile", **TINY)
    return d


def test_the_model_records_its_normalisation_and_voxel_size(trained):
    meta = load_metadata(trained / "run" / "best")["emtile"]
    norm = meta["normalization"]
    assert (norm["method"], norm["low"], norm["high"]) == ("percentile", 1.0, 99.8)
    raw = tifffile.imread(trained / "raw.tif")
    lo, hi = np.percentile(raw, [1.0, 99.8])
    assert norm["training"]["lo"] == pytest.approx(lo) and norm["training"]["hi"] == pytest.approx(hi)
    assert norm["training"]["dtype"] == "uint8" and 0 <= norm["training"]["p01"] < norm["training"]["p99"]
    assert meta["voxel_size"] == [50.0, 4.0, 4.0]
    run = json.loads((trained / "run" / "run.json").read_text())
    assert run["normalization"] == norm and run["settings"]["normalize"] == "percentile:1,99.8"


@pytest.mark.parametrize("convert", [as_float_0_255, as_uint16_full, as_12_bit])
def test_predict_gives_the_uint8_probabilities_for_any_storage(trained, tmp_path, convert):
    """The issue's test: float 0-255, uint16 over the full range and 12-bit data in uint16 give the
    probabilities of the uint8 original, to 1e-5 (2e-3 for 12-bit, whose values are rounded)."""
    from emtile import predict

    raw = tifffile.imread(trained / "raw.tif")
    tifffile.imwrite(tmp_path / "other.tif", convert(raw))
    model = trained / "run" / "best"
    predict(model, trained / "raw.tif", tmp_path / "u8.zarr", tile=68, dtype="float32",
            progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # nothing to warn about
        predict(model, tmp_path / "other.tif", tmp_path / "other.zarr", tile=68, dtype="float32",
                progress=False)
    a = np.asarray(zarr.open_array(str(tmp_path / "u8.zarr/0")))
    b = np.asarray(zarr.open_array(str(tmp_path / "other.zarr/0")))
    assert np.abs(a - b).max() <= (2e-3 if convert is as_12_bit else 1e-5)
    # the test can fail: the same model under the dtype rule sees another image
    from emtile.predictor import predict_array
    from emtile.model import load_model

    net = load_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)  # far, as it should say
        c = predict_array(net, convert(raw), tile=68, normalize="dtype")
    assert np.abs(a - c).max() > 0.01


def test_predict_applies_the_training_normalisation_exactly(trained):
    """Validation (training's statistics) and predict (the input's) compute the same thing on the
    training volume."""
    from emtile.normalize import statistics as stats
    from emtile.predictor import predict_array
    from emtile.training.validation import predict_slices
    from emtile.model import load_model

    net = load_model(trained / "run" / "best")
    raw = zarr.open_array(str(trained / "raw.zarr/0"))
    scaling = stats(raw, "percentile")["scaling"]
    a = predict_slices(net, raw, [1, 2], tile=68, normalize=scaling)
    b = predict_array(str(trained / "run" / "best"), np.asarray(raw), tile=68,
                      roi=(slice(1, 3), slice(None), slice(None)))
    np.testing.assert_array_equal(a, b)


def test_far_inputs_warn_in_one_line(trained, tmp_path):
    raw = tifffile.imread(trained / "raw.tif")
    # a dtype model (no record: trained before models recorded it) given float 0-255 pixels
    save_model(UNet(base=4, depth=2), tmp_path / "old")
    tifffile.imwrite(tmp_path / "float.tif", as_float_0_255(raw))
    r = CliRunner().invoke(main, ["predict", "--model", str(tmp_path / "old"), "--tile", "68",
                                  str(tmp_path / "float.tif"), str(tmp_path / "p.zarr"),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Warning:")]
    assert len(lines) == 1
    assert ("far from the model's training data in intensity: after the model's 'dtype' "
            "normalisation its 1st-99th percentiles are") in lines[0]
    assert "retrain with normalize='percentile'" in lines[0]
    # a percentile model given an input at twice its training pixel size
    from emtile import convert

    convert(trained / "raw.tif", tmp_path / "coarse.zarr", voxel_size=(50, 8, 8), progress=False)
    r = CliRunner().invoke(main, ["predict", "--model", str(trained / "run" / "best"), "--tile",
                                  "68", str(tmp_path / "coarse.zarr"), str(tmp_path / "q.zarr"),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Warning:")]
    assert lines == ["Warning: input's voxel size (8 x 8 nm) is far from the model's training "
                     "data's (4 x 4 nm): the model sees structures at another scale; resample "
                     "the input to the training voxel size"]


def test_warning_rules_by_hand():
    stats = {"rule": Rule("dtype"), "dtype": "float32", "p01": 20.0, "p99": 230.0}
    rec = {"method": "dtype", "training": {"p01": 0.08, "p99": 0.9}}
    assert "0.08 to 0.9" in range_warning(stats, rec)
    assert range_warning(dict(stats, p01=0.1, p99=0.85), rec) is None
    assert range_warning(dict(stats, p01=0.1, p99=0.85), None) is None  # nominal 0..1
    assert "expects about 0 to 1" in range_warning(dict(stats, p01=0.005, p99=0.06), None)
    assert voxel_warning([50, 4, 4], [50, 5, 5]) is None
    assert voxel_warning(None, [50, 4, 4]) is None
    assert voxel_warning([6, 6], [4, 4]) is None  # 1.5x: not far
    assert "8 x 6 nm" in voxel_warning([8, 6], [4, 4])


def test_record_round_trip(synthetic_small):
    rec = record(statistics(synthetic_small[0], "minmax"))
    assert json.loads(json.dumps(rec)) == rec and parse(rec) == Rule("minmax")


def test_dtype_scaled():
    from emtile.normalize import dtype_scaled

    assert dtype_scaled(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    assert dtype_scaled(np.array([65535], np.uint16)).tolist() == [1.0]
    assert dtype_scaled(np.array([True])).dtype == np.float32
    x = np.array([0.25], np.float32)
    assert dtype_scaled(x) is x
