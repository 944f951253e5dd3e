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
    assert errors_ax[0].get_legend() is not None


def test_titles_carry_the_slice_scores(volumes):
    from emtile.metrics import isbi_scores

    _, raw, labels, pred = volumes
    fig = P.comparison_figure(raw, pred=pred, labels=labels, slices=[1])
    s = isbi_scores(pred[1], labels[1])
    title = [ax for ax in fig.axes if getattr(ax, "emtile_panel", "") == "errors"][0].get_title()
    assert f"V-Rand {s['v_rand']:.4f}" in title and f"V-Info {s['v_info']:.4f}" in title


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
    lines = ["iteration,loss,lr,val_loss,val_pixel_error,val_f1,val_vrand,elapsed_s"]
    for i in range(1, 201):
        val = i % 50 == 0
        v = (f"{1 / i:.4f},{0.2 - i / 2000:.4f},{0.8 + i / 1000:.4f},{0.7 + i / 1000:.4f}"
             if val else ",,,")
        lines.append(f"{i},{2.0 / i ** 0.5:.5f},0.0001,{v},{0.4 * i:.2f}")
    path.write_text("\n".join(lines) + "\n")


def test_training_curve(tmp_path):
    from emtile.training.logs import CSV_COLUMNS

    log = tmp_path / "train.csv"
    write_log(log)
    fig = P.show(log=log, output=tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes().startswith(PNG_MAGIC)
    assert tuple(log.read_text().splitlines()[0].split(",")) == CSV_COLUMNS
    left, right = fig.axes  # bookkeeping (lr, elapsed_s) on neither axis
    assert sorted(line.get_label() for line in left.get_lines()) == ["loss", "val_loss"]
    assert sorted(line.get_label() for line in right.get_lines()) == [
        "val_f1", "val_pixel_error", "val_vrand"]
    assert len([line for line in right.get_lines() if line.get_label() == "val_f1"][0].get_xdata()) == 4


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
