"""The commands end to end on both object stores (issue 24), each run against a real server on
127.0.0.1 (moto for ``s3://``, fake-gcs-server for ``gs://``; ``tests/objstores.py``):

- ``convert -> predict -> segment -> evaluate`` through the CLI with every input and output a
  URL gives the arrays and scores of the same commands on local disk;
- a ``predict`` SIGKILLed after its second block resumes with only the missing blocks and the
  uninterrupted run's bytes;
- ``train`` and ``show`` read their volumes from a bucket;
- a command refused on a bucket prints one line, in a fresh interpreter (nothing at exit);
- a second run into a live run's output is refused naming it;
- on ``gs://`` (S3 has its own in ``test_s3_pipeline.py``): a Dask LocalCluster reads and writes
  the store.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from emtile.cli.main import main
from emtile.locations import Location
from emtile.store import is_complete

from objstores import bucket, gcs, gcs_server, s3, s3_server  # noqa: F401  (pytest fixtures)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# one torch thread given: a resumed run must use the killed run's count (its fingerprint)
PREDICT = ["--tile", "68", "--threshold", "0.5", "--workers", "0", "--threads", "1",
           "--no-progress"]
SEGMENT = ["--method", "ws", "--min-size", "10", "--block-size", "1,48,64", "--no-progress"]
ARRAYS = ["raw.zarr/0", "pred.zarr/0", "pred.zarr/labels/mask/0", "seg.zarr/0"]


@pytest.fixture(scope="module")
def inputs(synthetic_small, tmp_path_factory):
    """A TIFF stack, its labels as TIFF, and a small saved model (local files: where a user's
    own files are)."""
    import tifffile

    from emtile.unet import UNet, save_model

    d = tmp_path_factory.mktemp("objstore-runs")
    raw, labels = synthetic_small
    tifffile.imwrite(d / "stack.tif", raw[:3], photometric="minisblack")
    tifffile.imwrite(d / "labels.tif", labels[:3] * 255, photometric="minisblack")
    torch.manual_seed(0)
    save_model(UNet(base=4, depth=2), d / "model")
    return d


def _ok(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def _chain(inputs, where):
    """convert, predict, segment, evaluate with every store under ``where``; the scores."""
    _ok("convert", inputs / "stack.tif", f"{where}/raw.zarr", "--voxel-size", "50,4,4",
        "--no-progress")
    _ok("predict", f"{where}/raw.zarr", f"{where}/pred.zarr", "--model", inputs / "model",
        *PREDICT)
    _ok("segment", f"{where}/pred.zarr", f"{where}/seg.zarr", *SEGMENT)
    report = inputs / f"scores-{abs(hash(where))}.json"
    _ok("evaluate", f"{where}/seg.zarr", inputs / "labels.tif", "--no-progress", "--json", report)
    return json.loads(report.read_text())


def _array(where):
    return zarr.open_array(Location(where).zarr_store("r"), mode="r")[...]


def test_convert_predict_segment_evaluate_on_a_bucket_give_the_local_results(bucket, inputs,
                                                                              tmp_path):
    here = _chain(inputs, str(tmp_path))
    there = _chain(inputs, bucket.url + "/run")
    for name in ARRAYS:
        np.testing.assert_array_equal(_array(f"{bucket.url}/run/{name}"),
                                      _array(f"{tmp_path}/{name}"), err_msg=name)
    assert _array(f"{tmp_path}/seg.zarr/0").max() > 1  # a segmentation, not an empty volume
    assert there["mean"] == here["mean"]
    for name in ("raw.zarr", "pred.zarr", "seg.zarr"):
        assert is_complete(f"{bucket.url}/run/{name}"), name
    assert not any(".emtile-lock" in k or "emtile_segment" in k
                   for k in Location(bucket.url).keys())  # locks released, working data gone


def test_train_and_show_read_their_volumes_from_a_bucket(bucket, inputs, tmp_path):
    """The model folder and the figure are local files; the volumes they read may be URLs."""
    _ok("convert", inputs / "stack.tif", bucket / "raw.zarr", "--no-progress")
    _ok("convert", inputs / "labels.tif", bucket / "labels.zarr", "--labels", "--no-progress")
    out = _ok("train", "--raw", bucket / "raw.zarr", "--labels", bucket / "labels.zarr", "--out",
              tmp_path / "run", "--train-slices", "0:2", "--val-slices", "2:3", "--iterations",
              "2", "--base", "4", "--depth", "2", "--tile", "68", "--batch-size", "1",
              "--workers", "0", "--no-progress", "--no-tune-segment")
    assert (tmp_path / "run" / "best" / "model.safetensors").exists(), out
    _ok("show", bucket / "raw.zarr", "--labels", bucket / "labels.zarr", "--output",
        tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000


# predict's blocks of at most 4000 px in 56-px chunks (as in test_faults.py): 12 blocks here
SMALL_BLOCKS = ("import functools, emtile.cli.predict as cli; cli.PredictSettings = "
                "functools.partial(cli.PredictSettings, max_block_px=4000, chunk_size=56)")


def test_a_predict_killed_on_a_bucket_resumes_with_only_the_missing_blocks(bucket, inputs,
                                                                           tmp_path, monkeypatch):
    import functools

    import emtile.cli.predict

    monkeypatch.setattr(emtile.cli.predict, "PredictSettings", functools.partial(
        emtile.cli.predict.PredictSettings, max_block_px=4000, chunk_size=56))
    args = ["--model", inputs / "model", *PREDICT]
    _ok("convert", inputs / "stack.tif", bucket / "raw.zarr", "--no-progress")
    _ok("predict", bucket / "raw.zarr", tmp_path / "ref.zarr", *args)
    out = bucket / "pred.zarr"
    env = dict(os.environ, _EMTILE_FAULTS="predict.block_recorded@2=kill")
    argv = [sys.executable, "-c", SMALL_BLOCKS + "; from emtile.cli.main import main; main()",
            "predict", bucket / "raw.zarr", out, *map(str, args)]
    killed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr  # SIGKILL after the 2nd block's marker
    assert not is_complete(out) and Location(out).exists("zarr.json")
    output = _ok("predict", bucket / "raw.zarr", out, *args)  # the dead run's lock: taken over
    assert "resumed: 2 of 12 blocks" in output, output
    assert is_complete(out)
    for name in ("0", "labels/mask/0"):
        np.testing.assert_array_equal(_array(f"{out}/{name}"),
                                      _array(f"{tmp_path}/ref.zarr/{name}"))


def test_a_refused_command_on_a_bucket_prints_one_line_and_nothing_at_exit(bucket, inputs):
    """A fresh interpreter, so the file systems' exit-time clean-up runs too (gcsfs's own
    closes zarr's sessions on the wrong event loop and prints a traceback unless emtile has
    closed them: ``locations._closed_at_exit``)."""
    _ok("convert", inputs / "stack.tif", bucket / "raw.zarr", "--no-progress")
    r = subprocess.run([sys.executable, "-m", "emtile.cli.main", "evaluate", bucket / "raw.zarr",
                        str(inputs / "labels.tif"), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and "is an image volume" in r.stderr, r.stderr


_HOLD = """
import sys
from emtile import store
with store.output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_into_one_output_on_a_bucket_is_refused(bucket, inputs):
    _ok("convert", inputs / "stack.tif", bucket / "raw.zarr", "--no-progress")
    out = bucket / "pred.zarr"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, out], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = CliRunner().invoke(main, ["predict", bucket / "raw.zarr", out, "--model",
                                      str(inputs / "model"), *PREDICT])
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: output") and f"pid {holder.pid} on" in r.output
    assert not Location(out).exists("zarr.json")  # nothing written by the refused run
    _ok("predict", bucket / "raw.zarr", out, "--model", inputs / "model", *PREDICT)
    assert is_complete(out)  # the lock released: a run goes through


def test_a_local_cluster_reads_and_writes_gs(gcs, inputs, tmp_path):
    """The workers are new processes: they reach the server through the environment they
    inherit (``STORAGE_EMULATOR_HOST``), as workers on GCS read its credentials."""
    _ok("convert", inputs / "stack.tif", gcs / "raw.zarr", "--no-progress")
    _ok("predict", gcs / "raw.zarr", gcs / "pred.zarr", "--model", inputs / "model", *PREDICT)
    _ok("segment", gcs / "pred.zarr", tmp_path / "seg.zarr", *SEGMENT)
    output = _ok("segment", gcs / "pred.zarr", gcs / "seg.zarr", *SEGMENT, "--cluster", "local",
                 "--cluster-workers", "2")
    assert "cluster" in output.lower(), output
    np.testing.assert_array_equal(_array(gcs / "seg.zarr/0"), _array(tmp_path / "seg.zarr/0"))
    assert is_complete(gcs / "seg.zarr")
