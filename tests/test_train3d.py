"""3-D affinity training (issue 21 item 3): targets of a patch, the masked loss, 3-D augmentation,
a smoke run on a FIB-25 crop through the command line, and the new options' bad input."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from emtile._errors import EmtileError
from emtile.affinities import affinities, check_offsets
from emtile.affinity_cc import segment_affinities
from emtile.augment3d import Augmenter3D, transpose
from emtile.sampling3d import AffinityPatchDataset, BoundaryPatchDataset
from emtile.training import affinity_run

FIB25 = Path(os.environ.get("EMTILE_FIB25_DIR", Path(__file__).resolve().parents[2] / "shared"
                            / "data" / "fib25"))
OFFSETS = check_offsets("-1,0,0;0,-1,0;0,0,-1;-3,0,0;0,-5,0;0,0,-7;0,2,0")


def blobs(shape=(20, 36, 36), n=12, seed=0, zeros=0.05):
    """Object ids: Voronoi cells of ``n`` random seeds, with some voxels unlabelled (0)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, (n, 3)) * shape
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    ids = (np.argmin(((grid[..., None, :] - pts) ** 2).sum(-1), -1) + 1).astype(np.uint32)
    ids[rng.random(shape) < zeros] = 0
    return ids


def test_patch_targets_are_the_volume_affinities_cropped():
    ids = blobs()
    raw = (ids * 7 % 255).astype(np.uint8)
    z_range = (3, 15)
    d = AffinityPatchDataset(raw, ids, input_size=(14, 24, 24), output_size=(10, 20, 20),
                             z_range=z_range, offsets=OFFSETS, seed=5)
    inside = ids.copy()
    inside[:z_range[0]], inside[z_range[1]:] = 0, 0  # outside the training range: unlabelled
    full_aff, full_mask = affinities(inside, OFFSETS)
    touched = set()
    for i in range(12):
        z, y, x = d.draw_origin(np.random.default_rng([5, i]))
        box = (slice(None), slice(z, z + 10), slice(y, y + 20), slice(x, x + 20))
        image, aff, mask = d.sample(i)
        assert image.shape == (14, 24, 24) and aff.shape == mask.shape == (7, 10, 20, 20)
        np.testing.assert_array_equal(aff, full_aff[box])
        np.testing.assert_array_equal(mask, full_mask[box])
        touched.add((z == z_range[0], y + 20 == ids.shape[1]))
    # the draws reached the range's start (z pairs leaving it masked) and the volume's far edge
    assert (True, False) in touched or (True, True) in touched
    assert any(y_edge for _, y_edge in touched)
    # a patch inside the volume keeps long-range pairs that leave the patch (read with context)
    assert full_mask[5].sum() > 0 and not np.array_equal(
        affinities(inside[3:13, 0:20, 0:20], OFFSETS)[1], full_mask[:, 3:13, 0:20, 0:20])


def test_boundary_patches_are_the_labels_cropped_and_masked_outside_the_range():
    ids = blobs(zeros=0.0)
    labels = np.zeros(ids.shape, np.uint8)  # interior where the in-plane neighbours agree
    labels[:, 1:-1, 1:-1] = ((ids[:, 1:-1, 1:-1] == ids[:, :-2, 1:-1])
                             & (ids[:, 1:-1, 1:-1] == ids[:, 2:, 1:-1])
                             & (ids[:, 1:-1, 1:-1] == ids[:, 1:-1, :-2])
                             & (ids[:, 1:-1, 1:-1] == ids[:, 1:-1, 2:]))
    raw = (labels * 200 + 20).astype(np.uint8)
    d = BoundaryPatchDataset(raw, labels, input_size=(14, 24, 24), output_size=(10, 20, 20),
                             z_range=(3, 15), seed=2, batch_size=3)
    for i in range(6):
        z, y, x = d.draw_origin(np.random.default_rng([2, i]))
        image, target, mask = d.sample(i)
        assert target.shape == mask.shape == (1, 10, 20, 20) and image.shape == (14, 24, 24)
        np.testing.assert_array_equal(target[0], labels[z:z + 10, y:y + 20, x:x + 20])
        assert mask.min() == 1.0  # the output window lies inside the training range
    assert d.batch(1)["label"].shape == (3, 1, 10, 20, 20)
    # membrane (0) is a label, not "unlabelled": read as code 1; outside the range: 0
    from emtile.sampling3d import read_ids

    codes = read_ids(labels, (1, 0, 0), (5, 4, 4), (3, 15), codes=True)
    assert codes.dtype == np.uint8 and (codes[:2] == 0).all()
    np.testing.assert_array_equal(codes[2:], labels[3:5, :4, :4] + 1)
    # a shifted section's wrapped band leaves the loss: the mask sees it, the target does not
    aug = Augmenter3D(voxel_size=(50.0, 4.0, 4.0), elastic=False, flip=False, transpose=False,
                      intensity=False, missing=0.0, shift=1.0)
    shifted = BoundaryPatchDataset(raw, labels, input_size=(14, 24, 24),
                                   output_size=(10, 20, 20), z_range=(3, 15), augment=aug)
    masks = [shifted.sample(i)[2] for i in range(4)]
    assert any(m.min() == 0.0 for m in masks)


@pytest.mark.parametrize("kind", ["balanced_bce", "dice"])
def test_loss_ignores_masked_pairs(kind):
    """The trainer's loss (``affinity_run.loss_function``): logits and targets at masked pairs
    change neither the loss nor any gradient; without the mask they would."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 6, 6, generator=g)
    target = (torch.rand(logits.shape, generator=g) > 0.3).float()
    mask = (torch.rand(logits.shape, generator=g) > 0.4).float()
    loss_fn = affinity_run.loss_function(kind)
    masked = mask == 0

    def loss_and_grad(lg, t, m):
        lg = lg.clone().requires_grad_(True)
        value = loss_fn(lg, t, m)
        value.backward()
        return float(value.detach()), lg.grad

    base, grad = loss_and_grad(logits, target, mask)
    changed_logits = torch.where(masked, 20 * torch.randn(logits.shape, generator=g), logits)
    changed_target = torch.where(masked, 1 - target, target)
    other, other_grad = loss_and_grad(changed_logits, changed_target, mask)
    assert other == pytest.approx(base, rel=1e-6)
    assert torch.all(grad[masked] == 0) and torch.allclose(grad, other_grad)
    # the same change moves a loss that does not mask: this test fails if the mask is dropped
    ones = torch.ones_like(mask)
    assert abs(loss_and_grad(changed_logits, changed_target, ones)[0]
               - loss_and_grad(logits, target, ones)[0]) > 1e-3


def test_batches_carry_the_mask_as_weight():
    ids = blobs((12, 20, 20), n=5)
    d = AffinityPatchDataset(ids.astype(np.uint8), ids, input_size=(8, 16, 16),
                             output_size=(8, 16, 16), z_range=(0, 12), offsets=OFFSETS,
                             batch_size=2, seed=1)
    b = d.batch(0)
    assert b["image"].shape == (2, 1, 8, 16, 16) and b["label"].shape == (2, 7, 8, 16, 16)
    for j in range(2):
        _, aff, mask = d.sample(j)
        assert torch.equal(b["weight"][j], torch.from_numpy(mask))
        assert torch.equal(b["label"][j], torch.from_numpy(aff))
    assert 0 < float(b["weight"].mean()) < 1


def test_augmentation_keeps_raw_and_ids_aligned():
    ids = blobs((16, 16, 16), n=20, zeros=0.0)
    raw = ids.astype(np.float32)  # raw == ids voxel for voxel: any misalignment shows
    aug = Augmenter3D(voxel_size=(10, 10, 10), elastic=False, intensity=False)
    seen = set()
    for seed in range(16):
        r, i = aug(raw, ids, np.random.default_rng(seed))
        np.testing.assert_array_equal(r, i.astype(np.float32))
        seen.add(tuple(r[:, 0, 0] == raw[:, 0, 0]))
    assert len(seen) > 1  # the transforms did something
    # elastic: ids by nearest neighbour, raw by linear interpolation, one field for both
    big = np.repeat(np.repeat(np.repeat(blobs((6, 8, 8), n=6, zeros=0.0), 2, 0), 4, 1), 4, 2)
    r, i = Augmenter3D(voxel_size=(10, 10, 10), flip=False, transpose=False, intensity=False,
                       elastic_sigma=3)(big.astype(np.float32), big, np.random.default_rng(3))
    assert not np.array_equal(i, big) and np.mean(np.round(r) == i) > 0.9


def test_transposes_only_among_axes_of_one_voxel_size():
    a = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    assert transpose([a], (0, 2, 1), (40, 4, 4))[0].shape == (2, 3, 3)
    with pytest.raises(EmtileError, match=r"axes=\(1, 0, 2\) swaps axis 0 \(40 nm\)"):
        transpose([a], (1, 0, 2), (40, 4, 4))
    # anisotropic data: z never moves, missing sections zero raw only, shifts move both
    ids = np.broadcast_to(np.arange(1, 9, dtype=np.uint32)[:, None, None], (8, 12, 12)).copy()
    aug = Augmenter3D(voxel_size=(40, 4, 4), flip=False, elastic=False, intensity=False,
                      missing=0.5, shift=0.0)
    for seed in range(6):
        r, i = aug(ids.astype(np.float32), ids, np.random.default_rng(seed))
        np.testing.assert_array_equal(i, ids)
        zeroed = np.all(r == 0, axis=(1, 2))
        np.testing.assert_array_equal(r[~zeroed], ids[~zeroed])
    shifted = Augmenter3D(voxel_size=(40, 4, 4), flip=False, elastic=False, intensity=False,
                          missing=0.0, shift=1.0, max_shift=2)
    ramp = np.broadcast_to(np.arange(12, dtype=np.uint32)[None, :, None] + 1, (8, 12, 12)).copy()
    r, i = shifted(ramp.astype(np.float32), ramp, np.random.default_rng(0))
    labelled = i != 0
    np.testing.assert_array_equal(r[labelled], i[labelled])


def test_segment_affinities_joins_nearest_neighbours_above_threshold():
    ids = blobs((6, 10, 10), n=4, zeros=0.0)
    aff, _ = affinities(ids, OFFSETS)
    seg = segment_affinities(aff, OFFSETS, 0.5)
    # components of same-id neighbours: a relabelling of the connected parts of each id
    pairs = set(zip(ids.ravel().tolist(), seg.ravel().tolist()))
    assert len({s for _, s in pairs}) == len(pairs) >= len(np.unique(ids))
    with pytest.raises(EmtileError, match="lack the nearest-neighbour offset"):
        segment_affinities(aff[3:], OFFSETS[3:])


# --------------------------------------------------------------------------- through the CLI


def run(*args):
    from emtile.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def fib_crop(tmp_path_factory):
    """A 24 x 64 x 64 FIB-25 crop: raw and ids converted with ``emtile convert --labels --ids``,
    and the ids as binary labels (for the refusal)."""
    import tifffile

    if not (FIB25 / "raw.tif").exists():
        if os.environ.get("CI"):
            pytest.fail(f"FIB-25 data not found at {FIB25} (set EMTILE_FIB25_DIR)")
        pytest.skip(f"FIB-25 data not found at {FIB25} (set EMTILE_FIB25_DIR)")
    d = tmp_path_factory.mktemp("fib")
    tifffile.imwrite(d / "raw.tif", tifffile.imread(FIB25 / "raw.tif")[100:124, 40:104, 40:104])
    tifffile.imwrite(d / "gt.tif",
                     tifffile.imread(FIB25 / "groundtruth.tif")[100:124, 40:104, 40:104])
    for args in (("raw.tif", "raw.zarr"), ("gt.tif", "gt.zarr", "--labels", "--ids"),
                 ("gt.tif", "binary.zarr", "--labels", "--threshold", "0")):
        r = run("convert", *(d / a if a.endswith(("tif", "zarr")) else a for a in args),
                "--voxel-size", "10,10,10", "--no-progress")
        assert r.exit_code == 0, r.output
    return d


TINY = ("--ndim", "3", "--target", "affinities", "--base", "2", "--depth", "1",
        "--tile", "28,28,28", "--workers", "0", "--no-progress")


def test_fib25_smoke_run_and_predict(fib_crop, tmp_path):
    out = tmp_path / "run"
    r = run("train", "--raw", fib_crop / "raw.zarr", "--labels", fib_crop / "gt.zarr", "--out", out,
            *TINY, "--train-slices", "0:16", "--val-slices", "16:24", "--iterations", "8",
            "--val-every", "8", "--offsets", "-1,0,0;0,-1,0;0,0,-1;0,-4,0")
    assert r.exit_code == 0, r.output
    assert "VOI" in r.output
    info = json.loads((out / "run.json").read_text())
    s = info["settings"]
    assert (s["ndim"], s["target"], s["tile"], s["factors"]) == (3, "affinities", [28, 28, 28],
                                                                   [[2, 2, 2]])
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -4, 0]]
    assert s["offsets"] == offsets and info["voxel_size"] == [10.0, 10.0, 10.0]
    with (out / "train.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"val_voi_split", "val_voi_merge", "val_voi"} <= set(rows[0])
    voi = float(rows[-1]["val_voi"])
    assert voi == pytest.approx(float(rows[-1]["val_voi_split"]) + float(rows[-1]["val_voi_merge"]),
                                abs=1e-4) and voi > 0
    for kind in ("best", "last"):
        meta = json.loads((out / kind / "metadata.json").read_text())
        assert (meta["ndim"], meta["target"], meta["offsets"]) == (3, "affinities", offsets)
        assert meta["emtile"]["voxel_size"] == [10.0, 10.0, 10.0]
        assert meta["emtile"]["normalization"]["method"] == "percentile"
        assert meta["emtile"]["calibration"]["applied"] is False
    r = run("info", out / "best")
    assert r.exit_code == 0 and "none (affinity models are not calibrated)" in r.output, r.output
    pred = tmp_path / "pred.zarr"
    r = run("predict", "--model", out / "best", fib_crop / "raw.zarr", pred, "--tile", "44,44,44",
            "--no-progress")  # the predictor's default tile, 572 per axis, takes 20 GB in 3-D
    assert r.exit_code == 0, r.output
    from emtile import open_volume

    assert open_volume(pred).shape == (4, 24, 64, 64)
    # resuming with other offsets is refused; without them it takes the run's
    r = run("train", "--raw", fib_crop / "raw.zarr", "--labels", fib_crop / "gt.zarr", "--out", out,
            *TINY, "--train-slices", "0:16", "--iterations", "9", "--resume", "--offsets",
            "-1,0,0;0,-1,0;0,0,-1")
    assert r.exit_code == 1 and "differ from the run being resumed" in r.output
    r = run("train", "--raw", fib_crop / "raw.zarr", "--labels", fib_crop / "gt.zarr", "--out", out,
            "--ndim", "3", "--target", "affinities", "--tile", "28,28,28", "--workers", "0",
            "--train-slices", "0:16", "--iterations", "9", "--resume", "--no-progress")
    assert r.exit_code == 0, r.output  # offsets, factors and depth: the run's
    assert json.loads((out / "run.json").read_text())["settings"]["offsets"] == offsets


BAD = [
    (("--labels", "binary.zarr"), "are binary, not object ids: --target affinities needs ids; "
                                  "convert them with --labels --ids"),
    (("--target", "boundaries", "--offsets", "-1,0,0;0,-1,0;0,0,-1"),
     "apply to --target affinities only"),
    (("--ndim", "2", "--tile", "28"), "--target affinities needs --ndim 3"),
    (("--ndim", "4"), "--ndim 4 must be 2 (slices) or 3 (volumes)"),
    (("--offsets", "-1,a,0"), "--offsets"),
    (("--offsets", "-1,0"), "--offsets"),
    (("--factors", "2,2;2,2,2", "--depth", "2"), "the entry (2, 2) is not an integer or 3"),
    (("--factors", "2,2,2;2,2,2"), "differs from the 2 levels of --factors"),
    (("--kernels", "3;3"), "needs factors too"),
    (("--tile", "28,28"), "--tile (28, 28) must be a positive integer or 3 (Z, Y, X)"),
    (("--tile", "29,28,28"), "nearest valid sizes are 28 and 30"),
    (("--tile", "124,124,124"), "choose a smaller tile"),
    (("--train-slices", "0,2,4,6"), "must be one z range in 3-D"),
    (("--loss", "dice"), "--loss dice applies to 2-D boundary training only"),
    (("--w0", "5"), "--w0 5.0 applies to 2-D boundary training only"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_input_is_one_line(fib_crop, tmp_path, extra, message):
    args = dict(zip(TINY[:-1:2], TINY[1::2]))  # TINY ends with the flag --no-progress
    args.update({"--raw": "raw.zarr", "--labels": "gt.zarr", "--train-slices": "0:16",
                 "--iterations": "1"})
    pairs = list(zip(extra[::2], extra[1::2]))
    args.update(pairs)
    flat = [v if not v.endswith(".zarr") else str(fib_crop / v)
            for kv in args.items() for v in kv]
    r = run("train", *flat, "--out", tmp_path / "run", "--no-progress")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.output.strip().count("\n") == 0, r.output
    assert r.output.startswith("Error: ") and message in r.output, r.output
    assert not (tmp_path / "run" / "run.json").exists()


def test_3d_boundary_run_predicts_and_segments(fib_crop, tmp_path):
    """``--ndim 3 --target boundaries`` (from ids: their in-plane boundaries): one channel, the
    2-D run's V-Rand validation, a (Z, Y, X) probability map that ``emtile segment`` takes in
    3-D."""
    out = tmp_path / "run3b"
    r = run("train", "--raw", fib_crop / "raw.zarr", "--labels", fib_crop / "gt.zarr",
            "--out", out, "--ndim", "3", "--target", "boundaries", "--base", "2", "--depth", "1",
            "--factors", "1,2,2", "--kernels", "1,3,3;3,3,3", "--tile", "12,28,28",
            "--workers", "0", "--train-slices", "0:16", "--val-slices", "16:24",
            "--iterations", "4", "--val-every", "4", "--no-progress")
    assert r.exit_code == 0, r.output
    info = json.loads((out / "run.json").read_text())
    assert (info["settings"]["ndim"], info["settings"]["target"]) == (3, "boundaries")
    assert info["settings"]["offsets"] is None
    meta = json.loads((out / "best" / "metadata.json").read_text())
    assert meta["target"] == "boundaries" and meta["ndim"] == 3 and "offsets" not in meta
    rows = list(csv.DictReader((out / "train.csv").open()))
    assert rows[-1]["val_vrand"] not in ("", None) and 0.0 <= float(rows[-1]["val_vrand"]) <= 1
    pred, seg = tmp_path / "pred.zarr", tmp_path / "seg.zarr"
    r = run("predict", "--model", out / "best", fib_crop / "raw.zarr", pred, "--tile", "12,44,44",
            "--no-progress")
    assert r.exit_code == 0, r.output
    from emtile import open_volume

    p = open_volume(pred)
    assert p.shape == (24, 64, 64) and p.dtype == np.uint8
    r = run("segment", pred, seg, "--no-progress")
    assert r.exit_code == 0, r.output
    assert open_volume(seg).shape == (24, 64, 64)
    assert json.loads((seg / "zarr.json").read_text())["attributes"]["emtile"]["segment"][
        "mode"] == "3d"  # auto: a 3-D model's map


def test_id_labels_as_2d_boundaries():
    from emtile.training.targets import IdBoundaries

    ids = np.array([[[1, 1, 1, 2, 2],
                     [1, 1, 1, 2, 2],
                     [0, 1, 1, 2, 2]]], np.uint32)
    view = IdBoundaries(ids)
    # interior: labelled, and every in-plane 4-neighbour inside the slice has the same id
    expected = np.array([[[1, 1, 0, 0, 1],
                          [0, 1, 0, 0, 1],
                          [0, 0, 0, 0, 1]]], np.uint8)
    np.testing.assert_array_equal(view[:, :, :], expected)
    np.testing.assert_array_equal(view[0, 1:3, 1:4], expected[0, 1:3, 1:4])  # crops see context
    np.testing.assert_array_equal(view[0], expected[0])


def test_2d_boundaries_train_from_id_labels(fib_crop, tmp_path):
    out = tmp_path / "run2d"
    r = run("train", "--raw", fib_crop / "raw.zarr", "--labels", fib_crop / "gt.zarr", "--out", out,
            "--train-slices", "0:4", "--val-slices", "4:5", "--base", "2", "--depth", "2",
            "--tile", "60", "--iterations", "2", "--workers", "0", "--no-calibrate",
            "--no-progress")
    assert r.exit_code == 0, r.output
    info = json.loads((out / "run.json").read_text())
    assert (info["settings"]["ndim"], info["settings"]["target"]) == (2, "boundaries")
    assert "offsets" not in json.loads((out / "best" / "metadata.json").read_text())


def test_isbi_z_context_arms_differ_only_in_z_context():
    """examples/isbi_z_context.py: the 3d arm's network reads 4 sections of z context (5 in, 1
    out), the 3d-flat arm's none, with the same in-plane geometry; both are 3-D boundary runs
    whose settings pass the checks."""
    import dataclasses
    import importlib.util
    import sys

    from emtile.training.targets import check_target_fields
    from emtile.unet import UNet

    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    try:
        spec = importlib.util.spec_from_file_location("isbi_z_context",
                                                      examples / "isbi_z_context.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(examples))
    outputs = {}
    for arm in ("3d-flat", "3d"):
        s = script.arm_settings(arm, 10, 188, seed=0)
        assert (s.ndim, s.target, s.iterations) == (3, "boundaries", 10)
        checked = check_target_fields(s)
        s = dataclasses.replace(s, **checked)
        net = UNet(1, 1, **s.model_args())
        outputs[arm] = net.output_size(s.tile)
    assert outputs["3d"] == (1, 4, 4) and outputs["3d-flat"] == (1, 4, 4)
    flat, deep = (script.arm_settings(a, 10, 188, seed=0) for a in ("3d-flat", "3d"))
    assert flat.tile == (1, 188, 188) and deep.tile == (5, 188, 188)
    assert script.arm_settings("2d", 10, 188, seed=0).ndim == 2
