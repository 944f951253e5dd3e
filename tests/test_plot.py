"""emtile.plot and `emtile show`: figures are written, valid PNG/PDF, with the expected panels."""

import numpy as np
import pytest
from click.testing import CliRunner

from emtile import EmtileError
from emtile import plot as P
from emtile.cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def volumes(tmp_path, isbi_raw, isbi_labels):
    import tifffile
    import zarr

    raw, labels = isbi_raw[:3, :96, :128], isbi_labels[:3, :96, :128]
    from scipy import ndimage

    pred = ndimage.gaussian_filter((labels > 0).astype(np.float32), (0, 1.5, 1.5))
    pred_u8 = np.round(pred * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    z = zarr.create_array(str(tmp_path / "pred.zarr"), shape=pred_u8.shape, dtype="uint8",
                          chunks=(1, 48, 64))
    z[:] = pred_u8
    return tmp_path, raw, labels, pred_u8


def panels(fig):
    return [getattr(ax, "emtile_panel", None) for ax in fig.axes if hasattr(ax, "emtile_panel")]


def test_comparison_figure_panels_and_png(volumes):
    d, raw, labels, pred = volumes
    fig = P.show(str(d / "raw.tif"), pred=str(d / "pred.zarr"), labels=str(d / "labels.tif"),
                 slices=[0, 2], output=d / "fig.png")
    assert panels(fig) == ["raw", "probability", "mask", "truth", "errors"] * 2
    assert len(fig.axes) == 11  # 10 panels + the colour bar
    data = (d / "fig.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    errors_ax = [ax for ax in fig.axes if getattr(ax, "emtile_panel", "") == "errors"]
    assert "V-Rand" in errors_ax[0].get_title() and "V-Info" in errors_ax[0].get_title()
    legend = errors_ax[0].get_legend()
    # named as EM reads them: a missing membrane merges cells, an extra one splits a cell
    assert [t.get_text() for t in legend.get_texts()] == [
        "missing membrane (merge)", "extra membrane (split)", "merged cells (outline)"]


def test_titles_carry_the_slice_scores(volumes):
    from emtile.metrics import isbi_scores

    _, raw, labels, pred = volumes
    fig = P.comparison_figure(raw, pred=pred, labels=labels, slices=[1], threshold=0.3)
    s = isbi_scores(pred[1], labels[1], threshold=0.3)
    title = [ax for ax in fig.axes if getattr(ax, "emtile_panel", "") == "errors"][0].get_title()
    assert f"V-Rand {s['v_rand']:.4f} at 0.3" in title and f"V-Info {s['v_info']:.4f}" in title
    # and at the best threshold of the challenge's grid, named
    sweep = [(isbi_scores(pred[1], labels[1], threshold=k / 10)["v_rand"], k / 10) for k in range(11)]
    best = max(sweep, key=lambda vt: (vt[0], -vt[1]))
    assert f", {best[0]:.4f} at {best[1]:g} (best)" in title


def test_pdf_and_subsets_of_panels(volumes):
    d, raw, labels, pred = volumes
    fig = P.show(raw, labels=labels, slices=[1], output=d / "t.pdf")
    assert panels(fig) == ["raw", "truth"]
    assert (d / "t.pdf").read_bytes().startswith(b"%PDF")
    mask = pred > 127
    fig = P.comparison_figure(raw, pred=mask, labels=labels, slices=[0])
    assert panels(fig) == ["raw", "mask", "truth", "errors"]  # a mask has no probability panel


def test_roi_reads_only_the_crop(volumes):
    d, raw, labels, pred = volumes

    class Spy:
        def __init__(self, a):
            self.a, self.shape, self.dtype, self.keys = a, a.shape, a.dtype, []

        def __getitem__(self, key):
            self.keys.append(key)
            return self.a[key]

    spy = Spy(raw)
    fig = P.comparison_figure(spy, pred=pred, labels=labels, roi=(slice(1, 3), slice(10, 42), slice(20, 60)))
    assert panels(fig) == ["raw", "probability", "mask", "truth", "errors"] * 2
    assert spy.keys == [(slice(1, 2), slice(10, 42), slice(20, 60)),
                        (slice(2, 3), slice(10, 42), slice(20, 60))]
    img = [ax for ax in fig.axes if getattr(ax, "emtile_panel", "") == "raw"][0].get_images()[0]
    assert img.get_array().shape == (32, 40)


def test_bad_inputs(volumes):
    d, raw, labels, pred = volumes
    with pytest.raises(EmtileError, match=r"roi=0:500,0:10 is outside the volume of shape \(96, 128\)"):
        P.comparison_figure(raw, roi=(slice(0, 500), slice(0, 10)))
    with pytest.raises(EmtileError, match="outside the volume"):
        P.comparison_figure(raw, slices=[7])
    with pytest.raises(EmtileError, match="must match"):
        P.comparison_figure(raw, labels=labels[:, :10])
    with pytest.raises(EmtileError, match=r"^output='.*fig\.jpg' must end in \.png or \.pdf$"):
        P.show(raw, output=d / "fig.jpg")
    with pytest.raises(EmtileError, match=r"^nothing to show: give raw= \(with pred=, labels= or "
                                          r"seg=\) or log= "):
        P.show()
    with pytest.raises(EmtileError, match=r"^give either raw= \(a comparison figure\) or log= \(a "
                                          r"training curve\), not both$"):
        P.show(raw, log=d / "train.csv")


def write_log(path):
    # the columns of emtile.training.logs.CSV_COLUMNS, in its order
    lines = ["iteration,loss,lr,val_loss,val_pixel_error,val_f1,val_vrand,val_vrand_threshold,"
             "val_vrand_05,elapsed_s"]
    for i in range(1, 201):
        val = i % 50 == 0
        v = (f"{1 / i:.4f},{0.2 - i / 2000:.4f},{0.8 + i / 1000:.4f},{0.7 + i / 1000:.4f},"
             f"{0.1 * (i // 50 + 4):g},{0.6 + i / 1000:.4f}" if val else ",,,,,")
        lines.append(f"{i},{2.0 / i ** 0.5:.5f},0.0001,{v},{0.4 * i:.2f}")
    path.write_text("\n".join(lines) + "\n")


def gids(ax):
    return sorted(str(line.get_gid()) for line in ax.get_lines())


def test_training_curve(tmp_path):
    from emtile.training.logs import CSV_COLUMNS

    log = tmp_path / "train.csv"
    write_log(log)
    fig = P.show(log=log, output=tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes().startswith(PNG_MAGIC)
    assert tuple(log.read_text().splitlines()[0].split(",")) == CSV_COLUMNS
    loss, scores = fig.axes  # bookkeeping (lr, elapsed_s, thresholds) on neither panel
    assert (loss.emtile_panel, scores.emtile_panel) == ("loss", "validation")
    assert gids(loss) == ["loss", "val_loss"]
    assert gids(scores) == ["val_f1", "val_pixel_error", "val_vrand", "val_vrand_05"]
    # validation as lines through its points, on a labelled [0, 1] axis, V-Rand by threshold
    f1 = next(line for line in scores.get_lines() if line.get_gid() == "val_f1")
    assert len(f1.get_xdata()) == 4 and f1.get_linestyle() == "-"
    assert scores.get_ylabel() == "validation score" and scores.get_ylim() == (0.0, 1.02)
    labels = {line.get_gid(): line.get_label() for line in scores.get_lines()}
    assert labels["val_vrand"].startswith("V-Rand at its best threshold")
    assert labels["val_vrand_05"] == "V-Rand at 0.5" and labels["val_pixel_error"] == "pixel error at 0.5"
    assert [t.get_text() for t in scores.texts] == ["0.5", "0.6", "0.7", "0.8"]  # each threshold


def test_training_curve_of_a_run_folder_marks_freeze_and_calibration(tmp_path):
    import json

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    write_log(run / "train.csv")
    (run / "run.json").write_text(json.dumps({"settings": {
        "iterations": 200, "batch_norm": True, "freeze_bn": 0.7}}))
    after = {"val_vrand": 0.93, "val_vrand_threshold": 0.9, "val_pixel_error": 0.08}
    (run / "best" / "metadata.json").write_text(json.dumps({"emtile": {"calibration": {
        "offset": 1.0, "threshold": 0.27, "kept": True, "val_after": after}}}))
    for fig in (P.training_curve(run), P.show(str(run), output=tmp_path / "c.png"),
                P.show(log=str(run / "train.csv"))):
        loss, scores = fig.axes
        for ax in (loss, scores):
            freeze = [line for line in ax.get_lines() if line.get_gid() == "freeze"]
            assert len(freeze) == 1 and list(freeze[0].get_xdata()) == [140, 140]
            assert "batch norm frozen at 140" in freeze[0].get_label()
        cal = next(line for line in scores.get_lines() if line.get_gid() == "calibration")
        assert list(cal.get_ydata()) == [0.93, 0.08] and list(cal.get_xdata()) == [200, 200]
        assert cal.get_label().startswith("after calibration (kept): V-Rand 0.930 at 0.9")
    r = CliRunner().invoke(main, ["show", "--log", str(run), "-o", str(tmp_path / "r.png")])
    assert r.exit_code == 0, r.output
    (tmp_path / "plain").mkdir()
    with pytest.raises(EmtileError, match="is a folder but not a training run"):
        P.training_curve(tmp_path / "plain")


def test_merge_outlines_by_hand():
    truth = np.ones((6, 11), bool)
    truth[:, 5] = False  # two cells side by side
    mask = np.ones((6, 11), bool)
    mask[:3, 5] = False  # a membrane with a gap: one predicted segment holds both cells
    n, outline = P.merge_outlines(mask, truth)
    assert n == 1 and outline[0, 0] and outline[5, 10] and not outline[2, 2]
    n, outline = P.merge_outlines(truth, truth)  # the membrane closed: no merge
    assert n == 0 and not outline.any()
    split = truth.copy()
    split[3, :] = False  # extra membrane splits each cell: no merge either
    assert P.merge_outlines(split, truth)[0] == 0


def test_merges_are_drawn(volumes):
    _, raw, labels, pred = volumes
    leaky = pred.copy()
    leaky[:, :, 60:64] = 255  # wipe a band of membrane: cells merge across it
    fig = P.comparison_figure(raw, pred=leaky, labels=labels, slices=[0])
    ax = next(ax for ax in fig.axes if getattr(ax, "emtile_panel", "") == "errors")
    rgb = ax.get_images()[0].get_array()
    n = P.merge_outlines(leaky[0] > 127, labels[0] > 0)[0]
    assert n > 0 and f"{n} merged segment" in ax.get_title()
    assert np.all(rgb == P.MERGE_COLOR, axis=-1).any()


def test_training_curve_errors(tmp_path):
    with pytest.raises(EmtileError, match="does not exist"):
        P.training_curve(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(EmtileError, match="empty"):
        P.training_curve(tmp_path / "empty.csv")


def test_cli_show(volumes):
    d, *_ = volumes
    runner = CliRunner()
    res = runner.invoke(main, ["show", str(d / "raw.tif"), "--pred", str(d / "pred.zarr"),
                               "--labels", str(d / "labels.tif"), "--slices", "0,2",
                               "--roi", "0:64,0:64", "-o", str(d / "c.png")])
    assert res.exit_code == 0, res.output
    assert (d / "c.png").read_bytes().startswith(PNG_MAGIC)
    write_log(d / "train.csv")
    res = runner.invoke(main, ["show", "--log", str(d / "train.csv"), "-o", str(d / "curve.pdf")])
    assert res.exit_code == 0, res.output
    assert (d / "curve.pdf").read_bytes().startswith(b"%PDF")
    res = runner.invoke(main, ["show", str(d / "raw.tif"), "--slices", "9", "-o", str(d / "x.png")])
    assert res.exit_code == 1 and "Error:" in res.output and "outside the volume" in res.output
    assert runner.invoke(main, ["show", "--help"]).exit_code == 0


def test_read_log_keeps_every_column_with_nan_for_empty_cells(tmp_path):
    from emtile.training.logs import CSV_COLUMNS

    log = tmp_path / "train.csv"
    write_log(log)
    columns = P.read_log(log)
    assert tuple(columns) == CSV_COLUMNS
    assert columns["iteration"].tolist() == list(range(1, 201))
    assert np.isnan(columns["val_f1"][48]) and columns["val_f1"][49] == pytest.approx(0.85)
    assert np.count_nonzero(~np.isnan(columns["val_vrand"])) == 4
    assert columns["val_vrand_threshold"][49] == pytest.approx(0.5)
    (tmp_path / "one.csv").write_text("iteration,loss\n1,0.5\n")
    one = P.read_log(tmp_path / "one.csv")
    assert {k: v.tolist() for k, v in one.items()} == {"iteration": [1.0], "loss": [0.5]}
    (tmp_path / "header.csv").write_text("iteration,loss\n")
    with pytest.raises(EmtileError, match="has no rows"):
        P.read_log(tmp_path / "header.csv")


def test_figure_that_cannot_be_written_is_refused_before_any_work(volumes, monkeypatch):
    d, *_ = volumes

    def no_reading(*args, **kwargs):
        raise AssertionError("the inputs were opened before the figure file was checked")

    monkeypatch.setattr(P, "_open", no_reading)
    args = ["show", str(d / "raw.tif"), "--pred", str(d / "pred.zarr"), "--labels",
            str(d / "labels.tif")]
    # the library names the keyword (output=...); the CLI root names the flag
    cases = {d / "missing" / "f.png": f"--output '{d / 'missing' / 'f.png'}': its folder "
                                      f"'{d / 'missing'}' does not exist",
             d / "pred.zarr" / "f.png": f"--output '{d / 'pred.zarr' / 'f.png'}' lies inside the "
                                        f"input '{d / 'pred.zarr'}'"}
    for path, message in cases.items():
        res = CliRunner().invoke(main, [*args, "-o", str(path)])
        assert res.exit_code == 1 and res.output.startswith(f"Error: {message}"), res.output
        assert len(res.output.strip().splitlines()) == 1
    assert not (d / "pred.zarr" / "f.png").exists()
    write_log(d / "train.csv")
    with pytest.raises(EmtileError, match="output='.*train.csv' is the input"):
        P.show(log=d / "train.csv", output=d / "train.csv")
    assert (d / "train.csv").read_text().startswith("iteration,loss")


# --------------------------------------------------------------------------- segmentations (--seg)


@pytest.fixture(scope="module")
def seg_volumes(tmp_path_factory):
    """Synthetic raw and labels, a noisy probability store and two real emtile segment stores of
    it (cells tiling the slice; boundaries kept as 0)."""
    import tifffile
    from conftest import synthetic_em
    from scipy import ndimage

    from emtile.segmenter import segment
    from emtile.store import create_image, mark_complete

    d = tmp_path_factory.mktemp("showseg")
    raw, labels = synthetic_em((3, 64, 64), cells=12, membrane=1.5, seed=2)
    rng = np.random.default_rng(0)
    p = ndimage.gaussian_filter(labels.astype(np.float32), (0, 1.5, 1.5))
    p = np.clip(p + rng.normal(0, 0.15, p.shape), 0, 1).astype(np.float32)
    tifffile.imwrite(d / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(d / "labels.tif", labels, photometric="minisblack")
    g = create_image(d / "pred.zarr", p.shape, np.float32, kind="probabilities")
    g["0"][...] = p
    mark_complete(g)
    segment(str(d / "pred.zarr"), str(d / "seg.zarr"), threshold=0.9, progress=False)
    segment(str(d / "pred.zarr"), str(d / "seg_kb.zarr"), keep_boundaries=True, threshold=0.9,
            progress=False)
    return d, raw, labels


def read_ids(path):
    import zarr

    return np.asarray(zarr.open_group(str(path), mode="r")["0"][...])


def adjacent_pairs(ids):
    """(a, b) position pairs of 4-adjacent pixels holding two different non-zero ids."""
    out = []
    for a, b in ((ids[:, :-1], ids[:, 1:]), (ids[:-1], ids[1:])):
        keep = (a != b) & (a > 0) & (b > 0)
        out.append((a[keep], b[keep]))
    return out


@pytest.mark.parametrize("name", ["seg.zarr", "seg_kb.zarr"])
def test_show_seg_draws_instances_in_distinct_colours_over_raw(seg_volumes, name):
    from emtile.metrics import label_scores

    d, raw, labels = seg_volumes
    fig = P.show(str(d / "raw.tif"), labels=str(d / "labels.tif"), seg=str(d / name),
                 slices=[0, 2], output=d / f"{name}.png")
    assert (d / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert panels(fig) == ["raw", "truth", "segmentation"] * 2
    seg = read_ids(d / name)
    axes = [ax for ax in fig.axes if getattr(ax, "emtile_panel", "") == "segmentation"]
    for ax, z in zip(axes, (0, 2)):
        under, over = ax.get_images()
        assert np.array_equal(np.asarray(under.get_array()), raw[z].astype(np.float64))
        rgba = np.asarray(over.get_array())
        ids = seg[z]
        assert rgba.shape == ids.shape + (4,)
        assert (rgba[ids == 0] == 0).all() and (rgba[ids > 0, 3] == P.SEG_ALPHA).all()
        for i in np.unique(ids[ids > 0]):  # one colour per id
            assert len(np.unique(rgba[ids == i], axis=0)) == 1
        pairs = 0
        for a, b in adjacent_pairs(ids):
            colour = {int(i): rgba[ids == i][0, :3] for i in np.unique(np.concatenate([a, b]))}
            for i, j in set(zip(a.tolist(), b.tolist())):
                assert not np.array_equal(colour[i], colour[j]), (i, j)
                pairs += 1
        s = label_scores(ids, labels[z])
        assert f"V-Rand {s['v_rand']:.4f}" in ax.get_title()
        assert f"ARE {s['adapted_rand_error']:.4f}" in ax.get_title()
        assert f"{len(np.unique(ids[ids > 0]))} objects" in ax.get_title()
    if name == "seg.zarr":
        assert pairs > 20  # cells tile the slice: many touching pairs were checked


def test_segmentation_rgba_neighbours_differ_and_ids_keep_their_colour():
    from matplotlib.colors import rgb_to_hsv

    rng = np.random.default_rng(3)
    ids = rng.choice(2**32 - 1, size=(20, 20), replace=False).astype(np.uint32) + 1
    touching = np.kron(ids, np.ones((3, 3), np.uint32))  # 400 segments, 32 table colours
    gapped = np.zeros((80, 80), np.uint32)  # the same blocks apart by one-pixel 0 lines
    inside = np.arange(80) % 4 != 3
    gapped[np.ix_(inside, inside)] = np.kron(ids, np.ones((3, 3), np.uint32))
    for image, step in ((touching, 3), (gapped, 4)):
        hue = rgb_to_hsv(P.segmentation_rgba(image)[..., :3])[..., 0]
        blocks = hue[::step, ::step]  # one pixel of each block
        assert (np.abs(np.diff(blocks, axis=0)) > 1e-6).all()  # vertical neighbours
        assert (np.abs(np.diff(blocks, axis=1)) > 1e-6).all()  # horizontal neighbours
    # fixed by id and seed: a lone id has its colour in any image; another seed shuffles them
    alone = P.segmentation_rgba(np.array([[7]], np.uint64))[0, 0]
    assert np.array_equal(P.segmentation_rgba(np.array([[7, 0, 0, 9]]))[0, 0], alone)
    assert np.array_equal(P.segmentation_rgba(np.array([[0], [7]]))[1, 0], alone)
    many = np.arange(1, 33)[None]
    assert not np.array_equal(P.segmentation_rgba(many, seed=1), P.segmentation_rgba(many))
    # slices drawn together share the colours
    pair = P.segmentation_rgba(np.stack([touching[:9, :9], touching[:9, :9]]))
    assert np.array_equal(pair[0], pair[1])
    with pytest.raises(EmtileError, match="integer ids"):
        P.segmentation_rgba(np.zeros((4, 4), np.float32))


def test_show_seg_with_pred_and_labels(seg_volumes):
    d, *_ = seg_volumes
    fig = P.comparison_figure(str(d / "raw.tif"), pred=str(d / "pred.zarr"),
                              labels=str(d / "labels.tif"), seg=str(d / "seg.zarr"), slices=[1])
    assert panels(fig) == ["raw", "probability", "mask", "truth", "errors", "segmentation"]
    errors = next(ax for ax in fig.axes if getattr(ax, "emtile_panel", "") == "errors")
    assert errors.get_legend() is not None  # the legend stays on the error overlay


def test_cli_show_seg(seg_volumes):
    d, *_ = seg_volumes
    res = CliRunner().invoke(main, ["show", str(d / "raw.tif"), "--seg", str(d / "seg.zarr"),
                                    "--slices", "1", "-o", str(d / "seg_cli.png")])
    assert res.exit_code == 0, res.output
    assert res.output == f"wrote {d / 'seg_cli.png'}\n"
    assert (d / "seg_cli.png").read_bytes().startswith(PNG_MAGIC)


def test_show_seg_bad_inputs(seg_volumes):
    import tifffile

    d, raw, _ = seg_volumes
    seg = read_ids(d / "seg.zarr")
    with pytest.raises(EmtileError, match=r"^seg 'seg array' has shape \(3, 50, 64\) but raw "
                                          r"'.*raw.tif' has shape \(3, 64, 64\); they must match$"):
        P.comparison_figure(str(d / "raw.tif"), seg=seg[:, :50])
    with pytest.raises(EmtileError, match=r"^seg 'seg array' has shape \(3, 50, 64\) but pred "
                                          r"'.*pred.zarr' has shape \(3, 64, 64\); they must "
                                          r"match$"):
        P.comparison_figure(str(d / "raw.tif"), pred=str(d / "pred.zarr"), seg=seg[:, :50])
    with pytest.raises(EmtileError, match=r"has dtype float32: expected a label image"):
        P.comparison_figure(raw, seg=seg.astype(np.float32))
    with pytest.raises(EmtileError, match=r"seg '.*pred.zarr' is a prediction \(its store says "
                                          r"so\), not a label image: seg= takes the output of "
                                          r"emtile segment"):
        P.comparison_figure(raw, seg=str(d / "pred.zarr"))
    with pytest.raises(EmtileError, match=r"pred '.*seg.zarr' is a label image \(segment ids, "
                                          r"uint32\), not a probability map or mask: draw it "
                                          r"with seg="):
        P.comparison_figure(str(d / "raw.tif"), pred=str(d / "seg.zarr"))
    tifffile.imwrite(d / "small_seg.tif", seg[:, :50], photometric="minisblack")
    res = CliRunner().invoke(main, ["show", str(d / "raw.tif"), "--seg", str(d / "small_seg.tif"),
                                    "-o", str(d / "bad.png")])
    assert res.exit_code == 1 and res.output.startswith("Error: seg ")
    assert len(res.output.strip().splitlines()) == 1 and "must match" in res.output
    assert not (d / "bad.png").exists()
