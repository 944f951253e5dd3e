import numpy as np
import pytest
import torch
import zarr

from emtile import EmtileError
from emtile.augment import Augmenter
from emtile.losses import weight_map
from emtile.sampling import PatchDataset, read_mirrored
from emtile.stacks import resolve_slices


def coded_volume(tmp_path, shape=(3, 90, 110), chunks=(1, 32, 32)):
    """raw codes each pixel's position (z * Y * X + y * X + x, uint16); labels a block pattern."""
    z, y, x = np.indices(shape)
    raw = (z * shape[1] * shape[2] + y * shape[2] + x).astype(np.uint16)
    labels = (((y // 5) + (x // 7) + z) % 2).astype(np.uint8)
    out = []
    for name, data in (("raw", raw), ("labels", labels)):
        a = zarr.create_array(store=tmp_path / f"{name}.zarr", shape=shape, chunks=chunks, dtype=data.dtype)
        a[...] = data
        out.append(zarr.open_array(tmp_path / f"{name}.zarr", mode="r"))
    return raw, labels, out[0], out[1]


def decode(image, shape):
    code = np.rint(image * 65535).astype(np.int64)
    return code // (shape[1] * shape[2]), (code // shape[2]) % shape[1], code % shape[2]


class Recorder:
    """Wraps an array and records every read box."""

    def __init__(self, array):
        self.array, self.reads = array, []

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)
    ndim = property(lambda self: self.array.ndim)

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def test_resolve_slices():
    assert resolve_slices(slice(None, 3), 5) == [0, 1, 2]
    assert resolve_slices([4, 1, 1], 5) == [1, 4]
    with pytest.raises(EmtileError, match="train_slices=25:35 is outside the volume, which has 30 slices"):
        resolve_slices(slice(25, 35), 30, name="train_slices")
    with pytest.raises(EmtileError, match=r"val_slices=30 is outside the volume, which has 30 slices \(0 to 29\)"):
        resolve_slices([29, 30], 30, name="val_slices")


def test_read_mirrored_matches_numpy_reflect():
    a = np.arange(2 * 7 * 9).reshape(2, 7, 9)
    padded = np.pad(a[1], ((4, 5), (3, 6)), mode="reflect")
    np.testing.assert_array_equal(read_mirrored(a, 1, [(-4, 12), (-3, 15)]), padded)
    np.testing.assert_array_equal(read_mirrored(a, 0, [(2, 5), (1, 4)]), a[0, 2:5, 1:4])
    far = read_mirrored(a, 0, [(-20, 30), (0, 9)])  # farther than the slice is wide
    np.testing.assert_array_equal(far, np.pad(a[0], ((20, 23), (0, 0)), mode="reflect"))


def test_label_patch_is_the_centre_of_the_input_patch(tmp_path):
    raw, labels, zraw, zlabels = coded_volume(tmp_path)
    ds = PatchDataset(zraw, zlabels, input_size=60, output_size=20, slices=[0, 2], seed=5)
    for i in range(12):
        image, label, weight = ds.sample(i)
        assert image.shape == (60, 60) and label.shape == (20, 20) and weight is None
        zz, yy, xx = decode(image, raw.shape)
        assert set(np.unique(zz)) <= {0, 2} and np.all(zz == zz[0, 0])
        # contiguous positions (mirrored beyond the border): steps of +-1 along each axis
        assert np.all(np.abs(np.diff(yy, axis=0)) == 1) and np.all(np.diff(yy, axis=1) == 0)
        assert np.all(np.abs(np.diff(xx, axis=1)) == 1) and np.all(np.diff(xx, axis=0) == 0)
        # the label patch holds the labels of the raw pixels the input's centre shows
        c = slice(20, 40)
        np.testing.assert_array_equal(label, labels[zz[c, c], yy[c, c], xx[c, c]])


def test_augmented_label_patch_stays_aligned(tmp_path):
    # an image that shows its own labels; after elastic deformation, flips and rotations the
    # label patch still matches the (bilinear) image's centre except along label edges
    _, labels, _, zlabels = coded_volume(tmp_path)
    raw = (labels * 200 + 20).astype(np.uint8)
    ds = PatchDataset(raw, zlabels, input_size=60, output_size=20, slices=[0, 1, 2], seed=2,
                      augment=Augmenter(intensity=False))
    agree = []
    for i in range(12):
        image, label, _ = ds.sample(i)
        assert set(np.unique(label)) <= {0, 1}
        agree.append(np.mean((image[20:40, 20:40] > 120 / 255) == (label == 1)))
    assert np.mean(agree) > 0.95


def test_patches_near_the_border_are_mirrored(tmp_path):
    raw, labels, zraw, zlabels = coded_volume(tmp_path, shape=(1, 40, 40))
    ds = PatchDataset(zraw, zlabels, input_size=60, output_size=20, slices=[0])
    seen_mirror = False
    for i in range(10):
        image, label, _ = ds.sample(i)
        _, yy, xx = decode(image, raw.shape)
        oy, ox = yy[20, 20], xx[20, 20]
        expected_y = np.pad(np.arange(40), 40, mode="reflect")[oy + 40 - 20: oy + 40 + 40]
        np.testing.assert_array_equal(yy[:, 0], expected_y)
        np.testing.assert_array_equal(label, labels[0, oy:oy + 20, ox:ox + 20])
        seen_mirror |= oy < 20 or ox < 20
    assert seen_mirror


def test_reads_crops_not_the_volume(tmp_path):
    _, _, zraw, zlabels = coded_volume(tmp_path, shape=(2, 300, 300), chunks=(1, 64, 64))
    rraw, rlabels = Recorder(zraw), Recorder(zlabels)
    ds = PatchDataset(rraw, rlabels, input_size=60, output_size=20, slices=[0, 1], augment=Augmenter())
    for i in range(4):
        ds.sample(i)
    for key in rraw.reads + rlabels.reads:
        z, ys, xs = key
        assert isinstance(z, int) or z.stop - z.start == 1
        assert ys.stop - ys.start <= 60 + 80 and xs.stop - xs.start <= 60 + 80


def test_batches_are_reproducible_and_independent_of_workers(tmp_path):
    _, _, zraw, zlabels = coded_volume(tmp_path)
    kwargs = dict(input_size=60, output_size=20, slices=[0, 1, 2], batch_size=2, seed=7,
                  augment=Augmenter(), weights=weight_map)

    def first(n, workers, start=0):
        ds = PatchDataset(zraw, zlabels, start=start, **kwargs)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    serial = first(4, 0)
    assert serial[0]["image"].shape == (2, 1, 60, 60)
    assert serial[0]["label"].shape == serial[0]["weight"].shape == (2, 1, 20, 20)
    assert serial[0]["image"].dtype == serial[0]["label"].dtype == torch.float32
    parallel = first(4, 2)
    resumed = first(2, 0, start=2)
    for a, b in zip(serial, parallel):
        for k in a:
            assert torch.equal(a[k], b[k])
    for a, b in zip(serial[2:], resumed):
        assert torch.equal(a["image"], b["image"])
    assert not torch.equal(serial[0]["image"], serial[1]["image"])
    other = PatchDataset(zraw, zlabels, **{**kwargs, "seed": 8}).batch(0)
    assert not torch.equal(other["image"], serial[0]["image"])


def test_foreground_balance(tmp_path):
    shape = (1, 200, 200)
    labels = np.zeros(shape, np.uint8)
    labels[0, 150:170, 30:50] = 1  # one small object
    raw = np.zeros(shape, np.uint8)
    plain = PatchDataset(raw, labels, input_size=20, output_size=20, slices=[0], seed=1)
    balanced = PatchDataset(raw, labels, input_size=20, output_size=20, slices=[0], seed=1,
                            foreground=1.0)
    half = PatchDataset(raw, labels, input_size=20, output_size=20, slices=[0], seed=1, foreground=0.5)
    hit = {name: np.mean([ds.sample(i)[1].any() for i in range(60)])
           for name, ds in (("plain", plain), ("balanced", balanced), ("half", half))}
    assert hit["plain"] < 0.2 and hit["balanced"] == 1.0 and 0.3 < hit["half"] < 0.8
    with pytest.raises(EmtileError, match="hold no foreground"):
        PatchDataset(raw, 0 * labels, input_size=20, output_size=20, slices=[0], foreground=0.5)


def test_bad_geometry(tmp_path):
    raw = np.zeros((2, 50, 60), np.uint8)
    with pytest.raises(EmtileError, match=r"smaller than the tile's output \(92×92 px for input 140×140\)"):
        PatchDataset(raw, raw, input_size=140, output_size=92, slices=[0])
    with pytest.raises(EmtileError, match="raw has shape .* but labels have shape"):
        PatchDataset(raw, raw[:, :40], input_size=20, output_size=10, slices=[0])
    with pytest.raises(EmtileError, match="do not form a centred valid patch"):
        PatchDataset(raw, raw, input_size=21, output_size=10, slices=[0])


def test_label_patch_is_centred_in_the_models_receptive_field(tmp_path):
    # the outputs of an aligned 4×4 block of a valid U-Net (depth 2) depend on an input window
    # centred on the block's centre shifted by the halo: where the sampler puts those labels
    from emtile.unet import UNet

    torch.manual_seed(0)
    net = UNet(base=2, depth=2).double()
    for name, module in list(net.named_modules()):  # linear, dense-gradient twin: same geometry
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.MaxPool2d):
                setattr(module, child_name, torch.nn.AvgPool2d(2))
            elif isinstance(child, torch.nn.ReLU):
                setattr(module, child_name, torch.nn.Identity())
    tile = 68
    out = net.output_size(tile)
    raw, labels, zraw, zlabels = coded_volume(tmp_path)
    ds = PatchDataset(zraw, zlabels, input_size=tile, output_size=out, slices=[0])
    x = torch.rand(1, 1, tile, tile, dtype=torch.float64, requires_grad=True)
    net(x)[0, 0, 4:8, 8:12].sum().backward()
    ys, xs = np.nonzero(x.grad[0, 0].numpy())
    assert (ys.min() + ys.max()) / 2 == 5.5 + net.halo and (xs.min() + xs.max()) / 2 == 9.5 + net.halo
    assert (tile - out) // 2 == net.halo
    image, label, _ = ds.sample(0)
    _, yy, xx = decode(image, raw.shape)
    h = net.halo
    np.testing.assert_array_equal(label[4:8, 8:12], labels[0, yy[4 + h:8 + h, 8 + h:12 + h], xx[4 + h:8 + h, 8 + h:12 + h]])


def test_workers_reopen_tiff_paths(tmp_path):
    import tifffile

    import emtile

    raw, labels, _, _ = coded_volume(tmp_path, shape=(4, 64, 64))
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    paths = (str(tmp_path / "raw.tif"), str(tmp_path / "labels.tif"))
    ds = PatchDataset(emtile.open_volume(paths[0]), emtile.open_volume(paths[1]), input_size=40,
                      output_size=20, slices=[0, 1, 2], batch_size=2, seed=1, paths=paths,
                      augment=Augmenter())
    it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    for b in range(4):
        batch = next(it)
        expected = ds.batch(b)
        assert torch.equal(batch["image"], expected["image"]) and torch.equal(batch["label"], expected["label"])
