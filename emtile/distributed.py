"""Run any blockwise stage over a Dask cluster (or in this process), block by block.

A stage is a module-level function ``fn(job, block_ids) -> list`` (one small result per block)
and a frozen, picklable ``job`` (paths and options, never arrays or models). ``fn`` opens what it
needs once per process and does each block's whole work: read, compute, write the block's chunks.
:func:`map_blocks` hands it the block ids of a plan:

- ``client=None``: in this process, in order;
- a :class:`distributed.Client`: ``Client.submit`` one task per ``blocks_per_task`` blocks,
  keeping a bounded window in flight (about twice the cluster's threads, recomputed as workers
  come and go), so a plan of millions of blocks never becomes one graph and the client's memory
  does not grow with it. Failed tasks are retried ``retries`` times (a worker that dies is
  replaced and its tasks run elsewhere: Dask does that), then the run stops with one line naming
  the block.

``on_result(block_id, result)`` runs in this process as results arrive: that is where a driver
records blocks as done (:mod:`emtile.markers`), so only the driver ever writes the markers.

:func:`start_cluster` gives a client for ``--cluster``: ``local`` (worker processes with one
thread each), ``tcp://host:port`` or a scheduler file (a cluster that is already running),
``slurm`` (dask-jobqueue, configured in the user's Dask config) and ``cuda`` (dask-cuda, one worker
per GPU, tasks asking for ``{"GPU": 1}`` so two never share a device).

Nothing here knows about prediction or segmentation.
"""

import contextlib
import itertools
import logging
import os
import time
import uuid

import numpy as np

from emtile._errors import EmtileError, whole_number

__all__ = ["map_blocks", "cluster_threads", "start_cluster", "create_cluster", "cluster_spec",
           "gpu_resources", "CLUSTERS", "ClusterInfo"]

CLUSTERS = ("local", "slurm", "cuda")  # besides an address (tcp://...) or a scheduler file
_ADDRESS_SCHEMES = ("tcp://", "tls://", "ucx://", "inproc://")


def _groups(block_ids, size):
    it = iter(block_ids)
    while True:
        ids = list(itertools.islice(it, size))
        if not ids:
            return
        yield ids


class _UserError:
    """An :class:`EmtileError` raised by a task, handed back as its result: a user error (a
    damaged input chunk, a full disk) fails the same way on every try, so it is not retried."""

    def __init__(self, message):
        self.message = message


class _Results:
    """A task's results, packed in one object: Dask walks a returned list element by element
    (0.75 s for 20,000 ints, against 20 ms for one object), so a task never returns a bare one."""

    def __init__(self, items):
        self.items = items


def _call(fn, job, ids):
    try:
        return _Results(fn(job, ids))
    except EmtileError as exc:
        return _UserError(str(exc))


def cluster_threads(client):
    """Threads of ``client``'s workers, all together."""
    info = client.scheduler_info()
    return sum(w.get("nthreads", 1) for w in info.get("workers", {}).values())


def map_blocks(fn, job, block_ids, *, client=None, blocks_per_task=1, retries=2, window=None,
               progress=True, desc="blocks", total=None, describe=None, on_result=None,
               resources=None, threads=1, unit="block"):
    """Call ``fn(job, ids)`` over ``block_ids`` in groups of ``blocks_per_task``.

    Parameters
    ----------
    fn : callable
        Module-level (picklable) ``fn(job, ids) -> list``, one result per id, in order. Results
        with a ``voxels`` attribute feed the progress bar's voxels/s.
    job : object
        Picklable description of the work (sent with every task; keep it small).
    block_ids : iterable of int
        The blocks to run; consumed lazily (never materialised).
    client : distributed.Client, optional
        None runs in this process.
    blocks_per_task : int
        Blocks per task, so that a task lasts seconds rather than milliseconds.
    retries : int
        Extra tries of a failed task on a cluster (a task that raises :class:`EmtileError`, a
        user error such as a damaged input chunk, is not tried again: it would fail the same way).
    window : int, optional
        Tasks in flight at once (default about twice the cluster's threads, at least 2).
    progress : bool
        A tqdm bar in blocks (with voxels/s), and the dashboard link when there is one.
    desc : str
        The bar's label and the tasks' key prefix.
    total : int, optional
        Number of blocks, for the bar.
    describe : callable, optional
        ``describe(block_id) -> str`` for error messages (e.g. the block's voxel range).
    on_result : callable, optional
        ``on_result(block_id, result)``, in this process, as results arrive.
    resources : dict, optional
        Dask resources each task needs (``{"GPU": 1}`` on a dask-cuda cluster).
    threads : int
        Without a client: groups run at once in this many threads of this process (for an
        ``fn`` whose work releases the GIL, such as Numba ``nogil`` kernels and chunk codecs);
        results are delivered in this thread, in the order the groups finish.
    unit : str
        What an id is, on the bar ("block"; "row" for segment's global step).

    Returns
    -------
    int
        The number of blocks run.
    """
    from tqdm.auto import tqdm

    whole_number("blocks_per_task", blocks_per_task, least=1)
    whole_number("retries", retries, least=0)
    bar = tqdm(total=total, unit=unit, desc=desc, disable=not progress, dynamic_ncols=True,
               smoothing=0.1)
    link = getattr(client, "dashboard_link", None) if client is not None else None
    if progress and link:
        bar.write(f"dashboard: {link}")
    counter = _Counter(bar)
    try:
        if client is None and threads > 1:
            _run_in_threads(fn, job, _groups(block_ids, blocks_per_task), threads,
                            counter=counter, on_result=on_result)
        elif client is None:
            for ids in _groups(block_ids, blocks_per_task):
                results = fn(job, ids)
                counter.deliver(ids, results, on_result)
        else:
            _run_on_cluster(client, fn, job, _groups(block_ids, blocks_per_task),
                            counter=counter, retries=retries, window=window, desc=desc,
                            describe=describe, on_result=on_result, resources=resources)
    finally:
        bar.close()
    return counter.blocks


def _run_in_threads(fn, job, groups, threads, *, counter, on_result):
    """``fn`` over ``groups`` in a pool of ``threads``, at most two groups per thread in flight;
    the first failure stops the run (groups in flight finish, none is started after it)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(threads, thread_name_prefix="emtile-block") as pool:
        pending = {}

        def fill():
            while len(pending) < 2 * threads:
                ids = next(groups, None)
                if ids is None:
                    return
                pending[pool.submit(fn, job, ids)] = ids

        fill()
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    ids = pending.pop(future)
                    counter.deliver(ids, future.result(), on_result)
                fill()
        finally:
            for future in pending:
                future.cancel()


class _Counter:
    """Blocks and voxels done, shown on the bar."""

    def __init__(self, bar):
        self.bar, self.blocks, self.voxels, self.t0 = bar, 0, 0, time.perf_counter()

    def deliver(self, ids, results, on_result):
        if len(results) != len(ids):
            raise RuntimeError(f"internal error: {len(results)} results for {len(ids)} blocks")
        for i, r in zip(ids, results):
            if on_result is not None:
                on_result(i, r)
            self.voxels += getattr(r, "voxels", 0) or 0
        self.blocks += len(ids)
        self.bar.update(len(ids))
        if self.voxels:
            rate = self.voxels / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{rate / 1e6:.3g} Mvox/s", refresh=False)


def _run_on_cluster(client, fn, job, groups, *, counter, retries, window, desc, describe,
                    on_result, resources):
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    pending = {}  # future -> its block ids
    finished = as_completed()

    def fill():
        limit = window or max(2, 2 * cluster_threads(client))
        while len(pending) < limit:
            ids = next(groups, None)
            if ids is None:
                return
            # an array, not a list: Dask walks list arguments element by element
            future = client.submit(_call, fn, job, np.asarray(ids, dtype=np.int64),
                                   key=f"{desc}-{ids[0]}-{token}", pure=False, retries=retries,
                                   resources=resources)
            pending[future] = ids
            finished.add(future)

    fill()
    try:
        for future in finished:
            ids = pending.pop(future)
            if future.status != "finished":
                raise _task_error(future, ids, retries, describe)
            results = future.result()
            future.release()
            if isinstance(results, _UserError):
                raise EmtileError(f"{_blocks(ids, describe)} failed: {results.message}; done "
                                  f"blocks are kept: run the same command again to resume")
            counter.deliver(ids, results.items, on_result)
            fill()
    finally:
        if pending:
            client.cancel(list(pending))


def _blocks(ids, describe):
    what = f"block {ids[0]}" if len(ids) == 1 else f"blocks {ids[0]}..{ids[-1]}"
    if describe is not None:
        what += f" ({describe(ids[0])})"
    return what


def _task_error(future, ids, retries, describe):
    exc = future.exception()
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return EmtileError(f"{_blocks(ids, describe)} failed after {retries + 1} tries: {reason}; "
                       f"done blocks are kept: run the same command again to resume")


# --------------------------------------------------------------------------- clusters


class ClusterInfo:
    """What :func:`start_cluster` started or joined."""

    def __init__(self, kind, workers, threads, seconds, dashboard, resources):
        self.kind, self.workers, self.threads = kind, workers, threads
        self.seconds, self.dashboard, self.resources = seconds, dashboard, resources

    def __str__(self):
        board = f", dashboard {self.dashboard}" if self.dashboard else ""
        return (f"cluster {self.kind}: {self.workers} worker(s), {self.threads} thread(s), "
                f"ready in {self.seconds:.1f} s{board}")


def cluster_spec(cluster, *, workers=None, scheduler_file=None):
    """What :func:`start_cluster` would create, without creating it.

    Returns
    -------
    dict
        ``kind`` ("local", "address", "scheduler-file", "slurm" or "cuda"), ``factory`` (the
        class or function called, as ``"module:name"``), ``kwargs`` (its arguments), ``scale``
        (workers or jobs to ask for, or None) and ``resources`` (what each task asks for).
    """
    if scheduler_file is not None:
        if cluster not in (None, "scheduler-file"):
            raise EmtileError(f"give either cluster= or scheduler_file=, not both "
                              f"(cluster={cluster!r})")
        return {"kind": "scheduler-file", "factory": "distributed:Client",
                "kwargs": {"scheduler_file": str(scheduler_file)}, "scale": None,
                "resources": None}
    if workers is not None:
        whole_number("cluster_workers", workers, least=1)
    if isinstance(cluster, str) and cluster.startswith(_ADDRESS_SCHEMES):
        return {"kind": "address", "factory": "distributed:Client",
                "kwargs": {"address": cluster}, "scale": None, "resources": None}
    if cluster == "local":
        n = workers or max(1, os.cpu_count() or 1)
        kwargs = {"n_workers": n, "threads_per_worker": 1, "processes": True,
                  "dashboard_address": ":0",
                  "silence_logs": logging.ERROR}
        return {"kind": "local", "factory": "distributed:LocalCluster", "kwargs": kwargs,
                "scale": None, "resources": None}
    if cluster == "slurm":
        # everything else (cores, memory, GPUs, walltime, --lifetime) comes from the user's Dask
        # config, section jobqueue.slurm; see the README
        return {"kind": "slurm", "factory": "dask_jobqueue:SLURMCluster", "kwargs": {},
                "scale": workers or 1, "resources": None}
    if cluster == "cuda":
        kwargs = {"threads_per_worker": 1, "resources": {"GPU": 1},
                  "dashboard_address": ":0"}
        if workers is not None:
            kwargs["n_workers"] = workers
        return {"kind": "cuda", "factory": "dask_cuda:LocalCUDACluster", "kwargs": kwargs,
                "scale": None, "resources": {"GPU": 1}}
    raise EmtileError(f"cluster={cluster!r} is not a cluster: choose local, slurm, cuda, or a "
                      f"scheduler address such as tcp://10.0.0.5:8786 (or give "
                      f"scheduler_file=)")


def _has_bokeh():
    try:
        import bokeh  # noqa: F401  (the dashboard needs it)
    except ImportError:
        return False
    return True


_EXTRAS = {"dask_jobqueue": "slurm", "dask_cuda": "cuda"}


def _factory(name):
    import importlib

    module, attr = name.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        extra = _EXTRAS.get(module, module)
        raise EmtileError(f"cluster={extra!r} needs {module.replace('_', '-')}: "
                          f"pip install 'emtile[{extra}]'") from None


#: What Dask's nanny sets before it starts a worker process that emtile's local and cuda
#: clusters leave out: any malloc tunable set by hand turns off glibc's adaptive mmap threshold,
#: so each block-sized array of a task was mapped afresh and faulted in page by page (a segment
#: block in a worker: 886,000 minor faults and 4.0 s of system time for 8 x 2048^2, against
#: 82,000 and 1.1 s without it, and 34,000 in this process).
_WORKER_ENV_LEFT_OUT = ("MALLOC_TRIM_THRESHOLD_",)


def _spawn_config(spec):
    """The Dask config a cluster is made under: for the workers that this process starts
    (local, cuda), the nanny's environment without :data:`_WORKER_ENV_LEFT_OUT` (a value of None
    unsets a variable there)."""
    import importlib

    import dask

    if spec["kind"] not in ("local", "cuda"):
        return contextlib.nullcontext()
    importlib.import_module("distributed")  # its defaults in the config first, then the change
    return dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": None
                            for name in _WORKER_ENV_LEFT_OUT})


def create_cluster(cluster, *, workers=None):
    """The cluster object for ``--cluster local|slurm|cuda`` (LocalCluster, SLURMCluster,
    LocalCUDACluster), created but not scaled: a SLURM cluster submits no job until
    :func:`start_cluster` scales it. Its job script (``cluster.job_script()``) shows what the
    user's Dask config asks SLURM for."""
    spec = cluster_spec(cluster, workers=workers)
    if spec["kind"] in ("address", "scheduler-file"):
        raise EmtileError(f"cluster={cluster!r} is a running cluster: join it with a Client")
    with _spawn_config(spec):
        return _factory(spec["factory"])(**spec["kwargs"])


def gpu_resources(client):
    """``{"GPU": 1}`` when the cluster's workers declare a GPU resource (dask-cuda workers, or
    SLURM workers started with ``--resources GPU=1``), so that two tasks never share a GPU;
    else None."""
    workers = client.scheduler_info().get("workers", {}).values()
    return {"GPU": 1} if any("GPU" in w.get("resources", {}) for w in workers) else None


def _scheduler_address(path, deadline, cluster_timeout):
    """The address a scheduler file names, waiting until ``deadline`` for a scheduler to write it
    (distributed's own Client waits for the file forever)."""
    import json

    while True:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            text = None
        except OSError as exc:
            raise EmtileError(f"scheduler_file={str(path)!r} cannot be read: "
                              f"{type(exc).__name__}: {exc.strerror or exc}") from None
        if text:
            try:
                address = json.loads(text)["address"]
                if isinstance(address, str) and address:
                    return address
            except (ValueError, KeyError, TypeError):
                pass
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    what = ("does not exist" if text is None else
            "names no scheduler address (no JSON with an \"address\")")
    raise EmtileError(f"scheduler_file={str(path)!r} {what}: waited {cluster_timeout:g} s "
                      f"(cluster_timeout={cluster_timeout:g}) for a Dask scheduler to write it "
                      f"(dask scheduler --scheduler-file {path})")


def _join(spec, stack, client_cls, cluster_timeout):
    """A client of the running scheduler a spec names, within ``cluster_timeout`` seconds."""
    deadline = time.monotonic() + cluster_timeout
    path = spec["kwargs"].get("scheduler_file")
    address = (_scheduler_address(path, deadline, cluster_timeout) if path is not None
               else spec["kwargs"]["address"])
    where = f"{address} (from scheduler_file={str(path)!r})" if path is not None else address
    left = max(deadline - time.monotonic(), 0.5)
    try:
        return stack.enter_context(client_cls(address, timeout=left)), where
    except (OSError, TimeoutError) as exc:
        raise EmtileError(f"could not reach the Dask scheduler at {where}: waited "
                          f"{cluster_timeout:g} s (cluster_timeout={cluster_timeout:g}) to "
                          f"connect: {_reason(exc)}") from None


def _reason(exc):
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def start_cluster(cluster=None, *, workers=None, scheduler_file=None, cluster_timeout=60):
    """Start or join a Dask cluster; yield ``(client, info)``; close what was started.

    Parameters
    ----------
    cluster : str
        ``"local"``, ``"slurm"``, ``"cuda"`` or a scheduler address (``tcp://host:8786``).
    workers : int, optional
        Workers of a local or cuda cluster (default: one per core / per GPU), or SLURM jobs.
    scheduler_file : path, optional
        The file a running scheduler wrote (``dask scheduler --scheduler-file``).
    cluster_timeout : float
        Seconds to wait for the scheduler (its file, its address) and the first worker (not
        for SLURM jobs, which may wait in the queue: tasks start as their workers join). Past
        it, one :class:`EmtileError` line names the file or address and what was waited for.
    """
    spec = cluster_spec(cluster, workers=workers, scheduler_file=scheduler_file)
    from distributed import Client

    t0 = time.perf_counter()
    deadline = time.monotonic() + cluster_timeout
    with contextlib.ExitStack() as stack:
        joined = spec["kind"] in ("address", "scheduler-file")
        if joined:
            client, where = _join(spec, stack, Client, cluster_timeout)
        else:
            where = f"{spec['kind']} cluster"
            try:
                with _spawn_config(spec):
                    made = stack.enter_context(_factory(spec["factory"])(**spec["kwargs"]))
                    if spec["scale"]:
                        made.scale(jobs=spec["scale"])
                client = stack.enter_context(Client(made, timeout=cluster_timeout))
            except (OSError, TimeoutError) as exc:
                raise EmtileError(f"could not start the Dask {where}: {_reason(exc)}") from None
        if spec["kind"] != "slurm":
            try:
                # a running cluster: what is left of the one timeout (file, address, worker)
                left = max(deadline - time.monotonic(), 0.5) if joined else cluster_timeout
                client.wait_for_workers(1, timeout=left)
            except (OSError, TimeoutError):
                raise EmtileError(f"the Dask scheduler at {where} has no worker: waited "
                                  f"{cluster_timeout:g} s (cluster_timeout={cluster_timeout:g}) "
                                  f"for the first one to join") from None
        info = client.scheduler_info()
        workers_now = info.get("workers", {})
        yield client, ClusterInfo(
            spec["kind"], len(workers_now), sum(w.get("nthreads", 1) for w in workers_now.values()),
            time.perf_counter() - t0, client.dashboard_link if _has_bokeh() else None,
            gpu_resources(client))
