"""``emtile segment`` on real Dask schedulers and workers (127.0.0.1): the same labels as in one
process, whatever the blocks, the tasks, a worker killed mid-pass or a driver killed and resumed
on the other side; the ``--cluster`` options through the CLI.

One LocalCluster of 2 workers serves the module (the CLI test starts its own, as a user would).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from scipy import ndimage

from emtile.cli.main import main
from emtile.distributed import start_cluster
from emtile.segmenter import segment
from emtile.store import create_image, is_complete, mark_complete

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

OPTS = dict(method="ws", min_size=20, progress=False)
BLOCK = (1, 40, 50)  # 18 blocks over (2, 120, 150)


def write_pred(path, p):
    g = create_image(path, p.shape, p.dtype, kind="probabilities")
    g["0"][...] = p
    mark_complete(g)
    return str(path)


def labels(path, level="0"):
    return np.asarray(zarr.open_group(str(path), mode="r")[level][...])


def chunk_files(store):
    """Every chunk file of the store: path -> bytes (zarr writes chunks through ``*.partial``)."""
    store = Path(store)
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "zarr.json" and not p.name.endswith(".partial")}


def assert_same_output(a, b):
    assert labels(a).dtype == labels(b).dtype
    np.testing.assert_array_equal(labels(a), labels(b))
    fa, fb = chunk_files(a), chunk_files(b)
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)


@pytest.fixture(scope="module")
def data(tmp_path_factory, isbi_labels):
    """A blurred, noisy ISBI truth as probabilities, its single-block and 18-block local runs."""
    d = tmp_path_factory.mktemp("segment-cluster")
    rng = np.random.default_rng(0)
    p = ndimage.gaussian_filter((isbi_labels[:2, :120, :150] > 0).astype(np.float32), (0, 2, 2))
    p = np.round(np.clip(p + rng.normal(0, 0.1, p.shape), 0, 1) * 255).astype(np.uint8)
    write_pred(d / "pred.zarr", p)
    r = segment(d / "pred.zarr", d / "whole.zarr", block_size=p.shape, **OPTS)
    assert r.objects > 20
    r = segment(d / "pred.zarr", d / "local.zarr", block_size=BLOCK, **OPTS)
    assert r.blocks == 18
    return d


@pytest.fixture(scope="module")
def cluster():
    with start_cluster("local", workers=2) as (client, _):
        yield client


@pytest.mark.parametrize("block, per_task", [(BLOCK, 1), ((2, 47, 101), 3)])
def test_cluster_gives_the_labels_of_one_process(data, cluster, tmp_path, block, per_task):
    """Blocks in any order, on either worker, several per task: the single-block labels (and
    for the same blocks, the local run's chunk files byte for byte)."""
    out = tmp_path / "c.zarr"
    r = segment(data / "pred.zarr", out, block_size=block, client=cluster,
                blocks_per_task=per_task, **OPTS)
    assert r.blocks > 5 and r.blocks_resumed == (0, 0, 0) and is_complete(out)
    assert r.cluster == "a Dask client" and "on a Dask client" in str(r)
    np.testing.assert_array_equal(labels(out), labels(data / "whole.zarr"))
    if block == BLOCK:
        assert_same_output(data / "local.zarr", out)


def test_by_default_small_blocks_go_several_to_a_task_and_every_thread_gets_four(data, cluster,
                                                                                   tmp_path):
    """``blocks_per_task`` not given: the block passes group blocks (segment asks for 2^24
    voxels a task, far more than these 18 blocks of 2,000), cut down so that each of the 2
    workers' threads still gets 4 tasks: 2 blocks a task, 9 tasks a pass (the graph pass keeps
    one row a task); the labels are the single block's."""
    from distributed import get_task_stream

    out = tmp_path / "c.zarr"
    with get_task_stream(cluster) as ts:
        r = segment(data / "pred.zarr", out, block_size=BLOCK, client=cluster, **OPTS)
    assert r.blocks == 18
    np.testing.assert_array_equal(labels(out), labels(data / "whole.zarr"))
    keys = [str(t["key"]) for t in ts.data]
    tasks = {k: sum(1 for key in keys if f"segment {i}/4 {k}-" in key)
             for i, k in enumerate(("labels", "fragments", "graph", "write"), 1)}
    assert tasks == {"labels": 9, "fragments": 9, "graph": 2, "write": 9}, tasks


def test_cli_cluster_local(data, tmp_path):
    """``--cluster local --cluster-workers 2``, with a pyramid: the bytes of a local CLI run."""
    args = ["segment", data / "pred.zarr", tmp_path / "cli.zarr", "--no-progress",
            "--min-size", "20", "--block-size", "1,40,50", "--levels", "2"]
    result = CliRunner().invoke(main, [str(a) for a in args]
                                + ["--cluster", "local", "--cluster-workers", "2"])
    assert result.exit_code == 0, result.output
    assert "2 levels" in result.output and "on local cluster, 2 workers" in result.output
    here = args[:2] + [tmp_path / "here.zarr"] + args[3:]
    result = CliRunner().invoke(main, [str(a) for a in here])
    assert result.exit_code == 0, result.output
    assert "on local cluster" not in result.output
    assert_same_output(tmp_path / "here.zarr", tmp_path / "cli.zarr")
    np.testing.assert_array_equal(labels(tmp_path / "cli.zarr"), labels(data / "local.zarr"))
    np.testing.assert_array_equal(labels(tmp_path / "cli.zarr", "1"),
                                  labels(data / "local.zarr")[:, ::2, ::2])


def _plan_faults(text):
    from emtile import _faults

    _faults.plan(text)


def test_a_worker_killed_mid_pass_does_not_change_the_labels(data, cluster, tmp_path):
    """One worker SIGKILLs itself after writing the fragments of its 2nd block, before reporting
    it: Dask runs that task again elsewhere, the nanny restarts the worker, and the labels are
    the local run's."""
    before = cluster.run(os.getpid)
    victim = sorted(before)[0]
    cluster.run(_plan_faults, "segment.fragments.written@2=kill", workers=[victim])
    out = tmp_path / "k.zarr"
    try:
        r = segment(data / "pred.zarr", out, block_size=BLOCK, client=cluster, **OPTS)
        cluster.wait_for_workers(2, timeout=60)
    finally:
        cluster.run(_plan_faults, "")
    assert set(before.values()) - set(cluster.run(os.getpid).values())  # the victim was replaced
    assert r.blocks_resumed == (0, 0, 0) and is_complete(out)
    assert_same_output(data / "local.zarr", out)


RUN = ("import sys, json; from emtile.segmenter import segment; "
       "r = segment(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3])); "
       "print(json.dumps(r.blocks_resumed))")


def _driver(data, out, fault, **kw):
    """``segment`` in a process of its own, SIGKILLed at the fault point ``fault``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("_EMTILE")}
    env["_EMTILE_FAULTS"] = fault
    kw = dict(OPTS, block_size=BLOCK, **kw)
    return subprocess.run([sys.executable, "-c", RUN, str(data / "pred.zarr"), str(out),
                           json.dumps(kw)], env=env, capture_output=True, text=True, timeout=300)


def _tasks_on_scheduler(dask_scheduler):
    return len(dask_scheduler.tasks)


def _wait_for_idle(client, timeout=60.0):
    """Until the scheduler holds no task: a killed driver's tasks that were running go on to
    the end (the scheduler forgets them then), the others are released with its client."""
    import time

    end = time.monotonic() + timeout
    while client.run_on_scheduler(_tasks_on_scheduler):
        assert time.monotonic() < end, "the killed driver's tasks did not finish"
        time.sleep(0.05)


def test_killed_driver_resumes_locally_and_killed_local_run_resumes_on_a_cluster(data, cluster,
                                                                                 tmp_path):
    # a driver on the cluster killed after recording 3 blocks of pass 2, resumed in this
    # process once its tasks in flight have finished (one that wrote after the resumed run had
    # removed its working arrays left a stray chunk file there: noted in the README)
    out = tmp_path / "a.zarr"
    killed = _driver(data, out, "segment.fragments.recorded@3=kill",
                     cluster=cluster.scheduler.address)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert out.exists() and not is_complete(out)
    _wait_for_idle(cluster)
    r = segment(data / "pred.zarr", out, block_size=BLOCK, **OPTS)
    assert r.blocks_resumed == (18, 3, 0)
    assert r.cluster == ""
    assert_same_output(data / "local.zarr", out)

    # a driver in its own process killed after recording 2 blocks of pass 3, resumed on the
    # cluster
    out = tmp_path / "b.zarr"
    killed = _driver(data, out, "segment.write.recorded@2=kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    r = segment(data / "pred.zarr", out, block_size=BLOCK, client=cluster, **OPTS)
    assert r.blocks_resumed == (18, 18, 2)
    assert_same_output(data / "local.zarr", out)


@pytest.mark.parametrize("args, message", [
    (["--levels", "0"], "Invalid value for '--levels'"),
    (["--levels", "3", "--block-size", "1,30,30"], "Error: --levels 3 needs blocks whose size in y "
                                                   "and x is divisible by 4"),
])
def test_bad_level_options_are_one_line(data, tmp_path, args, message):
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(main, ["segment", str(data / "pred.zarr"), str(out),
                                       "--no-progress", *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()
    if message.startswith("Error:"):  # ours, not click's usage text
        assert len(result.output.strip().splitlines()) == 1
