"""emtile.planes and `emtile show --planes`: three orthogonal planes of a 3-D volume.

Real stores on disk (a FIB-25 crop converted with emtile.convert, hand-built anisotropic stores),
real figures; each panel's image data is checked against the plane it should show (the arrays the
function builds, not a PNG's pixels).
"""

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from emtile import EmtileError, store
from emtile import planes as PL
from emtile import plot as P
from emtile.cli.main import main
from emtile.colours import SEG_ALPHA

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIB = (slice(150, 182), slice(0, 80), slice(0, 96))  # z, y, x: every axis its own length


def planes_of(a, at, lead=()):
    """The planes as plain NumPy indexing gives them (the reference)."""
    z, y, x = at
    a = np.asarray(a)[lead] if lead else np.asarray(a)
    return {"xy": a[z], "xz": a[:, y, :], "yz": a[:, :, x]}


def panel_axes(fig):
    return [ax for ax in fig.axes if hasattr(ax, "emtile_panel")]


def write_store(path, data, voxel_size, *, kind="image", attrs=None, chunks=None):
    group = store.create_image(path, data.shape, data.dtype, voxel_size=voxel_size, kind=kind,
                               attrs=attrs, chunks=chunks)
    group["0"][:] = data
    store.mark_complete(group)
    return path


@pytest.fixture(scope="module")
def fib(tmp_path_factory, fib25_dir):
    """A FIB-25 crop: raw and ground-truth ids converted to OME-Zarr at 10 nm, and a
    segmentation (the truth with pairs of ids merged, as a label image)."""
    import tifffile

    import emtile

    d = tmp_path_factory.mktemp("fib")
    raw = tifffile.imread(fib25_dir / "raw.tif")[FIB]
    gt = tifffile.imread(fib25_dir / "groundtruth.tif")[FIB]
    tifffile.imwrite(d / "raw.tif", raw)
    tifffile.imwrite(d / "gt.tif", gt)
    emtile.convert(d / "raw.tif", d / "raw.zarr", voxel_size=(10, 10, 10), progress=False)
    emtile.convert(d / "gt.tif", d / "gt.zarr", labels=True, ids=True, voxel_size=(10, 10, 10),
                   progress=False)
    seg = (gt // 2).astype(np.uint32)
    write_store(d / "seg.zarr", seg, (10, 10, 10), kind="labels")
    return d, raw, gt, seg


@pytest.fixture(scope="module")
def fib25_dir(isbi_dir):
    path = isbi_dir.parent / "fib25"
    if not (path / "raw.tif").exists():
        pytest.skip("FIB-25 data not found")
    return path


def test_fib25_planes_show_the_right_planes(fib):
    d, raw, gt, seg = fib
    fig = P.show(d / "raw.zarr", seg=d / "seg.zarr", labels=d / "gt.zarr", planes=True,
                 output=d / "fig.png")
    assert (d / "fig.png").read_bytes().startswith(PNG_MAGIC)
    at = (16, 40, 48)  # the centre of (32, 80, 96)
    want_raw, want_seg, want_gt = planes_of(raw, at), planes_of(seg, at), planes_of(gt, at)
    axes = panel_axes(fig)
    assert [(ax.emtile_panel, ax.emtile_plane) for ax in axes] == [
        (k, p) for k in ("segmentation", "truth") for p in ("xy", "xz", "yz")]
    views = PL.read_planes(d / "raw.zarr", seg=d / "seg.zarr", labels=d / "gt.zarr")
    assert views.at == at and views.voxel_size == (10.0, 10.0, 10.0) and views.voxel_known
    colours = {"segmentation": PL.colour_planes(views.seg, alpha=SEG_ALPHA),
               "truth": PL.colour_planes(views.truth, alpha=SEG_ALPHA)}
    for ax in axes:
        p = ax.emtile_plane
        ids = (want_seg if ax.emtile_panel == "segmentation" else want_gt)[p]
        assert np.array_equal(views.raw[p], want_raw[p])
        assert np.array_equal((views.seg if ax.emtile_panel == "segmentation"
                               else views.truth)[p], ids)
        base, overlay = (im.get_array() for im in ax.get_images())
        assert np.array_equal(np.asarray(base), want_raw[p].astype(np.float64))
        assert np.array_equal(np.asarray(overlay), colours[ax.emtile_panel][p])
        assert np.array_equal(np.asarray(overlay)[..., 3] > 0, ids > 0)  # coloured where ids
        assert ax.get_aspect() == 1.0
        n = len(np.unique(ids[ids > 0]))
        assert f"{ax.emtile_panel}: {n} object" in ax.get_title()
    # one colour per id across the three planes
    rgba = colours["segmentation"]
    some = int(want_seg["xy"][at[1], at[2]])  # the id at the crossing lies in all three planes
    got = [rgba[p][want_seg[p] == some] for p in ("xy", "xz", "yz")]
    assert all(np.all(g == got[0][0]) for g in got)


def test_cli_planes_and_bad_at_in_one_line(fib):
    d, raw, _, _ = fib
    out = d / "cli.png"
    r = CliRunner().invoke(main, ["show", str(d / "raw.zarr"), "--seg", str(d / "gt.zarr"),
                                  "--at", "3,70,5", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes().startswith(PNG_MAGIC)
    valid = "give Z,Y,X with 0 <= z < 32, 0 <= y < 80, 0 <= x < 96"
    for at, line in [
        ("40,1,1", f"Error: --at 40,1,1 is outside the volume of shape (32, 80, 96): {valid}"),
        ("1,-1,1", f"Error: --at 1,-1,1 is outside the volume of shape (32, 80, 96): {valid}"),
        ("1,a,2", f"Error: --at 1,a,2 is not three comma-separated integers: {valid}"),
        ("1,2", f"Error: --at 1,2 has 2 values: {valid}"),
    ]:
        r = CliRunner().invoke(main, ["show", str(d / "raw.zarr"), "--seg", str(d / "gt.zarr"),
                                      "--at", at, "-o", str(d / "bad.png")])
        assert r.exit_code == 1 and r.output.strip().splitlines() == [line], r.output
    assert not (d / "bad.png").exists()


@pytest.mark.parametrize("voxel, aspects", [
    ((40.0, 4.0, 4.0), {"xy": 1.0, "xz": 10.0, "yz": 10.0}),  # serial sections
    ((8.0, 4.0, 2.0), {"xy": 2.0, "xz": 4.0, "yz": 2.0}),  # every axis its own size
])
def test_anisotropic_voxels_keep_their_aspect(tmp_path, voxel, aspects):
    shape = (7, 12, 20)
    raw = (np.arange(np.prod(shape)) % 251).astype(np.uint8).reshape(shape)  # every plane differs
    seg = (np.arange(np.prod(shape)) // 9 % 13).astype(np.uint16).reshape(shape)
    write_store(tmp_path / "raw.zarr", raw, voxel)
    write_store(tmp_path / "seg.zarr", seg, voxel, kind="labels")
    fig = P.show(tmp_path / "raw.zarr", seg=tmp_path / "seg.zarr", planes=True, at=(2, 9, 17),
                 output=tmp_path / "f.pdf")
    assert (tmp_path / "f.pdf").read_bytes().startswith(b"%PDF")
    want, ids = planes_of(raw, (2, 9, 17)), planes_of(seg, (2, 9, 17))
    assert want["xz"].shape == (7, 20) and want["yz"].shape == (7, 12)
    for ax in panel_axes(fig):
        p = ax.emtile_plane
        base, overlay = (np.asarray(im.get_array()) for im in ax.get_images())
        assert np.array_equal(base, want[p]) and ax.get_aspect() == pytest.approx(aspects[p])
        assert np.array_equal(overlay[..., 3] > 0, ids[p] > 0)
        # the dashed lines mark where the other two planes cut this one
        lines = [ln for ln in ax.get_lines() if ln.get_gid() == "cursor"]
        rows, cols = PL.PLANES[p][1]
        assert [ln.get_ydata()[0] for ln in lines[:1]] == [(2, 9, 17)[rows]]
        assert [ln.get_xdata()[0] for ln in lines[1:]] == [(2, 9, 17)[cols]]
    size = "x".join(f"{v:g}" for v in voxel)
    assert f"voxel {size} nm" in fig.get_suptitle()
    # arrays with no voxel size are drawn isotropic, and say so
    fig = P.show(raw, seg=seg, planes=True)
    assert "not recorded: drawn isotropic" in fig.get_suptitle()
    assert {ax.get_aspect() for ax in panel_axes(fig)} == {1.0}


class CountingStore(zarr.storage.WrapperStore):
    """A store that records the key of every read."""

    def __init__(self, store):
        super().__init__(store)
        self.keys = []

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)


def test_only_the_three_planes_are_read(tmp_path):
    """A 64^3 store in 8^3 chunks (512 chunks): the planes read exactly the 3 x 64 chunks they
    cross, each once, per array."""
    shape, chunks, at = (64, 64, 64), (8, 8, 8), (5, 33, 60)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, shape, dtype=np.uint8)
    seg = rng.integers(1, 5, shape, dtype=np.uint32)
    counted, arrays = {}, {}
    for name, data in (("raw", raw), ("seg", seg)):
        write_store(tmp_path / f"{name}.zarr", data, (10, 10, 10), chunks=chunks)
        counted[name] = CountingStore(zarr.storage.LocalStore(tmp_path / f"{name}.zarr",
                                                              read_only=True))
        arrays[name] = zarr.open_array(counted[name], path="0", mode="r")
        counted[name].keys.clear()
    views = PL.read_planes(arrays["raw"], seg=arrays["seg"], at=at)
    crossing = []
    for axis in range(3):
        for i in range(8):
            for j in range(8):
                key = [i, j]
                key.insert(axis, at[axis] // 8)
                crossing.append("0/c/" + "/".join(map(str, key)))
    for name in ("raw", "seg"):
        keys = [k for k in counted[name].keys if k.startswith("0/c/")]
        assert sorted(keys) == sorted(crossing), name  # of 512 chunks, these 192, once each
    for p, v in planes_of(seg, at).items():
        assert np.array_equal(views.seg[p], v)
        assert np.array_equal(views.raw[p], planes_of(raw, at)[p])


@pytest.fixture
def affinity_store(tmp_path):
    """Affinities (4 channels: the three nearest neighbours and a long-range one) on a 10x40x40 nm
    grid, the raw beside them."""
    shape = (6, 10, 14)
    rng = np.random.default_rng(1)
    aff = rng.random((4,) + shape, dtype=np.float32)
    raw = rng.integers(0, 255, shape, dtype=np.uint8)
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0]]
    write_store(tmp_path / "raw.zarr", raw, (40, 10, 10))
    write_store(tmp_path / "aff.zarr", aff, (40, 10, 10), kind="probabilities",
                attrs={"target": "affinities", "offsets": offsets})
    return tmp_path, raw, aff


def test_affinities_are_drawn_as_the_nearest_neighbour_mean(affinity_store):
    d, raw, aff = affinity_store
    # an affinity store picks the planes view by itself
    fig = P.show(d / "raw.zarr", pred=d / "aff.zarr", output=d / "a.png")
    at = (3, 5, 7)
    want = planes_of(aff[:3].mean(axis=0), at)
    axes = panel_axes(fig)
    assert [ax.emtile_panel for ax in axes] == ["affinities"] * 3
    for ax in axes:
        (image,) = ax.get_images()
        assert np.allclose(np.asarray(image.get_array()), want[ax.emtile_plane], atol=1e-6)
        assert image.get_clim() == (0.0, 1.0)
        assert "affinities: mean of the nearest neighbours" in ax.get_title()
    assert axes[1].get_aspect() == 4.0  # xz: 40 nm sections, 10 nm pixels
    assert len(fig.axes) == 4  # three panels and the colour bar, which names the channels
    assert fig.axes[3].get_ylabel().replace("\n", " ") == (
        "mean of the nearest-neighbour affinities (-1, 0, 0), (0, -1, 0), (0, 0, -1) (1 = same "
        "object)")
    fig = P.show(d / "raw.zarr", pred=d / "aff.zarr", channel=3)
    for ax in panel_axes(fig):
        assert np.array_equal(np.asarray(ax.get_images()[0].get_array()),
                              planes_of(aff, at, (3,))[ax.emtile_plane].astype(np.float64))
        assert "channel 3 (offset (0, -3, 0))" in ax.get_title()
    # uint8 affinities are scaled to [0, 1]
    u8 = np.round(aff * 255).astype(np.uint8)
    views = PL.read_planes(raw, pred=u8, at=at, channel=0)
    assert np.array_equal(views.affinity["xz"], u8[0, :, 5, :] / 255.0)
    # an array records no offsets: they can be given
    views = PL.read_planes(raw, pred=aff[[3, 2]], at=at, offsets=[[0, -3, 0], [0, 0, -1]])
    assert np.array_equal(views.affinity["yz"], aff[2, :, :, 7].astype(np.float64))
    assert views.affinity_label == "mean of the nearest-neighbour affinities (0, 0, -1)"


def test_bad_planes_requests_are_one_line(affinity_store, tmp_path):
    d, raw, aff = affinity_store
    cases = [
        (dict(pred=d / "aff.zarr", channel=4), r"^channel=4 is not a channel of pred, which has "
                                               r"4: give 0 to 3$"),
        (dict(pred=aff), r"^pred has 4 channels and records no affinity offsets: give channel= "
                         r"\(0 to 3\)$"),
        (dict(seg=np.zeros((6, 10, 15), np.uint32), planes=True),
         r"^seg \(an array\) has shape \(6, 10, 15\) but raw has shape \(6, 10, 14\); the planes "
         r"view needs them on one \(Z, Y, X\) grid$"),
        (dict(seg=np.zeros((6, 10, 14), np.float32), planes=True),
         r"^seg \(an array\) has dtype float32: expected a label image"),
        (dict(seg=np.zeros((6, 10, 14), np.uint32), planes=True, slices=[1]),
         r"^slices= picks slices to draw one by one; the planes view draws the planes through "
         r"at= instead"),
        (dict(at=(1, 2, 3)), None),  # raw alone: fine
    ]
    for kwargs, message in cases:
        if message is None:
            assert [ax.emtile_panel for ax in panel_axes(P.show(d / "raw.zarr", **kwargs))] == \
                ["raw"] * 3
            continue
        with pytest.raises(EmtileError, match=message) as info:
            P.show(d / "raw.zarr", **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(EmtileError, match=r"^raw has shape \(10, 14\): the planes view needs a "
                                          r"\(Z, Y, X\) volume$"):
        P.show(raw[0], seg=np.zeros((10, 14), np.uint8), planes=True)
    r = CliRunner().invoke(main, ["show", str(d / "raw.zarr"), "--pred", str(d / "aff.zarr"),
                                  "--channel", "9", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "Error: --channel 9 is not a channel of pred, which has 4: give 0 to 3"], r.output
