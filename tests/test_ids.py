"""Instance labels kept as ids (``convert(..., labels=True, ids=True)``), what ``info`` says of
them, and whole-volume scores of id volumes (``evaluate(..., mode="volume")``): VOI split /
merge and the adapted Rand error against scikit-image and hand-worked cases, streamed by slabs,
in the report, JSON and CSV; every refusal in one line."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

import emtile
from emtile import EmtileError
from emtile import evaluation as E
from emtile.cli.main import main
from emtile.describe import format_info
from emtile.scores3d import Contingency, volume_scores
from emtile.stacks import IdCounter
from emtile.store import create_image, create_label_image, mark_complete

FIB25 = Path(os.environ.get("EMTILE_FIB25_DIR", Path(__file__).resolve().parents[2] / "shared"
                            / "data" / "fib25"))


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tif(path, data):
    tifffile.imwrite(path, data, photometric="minisblack")
    return path


def ids_volume(rng, shape=(5, 12, 13), n=40, dtype=np.uint32):
    return rng.integers(0, n, shape).astype(dtype)


def emtile_attrs(path):
    return zarr.open_group(str(path), mode="r").attrs["emtile"]


def assert_same_scores(a, b):
    assert a.keys() == b.keys() and a["empty"] == b["empty"]
    for key in a:
        if key != "empty":
            assert a[key] == pytest.approx(b[key], abs=1e-12), key


# --------------------------------------------------------------------------- convert keeps ids


@pytest.mark.parametrize("dtype, stored", [("uint16", "uint16"), ("uint32", "uint32"),
                                           ("int64", "uint16"), ("int32", "uint16"),
                                           ("float32", "uint16")])
def test_tiff_ids_are_kept(tmp_path, rng, dtype, stored):
    """Unsigned sources keep their type; signed and float ones (whole, >= 0) get the smallest
    unsigned type that holds their largest id (here 699)."""
    data = ids_volume(rng, n=700, dtype=np.int64)
    data[0, 0, 0] = 699
    out = tmp_path / "ids.zarr"
    r = emtile.convert(tif(tmp_path / "ids.tif", data.astype(dtype)), out, labels=True, ids=True,
                       progress=False)
    vol = emtile.open_volume(out)
    assert vol.dtype == np.dtype(stored)
    np.testing.assert_array_equal(vol[:], data)
    meta = emtile_attrs(out)
    assert meta["kind"] == "labels" and meta["ids"] is True and meta["source_dtype"] == dtype
    assert meta["max_id"] == 699 and meta["id_count"] == len(np.unique(data[data > 0]))
    assert r["ids"] and r["max_id"] == 699
    ome = zarr.open_group(str(out), mode="r").attrs["ome"]
    assert ome["version"] == "0.5" and "image-label" in ome  # an NGFF label image


@pytest.mark.parametrize("dtype, top, stored", [("uint64", 2**40 + 3, "uint64"),
                                                ("int32", 200, "uint8"),
                                                ("uint8", 9, "uint8")])
def test_zarr_ids_are_kept(tmp_path, rng, dtype, top, stored):
    data = ids_volume(rng, n=10, dtype=np.int64).astype(dtype)
    data[1, 2, 3] = top
    src = zarr.create_array(str(tmp_path / "src.zarr"), shape=data.shape, dtype=dtype,
                            chunks=(2, 6, 13))
    src[...] = data
    out = tmp_path / "ids.zarr"
    emtile.convert(tmp_path / "src.zarr", out, labels=True, ids=True, levels=2, progress=False)
    g = zarr.open_group(str(out), mode="r")
    assert g["0"].dtype == np.dtype(stored)
    np.testing.assert_array_equal(g["0"][...], data)
    np.testing.assert_array_equal(g["1"][...], data[:, ::2, ::2])  # levels sample, never mix ids
    assert emtile_attrs(out)["max_id"] == top


def test_uncounted_ids_still_record_the_largest(tmp_path):
    data = np.zeros((2, 4, 5), np.uint32)
    data[1, 1, 1], data[0, 0, 0] = IdCounter.COUNTED + 5, 3
    out = tmp_path / "ids.zarr"
    emtile.convert(tif(tmp_path / "ids.tif", data), out, labels=True, ids=True, progress=False)
    meta = emtile_attrs(out)
    assert meta["max_id"] == IdCounter.COUNTED + 5 and meta["id_count"] is None
    text = format_info(emtile.info(out))
    assert f"instance ids: max id {IdCounter.COUNTED + 5:,}" in text


def test_info_says_instance_ids(tmp_path):
    data = np.zeros((2, 6, 7), np.uint16)
    data[0, :2, :2], data[1, 3:, 3:], data[1, 0, 0] = 4, 9, 4
    out = tmp_path / "ids.zarr"
    emtile.convert(tif(tmp_path / "ids.tif", data), out, labels=True, ids=True, progress=False)
    r = run_cli("info", out)
    assert r.exit_code == 0, r.output
    assert "kind          labels (instance ids: 2 ids, max id 9; 0 = unlabelled)" in r.output
    r = run_cli("convert", tmp_path / "ids.tif", tmp_path / "cli.zarr", "--labels", "--ids",
                "--no-progress")
    assert r.exit_code == 0, r.output
    assert "instance ids: 2 ids, max id 9" in r.output


@pytest.mark.parametrize("value, shown", [(-3, "-3"), (2.5, "2.5"), (np.nan, "nan"),
                                          (-1.5, "-1.5")])
def test_negative_or_fractional_ids_are_one_line(tmp_path, value, shown):
    data = np.zeros((3, 4, 5), np.float32 if isinstance(value, float) else np.int32)
    data[2, 1, 1] = value
    out = tmp_path / "ids.zarr"
    src = tif(tmp_path / "ids.tif", data)
    with pytest.raises(EmtileError, match=rf"^labels '.*ids.tif' slices 0:3 hold {shown}: "
                                          r"instance ids must be whole numbers >= 0 "
                                          r"\(0 = unlabelled\)$"):
        emtile.convert(src, out, labels=True, ids=True, progress=False)
    assert not out.exists()
    r = run_cli("convert", src, out, "--labels", "--ids")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and f"hold {shown}" in r.output


def test_threshold_and_ids_are_refused_together(tmp_path):
    src = tif(tmp_path / "ids.tif", np.ones((2, 4, 4), np.uint16))
    with pytest.raises(EmtileError, match=r"^threshold=3 does not apply with ids=True"):
        emtile.convert(src, tmp_path / "o.zarr", labels=True, ids=True, threshold=3,
                       progress=False)
    r = run_cli("convert", src, tmp_path / "o.zarr", "--labels", "--ids", "--threshold", "3")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith("Error: --threshold 3 does not apply with --ids")
    with pytest.raises(EmtileError, match=r"^ids=True only applies with labels=True"):
        emtile.convert(src, tmp_path / "o.zarr", ids=True, progress=False)
    assert not (tmp_path / "o.zarr").exists()


def test_many_valued_labels_point_to_ids(tmp_path):
    data = np.arange(2 * 4 * 4, dtype=np.uint16).reshape(2, 4, 4)
    r = run_cli("convert", tif(tmp_path / "l.tif", data), tmp_path / "l.zarr", "--labels")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "labels are not binary" in r.output and r.output.rstrip().endswith(
        "; or keep them as instance ids with --ids")


def test_binary_labels_are_unchanged(tmp_path):
    """Without ids=True, labels are binarised as before (a plain image, not a label image)."""
    data = (np.arange(2 * 4 * 4).reshape(2, 4, 4) % 2).astype(np.uint8) * 255
    out = tmp_path / "l.zarr"
    emtile.convert(tif(tmp_path / "l.tif", data), out, labels=True, progress=False)
    assert emtile.open_volume(out).dtype == np.uint8 and "ids" not in emtile_attrs(out)
    assert "image-label" not in zarr.open_group(str(out), mode="r").attrs["ome"]


# --------------------------------------------------------------------------- scores by hand


def test_hand_worked_cases():
    one = np.ones((2, 2, 2), np.uint32)
    halves = np.arange(2).reshape(2, 1, 1) * one + 1  # z 0 -> 1, z 1 -> 2
    # identical: nothing split, nothing merged
    s = volume_scores(halves, halves)
    assert (s["voi_split"], s["voi_merge"], s["adapted_rand_error"]) == (0.0, 0.0, 0.0)
    # one truth object of 8 split in two halves: H(pred|truth) = 1 bit; pairs P = 2*4*3 = 24,
    # S = 24, T = 8*7 = 56, ARE = 1 - 48/80
    s = volume_scores(one, halves)
    assert (s["voi_split"], s["voi_merge"]) == (1.0, 0.0)
    assert s["adapted_rand_error"] == pytest.approx(0.4, abs=1e-15)
    assert s["rand_precision"] == 1.0 and s["rand_recall"] == pytest.approx(24 / 56)
    # two truth objects of 4 merged into one: the mirror image
    s = volume_scores(halves, one)
    assert (s["voi_split"], s["voi_merge"]) == (0.0, 1.0)
    assert s["adapted_rand_error"] == pytest.approx(0.4, abs=1e-15)
    # predicted 0 is one ordinary object: it merges the two halves
    s = volume_scores(halves, 0 * one)
    assert (s["voi_merge"], s["pred_zero"], s["pred_ids"]) == (1.0, 8, 1)


def test_truth_zero_is_left_out_and_ids_are_taken_as_given():
    truth = np.zeros((3, 4, 4), np.uint16)
    truth[0], truth[2] = 7, 9  # object 7 at z 0, 9 at z 2; z 1 unlabelled
    pred = np.full(truth.shape, 5, np.uint64)
    pred[2] = 6
    pred[1] = np.arange(16).reshape(4, 4)  # anything where truth is 0
    s = volume_scores(truth, pred)
    assert (s["voi_split"], s["voi_merge"], s["adapted_rand_error"]) == (0.0, 0.0, 0.0)
    assert (s["n"], s["voxels"], s["truth_ids"]) == (32, 48, 2)
    # one id in two pieces (z 0 and z 2, not touching) is one object, in truth and prediction
    truth[2] = 7
    pred[2] = 5
    s = volume_scores(truth, pred)
    assert (s["voi_split"], s["voi_merge"], s["truth_ids"], s["pred_ids"]) == (0.0, 0.0, 1, 1)


def test_empty_truth_scores_zero():
    s = volume_scores(np.zeros((2, 3, 3), np.uint32), np.ones((2, 3, 3), np.uint32))
    assert s["empty"] and (s["voi_split"], s["voi_merge"], s["adapted_rand_error"]) == (0, 0, 0)
    assert s["n"] == 0 and s["voxels"] == 18


# --------------------------------------------------------------------------- against scikit-image


def skimage_scores(truth, pred):
    """scikit-image on the voxels where truth > 0 (emtile's convention: truth 0 unlabelled)."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    m = truth > 0
    split, merge = variation_of_information(truth[m], pred[m])
    return float(split), float(merge), float(adapted_rand_error(truth[m], pred[m])[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_skimage_on_random_3d_volumes(seed):
    rng = np.random.default_rng(seed)
    truth = ids_volume(rng, (6, 15, 14), n=12, dtype=np.uint16)
    pred = ids_volume(rng, (6, 15, 14), n=20, dtype=np.uint64)
    pred[pred < 3] = 0  # some predicted 0: an ordinary object
    s = volume_scores(truth, pred)
    ref = skimage_scores(truth, pred)
    assert (s["voi_split"], s["voi_merge"], s["adapted_rand_error"]) == pytest.approx(ref,
                                                                                      abs=1e-12)
    assert s["voi"] == pytest.approx(ref[0] + ref[1], abs=1e-12)


def test_blocky_volumes_against_skimage():
    """Objects as blocks (not noise): a truth of boxes, a prediction that splits and merges."""
    z, y, x = np.indices((8, 20, 24))
    truth = (1 + (z // 4) * 6 + (y // 10) * 3 + x // 8).astype(np.uint32)
    truth[:, 9:11] = 0  # an unlabelled band
    pred = (1 + (z // 2) * 4 + (y // 10) * 2 + x // 12).astype(np.int64)
    s = volume_scores(truth, pred)
    ref = skimage_scores(truth, pred)
    assert (s["voi_split"], s["voi_merge"], s["adapted_rand_error"]) == pytest.approx(ref,
                                                                                      abs=1e-12)
    assert s["voi_split"] > 0 and s["voi_merge"] > 0


def test_slabs_give_the_scores_of_the_whole(monkeypatch):
    """The table accumulated over slabs of a few slices (and ids past 2^32, sorted as pairs)
    equals one pass over the whole volume."""
    rng = np.random.default_rng(4)
    truth = ids_volume(rng, (7, 9, 10), n=9, dtype=np.uint32)
    pred = ids_volume(rng, (7, 9, 10), n=15, dtype=np.uint64)
    whole = volume_scores(truth, pred)
    monkeypatch.setattr(E, "_SLAB_BYTES", 9 * 10 * 40)  # one slice per slab
    r = E.evaluate(pred, truth, progress=False)
    assert r["settings"]["mode"] == "volume"
    assert_same_scores(r["volume"], whole)
    # renamed past 2^32 (0 stays 0: it is counted apart, in pred_zero): nothing changes
    big = np.where(pred > 0, pred * np.uint64(2**40) + np.uint64(11), np.uint64(0))
    table = Contingency()
    for z0 in range(0, 7, 3):
        table.add(truth[z0:z0 + 3], big[z0:z0 + 3])
    assert_same_scores(table.scores(), whole)


# --------------------------------------------------------------------------- evaluate, volume mode


@pytest.fixture
def id_stores(tmp_path):
    """Truth ids converted with ids=True, and a segmentation store (emtile segment's kind)."""
    rng = np.random.default_rng(7)
    truth = ids_volume(rng, (6, 16, 18), n=25, dtype=np.uint16)
    emtile.convert(tif(tmp_path / "truth.tif", truth), tmp_path / "truth.zarr", labels=True,
                   ids=True, progress=False)
    seg = ids_volume(rng, (6, 16, 18), n=30, dtype=np.uint32)
    g = create_label_image(tmp_path / "seg.zarr", seg.shape, np.uint32, source=None,
                           attrs={"segment": {"settings": "test"}})
    g["0"][...] = seg
    mark_complete(g)
    return tmp_path, truth, seg


def test_auto_mode_scores_id_stores_as_one_volume(id_stores):
    d, truth, seg = id_stores
    r = E.evaluate(d / "seg.zarr", d / "truth.zarr", progress=False)
    assert r["settings"]["mode"] == "volume" and r["slices"] == [] and r["mean"] is None
    v = r["volume"]
    assert (v["voi_split"], v["voi_merge"], v["adapted_rand_error"]) == pytest.approx(
        skimage_scores(truth, seg), abs=1e-12)
    # slices= picks the block scored as one volume (e.g. FIB-25's held-out z 150:250)
    r = E.evaluate(d / "seg.zarr", d / "truth.zarr", slices=slice(2, 5), progress=False)
    assert r["settings"]["slices"] == [2, 3, 4]
    assert_same_scores(r["volume"], volume_scores(truth[2:5], seg[2:5]))


def test_cli_json_and_csv_carry_the_volume_scores(id_stores):
    d, truth, seg = id_stores
    res = run_cli("evaluate", d / "seg.zarr", d / "truth.zarr", "--json", d / "s.json",
                  "--csv", d / "s.csv", "--no-progress")
    assert res.exit_code == 0, res.output
    ref = skimage_scores(truth, seg)
    assert f"VOI split   {ref[0]:.4f} bits" in res.output
    assert f"VOI merge   {ref[1]:.4f} bits" in res.output
    assert f"ARE         {ref[2]:.4f}" in res.output
    assert "scored as   one volume: slices 0..5" in res.output
    data = json.loads((d / "s.json").read_text())
    assert data["settings"]["mode"] == "volume"
    assert "voi_split, voi_merge, adapted_rand_error" in data["settings"]["conventions"]
    assert [data["volume"][k] for k in ("voi_split", "voi_merge", "adapted_rand_error")] == \
        pytest.approx(ref, abs=1e-12)
    assert data["volume"]["n"] == int(np.count_nonzero(truth))
    rows = list(csv.reader((d / "s.csv").open()))
    assert "mode=volume" in rows[0] and rows[2][0] == "volume"
    row = dict(zip(rows[1], rows[2]))
    assert float(row["voi_merge"]) == pytest.approx(ref[1], abs=1e-12)


def test_explicit_volume_mode_takes_any_integer_ids(tmp_path):
    """FIB-25's truth is a uint16 TIFF: mode='volume' scores it as it is."""
    rng = np.random.default_rng(3)
    truth = ids_volume(rng, (4, 10, 11), n=9, dtype=np.uint16)
    seg = ids_volume(rng, (4, 10, 11), n=6, dtype=np.uint16)
    t, s = tif(tmp_path / "t.tif", truth), tif(tmp_path / "s.tif", seg)
    r = E.evaluate(s, t, mode="volume", progress=False)
    assert (r["volume"]["voi_split"], r["volume"]["voi_merge"],
            r["volume"]["adapted_rand_error"]) == pytest.approx(skimage_scores(truth, seg),
                                                                abs=1e-12)
    res = run_cli("evaluate", s, t, "--mode", "volume", "--no-progress")
    assert res.exit_code == 0 and "VOI split" in res.output


def test_auto_mode_keeps_per_slice_scores_of_binary_labels(tmp_path):
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[:, :, :3] = labels[:, :, 4:] = 1
    seg = np.where(np.arange(8) < 4, 1, 2).astype(np.uint32) * np.ones((2, 8, 1), np.uint32)
    r = E.evaluate(seg, labels, progress=False)
    assert r["settings"]["mode"] == "slices" and len(r["slices"]) == 2
    assert r["mean"]["v_rand"] == 1.0


def test_volume_mode_refusals(id_stores, tmp_path):
    d, truth, seg = id_stores
    p = create_image(tmp_path / "pred.zarr", seg.shape, np.float32, kind="probabilities")
    mark_complete(p)
    with pytest.raises(EmtileError, match=r"^pred '.*pred.zarr' is a prediction \(probabilities"
                                          r"\): segment it first \(emtile segment\), not an id "
                                          r"volume: whole-volume scores \(mode='volume'\)"):
        E.evaluate(tmp_path / "pred.zarr", d / "truth.zarr", mode="volume", progress=False)
    with pytest.raises(EmtileError, match=r"^labels 'labels array' has dtype float64: "
                                          r"whole-volume scores"):
        E.evaluate(seg, truth.astype(float), mode="volume", progress=False)
    with pytest.raises(EmtileError, match=r"^sweep=True does not apply to a label image"):
        E.evaluate(d / "seg.zarr", d / "truth.zarr", sweep=True, progress=False)
    with pytest.raises(EmtileError, match=r"^mode='3d' is not valid: choose auto, slices"):
        E.evaluate(seg, truth, mode="3d", progress=False)
    bad = seg.astype(np.int64)
    bad[3, 2, 1] = -1
    with pytest.raises(EmtileError, match=r"label image 'pred array' in slices 0-5 has "
                                          r"negative ids \(down to -1\)"):
        E.evaluate(bad, truth.astype(np.uint32), progress=False)
    res = run_cli("evaluate", tmp_path / "pred.zarr", d / "truth.zarr", "--mode", "volume")
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "--mode volume" in res.output


def test_per_slice_scores_refuse_instance_ids_as_labels(id_stores, tmp_path):
    d, truth, seg = id_stores
    with pytest.raises(EmtileError, match=r"^labels '.*truth.zarr' holds instance ids "
                                          r"\(converted with the ids option\), not binary labels"):
        E.evaluate(d / "seg.zarr", d / "truth.zarr", mode="slices", progress=False)
    with pytest.raises(EmtileError, match=r"labels are not binary in slice 0.*; or, if they are "
                                          r"instance ids, score the two id volumes as one with "
                                          r"mode='volume'"):
        E.evaluate(seg, tif(tmp_path / "t.tif", truth), progress=False)


def test_id_stores_are_label_images(id_stores):
    d, _, _ = id_stores
    assert E.is_label_image(str(d / "truth.zarr"), np.uint16)
    assert E.choose_mode("auto", str(d / "seg.zarr"), str(d / "truth.zarr"), np.uint32,
                         np.uint16) == "volume"
    assert E.choose_mode("auto", np.zeros(1), np.zeros(1), np.uint32, np.uint16) == "slices"


# --------------------------------------------------------------------------- FIB-25


@pytest.mark.slow
def test_fib25_truth_converts_with_its_ids(tmp_path):
    """The FIB-25 cube's bodies (uint16 TIFF, 525 ids) convert to an id store, which scores
    against itself as perfect and against a merged copy as skimage does, on z 150:250."""
    src = FIB25 / "groundtruth.tif"
    if not src.exists():
        pytest.skip(f"FIB-25 data not found at {FIB25}")
    out = tmp_path / "truth.zarr"
    emtile.convert(src, out, labels=True, ids=True, voxel_size=(10, 10, 10), progress=False)
    meta = emtile_attrs(out)
    assert emtile.open_volume(out).dtype == np.uint16
    assert (meta["max_id"], meta["id_count"]) == (525, 525)
    assert "instance ids: 525 ids, max id 525" in format_info(emtile.info(out))
    r = E.evaluate(out, out, slices=slice(150, 250), progress=False)
    assert r["settings"]["mode"] == "volume" and r["volume"]["voi"] == 0.0
    truth = np.asarray(emtile.open_volume(out)[150:250])
    merged = (truth // 2).astype(np.uint32)  # bodies 2k and 2k + 1 merged
    r = E.evaluate(merged, truth.astype(np.uint32), progress=False)
    ref = skimage_scores(truth, merged)
    v = r["volume"]
    assert (v["voi_split"], v["voi_merge"], v["adapted_rand_error"]) == pytest.approx(ref,
                                                                                      abs=1e-9)
