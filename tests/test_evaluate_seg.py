"""`emtile evaluate` on segmentations: a label image (emtile segment's real store) scored as
segments, V-Rand against an independent computation, VOI and adapted Rand against scikit-image
for label images and thresholded maps, JSON / CSV fields, and every bad input in one line."""

import csv
import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from conftest import synthetic_em
from scipy import ndimage

from emtile import EmtileError
from emtile import evaluation as E
from emtile import metrics as M
from emtile.cli.main import main
from emtile.segmenter import segment
from emtile.store import create_image, mark_complete, set_translation
from emtile.converter import convert


def write_pred(path, p, translation=None):
    """A probability store as emtile predict writes it (optionally of a region)."""
    g = create_image(path, p.shape, p.dtype, kind="probabilities")
    g["0"][...] = p
    if translation is not None:  # first voxel per axis (the store's scale is 1)
        set_translation(g, translation)
    mark_complete(g)
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Binary labels (TIFF and converted store), a noisy probability map, and two real
    segmentations of it by emtile segment: cells tiling the slice, and boundaries kept (0)."""
    d = tmp_path_factory.mktemp("evalseg")
    _, labels = synthetic_em((3, 64, 64), cells=12, membrane=1.5, seed=2)
    rng = np.random.default_rng(0)
    p = ndimage.gaussian_filter(labels.astype(np.float32), (0, 1.5, 1.5))
    p = np.clip(p + rng.normal(0, 0.2, p.shape), 0, 1).astype(np.float32)
    tifffile.imwrite(d / "labels.tif", labels, photometric="minisblack")
    convert(d / "labels.tif", d / "labels.zarr", labels=True, progress=False)
    write_pred(d / "pred.zarr", p)
    segment(str(d / "pred.zarr"), str(d / "seg.zarr"), **SEG_OPTS)
    segment(str(d / "pred.zarr"), str(d / "seg_kb.zarr"), keep_boundaries=True, **SEG_OPTS)
    return d, labels, p


# distance seeds: many fragments, so that ids run past 255
SEG_OPTS = dict(threshold=0.9, seeds="distance", merge_quantile=None, merge_threshold=0.3,
                progress=False)


def read_seg(path):
    import zarr

    return np.asarray(zarr.open_group(str(path), mode="r")["0"][...])


# --------------------------------------------------------------------------- independent references


def v_rand_by_hand(seg, truth):
    """ISBI V-Rand of one slice from a NumPy contingency table: truth cells are the 4-connected
    components of the interior, the membrane left out; each predicted 0 inside a cell is a
    segment of its own; V-Rand = sum p_ij^2 / (sum s_j^2 / 2 + sum t_i^2 / 2)."""
    cells, _ = ndimage.label(truth != 0)  # 4-connected in 2-D
    inside = cells > 0
    t, s = cells[inside].astype(np.int64), seg[inside].astype(np.int64)
    zeros = np.flatnonzero(s == 0)
    s[zeros] = s.max() + 1 + np.arange(zeros.size)
    _, joint = np.unique(np.stack([t, s]), axis=1, return_counts=True)
    _, tc = np.unique(t, return_counts=True)
    _, sc = np.unique(s, return_counts=True)
    return float((joint ** 2).sum() / (0.5 * (sc ** 2).sum() + 0.5 * (tc ** 2).sum()))


def skimage_cremi(seg, truth):
    """(VOI split, VOI merge, adapted Rand error) by scikit-image after converting conventions:
    the truth as its 4-connected cells with the membrane 0 (ignored, as CREMI ignores truth 0),
    the truth given first (skimage ignores labels of its first image only, so a predicted 0 is
    an ordinary segment, as in CREMI); ``variation_of_information(truth, pred)`` returns
    ``[H(pred|truth), H(truth|pred)]`` = [split, merge] in bits."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    cells, _ = ndimage.label(truth != 0)
    split, merge = variation_of_information(cells, seg, ignore_labels=(0,))
    return float(split), float(merge), float(adapted_rand_error(cells, seg, ignore_labels=(0,))[0])


# --------------------------------------------------------------------------- label images


@pytest.mark.parametrize("name", ["seg.zarr", "seg_kb.zarr"])
def test_label_image_v_rand_agrees_with_an_independent_computation(stores, name):
    d, labels, _ = stores
    seg = read_seg(d / name)
    assert seg.dtype == np.uint32 and seg.max() > 255  # ids run over the volume
    r = E.evaluate(str(d / name), str(d / "labels.zarr"), progress=False)
    assert r["settings"]["label_image"] and r["settings"]["threshold"] is None
    assert r["settings"]["prediction_kind"].startswith("label image (uint32)")
    by_hand = [v_rand_by_hand(seg[z], labels[z]) for z in range(3)]
    assert [row["v_rand"] for row in r["slices"]] == pytest.approx(by_hand, abs=1e-12)
    assert r["mean"]["v_rand"] == pytest.approx(np.mean(by_hand), abs=1e-12)
    assert all(v < 0.99 for v in by_hand)  # a real segmentation with real errors
    if name == "seg_kb.zarr":  # boundaries kept: predicted 0 inside cells, scored as singletons
        assert all(row["singletons"] > 0 for row in r["slices"])
        # ... which is not what the thresholded map would give (no thinning here)
        assert r["mean"]["v_rand"] != E.evaluate(str(d / "pred.zarr"), str(d / "labels.zarr"),
                                                 progress=False)["mean"]["v_rand"]


@pytest.mark.parametrize("name", ["seg.zarr", "seg_kb.zarr"])
def test_label_image_voi_and_adapted_rand_against_skimage(stores, name):
    d, labels, _ = stores
    seg = read_seg(d / name)
    r = E.evaluate(str(d / name), str(d / "labels.tif"), progress=False)
    for z, row in enumerate(r["slices"]):
        split, merge, are = skimage_cremi(seg[z], labels[z])
        assert row["voi_split"] == pytest.approx(split, abs=1e-9)
        assert row["voi_merge"] == pytest.approx(merge, abs=1e-9)
        assert row["adapted_rand_error"] == pytest.approx(are, abs=1e-12)
        assert split > 0.01 and merge > 0.01  # both kinds of error present: the test can fail
    for key in ("voi_split", "voi_merge", "adapted_rand_error"):
        assert r["mean"][key] == pytest.approx(np.mean([row[key] for row in r["slices"]]))


def test_thresholded_map_voi_and_adapted_rand_against_skimage(stores):
    d, labels, p = stores
    for t in (0.5, 0.8):
        r = E.evaluate(p, labels, threshold=t, progress=False)
        for z, row in enumerate(r["slices"]):
            thinned = M.thin_boundaries(p[z] > t)  # the map's segments, as ISBI takes them
            split, merge, are = skimage_cremi(thinned, labels[z])
            assert (row["voi_split"], row["voi_merge"]) == pytest.approx((split, merge), abs=1e-9)
            assert row["adapted_rand_error"] == pytest.approx(are, abs=1e-12)


def test_sweep_carries_the_cremi_scores_per_threshold(stores):
    _, labels, p = stores
    r = E.evaluate(p, labels, sweep=True, progress=False)
    sw = r["sweep"]
    for i in (3, 5, 8):
        single = E.evaluate(p, labels, threshold=sw["thresholds"][i], progress=False)["mean"]
        for key in ("voi_split", "voi_merge", "adapted_rand_error"):
            assert sw[key][i] == single[key]
    assert len(set(sw["adapted_rand_error"])) > 3


def test_ids_are_segments_whatever_their_values(stores):
    """Renaming ids (beyond 2^40, uint64) changes no score; an id cut in two is one segment."""
    d, labels, _ = stores
    seg = read_seg(d / "seg_kb.zarr")
    base = E.evaluate(seg, labels, progress=False)
    big = np.where(seg > 0, seg.astype(np.uint64) * 7 + 2**40, 0).astype(np.uint64)
    renamed = E.evaluate(big, labels, progress=False)
    for a, b in zip(base["slices"], renamed["slices"]):
        for key in ("v_rand", "v_info", "voi_split", "voi_merge", "adapted_rand_error"):
            assert a[key] == pytest.approx(b[key], abs=1e-12), key
    # two truth cells, one predicted id covering both although it is cut in two: a merge
    t = np.zeros((1, 4, 5), np.uint8)
    t[:, :, :2] = 1
    t[:, :, 3:] = 1
    one = np.where(t > 0, 5, 0).astype(np.uint32)
    r = E.evaluate(one, t, progress=False)["slices"][0]
    assert r["v_rand"] == pytest.approx(v_rand_by_hand(one[0], t[0])) and r["v_rand"] < 1
    assert r["voi_merge"] == pytest.approx(1.0) and r["voi_split"] == 0.0  # H(T|S) = 1 bit


def test_a_segmentation_of_a_region_is_scored_against_full_labels(stores, tmp_path):
    d, labels, p = stores
    write_pred(tmp_path / "roi.zarr", p[1:3], translation=[1.0, 0.0, 0.0])
    segment(str(tmp_path / "roi.zarr"), str(tmp_path / "seg_roi.zarr"), **SEG_OPTS)
    part = E.evaluate(str(tmp_path / "seg_roi.zarr"), str(d / "labels.zarr"), progress=False)
    whole = E.evaluate(str(d / "seg.zarr"), str(d / "labels.zarr"), slices=slice(1, 3),
                       progress=False)
    assert [r["z"] for r in part["slices"]] == [1, 2] and part["settings"]["offset"] == [1, 0, 0]
    for a, b in zip(part["slices"], whole["slices"]):  # 2-D segmentation: same per slice
        assert a["v_rand"] == pytest.approx(b["v_rand"], abs=1e-12)
        assert a["adapted_rand_error"] == pytest.approx(b["adapted_rand_error"], abs=1e-12)


def test_is_label_image(stores):
    d, labels, p = stores
    assert E.is_label_image(str(d / "seg.zarr"), np.uint32)
    assert E.is_label_image(str(d / "seg.zarr/0"), np.uint32)  # the array inside the store
    assert not E.is_label_image(str(d / "pred.zarr"), np.float32)
    assert not E.is_label_image(str(d / "labels.zarr"), np.uint32)  # converted labels, by record
    for dtype in ("uint32", "uint64", "int32", "int64"):
        assert E.is_label_image(np.zeros(2, dtype), dtype)
    for dtype in ("bool", "uint8", "int8", "uint16", "int16", "float32"):
        assert not E.is_label_image(np.zeros(2, dtype), dtype)


# --------------------------------------------------------------------------- CLI, JSON, CSV


def test_cli_scores_a_label_image_with_json_and_csv(stores, tmp_path):
    d, _, _ = stores
    res = CliRunner().invoke(main, [
        "evaluate", str(d / "seg.zarr"), str(d / "labels.zarr"), "--slices", "1:3",
        "--json", str(tmp_path / "s.json"), "--csv", str(tmp_path / "s.csv"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "label image (uint32)" in res.output and "scored as   a segmentation" in res.output
    head = next(line for line in res.output.splitlines() if line.lstrip().startswith("slice"))
    assert head.split() == ["slice", "V-Rand", "V-Info", "RandErr", "VOIsplit", "VOImerge",
                            "ARE", "pixErr", "F1"]  # no threshold named: there is none
    direct = E.evaluate(str(d / "seg.zarr"), str(d / "labels.zarr"), slices=slice(1, 3),
                        progress=False)
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["mean"] == pytest.approx(direct["mean"])
    assert data["settings"]["label_image"] is True and data["settings"]["threshold"] is None
    assert data["settings"]["thresholds"] == [] and "voi_split, voi_merge, adapted_rand_error" \
        in data["settings"]["conventions"]
    assert {"voi_split", "voi_merge", "adapted_rand_error"} <= set(data["slices"][0])
    rows = list(csv.reader((tmp_path / "s.csv").open()))
    assert "threshold=" in rows[0] and "label_image=True" in rows[0]
    header = rows[1]
    assert {"voi_split", "voi_merge", "adapted_rand_error"} <= set(header)
    body = [dict(zip(header, row)) for row in rows[2:]]
    assert [b["row"] for b in body] == ["slice", "slice", "mean", "pixel"]
    assert body[0]["threshold"] == "" and body[0]["z"] == "1"
    for key in ("v_rand", "voi_split", "voi_merge", "adapted_rand_error"):
        assert float(body[2][key]) == pytest.approx(direct["mean"][key], abs=1e-12)
    mean_line = next(line for line in res.output.splitlines() if line.lstrip().startswith("mean"))
    assert f"{direct['mean']['voi_split']:.4f}" in mean_line
    assert f"{direct['mean']['adapted_rand_error']:.4f}" in mean_line


def test_map_csv_and_report_carry_the_cremi_scores(stores, tmp_path):
    d, _, _ = stores
    res = CliRunner().invoke(main, ["evaluate", str(d / "pred.zarr"), str(d / "labels.zarr"),
                                    "--sweep", "--csv", str(tmp_path / "m.csv"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "VOIsplit@0.5" in res.output and "ARE@0.5" in res.output
    direct = E.evaluate(str(d / "pred.zarr"), str(d / "labels.zarr"), sweep=True, progress=False)
    rows = list(csv.reader((tmp_path / "m.csv").open()))
    header = rows[1]
    sweep = [dict(zip(header, row)) for row in rows[2:] if row[0] == "sweep"]
    assert len(sweep) == 11
    assert [float(s["adapted_rand_error"]) for s in sweep] == pytest.approx(
        direct["sweep"]["adapted_rand_error"], abs=1e-12)
    assert [float(s["voi_merge"]) for s in sweep] == pytest.approx(direct["sweep"]["voi_merge"])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, option", [({"sweep": True}, "sweep=True"),
                                        ({"threshold": 0.3}, "threshold=0.3"),
                                        ({"invert": True}, "invert=True")])
def test_map_options_are_refused_with_a_label_image(stores, tmp_path, kw, option):
    d, _, _ = stores
    with pytest.raises(EmtileError, match=f"^{option} does not apply to a label image: pred "
                                          f"'.*seg.zarr' is scored as a segmentation"):
        E.evaluate(str(d / "seg.zarr"), str(d / "labels.zarr"), progress=False,
                   json_path=tmp_path / "s.json", **kw)
    assert not (tmp_path / "s.json").exists()


def test_cli_sweep_with_a_label_image_is_one_line(stores, tmp_path):
    d, _, _ = stores
    res = CliRunner().invoke(main, ["evaluate", str(d / "seg.zarr"), str(d / "labels.zarr"),
                                    "--sweep", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 1
    assert res.output.startswith("Error: --sweep does not apply to a label image")
    assert res.output.count("\n") == 1 and "Traceback" not in res.output
    assert not (tmp_path / "s.json").exists()


def test_shapes_differ(stores, tmp_path):
    d, labels, _ = stores
    tifffile.imwrite(tmp_path / "small.tif", labels[:, :, :50], photometric="minisblack")
    with pytest.raises(EmtileError, match=r"seg.zarr has shape \(3, 64, 64\) but labels .*small"
                                          r".tif have shape \(3, 64, 50\); they must match"):
        E.evaluate(str(d / "seg.zarr"), str(tmp_path / "small.tif"), progress=False)


def test_a_segmentation_as_labels_is_refused(stores):
    """labels must be binary (cell interior / membrane): instance ids are not accepted there."""
    d, _, p = stores
    with pytest.raises(EmtileError, match=r"labels '.*seg.zarr' is a segmentation \(emtile "
                                          r"segment wrote it\), not binary labels: .* a "
                                          r"segmentation is scored by giving it as pred="):
        E.evaluate(str(d / "pred.zarr"), str(d / "seg.zarr"), progress=False)
    with pytest.raises(EmtileError, match="labels are not binary in slice 0"):
        E.evaluate(p, read_seg(d / "seg.zarr"), progress=False)  # an array says nothing: values


def test_negative_ids_and_integer_predictions_out_of_range(stores):
    _, labels, _ = stores
    seg = np.ones(labels.shape, np.int32)
    seg[1, 3, 4] = -2
    with pytest.raises(EmtileError, match=r"label image 'pred array' in slices 0-2 has negative "
                                          r"ids \(down to -2\)"):
        E.evaluate(seg, labels, progress=False)
    with pytest.raises(EmtileError, match=r"0-255 probabilities .*\(a label image is scored as "
                                          r"segments when it is uint32, uint64, int32 or int64"):
        E.evaluate(np.full(labels.shape, 300, np.int16), labels, progress=False)
