"""``emtile predict --cluster``: the block plan on real Dask schedulers and workers (127.0.0.1).

Every run here is compared byte for byte (array bytes and chunk files) with a local run of the
same model, volume and options at the same torch thread count (1).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from emtile import EmtileError
from emtile.cli.main import main
from emtile.distributed import start_cluster
from emtile.predictor import predict
from emtile.store import create_image, is_complete, mark_complete
from emtile.unet import UNet, save_model

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

OPTS = dict(tile=68, threshold=0.4, dtype="uint8", chunk_size=56, max_block_px=4000,
            progress=False, threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    torch.manual_seed(0)
    save_model(UNet(base=4, depth=2), d / "model")
    vol = np.random.default_rng(1).integers(0, 256, (4, 131, 97)).astype(np.uint8)
    src = create_image(d / "in.zarr", vol.shape, np.uint8, chunks=(1, 64, 64))
    src["0"][:] = vol
    mark_complete(src)
    r = predict(d / "model", d / "in.zarr", d / "local.zarr", num_workers=0, **OPTS)
    assert r.blocks >= 8 and is_complete(d / "local.zarr")
    return d


@pytest.fixture(scope="module")
def cluster():
    with start_cluster("local", workers=2) as (client, info):
        yield client


def chunk_files(store):
    """Every file of the store but the metadata documents: path -> bytes (zarr writes a chunk
    through a temporary ``*.partial`` file; a process killed mid-write leaves one behind)."""
    store = Path(store)
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "zarr.json" and not p.name.endswith(".partial")}


def assert_same_output(a, b):
    for name in ("0", "labels/mask/0"):
        x, y = zarr.open_array(Path(a) / name, mode="r"), zarr.open_array(Path(b) / name, mode="r")
        assert x.dtype == y.dtype and x[:].tobytes() == y[:].tobytes(), name
    fa, fb = chunk_files(a), chunk_files(b)
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)


@pytest.mark.parametrize("per_task", [1, 3])
def test_cluster_run_is_byte_identical_to_a_local_run(data, cluster, tmp_path, per_task):
    out = tmp_path / "cluster.zarr"
    r = predict(data / "model", data / "in.zarr", out, client=cluster, blocks_per_task=per_task,
                **OPTS)
    assert r.blocks_resumed == 0 and r.threads == 1 and is_complete(out)
    assert zarr.open_array(out / "0", mode="r").shards is not None  # the default: sharded
    assert_same_output(data / "local.zarr", out)


def test_a_sharded_cluster_run_is_byte_identical_to_a_local_one(data, cluster, tmp_path):
    """Blocks of 2x2 chunks, each writing its own shard of every level on another worker: the
    same shard files as a local run, the same arrays as an unsharded one."""
    opts = dict(OPTS, chunk_size=28, levels=2)
    local = predict(data / "model", data / "in.zarr", tmp_path / "local.zarr", num_workers=0,
                    **opts)
    r = predict(data / "model", data / "in.zarr", tmp_path / "cluster.zarr", client=cluster,
                blocks_per_task=2, **opts)
    assert r.blocks == local.blocks >= 8 and is_complete(tmp_path / "cluster.zarr")
    a = zarr.open_array(tmp_path / "cluster.zarr" / "0", mode="r")
    assert a.chunks == (1, 28, 28) and a.shards == (1, 56, 56)
    assert_same_output(tmp_path / "local.zarr", tmp_path / "cluster.zarr")
    predict(data / "model", data / "in.zarr", tmp_path / "plain.zarr", num_workers=0,
            shards="none", **opts)
    for name in ("0", "1", "labels/mask/0", "labels/mask/1"):
        x = zarr.open_array(tmp_path / "plain.zarr" / name, mode="r")
        y = zarr.open_array(tmp_path / "cluster.zarr" / name, mode="r")
        assert x.shards is None and x[:].tobytes() == y[:].tobytes(), name


def test_cli_cluster_local(data, tmp_path):
    out = tmp_path / "cli.zarr"
    args = ["predict", "--model", data / "model", "--tile", "68", "--threshold", "0.4",
            "--no-progress", "--threads", "1", "--cluster", "local", "--cluster-workers", "2",
            data / "in.zarr", out]
    # the CLI's chunks are its defaults, so compare with a local CLI run of the same options
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "on local cluster, 2 workers" in result.output
    local = tmp_path / "here.zarr"
    here = [a for a in args if a not in ("--cluster", "local", "--cluster-workers", "2")]
    here[-1] = local
    assert CliRunner().invoke(main, [str(a) for a in here]).exit_code == 0
    assert_same_output(local, out)


def test_scheduler_and_workers_started_by_hand(data, tmp_path):
    """``dask scheduler`` and two ``dask worker`` processes, joined by address and by file."""
    sched_file = tmp_path / "scheduler.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("_EMTILE")}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                               "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sched_file)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(300):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.1)
        for _ in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                 str(sched_file), "--nthreads", "1", "--no-dashboard", "--no-nanny"], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        import json

        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=60)
        r = predict(data / "model", data / "in.zarr", tmp_path / "tcp.zarr", cluster=address,
                    **OPTS)
        assert r.cluster == "address cluster, 2 workers"
        assert_same_output(data / "local.zarr", tmp_path / "tcp.zarr")
        predict(data / "model", data / "in.zarr", tmp_path / "file.zarr",
                scheduler_file=sched_file, **OPTS)
        assert_same_output(data / "local.zarr", tmp_path / "file.zarr")
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def _plan_faults(text):
    from emtile import _faults

    _faults.plan(text)


def test_a_worker_killed_mid_block_does_not_change_the_bytes(data, tmp_path, cluster):
    """One worker is SIGKILLed after writing its 2nd block's chunks and before reporting it: Dask
    runs that task again elsewhere, the nanny restarts the worker, every block is recorded, and
    the bytes are the same."""
    client = cluster
    before = client.run(os.getpid)
    victim = sorted(before)[0]
    client.run(_plan_faults, "predict.block_written@2=kill", workers=[victim])
    out = tmp_path / "p.zarr"
    r = predict(data / "model", data / "in.zarr", out, client=client, **OPTS)
    client.wait_for_workers(2, timeout=60)
    after = client.run(os.getpid)
    client.run(_plan_faults, "")
    assert set(before.values()) - set(after.values())  # the victim died and was replaced
    assert r.blocks_resumed == 0 and is_complete(out)
    assert zarr.open_group(out, mode="r")["emtile_blocks"][:].all()
    assert_same_output(data / "local.zarr", out)


RUN = textwrap.dedent("""
    import sys, json
    from emtile.predictor import predict
    kw = json.loads(sys.argv[4])
    r = predict(sys.argv[1], sys.argv[2], sys.argv[3], **kw)
    print("resumed", r.blocks_resumed, "of", r.blocks)
""")


def _run(data, out, crash=None, **kw):
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("_EMTILE")}
    if crash:
        env["_EMTILE_FAULTS"] = f"predict.block_recorded@{crash}=kill"
    return subprocess.run([sys.executable, "-c", RUN, str(data / "model"), str(data / "in.zarr"),
                           str(out), json.dumps({**OPTS, **kw})], env=env, capture_output=True,
                          text=True, timeout=300)


def test_killed_client_resumes_locally_and_killed_local_run_resumes_on_a_cluster(data, tmp_path,
                                                                                cluster):
    address = cluster.scheduler.address
    # a client killed after recording 3 blocks (its tasks may still finish), resumed in-process
    out = tmp_path / "a.zarr"
    killed = _run(data, out, crash="3", cluster=address)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not is_complete(out)
    n = int(zarr.open_group(out, mode="r")["emtile_blocks"][:].sum())
    assert n >= 1  # on a cluster records are flushed every 0.5 s, the first at once
    again = _run(data, out, num_workers=0)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[1] == str(n)  # only the missing blocks were computed
    assert_same_output(data / "local.zarr", out)

    # a local run killed after 2 blocks, resumed on the cluster
    out = tmp_path / "b.zarr"
    killed = _run(data, out, crash="2", num_workers=0)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = _run(data, out, cluster=address)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[1] == "2"
    assert_same_output(data / "local.zarr", out)


def test_a_damaged_input_chunk_is_named_and_not_retried(data, tmp_path, cluster):
    """A damaged input chunk fails the same way on every try: the run stops at once with one line
    naming the block, its voxels and the chunk, exit code 1, and the output stays incomplete.
    (A task that raises anything else is retried first: tests/test_distributed.py.)"""
    import shutil

    src = tmp_path / "in.zarr"
    shutil.copytree(data / "in.zarr", src)
    chunk = src / "0" / "c" / "2" / "1" / "0"
    chunk.write_bytes(b"\x00garbage" * 8)
    out = tmp_path / "p.zarr"
    from emtile.normalize import Scaling

    # a normalisation given as it is: the driver reads nothing before the blocks run
    with pytest.raises(EmtileError, match=r"^block \d+ \(z 2:3, y \d+:\d+, x \d+:\d+\) failed: "
                                          r"damaged input .*chunk '0/c/2/1/0'.*run the same "
                                          r"command again to resume$"):
        predict(data / "model", src, out, client=cluster, normalize=Scaling("dtype"), **OPTS)
    assert not is_complete(out)
    result = CliRunner().invoke(main, ["predict", "--model", str(data / "model"), "--tile", "68",
                                       "--threads", "1", "--no-progress", "--cluster",
                                       cluster.scheduler.address, str(src),
                                       str(tmp_path / "q.zarr")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    # the model's normalisation samples the input first (a small input: all of it), and finds
    # the damaged chunk before any block is sent
    assert "damaged input" in result.output and "chunk '0/c/2/1/0'" in result.output
    assert len(result.output.splitlines()) == 1 and not (tmp_path / "q.zarr").exists()


def test_bad_threads_is_one_line(data, tmp_path):
    """(The runner's options are checked once, for every command: tests/test_blockwise.py.)"""
    result = CliRunner().invoke(main, ["predict", "--model", str(data / "model"), "--no-progress",
                                       "--threads", "0", str(data / "in.zarr"),
                                       str(tmp_path / "p.zarr")])
    assert result.exit_code != 0 and "Invalid value for '--threads'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "p.zarr").exists()


def test_a_cluster_needs_paths(data, tmp_path):
    net = UNet(base=2, depth=2)
    with pytest.raises(EmtileError, match="a cluster run needs the model as a model folder"):
        predict(net, data / "in.zarr", tmp_path / "p.zarr", cluster="local")
    with pytest.raises(EmtileError, match="a cluster run needs the input as a path"):
        predict(data / "model", np.zeros((2, 40, 40), np.uint8), tmp_path / "p.zarr",
                cluster="local")
