"""emtile.open_volume / convert / info on real files: TIFF, PNG folders, Zarr, HDF5."""

import json
import re
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
import emtile.markers
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
    with pytest.raises(EmtileError, match=r"found 4 values: 0, 3, 7, 9.*threshold=T"):
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
    with pytest.raises(EmtileError, match=r"cut\.tif. is damaged or cut short: .*its image data need 1048832 bytes but the file has"):
        emtile.convert(path, tmp_path / "o.zarr", progress=False)
    assert not (tmp_path / "o.zarr").exists()


def test_rgb_stack_needs_channel(tmp_path, rng):
    rgb = rng.integers(0, 255, size=(3, 10, 12, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    r = run_cli("convert", tmp_path / "rgb.tif", tmp_path / "o.zarr")
    assert r.exit_code == 1 and "has 3 channels" in r.output and "--channel N (N from 0 to 2)" in r.output
    r = run_cli("convert", tmp_path / "rgb.tif", tmp_path / "o.zarr", "--channel", "1", "--no-progress")
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(emtile.open_volume(tmp_path / "o.zarr")[:], rgb[..., 1])
    with pytest.raises(EmtileError, match="channel=5 is out of range"):
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
    log = tmp_path / "convert.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stderr=err)
        t0 = time.time()
        while len(_chunk_files(out)) < 1 and proc.poll() is None and time.time() < t0 + 60:
            time.sleep(0.005)  # 3 shards: kill once the first is written
        exited = proc.poll()  # None: still running when killed
        waited = time.time() - t0
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    written = len(_chunk_files(out))
    # (seen once in a full run: 0 chunks; these say which way the wait ended)
    assert 0 < written < stack.shape[0], (
        f"kill did not land mid-way ({written} chunks after {waited:.1f} s; convert's exit "
        f"status before the kill: {exited}; its stderr: {log.read_text()[-2000:]!r})")
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
    with pytest.raises(EmtileError, match=r"damaged input .*bad\.tif': chunk '1.0.0' \(voxels z 1:2, y 0:512, x 0:512\) cannot be read \(DeflateError"):
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


# ------------------------------------------------------------------ promises: TIFF


@pytest.fixture(scope="module")
def zlib_stack(isbi_dir, tmp_path_factory):
    """The issue's file: the 30-slice ISBI stack, zlib-compressed, as tifffile writes it."""
    path = tmp_path_factory.mktemp("tiff") / "stack.tif"
    raw = tifffile.imread(isbi_dir / "train-volume.tif")
    tifffile.imwrite(path, raw, compression="zlib", photometric="minisblack")
    return path, raw


def cut(path, nbytes, dest):
    dest.write_bytes(path.read_bytes()[:nbytes])
    return dest


def test_zlib_stack_cut_at_300_kB_is_an_error_naming_what_is_missing(zlib_stack, tmp_path):
    """The issue's case: it converted to shape (1, 512, 512) marked complete, exit 0."""
    src = cut(zlib_stack[0], 300_000, tmp_path / "cut.tif")
    out = tmp_path / "cut.zarr"
    r = run_cli("convert", src, out, "--no-progress")
    assert r.exit_code == 1 and "Traceback" not in r.output
    line = r.output.strip()
    assert "\n" not in line
    assert line.startswith(f"Error: TIFF '{src}' is damaged or cut short: its page chain is cut "
                           "after page 1")
    assert "promises shape (30, 512, 512) (its shaped metadata) but its pages hold (512, 512)" in line
    assert "found 1 complete slice of shape (512, 512) (pass --allow-partial" in line
    assert not out.exists()


def test_allow_partial_converts_what_is_there_and_says_so(zlib_stack, tmp_path):
    src = cut(zlib_stack[0], 1_500_000, tmp_path / "cut.tif")
    out = tmp_path / "cut.zarr"
    r = run_cli("convert", src, out, "--allow-partial", "--no-progress")
    assert r.exit_code == 0, r.output
    vol = emtile.open_volume(out)
    n = vol.shape[0]
    assert 1 < n < 30
    np.testing.assert_array_equal(vol[:], zlib_stack[1][:n])
    d = emtile.info(out)
    assert d["complete"] is True
    assert d["partial"]["found"] == [n, 512, 512]
    assert d["partial"]["expected"] == "shape (30, 512, 512) (its shaped metadata)"
    assert "page chain is cut" in " ".join(d["partial"]["problems"])
    shown = run_cli("info", out).output
    assert (f"partial       YES: converted {n}x512x512 (the complete pages); expected shape "
            "(30, 512, 512) (its shaped metadata)") in shown


WRITERS = {
    "shaped-zlib": dict(compression="zlib"),
    "shaped-raw": dict(),  # contiguous: the later pages' descriptions sit at the end
    "imagej": dict(imagej=True, metadata={"axes": "ZYX"}),
    "imagej-zlib": dict(imagej=True, metadata={"axes": "ZYX"}, compression="zlib"),
    "ome-zlib": dict(ome=True, metadata={"axes": "ZYX"}, compression="zlib"),
    "plain-zlib": dict(metadata=None, compression="zlib"),
    "bigtiff-tiled": dict(bigtiff=True, tile=(128, 128), compression="zstd"),
}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.999])
def test_every_cut_tiff_is_an_error_and_partial_reads_only_whole_slices(
        isbi_raw, tmp_path, writer, fraction):
    data = isbi_raw[:6]
    whole = tmp_path / "whole.tif"
    kw = WRITERS[writer]
    tifffile.imwrite(whole, data, **({"photometric": "minisblack"} if "imagej" not in kw else {}),
                     **kw)
    np.testing.assert_array_equal(emtile.open_volume(whole)[:], data)  # the whole file is fine
    src = cut(whole, int(whole.stat().st_size * fraction), tmp_path / "cut.tif")
    with pytest.raises(EmtileError, match=r"cut\.tif' is damaged or cut short: "):
        emtile.open_volume(src)
    part = emtile.open_volume(src, allow_partial=True)
    assert 0 < part.shape[0] < 6 and part.partial["found"] == list(part.shape)
    np.testing.assert_array_equal(part[:], data[:part.shape[0]])


def test_cut_tiff_is_found_without_tifffile_saying_anything(zlib_stack, tmp_path, capfd):
    """tifffile's log is never the only sign: silence it and the checks still fire."""
    import logging

    src = cut(zlib_stack[0], 300_000, tmp_path / "cut.tif")
    logger = logging.getLogger("tifffile")
    logger.disabled = True
    try:
        with pytest.raises(EmtileError, match="page chain is cut after page 1"):
            emtile.open_volume(src)
    finally:
        logger.disabled = False
    with pytest.raises(EmtileError):
        emtile.open_volume(src)
    err = capfd.readouterr().err
    assert "invalid page offset" not in err  # captured, not printed beside the one line


def test_strip_byte_counts_that_disagree(tmp_path, isbi_raw):
    path = tmp_path / "short.tif"
    tifffile.imwrite(path, isbi_raw[:2], photometric="minisblack", rowsperstrip=512)
    with tifffile.TiffFile(path) as tf:
        tag = tf.pages[1].tags["StripByteCounts"]
        assert tag.count == 1 and tag.dtype == 4  # one LONG, stored in the tag itself
        where = tag.valueoffset
    data = bytearray(path.read_bytes())
    data[where:where + 4] = (1000).to_bytes(4, "little")  # page 1 claims 1000 bytes, needs 262144
    path.write_bytes(bytes(data))
    with pytest.raises(EmtileError, match=r"page 1 holds 1000 bytes of uncompressed image data, "
                                          r"expected 262144"):
        emtile.convert(path, tmp_path / "o.zarr", progress=False)
    assert not (tmp_path / "o.zarr").exists()


# ------------------------------------------------------------------ damaged chunks


def damage(chunk_file):
    """Overwrite a chunk's compressed payload in place (same size), as a bad disk would."""
    data = bytearray(Path(chunk_file).read_bytes())
    data[16:48] = bytes(range(32))
    Path(chunk_file).write_bytes(bytes(data))


@pytest.fixture
def damaged_store(tmp_path, isbi_raw):
    out = tmp_path / "vol.zarr"
    # one file per chunk (unsharded): the damage lands in one chunk, as the tests name it
    emtile.convert(_tif(tmp_path, isbi_raw[:6]), out, chunks=(2, 256, 256), shards="none",
                   progress=False)
    damage(out / "0" / "c" / "1" / "1" / "0")
    return out


def _tif(tmp_path, data):
    path = tmp_path / "src.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    return path


DAMAGED = ("damaged input '{store}': chunk '0/c/1/1/0' (voxels z 2:4, y 256:512, x 0:256) "
           "cannot be read (RuntimeError: error during blosc decompression")


def test_damaged_zarr_chunk_names_store_key_and_voxels(damaged_store, isbi_raw):
    vol = emtile.open_volume(damaged_store)
    np.testing.assert_array_equal(vol[0:2], isbi_raw[0:2])  # the good chunks still read
    np.testing.assert_array_equal(vol[2:4, :256], isbi_raw[2:4, :256])
    with pytest.raises(emtile.volume.DamagedChunkError) as exc:
        vol[:, 300:301, 5]
    assert str(exc.value).startswith(DAMAGED.format(store=damaged_store))
    assert exc.value.key == "0/c/1/1/0" and exc.value.region == [(2, 4), (256, 512), (0, 256)]


@pytest.mark.parametrize("command", [["info", "--stats"], ["convert", "OUT"]])
def test_damaged_chunk_in_cli_is_one_line(damaged_store, tmp_path, command):
    args = [a if a != "OUT" else tmp_path / "o.zarr" for a in command[1:]]
    r = run_cli(command[0], damaged_store, *args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: " + DAMAGED.format(store=damaged_store))
    assert not (tmp_path / "o.zarr").exists()


def test_damaged_chunk_of_a_nested_ome_zarr_array(tmp_path, isbi_raw):
    pred = tmp_path / "pred.zarr"
    emtile.store.create_image(pred, (2, 64, 64), np.uint8)
    zarr.open_group(pred, mode="r+").create_group("labels")
    mask = emtile.store.create_image(pred / "labels" / "mask", (2, 64, 64), np.uint8,
                                     chunks=(1, 32, 32))
    mask["0"][:] = (isbi_raw[:2, :64, :64] > 128).astype(np.uint8)
    emtile.store.mark_complete(mask)
    damage(pred / "labels" / "mask" / "0" / "c" / "1" / "0" / "1")
    with pytest.raises(EmtileError, match=r"damaged input '.*pred\.zarr/labels/mask': chunk "
                                          r"'0/c/1/0/1' \(voxels z 1:2, y 0:32, x 32:64\)"):
        emtile.open_volume(f"{pred}/labels/mask")[:]


def test_damaged_hdf5_chunk(tmp_path, isbi_raw):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "vol.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=isbi_raw[:4], chunks=(1, 256, 256), compression="gzip")
    with h5py.File(path, "r") as f:
        info = f["raw"].id.get_chunk_info_by_coord((2, 256, 0))
    data = bytearray(path.read_bytes())
    data[info.byte_offset:info.byte_offset + info.size] = b"\xff" * info.size
    path.write_bytes(bytes(data))
    vol = emtile.open_volume(f"{path}/raw")
    np.testing.assert_array_equal(vol[:2], isbi_raw[:2])
    r = run_cli("convert", f"{path}/raw", tmp_path / "o.zarr", "--no-progress")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert (f"Error: damaged input '{path}/raw': chunk 'chunk at (2, 256, 0) (file bytes "
            f"{info.byte_offset}+{info.size})' (voxels z 2:3, y 256:512, x 0:256) cannot be "
            "read") in r.output


@pytest.mark.parametrize("command", ["info", "convert"])
def test_not_an_hdf5_file_is_one_line(tmp_path, command):
    pytest.importorskip("h5py")
    (tmp_path / "fake.h5").write_text("not hdf5")
    args = [tmp_path / "fake.h5"] + ([tmp_path / "o.zarr"] if command == "convert" else [])
    r = run_cli(command, *args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip() == (f"Error: cannot open HDF5 file '{tmp_path / 'fake.h5'}': file "
                                "signature not found (not an HDF5 file, or a damaged or truncated "
                                "one)")


def test_damaged_chunk_error_crosses_processes_whole(damaged_store):
    """Pickled (Dask, multiprocessing) it keeps store, key and region; torch's DataLoader
    re-raises it from its message, which must come back as the same one line."""
    import pickle

    vol = emtile.open_volume(damaged_store)
    with pytest.raises(emtile.volume.DamagedChunkError) as exc:
        vol[2:4]
    again = pickle.loads(pickle.dumps(exc.value))
    assert (str(again), again.store, again.key, again.region) == \
        (str(exc.value), exc.value.store, exc.value.key, exc.value.region)


def _read_all(spec):
    return emtile.open_volume(spec)[:].sum()


def test_damaged_chunk_from_a_process_pool_and_dask(damaged_store):
    import concurrent.futures
    import multiprocessing

    import dask
    import dask.array as da

    with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(emtile.volume.DamagedChunkError) as exc:
            pool.submit(_read_all, str(damaged_store)).result()
    assert str(exc.value).startswith(DAMAGED.format(store=damaged_store))
    assert exc.value.key == "0/c/1/1/0"
    vol = emtile.open_volume(damaged_store)
    lazy = da.from_array(vol, chunks=vol.chunks, asarray=True)
    with pytest.raises(EmtileError, match=re.escape(DAMAGED.format(store=damaged_store))):
        dask.compute(lazy.sum(), scheduler="processes", num_workers=1)


def test_damaged_chunk_from_a_dataloader_worker_is_the_same_line(damaged_store):
    torch = pytest.importorskip("torch")

    class Slices(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, z):
            return torch.from_numpy(emtile.open_volume(damaged_store)[z].copy())

    loader = torch.utils.data.DataLoader(Slices(), batch_size=2, num_workers=1)
    with pytest.raises(EmtileError) as exc:
        list(loader)
    message = str(exc.value)
    assert message.startswith(DAMAGED.format(store=damaged_store))
    assert "\n" not in message and "Traceback" not in message
    r = CliRunner().invoke(main, ["info", str(damaged_store)])  # info reads no data: fine
    assert r.exit_code == 0

    class Refuses(torch.utils.data.Dataset):  # any user error raised in a worker: the same
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise EmtileError("labels must be binary (0/1, 0/255 or bool), but found 3 values")

    with pytest.raises(EmtileError) as exc:
        list(torch.utils.data.DataLoader(Refuses(), num_workers=1))
    assert str(exc.value) == "labels must be binary (0/1, 0/255 or bool), but found 3 values"


def test_checked_array_keeps_the_zarr_contract(tmp_path, isbi_raw):
    import pickle

    out = tmp_path / "v.zarr"
    emtile.convert(_tif(tmp_path, isbi_raw[:3]), out, chunks=(1, 128, 128), progress=False)
    vol = emtile.open_volume(out)
    assert isinstance(vol, emtile.volume.CheckedArray)
    assert (vol.shape, vol.dtype, vol.ndim, vol.chunks, vol.path) == \
        ((3, 512, 512), np.uint8, 3, (1, 128, 128), "0")
    assert "zstd" in str(vol.compressors[0])
    np.testing.assert_array_equal(vol[1, ::7, -5:], isbi_raw[1, ::7, -5:])
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(vol))[2]), isbi_raw[2])


# ------------------------------------------------------------------ incomplete inputs


def test_incomplete_emtile_store_is_refused_as_input_but_described(tmp_path):
    out = tmp_path / "half.zarr"
    group = emtile.store.create_image(out, (2, 8, 8), np.uint8)
    group["0"][0] = 7
    for path in (out, out / "0"):
        with pytest.raises(EmtileError, match=r"half\.zarr.*' is an emtile store whose writer has "
                                              r"not finished"):
            emtile.open_volume(path, require_complete=True)
    r = run_cli("convert", out, tmp_path / "o.zarr")
    assert r.exit_code == 1 and "whose writer has not finished" in r.output
    r = run_cli("info", out)
    assert r.exit_code == 0 and "complete      NO" in r.output and "(2, 8, 8)" in r.output


def test_info_on_a_store_killed_before_its_arrays(tmp_path):
    out = tmp_path / "o.zarr"
    zarr.open_group(str(out), mode="w-", zarr_format=3,
                    attributes={"emtile": {"format": 1, "complete": False}})
    r = run_cli("info", out)
    assert r.exit_code == 0, r.output
    assert "shape         -" in r.output and "complete      NO" in r.output


# ------------------------------------------------------------------ content token


def test_content_token_notices_a_chunk_rewritten_in_place(tmp_path, isbi_raw):
    import os

    out = tmp_path / "v.zarr"
    emtile.convert(_tif(tmp_path, isbi_raw[:4]), out, chunks=(1, 256, 256), shards="none",
                   progress=False)  # a file per chunk, rewritten in place below
    token = emtile.markers.content_token(out)
    emtile.open_volume(out)[:]  # reading changes nothing
    assert emtile.markers.content_token(out) == token
    assert emtile.markers.content_token(str(out) + "/") == token
    chunk = out / "0" / "c" / "2" / "1" / "1"
    st = chunk.stat()
    time.sleep(0.01)
    zarr.open_array(out / "0", mode="r+")[2, 256:, 256:] = 7  # zarr rewrites it in place
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its mtime put back
    assert emtile.markers.content_token(out) != token
    token = emtile.markers.content_token(out)
    (out / "1").mkdir()  # another level is not the array read
    (out / "1" / "x").write_bytes(b"1")
    assert emtile.markers.content_token(out) == token
    damage(chunk)  # same size, same name: still noticed
    assert emtile.markers.content_token(out) != token


def test_content_token_of_files(tmp_path, isbi_raw):
    tif = _tif(tmp_path, isbi_raw[:2])
    token = emtile.markers.content_token(tif)
    assert emtile.markers.content_token(tif) == token
    time.sleep(0.01)
    tif.write_bytes(tif.read_bytes())
    assert emtile.markers.content_token(tif) != token
    with pytest.raises(EmtileError, match="does not exist"):
        emtile.markers.content_token(tmp_path / "nope.tif")
