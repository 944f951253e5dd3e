"""``emtile.convert``'s fast path (issue 23 item 4): contiguous TIFFs read with one read per slab,
chunks compressed and written by a pool of threads; the stored bytes pinned.

The digests were recorded with the converter before this change (commit 684550a: slabs read
through tifffile's Zarr view, one thread writing): every chunk file's bytes, not only the
decoded arrays, must come out the same.
"""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile

import emtile
from emtile import EmtileError, converter, store, tiff
from emtile.volume import open_volume

# (case) -> sha256 over every chunk file of the store (its key and bytes, sorted by key)
STORED = {
    "isbi": "c107e204674eb1a736ae9542651e5331e899fe3b9659ed5e3a93fd2fcc653ae0",
    "big_endian": "73501bbd2e7e0243646fce76f70d726bf1952687472589db23faa9a96f3c5673",
    "labels": "b49f964985c9280f49196e1522f9a9e993458378cd3b2b115aa72e932485afcd",
}


def stored_digest(path):
    """sha256 over the key and bytes of every chunk file under ``path`` (never zarr.json:
    metadata names paths and times)."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "zarr.json"
                    and "emtile_" not in str(p.relative_to(root))):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _inputs(tmp_path, isbi_dir):
    """The three conversions: (name, input, keyword arguments)."""
    rng = np.random.default_rng(7)
    be = (rng.integers(0, 4000, (5, 70, 90)).astype(">u2"))
    tifffile.imwrite(tmp_path / "be.tif", be, byteorder=">")
    return [("isbi", isbi_dir / "train-volume.tif", dict(chunks=(4, 256, 256), levels=2)),
            ("big_endian", tmp_path / "be.tif", dict(chunks=(2, 32, 64))),
            ("labels", isbi_dir / "train-labels.tif", dict(labels=True, chunks=(8, 512, 128)))]


def test_converted_bytes_are_pinned(tmp_path, isbi_dir):
    for name, src, kwargs in _inputs(tmp_path, isbi_dir):
        out = tmp_path / f"{name}.zarr"
        emtile.convert(src, out, progress=False, shards="none", **kwargs)
        got = stored_digest(out)
        if os.environ.get("EMTILE_PRINT_DIGESTS"):
            print(f"{name}: {got!r}")
            continue
        assert got == STORED[name], f"{name}: the stored bytes changed"
        want = np.asarray(open_volume(src)[:])
        np.testing.assert_array_equal(open_volume(out)[:], want != 0 if name == "labels" else want)


def test_contiguous_tiffs_take_one_read_per_slab(tmp_path, isbi_dir, monkeypatch):
    calls = []
    real = tiff.read_contiguous
    monkeypatch.setattr(tiff, "read_contiguous", lambda *a: calls.append(a[2:]) or real(*a))
    raw = tifffile.imread(isbi_dir / "train-volume.tif")[:12]
    tifffile.imwrite(tmp_path / "c.tif", raw)  # uncompressed, contiguous
    emtile.convert(tmp_path / "c.tif", tmp_path / "c.zarr", progress=False)
    assert calls == [(0, 12)]  # 12 x 512^2 bytes: one slab
    np.testing.assert_array_equal(open_volume(tmp_path / "c.zarr")[:], raw)
    # ISBI's own file (zlib), and one written page by page (separate series): read as before
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tw:
        for page in raw[:3]:
            tw.write(page, contiguous=False)
    emtile.convert(isbi_dir / "train-volume.tif", tmp_path / "isbi.zarr", progress=False)
    emtile.convert(tmp_path / "pages.tif", tmp_path / "pages.zarr", progress=False)
    np.testing.assert_array_equal(open_volume(tmp_path / "pages.zarr")[:], raw[:3])
    assert calls == [(0, 12)]
    image = raw[0, :100, :77]
    tifffile.imwrite(tmp_path / "one.tif", image)
    emtile.convert(tmp_path / "one.tif", tmp_path / "one.zarr", progress=False)
    assert calls[-1] == (0, 1)
    np.testing.assert_array_equal(open_volume(tmp_path / "one.zarr")[:], image[None])


def test_a_tiff_cut_short_after_its_check_is_one_line(tmp_path):
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, np.zeros((4, 64, 64), np.uint8), photometric="minisblack")
    src = open_volume(path)
    read = converter._slab_reader(src, path, plain=True)
    assert read(0, 4).shape == (4, 64, 64)
    os.truncate(path, os.path.getsize(path) - 5000)
    with pytest.raises(EmtileError, match=r"cannot read '.*v.tif' at slices 2:4: the file ends "
                                          r"\d+ bytes before slice 3's last pixel$"):
        read(2, 4)


@pytest.mark.parametrize("chunks", [(2, 32, 32), (3, 70, 50), (1, 16, 64)])
def test_chunk_rows_write_the_bytes_of_one_assignment(tmp_path, chunks):
    data = np.random.default_rng(3).integers(0, 255, (7, 70, 50), dtype=np.uint8)
    digests = []
    for k, pool in enumerate(("whole", None, ThreadPoolExecutor(3))):
        arr = store.create_image(tmp_path / f"{k}.zarr", data.shape, np.uint8, chunks=chunks)["0"]
        if pool == "whole":
            arr[:] = data
        else:
            converter._put(arr, 0, data[:4], pool)  # slabs that start and stop inside a z-chunk
            converter._put(arr, 4, data[4:], pool)
        np.testing.assert_array_equal(arr[:], data)
        digests.append(stored_digest(tmp_path / f"{k}.zarr" / "0"))
    assert digests[0] == digests[1] == digests[2]


# --------------------------------------------------------------------------- sharded stores


def _chunk_files(array_dir):
    return sorted(p for p in Path(array_dir).rglob("*") if p.is_file() and p.name != "zarr.json")


def _n_shards(arr):
    return int(np.prod([-(-n // s) for n, s in zip(arr.shape, arr.shards)]))


def _record_writes(monkeypatch):
    """Every key zarr's local store sets, and every one it reads and finds, in order (zarr
    3.1 asks for a shard's file before each write to it: a complete shard finds none)."""
    from zarr.storage import LocalStore

    sets, gets = [], []
    real_set, real_get = LocalStore.set, LocalStore.get

    async def set_(self, key, value):
        sets.append(key)
        return await real_set(self, key, value)

    async def get(self, key, *args, **kwargs):
        found = await real_get(self, key, *args, **kwargs)
        if found is not None:
            gets.append(key)
        return found

    monkeypatch.setattr(LocalStore, "set", set_)
    monkeypatch.setattr(LocalStore, "get", get)
    return sets, gets


def test_sharded_stores_hold_the_same_arrays_one_file_per_shard(tmp_path, isbi_dir, monkeypatch):
    """The default (shards="auto"): the arrays of every level are those of the unsharded store;
    each level holds at most one file per shard, and each shard file is set once and never
    found by a read (no read-modify-write: one assignment by one thread)."""
    monkeypatch.setattr(converter, "slab_depth",
                        lambda *a, **k: min(a[0][0], 3 * k.get("chunk_z", 1)))  # several slabs
    for name, src, kwargs in _inputs(tmp_path, isbi_dir):
        plain, sharded = tmp_path / f"{name}-plain.zarr", tmp_path / f"{name}.zarr"
        emtile.convert(src, plain, progress=False, shards="none", **kwargs)
        sets, gets = _record_writes(monkeypatch)
        emtile.convert(src, sharded, progress=False, **kwargs)
        monkeypatch.undo()
        monkeypatch.setattr(converter, "slab_depth",
                            lambda *a, **k: min(a[0][0], 3 * k.get("chunk_z", 1)))
        import zarr

        a, b = zarr.open_group(plain, mode="r"), zarr.open_group(sharded, mode="r")
        for level in range(kwargs.get("levels", 1)):
            pa, sb = a[str(level)], b[str(level)]
            assert pa.shards is None and sb.shards is not None, name
            assert sb.chunks == pa.chunks  # the inner chunks: readers read the same pieces
            assert sb.shards[0] == 3 * pa.chunks[0] or sb.shards[0] >= sb.shape[0]
            assert sb.shards[2] >= sb.shape[2]  # the whole slice in x
            np.testing.assert_array_equal(sb[:], pa[:])
            files = _chunk_files(sharded / str(level))
            assert 0 < len(files) <= _n_shards(sb) < len(_chunk_files(plain / str(level))), name
        data_keys = [k for k in sets if not k.endswith("zarr.json")]
        assert len(data_keys) == len(set(data_keys)), f"{name}: a shard file written twice"
        assert not [k for k in gets if not k.endswith("zarr.json")], f"{name}: a shard read back"


def test_instance_ids_and_explicit_shards(tmp_path):
    """ids (each level's chunks halved): auto shards halve to whole chunks at every level;
    an explicit shape is kept (slabs whole shards deep); both hold the unsharded arrays."""
    import zarr

    ids = np.random.default_rng(5).integers(0, 3000, (9, 100, 90)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "ids.tif", ids)
    kwargs = dict(labels=True, ids=True, levels=3, chunks=(1, 16, 32), progress=False)
    emtile.convert(tmp_path / "ids.tif", tmp_path / "plain.zarr", shards="none", **kwargs)
    emtile.convert(tmp_path / "ids.tif", tmp_path / "auto.zarr", **kwargs)
    emtile.convert(tmp_path / "ids.tif", tmp_path / "given.zarr", shards=(4, 32, 64), **kwargs)
    plain = zarr.open_group(tmp_path / "plain.zarr", mode="r")
    for name, level0 in (("auto", (9, 16, 96)), ("given", (4, 32, 64))):
        g = zarr.open_group(tmp_path / f"{name}.zarr", mode="r")
        assert g["0"].shards == level0
        for level in range(3):
            np.testing.assert_array_equal(g[str(level)][:], plain[str(level)][:])
            assert len(_chunk_files(tmp_path / f"{name}.zarr" / str(level))) <= _n_shards(g[str(level)])
    assert emtile.info(tmp_path / "auto.zarr")["complete"]


@pytest.mark.parametrize("shards, message", [
    ((2, 48, 64), r"^shards=2,48,64 must be whole multiples of the chunks 1,32,64 along every "
                  r"axis \(a shard holds whole chunks\), e.g. 4,32,64$"),
    ("big", r"^shards='big' is not auto, none or a shape Z,Y,X"),
    ((2, 32), r"^shards=2,32 must be 3 positive sizes Z,Y,X"),
])
def test_bad_shards_are_one_line(tmp_path, shards, message):
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((4, 64, 64), np.uint8), photometric="minisblack")
    with pytest.raises(EmtileError, match=message):
        emtile.convert(tmp_path / "v.tif", tmp_path / "v.zarr", chunks=(1, 32, 64), shards=shards,
                       progress=False)
    assert not (tmp_path / "v.zarr" / "0").exists()


def test_cli_shards(tmp_path):
    import inspect

    import zarr
    from click.testing import CliRunner

    from emtile.cli.convert import convert as command
    from emtile.cli.main import main

    default = next(p.default for p in command.params if p.name == "shards")
    assert default == inspect.signature(emtile.convert).parameters["shards"].default == "auto"
    tifffile.imwrite(tmp_path / "v.tif", np.arange(4 * 64 * 64).reshape(4, 64, 64).astype(np.uint8),
                     photometric="minisblack")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "v.tif"), str(tmp_path / "a.zarr"),
                                  "--chunks", "1,32,32", "--shards", "2,32,64", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert zarr.open_array(tmp_path / "a.zarr" / "0", mode="r").shards == (2, 32, 64)
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "v.tif"), str(tmp_path / "b.zarr"),
                                  "--chunks", "1,32,32", "--shards", "2,48,64", "--no-progress"])
    assert r.exit_code == 1 and r.output.startswith("Error: --shards 2,48,64 must be whole") \
        and r.output.count("\n") == 1, r.output
