"""emtile segment's adaptive levels (calibrate="map") and its report: a monotone recalibration of a
map leaves the partition alone, the labels stay the same for every block size, explicit
thresholds mean the map's own levels, the report and its warnings."""

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from scipy import ndimage
from skimage.metrics import adapted_rand_error

from emtile.cli.main import main
from emtile.segmenter import levels, segment
from emtile.segmenter.report import SegmentReport, face_scores
from emtile.store import create_image, mark_complete

from conftest import synthetic_em


def write_pred(path, p):
    g = create_image(path, p.shape, p.dtype, kind="probabilities")
    g["0"][...] = p
    mark_complete(g)
    return str(path)


def read(path):
    return np.asarray(zarr.open_group(str(path), mode="r")["0"][...])


def hand_map(shape=(3, 128, 128), seed=0):
    """Cells and membranes (Voronoi), cells mottled (slow interior shading), membranes faint in
    places, blurred and noisy: a map on which fixed levels split cells or merge them."""
    _, cells = synthetic_em(shape, cells=30, membrane=1.5, seed=seed)
    rng = np.random.default_rng(seed)
    shade = ndimage.gaussian_filter(rng.normal(0, 1, shape), (0, 6, 6))
    shade /= np.abs(shade).max()
    faint = ndimage.gaussian_filter(rng.normal(0, 1, shape), (0, 10, 10)) > 0.02
    p = np.where(cells > 0, 0.88 + 0.1 * shade, np.where(faint, 0.55, 0.1))
    p = ndimage.gaussian_filter(p, (0, 1.2, 1.2)) + rng.normal(0, 0.03, shape)
    return np.clip(np.rint(np.clip(p, 0, 1) * 255), 0, 255).astype(np.uint8), cells


def recalibrated(p, gamma):
    return np.clip(np.rint(255 * (p / 255.0) ** gamma), 0, 255).astype(np.uint8)


def partition_distance(a, b):
    """Adapted Rand error between two label stacks (slices apart; mean)."""
    return float(np.mean([adapted_rand_error(x.astype(np.int64), y.astype(np.int64))[0]
                          for x, y in zip(a, b)]))


# --------------------------------------------------------------------------- the table


def test_rank_lut_is_monotone_and_matches_the_reference():
    rng = np.random.default_rng(1)
    counts = np.bincount(rng.integers(0, 256, 10_000), minlength=256)
    lut = levels.reference_lut(counts)
    assert lut.dtype == np.uint8 and np.all(np.diff(lut.astype(int)) >= 0)
    # a map whose histogram is the reference's own reads (about) as stored
    ref = np.interp(np.linspace(0, 1, 100_001), np.linspace(0, 1, len(levels.REFERENCE)),
                    levels.REFERENCE)
    own = np.bincount(np.clip(np.rint(ref), 0, 255).astype(int), minlength=256)
    lut = levels.reference_lut(own)
    used = own > 50
    assert np.abs(lut[used].astype(int) - np.arange(256)[used]).max() <= 2


def test_degenerate_maps_are_read_as_stored():
    assert not levels.usable(np.bincount(np.zeros(100, int), minlength=256))
    assert not levels.usable(np.zeros(256, int))
    assert not levels.usable(np.bincount(np.repeat([0, 255], 50), minlength=256))  # binary
    assert levels.usable(np.bincount(np.arange(256), minlength=256))
    # a confident map: most pixels at 1, the rest graded
    assert levels.usable(np.bincount(np.r_[np.full(900, 255), np.arange(1, 101)], minlength=256))


def test_histogram_samples_slabs_by_shape_alone():
    p = np.random.default_rng(0).integers(0, 256, (10, 8, 16), dtype=np.uint8)

    def read(z0, z1, y0, y1):
        return p[z0:z1, y0:y1]

    full = levels.histogram(read, p.shape)
    assert np.array_equal(full, np.bincount(p.ravel(), minlength=256))
    # a volume above the sample budget counts every k-th slab (k from the shape)
    sampled = levels.histogram(read, p.shape, sample_px=p.size // 3 + 1, slab_px=8 * 16)
    assert np.array_equal(sampled, np.bincount(p[::3].ravel(), minlength=256))
    # slabs thinner than a slice (rows of a slice) count the same pixels
    rows = levels.histogram(read, p.shape, slab_px=3 * 16)
    assert np.array_equal(rows, full)


# --------------------------------------------------------------------------- robustness


@pytest.fixture(scope="module")
def mottled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("levels")
    p, cells = hand_map()
    out = {}
    for gamma in (1.0, 0.5, 2.0):
        pred = write_pred(tmp / f"p{gamma}.zarr", recalibrated(p, gamma) if gamma != 1 else p)
        for calibrate in ("map", "none"):
            seg = tmp / f"s{gamma}{calibrate}.zarr"
            result = segment(pred, str(seg), calibrate=calibrate, progress=False)
            out[gamma, calibrate] = (read(seg), result)
    return out, tmp, p


def test_a_monotone_recalibration_leaves_the_partition(mottled):
    out, _, _ = mottled
    for gamma in (0.5, 2.0):
        assert partition_distance(out[1.0, "map"][0], out[gamma, "map"][0]) < 0.01
    # the map's own levels do not hold: the test can tell the two apart
    worst = max(partition_distance(out[1.0, "none"][0], out[g, "none"][0]) for g in (0.5, 2.0))
    assert worst > 0.05


def test_calibration_is_recorded_and_the_default(mottled):
    out, tmp, p = mottled
    settings = zarr.open_group(str(tmp / "s1.0map.zarr"), mode="r").attrs["emtile"]["segment"]
    assert settings["calibrate"] == "map" and len(settings["lut"]) == 256
    assert "lut" not in out[1.0, "none"][1].settings
    seg = tmp / "default.zarr"
    segment(str(tmp / "p1.0.zarr"), str(seg), progress=False)
    assert np.array_equal(read(seg), out[1.0, "map"][0])
    # a threshold given means the map's own level (auto -> none), unless calibrate says map
    given = segment(str(tmp / "p1.0.zarr"), str(tmp / "given.zarr"), threshold=0.7,
                    progress=False)
    assert "lut" not in given.settings
    forced = segment(str(tmp / "p1.0.zarr"), str(tmp / "forced.zarr"), threshold=0.7,
                     calibrate="map", progress=False)
    assert forced.settings["calibrate"] == "map"


@pytest.mark.parametrize("block", [(1, 32, 48), (2, 64, 64), (3, 128, 17)])
def test_block_invariance_with_calibration(mottled, block):
    out, tmp, _ = mottled
    seg = tmp / f"b{'x'.join(map(str, block))}.zarr"
    for gamma in (1.0, 0.5):
        segment(str(tmp / f"p{gamma}.zarr"), str(seg), block_size=block, overwrite=True,
                progress=False)
        assert np.array_equal(read(seg), out[gamma, "map"][0])


def test_a_bad_calibrate_is_one_line(tmp_path):
    from emtile import EmtileError
    from emtile.settings import SegmentSettings

    with pytest.raises(EmtileError, match=r"^calibrate='x' is not supported: choose one of "
                                          r"auto, map, none$"):
        SegmentSettings(calibrate="x")


def test_an_empty_map_is_not_calibrated_into_cells(tmp_path):
    pred = write_pred(tmp_path / "zeros.zarr", np.zeros((2, 32, 32), np.uint8))
    result = segment(pred, str(tmp_path / "s.zarr"), progress=False)
    assert result.objects == 0 and "lut" not in result.settings


# --------------------------------------------------------------------------- report


def test_face_scores_read_the_histograms():
    # quantile linkage, threshold 0.25 (limit 63, 8 bins of 8 levels): a face whose median lies
    # in bin 2 scores the top of that bin; one whose median is above the histogram is inf
    faces = np.zeros((3, 13), np.int64)
    faces[:, 3] = 10
    faces[0, 5 + 2] = 10
    faces[1, 5 + 7] = 4
    faces[2, 5 + 0] = 5
    s = face_scores(faces, 0.25, 0.5, 8)
    assert s[0] == pytest.approx(23 / 255) and np.isinf(s[1]) and s[2] == 7 / 255
    mean = face_scores(np.array([[0, 1, 100, 4, 1]]), 0.25, None, 0)
    assert mean[0] == pytest.approx(25 / 255)


def test_report_counts_and_warnings():
    r = SegmentReport(merge_threshold=0.2, threshold=0.85, threshold_on_map=0.62,
                      calibrated=True)
    r.add_graph(100, 30, np.array([0.05, 0.18, 0.19, 0.3, np.inf]), 0.2)
    assert (r.fragments, r.objects, r.faces, r.merge_side, r.close) == (100, 30, 5, 3, 2)
    text = "\n".join(r.warnings())
    assert "70 of 100 fragments" in text and "close calls" not in text
    assert "less sure of itself" in text and "p > 0.62" in text
    assert any("3 score at most --merge-threshold 0.2, 2 of them above 0.15 (close calls)" in
               line for line in r.lines())
    quiet = SegmentReport(merge_threshold=0.2, threshold=0.85, threshold_on_map=0.86)
    quiet.add_graph(100, 90, np.array([0.05, 0.1]), 0.2)
    assert quiet.warnings() == []


def test_cli_report_and_calibrate(tmp_path, mottled):
    _, tmp, _ = mottled
    runner = CliRunner()
    pred = str(tmp / "p0.5.zarr")
    r = runner.invoke(main, ["segment", pred, str(tmp_path / "a.zarr"), "--no-progress",
                             "--report"])
    assert r.exit_code == 0, r.output
    assert "report:" in r.output and "fragments" in r.output and "calibrate=map" in r.output
    assert "close calls" in r.output
    # without --report: the fragments and the levels, not the faces
    r = runner.invoke(main, ["segment", pred, str(tmp_path / "a2.zarr"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "fragments" in r.output and "calibrate=map" in r.output
    assert "close calls" not in r.output
    # the map's own levels given: --report still says where the defaults' threshold would cut
    r = runner.invoke(main, ["segment", pred, str(tmp_path / "a3.zarr"), "--no-progress",
                             "--calibrate", "none", "--report"])
    assert r.exit_code == 0, r.output
    assert "its own levels as given" in r.output
    # --threshold given: the map's own levels (recorded: no table); --calibrate map forces it
    r = runner.invoke(main, ["segment", pred, str(tmp_path / "b.zarr"), "--no-progress",
                             "--threshold", "0.85"])
    assert r.exit_code == 0, r.output
    assert "lut" not in zarr.open_group(str(tmp_path / "b.zarr")).attrs["emtile"]["segment"]
    r = runner.invoke(main, ["segment", pred, str(tmp_path / "c.zarr"), "--no-progress",
                             "--threshold", "0.85", "--calibrate", "map"])
    assert r.exit_code == 0, r.output
    assert "lut" in zarr.open_group(str(tmp_path / "c.zarr")).attrs["emtile"]["segment"]
    r = runner.invoke(main, ["segment", pred, str(tmp_path / "d.zarr"), "--calibrate", "x"])
    assert r.exit_code == 2 and "Invalid value for '--calibrate'" in r.output
