"""Models, runs and predictions that describe themselves (issue 13, deliverable 2), and one
threshold story (deliverable 3): ``emtile info`` on a model folder, a run folder and a prediction;
predict's summary; ``--model RUN/``; the mask rule ``p > T`` in every command; V-Rand named by
its threshold in the log, the report and the summary; calibration that keeps the better model."""

import json

import numpy as np
import pytest
import tifffile
import torch
import zarr
from click.testing import CliRunner

from emtile import EmtileError
from emtile.cli.main import main

TINY = ["--base", "4", "--depth", "2", "--tile", "68", "--workers", "0", "--no-progress",
        "--no-tune-segment"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(synthetic_small, tmp_path_factory):
    """A tiny training run through the CLI on stores converted with a voxel size."""
    d = tmp_path_factory.mktemp("describe")
    raw, labels = synthetic_small
    tifffile.imwrite(d / "raw.tif", raw)
    tifffile.imwrite(d / "labels.tif", labels * 255)
    assert cli("convert", d / "raw.tif", d / "raw.zarr", "--voxel-size", "50,4,4",
               "--no-progress").exit_code == 0
    assert cli("convert", d / "labels.tif", d / "labels.zarr", "--labels",
               "--no-progress").exit_code == 0
    r = cli("train", "--raw", d / "raw.zarr", "--labels", d / "labels.zarr", "--out", d / "run",
            "--train-slices", "0:4", "--val-slices", "4:6", "--iterations", "4", "--val-every",
            "2", *TINY)
    assert r.exit_code == 0, r.output
    return d, r.output


def test_info_describes_a_model_folder(run):
    d, _ = run
    r = cli("info", d / "run" / "best")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "emtile model folder" in out
    assert "U-Net 2-D, depth 2, base 4, batch norm on" in out
    from emtile.unet import UNet

    n = sum(p.numel() for p in UNet(base=4, depth=2, batch_norm=True).parameters())
    assert f"parameters    {n:,}" in out
    assert "tile sizes    44 + 4 n (44, 48, 52, 56, ..., 572, ...); output = input - 40" in out
    assert f"raw {d / 'raw.zarr'}, labels {d / 'labels.zarr'}; train slices 0:4, val slices 4:6" in out
    assert "voxel size    50 x 4 x 4 nm" in out
    assert "normalisation percentile:1,99.8; training data uint8" in out
    assert "calibration   " in out and "logit map x" in out and "pixel-error threshold" in out
    assert "validation    " in out and "(best threshold)" in out and "pixel error" in out
    as_json = json.loads(cli("info", d / "run" / "best", "--json").output)
    assert as_json["what"] == "model" and as_json["voxel_size"] == [50.0, 4.0, 4.0]


def test_info_describes_a_run_folder_and_predict_points_into_it(run):
    d, _ = run
    r = cli("info", d / "run")
    assert r.exit_code == 0, r.output
    assert "emtile training run" in r.output and "progress      4 of 4 iterations" in r.output
    assert f"best model    {d / 'run' / 'best'}" in r.output
    # a run folder is a model: its best/ (emtile.model.load)
    for model, out in ((d / "run", "p.zarr"), (d / "run" / "best", "p_best.zarr")):
        r = cli("predict", "--model", model, d / "raw.zarr", d / out, "--tile", "68",
                "--no-progress")
        assert r.exit_code == 0, r.output
    a, b = (zarr.open_array(str(d / out / "0"))[:] for out in ("p.zarr", "p_best.zarr"))
    assert np.array_equal(a, b)


def test_a_prediction_says_where_it_came_from(run):
    d, _ = run
    r = cli("predict", "--model", d / "run" / "best", d / "raw.zarr", d / "roi.zarr", "--tile",
            "68", "--threshold", "0.5", "--roi", "2:5,:,:", "--no-progress")
    assert r.exit_code == 0, r.output
    assert f"mask: {d / 'roi.zarr'}/labels/mask (cell interior where p > 0.5)" in r.output
    assert "efficiency" in r.output and "output pixels per input pixel computed" in r.output
    info = cli("info", d / "roi.zarr").output
    assert f"model         {d / 'run' / 'best'}" in info
    assert f"input         {d / 'raw.zarr'}" in info
    assert "region        z 2:5, y 0:96, x 0:96 (offset 2,0,0 in the input)" in info
    assert "tile 68x68, tta off, amp off" in info and "normalisation percentile (" in info
    assert f"mask          {d / 'roi.zarr'}/labels/mask (cell interior where p > 0.5)" in info
    mask_info = cli("info", d / "roi.zarr" / "labels" / "mask").output
    assert "mask of       cell interior where p > 0.5" in mask_info


# --------------------------------------------------------------------------- one threshold


def test_the_mask_is_p_above_t_as_evaluate_counts_it(run, tmp_path):
    """predict's mask and evaluate/show use one rule: interior where p > T (strictly)."""
    from emtile import predict
    from emtile.metrics import PredictionDecoder

    d, _ = run
    predict(d / "run" / "best", d / "raw.zarr", tmp_path / "f.zarr", tile=68, dtype="float32",
            progress=False)
    p = np.asarray(zarr.open_array(str(tmp_path / "f.zarr/0")))
    t = float(np.sort(p.ravel())[p.size // 2])  # a threshold that some probabilities equal
    assert (p == np.float32(t)).any()
    predict(d / "run" / "best", d / "raw.zarr", tmp_path / "m.zarr", tile=68, dtype="float32",
            threshold=t, progress=False)
    mask = np.asarray(zarr.open_array(str(tmp_path / "m.zarr/labels/mask/0")))
    np.testing.assert_array_equal(mask.astype(bool), p > np.float32(t))
    np.testing.assert_array_equal(mask.astype(bool),
                                  PredictionDecoder(p.dtype).binarize(p, np.float32(t), None))


def test_v_rand_is_named_by_its_threshold_everywhere(run, tmp_path):
    d, train_output = run
    header = (d / "run" / "train.csv").read_text().splitlines()[0].split(",")
    assert header[6:9] == ["val_vrand", "val_vrand_threshold", "val_vrand_05"]
    rows = [r.split(",") for r in (d / "run" / "train.csv").read_text().splitlines()[1:]]
    validated = [r for r in rows if r[6]]
    assert validated and all(float(r[7]) in [k / 10 for k in range(11)] for r in validated)
    assert "(best threshold)" in train_output and " at 0.5" in train_output
    assert cli("predict", "--model", d / "run" / "best", d / "raw.zarr", tmp_path / "p.zarr",
               "--tile", "68", "--no-progress").exit_code == 0
    r = cli("evaluate", tmp_path / "p.zarr", d / "labels.zarr", "--sweep", "--no-progress")
    assert r.exit_code == 0, r.output
    head = next(line for line in r.output.splitlines() if line.strip().startswith("slice"))
    assert "V-Rand@0.5" in head and "pixErr@0.5" in head
    import re

    t = re.search(r"best V-Rand [0-9.]+ at ([0-9.]+)", r.output).group(1)
    assert f"V-Rand@{t}*" in head and "the sweep's best threshold" in r.output


def test_calibration_reports_before_and_after_and_keeps_the_better(run, tmp_path):
    import shutil

    from emtile.training.calibration import calibrate_best
    from emtile.model import load_model
    from emtile.unet import load_metadata

    d, _ = run
    cal = load_metadata(d / "run" / "best")["emtile"]["calibration"]
    assert set(cal["val_before"]) >= {"val_vrand", "val_vrand_threshold", "val_pixel_error"}
    assert set(cal["val_after"]) >= {"val_vrand", "val_vrand_threshold", "val_pixel_error"}
    assert cal["kept"] == (cal["val_after"]["val_vrand"] >= cal["val_before"]["val_vrand"])
    assert "before" in cal["reason"] and "after" in cal["reason"]

    # the rule itself, with validation scores chosen here: a fall in V-Rand undoes it
    raw = zarr.open_array(str(d / "raw.zarr/0"))
    labels = zarr.open_array(str(d / "labels.zarr/0"))
    scores = iter([{"val_vrand": 0.9, "val_vrand_threshold": 0.5},
                   {"val_vrand": 0.8, "val_vrand_threshold": 0.9}] * 2
                  + [{"val_vrand": 0.9, "val_vrand_threshold": 0.5},  # within the tolerance
                     {"val_vrand": 0.895, "val_vrand_threshold": 0.7}])

    def validator(model):
        return next(scores)

    for keep in (False, True, "small drop"):
        folder = tmp_path / f"best{keep}"
        shutil.copytree(d / "run" / "last", folder, ignore=shutil.ignore_patterns("*.pt"))
        meta = json.loads((folder / "metadata.json").read_text())
        meta["emtile"].pop("calibration", None)
        (folder / "metadata.json").write_text(json.dumps(meta))
        before = load_model(folder).head.bias.detach().clone()
        record = calibrate_best(folder, raw, labels, [0, 1, 2, 3], torch.device("cpu"),
                                validator, keep=keep is True)
        after = load_model(folder).head.bias.detach()
        kept = keep is not False
        assert record["kept"] is kept and load_metadata(folder)["emtile"]["calibration"]["kept"] is kept
        assert torch.equal(after, before) is (not kept)
        assert record["reason"].endswith({False: "the calibrated model was not kept",
                                          True: "kept as asked", "small drop": ") after"}[keep])
