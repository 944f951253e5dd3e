"""Sharded prediction stores (Zarr v3's sharding codec): the same array bytes as unsharded ones,
at most one file per block per level for every array, valid OME-Zarr 0.5 for every store kind,
shard shapes checked in one line, and sharded or unsharded inputs read alike.

Resume after SIGKILL with sharding is ``tests/test_faults.py``'s predict tests (the default is
sharded: every shard a killed run left is the finished run's file), a sharded cluster run
``tests/test_predict_cluster.py``'s."""

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import emtile
from emtile import EmtileError
from emtile.cli.main import main
from emtile.store import create_image, create_label_image, mark_complete
from emtile.unet import UNet, save_model

# tile 68 at depth 2 gives 28-px outputs; 28-px chunks; blocks of 2x2 chunks in y, x
OPTS = dict(tile=68, chunk_size=28, max_block_px=4 * 28 * 28, threads=1, progress=False,
            threshold=0.53, levels=2)
ARRAYS = ("0", "1", "labels/mask/0", "labels/mask/1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    torch.manual_seed(0)
    net = UNet(base=2, depth=2)
    for m in net.modules():  # He init: an output that varies, so the mask is not empty
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    save_model(net, d / "model")
    vol = np.random.default_rng(1).integers(0, 256, (3, 112, 140)).astype(np.uint8)
    src = create_image(d / "in.zarr", vol.shape, np.uint8, chunks=(1, 64, 64))
    src["0"][:] = vol
    mark_complete(src)
    return d


def run(data, out, **kw):
    return emtile.predict(str(data / "model"), str(data / "in.zarr"), str(out), **{**OPTS, **kw})


def chunk_files(array):
    """The data files of one array (chunks or shards), zarr's temporaries included."""
    return [p for p in Path(array).rglob("*") if p.is_file() and p.name != "zarr.json"]


def arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {name: g[name][...] for name in ARRAYS}


@pytest.fixture(scope="module")
def plain(data):
    out = data / "plain.zarr"
    r = run(data, out, shards="none")
    return out, r


def test_same_bytes_and_at_most_one_file_per_block_per_level(data, plain, tmp_path):
    ref, r = plain
    out = tmp_path / "sharded.zarr"
    sharded = run(data, out)  # shards="auto", the default
    assert sharded.blocks == r.blocks == 3 * 2 * 3  # z, y (112 = 2 blocks of 56), x (140)
    want = arrays(ref)
    assert 0 < want["labels/mask/0"].mean() < 1 and want["0"].std() > 1  # real maps
    for name, values in arrays(out).items():
        assert values.dtype == want[name].dtype and values.tobytes() == want[name].tobytes(), name
    for name in ARRAYS:
        a = zarr.open_array(str(out / name), mode="r")
        level = int(name[-1])
        assert a.shards == (1, 56 // 2**level, 56 // 2**level), name
        assert a.chunks == zarr.open_array(str(ref / name), mode="r").chunks
        files = chunk_files(out / name)
        assert 0 < len(files) <= sharded.blocks, (name, len(files))
        assert not [f for f in files if f.name.endswith(".partial")]
        assert len(chunk_files(ref / name)) > len(files)  # unsharded: a file per chunk
    total = sum(len(chunk_files(out / n)) for n in ("0", "1"))
    assert total <= sharded.blocks * OPTS["levels"]


def test_a_shard_shape_dividing_the_blocks(data, plain, tmp_path):
    ref, _ = plain
    out = tmp_path / "given.zarr"
    run(data, out, shards=(1, 28, 56))
    assert zarr.open_array(str(out / "0"), mode="r").shards == (1, 28, 56)
    assert zarr.open_array(str(out / "1"), mode="r").shards == (1, 14, 28)
    want = arrays(ref)
    assert all(v.tobytes() == want[k].tobytes() for k, v in arrays(out).items())


@pytest.mark.parametrize("shards, match", [
    ((1, 42, 56), r"^shards=\(1, 42, 56\) along y: 42 must be a whole multiple of the output "
                  r"chunk \(28\) that divides the block \(56\).*e.g. shards=\(1, 56, 56\)$"),
    ((2, 56, 56), r"along z: 2 must be a whole multiple"),
    # one shard holding the whole y axis, which two blocks share: two writers of one file
    ((1, 112, 56), r"along y: 112 must be a whole multiple of the output chunk \(28\) that "
                   r"divides the block \(56\)"),
    ((56, 56), r"^shards=\(56, 56\) must give one size per axis of the output \(z,y,x"),
    ((0, 56, 56), r"^shards=\(0, 56, 56\) is not a shard shape"),
    ("some", r"^shards='some' is not a shard shape: give 'auto', 'none'"),
])
def test_bad_shards_are_one_line(data, tmp_path, shards, match):
    with pytest.raises(EmtileError, match=match):
        run(data, tmp_path / "bad.zarr", shards=shards)
    assert not (tmp_path / "bad.zarr").exists()


def test_cli_shards(data, tmp_path):
    base = ["predict", str(data / "in.zarr"), "--model", str(data / "model"), "--tile", "68",
            "--threads", "1", "--no-progress"]
    r = CliRunner().invoke(main, base + [str(tmp_path / "a.zarr"), "--shards", "none"])
    assert r.exit_code == 0, r.output
    assert zarr.open_array(str(tmp_path / "a.zarr" / "0"), mode="r").shards is None
    r = CliRunner().invoke(main, base + [str(tmp_path / "b.zarr"), "--shards", "1,a,56"])
    assert r.exit_code == 2 and "'1,a,56' is not a shard shape" in r.output, r.output
    r = CliRunner().invoke(main, base + [str(tmp_path / "c.zarr"), "--shards", "1,20,20"])
    assert r.exit_code == 1 and r.output.startswith("Error: --shards (1, 20, 20) along y"), \
        r.output
    r = CliRunner().invoke(main, ["info", str(data / "plain.zarr")])
    assert "\nshards " not in r.output and "chunks        (1, 28, 28)" in r.output


def test_every_sharded_store_kind_validates(data, tmp_path):
    pytest.importorskip("ome_zarr_models")
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    def kind(path):
        return type(open_ome_zarr(zarr.open_group(str(path), mode="r")))

    out = tmp_path / "pred.zarr"
    run(data, out)
    assert (kind(out), kind(out / "labels"), kind(out / "labels" / "mask")) == \
        (Image, Labels, ImageLabel)
    image = create_image(tmp_path / "img.zarr", (4, 100, 90), np.uint16, chunks=(2, 32, 32),
                         levels=3, halve_chunks=True, shards=(4, 64, 64), voxel_size=(30, 8, 8))
    image["0"][:] = 7
    mark_complete(image)
    ids = create_label_image(tmp_path / "ids.zarr", (4, 100, 90), np.uint32, source=None,
                             chunks=(2, 32, 32), levels=2, shards=(4, 64, 96))
    ids["1"][:] = 3
    mark_complete(ids)
    assert (kind(tmp_path / "img.zarr"), kind(tmp_path / "ids.zarr")) == (Image, ImageLabel)
    assert image["2"].shards == (4, 16, 16) and ids["1"].shards == (4, 32, 48)
    assert (ids["1"][:] == 3).all() and emtile.open_volume(str(tmp_path / "img.zarr"))[0, 0, 0] == 7


def test_store_shards_are_checked(tmp_path):
    with pytest.raises(EmtileError, match=r"^shards=\(1, 48, 64\) must be whole multiples of the "
                                          r"chunks \(1, 32, 32\)"):
        create_image(tmp_path / "a.zarr", (2, 100, 100), np.uint8, chunks=(1, 32, 32),
                     shards=(1, 48, 64))
    with pytest.raises(EmtileError, match=r"cannot be halved to whole chunks at level 1 along y"):
        create_image(tmp_path / "b.zarr", (2, 100, 100), np.uint8, chunks=(1, 1, 32),
                     shards=(1, 3, 64), levels=2, halve_chunks=True)


def test_sharded_and_unsharded_inputs_read_alike(data, plain, tmp_path):
    """An input written sharded (as predict now writes) and an old unsharded one give the same
    prediction; info shows the shards."""
    ref, _ = plain
    vol = emtile.open_volume(str(data / "in.zarr"))[:]
    src = create_image(tmp_path / "in.zarr", vol.shape, np.uint8, chunks=(1, 32, 32),
                       shards=(3, 64, 64))
    src["0"][:] = vol
    mark_complete(src)
    assert np.array_equal(emtile.open_volume(str(tmp_path / "in.zarr"))[1, 5:70, 60:],
                          vol[1, 5:70, 60:])
    out = tmp_path / "p.zarr"
    emtile.predict(str(data / "model"), str(tmp_path / "in.zarr"), str(out), **OPTS)
    want = arrays(ref)
    assert all(v.tobytes() == want[k].tobytes() for k, v in arrays(out).items())
    text = CliRunner().invoke(main, ["info", str(out)]).output
    assert "shards        (1, 56, 56)" in text, text


def test_a_block_that_took_in_a_short_tail_owns_its_edge_shards(data, tmp_path):
    """With overlapping tiles the last block along an axis can take in the short tail (it starts
    inside the last tile's window): it then owns the whole shard and the edge shard past it, so
    the files are at most one per shard of the block grid, still written by one block each."""
    from emtile.geometry import ShapeMap, block_plan, tile_grid

    vol = emtile.open_volume(str(data / "in.zarr"))[:, :81, :88]
    kw = dict(OPTS, overlap=8, blend="linear", chunk_size=20, max_block_px=4 * 20 * 20)
    grid = tile_grid(vol.shape, ShapeMap(2, 2), 68, overlap=8)
    plan = block_plan(grid, (1, 20, 20), max_block_px=kw["max_block_px"])
    cells = [-(-n // b) for n, b in zip(grid.region_shape, plan.block_shape)]
    assert len(plan) < np.prod(cells)  # the case: a tail joined the block before it
    net = str(data / "model")
    a = emtile.predict(net, vol, str(tmp_path / "a.zarr"), **kw)
    emtile.predict(net, vol, str(tmp_path / "b.zarr"), shards="none", **kw)
    assert a.blocks == len(plan)
    want = arrays(tmp_path / "b.zarr")
    assert all(v.tobytes() == want[k].tobytes() for k, v in arrays(tmp_path / "a.zarr").items())
    for name in ARRAYS:
        assert len(chunk_files(tmp_path / "a.zarr" / name)) <= np.prod(cells), name
