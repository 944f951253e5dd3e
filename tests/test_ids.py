"""Instance labels kept as ids (``convert(..., labels=True, ids=True)``) and what ``info`` says
of them; every refusal in one line."""

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

import emtile
from emtile import EmtileError
from emtile.cli.main import main
from emtile.describe import format_info
from emtile.stacks import IdCounter


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tif(path, data):
    tifffile.imwrite(path, data, photometric="minisblack")
    return path


def ids_volume(rng, shape=(5, 12, 13), n=40, dtype=np.uint32):
    return rng.integers(0, n, shape).astype(dtype)


def emtile_attrs(path):
    return zarr.open_group(str(path), mode="r").attrs["emtile"]


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
