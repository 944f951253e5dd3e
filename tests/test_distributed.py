"""emtile.distributed: the block driver, locally and on real Dask workers on 127.0.0.1."""

import os
import sys

import cloudpickle
import numpy as np
import pytest

from emtile import EmtileError
from emtile.distributed import cluster_spec, map_blocks, start_cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


class Result:
    def __init__(self, block, pid, voxels=10):
        self.block, self.pid, self.voxels = block, pid, voxels


def square_blocks(job, ids):
    return [Result(i * i + job, os.getpid()) for i in ids]


def failing_blocks(job, ids):
    if job in ids:
        raise ValueError(f"cannot do block {job}")
    return [Result(i, os.getpid()) for i in ids]


@pytest.fixture(scope="module")
def cluster():
    with start_cluster("local", workers=2) as (client, info):
        yield client, info


def test_local_runs_in_this_process_in_order():
    seen = []
    n = map_blocks(square_blocks, 1, range(7), blocks_per_task=3, progress=False,
                   on_result=lambda i, r: seen.append((i, r.block, r.pid)))
    assert n == 7
    assert seen == [(i, i * i + 1, os.getpid()) for i in range(7)]


def test_local_workers_keep_mallocs_adaptive_threshold(cluster):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which turns off glibc's adaptive mmap threshold
    (every large array then faults in afresh: 10x the page faults of a segment block); emtile's
    local workers go without it, and keep Dask's other settings."""
    import dask

    client, _ = cluster
    env = client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_",
                                                              "OMP_NUM_THREADS")})
    assert len(env) == 2
    omp = os.environ.get("OMP_NUM_THREADS", "1")  # the nanny's default, unless set here
    assert all(e == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": omp} for e in env.values())
    # the driver's own config is left as it was
    assert "MALLOC_TRIM_THRESHOLD_" in dask.config.get("distributed.nanny.pre-spawn-environ")


def threads_seen(job, ids):
    """Records the thread of each group; the first group waits for a second to start, so the
    test fails unless two groups really run at once."""
    import threading

    job["threads"].add(threading.get_ident())
    if ids[0] == 0 and not job["second"].wait(10):
        raise AssertionError("no second group ran beside the first")
    job["second"].set()
    return [Result(i * i, os.getpid()) for i in ids]


def test_threads_run_groups_at_once_in_this_process():
    import threading

    job = {"threads": set(), "second": threading.Event()}
    seen = {}
    n = map_blocks(threads_seen, job, iter(range(9)), blocks_per_task=2, progress=False,
                   threads=2, on_result=lambda i, r: seen.setdefault(i, (r.block, r.pid)))
    assert n == 9 and seen == {i: (i * i, os.getpid()) for i in range(9)}
    assert len(job["threads"]) == 2 and threading.get_ident() not in job["threads"]


def test_a_failing_group_in_a_thread_stops_the_run():
    with pytest.raises(ValueError, match="cannot do block 5"):
        map_blocks(failing_blocks, 5, range(20), progress=False, threads=2)


@pytest.mark.parametrize("per_task", [1, 4])
def test_cluster_gives_every_block_once(cluster, per_task):
    client, info = cluster
    assert info.workers == 2 and info.threads == 2
    seen = {}
    n = map_blocks(square_blocks, 2, iter(range(50)), client=client, blocks_per_task=per_task,
                   progress=False, on_result=lambda i, r: seen.setdefault(i, []).append(r))
    assert n == 50 and sorted(seen) == list(range(50))
    assert all(len(v) == 1 and v[0].block == i * i + 2 for i, v in seen.items())
    assert {v[0].pid for v in seen.values()} - {os.getpid()}  # ran in the workers


def test_a_failing_task_is_retried_then_named(cluster):
    client, _ = cluster
    with pytest.raises(EmtileError, match=r"^block 13 \(z 13\) failed after 2 tries: "
                                          r"ValueError: cannot do block 13; done blocks are kept"):
        map_blocks(failing_blocks, 13, range(20), client=client, retries=1, progress=False,
                   describe=lambda i: f"z {i}")


def test_spec_of_each_cluster_kind():
    local = cluster_spec("local", workers=3)
    assert local["kwargs"]["n_workers"] == 3 and local["kwargs"]["threads_per_worker"] == 1
    assert cluster_spec("tcp://10.0.0.5:8786")["kwargs"] == {"address": "tcp://10.0.0.5:8786"}
    cuda = cluster_spec("cuda", workers=2)
    assert cuda["factory"] == "dask_cuda:LocalCUDACluster" and cuda["resources"] == {"GPU": 1}
    assert cuda["kwargs"]["resources"] == {"GPU": 1} and cuda["kwargs"]["n_workers"] == 2
    assert cluster_spec("slurm", workers=4)["scale"] == 4
    assert cluster_spec(None, scheduler_file="s.json")["kwargs"] == {"scheduler_file": "s.json"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(cluster="lokal"), r"cluster='lokal' is not a cluster: choose local, slurm, cuda"),
    (dict(cluster="local", workers=0), r"cluster_workers=0 must be a positive integer"),
    (dict(cluster="local", scheduler_file="s.json"), r"give either cluster= or scheduler_file="),
])
def test_bad_cluster_options(kwargs, match):
    with pytest.raises(EmtileError, match=match):
        cluster_spec(**kwargs)


def test_bad_map_options():
    with pytest.raises(EmtileError, match=r"blocks_per_task=0 must be a positive integer"):
        map_blocks(square_blocks, 0, range(3), blocks_per_task=0, progress=False)


def test_unreachable_scheduler_is_one_line():
    with pytest.raises(EmtileError, match=r"could not reach the Dask scheduler at "
                                          r"tcp://127.0.0.1:9: waited 2 s \(cluster_timeout=2\)"):
        with start_cluster("tcp://127.0.0.1:9", cluster_timeout=2):
            pass


def voxels_of_blocks(plan, ids):
    """A cheap stand-in for prediction: the voxel count of the task's first block, from the
    lazy plan (one small int per block: results cost nothing to send back)."""
    return [int(np.prod(np.subtract(*plan.box(ids[0])[::-1])))] * len(ids)


def test_a_million_block_plan_runs_through_a_bounded_window(cluster):
    """The plan (10^6 blocks over a (10^6, 388, 388) volume that exists only as arithmetic) is
    never materialised: ids are pulled lazily, and at most the window's tasks are in flight."""
    from emtile.geometry import ShapeMap, block_plan, tile_grid

    client, _ = cluster
    grid = tile_grid((10**6, 388, 388), ShapeMap(4), 572)
    plan = block_plan(grid, (1, 384, 384), max_block_px=388 * 388)
    assert len(plan) == 10**6
    pulled, most = [0], [0]

    def ids():
        for i in range(len(plan)):
            pulled[0] += 1
            yield i

    delivered = [0]

    def on_result(i, r):
        delivered[0] += 1
        most[0] = max(most[0], pulled[0] - delivered[0])

    window, per_task = 4, 20000
    n = map_blocks(voxels_of_blocks, plan, ids(), client=client, blocks_per_task=per_task,
                   window=window, progress=False, on_result=on_result)
    assert n == 10**6 and delivered[0] == 10**6
    assert most[0] < window * per_task  # never more than the window's blocks handed out
    assert len(client.futures) <= 1  # released as they were delivered


SLURM_CONFIG = {  # what a user writes in ~/.config/dask/jobqueue.yaml (see the README)
    "jobqueue.slurm.cores": 8, "jobqueue.slurm.memory": "64GB", "jobqueue.slurm.processes": 1,
    "jobqueue.slurm.walltime": "04:00:00", "jobqueue.slurm.queue": "gpu",
    "jobqueue.slurm.job-extra-directives": ["--gres=gpu:1"],
    "jobqueue.slurm.worker-extra-args": ["--lifetime", "230m", "--lifetime-stagger", "10m",
                                         "--resources", "GPU=1"],
}


def test_slurm_cluster_is_built_from_the_users_dask_config():
    """No SLURM here: what is tested is the job script dask-jobqueue builds from the config
    (nothing is submitted until start_cluster scales it)."""
    pytest.importorskip("dask_jobqueue")
    import dask

    from emtile.distributed import create_cluster

    with dask.config.set(SLURM_CONFIG), create_cluster("slurm") as cluster:
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH -p gpu" in script
    assert "#SBATCH -t 04:00:00" in script and "#SBATCH --cpus-per-task=8" in script
    assert "--lifetime 230m --lifetime-stagger 10m" in script and "--resources GPU=1" in script
    assert "--nthreads 8" in script  # one worker process per job, with the job's cores


def test_gpu_tasks_ask_for_the_gpu_resource_and_never_share_one():
    """Workers that declare GPU=1 (dask-cuda's, or SLURM workers started with --resources
    GPU=1): tasks asking for {"GPU": 1} run one at a time per worker, though each worker has
    two threads. A real LocalCluster stands in for the GPU machine."""
    import time

    from distributed import Client, LocalCluster

    from emtile.distributed import gpu_resources

    with LocalCluster(n_workers=2, threads_per_worker=2, resources={"GPU": 1},
                      dashboard_address=":0", processes=True) as lc, Client(lc) as client:
        assert gpu_resources(client) == {"GPU": 1}
        spans = []
        map_blocks(sleepy_blocks, 0.3, range(4), client=client, resources=gpu_resources(client),
                   progress=False, on_result=lambda i, r: spans.append(r))
    for worker in {w for w, _, _ in spans}:
        mine = sorted((a, b) for w, a, b in spans if w == worker)
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(mine, mine[1:]))  # never overlapping


def sleepy_blocks(seconds, ids):
    import time

    from distributed import get_worker

    t0 = time.time()
    time.sleep(seconds)
    return [(get_worker().address, t0, time.time()) for _ in ids]


# --------------------------------------------------------------------------- joining a cluster


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def command_inputs(tmp_path_factory):
    """A model folder and a volume for predict, a probability map for segment."""
    from emtile.store import create_image, mark_complete
    from emtile.unet import UNet, save_model

    d = tmp_path_factory.mktemp("join")
    save_model(UNet(base=2, depth=2), d / "model")
    rng = np.random.default_rng(0)
    for name, kind in (("in.zarr", "image"), ("pred.zarr", "probabilities")):
        g = create_image(d / name, (2, 40, 40), np.uint8, kind=kind)
        g["0"][...] = rng.integers(0, 256, (2, 40, 40), dtype=np.uint8)  # no intensity warning
        mark_complete(g)
    return d


@pytest.mark.parametrize("command", ["predict", "segment"])
@pytest.mark.parametrize("case", ["missing", "nobody listens"])
def test_a_scheduler_that_never_comes_is_one_line_in_time(command_inputs, tmp_path, command,
                                                          case):
    """--scheduler-file naming a file nobody writes, or an address nobody listens on: one line
    naming the file (and address) and what was waited for, within --cluster-timeout."""
    import json
    import time

    from click.testing import CliRunner

    from emtile.cli.main import main

    d, out = command_inputs, tmp_path / "out.zarr"
    sched = tmp_path / "scheduler.json"
    address = f"tcp://127.0.0.1:{_free_port()}"
    if case == "nobody listens":
        sched.write_text(json.dumps({"type": "Scheduler", "address": address}))
    argv = {"predict": ["predict", "--model", str(d / "model"), str(d / "in.zarr")],
            "segment": ["segment", str(d / "pred.zarr")]}[command]
    t0 = time.monotonic()
    result = CliRunner().invoke(main, [*argv, str(out), "--no-progress", "--scheduler-file",
                                       str(sched), "--cluster-timeout", "2"])
    took = time.monotonic() - t0
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "Traceback" not in result.output and not out.exists()
    assert took < 2 + 8, took
    if case == "missing":
        assert lines[0] == (f"Error: --scheduler-file '{sched}' does not exist: waited 2 s "
                            f"(--cluster-timeout 2) for a Dask scheduler to write it (dask "
                            f"scheduler --scheduler-file {sched})")
        assert took >= 2  # it did wait for the file to appear
    else:
        assert lines[0].startswith(f"Error: could not reach the Dask scheduler at {address} "
                                   f"(from --scheduler-file '{sched}'): waited 2 s "
                                   f"(--cluster-timeout 2) to connect: "), lines[0]


def test_a_scheduler_file_written_late_is_joined(tmp_path):
    """The file may appear after the command starts (a scheduler starting beside it): it is
    waited for, then the scheduler it names is joined."""
    import json
    import threading

    from distributed import LocalCluster

    sched = tmp_path / "scheduler.json"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as lc:
        timer = threading.Timer(0.5, lambda: sched.write_text(
            json.dumps({"address": lc.scheduler_address})))
        timer.start()
        with start_cluster(scheduler_file=str(sched), cluster_timeout=20) as (client, info):
            assert info.kind == "scheduler-file" and info.workers == 1
            assert client.submit(sum, [1, 2]).result() == 3
        timer.join()


def test_a_scheduler_without_workers_is_one_line(tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as lc:
        with pytest.raises(EmtileError, match=rf"^the Dask scheduler at {lc.scheduler_address} "
                                              r"has no worker: waited 1 s \(cluster_timeout=1\) "
                                              r"for the first one to join$"):
            with start_cluster(lc.scheduler_address, cluster_timeout=1):
                pass
