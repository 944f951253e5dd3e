"""emtile.metrics: hand-worked cases, cross-checks against scikit-image / scikit-learn and a direct
re-implementation of the ISBI formulas, slab-wise accumulation, and every error branch."""

import math

import numpy as np
import pytest
from scipy import ndimage

from emtile import EmtileError
from emtile import evaluation as E
from emtile import metrics as M


# --------------------------------------------------------------------------- reference formulas


def ref_scores(truth_seg, pred_seg):
    """Direct transcription of the formulas: probabilities p_ij over the truth foreground,
    predicted 0 = singletons (relabelled with fresh ids), I via sum p log(p / (s t))."""
    t = truth_seg.ravel().astype(np.int64)
    s = pred_seg.ravel().astype(np.int64)
    keep = t > 0
    t, s = t[keep], s[keep]
    n = t.size
    s = s.copy()
    zero = np.flatnonzero(s == 0)
    s[zero] = s.max(initial=0) + 1 + np.arange(zero.size)  # each boundary pixel its own segment
    pairs, cij = np.unique(np.stack([t, s]), axis=1, return_counts=True)
    p = cij / n
    tv, ti = np.unique(t, return_counts=True)
    sv, si = np.unique(s, return_counts=True)
    tp, sp = ti / n, si / n
    vrand = np.sum(p ** 2) / (0.5 * np.sum(sp ** 2) + 0.5 * np.sum(tp ** 2))
    t_of = dict(zip(tv.tolist(), tp.tolist()))
    s_of = dict(zip(sv.tolist(), sp.tolist()))
    mi = sum(pk * math.log(pk / (t_of[i] * s_of[j])) for pk, i, j in zip(p, pairs[0], pairs[1]))
    ht = -np.sum(tp * np.log(tp))
    hs = -np.sum(sp * np.log(sp))
    return vrand, 2 * mi / (hs + ht), s.reshape(-1), t


def relabel_singletons(truth_seg, pred_seg):
    """Truth-foreground pixels, prediction with every 0 given a fresh label (for skimage/sklearn)."""
    _, _, s, t = ref_scores(truth_seg, pred_seg)
    return t, s


# --------------------------------------------------------------------------- hand-worked cases


def two_cells():
    """Truth 3x7: cell A = cols 0-1 (6 px), membrane col 2, cell B = cols 3-5 (9 px)... plus col 6
    membrane. n = 15."""
    t = np.zeros((3, 7), np.uint8)
    t[:, 0:2] = 1
    t[:, 3:6] = 1
    return t


def test_identical_segmentations_score_one():
    t = two_cells()
    s = M.isbi_scores(t.astype(np.float32), t)
    assert s["v_rand"] == 1.0 and s["v_info"] == pytest.approx(1.0, abs=1e-15)
    assert s["rand_error"] == 0.0
    seg = M.truth_segments(t)
    assert M.v_rand(seg, seg) == 1.0
    assert M.v_info(seg, seg) == pytest.approx(1.0, abs=1e-15)


def test_one_pixel_split_lowers_v_rand_by_hand_computed_amount():
    t = two_cells()
    pred = t.astype(np.float32)
    pred[:, 4] = 0.0  # a one-pixel-wide membrane splits cell B into B1 (col 3) and B2 (col 5)
    # Restricted to the truth foreground (n = 15):
    #   truth sizes t = [6, 9]                       -> sum t^2 = 36 + 81 = 117
    #   predicted: A = 6, B1 = 3, B2 = 3, and the 3 line pixels of col 4 are singletons
    #                                                -> sum s^2 = 36 + 9 + 9 + 3 = 57
    #   joint: (A,A)=6, (B,B1)=3, (B,B2)=3, 3 singletons -> sum p^2 = 57 (S refines T)
    #   V-Rand = 57 / (57/2 + 117/2) = 57/87; before the split it was 1: drop = 30/87 = 10/29
    s = M.isbi_scores(pred, t)
    assert s["sum_t2"] == 117 and s["sum_s2"] == 57 and s["sum_p2"] == 57 and s["singletons"] == 3
    assert s["v_rand"] == pytest.approx(57 / 87, abs=1e-15)
    assert 1.0 - s["v_rand"] == pytest.approx(10 / 29, abs=1e-15)
    # V-Info: S refines T so H(S,T) = H(S) and I = H(T)
    ht = -(6 / 15 * math.log(6 / 15) + 9 / 15 * math.log(9 / 15))
    hs = -(6 / 15 * math.log(6 / 15) + 2 * 3 / 15 * math.log(3 / 15)) + 3 / 15 * math.log(15)
    assert s["h_truth"] == pytest.approx(ht, abs=1e-12)
    assert s["h_pred"] == pytest.approx(hs, abs=1e-12)
    assert s["v_info"] == pytest.approx(2 * ht / (hs + ht), abs=1e-12)


def test_merge_of_two_cells_by_hand():
    # truth: two 1x2 cells separated by membrane; prediction: one segment across them
    t = np.array([[1, 1, 0, 1, 1]], np.uint8)
    pred = np.ones((1, 5), np.float32)
    # n = 4, t = [2, 2], s = [4], p = [2, 2]: V-Rand = 8 / (16/2 + 8/2) = 2/3; H(S) = 0 -> I = 0
    s = M.isbi_scores(pred, t)
    assert s["v_rand"] == pytest.approx(2 / 3, abs=1e-15)
    assert s["v_info"] == 0.0


def test_all_boundary_prediction_is_all_singletons():
    t = two_cells()
    s = M.isbi_scores(np.zeros(t.shape, np.float32), t)
    # 15 singletons: sum p^2 = sum s^2 = 15, sum t^2 = 117 -> V-Rand = 15 / 66
    assert s["singletons"] == 15
    assert s["v_rand"] == pytest.approx(15 / 66, abs=1e-15)
    # H(S) = log 15, I = H(T)
    ht = -(6 / 15 * math.log(6 / 15) + 9 / 15 * math.log(9 / 15))
    assert s["v_info"] == pytest.approx(2 * ht / (ht + math.log(15)), abs=1e-12)


def test_empty_truth_slice_is_defined():
    t = np.zeros((4, 4), np.uint8)
    s = M.isbi_scores(np.full((4, 4), 0.9, np.float32), t)
    assert s["empty"] and s["v_rand"] == 1.0 and s["v_info"] == 1.0 and s["rand_error"] == 0.0


def test_single_segment_case_scores_one():
    t = np.ones((3, 3), np.uint8)
    s = M.isbi_scores(np.ones((3, 3), np.float32), t)
    assert s["h_truth"] == 0.0 and s["h_pred"] == 0.0
    assert s["v_info"] == 1.0 and s["v_rand"] == 1.0


def test_thin_boundaries_wide_boundary_becomes_one_pixel():
    fg = np.ones((4, 9), bool)
    fg[:, 3:6] = False  # 3 wide
    out = M.thin_boundaries(fg)
    assert (out[:, 4] == 0).all() and (out[:, :4] == 1).all() and (out[:, 5:] == 2).all()
    fg = np.ones((4, 8), bool)
    fg[:, 3:5] = False  # 2 wide: still exactly one line pixel per row
    out = M.thin_boundaries(fg)
    assert ((out == 0).sum(axis=1) == 1).all()
    dangling = np.ones((5, 5), bool)
    dangling[2, :3] = False  # a boundary stub that separates nothing is absorbed
    assert (M.thin_boundaries(dangling) == 1).all()
    assert (M.thin_boundaries(np.zeros((3, 3), bool)) == 0).all()


def test_thin_boundaries_properties_on_isbi(isbi_labels):
    fg = ndimage.binary_erosion(isbi_labels[3] > 0, iterations=2)
    out = M.thin_boundaries(fg)
    comps, k = ndimage.label(fg, structure=M._FOUR)
    assert out.max() == k
    assert (out[fg] == comps[fg]).all()  # interiors keep their label
    # no two different segments are 4-adjacent
    for a, b in ((out[:, 1:], out[:, :-1]), (out[1:], out[:-1])):
        assert not ((a > 0) & (b > 0) & (a != b)).any()


# --------------------------------------------------------------------------- cross-checks


def perturbations(label_slice, rng):
    fg = label_slice > 0
    noisy = fg ^ (rng.random(fg.shape) < 0.02)
    blurred = ndimage.gaussian_filter(fg.astype(float), 2.0) + rng.normal(0, 0.2, fg.shape)
    return {
        "eroded": ndimage.binary_erosion(fg, iterations=2),
        "dilated": ndimage.binary_dilation(fg, iterations=2),
        "noisy": noisy,
        "blurred_noisy": blurred > 0.5,
        "shifted": np.roll(fg, 3, axis=1),
    }


@pytest.mark.parametrize("z", [0, 17])
def test_agrees_with_direct_reimplementation_on_isbi(isbi_labels, z):
    rng = np.random.default_rng(z)
    tseg = M.truth_segments(isbi_labels[z])
    for name, fg in perturbations(isbi_labels[z], rng).items():
        pseg = M.thin_boundaries(fg)
        stats = M.segmentation_stats(tseg, pseg)
        vr, vi, _, _ = ref_scores(tseg, pseg)
        assert abs(stats["v_rand"] - vr) < 1e-9, name
        assert abs(stats["v_info"] - vi) < 1e-9, name


def test_against_skimage_and_sklearn(isbi_labels):
    from skimage.metrics import adapted_rand_error, variation_of_information
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(1)
    tseg = M.truth_segments(isbi_labels[5])
    for name, fg in perturbations(isbi_labels[5], rng).items():
        pseg = M.thin_boundaries(fg)
        st = M.segmentation_stats(tseg, pseg)
        t, s = relabel_singletons(tseg, pseg)
        # V-Info: conventions coincide once singletons have their own labels
        assert st["v_info"] == pytest.approx(
            normalized_mutual_info_score(t, s, average_method="arithmetic"), abs=1e-9)
        h_s_given_t, h_t_given_s = variation_of_information(t, s)  # bits
        assert st["h_joint"] - st["h_truth"] == pytest.approx(h_s_given_t * math.log(2), abs=1e-9)
        assert st["h_joint"] - st["h_pred"] == pytest.approx(h_t_given_s * math.log(2), abs=1e-9)
        # V-Rand: skimage counts pairs of distinct pixels, sum c(c-1) instead of sum c^2, and
        # names precision/recall the other way round; translate our sums and compare
        are, prec, rec = adapted_rand_error(t, s, ignore_labels=(0,))
        n = st["n"]
        p2, s2, t2 = st["sum_p2"] - n, st["sum_s2"] - n, st["sum_t2"] - n
        assert 1 - are == pytest.approx(p2 / (0.5 * s2 + 0.5 * t2), abs=1e-12)
        assert prec == pytest.approx(p2 / t2, abs=1e-12)
        assert rec == pytest.approx(p2 / s2, abs=1e-12)
    # identical segmentations: both conventions agree exactly
    assert adapted_rand_error(tseg, tseg)[0] == 0.0 and M.v_rand(tseg, tseg) == 1.0


def test_pixel_metrics_by_hand_and_against_sklearn(rng):
    from sklearn.metrics import classification_report, f1_score, jaccard_score

    # 4 pixels: (truth, pred) = (1,1), (0,1), (1,0), (0,0): TP=FP=FN=TN=1
    m = M.pixel_metrics(np.array([0.9, 0.6, 0.4, 0.1]), np.array([1, 0, 1, 0]))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 1)
    assert m["accuracy"] == 0.5 and m["f1"] == 0.5 and m["iou"] == 1 / 3
    p = rng.random((3, 20, 20))
    t = (rng.random((3, 20, 20)) < 0.6).astype(np.uint8) * 255
    m = M.pixel_metrics(p, t, threshold=0.3)
    yt, yp = (t > 0).ravel(), (p > 0.3).ravel()
    assert m["f1"] == pytest.approx(f1_score(yt, yp), abs=1e-12)
    assert m["iou"] == pytest.approx(jaccard_score(yt, yp), abs=1e-12)
    full = classification_report(yt.astype(int), yp.astype(int), labels=[0, 1],
                                 target_names=["membrane (0)", "cell (1)"], digits=4,
                                 sample_weight=np.ones(yt.size), zero_division=0.0)
    assert m["classification_report"] == full


def test_zero_division_conventions():
    m = M.metrics_from_counts(0, 0, 0, 10)  # no foreground anywhere: perfect
    assert m["precision"] == m["recall"] == m["f1"] == m["iou"] == 1.0
    m = M.metrics_from_counts(0, 0, 5, 5)  # nothing predicted, something missed
    assert m["precision"] == 0.0 and m["f1"] == 0.0


# --------------------------------------------------------------------------- evaluate


def blurred_prediction(labels, seed=0):
    rng = np.random.default_rng(seed)
    p = ndimage.gaussian_filter((labels > 0).astype(np.float32), (0, 2, 2))
    return np.clip(p + rng.normal(0, 0.1, p.shape), 0, 1).astype(np.float32)


def test_evaluate_matches_per_slice_functions_and_slab_size(isbi_labels, monkeypatch):
    labels = isbi_labels[:4, :128, :160]
    pred = blurred_prediction(labels)
    r = E.evaluate(pred, labels, progress=False)
    for row, z in zip(r["slices"], range(4)):
        s = M.isbi_scores(pred[z], labels[z])
        assert row["v_rand"] == s["v_rand"] and row["v_info"] == s["v_info"]
    whole = M.pixel_metrics(pred, labels)
    assert r["pixel"]["confusion_matrix"] == whole["confusion_matrix"]
    assert r["mean"]["v_rand"] == pytest.approx(np.mean([s["v_rand"] for s in r["slices"]]))
    monkeypatch.setattr(E, "_SLAB_BYTES", 1)  # one slice per read
    assert E.evaluate(pred, labels, progress=False) == r


def test_evaluate_uint8_float_invert_and_mask_agree(isbi_labels):
    labels = isbi_labels[10:12, :96, :96]
    pred = blurred_prediction(labels, seed=3)
    u8 = np.round(pred * 255).astype(np.uint8)
    a = E.evaluate(u8, labels, progress=False)
    b = E.evaluate(u8.astype(np.float64) / 255, labels, progress=False)
    c = E.evaluate(255 - u8, labels, invert=True, progress=False)
    mask = (u8 > 127).astype(np.uint8)  # 0/1 integers: read as a mask
    d = E.evaluate(mask, labels, progress=False)
    for other in (b, c, d):
        assert other["mean"]["v_rand"] == a["mean"]["v_rand"]
        assert other["pixel"]["confusion_matrix"] == a["pixel"]["confusion_matrix"]
    assert d["settings"]["prediction_kind"] == "mask (integer 0/1)"
    assert a["settings"]["prediction_kind"].startswith("probability (integer")


def test_uint8_threshold_is_exact():
    t = np.ones((1, 2, 2), np.uint8)
    p = np.array([[[153, 154], [153, 154]]], np.uint8)  # 153/255 == 0.6 exactly: not > 0.6
    m = E.evaluate(p, t, threshold=0.6, progress=False)["pixel"]
    assert m["tp"] == 2 and m["fn"] == 2


def test_integer_mask_switches_to_probabilities_when_values_above_one_appear(monkeypatch):
    t = np.ones((2, 4, 4), np.uint8)
    p = np.zeros((2, 4, 4), np.uint8)
    p[0] = 1      # slice 0 alone looks like a 0/1 mask ...
    p[1] = 200    # ... but slice 1 shows 0-255 probabilities: 1/255 is background after all
    monkeypatch.setattr(E, "_SLAB_BYTES", 1)
    r = E.evaluate(p, t, progress=False)
    assert r["slices"][0]["tp"] == 0 and r["slices"][1]["tp"] == 16


def test_sweep_picks_best_threshold_per_metric(isbi_labels):
    labels = isbi_labels[:2, :128, :128]
    pred = blurred_prediction(labels, seed=5)
    r = E.evaluate(pred, labels, sweep=True, progress=False)
    sw = r["sweep"]
    assert sw["thresholds"] == [k / 10 for k in range(11)]
    for t, vr, vi in zip(sw["thresholds"], sw["v_rand"], sw["v_info"]):
        single = E.evaluate(pred, labels, threshold=t, progress=False)["mean"]
        assert vr == single["v_rand"] and vi == single["v_info"]
    assert sw["best_v_rand"]["value"] == max(sw["v_rand"])
    assert sw["best_v_rand"]["threshold"] == sw["thresholds"][int(np.argmax(sw["v_rand"]))]
    assert sw["best_v_info"]["value"] == max(sw["v_info"])
    assert r["mean"]["v_rand_best"] == max(sw["v_rand"])


def test_empty_slices_are_excluded_from_the_mean():
    t = np.zeros((2, 6, 6), np.uint8)
    t[0, :, :2] = 1
    t[0, :, 3:] = 1
    p = np.zeros((2, 6, 6), np.float32)
    p[0, :, 3:] = 1.0  # slice 0: cell A missed entirely
    r = E.evaluate(p, t, progress=False)
    assert r["slices"][1]["empty"] and r["slices"][1]["v_rand"] == 1.0
    assert r["mean"]["v_rand"] == r["slices"][0]["v_rand"] < 1.0
    assert r["mean"]["slices_empty"] == 1


def test_evaluate_reads_paths(tmp_path, isbi_labels):
    import tifffile
    import zarr

    labels = isbi_labels[:3, :64, :64]
    pred = np.round(blurred_prediction(labels) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    z = zarr.create_array(str(tmp_path / "pred.zarr"), shape=pred.shape, dtype="uint8",
                          chunks=(1, 32, 32))
    z[:] = pred
    r = E.evaluate(tmp_path / "pred.zarr", str(tmp_path / "labels.tif"), slices=slice(1, 3),
                   progress=False)
    assert [row["z"] for row in r["slices"]] == [1, 2]
    assert r == {**E.evaluate(pred, labels, slices=[1, 2], progress=False),
                 "settings": r["settings"]}
    assert r["settings"]["pred"].endswith("pred.zarr")


# --------------------------------------------------------------------------- errors


def test_error_shapes_differ_names_both():
    with pytest.raises(EmtileError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        E.evaluate(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), np.uint8), progress=False)


def test_error_float_prediction_out_of_range():
    with pytest.raises(EmtileError, match=r"\[0, 1\]"):
        E.evaluate(np.full((1, 3, 3), 1.5), np.ones((1, 3, 3), np.uint8), progress=False)
    with pytest.raises(EmtileError, match="NaN"):
        E.evaluate(np.full((1, 3, 3), np.nan), np.ones((1, 3, 3), np.uint8), progress=False)


def test_error_integer_prediction_out_of_range():
    with pytest.raises(EmtileError, match="0-255"):
        E.evaluate(np.full((1, 3, 3), 300, np.int16), np.ones((1, 3, 3), np.uint8), progress=False)


def test_error_labels_not_binary():
    p = np.zeros((2, 3, 3), np.float32)
    with pytest.raises(EmtileError, match="not binary"):
        E.evaluate(p, np.full((2, 3, 3), 2, np.uint8), progress=False)
    mixed = np.ones((2, 3, 3), np.uint8)
    mixed[1] = 255  # 1 in one slice, 255 in the next
    with pytest.raises(EmtileError, match="not binary"):
        E.evaluate(p, mixed, progress=False)


def test_error_slices_outside_volume():
    p, t = np.zeros((5, 3, 3), np.float32), np.ones((5, 3, 3), np.uint8)
    with pytest.raises(EmtileError, match=r"slices=25:30 is outside the volume, which has 5 slices"):
        E.evaluate(p, t, slices=slice(25, 30), progress=False)
    with pytest.raises(EmtileError, match="slices=7 is outside"):
        E.evaluate(p, t, slices=[1, 7], progress=False)


def test_error_threshold():
    with pytest.raises(EmtileError, match="threshold=1.5"):
        E.evaluate(np.zeros((1, 2, 2)), np.ones((1, 2, 2), np.uint8), threshold=1.5, progress=False)
