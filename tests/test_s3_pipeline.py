"""The commands on object stores (issue 24): ``segment``, ``evaluate`` and ``info`` reading and
writing ``s3://`` OME-Zarr on a real S3-compatible server on 127.0.0.1 (moto's server mode,
``tests/s3server.py``) give what they give on local disk; a Dask LocalCluster reads and writes
S3; a store served over HTTP by ``http.server`` is read by ``info`` and ``evaluate``. (A second
run into one output is refused: ``test_objstore_runs.py``, on S3 and GCS.)
"""

import functools
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from scipy import ndimage

from emtile.cli.main import main
from emtile.evaluation import evaluate
from emtile.locations import Location
from emtile.segmenter import segment
from emtile.store import create_image, is_complete, mark_complete

from s3server import s3, s3_server  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

OPTS = dict(method="ws", min_size=20, progress=False, block_size=(1, 40, 50))  # 8 blocks


@pytest.fixture(scope="module")
def volumes(isbi_labels):
    """A blurred, noisy ISBI truth as uint8 probabilities, and the binary labels."""
    rng = np.random.default_rng(0)
    truth = (isbi_labels[:2, :80, :100] > 0).astype(np.uint8)
    p = ndimage.gaussian_filter(truth.astype(np.float32), (0, 2, 2))
    p = np.round(np.clip(p + rng.normal(0, 0.1, p.shape), 0, 1) * 255).astype(np.uint8)
    return p, truth


def _write(where, values, kind):
    group = create_image(where, values.shape, values.dtype, kind=kind, voxel_size=(50, 4, 4))
    group["0"][...] = values
    mark_complete(group)
    return where


def _labels(where):
    return np.asarray(zarr.open_group(Location(where).zarr_store("r"), mode="r")["0"][...])


@pytest.fixture(scope="module")
def local(volumes, tmp_path_factory):
    """The local run: prediction, labels and segmentation on disk."""
    d = tmp_path_factory.mktemp("local")
    p, truth = volumes
    pred = _write(str(d / "pred.zarr"), p, "probabilities")
    _write(str(d / "labels.zarr"), truth, "labels")
    result = segment(pred, str(d / "seg.zarr"), **OPTS)
    assert result.objects > 10 and result.blocks == 8
    return d


def _inputs_on(s3, volumes):
    p, truth = volumes
    return (_write(s3 / "in/pred.zarr", p, "probabilities"),
            _write(s3 / "in/labels.zarr", truth, "labels"))


def test_segment_evaluate_info_on_s3_give_the_local_results(s3, volumes, local):
    pred, lab = _inputs_on(s3, volumes)
    out = s3 / "out/seg.zarr"
    result = segment(pred, out, **OPTS)
    assert result.blocks == 8 and is_complete(out)
    np.testing.assert_array_equal(_labels(out), _labels(str(local / "seg.zarr")))
    keys = Location(out).keys()
    assert keys and not any(k.startswith("emtile_segment") for k in keys)  # working group gone
    assert not any(".emtile-lock" in k for k in Location(s3.url).keys())  # the lock released
    attrs = zarr.open_group(Location(out).zarr_store("r"), mode="r").attrs.asdict()
    assert attrs["ome"]["image-label"]["source"]["image"] == "../../in/pred.zarr"

    # evaluate reads S3 as it reads disk (the same scores, the store's kind recognised)
    here = evaluate(str(local / "seg.zarr"), str(local / "labels.zarr"), progress=False)
    there = evaluate(out, lab, progress=False)
    assert there["mean"] == here["mean"] and there["settings"]["label_image"] is True

    # info, through the CLI, with the endpoint given as --storage-option instead of the env
    endpoint = os.environ.pop("AWS_ENDPOINT_URL")
    try:
        r = CliRunner().invoke(main, ["info", out, "--json", "--storage-option",
                                      f"endpoint_url={endpoint}"])
    finally:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["complete"] is True and d["kind"] == "labels" and d["shape"] == [2, 80, 100]
    assert d["objects"] == result.objects and d["bytes_on_disk"] > 0
    assert d["voxel_size"] == {"z": 50.0, "y": 4.0, "x": 4.0}

    # the output rule holds on S3: an output inside the input's store is refused before work
    r = CliRunner().invoke(main, ["segment", pred, pred + "/seg", "--no-progress"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "lies inside the input" in r.output


def test_a_segment_killed_on_s3_resumes_with_only_the_missing_blocks(s3, volumes, local):
    pred, _ = _inputs_on(s3, volumes)
    out = s3 / "out/seg.zarr"
    env = dict(os.environ, _EMTILE_FAULTS="segment.fragments.recorded@3=kill",
               OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "emtile.cli.main", "segment", pred, out, "--no-progress",
            "--method", "ws", "--min-size", "20", "--block-size", "1,40,50"]
    killed = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr  # SIGKILL after the 3rd fragment block
    assert not is_complete(out) and Location(out).exists("zarr.json")
    # the killed run's lock is left behind; its holder is dead on this host: taken over
    result = segment(pred, out, **OPTS)
    labels_done, fragments_done, write_done = result.blocks_resumed
    assert labels_done == 8 and fragments_done == 3 and write_done == 0
    np.testing.assert_array_equal(_labels(out), _labels(str(local / "seg.zarr")))
    assert is_complete(out) and not any(k.startswith("emtile_segment")
                                        for k in Location(out).keys())


def test_segment_on_a_local_cluster_reads_and_writes_s3(s3, volumes, local, monkeypatch):
    """The workers reach the server only through the job's storage options: the endpoint is
    taken out of the environment before the cluster starts."""
    import s3fs

    from emtile.distributed import start_cluster

    pred, _ = _inputs_on(s3, volumes)
    out = s3 / "out/seg.zarr"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3fs.S3FileSystem.clear_instance_cache()
    options = {"endpoint_url": s3.endpoint}
    with start_cluster("local", workers=2) as (client, _):
        result = segment(pred, out, client=client, storage_options=options, **OPTS)
    assert result.blocks == 8 and result.cluster
    np.testing.assert_array_equal(_labels(Location(out, options)),
                                  _labels(str(local / "seg.zarr")))
    assert is_complete(Location(out, options))


@pytest.fixture
def served(local):
    """The local run's folder served read-only over HTTP on 127.0.0.1."""
    handler = functools.partial(_QuietHandler, directory=str(local))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_info_and_evaluate_read_a_store_over_http(served, local, tmp_path):
    r = CliRunner().invoke(main, ["info", f"{served}/seg.zarr", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["complete"] is True and d["kind"] == "labels" and d["shape"] == [2, 80, 100]
    report = tmp_path / "scores.json"
    r = CliRunner().invoke(main, ["evaluate", f"{served}/seg.zarr", f"{served}/labels.zarr",
                                  "--no-progress", "--json", str(report)])
    assert r.exit_code == 0, r.output
    here = evaluate(str(local / "seg.zarr"), str(local / "labels.zarr"), progress=False)
    assert json.loads(report.read_text())["mean"] == pytest.approx(here["mean"])
    # http(s) is read only: an output there is refused before any work, in one line
    r = CliRunner().invoke(main, ["segment", f"{served}/pred.zarr", f"{served}/again.zarr",
                                  "--no-progress"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "read only" in r.output


def test_convert_to_and_from_s3_gives_the_local_store(s3, volumes, tmp_path):
    """``emtile convert stack.tif s3://...`` writes the arrays (every level, sharded as on disk)
    and the voxel size that a local convert writes; converting that S3 store back to disk keeps
    the voxel size the store records."""
    import tifffile

    p, _ = volumes
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, p)
    args = ["--voxel-size", "50,4,4", "--levels", "2", "--no-progress"]
    r = CliRunner().invoke(main, ["convert", str(tif), str(tmp_path / "vol.zarr"), *args])
    assert r.exit_code == 0, r.output
    out = s3 / "raw/vol.zarr"
    r = CliRunner().invoke(main, ["convert", str(tif), out, *args])
    assert r.exit_code == 0, r.output
    assert is_complete(out)
    here = zarr.open_group(str(tmp_path / "vol.zarr"), mode="r")
    there = zarr.open_group(Location(out).zarr_store("r"), mode="r")
    for k in ("0", "1"):
        np.testing.assert_array_equal(there[k][...], here[k][...])
        assert there[k].shards == here[k].shards
    back = tmp_path / "back.zarr"
    r = CliRunner().invoke(main, ["convert", out, str(back), "--no-progress"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(zarr.open_group(str(back), mode="r")["0"][...], p)
    r = CliRunner().invoke(main, ["info", str(back), "--json"])
    assert json.loads(r.output)["voxel_size"] == {"z": 50.0, "y": 4.0, "x": 4.0}
