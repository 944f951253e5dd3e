"""emtile.open_volume / convert / info on real files: TIFF, PNG folders, Zarr, HDF5."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from PIL import Image

import emtile
from emtile import EmtileError
from emtile.cli.main import main
from emtile.store import is_complete


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", ["train-volume.tif", "test-volume.tif"])
def test_isbi_raw_round_trip_is_bit_exact(isbi_dir, tmp_path, name):
    out = tmp_path / "vol.zarr"
    result = emtile.convert(isbi_dir / name, out, progress=False)
    ref = tifffile.imread(isbi_dir / name)
    vol = emtile.open_volume(out)
    assert vol.shape == ref.shape == (30, 512, 512)
    assert vol.dtype == np.uint8
    np.testing.assert_array_equal(vol[:], ref)
    assert result["complete"] is True and is_complete(out)


def test_isbi_labels_become_0_1(isbi_dir, isbi_labels, tmp_path):
    out = tmp_path / "labels.zarr"
    emtile.convert(isbi_dir / "train-labels.tif", out, labels=True, progress=False)
    lab = emtile.open_volume(out)[:]
    assert lab.dtype == np.uint8
    np.testing.assert_array_equal(lab, (isbi_labels == 255).astype(np.uint8))


def test_store_is_ome_zarr_with_levels(isbi_dir, tmp_path):
    out = tmp_path / "vol.zarr"
    emtile.convert(isbi_dir / "train-volume.tif", out, levels=3, voxel_size=(50, 4, 4),
                   chunks=(2, 256, 256), progress=False)
    group = zarr.open_group(out, mode="r")
    assert group.metadata.zarr_format == 3
    ms = group.attrs["ome"]["multiscales"][0]
    assert group.attrs["ome"]["version"] == "0.5"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[50, 4, 4], [50, 8, 8], [50, 16, 16]]
    assert group["0"].chunks == (2, 256, 256)
    assert group["1"].shape == (30, 256, 256) and group["2"].shape == (30, 128, 128)
    full = group["0"][:4].astype(np.float32)
    expected = full.reshape(4, 256, 2, 256, 2).mean(axis=(2, 4))
    np.testing.assert_array_equal(group["1"][:4], np.rint(expected).astype(np.uint8))
    info = emtile.info(out)
    assert info["voxel_size"] == {"z": 50, "y": 4, "x": 4}
    assert "voxel_size_note" not in info


def test_png_folder_in_natural_order(tmp_path, rng):
    folder = tmp_path / "slices"
    folder.mkdir()
    slices = rng.integers(0, 255, size=(12, 20, 30), dtype=np.uint8)
    for i, s in enumerate(slices):
        Image.fromarray(s).save(folder / f"slice{i}.png")  # slice10 sorts after slice2
    vol = emtile.open_volume(folder)
    assert vol.shape == (12, 20, 30)
    np.testing.assert_array_equal(vol[:], slices)
    np.testing.assert_array_equal(vol[3, 5:9, ::2], slices[3, 5:9, ::2])
    out = tmp_path / "vol.zarr"
    emtile.convert(str(folder / "*.png"), out, progress=False)
    np.testing.assert_array_equal(emtile.open_volume(out)[:], slices)


def test_bigtiff_and_tiled_tiff(tmp_path, isbi_raw):
    data = isbi_raw[:5]
    big = tmp_path / "big.tif"
    tifffile.imwrite(big, data, bigtiff=True, compression="zlib")
    tiled = tmp_path / "tiled.tif"
    tifffile.imwrite(tiled, data, tile=(128, 128), compression="zstd")
    for path in (big, tiled):
        out = tmp_path / (path.stem + ".zarr")
        emtile.convert(path, out, progress=False)
        np.testing.assert_array_equal(emtile.open_volume(out)[:], data)
    with tifffile.TiffFile(big) as tf:
        assert tf.is_bigtiff
    with tifffile.TiffFile(tiled) as tf:
        assert tf.pages[0].is_tiled


def test_single_2d_image(tmp_path, rng):
    img = rng.integers(0, 255, size=(40, 50), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "one.png")
    vol = emtile.open_volume(tmp_path / "one.png")
    assert vol.shape == (40, 50)
    np.testing.assert_array_equal(vol[:], img)
    emtile.convert(tmp_path / "one.png", tmp_path / "one.zarr", progress=False)
    np.testing.assert_array_equal(emtile.open_volume(tmp_path / "one.zarr")[0], img)


def test_zarr_rechunk_and_recompress(tmp_path, isbi_raw):
    src = tmp_path / "src.zarr"
    zarr.create_array(store=src, data=isbi_raw[:6], chunks=(6, 64, 64))
    out = tmp_path / "out.zarr"
    emtile.convert(src, out, chunks=(1, 512, 512), compression="lz4", progress=False)
    arr = emtile.open_volume(out)
    assert arr.chunks == (1, 512, 512)
    np.testing.assert_array_equal(arr[:], isbi_raw[:6])
    assert "lz4" in emtile.info(out)["compressor"]


def test_hdf5_dataset(tmp_path, isbi_raw):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "vol.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = isbi_raw[:3]
        f["other"] = np.zeros(3)
    with pytest.raises(EmtileError, match="holds 2 datasets"):
        emtile.open_volume(path)
    np.testing.assert_array_equal(emtile.open_volume(f"{path}/raw")[1], isbi_raw[1])
    emtile.convert(path, tmp_path / "h5.zarr", dataset="raw", progress=False)
    np.testing.assert_array_equal(emtile.open_volume(tmp_path / "h5.zarr")[:], isbi_raw[:3])


# ------------------------------------------------------------------ labels


@pytest.mark.parametrize("values", [(0, 1), (0, 255), (False, True)])
def test_label_encodings(tmp_path, rng, values):
    mask = rng.random((3, 16, 16)) > 0.5
    data = np.where(mask, values[1], values[0]).astype(np.bool_ if values[1] is True else np.uint8)
    tifffile.imwrite(tmp_path / "lab.tif", data, photometric="minisblack")
    emtile.convert(tmp_path / "lab.tif", tmp_path / "lab.zarr", labels=True, progress=False)
    np.testing.assert_array_equal(emtile.open_volume(tmp_path / "lab.zarr")[:], mask.astype(np.uint8))


def test_labels_with_many_values_name_them_and_leave_nothing(tmp_path):
    data = np.zeros((2, 8, 8), np.uint8)
    data[0, 0, :3] = [3, 7, 9]
    tifffile.imwrite(tmp_path / "lab.tif", data, photometric="minisblack")
    out = tmp_path / "lab.zarr"
    with pytest.raises(EmtileError, match=r"found 4 values: 0, 3, 7, 9.*--threshold"):
        emtile.convert(tmp_path / "lab.tif", out, labels=True, progress=False)
    assert not out.exists()
    emtile.convert(tmp_path / "lab.tif", out, labels=True, threshold=5, progress=False)
    np.testing.assert_array_equal(emtile.open_volume(out)[:], (data > 5).astype(np.uint8))


def test_two_values_other_than_0_1_or_0_255_are_refused(tmp_path):
    tifffile.imwrite(tmp_path / "lab.tif", np.full((2, 8, 8), 7, np.uint8), photometric="minisblack")
    with pytest.raises(EmtileError, match=r"labels are not binary in slices 0:2: found 1 value: 7"):
        emtile.convert(tmp_path / "lab.tif", tmp_path / "l.zarr", labels=True, progress=False)


# ------------------------------------------------------------------ bad input


def test_missing_path(tmp_path):
    with pytest.raises(EmtileError, match="does not exist"):
        emtile.open_volume(tmp_path / "nope.tif")
    r = run_cli("convert", tmp_path / "nope.tif", tmp_path / "o.zarr")
    assert r.exit_code == 1
    assert "Error: input" in r.output and "does not exist" in r.output
    assert "Traceback" not in r.output


def test_non_tiff_file(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not an image")
    r = run_cli("convert", bad, tmp_path / "o.zarr")
    assert r.exit_code == 1 and "is not a readable TIFF file" in r.output


def test_truncated_tiff(tmp_path, isbi_raw):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, isbi_raw[:4], photometric="minisblack")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EmtileError, match="is truncated: its image data needs"):
        emtile.convert(path, tmp_path / "o.zarr", progress=False)
    assert not (tmp_path / "o.zarr").exists()


def test_rgb_stack_needs_channel(tmp_path, rng):
    rgb = rng.integers(0, 255, size=(3, 10, 12, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    r = run_cli("convert", tmp_path / "rgb.tif", tmp_path / "o.zarr")
    assert r.exit_code == 1 and "has 3 channels" in r.output and "--channel N (0 to 2)" in r.output
    r = run_cli("convert", tmp_path / "rgb.tif", tmp_path / "o.zarr", "--channel", "1", "--no-progress")
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(emtile.open_volume(tmp_path / "o.zarr")[:], rgb[..., 1])
    with pytest.raises(EmtileError, match="--channel 5 is out of range"):
        emtile.open_volume(tmp_path / "rgb.tif", channel=5)


def test_rgb_png_folder_needs_channel(tmp_path, rng):
    folder = tmp_path / "rgb"
    folder.mkdir()
    rgb = rng.integers(0, 255, size=(2, 6, 7, 3), dtype=np.uint8)
    for i, s in enumerate(rgb):
        Image.fromarray(s).save(folder / f"{i}.png")
    with pytest.raises(EmtileError, match="has 3 channels"):
        emtile.open_volume(folder)
    np.testing.assert_array_equal(emtile.open_volume(folder, channel=2)[:], rgb[..., 2])


def test_folder_with_mixed_shapes_names_the_file(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"s{i:02d}.png")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(folder / "s03.png")
    with pytest.raises(EmtileError, match=r"s03\.png' has shape \(8, 9\).*first slice"):
        emtile.open_volume(folder)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("convert", tmp_path / "empty", tmp_path / "o.zarr")
    assert r.exit_code == 1 and "holds no PNG, TIFF or JPEG images" in r.output


def test_existing_output_is_refused_then_overwritten(tmp_path, isbi_raw):
    tifffile.imwrite(tmp_path / "a.tif", isbi_raw[:2])
    tifffile.imwrite(tmp_path / "b.tif", isbi_raw[2:4])
    out = tmp_path / "o.zarr"
    assert run_cli("convert", tmp_path / "a.tif", out, "--no-progress").exit_code == 0
    r = run_cli("convert", tmp_path / "b.tif", out, "--no-progress")
    assert r.exit_code == 1 and "already exists; pass --overwrite" in r.output
    np.testing.assert_array_equal(emtile.open_volume(out)[:], isbi_raw[:2])  # untouched
    assert run_cli("convert", tmp_path / "b.tif", out, "--overwrite", "--no-progress").exit_code == 0
    np.testing.assert_array_equal(emtile.open_volume(out)[:], isbi_raw[2:4])


def test_overwrite_never_deletes_a_plain_folder(tmp_path, isbi_raw):
    tifffile.imwrite(tmp_path / "a.tif", isbi_raw[:1])
    keep = tmp_path / "results"
    keep.mkdir()
    (keep / "precious.txt").write_text("data")
    r = run_cli("convert", tmp_path / "a.tif", keep, "--overwrite")
    assert r.exit_code == 1 and "not a Zarr store" in r.output
    assert (keep / "precious.txt").exists()


def test_unwritable_output_location(tmp_path, isbi_raw):
    tifffile.imwrite(tmp_path / "a.tif", isbi_raw[:1])
    r = run_cli("convert", tmp_path / "a.tif", "/sys/emtile-test.zarr")
    assert r.exit_code == 1 and "is not writable" in r.output
    r = run_cli("convert", tmp_path / "a.tif", tmp_path / "no" / "such" / "o.zarr")
    assert r.exit_code == 1 and "does not exist" in r.output


def test_bad_cli_values(tmp_path):
    r = run_cli("convert", "a.tif", "o.zarr", "--chunks", "1,x,3")
    assert r.exit_code == 2 and "not a comma-separated list" in r.output


# ------------------------------------------------------------------ info


def test_info_cli(isbi_dir, tmp_path):
    out = tmp_path / "vol.zarr"
    emtile.convert(isbi_dir / "train-volume.tif", out, progress=False)
    r = run_cli("info", out, "--stats")
    assert r.exit_code == 0, r.output
    for field in ("shape         (30, 512, 512)", "dtype         uint8", "chunks        (1, 512, 512)",
                  "zstd", "complete      yes", "voxel size    1 x 1 x 1 nm", "min ", "max ", "mean "):
        assert field in r.output
    d = json.loads(run_cli("info", out, "--json", "--stats").output)
    ref = tifffile.imread(isbi_dir / "train-volume.tif")
    assert d["min"] == ref.min() and d["max"] == ref.max()
    assert d["mean"] == pytest.approx(ref.mean(), rel=1e-12)
    assert d["bytes_uncompressed"] == ref.nbytes


# ------------------------------------------------------------------ interruption


def _chunk_files(store):
    return sorted(p for p in Path(store, "0").rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.mark.slow
def test_killed_conversion_is_incomplete_then_finished_by_rerun(tmp_path, isbi_raw):
    # a stack big enough (~200 MB) that the kill lands mid-way
    stack = np.concatenate([isbi_raw] * 25)
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, stack)
    out = tmp_path / "killed" / "vol.zarr"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "emtile.cli.main", "convert", str(src), str(out), "--no-progress"]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 60
    while len(_chunk_files(out)) < 20 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(_chunk_files(out))
    assert 0 < written < stack.shape[0], f"kill did not land mid-way ({written} chunks)"
    assert not is_complete(out)
    r = run_cli("info", out)
    assert "complete      NO" in r.output

    assert run_cli("convert", src, out, "--no-progress").exit_code == 0  # no --overwrite needed
    assert is_complete(out)
    ref = tmp_path / "ref" / "vol.zarr"
    ref.parent.mkdir()
    emtile.convert(src, ref, progress=False)
    files = _chunk_files(out)
    assert [p.relative_to(out) for p in files] == [p.relative_to(ref) for p in _chunk_files(ref)]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(files, _chunk_files(ref)))
    np.testing.assert_array_equal(emtile.open_volume(out)[:], stack)


def test_import_is_light():
    code = ("import sys, emtile, emtile.cli.main; "
            "heavy = [m for m in ('torch', 'numba', 'dask', 'matplotlib', 'zarr') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_command_has_help():
    root = run_cli("--help")
    assert root.exit_code == 0
    from emtile.cli.main import COMMANDS, LazyGroup

    for name in COMMANDS:
        assert f"  {name} " in root.output, name  # listed, so its module imports
        cmd = LazyGroup.get_command(main, None, name)
        assert cmd is not None, name
        r = run_cli(name, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output, name
        for param in cmd.params:
            if isinstance(param, __import__("click").Option):
                assert param.help, f"{name} {param.opts} has no help text"


def test_tiff_with_one_series_per_page(tmp_path, isbi_raw):
    # pages appended one write() at a time become separate series in tifffile's eyes
    path = tmp_path / "paged.tif"
    with tifffile.TiffWriter(path) as tw:
        for page in isbi_raw[:4]:
            tw.write(page, compression="zlib", photometric="minisblack")
    vol = emtile.open_volume(path)
    assert vol.shape == (4, 512, 512)
    np.testing.assert_array_equal(vol[1:3, 100:120, 7], isbi_raw[1:3, 100:120, 7])
    emtile.convert(path, tmp_path / "paged.zarr", progress=False)
    np.testing.assert_array_equal(emtile.open_volume(tmp_path / "paged.zarr")[:], isbi_raw[:4])


def test_corrupt_compressed_page_is_reported_and_leaves_nothing(tmp_path, isbi_raw):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, isbi_raw[:3], compression="zlib", photometric="minisblack")
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[1].dataoffsets[0], tf.pages[1].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = b"\0" * count  # page 1's compressed data destroyed
    path.write_bytes(bytes(data))
    out = tmp_path / "o.zarr"
    with pytest.raises(EmtileError, match=r"cannot read .*bad\.tif' at slices 0:3"):
        emtile.convert(path, out, progress=False)
    assert not out.exists()


def test_overwrite_never_deletes_a_plain_file(tmp_path, isbi_raw):
    tifffile.imwrite(tmp_path / "a.tif", isbi_raw[:1])
    keep = tmp_path / "notes.txt"
    keep.write_text("data")
    r = run_cli("convert", tmp_path / "a.tif", keep, "--overwrite")
    assert r.exit_code == 1 and "existing file that is not a Zarr store" in r.output
    assert keep.read_text() == "data"


def test_store_killed_while_creating_arrays_is_replaced(tmp_path, isbi_raw):
    import zarr as _zarr

    from emtile.store import FORMAT_VERSION, prepare_output

    out = tmp_path / "o.zarr"
    # what create_image has written when a kill lands before any array exists
    _zarr.open_group(str(out), mode="w-", zarr_format=3,
                     attributes={"emtile": {"format": FORMAT_VERSION, "complete": False}})
    assert prepare_output(out) == "replaced" and not out.exists()
    from emtile.store import create_image

    group = create_image(out, (2, 8, 8), np.uint8)
    assert _zarr.open_group(str(out), mode="r").attrs["emtile"]["complete"] is False
    assert "0" in group
