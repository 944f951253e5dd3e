"""One driver for every blockwise stage: :class:`Stage`, :class:`Pass`, :class:`Runner` and
:func:`run_stage`.

A **stage** writes one output store from its inputs, block by block. It is described, not coded:

- ``output`` and ``inputs`` (paths; the output is never an input, nor inside one);
- ``fingerprint``, everything that changes the output's bytes (a resumed run must match it);
- ``create()``, which makes the output's arrays in a freshly prepared store;
- one or more **passes**, each a block plan and a module-level ``fn(job, ids) -> list`` that does
  the whole work of some blocks in any process (one small result per block), with the
  done-markers of its blocks; a later pass reads what the earlier ones wrote, as daisy's
  upstream tasks do.

:func:`run_stage` is the only driver. In order: the output check
(:func:`emtile.store.check_output`), the output's lock, prepare or resume (an interrupted store
with the same fingerprint and a finished set-up is resumed, anything else replaced), then for
each pass its markers, its blocks here or on a Dask cluster (:func:`emtile.distributed.map_blocks`:
a bounded window, retries), the results a pass keeps and its markers flushed together, the
missing-block check, and last the completeness flag. A killed run started again, here or on a
cluster, in any mix, runs only the blocks its markers do not record.

A **runner** (:class:`Runner`) says where blocks run: here (in this process), on a local
cluster, on a running scheduler (an address or a scheduler file), on SLURM or on a dask-cuda
cluster. It is checked once, when made, and shared by every command.

Nothing here knows about prediction or segmentation.
"""

import contextlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np

from emtile import _faults
from emtile._errors import EmtileError, whole_number
from emtile.markers import MARKERS, BlockMarkers

__all__ = ["Runner", "Stage", "Pass", "StageResult", "run_stage", "fingerprint_of", "RESUME",
           "StartOverWarning"]

RESUME = "run the same command again to resume"
_FINGERPRINTS = "fingerprints"  # where a stage's fingerprint lives in the output's emtile attrs


@dataclass(frozen=True)
class Runner:
    """Where the blocks of a stage run, and how they are handed out.

    Every field is checked when the runner is made: a bad value is one line naming it.
    """

    #: None: in this process. "local" (worker processes here), "slurm" (dask-jobqueue, from the
    #: Dask config), "cuda" (dask-cuda, one worker per GPU), or a scheduler's address
    #: (tcp://host:8786).
    cluster: Optional[str] = field(default=None, metadata={
        "help": "Run the blocks on Dask: local (worker processes here), slurm (dask-jobqueue, "
                "from your Dask config), cuda (dask-cuda, one worker per GPU), or the address of "
                "a running scheduler (tcp://host:8786).",
        "metavar": "local|slurm|cuda|ADDRESS"})
    #: Workers of a local or cuda cluster, or SLURM jobs (None: one per core / GPU; 1 job).
    cluster_workers: Optional[int] = field(default=None, metadata={
        "help": "Workers of a local or cuda cluster, or SLURM jobs [default: one per core / "
                "GPU; 1 job].", "min": 1})
    #: The scheduler file of a running cluster (instead of ``cluster``).
    scheduler_file: Optional[str] = field(default=None, metadata={
        "help": "The scheduler file of a running Dask cluster (instead of --cluster).",
        "path": True})
    #: Blocks per Dask task (more when blocks take milliseconds); None: each pass's own
    #: choice (:attr:`Pass.task_blocks`), fewer where the cluster would otherwise go short of
    #: tasks (:func:`task_blocks`).
    blocks_per_task: Optional[int] = field(default=None, metadata={
        "help": "Blocks per Dask task [default: the stage's choice: 1 for predict, blocks of "
                "about 2^24 voxels for segment, fewer when the cluster would get under 4 "
                "tasks per thread].", "min": 1})
    #: Extra tries of a failed Dask task (user errors are not retried).
    retries: int = field(default=2, metadata={
        "help": "Extra tries of a failed Dask task before the run stops.", "min": 0})
    #: Seconds to wait for a running scheduler (its scheduler file, its address) and for the
    #: first worker; past it, one line names what was waited for.
    cluster_timeout: float = field(default=60.0, metadata={
        "help": "Seconds to wait for the Dask scheduler (its scheduler file, its address) and "
                "its first worker before stopping with one line.", "min": 0})
    #: A running ``distributed.Client`` to use (Python only).
    client: Any = field(default=None, compare=False, repr=False, metadata={"cli": False})

    def __post_init__(self):
        if self.blocks_per_task is not None:
            whole_number("blocks_per_task", self.blocks_per_task, least=1)
        whole_number("retries", self.retries, least=0)
        if self.cluster_workers is not None:
            whole_number("cluster_workers", self.cluster_workers, least=1)
        t = self.cluster_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise EmtileError(f"cluster_timeout={t!r} must be a positive number of seconds")
        if self.client is not None and (self.cluster or self.scheduler_file):
            raise EmtileError("give either client= or cluster= / scheduler_file=, not both")
        if self.distributed and self.client is None:
            self.spec()  # the cluster's own checks, now

    @property
    def distributed(self):
        """True when the blocks run on Dask rather than in this process."""
        return self.client is not None or self.cluster is not None \
            or self.scheduler_file is not None

    def spec(self):
        """What :func:`emtile.distributed.start_cluster` would start or join (None: here, or a
        client that is already running)."""
        if self.client is not None or not self.distributed:
            return None
        from emtile.distributed import cluster_spec

        return cluster_spec(self.cluster, workers=self.cluster_workers,
                            scheduler_file=self.scheduler_file)

    def threads(self):
        """Torch threads a process of this runner should use on the CPU: None (this process's
        own setting) here, cores / workers on a local cluster, 1 elsewhere."""
        if not self.distributed:
            return None
        spec = self.spec()
        if spec is not None and spec["kind"] == "local":
            return max(1, (os.cpu_count() or 1) // spec["kwargs"]["n_workers"])
        return 1

    @contextlib.contextmanager
    def started(self, *, progress=True):
        """``(runner, where)``: this runner with a client (a cluster started or joined here is
        closed at the end), or itself when its blocks run here; ``where`` describes it."""
        if self.client is not None or not self.distributed:
            yield self, "a Dask client" if self.client is not None else ""
            return
        from emtile import distributed

        with distributed.start_cluster(self.cluster, workers=self.cluster_workers,
                                       scheduler_file=self.scheduler_file,
                                       cluster_timeout=self.cluster_timeout) as (client, info):
            if progress:
                from tqdm.auto import tqdm

                tqdm.write(str(info))
            yield replace(self, client=client, cluster=None, scheduler_file=None), \
                f"{info.kind} cluster, {info.workers} workers"


@dataclass(frozen=True)
class Pass:
    """The blocks of one pass of a stage.

    ``fn(job, ids) -> list`` is module-level (picklable) and does the whole work of blocks
    ``ids`` in any process, one result per block (None: the block was already done). ``plan``
    has ``len()``; ``describe(i)`` names block ``i`` in messages.
    """

    name: str  # the bar's label, e.g. "segment 2/3 fragments"
    fn: Callable
    job: Any
    plan: Any
    describe: Callable
    markers: str = MARKERS  # the done-markers array, in the stage's markers group
    point: str = ""  # test-only fault point passed after each block is recorded
    #: ``keep(group) -> buffer`` with ``add(i, result)``, ``full()`` and ``flush()``: what the
    #: results carry, written before the markers that record their blocks.
    keep: Optional[Callable] = None
    before: Optional[Callable] = None  # before(group): every run, resumed too
    after: Optional[Callable] = None  # after(group): once every block is recorded
    #: ``here(ids, record, progress)``: run ``ids`` in this process, calling ``record(i, result)``
    #: as each block finishes (default: ``fn`` on groups of ``blocks_per_task``).
    here: Optional[Callable] = None
    gpu: bool = False  # tasks ask for {"GPU": 1} when the cluster's workers declare GPUs
    #: ``fn`` is thread-safe and its work releases the GIL: here, blocks run in one thread per
    #: usable core (on a cluster, each worker runs its tasks as Dask gives them)
    threads: bool = False
    unit: str = "block"  # what the plan's ids are, on the progress bar
    #: Blocks per Dask task when the runner leaves it to the pass (``blocks_per_task=None``):
    #: a task's overhead (the scheduler's, the worker's, the driver's recording) is some ms of
    #: CPU, so blocks that take a fraction of a second go several to a task (:func:`task_blocks`)
    task_blocks: int = 1
    #: Blocks recorded before their markers are written (without ``keep``; with it, the
    #: buffer's ``full()`` decides) ...
    flush_blocks: int = 64
    flush_seconds: float = 2.0  # ... or after this long, whichever comes first


@dataclass(frozen=True)
class Stage:
    """One output store written by one or more passes; see the module docstring."""

    name: str
    output: str
    inputs: tuple
    fingerprint: Optional[dict]  # None: never resumed (an input held in memory)
    create: Callable  # create() -> the output's zarr group, after prepare_output made room
    passes: tuple
    markers_group: str = ""  # the group (inside the output) that holds the passes' markers
    resumable: Optional[Callable] = None  # resumable(group) -> bool: beyond the markers
    #: ``finish(group) -> attrs`` for mark_complete, after every pass. A run killed inside it
    #: is resumed, so it must leave the output resumable or refused: working data goes with
    #: :func:`emtile.store.remove_store` (renamed away first: then the markers are gone and
    #: the next run starts over), never array by array.
    finish: Optional[Callable] = None


@dataclass
class StageResult:
    """What :func:`run_stage` did."""

    group: Any
    resumed: bool
    blocks: tuple  # per pass: its number of blocks
    blocks_done: tuple  # per pass: blocks already recorded when the run started
    where: str
    seconds: float
    attrs: dict = field(default_factory=dict)  # what ``finish`` returned
    pass_seconds: dict = field(default_factory=dict)  # wall seconds of each pass, by its name


def run_stage(stage, runner=None, *, overwrite=False, progress=True):
    """Run ``stage`` where ``runner`` says (None: here); see the module docstring.

    ``overwrite`` replaces an existing output and never resumes an interrupted one.
    """
    from emtile import store

    t0 = time.perf_counter()
    runner = runner or Runner()
    store.check_output(stage.output, inputs=[p for p in stage.inputs if p])
    with store.output_lock(stage.output) as lock:
        # the cluster first: one that cannot be reached leaves no output behind
        with runner.started(progress=progress) as (started, where):
            with store.write_errors(stage.output, then=RESUME):
                group, resumed = _open(stage, overwrite)
            done, seconds = [], []
            for p in stage.passes:
                t = time.perf_counter()
                done.append(_run_pass(stage, p, group, started, progress=progress))
                seconds.append(time.perf_counter() - t)
        check = getattr(lock, "check", None)  # an object store's lock: still this run's?
        with store.write_errors(stage.output, then=RESUME):
            if check is not None:
                check()  # before finish removes working data another run may now be using
            attrs = (stage.finish(group) if stage.finish else None) or {}
            if check is not None:
                check()
            store.mark_complete(group, **attrs)
    return StageResult(group=group, resumed=resumed, blocks=tuple(len(p.plan) for p in
                                                                   stage.passes),
                       blocks_done=tuple(done), where=where, seconds=time.perf_counter() - t0,
                       attrs=attrs, pass_seconds={p.name: t for p, t in zip(stage.passes,
                                                                            seconds)})


def _markers_group(stage, group):
    return group[stage.markers_group] if stage.markers_group else group


def _open(stage, overwrite):
    """``(group, resumed)``: the interrupted store of this stage, or a new one."""
    import zarr

    from emtile import store

    resume = stage.fingerprint is not None and not overwrite
    state = store.prepare_output(stage.output, overwrite=overwrite, resume=resume)
    if state == "resume":
        group = zarr.open_group(store.zarr_target(stage.output, "r+"), mode="r+", zarr_format=3)
        if _resumable(stage, group):
            return group, True
        _say_why_not_resumed(stage, group)
        store.prepare_output(stage.output, overwrite=overwrite)  # another run's, or unfinished
    group = stage.create()
    _set_meta(group, **{_FINGERPRINTS: {stage.name: stage.fingerprint}})
    mgroup = _markers_group(stage, group)
    for p in stage.passes:  # last: their presence means the set-up finished
        BlockMarkers.create(mgroup, len(p.plan), name=p.markers)
    return group, False


class StartOverWarning(UserWarning):
    """An interrupted output of this stage made with other settings: the run starts over
    (one line naming what differs)."""


def _say_why_not_resumed(stage, group):
    """Warn when ``group`` holds this stage's interrupted output with another fingerprint: the
    settings that differ, so a user who meant to resume (e.g. with another ``--threads``)
    sees why every block is computed again."""
    recorded = fingerprint_of(group.attrs.asdict().get("emtile", {}), stage.name)
    now = json.loads(json.dumps(stage.fingerprint))
    if not isinstance(recorded, dict) or recorded == now:
        return
    keys = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))

    def short(v):
        text = json.dumps(v)
        return text if len(text) <= 24 else "..."

    what = ", ".join(f"{k} {short(recorded.get(k))} -> {short(now.get(k))}" for k in keys[:4])
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    warnings.warn(f"output {str(stage.output)!r} holds an interrupted run with other settings "
                  f"({what}{more}): starting over; give the interrupted run's settings to resume "
                  f"it instead", StartOverWarning, stacklevel=4)


def _set_meta(group, **entries):
    """Set ``entries`` in the output's ``emtile`` attributes."""
    group.attrs["emtile"] = {**group.attrs.get("emtile", {}), **entries}


def fingerprint_of(meta, name):
    """The fingerprint stage ``name`` recorded in an output's ``emtile`` attributes, or None."""
    return (meta.get(_FINGERPRINTS) or {}).get(name)


def _resumable(stage, group):
    """True when ``group`` is this stage's, with the same fingerprint and a finished set-up."""
    meta = group.attrs.asdict().get("emtile", {})
    recorded = fingerprint_of(meta, stage.name)
    if recorded != json.loads(json.dumps(stage.fingerprint)):
        return False
    try:
        mgroup = _markers_group(stage, group)
    except (KeyError, FileNotFoundError):
        return False
    if any(BlockMarkers.open(mgroup, len(p.plan), name=p.markers) is None for p in stage.passes):
        return False
    return stage.resumable is None or bool(stage.resumable(group))


class _Recorder:
    """Records a pass's blocks as done: keeps their results (the pass's buffer), and writes the
    buffer, then the markers, when either is full or ``flush_seconds`` passed."""

    def __init__(self, stage, p, group, markers):
        self.output, self.p, self.markers = stage.output, p, markers
        self.buffer = p.keep(group) if p.keep else None
        self.pending, self.last = [], time.monotonic()
        self.every_block = bool(os.environ.get(_faults.ENV))  # test-only: no batching

    def __call__(self, i, result):
        if result is None:  # the block was already recorded (a retry found it done)
            return
        if self.buffer is not None:
            self.buffer.add(i, result)
        self.pending.append(i)
        full = self.buffer.full() if self.buffer is not None else \
            len(self.pending) >= self.p.flush_blocks
        if full or self.every_block or time.monotonic() - self.last >= self.p.flush_seconds:
            self.flush()

    def flush(self):
        from emtile.store import write_errors

        with write_errors(self.output, then=RESUME):
            if self.buffer is not None:
                self.buffer.flush()
            self.markers.record(self.pending)
            self.markers.flush()
        if self.p.point:
            for _ in self.pending:
                _faults.point(self.p.point)  # test-only: the driver killed after recording
        self.pending.clear()
        self.last = time.monotonic()


#: Tasks per cluster thread that :func:`task_blocks` keeps at least, so that the last tasks of
#: a pass do not leave most of the cluster idle.
TASKS_PER_THREAD = 4


def task_blocks(want, blocks, client):
    """Blocks per task for a pass that asks for ``want`` (:attr:`Pass.task_blocks`) over
    ``blocks`` blocks: ``want`` on a cluster, reduced so that every thread of ``client``'s
    workers gets at least :data:`TASKS_PER_THREAD` tasks; 1 in this process (no task overhead
    there, and threads share the blocks one by one).

    Examples
    --------
    >>> task_blocks(4, 1000, None)
    1
    """
    if client is None or want <= 1:
        return 1
    from emtile.distributed import cluster_threads

    threads = max(1, cluster_threads(client))
    return max(1, min(int(want), blocks // (TASKS_PER_THREAD * threads)))


def _run_pass(stage, p, group, runner, *, progress):
    """The blocks of pass ``p`` that its markers do not record; returns how many were done
    before."""
    from emtile import distributed
    from emtile.store import write_errors

    markers = BlockMarkers.open(_markers_group(stage, group), len(p.plan), name=p.markers,
                                flush_every=float("inf"))
    todo = np.flatnonzero(~markers.done())
    if p.before:
        with write_errors(stage.output, then=RESUME):
            p.before(group)
    record = _Recorder(stage, p, group, markers)
    if runner.client is None and p.here is not None:
        p.here(todo, record, progress)
    else:
        resources = None
        if p.gpu and runner.client is not None:
            resources = distributed.gpu_resources(runner.client)
        threads = 1
        # (test-only: with faults injected, blocks run one at a time, so "killed after the
        # N-th block" names the same blocks on every run)
        if p.threads and runner.client is None and not os.environ.get(_faults.ENV):
            from emtile._process import usable_cores

            threads = min(usable_cores(), max(1, int(todo.size)))
        per = runner.blocks_per_task or task_blocks(p.task_blocks, int(todo.size),
                                                    runner.client)
        distributed.map_blocks(p.fn, p.job, iter(todo.tolist()), client=runner.client,
                               blocks_per_task=per, retries=runner.retries,
                               progress=progress, desc=p.name, total=int(todo.size),
                               on_result=record, describe=p.describe, resources=resources,
                               threads=threads, unit=p.unit)
    record.flush()
    missing = np.flatnonzero(~markers.done())
    if missing.size:  # every block was run: a bug, never a user error
        raise RuntimeError(f"internal error: {missing.size} of {len(p.plan)} blocks of "
                           f"{p.name} in {stage.output} were not recorded (first: "
                           f"{int(missing[0])}); the output is left incomplete")
    if p.after:
        with write_errors(stage.output, then=RESUME):
            p.after(group)
    return len(p.plan) - int(todo.size)
