"""emtile.maps: probability maps from any tool, scaled by their dtype, checked as they are read."""

import numpy as np
import pytest

from emtile import EmtileError
from emtile.maps import ProbabilityMap, map_scale, open_probability_map


@pytest.mark.parametrize("dtype, top", [("uint8", 255), ("uint16", 65535)])
def test_integer_maps_are_scaled_by_their_dtype(dtype, top):
    v = np.array([[0, 1, top // 2, top]], dtype)
    m = open_probability_map(v)
    assert m.dtype == np.float32 and m.shape == (1, 4) and m.ndim == 2
    np.testing.assert_array_equal(m[:], v.astype(np.float32) / np.float32(top))
    np.testing.assert_array_equal(open_probability_map(v, invert=True)[0, 1:3],
                                  np.float32(1) - v[0, 1:3].astype(np.float32) / np.float32(top))
    exact = open_probability_map(v, dtype=np.float64)[:]
    assert exact.dtype == np.float64 and exact[0, 3] == 1.0 and exact[0, 0] == 0.0


def test_uint8_can_stay_exact_for_the_segmenter():
    v = np.array([0, 7, 255], np.uint8)
    assert open_probability_map(v, native_uint8=True)[:].tolist() == [0, 7, 255]
    inverted = open_probability_map(v, invert=True, native_uint8=True)[:]
    assert inverted.dtype == np.uint8 and inverted.tolist() == [255, 248, 0]
    assert open_probability_map(v.astype(np.uint16), native_uint8=True).dtype == np.float32


def test_floats_pass_as_they_are_and_invert():
    p = np.linspace(0, 1, 12, dtype=np.float16).reshape(3, 4)
    np.testing.assert_array_equal(open_probability_map(p)[1:], p[1:].astype(np.float32))
    np.testing.assert_array_equal(open_probability_map(p, invert=True)[:], 1 - p.astype(np.float32))


@pytest.mark.parametrize("value", [1.5, -0.25, np.nan])
def test_a_float_out_of_range_is_one_line_when_read(value):
    p = np.full((4, 6, 6), 0.5, np.float32)
    p[3, 2, 1] = value
    m = open_probability_map(p)  # lazy: nothing read yet
    assert m[:3].shape == (3, 6, 6)  # the good part reads
    with pytest.raises(EmtileError) as info:
        m[2:4]
    text = str(info.value)
    assert text.startswith(f"prediction 'pred array' holds {float(value)} at (1, 2, 1) of [2:4]: a "
                           f"float probability map has values in [0, 1]"), text
    assert "\n" not in text


@pytest.mark.parametrize("dtype", ["int16", "uint32", "int8", "bool", "uint64"])
def test_other_dtypes_are_refused_in_one_line(dtype):
    with pytest.raises(EmtileError, match=rf"^prediction 'pred array' has dtype {dtype}: a "
                                          r"probability map is uint8 \(0-255 = 0..1\), uint16"):
        open_probability_map(np.zeros((2, 2), dtype))
    assert map_scale("uint16") == 65535 and map_scale("float64") is None


def test_paths_open_lazily_from_tiff_zarr_and_hdf5(tmp_path):
    import h5py
    import tifffile
    import zarr

    v = (np.arange(2 * 5 * 7).reshape(2, 5, 7) * 97).astype(np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", v, photometric="minisblack")
    z = zarr.create_array(str(tmp_path / "m.zarr"), shape=v.shape, dtype=v.dtype, chunks=(1, 5, 7))
    z[:] = v
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["maps/boundary"] = v
    want = v.astype(np.float32) / np.float32(65535)
    for path in ("m.tif", "m.zarr", "m.h5/maps/boundary"):
        m = open_probability_map(tmp_path / path, invert=True)
        assert isinstance(m, ProbabilityMap) and m.display == str(tmp_path / path)
        np.testing.assert_array_equal(m[1, :, 2:], np.float32(1) - want[1, :, 2:])
