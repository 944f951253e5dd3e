"""emtile.predict: tiled prediction equals one forward pass over the whole mirror-padded slice.

Random-weight models (small ``base`` so the suite stays fast) on volumes whose sizes are not
multiples of anything; every tile size, batch size, worker count, ROI and blend must give the
same probabilities as the reference, to float32 rounding.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr

import emtile
from emtile import EmtileError
from emtile.predict import predict, predict_array
from emtile.store import create_image, is_complete
from emtile.unet import UNet, save_model

TOL = 1e-5


def make_net(depth, base=4, out_channels=1, seed=0):
    """A random model whose output varies (He init keeps the ReLUs alive through the levels)."""
    torch.manual_seed(seed)
    net = UNet(base=base, depth=depth, out_channels=out_channels).eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    return net


def reference(net, volume):
    """Sigmoid of one forward pass per slice, over the slice mirror-padded by the halo (and
    extended at the far end so its size is valid), cropped back to the slice: (C, Z, Y, X)."""
    h = net.halo
    scale = 1 / 255 if volume.dtype == np.uint8 else 1
    out = []
    for sl in volume.reshape((-1,) + volume.shape[-2:]).astype(np.float32) * np.float32(scale):
        size = [next(n for n in range(s + 2 * h, s + 2 * h + 2 * net.align) if net.is_valid(n))
                for s in sl.shape]
        pad = np.pad(sl, [(h, n - s - h) for n, s in zip(size, sl.shape)], mode="reflect")
        with torch.no_grad():
            y = torch.sigmoid(net(torch.from_numpy(pad)[None, None]))[0].numpy()
        out.append(y[:, :sl.shape[0], :sl.shape[1]])
    return np.stack(out, axis=1)


def valid_tiles(net, n):
    """Three valid tile sizes: outputs of about n/4 and n/2.5, and one tile covering ``n``."""
    sizes = net.valid_sizes(net.min_size, n + 2 * net.halo + 2 * net.align)

    def near(out):
        return min(sizes, key=lambda t: abs(net.output_size(t) - out))

    return [near(n / 4), near(n / 2.5), next(t for t in sizes if net.output_size(t) >= n)]


def rand_volume(shape, seed=1):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


CASES = {2: (3, 131, 97), 3: (2, 201, 157), 4: (3, 517, 389)}


@pytest.fixture(scope="module")
def cases():
    out = {}
    for depth, shape in CASES.items():
        net = make_net(depth)
        vol = rand_volume(shape)
        out[depth] = (net, vol, reference(net, vol)[0])
    return out


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("depth", sorted(CASES))
def test_every_tile_size_equals_the_whole_slice_pass(cases, depth):
    net, vol, ref = cases[depth]
    assert ref.std() > 0.01  # the model's output is not flat: the comparison means something
    for tile in valid_tiles(net, max(vol.shape[1:])):
        p = predict_array(net, vol, tile=tile)
        assert p.shape == vol.shape and p.dtype == np.float32
        assert np.abs(p - ref).max() <= TOL, f"tile {tile}"


@pytest.mark.parametrize("depth, batch_size, workers", [(2, 3, 2), (3, 2, 0), (4, 4, 2)])
def test_batches_and_workers_do_not_change_the_result(cases, depth, batch_size, workers):
    net, vol, ref = cases[depth]
    tile = valid_tiles(net, max(vol.shape[1:]))[1]
    p = predict_array(net, vol, tile=tile, batch_size=batch_size, num_workers=workers,
                      chunk_size=20, max_block_px=5000)  # many blocks

    assert np.abs(p - ref).max() <= TOL


@pytest.mark.parametrize("depth", sorted(CASES))
def test_roi_equals_the_same_region_of_the_whole_prediction(cases, depth):
    net, vol, ref = cases[depth]
    z, y, x = vol.shape
    roi = (slice(1, z), slice(y // 5 + 3, y - 7), slice(x // 3 + 1, x))
    tile = valid_tiles(net, max(vol.shape[1:]))[1]
    for workers in (0, 2):
        p = predict_array(net, vol, tile=tile, roi=roi, num_workers=workers, chunk_size=30,
                          max_block_px=8000)  # the ROI is not aligned: tiles straddle blocks
        assert p.shape == ref[roi].shape
        assert np.abs(p - ref[roi]).max() <= TOL


@pytest.mark.parametrize("blend, overlap", [("none", 13), ("linear", 24), ("cosine", 20),
                                            ("gaussian", 30)])
@pytest.mark.parametrize("depth", [2, 4])
def test_blending_with_overlap_still_equals_the_reference(cases, depth, blend, overlap):
    net, vol, ref = cases[depth]
    tile = valid_tiles(net, max(vol.shape[1:]))[1] + net.align * (2 if depth == 2 else 0)
    p = predict_array(net, vol, tile=tile, blend=blend, overlap=overlap, max_block_px=20000,
                      chunk_size=50,
                      num_workers=2 if blend == "cosine" else 0, batch_size=2)
    assert np.abs(p - ref).max() <= TOL


def test_single_image_and_multi_channel_output():
    net = make_net(3, out_channels=2)
    img = rand_volume((150, 141))
    ref = reference(net, img)[:, 0]
    p = predict_array(net, img, tile=140)
    assert p.shape == (2, 150, 141)
    assert np.abs(p - ref).max() <= TOL


def test_float_input_and_tta_shapes():
    net = make_net(2)
    vol = np.random.default_rng(3).random((2, 60, 50)).astype(np.float64)
    ref = reference(net, vol.astype(np.float32))[0]
    p = predict_array(net, vol, tile=64)
    assert np.abs(p - ref).max() <= TOL
    t = predict_array(net, vol, tile=64, tta=True)
    assert t.shape == p.shape and 0 <= t.min() and t.max() <= 1
    assert np.abs(t - p).max() < 0.5  # an average of flipped predictions, not something else


def test_mixed_precision_on_cpu_stays_close():
    net = make_net(2)
    vol = rand_volume((1, 70, 60))
    p = predict_array(net, vol, tile=64, amp="bf16")
    assert np.abs(p - reference(net, vol)[0]).max() < 0.05


def test_predict_array_leaves_the_model_as_it_was():
    net = make_net(2).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    predict_array(net, rand_volume((40, 40)), tile=64)
    assert net.training
    assert next(net.parameters()).is_contiguous()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_auto_tile_picks_one_big_tile_on_a_small_slice(tmp_path):
    net = make_net(4)
    vol = rand_volume((2, 200, 180))
    result = predict(net, vol, tmp_path / "p.zarr", tile="auto", dtype="float32", progress=False)
    assert result.tile[-1] == 396  # output 212 >= 200: one tile per slice
    assert result.tiles == 2
    assert result.efficiency == pytest.approx(200 * 180 / 396**2)
    ref = reference(net, vol)[0]
    assert np.abs(emtile.open_volume(tmp_path / "p.zarr")[:] - ref).max() <= TOL


# ------------------------------------------------------------------ the store


def test_store_probabilities_mask_and_metadata(tmp_path):
    net = make_net(2, out_channels=1)
    vol = rand_volume((3, 131, 97))
    ref = reference(net, vol)[0]
    out = tmp_path / "pred.zarr"
    result = predict(net, vol, out, tile=68, threshold=0.5, progress=False, chunk_size=56,
                     max_block_px=4000)
    assert result.blocks > 3 and result.blocks_resumed == 0
    assert is_complete(out) and is_complete(out / "labels" / "mask")
    probs = emtile.open_volume(out)
    assert probs.shape == vol.shape and probs.dtype == np.uint8
    # uint8 = round(255 p); a float-rounding difference may flip a value sitting on .5
    expect = np.rint(ref * 255).astype(np.int16)
    assert np.abs(probs[:].astype(np.int16) - expect).max() <= 1
    assert (probs[:] == expect).mean() > 0.999
    mask = emtile.open_volume(out / "labels" / "mask")[:]
    sure = np.abs(ref - 0.5) > TOL
    np.testing.assert_array_equal(mask[sure], (ref[sure] >= 0.5).astype(np.uint8))
    assert 0 < mask.mean() < 1
    group = zarr.open_group(out, mode="r")
    assert group.attrs["ome"]["multiscales"][0]["axes"][0]["name"] == "z"
    assert group["labels"].attrs["labels"] == ["mask"]
    assert "image-label" in zarr.open_group(out / "labels" / "mask", mode="r").attrs["ome"]
    # every block owns whole chunks
    chunks = probs.chunks
    for b in range(result.blocks):
        assert group["emtile_blocks"][b] == 1
    assert chunks[0] == 1


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_float_outputs_from_a_path_input_and_model_folder(tmp_path, dtype):
    net = make_net(3, out_channels=2)
    save_model(net, tmp_path / "model")
    vol = rand_volume((2, 101, 77))
    src = create_image(tmp_path / "in.zarr", vol.shape, np.uint8, chunks=(1, 32, 32),
                       voxel_size=(50, 4, 4))
    src["0"][:] = vol
    out = tmp_path / "pred.zarr"
    predict(tmp_path / "model", tmp_path / "in.zarr", out, tile=108, dtype=dtype, num_workers=2,
            progress=False)
    p = emtile.open_volume(out)
    assert p.shape == (2, 2, 101, 77) and p.dtype == np.dtype(dtype)
    ms = zarr.open_group(out, mode="r").attrs["ome"]["multiscales"][0]
    assert [ax["name"] for ax in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 50.0, 4.0, 4.0]
    ref = reference(net, vol)
    tol = TOL if dtype == "float32" else 1e-3
    assert np.abs(p[:].astype(np.float32) - ref).max() <= tol


RUN = textwrap.dedent("""
    import sys
    from emtile.predict import predict
    r = predict(sys.argv[1], sys.argv[2], sys.argv[3], tile=68, threshold=0.4, dtype="float32",
                progress=False, chunk_size=56, max_block_px=4000, num_workers=int(sys.argv[4]))
    print("resumed", r.blocks_resumed, "of", r.blocks)
""")


def _run(*args, crash_after=None):
    env = dict(os.environ)
    env.pop("EMTILE_TEST_CRASH_AFTER_BLOCKS", None)
    if crash_after:
        env["EMTILE_TEST_CRASH_AFTER_BLOCKS"] = str(crash_after)
    return subprocess.run([sys.executable, "-c", RUN, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_to_byte_identical_output(tmp_path):
    save_model(make_net(2), tmp_path / "model")
    src = zarr.create_array(tmp_path / "in.zarr", shape=(3, 131, 97), chunks=(1, 64, 64),
                            dtype="uint8", zarr_format=3)
    src[:] = rand_volume((3, 131, 97))
    model, inp = tmp_path / "model", tmp_path / "in.zarr"

    full = _run(model, inp, tmp_path / "full.zarr", 0)
    assert full.returncode == 0, full.stderr
    n_blocks = int(full.stdout.split()[-1])
    assert n_blocks >= 6

    out = tmp_path / "resumed.zarr"
    killed = _run(model, inp, out, 1, crash_after=3)
    assert killed.returncode == -9  # SIGKILL: no cleanup ran
    assert not is_complete(out)
    assert 3 <= int(zarr.open_group(out, mode="r")["emtile_blocks"][:].sum()) < n_blocks

    again = _run(model, inp, out, 0)
    assert again.returncode == 0, again.stderr
    resumed = int(again.stdout.split()[1])
    assert 3 <= resumed < n_blocks
    assert is_complete(out)
    for name in ("0", "labels/mask/0"):
        a = zarr.open_array(tmp_path / "full.zarr" / name, mode="r")[:]
        b = zarr.open_array(out / name, mode="r")[:]
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_a_different_run_does_not_resume_an_incomplete_store(tmp_path):
    net = make_net(2)
    vol = rand_volume((2, 60, 50))
    out = tmp_path / "p.zarr"
    predict(net, vol, out, tile=64, progress=False)
    group = zarr.open_group(out, mode="r+")
    meta = dict(group.attrs["emtile"])
    meta["complete"] = False
    group.attrs["emtile"] = meta  # as if interrupted
    result = predict(net, vol, out, tile=68, progress=False)  # another tile size: start again
    assert result.blocks_resumed == 0 and is_complete(out)


# ------------------------------------------------------------------ bad input


def test_missing_model_folder(tmp_path):
    with pytest.raises(EmtileError, match="model folder '.*nope' does not exist"):
        predict(tmp_path / "nope", rand_volume((20, 20)), tmp_path / "p.zarr")


@pytest.mark.parametrize("shape", [(2, 2, 30, 30), (30,)])
def test_model_volume_dimensionality_mismatch(tmp_path, shape):
    with pytest.raises(EmtileError, match=rf"the model is 2-D: it predicts \(Y, X\) images or "
                                          rf"\(Z, Y, X\) stacks, but input has {len(shape)} dim"):
        predict(make_net(2), rand_volume(shape), tmp_path / "p.zarr")


def test_invalid_tile(tmp_path):
    with pytest.raises(EmtileError, match="tile=570 is not valid for depth 4: nearest valid sizes "
                                          "are 556 and 572"):
        predict(make_net(4), rand_volume((50, 50)), tmp_path / "p.zarr", tile=570)
    with pytest.raises(EmtileError, match="tile=188 gives an output of 4 px, less than the 16-px "
                                          "alignment at depth 4; use a tile of at least 204"):
        predict(make_net(4), rand_volume((50, 50)), tmp_path / "p.zarr", tile=188)
    with pytest.raises(EmtileError, match="tile='big' is not a tile size"):
        predict(make_net(4), rand_volume((50, 50)), tmp_path / "p.zarr", tile="big")


def test_roi_outside_the_volume(tmp_path):
    with pytest.raises(EmtileError, match=r"roi=0:2,0:40,10:60 is outside the volume of shape "
                                          r"\(2, 40, 50\)"):
        predict(make_net(2), rand_volume((2, 40, 50)), tmp_path / "p.zarr",
                roi=(slice(0, 2), slice(0, 40), slice(10, 60)))


def test_output_exists(tmp_path):
    net, vol, out = make_net(2), rand_volume((30, 30)), tmp_path / "p.zarr"
    predict(net, vol, out, tile=64, progress=False)
    with pytest.raises(EmtileError, match="already exists; pass --overwrite"):
        predict(net, vol, out, tile=64, progress=False)
    predict(net, vol, out, tile=64, progress=False, overwrite=True)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("x")
    with pytest.raises(EmtileError, match="not a Zarr store"):
        predict(net, vol, tmp_path / "folder", tile=64, overwrite=True)
    assert (tmp_path / "folder" / "keep.txt").exists()


def test_non_numeric_volume(tmp_path):
    with pytest.raises(EmtileError, match="input has dtype <U1, which is not numeric"):
        predict(make_net(2), np.full((30, 30), "a"), tmp_path / "p.zarr")


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="int8"), "dtype='int8' is not supported"),
    (dict(blend="box"), "blend='box' is not supported"),
    (dict(amp="fp8"), "amp='fp8' is not supported"),
    (dict(threshold=2), "threshold=2 must be a number between 0 and 1"),
    (dict(batch_size=0), "batch_size=0 must be a positive integer"),
    (dict(device="tpu"), "device='tpu'"),
    (dict(overlap=100), "overlap=100 is too large for tile=64"),
])
def test_bad_options(tmp_path, kwargs, match):
    with pytest.raises(EmtileError, match=match):
        predict(make_net(2), rand_volume((30, 30)), tmp_path / "p.zarr", **{"tile": 64, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_for_without_cuda(tmp_path):
    with pytest.raises(EmtileError, match="CUDA is not available"):
        predict(make_net(2), rand_volume((30, 30)), tmp_path / "p.zarr", device="cuda")


def test_emtile_predict_is_callable_even_after_importing_the_submodule(tmp_path):
    import emtile.predict as module  # binds the package attribute to the module

    assert emtile.predict is module
    result = emtile.predict(make_net(2), rand_volume((30, 30)), tmp_path / "p.zarr", tile=64,
                            progress=False)
    assert result.shape == (30, 30) and is_complete(tmp_path / "p.zarr")
