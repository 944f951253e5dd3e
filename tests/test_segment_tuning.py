"""Segmentation settings tuned on the validation slices after training (issue 22, item 2):
recorded in best/, shown by ``emtile info`` (text and JSON: the values printed are the ones
recorded), and found again from a prediction by :func:`emtile.tuned_settings.resolve`."""

import json
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from emtile import EmtileError
from emtile.cli.main import main
from emtile.settings import SegmentSettings
from emtile.trainer import train
from emtile.training import segment_tuning
from emtile.training.segment_tuning import GRID, tune_segmentation
from emtile.tuned_settings import resolve
from emtile.unet import load_metadata

# a tiny model: depth 2, base 4; tile 68 -> output 28 (as tests/test_train.py)
TINY = dict(base=4, depth=2, tile=68, batch_size=2, val_every=3, workers=0, progress=False,
            iterations=6, seed=0)
DEFAULT = (SegmentSettings().threshold, SegmentSettings().merge_threshold)


@pytest.fixture(scope="module")
def stores(synthetic_small, tmp_path_factory):
    d = tmp_path_factory.mktemp("tuning")
    out = []
    for name, data in zip(("raw", "labels"), synthetic_small):
        a = zarr.create_array(store=d / f"{name}.zarr", shape=data.shape, chunks=(1, 96, 96),
                              dtype=np.uint8)
        a[...] = data
        out.append(str(d / f"{name}.zarr"))
    return d, *out


@pytest.fixture(scope="module")
def tuned(stores):
    """A tiny run with validation slices 4:6, and a prediction of the stack made by its best/."""
    import emtile

    d, raw, labels = stores
    result = train(raw, labels, d / "run", train_slices=slice(0, 4), val_slices=slice(4, 6),
                   **TINY)
    best = d / "run" / "best"
    emtile.predict(best, raw, d / "pred.zarr", tile=68, progress=False)
    return d, best, result


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_training_with_validation_records_the_best_of_the_grid(tuned, synthetic_small):
    d, best, result = tuned
    rec = load_metadata(best)["emtile"]["segment"]
    assert result["segment"] == rec
    assert set(rec) == {"region", "settings", "v_rand", "default_v_rand", "grid", "emtile"}
    assert rec["region"] == "validation slices 4:6"
    assert [tuple(r[:2]) for r in rec["grid"]] == list(GRID) and len(GRID) == 30
    assert all(0.0 <= r[2] <= 1.0 for r in rec["grid"])
    # the best is the grid's best (the defaults are in the grid), and it is what it says
    top = max(r[2] for r in rec["grid"])
    assert rec["v_rand"] == pytest.approx(top) and rec["v_rand"] >= rec["default_v_rand"]
    pair = (rec["settings"]["threshold"], rec["settings"]["merge_threshold"])
    assert [pair[0], pair[1], rec["v_rand"]] in rec["grid"]
    assert rec["default_v_rand"] == next(r[2] for r in rec["grid"] if tuple(r[:2]) == DEFAULT)
    # the record's V-Rand of the chosen pair is what emtile segment gives on the model's map
    # of the validation slices, scored as bench_segment scores it
    import emtile
    from emtile.metrics import segmentation_stats, truth_segments

    from emtile.store import create_image, mark_complete

    # the validation slices alone, as tuning segments them (calibrate=map, which the defaults
    # use, reads the levels of the whole map it is given)
    val = np.asarray(zarr.open_array(str(d / "pred.zarr" / "0"), mode="r")[4:6])
    g = create_image(d / "val.zarr", val.shape, val.dtype, kind="probabilities")
    g["0"][...] = val
    mark_complete(g)
    emtile.segment(d / "val.zarr", d / "seg.zarr", overwrite=True, progress=False,
                   threshold=pair[0], merge_threshold=pair[1])
    seg = np.asarray(zarr.open_array(str(d / "seg.zarr" / "0"), mode="r")[...])
    truth = synthetic_small[1][4:6]
    v = np.mean([segmentation_stats(truth_segments(t), s)["v_rand"] for s, t in zip(seg, truth)])
    assert rec["v_rand"] == pytest.approx(v, abs=1e-9)
    # and the train summary says so
    from emtile.trainer import format_result

    assert f"segmentation tuned: threshold {pair[0]:g}, merge threshold {pair[1]:g}" in \
        format_result(result)


def test_info_shows_the_recorded_settings_and_scores(tuned):
    """Round trip: the record, through `emtile info` (text and --json), gives its values back."""
    d, best, _ = tuned
    rec = load_metadata(best)["emtile"]["segment"]
    for target in (best, d / "run"):  # the model folder, and the run folder's best model
        r = cli("info", target)
        assert r.exit_code == 0, r.output
        line = next(x for x in r.output.splitlines() if x.strip().startswith("segmentation"))
        import re

        m = re.fullmatch(r"\s*segmentation  threshold (\S+), merge threshold (\S+) \(tuned on "
                         r"(validation slices \S+): V-Rand (\S+), (\S+) with the defaults\)", line)
        assert m, line
        assert (float(m[1]), float(m[2])) == (rec["settings"]["threshold"],
                                              rec["settings"]["merge_threshold"])
        assert m[3] == rec["region"]
        assert (float(m[4]), float(m[5])) == (round(rec["v_rand"], 4),
                                              round(rec["default_v_rand"], 4))
        assert "emtile segment --settings model" in r.output
    as_json = json.loads(cli("info", best, "--json").output)
    assert as_json["segment"] == rec
    assert json.loads(cli("info", d / "run", "--json").output)["best"]["segment"] == rec


def test_resolve_returns_the_model_settings_for_its_prediction(tuned):
    d, best, _ = tuned
    rec = load_metadata(best)["emtile"]["segment"]
    overrides, note = resolve(d / "pred.zarr", "model", ())
    assert overrides == rec["settings"]
    assert note == (f"settings: model {best} (tuned on validation slices 4:6, V-Rand "
                    f"{rec['v_rand']:.4f} vs {rec['default_v_rand']:.4f} with the defaults): "
                    f"threshold {rec['settings']['threshold']:g}, merge threshold "
                    f"{rec['settings']['merge_threshold']:g}")
    # options given explicitly win
    overrides, note = resolve(d / "pred.zarr", "model", {"threshold"})
    assert overrides == {"merge_threshold": rec["settings"]["merge_threshold"]}
    assert note.endswith("; threshold as given")
    assert resolve(d / "pred.zarr", "model", ["threshold", "merge_threshold"])[0] == {}
    assert resolve(d / "pred.zarr", "default", ()) == ({}, "settings: the defaults")
    # the overrides are segment's own keywords
    import emtile

    r = emtile.segment(d / "pred.zarr", d / "seg2.zarr", overwrite=True, progress=False,
                       **resolve(d / "pred.zarr", "model", ())[0])
    assert r.settings["threshold"] == rec["settings"]["threshold"]


def one_line_error(fn, *args, match):
    with pytest.raises(EmtileError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_resolve_errors_are_one_line(tuned, stores, tmp_path):
    import emtile
    from emtile.unet import UNet

    d, best, _ = tuned
    _, raw, _ = stores
    one_line_error(resolve, d / "pred.zarr", "tuned", (),
                   match=r"choice='tuned' is not supported: choose one of default, model")
    one_line_error(resolve, tmp_path / "missing.zarr", "model", (),
                   match=r"the prediction .*missing.zarr' does not exist")
    # a prediction that records no model: an array from elsewhere, and a model in memory
    a = zarr.create_array(store=tmp_path / "foreign.zarr", shape=(2, 8, 8), dtype=np.float32)
    a[...] = 0.5
    one_line_error(resolve, tmp_path / "foreign.zarr", "model", (),
                   match=r"not an emtile prediction store.*--settings default")
    emtile.predict(UNet(base=2, depth=2), raw, tmp_path / "mem.zarr", tile=68, progress=False)
    one_line_error(resolve, tmp_path / "mem.zarr", "model", (),
                   match=r"made from a model in memory.*--settings default")
    # the model folder is gone
    moved = tmp_path / "moved"
    shutil.copytree(best, moved)
    emtile.predict(moved, raw, tmp_path / "pred_moved.zarr", tile=68, progress=False)
    shutil.rmtree(moved)
    one_line_error(resolve, tmp_path / "pred_moved.zarr", "model", (),
                   match=r"the model .*moved.* is gone .*--settings default")
    # a model that records no tuned settings
    shutil.copytree(best, moved)
    meta = json.loads((moved / "metadata.json").read_text())
    del meta["emtile"]["segment"]
    (moved / "metadata.json").write_text(json.dumps(meta))
    one_line_error(resolve, tmp_path / "pred_moved.zarr", "model", (),
                   match=r"records no tuned segmentation settings.*retrain it with --val-slices, "
                         r"or use --settings default")


def test_no_record_without_validation_or_when_turned_off(stores, tmp_path):
    _, raw, labels = stores
    result = train(raw, labels, tmp_path / "noval", train_slices=slice(0, 4), **TINY)
    assert "segment" not in load_metadata(tmp_path / "noval" / "best")["emtile"]
    assert "segment" not in result
    train(raw, labels, tmp_path / "off", train_slices=slice(0, 4), val_slices=slice(4, 6),
          tune_segment=False, **TINY)
    assert "segment" not in load_metadata(tmp_path / "off" / "best")["emtile"]
    r = cli("info", tmp_path / "off" / "best")
    assert r.exit_code == 0 and "segmentation" not in r.output
    assert json.loads(cli("info", tmp_path / "off" / "best", "--json").output)["segment"] is None


def test_a_failure_in_tuning_keeps_the_model_and_warns(stores, tmp_path, monkeypatch):
    _, raw, labels = stores

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(segment_tuning, "tune_segmentation", broken)
    with pytest.warns(UserWarning, match=r"segmentation settings not tuned \(RuntimeError: disk "
                                         r"on fire\); .*best keeps the model") as w:
        result = train(raw, labels, tmp_path / "run", train_slices=slice(0, 4),
                       val_slices=slice(4, 6), **TINY)
    assert sum("not tuned" in str(x.message) for x in w) == 1
    assert result["segment"] is None
    meta = load_metadata(tmp_path / "run" / "best")["emtile"]
    assert "segment" not in meta and "calibration" in meta  # the calibrated model is kept


def test_tune_segmentation_picks_the_best_pair_and_ties_go_to_the_defaults(monkeypatch):
    # the hand-built lines below sit at known levels of the map itself: the defaults run reads
    # them as stored (calibrate="map" is tested in tests/test_segment_levels.py)
    monkeypatch.setattr("emtile.segmenter.driver._calibration", lambda settings, pred: "none")
    # two slices of four square cells separated by 2-px membranes
    truth = np.zeros((2, 40, 40), np.uint8)
    for y0 in (1, 21):
        for x0 in (1, 21):
            truth[:, y0:y0 + 18, x0:x0 + 18] = 1
    # a clean map: every pair gives the truth, so the tie goes to the defaults
    clean = np.where(truth > 0, 0.97, 0.02).astype(np.float32)
    rec = tune_segmentation(clean, truth, zs=[7, 8])
    assert rec["region"] == "validation slices 7:9"
    assert rec["v_rand"] == rec["default_v_rand"] == pytest.approx(1.0)
    assert (rec["settings"]["threshold"], rec["settings"]["merge_threshold"]) == DEFAULT
    # a cell split by a 2-px line of p 0.82: above 0.82 it is two components, which merge only with
    # a merge threshold at or above 1 - 0.82 = 0.18; thresholds below 0.82 never split it
    p = clean.copy()
    p[:, 9:11, 1:19] = 0.82
    rec = tune_segmentation(p, truth, zs=[0, 1],
                            grid=[(0.85, 0.15), DEFAULT, (0.9, 0.15), (0.8, 0.15)])
    scores = {tuple(r[:2]): r[2] for r in rec["grid"]}
    assert scores[(0.85, 0.15)] < scores[DEFAULT] == pytest.approx(1.0)
    assert scores[(0.9, 0.15)] < 1.0 and scores[(0.8, 0.15)] == pytest.approx(1.0)
    # the defaults (0.88, 0.2) and (0.8, 0.15) tie at 1: the defaults win
    assert (rec["settings"]["threshold"], rec["settings"]["merge_threshold"]) == DEFAULT
    # without the defaults' pair in the grid, the defaults run still counts and the best
    # of the rest is (0.8, 0.15), tied with the defaults: the defaults still win
    rec = tune_segmentation(p, truth, zs=[0, 1], grid=[(0.9, 0.15), (0.8, 0.15)])
    assert rec["default_v_rand"] == pytest.approx(1.0)
    assert (rec["settings"]["threshold"], rec["settings"]["merge_threshold"]) == DEFAULT
    # a grid that beats the defaults: a faint membrane (p 0.89, boundary 0.11) that the
    # defaults' threshold 0.88 crosses (two cells one component) and 0.9 keeps, when the merge
    # threshold stays below 0.11
    q = clean.copy()
    q[:, 1:19, 19:21] = 0.89
    rec = tune_segmentation(q, truth, zs=[0, 1], grid=[(0.9, 0.1), (0.8, 0.1), (0.9, 0.25)])
    scores = {tuple(r[:2]): r[2] for r in rec["grid"]}
    assert scores[(0.9, 0.1)] == pytest.approx(1.0) and rec["default_v_rand"] < 0.9
    assert scores[(0.8, 0.1)] == pytest.approx(rec["default_v_rand"]) and scores[(0.9, 0.25)] < 1
    assert rec["v_rand"] == scores[(0.9, 0.1)]
    assert (rec["settings"]["threshold"], rec["settings"]["merge_threshold"]) == (0.9, 0.1)


def test_segment_cli_starts_from_the_model_settings(tuned, tmp_path):
    d, best, _ = tuned
    rec = load_metadata(best)["emtile"]["segment"]["settings"]
    r = cli("segment", d / "pred.zarr", tmp_path / "m.zarr", "--settings", "model",
            "--no-progress")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("settings: model ")
    used = zarr.open_group(str(tmp_path / "m.zarr"), mode="r").attrs["emtile"]["segment"]
    assert (used["threshold"], used["merge_threshold"]) == (rec["threshold"],
                                                          rec["merge_threshold"])
    # an option given on the command line wins over the model's
    r = cli("segment", d / "pred.zarr", tmp_path / "g.zarr", "--settings", "model",
            "--threshold", "0.61", "--no-progress")
    assert r.exit_code == 0, r.output
    assert zarr.open_group(str(tmp_path / "g.zarr"), mode="r").attrs["emtile"]["segment"][
        "threshold"] == 0.61
    r = cli("segment", d / "pred.zarr", tmp_path / "x.zarr", "--settings", "nope")
    assert r.exit_code == 2 and "Invalid value for '--settings'" in r.output
