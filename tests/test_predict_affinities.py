"""``emtile predict`` with an affinity model: an OME-Zarr 0.5 image (c, z, y, x), one channel per
offset named by it, uint8 by default, pyramid levels over z, y, x only (never mixing channels),
the target and offsets recorded for the segmenter, no mask; tiled == one whole-volume pass; and
what ``emtile info`` says about the store and the model."""

import itertools

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import emtile
from emtile import EmtileError
from emtile.cli.main import main
from emtile.describe import format_info
from emtile.store import create_image, downsample, mark_complete
from emtile.unet import save_model
from test_unet3d import make_net, reference

OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
FACTORS = ((1, 2, 2), (2, 2, 2))
SHAPE = (13, 41, 37)  # no axis a multiple of anything
OPTS = dict(tile=(20, 48, 48), chunk_size=16, max_block_px=2000, threads=1, progress=False)


@pytest.fixture(scope="module")
def aff(tmp_path_factory):
    """A tiny 3-D affinity model folder (the trainer's metadata keys), an input store, and the
    model's one forward pass over the whole volume."""
    d = tmp_path_factory.mktemp("aff")
    net = make_net(factors=FACTORS, out_channels=3, seed=2)
    save_model(net, d / "model", metadata={"target": "affinities", "offsets": OFFSETS})
    vol = np.random.default_rng(4).integers(0, 256, SHAPE).astype(np.uint8)
    g = create_image(d / "in.zarr", SHAPE, np.uint8, chunks=(8, 32, 32), voxel_size=(10, 8, 8))
    g["0"][:] = vol
    mark_complete(g)
    return d, reference(net, vol)


@pytest.fixture(scope="module")
def uint8_store(aff):
    d, _ = aff
    out = d / "aff_u8.zarr"
    r = emtile.predict(str(d / "model"), str(d / "in.zarr"), str(out), levels=2, **OPTS)
    assert r.blocks > 4  # several blocks: the pyramid and the shards are written per block
    assert "uint8 affinities (offsets -1,0,0; 0,-1,0; 0,0,-1); no mask" in str(r)
    return out


def test_store_shape_axes_dtype_channels_and_record(aff, uint8_store):
    d, ref = aff
    g = zarr.open_group(str(uint8_store), mode="r")
    a = g["0"]
    assert a.shape == (3,) + SHAPE and a.dtype == np.uint8
    assert list(a.metadata.dimension_names) == ["c", "z", "y", "x"]
    assert a.chunks[0] == 1  # one channel per chunk: a reader of some channels decodes those
    # uint8 is round(255 p) of the same probabilities
    assert np.abs(a[:].astype(np.float32) / 255 - ref).max() <= 0.5 / 255 + 1e-5
    ome = g.attrs["ome"]
    axes = ome["multiscales"][0]["axes"]
    assert [(x["name"], x["type"]) for x in axes] == [("c", "channel"), ("z", "space"),
                                                       ("y", "space"), ("x", "space")]
    assert [c["label"] for c in ome["omero"]["channels"]] == ["aff -1,0,0", "aff 0,-1,0",
                                                              "aff 0,0,-1"]
    meta = g.attrs["emtile"]
    assert meta["kind"] == "probabilities" and meta["target"] == "affinities"
    assert meta["offsets"] == OFFSETS and meta["complete"] is True
    prov = meta["provenance"]
    assert prov["offsets"] == OFFSETS and prov["mask"] is None and "no mask" in prov["mask_note"]
    assert prov["model"] == str(d / "model") and prov["dtype"] == "uint8"
    assert "labels" not in g  # no mask for affinities


def test_ome_zarr_models_validates_it_and_its_channel_names(uint8_store):
    pytest.importorskip("ome_zarr_models")
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.common.omero import Omero
    from ome_zarr_models.v05.image import Image

    group = zarr.open_group(str(uint8_store), mode="r")
    node = open_ome_zarr(group)
    assert isinstance(node, Image)
    assert len(node.attributes.ome.multiscales[0].datasets) == 2
    omero = Omero.model_validate(group.attrs["ome"]["omero"])  # labels, colours, windows
    assert len(omero.channels) == 3


def test_levels_downsample_space_and_never_mix_channels(aff):
    d, _ = aff
    out = d / "aff_f32_levels.zarr"
    emtile.predict(str(d / "model"), str(d / "in.zarr"), str(out), levels=2, dtype="float32",
                   **OPTS)
    g = zarr.open_group(str(out), mode="r")
    level0, level1 = g["0"][:], g["1"][:]
    assert level1.shape == (3, SHAPE[0], -(-SHAPE[1] // 2), -(-SHAPE[2] // 2))
    assert g["1"].metadata.dimension_names == g["0"].metadata.dimension_names
    for k in range(3):  # each channel from its own channel alone
        np.testing.assert_array_equal(level1[k], downsample(level0[k], labels=False))
    scales = [ds["coordinateTransformations"][0]["scale"]
              for ds in g.attrs["ome"]["multiscales"][0]["datasets"]]
    assert scales == [[1.0, 10.0, 8.0, 8.0], [1.0, 10.0, 16.0, 16.0]]  # c never scaled


@pytest.mark.parametrize("shards", ["auto", "none"])
def test_tiled_equals_one_whole_volume_pass(aff, tmp_path, shards):
    d, ref = aff
    out = tmp_path / "aff.zarr"
    r = emtile.predict(str(d / "model"), str(d / "in.zarr"), str(out), dtype="float32",
                       shards=shards, **OPTS)
    assert r.blocks > 4
    assert ref.std() > 0.01  # a real map: the comparison means something
    p = zarr.open_array(str(out / "0"), mode="r")
    assert (p.shards is None) == (shards == "none")
    assert np.abs(p[:] - ref).max() <= 1e-5


def test_a_mask_is_refused_and_offsets_must_name_every_channel(aff, tmp_path):
    d, _ = aff
    with pytest.raises(EmtileError, match=r"^threshold=0.5 .*not defined for an affinity model"):
        emtile.predict(str(d / "model"), str(d / "in.zarr"), str(tmp_path / "a.zarr"),
                       threshold=0.5, **OPTS)
    assert not (tmp_path / "a.zarr").exists()
    net = make_net(factors=FACTORS, out_channels=2, seed=3)
    save_model(net, tmp_path / "m2", metadata={"target": "affinities", "offsets": OFFSETS})
    with pytest.raises(EmtileError, match="records 3 affinity offsets but predicts 2 channels"):
        emtile.predict(str(tmp_path / "m2"), str(d / "in.zarr"), str(tmp_path / "b.zarr"),
                       **OPTS)
    save_model(net, tmp_path / "m3", metadata={"emtile": {"target": "affinities",
                                                          "offsets": [[-1, 0.5, 0]]}})
    with pytest.raises(EmtileError, match=r"offsets=\[\[-1, 0.5, 0\]\]"):
        emtile.predict(str(tmp_path / "m3"), str(d / "in.zarr"), str(tmp_path / "c.zarr"),
                       **OPTS)


def test_info_shows_target_and_offsets_of_store_and_model(aff, uint8_store):
    d, _ = aff
    store = emtile.info(str(uint8_store))
    assert store["target"] == "affinities" and store["offsets"] == OFFSETS
    text = format_info(store)
    assert "target        affinities" in text and "-1,0,0; 0,-1,0; 0,0,-1" in text
    assert "mask          none: no mask for an affinity model" in text
    model = emtile.info(str(d / "model"))
    assert model["target"] == "affinities" and model["offsets"] == OFFSETS
    assert "-1,0,0; 0,-1,0; 0,0,-1" in format_info(model)
    r = CliRunner().invoke(main, ["info", str(d / "model")])
    assert r.exit_code == 0 and "target        affinities" in r.output, r.output
    loaded = emtile.model.load(str(d / "model"))
    assert loaded.target == "affinities" and loaded.offsets == [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]


def test_a_3d_model_without_a_tile_takes_auto_not_572_per_axis(aff, tmp_path):
    """``tile=None`` (the default) is 572 for a 2-D model and ``"auto"`` for a 3-D one: a 572^3
    tile of even a tiny 3-D net would take tens of GB."""
    from emtile.predictor import default_tile

    assert default_tile(None, 2) == 572 and default_tile(None, 3) == "auto"
    assert default_tile((20, 48, 48), 3) == (20, 48, 48)
    d, _ = aff
    opts = {k: v for k, v in OPTS.items() if k != "tile"}
    r = emtile.predict(str(d / "model"), str(d / "in.zarr"), str(tmp_path / "a.zarr"), **opts)
    assert max(r.tile) < 572 and len(r.tile) == 3


def test_tta_averages_the_axis_permutations_with_the_offsets_renamed(tmp_path):
    """An isotropic affinity model: ``tta=True`` is the mean over the 6 axis permutations of one
    whole-volume pass over the transposed volume, transposed back, each offset's channel taken
    from the offset the transposition renamed it to; tiled as whole (two tiles); the plain
    prediction differs. A model whose only alike axes are y and x averages 2."""
    offsets = OFFSETS + [[0, 0, -3], [0, -3, 0], [-3, 0, 0]]
    net = make_net(factors=((2, 2, 2),), out_channels=6, seed=5)
    save_model(net, tmp_path / "iso", metadata={"target": "affinities", "offsets": offsets})
    vol = np.random.default_rng(6).integers(0, 256, (23, 23, 23)).astype(np.uint8)
    g = create_image(tmp_path / "in.zarr", vol.shape, np.uint8, chunks=(16, 16, 16))
    g["0"][:] = vol
    mark_complete(g)
    want = 0
    for perm in itertools.permutations(range(3)):
        inverse = [perm.index(a) for a in range(3)]
        y = reference(net, vol.transpose(perm)).transpose(0, *(1 + a for a in inverse))
        renamed = [[0] * 3 for _ in offsets]  # offset o of the transposed frame: o[j] on perm[j]
        for k, o in enumerate(offsets):
            for j in range(3):
                renamed[k][perm[j]] = o[j]
        want = want + y[[renamed.index(o) for o in offsets]]
    want = want / 6
    opts = dict(OPTS, dtype="float32")
    for tile in ((20, 20, 20), (28, 28, 28)):
        opts["tile"] = tile
        t = emtile.predict(str(tmp_path / "iso"), str(tmp_path / "in.zarr"),
                           str(tmp_path / f"t{tile[0]}.zarr"), tta=True, **opts)
        assert t.tiles > 1 or tile[0] == 28
        got = zarr.open_array(str(tmp_path / f"t{tile[0]}.zarr" / "0"), mode="r")[:]
        assert np.abs(got - want).max() <= 1e-5, tile
    plain = reference(net, vol)
    assert np.abs(plain - want).max() > 1e-3  # the average is not the plain pass
    from emtile.predictor import _tta_perms

    model = emtile.model.load(str(tmp_path / "iso"))
    assert len(_tta_perms(model, net, _Grid((20, 20, 20)), [tuple(o) for o in offsets])) == 6


class _Grid:
    def __init__(self, tile):
        self.in_tile = tile


def test_tta_of_an_affinity_model_exchanges_y_and_x_or_is_refused(aff, tmp_path):
    d, ref = aff
    out = tmp_path / "t.zarr"
    r = emtile.predict(str(d / "model"), str(d / "in.zarr"), str(out), dtype="float32",
                       tta=True, **OPTS)
    net = make_net(factors=FACTORS, out_channels=3, seed=2)
    vol = zarr.open_array(str(d / "in.zarr" / "0"), mode="r")[:]
    swapped = reference(net, vol.transpose(0, 2, 1)).transpose(0, 1, 3, 2)[[0, 2, 1]]
    assert np.abs(zarr.open_array(str(out / "0"), mode="r")[:] - (ref + swapped) / 2).max() <= 1e-5
    assert r.tiles > 1
    with pytest.raises(EmtileError, match=r"^tta=True with this affinity model and tile "
                                          r"20x48x52 has nothing to average"):
        emtile.predict(str(d / "model"), str(d / "in.zarr"), str(tmp_path / "no.zarr"),
                       tta=True, **dict(OPTS, tile=(20, 48, 52)))
    assert not (tmp_path / "no.zarr").exists()
