"""emtile segment on other tools' maps (emtile.maps): uint8 / uint16 maps without emtile
metadata are v / 255 and v / 65535, --invert reads a boundary map (1 = membrane).

Skipped until segment has --invert (SegmentSettings.invert: the segmenter's side of issue 24
item 3, wired in after the segmenter's rewrite merges)."""

import dataclasses

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from emtile.cli.main import main
from emtile.settings import SegmentSettings

pytestmark = pytest.mark.skipif(
    "invert" not in {f.name for f in dataclasses.fields(SegmentSettings)},
    reason="segment has no --invert yet (SegmentSettings.invert)")


@pytest.fixture(scope="module")
def maps(tmp_path_factory, isbi_labels):
    """A smooth interior probability map of two ISBI label crops, stored four ways as TIFFs."""
    import tifffile
    from scipy import ndimage

    d = tmp_path_factory.mktemp("maps")
    p = ndimage.gaussian_filter((isbi_labels[:2, :96, :96] > 0).astype(np.float64), (0, 1.5, 1.5))
    u8 = np.rint(p * 255).astype(np.uint8)
    u16 = np.rint(p * 65535).astype(np.uint16)
    for name, data in (("b8", 255 - u8), ("f8", u8.astype(np.float32) / np.float32(255)),
                       ("b16", 65535 - u16), ("f16", u16.astype(np.float32) / np.float32(65535)),
                       ("p16", u16)):
        tifffile.imwrite(d / f"{name}.tif", data, photometric="minisblack")
    return d


def _segment(d, name, *args):
    out = d / f"{name}{'-inv' if args else ''}.zarr"
    res = CliRunner().invoke(main, ["segment", str(d / f"{name}.tif"), str(out), "--no-progress",
                                    *args])
    assert res.exit_code == 0, res.output
    return np.asarray(zarr.open_group(str(out), mode="r")["0"][:])


@pytest.mark.parametrize("bits", [8, 16])
def test_a_boundary_map_with_invert_gives_the_float_maps_labels(maps, bits):
    want = _segment(maps, f"f{bits}")
    assert want.max() > 3  # several cells
    np.testing.assert_array_equal(_segment(maps, f"b{bits}", "--invert"), want)
    if bits == 16:  # the probability map itself, read as v / 65535
        np.testing.assert_array_equal(_segment(maps, "p16"), want)
    assert not np.array_equal(_segment(maps, f"b{bits}"), want)  # not inverted: other labels
