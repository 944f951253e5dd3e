"""``emtile segment`` from affinities: perfect affinities give the objects' pieces back, the
labels do not depend on the blocks (here, on a LocalCluster, after a SIGKILL and a resume),
``--recut T`` equals a fresh run at T, foreign arrays with ``--offsets`` equal the store, bad
inputs are one line each. With distance seeds too: the pieces back from perfect affinities, the
same labels for every block size, here and on a LocalCluster."""

import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from scipy import ndimage

from emtile.affinities import affinities
from emtile.cli.main import main
from emtile.segmenter import segment
from emtile.store import create_image, is_complete, mark_complete

OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, -3), (0, -3, 0))
TEXT = ";".join(",".join(map(str, o)) for o in OFFSETS)
SHAPE = (24, 48, 48)


def truth():
    """Objects that touch, one in two 6-connected pieces, unlabelled voxels between some."""
    lab = np.zeros(SHAPE, np.uint32)
    lab[:, :24, :] = 1
    lab[:, 24:, :30] = 2
    lab[:, 24:, 30:] = 3
    lab[5:15, 10:20, 35:45] = 4  # inside 1, touching it on every side
    lab[:, 40:43, :] = 0  # a gap: 2 and 3 in two pieces each
    lab[2:6, 2:6, 2:6] = 5
    lab[18:22, 2:6, 2:6] = 5  # 5: two pieces
    lab[10:14, 30:36, 5:12] = 6  # inside 2
    return lab


def pieces(lab):
    """Each object's 6-connected pieces, numbered."""
    out = np.zeros(lab.shape, np.int64)
    n = 0
    for i in np.unique(lab[lab > 0]):
        comp, k = ndimage.label(lab == i)
        out[comp > 0] = comp[comp > 0] + n
        n += k
    return out, n


def same_partition(a, b):
    """True when ``a`` and ``b`` (on the same voxels) are one partition up to renumbering."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def write_store(path, aff, offsets=OFFSETS):
    g = create_image(path, aff.shape, aff.dtype, axes="czyx",
                     attrs={"kind": "probabilities", "target": "affinities",
                            "offsets": [list(o) for o in offsets]})
    g["0"][...] = aff
    mark_complete(g)
    return str(path)


def labels(path, name="0"):
    return np.asarray(zarr.open_group(str(path), mode="r")[name][...])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Perfect affinities (uint8) and noisy ones (float32: blurred truth + noise), as stores."""
    root = tmp_path_factory.mktemp("aff")
    lab = truth()
    aff, _ = affinities(lab, OFFSETS, dtype=np.float32)
    write_store(root / "perfect.zarr", np.rint(aff * 255).astype(np.uint8))
    rng = np.random.default_rng(0)
    noisy = ndimage.gaussian_filter(aff, (0, 1, 1, 1)) + rng.normal(0, 0.15, aff.shape)
    noisy = np.clip(noisy, 0, 1).astype(np.float32)
    write_store(root / "noisy.zarr", noisy)
    segment(root / "noisy.zarr", root / "whole.zarr", block_size=SHAPE, progress=False)
    return root, lab, noisy


def test_perfect_affinities_give_the_objects_pieces(data, tmp_path):
    root, lab, _ = data
    want, n = pieces(lab)
    r = segment(root / "perfect.zarr", tmp_path / "s.zarr", block_size=(8, 16, 16),
                progress=False)
    got = labels(tmp_path / "s.zarr")
    assert r.objects == n == 9
    assert same_partition(want[lab > 0], got[lab > 0])
    # keep_boundaries: the unlabelled voxels (no link) stay 0 too
    segment(root / "perfect.zarr", tmp_path / "k.zarr", block_size=(8, 16, 16),
            keep_boundaries=True, progress=False)
    got = labels(tmp_path / "k.zarr")
    assert same_partition(want, got) and np.array_equal(got == 0, lab == 0)


def test_noisy_affinities_same_labels_for_every_block_size(data, tmp_path):
    root, _, _ = data
    whole = labels(root / "whole.zarr")
    assert len(np.unique(whole)) > 5
    for block in ((8, 16, 16), (12, 48, 48)):
        out = tmp_path / f"{block[0]}.zarr"
        segment(root / "noisy.zarr", out, block_size=block, progress=False)
        np.testing.assert_array_equal(labels(out), whole)
        np.testing.assert_array_equal(labels(out, "emtile_graph/fragments"),
                                      labels(root / "whole.zarr", "emtile_graph/fragments"))


def test_distance_seeds_perfect_pieces_and_same_labels_for_every_block_size(data, tmp_path):
    root, lab, _ = data
    want, n = pieces(lab)
    r = segment(root / "perfect.zarr", tmp_path / "p.zarr", block_size=(8, 16, 16),
                seeds="distance", progress=False)
    got = labels(tmp_path / "p.zarr")
    assert r.objects == n and same_partition(want[lab > 0], got[lab > 0])
    # several seeds per piece: the fragments are finer than the pieces, and the faces between
    # two fragments of one piece (affinity 1) merge them back
    fragments = labels(tmp_path / "p.zarr", "emtile_graph/fragments")
    assert len(np.unique(fragments[lab > 0])) > n
    whole = tmp_path / "whole.zarr"
    segment(root / "noisy.zarr", whole, block_size=SHAPE, seeds="distance", progress=False)
    components = labels(root / "whole.zarr", "emtile_graph/fragments")
    assert not np.array_equal(labels(whole, "emtile_graph/fragments"), components)
    for block in ((8, 16, 16), (12, 20, 48)):
        out = tmp_path / f"{block[0]}.zarr"
        segment(root / "noisy.zarr", out, block_size=block, seeds="distance", progress=False)
        np.testing.assert_array_equal(labels(out), labels(whole))
        np.testing.assert_array_equal(labels(out, "emtile_graph/fragments"),
                                      labels(whole, "emtile_graph/fragments"))


def test_local_cluster_gives_the_same_bytes(data, tmp_path):
    root, _, _ = data
    out = tmp_path / "c.zarr"
    r = segment(root / "noisy.zarr", out, block_size=(8, 24, 24), cluster="local",
                cluster_workers=2, progress=False)
    assert "local cluster" in r.cluster
    np.testing.assert_array_equal(labels(out), labels(root / "whole.zarr"))
    # distance seeds (the pair-cost flood) too
    segment(root / "noisy.zarr", tmp_path / "dw.zarr", block_size=SHAPE, seeds="distance",
            progress=False)
    segment(root / "noisy.zarr", tmp_path / "dc.zarr", block_size=(8, 24, 24), seeds="distance",
            cluster="local", cluster_workers=2, progress=False)
    np.testing.assert_array_equal(labels(tmp_path / "dc.zarr"), labels(tmp_path / "dw.zarr"))


def test_recut_equals_a_fresh_run(data, tmp_path):
    root, _, _ = data
    for t in (0.1, 0.6):
        fresh = tmp_path / f"fresh{t}.zarr"
        segment(root / "noisy.zarr", fresh, block_size=(8, 16, 16), merge_threshold=t,
                progress=False)
        cut = tmp_path / f"cut{t}.zarr"
        r = segment(root / "whole.zarr", cut, recut=t, progress=False)
        assert is_complete(cut) and r.objects == labels(fresh).max()
        a, b = labels(fresh), labels(cut)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(labels(tmp_path / "cut0.1.zarr"), labels(tmp_path / "cut0.6.zarr"))
    # mean linkage too: the graph does not depend on the threshold
    segment(root / "noisy.zarr", tmp_path / "m.zarr", merge_quantile=None, merge_threshold=0.9,
            progress=False)
    segment(root / "noisy.zarr", tmp_path / "m3.zarr", merge_quantile=None, merge_threshold=0.3,
            progress=False)
    segment(tmp_path / "m.zarr", tmp_path / "mcut.zarr", recut=0.3, progress=False)
    np.testing.assert_array_equal(labels(tmp_path / "mcut.zarr"), labels(tmp_path / "m3.zarr"))
    # a recut keeps the segmentation's settings: another one given with it is refused, not ignored
    r = CliRunner().invoke(main, ["segment", str(root / "whole.zarr"), str(tmp_path / "x.zarr"),
                                  "--recut", "0.3", "--merge-threshold", "0.4", "--no-progress"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "--merge-threshold 0.4 does not apply with --recut 0.3" in r.output, r.output
    assert not (tmp_path / "x.zarr").exists()


RUN = ("import sys; from emtile.segmenter import segment; "
       "segment(sys.argv[1], sys.argv[2], block_size=(8, 16, 16), progress=False)")


def test_killed_run_resumes_to_the_same_labels(data, tmp_path):
    root, _, _ = data
    out = tmp_path / "r.zarr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("_EMTILE")}
    env["_EMTILE_FAULTS"] = "segment.fragments.recorded@5=kill"
    killed = subprocess.run([sys.executable, "-c", RUN, str(root / "noisy.zarr"), str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert out.exists() and not is_complete(out)
    r = segment(root / "noisy.zarr", out, block_size=(8, 16, 16), progress=False)
    assert r.blocks_resumed[0] == 27 and r.blocks_resumed[1] >= 5
    np.testing.assert_array_equal(labels(out), labels(root / "whole.zarr"))
    # a recut killed after recording 3 of its 27 blocks, resumed through the CLI
    env["_EMTILE_FAULTS"] = "segment.recut.recorded@3=kill"
    recut = RUN.replace("block_size=(8, 16, 16)", "recut=0.6")
    killed = subprocess.run([sys.executable, "-c", recut, str(out), str(tmp_path / "c.zarr")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not is_complete(tmp_path / "c.zarr")
    result = CliRunner().invoke(main, ["segment", str(out), str(tmp_path / "c.zarr"),
                                       "--recut", "0.6", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "resumed: 3 of 27 blocks were done" in result.output
    segment(out, tmp_path / "d.zarr", recut=0.6, progress=False)
    np.testing.assert_array_equal(labels(tmp_path / "c.zarr"), labels(tmp_path / "d.zarr"))


def test_foreign_tiff_and_hdf5_with_offsets_equal_the_store(data, tmp_path):
    root, _, noisy = data
    tifffile.imwrite(tmp_path / "aff.tif", noisy)
    with h5py.File(tmp_path / "aff.h5", "w") as f:
        f["aff"] = noisy
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=noisy.shape, chunks=(1, 8, 24, 24),
                      dtype=noisy.dtype)[...] = noisy
    for src in (tmp_path / "aff.tif", f"{tmp_path / 'aff.h5'}:aff", tmp_path / "plain.zarr"):
        out = tmp_path / f"out_{os.path.basename(str(src))[-4:]}.zarr"
        result = CliRunner().invoke(main, ["segment", str(src), str(out), "--offsets", TEXT,
                                           "--block-size", "24,48,48", "--no-progress"])
        assert result.exit_code == 0, result.output
        np.testing.assert_array_equal(labels(out), labels(root / "whole.zarr"))


@pytest.mark.parametrize("case, message", [
    ("count", "--offsets -1,0,0;0,-1,0;0,0,-1 gives 3 offsets, but affinities"),
    ("range", "hold 1.5 near voxel"),
    ("missing", "record no offsets: give them, one per channel, e.g. --offsets "),
    ("nearest", "lacks the nearest neighbour 0,0,-1"),
    ("recut", "--recut needs a segmentation made from affinities by emtile segment"),
    ("recut2", "--recut 1.5 must be a number between 0 and 1"),
])
def test_bad_inputs_are_one_line(data, tmp_path, case, message):
    _, _, noisy = data
    aff = noisy.copy()
    args = ["--offsets", TEXT]
    if case == "count":
        args = ["--offsets", "-1,0,0;0,-1,0;0,0,-1"]
    elif case == "range":
        aff[0, 3, 4, 5] = 1.5
    elif case == "missing":
        args = []
    elif case == "nearest":
        args = ["--offsets", "-1,0,0;0,-1,0;0,0,-2;0,0,-3;0,-3,0"]
    else:
        args = ["--recut", "0.5" if case == "recut" else "1.5"]
    tifffile.imwrite(tmp_path / "aff.tif", aff)
    result = CliRunner().invoke(main, ["segment", str(tmp_path / "aff.tif"),
                                       str(tmp_path / "o.zarr"), "--no-progress", *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines


def test_store_is_valid_ngff_and_info_reads_it(data):
    models = pytest.importorskip("ome_zarr_models")
    from ome_zarr_models.v05.image_label import ImageLabel


    root, _, _ = data
    node = models.open_ome_zarr(zarr.open_group(str(root / "whole.zarr"), mode="r"))
    assert isinstance(node, ImageLabel)
    result = CliRunner().invoke(main, ["info", str(root / "whole.zarr")])
    assert result.exit_code == 0, result.output
    assert "(24, 48, 48)" in result.output and "input affinities" in result.output
    meta = zarr.open_group(str(root / "whole.zarr"), mode="r").attrs["emtile"]
    assert meta["segment"]["grow"] == 4 and meta["settings"]["grow"] is None  # affinities' own
    graph = zarr.open_group(str(root / "whole.zarr"), mode="r")["emtile_graph"]
    assert "ome" not in graph.attrs and graph.attrs["fragments"] == graph["first"].shape[0]
    assert json.loads(json.dumps(graph.attrs.asdict()))["method"] == "ws"


def signals_reference(levels, start, stop, shape, lut):
    """NumPy definition of :func:`emtile.segmenter.affinity.signals`: per voxel, the pairs that
    touch it inside the volume, their rounded mean level, any and every one linked."""
    size = tuple(b - a for a, b in zip(start, stop))
    total = np.zeros(size, np.int64)
    count = np.zeros(size, np.int64)
    inside = np.zeros(size, bool)
    core = np.ones(size, bool)
    for k in range(3):
        for upper in (False, True):
            sl = [slice(0, n) for n in size]
            if upper:
                sl[k] = slice(1, size[k] + 1)
            lv = levels[(k,) + tuple(sl)]
            pos = np.arange(size[k]) + start[k]
            ok = pos + 1 < shape[k] if upper else pos > 0
            ok = np.broadcast_to(ok.reshape([-1 if ax == k else 1 for ax in range(3)]), size)
            total += np.where(ok, lv, 0)
            count += ok
            inside |= ok & lut[lv]
            core &= lut[lv] | ~ok
    mean = (2 * total + count) // np.maximum(2 * count, 1)
    return inside, (255 - mean).astype(np.uint8), core & inside


@pytest.mark.parametrize("box", [((0, 0, 0), (6, 7, 9)), ((2, 3, 1), (6, 10, 9)),
                                 ((5, 0, 4), (6, 10, 5)), ((0, 0, 0), (1, 1, 1))])
def test_signals_equal_their_numpy_definition(box):
    """Inside, altitude and core of a box against the NumPy sums, at the volume's faces too
    (pairs leaving the volume do not count; a voxel of a 1-voxel-wide volume has none)."""
    from emtile.segmenter.affinity import link_lut, read_levels, signals

    rng = np.random.default_rng(3)
    shape = (6, 10, 9) if box[1] != (1, 1, 1) else (1, 1, 1)
    aff = rng.integers(0, 256, (3,) + shape, dtype=np.uint8)
    aff[:, rng.random(shape) < 0.3] = 255  # runs of linked pairs
    start, stop = box
    levels = read_levels(aff, (0, 1, 2), start, stop, shape, "random")
    for threshold in (0.5, 0.9):
        lut = link_lut(threshold)
        got = signals(levels, start, stop, shape, lut)
        want = signals_reference(levels, start, stop, shape, lut)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and np.array_equal(g, w)
        assert got[0].any() or shape == (1, 1, 1)


@pytest.mark.parametrize("seeds", ["components", "distance"])
def test_wide_provisional_ids_give_the_same_bytes(data, tmp_path, monkeypatch, seeds):
    """Provisional ids stay uint32 while they fit (every run here); past
    ``blocks.NARROW_IDS`` they are int64. Forcing the int64 path gives the same labels and
    fragments, and each path is taken where it should be."""
    from emtile.segmenter import blocks

    root, _, _ = data
    taken = []
    real = blocks._provisional

    def spy(*args):
        ids = real(*args)
        taken.append(ids.dtype)
        return ids

    monkeypatch.setattr(blocks, "_provisional", spy)
    runs = {}
    for limit in (blocks.NARROW_IDS, 2):
        monkeypatch.setattr(blocks, "NARROW_IDS", limit)
        out = tmp_path / f"{limit}.zarr"
        segment(root / "noisy.zarr", out, block_size=(8, 16, 16), seeds=seeds, progress=False)
        runs[limit] = (labels(out), labels(out, "emtile_graph/fragments"))
        assert set(taken) == {np.dtype(np.uint32) if limit > 2 else np.dtype(np.int64)}
        taken.clear()
    wide, narrow = runs[2], runs[1 << 32]
    for a, b in zip(wide, narrow):
        np.testing.assert_array_equal(a, b)
    assert len(np.unique(narrow[0])) > 5
