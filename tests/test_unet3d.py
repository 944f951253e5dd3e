"""The 3-D U-Net: per-level factors and kernels, per-axis geometry, and tiled prediction that
equals one forward pass over the whole mirror-padded volume (anisotropic factors, awkward shapes).
"""

import json

import numpy as np
import pytest
import torch
import zarr

from emtile import EmtileError
from emtile.geometry import ShapeMap, default_factors, tile_grid
from emtile.model import weights_hash
from emtile.predictor import predict, predict_array
from emtile.unet import UNet, load_folder, save_model

TOL = 1e-5
ANISO = ((1, 2, 2), (2, 2, 2))
SHAPE = (13, 41, 37)  # no axis a multiple of anything


def make_net(factors=ANISO, base=4, out_channels=1, seed=0, **kwargs):
    """A random 3-D model whose output varies (He init keeps the ReLUs alive)."""
    torch.manual_seed(seed)
    net = UNet(base=base, depth=len(factors), out_channels=out_channels, ndim=3, factors=factors,
               **kwargs).eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    return net


def reference(net, volume):
    """Sigmoid of one forward pass over the whole volume, mirror-padded by the halo along each
    axis (and extended at the far end so the size is valid there), cropped back: (C, Z, Y, X)."""
    v = volume.astype(np.float32) * np.float32(1 / 255)
    size = [next(n for n in range(s + 2 * h, s + 2 * h + 2 * a) if net.shape_map.output_along(n, ax))
            for ax, (s, h, a) in enumerate(zip(v.shape, net.halos, net.aligns))]
    pad = np.pad(v, [(h, n - s - h) for n, s, h in zip(size, v.shape, net.halos)], mode="reflect")
    with torch.no_grad():
        y = torch.sigmoid(net(torch.from_numpy(pad)[None, None]))[0].numpy()
    return y[(slice(None),) + tuple(slice(0, s) for s in v.shape)]


def rand_volume(shape=SHAPE, seed=1):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


@pytest.fixture(scope="module")
def case():
    net, vol = make_net(), rand_volume()
    return net, vol, reference(net, vol)


# ------------------------------------------------------------------ the network and its geometry


def test_anisotropic_geometry_by_hand():
    # z: level 0 pools nothing and convolves in-plane only (1x3x3): 18 -> 18 -> -4 14 /2 7 -4 3,
    # up: 6 - 4 = 2 -> 2; y, x: the 2-D depth-2 net's 44 -> 4 (halo 20, alignment 4)
    net = make_net()
    assert net.factors == ANISO and net.kernels == ((1, 3, 3), (3, 3, 3), (3, 3, 3))
    assert net.halos == (8, 20, 20) and net.aligns == (2, 4, 4) and net.min_sizes == (18, 44, 44)
    assert net.output_size((18, 44, 44)) == (2, 4, 4)
    assert net.valid_sizes(17, 23, axis=0) == [18, 20, 22]
    with torch.no_grad():
        assert net(torch.zeros(2, 1, 20, 48, 52)).shape == (2, 1, 4, 8, 12)
    with pytest.raises(EmtileError, match="halo differs per axis"):
        net.halo
    # no pooling across sections at all: no context along z, every z size valid
    flat = UNet(base=2, depth=2, ndim=3, factors=((1, 2, 2), (1, 2, 2)))
    assert flat.kernels == ((1, 3, 3),) * 3 and flat.halos == (0, 20, 20)
    assert flat.aligns == (1, 4, 4) and flat.min_sizes == (1, 44, 44)


def test_isotropic_3d_and_2d_defaults():
    iso = UNet(base=2, depth=2, ndim=3)
    assert iso.factors == ((2, 2, 2),) * 2 and iso.kernels == ((3, 3, 3),) * 3
    assert iso.halo == 20 and iso.align == 4 and iso.min_size == 44
    net = UNet(base=2, depth=4)  # the 2-D network's config and layers are as they were
    assert net.config == dict(in_channels=1, out_channels=1, base=2, depth=4, batch_norm=False,
                              dropout=0.0)
    assert net.ndim == 2 and net.halo == 92 and net.factors == ((2, 2),) * 4
    assert ShapeMap(4).uniform and not ShapeMap(2, 3, factors=ANISO).uniform


def test_default_factors():
    assert default_factors((40, 4, 4), 4) == ((1, 2, 2),) * 3 + ((2, 2, 2),)
    assert default_factors((50, 5, 5), 2) == ((1, 2, 2),) * 2
    assert default_factors((10, 10, 10), 3) == ((2, 2, 2),) * 3
    assert default_factors((30, 10, 10), 2) == ((1, 2, 2), (2, 2, 2))  # 20 nm: no longer below 15
    with pytest.raises(EmtileError, match="voxel_size=.* must be 3 numbers"):
        default_factors((4, 4), 2)
    with pytest.raises(EmtileError, match="voxel_size=.* must be 3 positive numbers"):
        default_factors((0, 4, 4), 2)
    with pytest.raises(EmtileError, match="depth=9 must be an integer from 1 to 8"):
        default_factors((40, 4, 4), 9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(factors=((1, 2, 2),)), r"^factors=\(\(1, 2, 2\),\) has 1 entries; expected 2"),
    (dict(factors=((1, 1, 1), (2, 2, 2))), "^factors=.*level 0 has .*down-sample some axis"),
    (dict(factors=((1, 2, 2), (2, 5, 2))), "^factors=.*level 1 has .*from 1 to 4"),
    (dict(factors=((1, 2), (2, 2, 2))), r"^factors=.*the entry \(1, 2\) is not an integer or 3 "),
    (dict(factors="122"), "^factors='122' must give 2"),
    (dict(kernels=((1, 3, 3), (3, 3, 3))), "^kernels=.* has 2 entries; expected 3"),
    (dict(kernels=((1, 3, 3), (3, 4, 3), (3, 3, 3))), "^kernels=.*level 1 has .*must be odd"),
    (dict(ndim=4), r"^ndim=4 must be 2 or 3"),
    (dict(ndim=3.0), r"^ndim=3.0 must be 2 or 3"),
])
def test_bad_factors_and_kernels_are_one_line_errors(kwargs, match):
    args = dict(base=2, depth=2, ndim=3)
    args.update(kwargs)
    with pytest.raises(EmtileError, match=match) as info:
        UNet(**args)
    assert "\n" not in str(info.value)


def test_a_3d_model_folder_round_trips(tmp_path):
    net = make_net(out_channels=3, kernels=((1, 3, 3), (1, 3, 3), (3, 3, 3)))
    save_model(net, tmp_path / "m", metadata={"voxel_size": [40, 4, 4]})
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["config"]["ndim"] == 3 and doc["config"]["factors"] == [[1, 2, 2], [2, 2, 2]]
    assert doc["config"]["kernels"] == [[1, 3, 3], [1, 3, 3], [3, 3, 3]]
    back = load_folder(tmp_path / "m")
    assert back.config == net.config and back.ndim == 3 and back.halos == net.halos
    assert back.kernels == net.kernels and weights_hash(back) == weights_hash(net)
    for (k, a), (k2, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # a crafted config: one line naming the keyword, nothing built
    doc["config"]["factors"] = [[1, 2, 2], [2, 2, 9]]
    (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(EmtileError, match=r"config.json in .* is not valid: factors=.*level 1"):
        load_folder(tmp_path / "m")


def test_3d_tile_grid_is_aligned_per_axis():
    sm = ShapeMap(2, 3, factors=ANISO)
    g = tile_grid(SHAPE, sm, (20, 48, 52), roi=(slice(3, 12), slice(5, 40), slice(1, 37)))
    assert g.in_tile == (20, 48, 52) and g.out_tile == (4, 8, 12) and g.halo == (8, 20, 20)
    assert g.stride == (4, 8, 12) and g.origin == (2, 4, 0) and g.counts == (3, 5, 4)
    count = np.zeros(g.region_shape, int)
    for idx in g.tiles():
        start, _ = g.out_window(idx)
        assert all(s % a == 0 for s, a in zip(start, sm.aligns))
        a, b = g.own_window(idx)
        count[tuple(slice(x - r, y - r) for x, y, (r, _) in zip(a, b, g.region))] += 1
    assert (count == 1).all()


# ------------------------------------------------------------------ tiled == whole


# small tiles (many per axis), uneven ones, and one covering the volume
TILES = [(20, 48, 48), (18, 64, 56), (24, 60, 64), (30, 84, 80)]


def test_every_tile_size_equals_the_whole_volume_pass(case):
    net, vol, ref = case
    assert ref.std() > 0.01  # the model's output is not flat: the comparison means something
    for tile in TILES:
        p = predict_array(net, vol, tile=tile)
        assert p.shape == vol.shape and p.dtype == np.float32
        assert np.abs(p - ref[0]).max() <= TOL, f"tile {tile}"


def test_auto_tile_in_3d(case):
    net, vol, ref = case
    p = predict_array(net, vol, tile="auto")
    assert np.abs(p - ref[0]).max() <= TOL
    p = predict_array(net, vol, tile="auto", max_tile_memory=40 * 60 * 60 * 4 * 25)  # tiles split
    assert np.abs(p - ref[0]).max() <= TOL


def test_roi_batches_and_blocks(case):
    net, vol, ref = case
    roi = (slice(2, 11), slice(5, 38), slice(3, 30))  # unaligned: tiles straddle blocks
    p = predict_array(net, vol, tile=(20, 48, 52), roi=roi, batch_size=2, chunk_size=16,
                      max_block_px=2000)
    assert p.shape == ref[0][roi].shape
    assert np.abs(p - ref[0][roi]).max() <= TOL


@pytest.mark.parametrize("blend, overlap", [("linear", (2, 4, 4)), ("gaussian", 6)])
def test_overlap_and_blending_equal_the_whole_volume_pass(case, blend, overlap):
    net, vol, ref = case
    p = predict_array(net, vol, tile=(24, 60, 60), blend=blend, overlap=overlap, batch_size=2,
                      chunk_size=20, max_block_px=4000)
    assert np.abs(p - ref[0]).max() <= TOL


def test_no_pooling_across_sections_and_several_channels():
    net = make_net(factors=((1, 2, 2), (1, 2, 2)), out_channels=3, seed=2)
    vol = rand_volume((5, 29, 50), seed=3)
    ref = reference(net, vol)
    assert ref.shape == (3, 5, 29, 50)
    for tile in [(1, 48, 52), (3, 64, 56)]:
        p = predict_array(net, vol, tile=tile, batch_size=2)
        assert p.shape == (3, 5, 29, 50)
        assert np.abs(p - ref).max() <= TOL, f"tile {tile}"


def test_predict_writes_a_3d_store(tmp_path):
    net, vol = make_net(out_channels=2, seed=4), rand_volume()
    ref = reference(net, vol)
    save_model(net, tmp_path / "m")
    r = predict(tmp_path / "m", vol, tmp_path / "p.zarr", tile=(22, 52, 48), dtype="float32",
                device="cpu", progress=False, chunk_size=64)
    assert r.tile == (22, 52, 48) and r.out_tile == (6, 12, 8)
    out = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    assert out["0"].shape == (2,) + SHAPE
    assert out["0"].chunks[1:] == (13, 12, 16)  # multiples of the stride near 64**(2/3) = 16
    assert np.abs(out["0"][...] - ref).max() <= TOL


# ------------------------------------------------------------------ errors


def test_3d_model_errors_name_the_keyword(case):
    net, vol, _ = case
    with pytest.raises(EmtileError, match=r"^the model is 3-D: it predicts \(Z, Y, X\) volumes, "
                                          r"but input has 2 dimensions \(shape \(41, 37\)\)$"):
        predict_array(net, vol[0])
    with pytest.raises(EmtileError, match=r"^tile=\(19, 48, 48\) is not valid: 19 along z for "
                                          r"depth 2 with factors=\(\(1, 2, 2\), \(2, 2, 2\)\); "
                                          r"along z, nearest valid sizes are 18 and 20$"):
        predict_array(net, vol, tile=(19, 48, 48))
    with pytest.raises(EmtileError, match=r"^tile=\(48, 48\) has 2 values; expected 1 or 3$"):
        predict_array(net, vol, tile=(48, 48))
    with pytest.raises(EmtileError, match=r"^tile=92 along z gives an output of 4 px, less than "
                                          r"the 8-px alignment at depth 3; use a tile of at "
                                          r"least 100$"):
        predict_array(UNet(base=2, depth=3, ndim=3), vol, tile=92)
    with pytest.raises(EmtileError, match=r"^overlap=3 is too large for tile=20 \(output 4\)"):
        predict_array(net, vol, tile=(20, 48, 48), overlap=(3, 0, 0), blend="gaussian")


def test_the_command_line_takes_a_tile_per_axis():
    from emtile.cli.predict import TileSize

    assert TileSize().convert("20,132,132", None, None) == (20, 132, 132)
    assert TileSize().convert("572", None, None) == 572
    assert TileSize().convert("auto", None, None) == "auto"
    with pytest.raises(Exception, match="is not a tile size"):
        TileSize().convert("20,x", None, None)


def test_info_describes_an_anisotropic_3d_model_per_axis(tmp_path):
    from emtile.describe import format_info, info
    from emtile.unet import UNet, save_model

    save_model(UNet(base=2, depth=2, ndim=3, factors=((1, 2, 2), (2, 2, 2))), tmp_path / "m")
    d = info(tmp_path / "m")
    g = d["geometry"]
    assert g["min_size"] == [18, 44, 44] and g["halo"] == [8, 20, 20] and g["step"] == [2, 4, 4]
    text = format_info(d)
    assert "U-Net 3-D (factors 1,2,2; 2,2,2), depth 2" in text
    assert "z 18 + 2 n (18, 20, 22, 24, ...); output = input - 16" in text
