"""emtile.predict: tiled prediction equals one forward pass over the whole mirror-padded slice.

Random-weight models (small ``base`` so the suite stays fast) on volumes whose sizes are not
multiples of anything; every tile size, batch size, worker count, ROI and blend must give the
same probabilities as the reference, to float32 rounding.
"""

import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr

import emtile
from emtile import EmtileError, geometry
from emtile.predictor import predict, predict_array
from emtile.store import create_image, is_complete, mark_complete
from emtile.unet import UNet, save_model

predict_module = sys.modules["emtile.predictor"]

TOL = 1e-5


def make_net(depth, base=4, out_channels=1, seed=0, cls=UNet):
    """A random model whose output varies (He init keeps the ReLUs alive through the levels)."""
    torch.manual_seed(seed)
    net = cls(base=base, depth=depth, out_channels=out_channels).eval()
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


def border_pattern(shape):
    """A fixed pattern, different at every position of an output tile."""
    g = torch.Generator().manual_seed(7)
    return 2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1


class BorderNet(UNet):
    """A U-Net whose output depends on where a pixel lies in its tile, like the borders of a
    padded-convolution network: every tile adds the same pattern to its logits. Overlapping
    tiles then disagree, and the blended result depends on each weight landing on its pixel."""

    def forward(self, x):
        y = super().forward(x)
        return y + border_pattern(tuple(y.shape[-2:])).to(y.dtype)


def profile(n, blend, overlap):
    """1-D blending weights as documented: ramps (i / (overlap + 1)) over ``overlap`` pixels at
    each end for linear and cosine; exp(-x^2 / 2 (n/8)^2), max 1, floor 1e-4, for gaussian."""
    if blend == "gaussian":
        x = np.arange(n) - (n - 1) / 2
        g = np.exp(-0.5 * (x / (n / 8)) ** 2)
        return np.maximum(g / g.max(), 1e-4)
    t = np.arange(1, overlap + 1) / (overlap + 1)
    ramp = t if blend == "linear" else 0.5 - 0.5 * np.cos(np.pi * t)
    w = np.ones(n)
    w[:overlap], w[n - overlap:] = ramp, ramp[::-1]
    return w


def blended_reference(net, volume, tile, overlap, blend, roi):
    """Weighted average, computed here in float64, of every tile that covers a pixel: tile k along
    an axis has its output at origin + k * stride (origin: the ROI start rounded down to a multiple
    of 2**depth; stride: out - overlap rounded down to one); its probabilities are the sigmoid of
    the whole-slice logits plus the border pattern."""
    h, a = net.halo, net.align
    out = [t - 2 * h for t in tile]
    stride = [(o - overlap) // a * a for o in out]
    weight = np.multiply.outer(*[profile(o, blend, o - s) for o, s in zip(out, stride)])
    bias = border_pattern(tuple(out)).numpy()
    result = []
    for sl in volume.astype(np.float32)[roi[0]] / np.float32(255):
        size = [next(n for n in range(s + 2 * h, s + 2 * h + 2 * a) if net.is_valid(n))
                for s in sl.shape]
        pad = np.pad(sl, [(h, n - s - h) for n, s in zip(size, sl.shape)], mode="reflect")
        with torch.no_grad():
            logits = net.forward(torch.from_numpy(pad)[None, None])[0, 0].double().numpy()
        logits = logits - border_pattern(logits.shape).numpy()  # UNet.forward's logits alone
        acc, wsum = np.zeros(sl.shape), np.zeros(sl.shape)
        (y0, y1), (x0, x1) = [(r.start, r.stop) for r in roi[1:]]
        oy, ox = y0 // a * a, x0 // a * a
        for ty in range(oy, y1, stride[0]):
            for tx in range(ox, x1, stride[1]):
                ys = slice(ty, min(ty + out[0], sl.shape[0]))
                xs = slice(tx, min(tx + out[1], sl.shape[1]))
                part = (slice(0, ys.stop - ys.start), slice(0, xs.stop - xs.start))
                p = 1 / (1 + np.exp(-(logits[ys, xs] + bias[part])))
                acc[ys, xs] += weight[part] * p
                wsum[ys, xs] += weight[part]
                if tx + out[1] >= x1:
                    break
            if ty + out[0] >= y1:
                break
        result.append(acc[roi[1:]] / wsum[roi[1:]])
    return np.stack(result)


@pytest.mark.parametrize("blend, roi", [
    ("linear", (slice(None), slice(0, 131), slice(0, 97))),
    ("cosine", (slice(1, 2), slice(13, 120), slice(6, 97))),
    ("gaussian", (slice(0, 1), slice(30, 131), slice(2, 91))),
])
def test_blending_puts_every_weight_on_its_pixel(blend, roi):
    net = make_net(2, cls=BorderNet)
    vol = rand_volume((2, 131, 97))
    tile, overlap = (68, 84), 9  # outputs 28 x 44, strides 16 x 32: overlaps of 12 px
    ref = blended_reference(net, vol, tile, overlap, blend, roi)
    plain = blended_reference(net, vol, tile, 0, "linear", roi)
    assert np.abs(ref - plain).max() > 0.01  # the tiles disagree: the weights matter
    p = predict_array(net, vol, tile=tile, blend=blend, overlap=overlap, roi=roi,
                      chunk_size=30, max_block_px=3000)  # many blocks: tiles straddle them
    assert p.shape == ref.shape
    assert np.abs(p - ref).max() <= TOL


def test_single_image_and_multi_channel_output():
    net = make_net(3, out_channels=2)
    img = rand_volume((150, 141))
    ref = reference(net, img)[:, 0]
    p = predict_array(net, img, tile=140)
    assert p.shape == (2, 150, 141)
    assert np.abs(p - ref).max() <= TOL


def tta_reference(net, image):
    """The average over the 8 symmetries of the square (rot90 k times, then maybe a left-right
    flip) of: transform the mirror-padded image, one forward pass, transform back, crop."""
    h = net.halo
    n = max(image.shape) + 2 * h
    n = next(m for m in range(n, n + 2 * net.align) if net.is_valid(m))
    size = (n, n)  # square, so every symmetry keeps it valid
    pad = np.pad(image.astype(np.float32), [(h, n - s - h) for n, s in zip(size, image.shape)],
                 mode="reflect")
    total = 0
    for k in range(4):
        for flip in (False, True):
            x = np.rot90(pad, k)
            x = np.fliplr(x) if flip else x
            with torch.no_grad():
                y = torch.sigmoid(net(torch.from_numpy(x.copy())[None, None]))[0, 0].numpy()
            y = np.fliplr(y) if flip else y
            total = total + np.rot90(y, -k).astype(np.float64)
    return (total / 8)[:image.shape[0], :image.shape[1]]


def test_float_input_and_tta_is_the_average_of_the_eight_symmetries():
    net = make_net(2)
    vol = np.random.default_rng(3).random((2, 60, 50)).astype(np.float64)
    ref = reference(net, vol.astype(np.float32))[0]
    p = predict_array(net, vol, tile=64)
    assert np.abs(p - ref).max() <= TOL
    t = predict_array(net, vol, tile=64, tta=True)
    assert t.shape == p.shape
    assert np.abs(t - p).max() > 1e-3  # not the plain prediction
    for tile in (68, 100):  # tile-size invariant, like the plain prediction
        assert np.abs(predict_array(net, vol, tile=tile, tta=True) - t).max() <= TOL
    tta_ref = tta_reference(net, vol[1].astype(np.float32))
    assert np.abs(t[1] - tta_ref).max() <= TOL


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


def plan_of(net, vol, tile=68, max_block_px=4000, chunk_size=56):
    """The block plan :func:`predict` makes for these options."""
    from emtile.settings import PredictSettings

    settings = PredictSettings(tile=tile, device="cpu", max_block_px=max_block_px,
                               chunk_size=chunk_size)
    *_, grid, chunks, _, _ = predict_module._setup(net, vol, settings)
    return geometry.block_plan(grid, chunks, max_block_px=max_block_px)



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
    assert group["labels"].attrs["ome"] == {"version": "0.5", "labels": ["mask"]}
    assert "image-label" in zarr.open_group(out / "labels" / "mask", mode="r").attrs["ome"]
    # every block was recorded, and every block owns whole chunks: it starts on a chunk boundary
    # and ends on one or at the region's end (so no two blocks ever write the same chunk)
    assert group["emtile_blocks"].shape == (result.blocks,)
    assert group["emtile_blocks"][:].all()
    plan = plan_of(net, vol)
    assert len(plan) == result.blocks and plan.chunks == probs.chunks
    assert any(b.shape[1:] != probs.chunks[1:] for b in plan)  # blocks of several chunks
    for block in plan:
        for a, b, c, n in zip(block.start, block.stop, probs.chunks, probs.shape):
            assert a % c == 0 and (b % c == 0 or b == n)
    assert sum(math.prod(b.shape) for b in plan) == math.prod(probs.shape)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_float_outputs_from_a_path_input_and_model_folder(tmp_path, dtype):
    net = make_net(3, out_channels=2)
    save_model(net, tmp_path / "model")
    vol = rand_volume((2, 101, 77))
    src = create_image(tmp_path / "in.zarr", vol.shape, np.uint8, chunks=(1, 32, 32),
                       voxel_size=(50, 4, 4))
    src["0"][:] = vol
    mark_complete(src)
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


RUN_ARGS = dict(tile=68, threshold=0.4, dtype="float32", progress=False, chunk_size=56,
                max_block_px=4000)
RUN = textwrap.dedent(f"""
    import sys
    from emtile.predictor import predict
    r = predict(sys.argv[1], sys.argv[2], sys.argv[3], num_workers=int(sys.argv[4]), **{RUN_ARGS!r})
    print("resumed", r.blocks_resumed, "of", r.blocks)
""")
FAULTS = "_EMTILE_FAULTS"  # private, test-only: see emtile._faults


def _run(*args, crash=None):
    env = {k: v for k, v in os.environ.items() if k != FAULTS}
    if crash:
        env[FAULTS] = crash
    return subprocess.run([sys.executable, "-c", RUN, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_to_byte_identical_output(tmp_path):
    """Killed (SIGKILL, no clean-up) right after a block is recorded, or after its chunks are
    written but before it is recorded: the re-run finishes the rest, byte for byte."""
    net = make_net(2)
    save_model(net, tmp_path / "model")
    src = zarr.create_array(tmp_path / "in.zarr", shape=(3, 131, 97), chunks=(1, 64, 64),
                            dtype="uint8", zarr_format=3)
    src[:] = rand_volume((3, 131, 97))
    model, inp = tmp_path / "model", tmp_path / "in.zarr"
    full = predict(model, inp, tmp_path / "full.zarr", num_workers=0, **RUN_ARGS)
    assert full.blocks >= 6
    plan = plan_of(net, emtile.open_volume(inp))
    third = plan[2].slices(plan.grid.region)  # blocks are written in order
    expect = zarr.open_array(tmp_path / "full.zarr" / "0", mode="r")[third]
    assert expect.any()

    for crash, recorded in (("predict.block_recorded@3=kill", 3),
                            ("predict.block_written@3=kill", 2)):
        out = tmp_path / f"resumed-{recorded}.zarr"
        killed = _run(model, inp, out, 1, crash=crash)
        assert killed.returncode == -9, killed.stderr  # SIGKILL: no clean-up ran
        assert not is_complete(out)
        markers = zarr.open_group(out, mode="r")["emtile_blocks"][:]
        assert markers.sum() == recorded and markers[:recorded].all()
        # the third block's chunks are on disk in both cases; recorded only in the first
        np.testing.assert_array_equal(zarr.open_array(out / "0", mode="r")[third], expect)

        again = _run(model, inp, out, 0)
        assert again.returncode == 0, again.stderr
        assert again.stdout.split()[1] == str(recorded)  # resumed: the recorded blocks only
        assert is_complete(out) and is_complete(out / "labels" / "mask")
        for name in ("0", "labels/mask/0"):
            a = zarr.open_array(tmp_path / "full.zarr" / name, mode="r")[:]
            b = zarr.open_array(out / name, mode="r")[:]
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def write_input(path, volume, voxel_size=None):
    src = create_image(path, volume.shape, volume.dtype, chunks=(1, 64, 64),
                       voxel_size=voxel_size)
    src["0"][:] = volume
    mark_complete(src)
    return path


def interrupt(out, keep):
    """Make a finished store look like a run killed after its first ``keep`` blocks."""
    group = zarr.open_group(out, mode="r+")
    meta = dict(group.attrs["emtile"])
    meta["complete"] = False
    group.attrs["emtile"] = meta
    flags = group["emtile_blocks"][:]
    flags[keep:] = 0
    group["emtile_blocks"][:] = flags


def same_bytes(a, b):
    a, b = zarr.open_array(a, mode="r")[:], zarr.open_array(b, mode="r")[:]
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


KW = dict(tile=68, dtype="float32", progress=False, chunk_size=56, max_block_px=4000,
          num_workers=0)


def test_resume_never_finishes_a_run_on_other_data(tmp_path):
    net = make_net(2)
    a, b = rand_volume((2, 131, 97), seed=1), rand_volume((2, 131, 97), seed=2)
    src, out = write_input(tmp_path / "in.zarr", a), tmp_path / "p.zarr"
    assert predict(net, src, out, **KW).blocks >= 4
    interrupt(out, keep=2)
    assert predict(net, src, out, **KW).blocks_resumed == 2  # the same input: resumed

    interrupt(out, keep=2)
    shutil.rmtree(src)
    write_input(src, b)  # another volume at the same path, same shape and dtype
    result = predict(net, src, out, **KW)
    assert result.blocks_resumed == 0
    predict(net, src, tmp_path / "fresh.zarr", **KW)
    assert same_bytes(out / "0", tmp_path / "fresh.zarr" / "0")

    # an array in memory has no identity: never resumed
    mem = tmp_path / "mem.zarr"
    predict(net, a, mem, **KW)
    interrupt(mem, keep=2)
    result = predict(net, b, mem, **KW)
    assert result.blocks_resumed == 0 and is_complete(mem)
    assert same_bytes(mem / "0", tmp_path / "fresh.zarr" / "0")


def test_a_store_whose_set_up_did_not_finish_is_replaced(tmp_path, monkeypatch):
    net = make_net(2)
    src, out = write_input(tmp_path / "in.zarr", rand_volume((2, 131, 97))), tmp_path / "p.zarr"
    predict(net, src, tmp_path / "fresh.zarr", threshold=0.5, **KW)

    # labels/ gone from an interrupted store: replaced, not resumed into a missing array
    predict(net, src, out, threshold=0.5, **KW)
    interrupt(out, keep=2)
    shutil.rmtree(out / "labels")
    result = predict(net, src, out, threshold=0.5, **KW)
    assert result.blocks_resumed == 0 and is_complete(out / "labels" / "mask")
    for name in ("0", "labels/mask/0"):
        assert same_bytes(out / name, tmp_path / "fresh.zarr" / name)

    # killed while creating the mask: the markers (created last) do not exist yet
    real = emtile.store.create_image

    def dies_at_the_mask(path, *args, **kwargs):
        if str(path).endswith("mask"):
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    shutil.rmtree(out)
    monkeypatch.setattr(emtile.store, "create_image", dies_at_the_mask)
    with pytest.raises(KeyboardInterrupt):
        predict(net, src, out, threshold=0.5, **KW)
    monkeypatch.setattr(emtile.store, "create_image", real)
    assert not is_complete(out) and "emtile_blocks" not in zarr.open_group(out, mode="r")
    result = predict(net, src, out, threshold=0.5, **KW)
    assert result.blocks_resumed == 0 and is_complete(out / "labels" / "mask")
    for name in ("0", "labels/mask/0"):
        assert same_bytes(out / name, tmp_path / "fresh.zarr" / name)


def test_overwrite_never_resumes(tmp_path):
    net = make_net(2)
    src, out = write_input(tmp_path / "in.zarr", rand_volume((2, 131, 97))), tmp_path / "p.zarr"
    predict(net, src, out, **KW)
    interrupt(out, keep=2)
    result = predict(net, src, out, overwrite=True, **KW)
    assert result.blocks_resumed == 0 and is_complete(out)


def test_an_unrecorded_block_is_never_marked_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "run_blocks", lambda *args, **kwargs: [])  # a lost block
    out = tmp_path / "p.zarr"
    with pytest.raises(RuntimeError, match="blocks of .* were not recorded"):
        predict(make_net(2), rand_volume((30, 30)), out, tile=64, progress=False)
    assert not is_complete(out)


def test_output_that_is_or_holds_or_lies_in_the_input_is_refused(tmp_path, monkeypatch):
    net = make_net(2)
    vol = rand_volume((2, 40, 30))
    write_input(tmp_path / "vol.zarr", vol)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EmtileError, match="output 'vol.zarr' is the input 'vol.zarr': writing it "
                                          "could destroy the input"):
        predict(net, "vol.zarr", "vol.zarr", tile=64, overwrite=True, progress=False)
    with pytest.raises(EmtileError, match="lies inside the input"):
        predict(net, "vol.zarr", "vol.zarr/pred.zarr", tile=64, overwrite=True, progress=False)
    with pytest.raises(EmtileError, match="output 'vol.zarr' holds the input 'vol.zarr/0'"):
        predict(net, "vol.zarr/0", "vol.zarr", tile=64, overwrite=True, progress=False)
    assert not (tmp_path / "vol.zarr" / "pred.zarr").exists()
    np.testing.assert_array_equal(emtile.open_volume("vol.zarr")[:], vol)


def test_roi_output_is_placed_where_it_lies_in_the_input(tmp_path):
    src = write_input(tmp_path / "in.zarr", rand_volume((3, 60, 50)), voxel_size=(50, 4, 4))
    out = tmp_path / "p.zarr"
    predict(make_net(2), src, out, tile=64, roi=(slice(1, 3), slice(10, 60), slice(20, 50)),
            threshold=0.5, progress=False)
    for group in (out, out / "labels" / "mask"):
        ms = zarr.open_group(group, mode="r").attrs["ome"]["multiscales"][0]
        assert ms["datasets"][0]["coordinateTransformations"] == [
            {"type": "scale", "scale": [50.0, 4.0, 4.0]},
            {"type": "translation", "translation": [50.0, 40.0, 80.0]}]  # NGFF: scale, then this


def test_overlap_too_large_for_the_blend_is_refused_before_any_output(tmp_path):
    out = tmp_path / "p.zarr"
    with pytest.raises(EmtileError, match=r"overlap=80 is too large for tile 300 \(output 116\) "
                                          r"with blend='linear': .*; at most 52"):
        predict(make_net(4), rand_volume((30, 30)), out, tile=300, blend="linear", overlap=80)
    assert not out.exists()
    predict(make_net(4), rand_volume((30, 30)), out, tile=300, blend="linear", overlap=52,
            progress=False)  # the largest that fits does
    assert is_complete(out)


def test_auto_tile_with_a_blending_overlap(cases):
    net, vol, ref = cases[2]
    p = predict_array(net, vol, tile="auto", blend="cosine", overlap=30)
    assert np.abs(p - ref).max() <= TOL


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
    with pytest.raises(EmtileError, match="already exists; pass overwrite=True"):
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


def test_emtile_predict_is_the_function_after_importing_every_module(tmp_path):
    import emtile.cli.predict  # noqa: F401
    import emtile.predictor  # noqa: F401
    import emtile.sampling  # noqa: F401
    import emtile.trainer  # noqa: F401

    assert emtile.predict is emtile.predictor.predict and emtile.train is emtile.trainer.train
    result = emtile.predict(make_net(2), rand_volume((30, 30)), tmp_path / "p.zarr", tile=64,
                            progress=False)
    assert result.shape == (30, 30) and is_complete(tmp_path / "p.zarr")


def test_auto_tile_times_the_candidates_and_takes_the_fastest_run(tmp_path, monkeypatch):
    net = make_net(2)
    vol = rand_volume((4, 131, 97))
    monkeypatch.setattr(predict_module, "PROBE_MIN_TILES", 1)
    monkeypatch.setattr(predict_module, "PROBE_SPREAD", 100.0)  # every size is a candidate
    r = predict(net, vol, tmp_path / "p.zarr", tile="auto", max_tile_memory=2**24,
                progress=False)
    assert len(r.tile_probe) >= 2 and all(s > 0 for s in r.tile_probe.values())
    costs = {t: n for t, n, _ in geometry.tile_costs(vol.shape, net.shape_map, max_tile=10**4,
                                                     min_tile=net.min_size)}
    expect = min(r.tile_probe, key=lambda t: (costs[t] * r.tile_probe[t], t))
    assert r.tile[-1] == expect
    ref = reference(net, vol)[0]
    assert np.abs(emtile.open_volume(tmp_path / "p.zarr")[:] / 255 - ref).max() <= 0.5 / 255 + TOL


def test_auto_tile_resumes_with_the_interrupted_runs_choice(tmp_path, monkeypatch):
    net = make_net(2)
    src = write_input(tmp_path / "in.zarr", rand_volume((3, 131, 97)))
    out = tmp_path / "p.zarr"
    kw = dict(tile="auto", progress=False, chunk_size=30, max_block_px=2000, dtype="float32")
    first = predict(net, src, out, **kw)
    assert first.blocks > 2
    interrupt(out, keep=2)
    other = next(t for t in net.valid_sizes(64, 400) if t != first.tile[-1])
    monkeypatch.setattr(predict_module, "_probe_tiles", lambda costs, **kw: other)
    monkeypatch.setattr(predict_module, "PROBE_MIN_TILES", 1)
    again = predict(net, src, out, **kw)
    assert again.tile == first.tile and again.blocks_resumed == 2
    fresh = predict(net, src, tmp_path / "fresh.zarr", **kw)  # a new run probes again
    assert fresh.tile[-1] == other


def test_levels_are_written_by_each_block_and_equal_a_numpy_pyramid(tmp_path):
    net = make_net(2)
    vol = rand_volume((2, 131, 97))
    src = write_input(tmp_path / "in.zarr", vol, voxel_size=(50, 4, 4))
    out = tmp_path / "p.zarr"
    r = predict(net, src, out, tile=68, threshold=0.5, levels=3, chunk_size=56,
                max_block_px=4000, progress=False, roi=(slice(None), slice(16, 131), slice(None)))
    assert r.blocks > 3
    f = predict_array(net, vol, tile=68, roi=(slice(None), slice(16, 131), slice(None)))[None]
    mask = (f >= 0.5).astype(np.uint8)
    group = zarr.open_group(out, mode="r")
    ms = group.attrs["ome"]["multiscales"][0]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    for k in range(3):
        level, mlevel = group[str(k)], zarr.open_array(out / "labels" / "mask" / str(k), mode="r")
        assert level.chunks[1:] == (56 // 2**k, 56 // 2**k) and mlevel.chunks == level.chunks
        expect = np.rint(np.clip(f, 0, 1) * 255).astype(np.uint8)[0]
        np.testing.assert_array_equal(level[:], expect)  # the mean of the float probabilities
        np.testing.assert_array_equal(mlevel[:], mask[0])  # sampled: never a new value
        assert set(np.unique(mlevel[:])) <= {0, 1}
        t = ms["datasets"][k]["coordinateTransformations"]
        assert t[0]["scale"] == [50.0, 4.0 * 2**k, 4.0 * 2**k]
        assert t[1] == {"type": "translation", "translation": [0.0, 64.0, 0.0]}  # the ROI start
        f = emtile.store.downsample(f, labels=False)
        mask = emtile.store.downsample(mask, labels=True)


def test_bad_levels(tmp_path):
    net = make_net(2)
    with pytest.raises(EmtileError, match="levels=9 would halve the 30-px y axis below one "
                                          "pixel: use at most 5 levels"):
        predict(net, rand_volume((30, 30)), tmp_path / "p.zarr", tile=64, levels=9)
    with pytest.raises(EmtileError, match=r"levels=4 needs output chunks whose size in y and x is "
                                          r"divisible by 8 .*, but the output chunks are 28 px "
                                          r"in y: use at most 3 levels"):
        predict(net, rand_volume((300, 300)), tmp_path / "p.zarr", tile=68, levels=4,
                chunk_size=28)
    assert not (tmp_path / "p.zarr").exists()


def test_cpu_reads_between_forward_passes_when_torch_uses_every_core(tmp_path, monkeypatch):
    """A reader thread only preempts torch's threads when they already use every core: then the
    tiles are read between forward passes; with a core left free, a reader thread reads ahead.
    Either way the bytes are the same."""
    import emtile.predictor as predictor

    started = []
    ahead = predictor._read_ahead
    monkeypatch.setattr(predictor, "_read_ahead",
                        lambda items, **kw: started.append(1) or ahead(items, **kw))
    monkeypatch.setattr(predictor.os, "sched_getaffinity", lambda pid: {0, 1})  # two cores
    net = make_net(2)
    vol = write_input(tmp_path / "in.zarr", (rand_volume((2, 131, 97)) * 255).astype(np.uint8))
    outputs = []
    for threads, reader in ((2, False), (1, True)):
        started.clear()
        out = tmp_path / f"pred-{threads}.zarr"
        predict(net, vol, out, tile=68, threads=threads, device="cpu", progress=False,
                max_block_px=4000, chunk_size=56)
        assert bool(started) == reader, threads
        outputs.append(emtile.open_volume(out)[:])
    assert np.abs(outputs[0].astype(int) - outputs[1].astype(int)).max() <= 1  # threads differ
