"""``examples/bench_segment.py``'s oracle: what it counts on a hand-built map whose answer is known
(no timing: benchmarks are never timed tests)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "examples" / "bench_segment.py"
    spec = importlib.util.spec_from_file_location("bench_segment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("faint, auc, merged", [(0.0, 1.0, 0), (0.6, 0.5, 1)])
def test_oracle_merges_a_false_split_and_counts_the_faces(bench, tmp_path, faint, auc, merged):
    # truth: two cells, left and right of a membrane in columns 31-32
    truth = np.full((1, 64, 64), 255, np.uint8)
    truth[0, :, 31:33] = 0
    # the map: the true membrane at p = 0 (at p = faint below row 32: a membrane the model
    # half missed), and a false membrane (p = 0.5) across the left cell at row 32, so the left
    # cell is two fragments at the default threshold (0.88)
    p = np.ones((1, 64, 64), np.float32)
    p[0, :, 31:33] = 0.0
    p[0, 33:, 31:33] = faint
    p[0, 32, :31] = 0.5
    path = bench.write_probabilities(tmp_path / "p.zarr", np.round(p * 255).astype(np.uint8))

    out = bench.oracle(path, tmp_path, (0, 1), bench.read(path), truth)

    # the two halves of the left cell joined by the truth: a perfect score
    assert out["v_rand_oracle"] == pytest.approx(1.0)
    # one face inside the left cell, one between each half and the right cell
    assert (out["faces_same"], out["faces_different"]) == (1, 2)
    # the false membrane's face (boundary 0.5) against the true one's (1.0, or 0.4 where faint)
    assert out["auc_median"] == pytest.approx(auc)
    assert out["half_same_at"] == pytest.approx(0.5, abs=1 / 255)
    assert out["different_merged_at_half"] == merged


def test_quality_refuses_a_prediction_that_is_not_the_whole_stack(bench, tmp_path, isbi_dir):
    path = bench.write_probabilities(tmp_path / "five.zarr", np.zeros((5, 512, 512), np.uint8))
    with pytest.raises(SystemExit) as e:
        bench.main(["quality", "--pred", path, "--data", str(isbi_dir), "--workdir", str(tmp_path)])
    assert str(e.value) == (f"the prediction {path} has shape (5, 512, 512), the ISBI labels "
                            f"(30, 512, 512): give a prediction of the whole training stack (or "
                            f"--model)")


def test_memory3d_segments_kept_affinity_stores_in_subprocesses(bench, tmp_path, capsys):
    """``memory3d --affinities SMALL LARGE``: both stores segmented (each in its own process,
    with the seeds asked for), a row each and the ratio printed."""
    from emtile.affinities import affinities
    from emtile.store import create_image, mark_complete

    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    paths = []
    for side in (12, 24):
        ids = (np.arange(side)[:, None, None] // 6 * 100 + np.arange(side)[None, :, None] // 6
               + np.arange(side)[None, None, :] // 6 * 10 + 1).astype(np.uint32)
        aff, _ = affinities(np.broadcast_to(ids, (side,) * 3), offsets)
        g = create_image(tmp_path / f"aff{side}.zarr", aff.shape, np.uint8, axes="czyx",
                         voxel_size=(10.0, 10.0, 10.0),
                         attrs={"kind": "probabilities", "target": "affinities",
                                "offsets": offsets})
        g["0"][...] = np.rint(aff * 255).astype(np.uint8)
        mark_complete(g)
        paths.append(str(tmp_path / f"aff{side}.zarr"))
    bench.main(["memory3d", "--affinities", *paths, "--workdir", str(tmp_path),
                "--seeds", "distance", "--repeat", "2"])
    out = capsys.readouterr().out
    assert "seeds distance" in out and "peak RSS largest / smallest (medians)" in out
    # 8 and 64 cubes of 6^3 voxels: the perfect affinities give exactly those objects
    assert "12x12x12" in out and "24x24x24" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("12x", "24x"))]
    assert [int(r[3]) for r in rows] == [8, 64]
    # two runs each: their peaks, and the median of the two in its column
    for r in rows:
        peaks = [float(v) for v in r[6:]]
        assert len(peaks) == 2 and float(r[5]) == pytest.approx(np.median(peaks), abs=1e-3)
    ratio = float(out.split("(medians):")[1].split()[0])
    assert ratio == pytest.approx(float(rows[1][5]) / float(rows[0][5]), abs=0.01)
