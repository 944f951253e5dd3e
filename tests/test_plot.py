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
    with pytest.raises(EmtileError, match=".png or .pdf"):
        P.show(raw, output=d / "fig.jpg")
    with pytest.raises(EmtileError, match="nothing to show"):
        P.show()


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
    cases = {d / "missing" / "f.png": f"-o '{d / 'missing' / 'f.png'}': its folder "
                                      f"'{d / 'missing'}' does not exist",
             d / "pred.zarr" / "f.png": f"-o '{d / 'pred.zarr' / 'f.png'}' lies inside the input "
                                        f"'{d / 'pred.zarr'}'"}
    for path, message in cases.items():
        res = CliRunner().invoke(main, [*args, "-o", str(path)])
        assert res.exit_code == 1 and res.output.startswith(f"Error: {message}"), res.output
        assert len(res.output.strip().splitlines()) == 1
    assert not (d / "pred.zarr" / "f.png").exists()
    write_log(d / "train.csv")
    with pytest.raises(EmtileError, match="-o '.*train.csv' is the input"):
        P.show(log=d / "train.csv", output=d / "train.csv")
    assert (d / "train.csv").read_text().startswith("iteration,loss")
