"""Injected faults in real processes: SIGKILL at points drawn by a seeded generator, and writes that
fail part-way (ENOSPC, EACCES) at the store layer. After each, a plain re-run (``train``:
``--resume``) must give an output byte-identical to an uninterrupted run's, nothing may look
complete before it is, and nothing already written may be lost. Then: two runs into one output,
a DataLoader reader killed, and damaged or unfinished inputs, command by command.

The hooks are :mod:`emtile._faults` (``_EMTILE_FAULTS``); ``trace=PATH`` lists every point an
uninterrupted run reaches, and the kill points are drawn from that list. ``convert`` runs in a
fresh interpreter each time; ``predict`` and ``train`` run in processes forked from one
interpreter that has imported torch once (:class:`ForkServer`), so tens of kills stay cheap.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

import emtile
from emtile import _faults
from emtile.cli.main import main
from emtile.store import is_complete, is_zarr_store

SEED = 20260311
N_KILLS = 24
# A small stack in many small slabs and chunks: tens of points to kill at, runs of ~0.5 s.
SHAPE = (12, 64, 64)
CONVERT_ARGS = ["--chunks", "2,32,32", "--levels", "2", "--no-progress"]
CONVERT_ARGS += ["--shards", "2,32,64"]  # what auto picks for 2-slice slabs (re-runs: 64 MB ones)
RUNNER = ("import sys, emtile.stacks as s; s.SLAB_BYTES = 2 * 64 * 64; "
          "from emtile.cli.main import main; main(sys.argv[1:], prog_name='emtile')")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data = np.random.default_rng(SEED).integers(0, 255, size=SHAPE, dtype=np.uint8)
    path = tmp_path_factory.mktemp("faults") / "stack.tif"
    tifffile.imwrite(path, data, compression="zlib", photometric="minisblack")
    return path, data


def convert_process(src, out, faults=None):
    """``emtile convert`` in a fresh interpreter with ``_EMTILE_FAULTS=faults``."""
    env = {k: v for k, v in os.environ.items() if k != _faults.ENV}
    if faults:
        env[_faults.ENV] = faults
    return subprocess.run([sys.executable, "-c", RUNNER, "convert", str(src), str(out),
                           *CONVERT_ARGS], env=env, capture_output=True, text=True, timeout=120)


def store_files(store):
    """{relative path: bytes} of every file in a store."""
    store = Path(store)
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file()}


def rerun(src, out):
    r = CliRunner().invoke(main, ["convert", str(src), str(out), *CONVERT_ARGS])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory):
    """An uninterrupted run's store, and every fault point it reaches (from the trace)."""
    src, data = stack
    out = tmp_path_factory.mktemp("ref") / "vol.zarr"
    trace = out.parent / "trace.txt"
    r = convert_process(src, out, faults=f"trace={trace}")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(emtile.open_volume(out)[:], data)
    points = trace.read_text().split()
    return store_files(out), points


def test_trace_lists_every_write_slab_and_the_completion(reference):
    files, points = reference
    counts = Counter(points)
    chunk_files = [f for f in files if "/c/" in f]
    # every chunk, the group and array documents and their attribute updates pass the store hook
    assert counts["store.write"] >= len(chunk_files) + 3
    assert counts["convert.slab"] == SHAPE[0] // 2  # 2-slice slabs
    assert counts["convert.before_complete"] == 1
    assert len(points) >= 30  # sharded (convert's default): one file per shard, 18 here, not 30
    assert len(chunk_files) == 6 * 2 + 6  # level 0: a shard per slab and row; level 1: per slab


def test_sigkill_at_seeded_points_then_rerun_is_byte_identical(stack, reference, tmp_path):
    src, _ = stack
    ref_files, points = reference
    numbered, seen = [], Counter()
    for name in points:  # the i-th hit of each point, in the order an uninterrupted run meets them
        seen[name] += 1
        numbered.append((name, seen[name]))
    rng = np.random.default_rng(SEED)
    picks = [numbered[i] for i in sorted(rng.choice(len(numbered), N_KILLS, replace=False))]
    # and always the edge of completion: before it is marked, and its own write
    for edge in (("convert.before_complete", 1), ("store.write", seen["store.write"])):
        if edge not in picks:
            picks.append(edge)
    assert len({name for name, _ in picks}) >= 2, picks
    for k, (name, n) in enumerate(picks):
        out = tmp_path / f"run{k}" / "vol.zarr"
        out.parent.mkdir()
        r = convert_process(src, out, faults=f"{name}@{n}=kill")
        assert r.returncode == -9, (name, n, r.returncode, r.stderr)
        assert not is_complete(out), f"killed at {name} #{n}, yet the store looks complete"
        if is_zarr_store(out):
            info = CliRunner().invoke(main, ["info", str(out)])
            assert "complete      NO" in info.output, (name, n, info.output)
        rerun(src, out)  # no --overwrite: the interrupted store is replaced
        assert store_files(out) == ref_files, f"not byte-identical after a kill at {name} #{n}"
        assert not any(p.name.startswith(".") for p in out.parent.iterdir()), \
            f"left-overs beside the output after a kill at {name} #{n}"


@pytest.mark.parametrize("action,reason", [("enospc", "No space left on device"),
                                           ("eacces", "Permission denied")])
def test_failed_write_is_one_line_leaves_incomplete_and_rerun_finishes(
        stack, reference, tmp_path, action, reason):
    src, _ = stack
    ref_files, points = reference
    writes = Counter(points)["store.write"]
    rng = np.random.default_rng([SEED, _faults.ACTIONS.index(action)])
    for n in sorted({2, writes, *rng.integers(3, writes, 3).tolist()}):  # 2: the first array
        out = tmp_path / f"{action}{n}" / "vol.zarr"
        out.parent.mkdir()
        r = convert_process(src, out, faults=f"store.write@{n}={action}")
        assert r.returncode == 1, (n, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert lines[0].startswith(f"Error: writing '{out}' failed: {reason}"), lines[0]
        assert "left incomplete" in lines[0]
        assert out.exists() and not is_complete(out)
        info = CliRunner().invoke(main, ["info", str(out)])
        assert "complete      NO" in info.output
        rerun(src, out)
        assert store_files(out) == ref_files


def test_abandoned_concurrent_writes_add_nothing_to_the_line(caplog):
    """zarr writes chunks as concurrent asyncio tasks: when one fails on a full disk, the others
    are abandoned and asyncio used to log each, with a traceback, as the process exited (seen
    in about 1 of 70 runs of the test above). After a failed write those two records are dropped,
    and nothing else is."""
    import logging

    from emtile.store import StoreWriteError, write_errors

    with pytest.raises(StoreWriteError):
        with write_errors("out.zarr"):
            raise OSError(28, "No space left on device")
    log = logging.getLogger("asyncio")
    log.error("Task exception was never retrieved\nfuture: <Task finished ...>")
    log.error("Task was destroyed but it is pending!\ntask: <Task pending ...>")
    log.error("another asyncio error")
    assert [r.getMessage() for r in caplog.records] == ["another asyncio error"]


def test_kill_while_replacing_an_incomplete_store(stack, reference, tmp_path):
    src, _ = stack
    ref_files, _ = reference
    out = tmp_path / "vol.zarr"
    assert convert_process(src, out, faults="convert.slab@2=kill").returncode == -9
    # the re-run renames the old store away, then is killed while deleting it
    assert convert_process(src, out, faults="store.removing@1=kill").returncode == -9
    assert any(".emtile-trash-" in p.name for p in tmp_path.iterdir())
    rerun(src, out)
    assert store_files(out) == ref_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.zarr"]


def test_stop_holds_the_lock_and_kill_releases_it(stack, reference, tmp_path):
    src, _ = stack
    ref_files, _ = reference
    out = tmp_path / "vol.zarr"
    env = {**os.environ, _faults.ENV: "convert.slab@2=stop"}
    first = subprocess.Popen([sys.executable, "-c", RUNNER, "convert", str(src), str(out),
                              *CONVERT_ARGS], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = 60
        while not (out / "0" / "c").exists() and deadline > 0:  # it has begun writing
            deadline -= 0.05
            __import__("time").sleep(0.05)
        second = convert_process(src, out)
        assert second.returncode == 1
        line = second.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert f"is being written by another emtile run (pid {first.pid} on" in line
        assert first.poll() is None  # the first run was neither disturbed nor replaced
    finally:
        first.kill()
        first.wait()
    assert not is_complete(out)
    r = convert_process(src, out)  # the dead run's lock does not block
    assert r.returncode == 0, r.stderr
    assert store_files(out) == ref_files


def test_fault_spec_is_checked():
    assert _faults._parse("") == ({}, None)
    rules, trace = _faults._parse("store.write@3=enospc, convert.slab@1=kill,trace=/x")
    assert rules == {"store.write": [(3, "enospc")], "convert.slab": [(1, "kill")]}
    assert trace == "/x"
    for bad in ("store.write@0=kill", "store.write=kill", "store.write@2=explode"):
        with pytest.raises(ValueError, match="bad entry"):
            _faults._parse(bad)


def test_unset_hooks_touch_nothing():
    """Without ``_EMTILE_FAULTS`` zarr's store is not wrapped and a point is an early return."""
    code = ("import emtile.volume, emtile._faults as f, zarr.storage as s; "
            "print(f._ACTIVE, hasattr(s.LocalStore, '_emtile_faults'))")
    env = {k: v for k, v in os.environ.items() if k != _faults.ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------- a fork server

SERVER = r"""
import atexit, json, os, signal, sys, threading, time, traceback

import numba, numpy, torch, zarr, tifffile  # the slow imports, once
import emtile.predictor, emtile.trainer, emtile.metrics, emtile.evaluation, emtile.plot, emtile.volume
import emtile.cli.convert, emtile.cli.info, emtile.cli.predict, emtile.cli.train
import emtile.cli.evaluate, emtile.cli.show
import scipy.stats, sklearn.metrics, torch._dynamo  # imported on first use by train, evaluate
import matplotlib
matplotlib.use("Agg", force=True)  # as emtile.plot does, for show
import matplotlib.figure, matplotlib.pyplot
try:
    import torch.utils.tensorboard
except ImportError:
    pass
from emtile import _faults
from emtile.cli.main import main

numba.njit(lambda x: x + 1)(1)  # Numba's first compilation loads its registries (~1 s)
exec(sys.argv[1])  # the module's set-up (smaller predict blocks)
# no Python thread (zarr's event loop, tqdm's monitor) and no torch or Numba thread pool: none
# started yet (BLAS pools may run: OpenBLAS re-creates its pool in a forked child)
assert threading.active_count() == 1, threading.enumerate()
print(json.dumps({"threads": torch.get_num_threads()}), flush=True)


def child(job):
    os.setpgid(0, 0)  # its own group: what it starts can be ended with it
    for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    spec = job["faults"] or ""
    os.environ.pop(_faults.ENV, None)
    if spec:
        os.environ[_faults.ENV] = spec  # as a fresh interpreter would see it
    # what emtile._faults does when it is imported with _EMTILE_FAULTS=spec
    _faults._RULES, _faults._TRACE = _faults._parse(spec)
    _faults._ACTIVE = bool(_faults._RULES) or _faults._TRACE is not None
    _faults._COUNTS = {}
    if _faults._TRACE is not None or any(p.startswith("store.") for p in _faults._RULES):
        _faults._arm_store()
    code = 1
    try:
        main(job["args"], prog_name="emtile")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    # the parts of an interpreter's shutdown that can hang or write: join the threads that are not
    # daemons, run the atexit handlers (DataLoader workers, TensorBoard), flush; the slow rest
    # (tearing down torch's modules, seconds) can do neither and is skipped
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wait(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            rc = "timeout"
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    try:  # what a killed run left (its DataLoader workers would end on their own, later)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return rc


for line in sys.stdin:
    job = json.loads(line)
    if "wait" in job:
        reply = {"rc": wait(job["wait"], job["timeout"])}
    elif "kill" in job:
        os.killpg(job["kill"], signal.SIGKILL)
        reply = {"rc": wait(job["kill"], 60)}
    else:
        pid = os.fork()
        if pid == 0:
            child(job)
        reply = {"pid": pid} if job["background"] else {"rc": wait(pid, job["timeout"])}
    print(json.dumps(reply), flush=True)
"""


@dataclass
class Result:
    rc: object  # exit status; -9 when SIGKILLed; "timeout"
    stdout: str
    stderr: str


class ForkServer:
    """``emtile ARGS`` in real processes, forked from one interpreter that imported emtile, torch
    and zarr once and touched no data (so it runs no thread a fork would lose: zarr's event
    loop, torch's and Numba's pools start in each child).

    Each child arms :mod:`emtile._faults` as a fresh interpreter with ``_EMTILE_FAULTS`` set
    would (and sets the variable for what it spawns), runs the click entry point and exits with
    its status, its stdout and stderr in files. :meth:`run` waits (killing the child's process
    group after ``timeout`` s: a hang is reported, never waited out); :meth:`start`,
    :meth:`wait` and :meth:`kill` run one in the background.
    """

    def __init__(self, folder, setup=""):
        self.folder = Path(folder)
        env = {k: v for k, v in os.environ.items() if k != _faults.ENV}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, setup], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.n, self.logs = 0, {}
        self.threads = json.loads(self.proc.stdout.readline())["threads"]  # torch's, per child

    def _ask(self, job):
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def _job(self, args, faults, background, timeout):
        self.n += 1
        files = self.folder / f"{self.n}.out", self.folder / f"{self.n}.err"
        return {"args": [str(a) for a in args], "faults": faults, "background": background,
                "timeout": timeout, "stdout": str(files[0]), "stderr": str(files[1])}, files

    @staticmethod
    def _result(rc, files):
        return Result(rc, *(f.read_text() for f in files))

    def run(self, *args, faults=None, timeout=120):
        job, files = self._job(args, faults, False, timeout)
        return self._result(self._ask(job)["rc"], files)

    def start(self, *args, faults=None):
        job, files = self._job(args, faults, True, 0)
        pid = self._ask(job)["pid"]
        self.logs[pid] = files
        return pid

    def wait(self, pid, timeout=120):
        return self._result(self._ask({"wait": pid, "timeout": timeout})["rc"], self.logs.pop(pid))

    def kill(self, pid):
        return self._result(self._ask({"kill": pid})["rc"], self.logs.pop(pid))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# predict writes blocks of at most 4000 px in 56-px chunks here: tens of blocks on a tiny volume
SETUP = ("import functools, emtile.cli.predict as cli; cli.PredictSettings = functools.partial("
         "cli.PredictSettings, max_block_px=4000, chunk_size=56)")


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("forks"), setup=SETUP)
    yield server
    server.close()


def here(forks, *args):
    """``emtile ARGS`` in this process, set up as the children are (torch thread count, so the
    same arithmetic; predict's block size): a re-run after a fault needs no fresh process (as
    ``convert``'s re-runs)."""
    import torch

    import emtile.cli.predict

    settings = emtile.cli.predict.PredictSettings
    threads = torch.get_num_threads()
    exec(SETUP, {"emtile": emtile})
    torch.set_num_threads(forks.threads)
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
        emtile.cli.predict.PredictSettings = settings


def numbered(points):
    """``[(point, n)]``: the n-th hit of each point, in the order an uninterrupted run meets
    them."""
    seen, out = Counter(), []
    for name in points:
        seen[name] += 1
        out.append((name, seen[name]))
    return out


def draw(points, n, seed, edges=()):
    """``n`` kill points drawn by a seeded generator from a run's trace, plus ``edges``."""
    hits = numbered(points)
    rng = np.random.default_rng(seed)
    picks = [hits[i] for i in sorted(rng.choice(len(hits), min(n, len(hits)), replace=False))]
    return picks + [e for e in edges if e not in picks]


def one_line(r):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def is_stopped(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def wait_until(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def write_store(path, data, *, complete=True, chunks=(1, 48, 48), kind="image"):
    group = emtile.store.create_image(path, data.shape, data.dtype, chunks=chunks, kind=kind)
    group["0"][:] = data
    if complete:
        emtile.store.mark_complete(group)
    return path


# --------------------------------------------------------------------------- predict

PREDICT_KILLS = 20
PREDICT_OPTS = ["--tile", "68", "--threshold", "0.4", "--dtype", "float32", "--no-progress"]


@pytest.fixture(scope="module")
def predicted(forks, synthetic_small, tmp_path_factory):
    """A tiny model and volume, an uninterrupted run's store and the points it reaches."""
    import torch

    from emtile.unet import UNet, save_model

    d = tmp_path_factory.mktemp("predict")
    write_store(d / "in.zarr", synthetic_small[0][:3])
    torch.manual_seed(0)
    save_model(UNet(base=4, depth=2), d / "model")
    r = predict_run(forks, d, d / "ref.zarr", faults=f"trace={d / 'trace.txt'}")
    assert r.rc == 0, r.stderr
    for name in ("0", "labels/mask/0"):  # the default: sharded, one shard file per block
        assert zarr.open_array(d / "ref.zarr" / name, mode="r").shards is not None, name
    return d, chunk_files(d / "ref.zarr"), (d / "trace.txt").read_text().split()


def predict_run(forks, d, out, *, workers=0, faults=None, source=None, timeout=120):
    return forks.run("predict", source or d / "in.zarr", out, "--model", d / "model",
                     "--workers", workers, *PREDICT_OPTS, faults=faults, timeout=timeout)


def chunk_files(store):
    """{relative path: bytes} of a store's files, less zarr's ``*.partial`` temporaries (a kill
    while zarr writes a chunk can leave one; zarr never reads it)."""
    return {k: v for k, v in store_files(store).items() if not k.endswith(".partial")}


def recorded(out):
    """The blocks an interrupted predict store records as done."""
    try:
        return int(zarr.open_group(out, mode="r")["emtile_blocks"][:].sum())
    except (FileNotFoundError, KeyError, ValueError):  # killed before the markers existed
        return 0


def resume_predict(forks, d, out, ref):
    """Re-run an interrupted prediction: it must compute only the blocks not recorded, and give
    the uninterrupted run's bytes."""
    kept = recorded(out)
    r = here(forks, "predict", d / "in.zarr", out, "--model", d / "model", "--workers", 0,
             *PREDICT_OPTS)
    assert r.exit_code == 0, r.output
    if kept:
        assert f"resumed: {kept} of " in r.output, r.output  # nothing recorded was lost
    assert is_complete(out) and is_complete(out / "labels" / "mask")
    assert chunk_files(out) == ref
    return kept


def test_predict_trace_lists_every_block(predicted):
    d, ref, points = predicted
    counts = Counter(points)
    blocks = zarr.open_group(d / "ref.zarr", mode="r")["emtile_blocks"].shape[0]
    assert blocks >= 9
    assert counts["predict.block_written"] == counts["predict.block_recorded"] == blocks
    assert counts["predict.read"] >= blocks  # one tile group a block at least
    assert counts["store.write"] >= sum("/c/" in f for f in ref)  # every chunk passes the hook


@pytest.mark.slow
def test_predict_sigkill_at_seeded_points_then_rerun_is_byte_identical(forks, predicted, tmp_path):
    d, ref, points = predicted
    last = Counter(points)
    picks = draw(points, PREDICT_KILLS, SEED + 1,
                 edges=[("predict.block_written", 1),  # written, not yet recorded
                        ("predict.block_recorded", last["predict.block_recorded"]),
                        # a read mid-run: the draw may miss reads, whose order among the writer
                        # thread's store writes varies from run to run
                        ("predict.read", (last["predict.read"] + 1) // 2),
                        ("store.write", last["store.write"])])  # the completion
    assert {name for name, _ in picks} >= {"store.write", "predict.read", "predict.block_written",
                                           "predict.block_recorded"}, picks
    resumed = []
    for k, (name, n) in enumerate(picks):
        out = tmp_path / f"run{k}" / "p.zarr"
        out.parent.mkdir()
        r = predict_run(forks, d, out, faults=f"{name}@{n}=kill")
        assert r.rc == -signal.SIGKILL, (name, n, r.rc, r.stderr)
        assert not is_complete(out), f"killed at {name} #{n}, yet the store looks complete"
        assert_whole_or_absent(out, ref, f"killed at {name} #{n}")
        resumed.append(resume_predict(forks, d, out, ref))
    assert max(resumed) > 0 and min(resumed) == 0  # runs resumed part-way, and from nothing


def assert_whole_or_absent(out, ref, where):
    """Every shard file a killed run left is the finished run's file, byte for byte: a block's
    shard is written whole or not at all (the markers, rewritten as blocks finish, aside)."""
    for key, data in chunk_files(out).items():
        if "/c/" in key and not key.startswith("emtile_blocks"):
            assert data == ref[key], f"{where}: {key} is not the finished run's shard"


def marker_writes(points):
    """The numbers of the ``store.write`` hits that write a block's done-marker: predict's writer
    thread writes a block's chunks, passes ``predict.block_written``, writes its marker, then
    passes ``predict.block_recorded`` (the reader thread's ``predict.read`` interleaves)."""
    hits = [hit for hit in numbered(points) if hit[0] != "predict.read"]
    return {n for (name, n), (after, _) in zip(hits, hits[1:])
            if name == "store.write" and after == "predict.block_recorded"}


def predict_write_fails(forks, d, ref, out, n, action, reason):
    out.parent.mkdir()
    r = predict_run(forks, d, out, faults=f"store.write@{n}={action}")
    assert r.rc == 1, (n, r.stderr)
    line = one_line(r)
    assert line.startswith(f"Error: writing '{out}' failed: {reason}"), line
    assert line.endswith("left incomplete ('emtile info' shows complete NO): free space or "
                         "fix permissions, then run the same command again to resume"), line
    assert not is_complete(out)
    resume_predict(forks, d, out, ref)


ACTIONS = [("enospc", "No space left on device"), ("eacces", "Permission denied")]


@pytest.mark.parametrize("action,reason", ACTIONS)
def test_predict_failed_chunk_write_is_one_line_and_rerun_finishes(forks, predicted, tmp_path,
                                                                   action, reason):
    """ENOSPC / EACCES at drawn writes of the set-up, the chunks and the completion."""
    d, ref, points = predicted
    writes = Counter(points)["store.write"]
    others = sorted(set(range(2, writes)) - marker_writes(points))
    rng = np.random.default_rng([SEED, 2, _faults.ACTIONS.index(action)])
    for n in sorted({writes, *rng.choice(others, 3, replace=False).tolist()}):
        predict_write_fails(forks, d, ref, tmp_path / f"{action}{n}" / "p.zarr", n, action, reason)


@pytest.mark.parametrize("action,reason", ACTIONS)
def test_predict_failed_marker_write_is_one_line_and_rerun_finishes(forks, predicted, tmp_path,
                                                                    action, reason):
    d, ref, points = predicted
    n = sorted(marker_writes(points))[1]  # the second block's marker
    predict_write_fails(forks, d, ref, tmp_path / f"{action}{n}" / "p.zarr", n, action, reason)


def test_predict_with_a_reader_process_killed_fails_cleanly_or_recovers(forks, predicted,
                                                                        tmp_path):
    """``--workers 2``: every reader process SIGKILLs itself at its N-th tile group, before any
    block or part-way. The run ends within the timeout with one line (or finishes), and a re-run
    gives the same bytes."""
    d, ref, _ = predicted
    for n in (1, 6):
        out = tmp_path / f"read{n}" / "p.zarr"
        out.parent.mkdir()
        r = predict_run(forks, d, out, workers=2, faults=f"predict.read@{n}=kill", timeout=90)
        assert r.rc in (0, 1), (n, r.rc, r.stderr)  # not "timeout": it never hangs
        if r.rc == 1:
            line = one_line(r)
            assert line.startswith("Error: a process reading tiles of the input died"), line
            assert line.endswith("run the same command again to resume"), line
            assert not is_complete(out)
        resume_predict(forks, d, out, ref)


def test_predict_never_resumes_onto_an_input_changed_in_place(forks, predicted, tmp_path):
    """The resume fingerprint holds the input's content token: one chunk rewritten in place
    (same metadata, same shape) after a kill, and the re-run starts over."""
    import shutil

    d, ref, _ = predicted
    src = tmp_path / "in.zarr"
    shutil.copytree(d / "in.zarr", src)
    out = tmp_path / "p.zarr"
    r = predict_run(forks, d, out, faults="predict.block_recorded@3=kill", source=src)
    assert r.rc == -signal.SIGKILL and recorded(out) == 3
    zarr.open_array(src / "0", mode="r+")[0, :48, :48] = 0  # blocks already done read this
    args = ["--model", d / "model", "--workers", 0, *PREDICT_OPTS]
    again = here(forks, "predict", src, out, *args)
    assert again.exit_code == 0 and "resumed" not in again.output, again.output
    fresh = here(forks, "predict", src, tmp_path / "fresh.zarr", *args)
    assert fresh.exit_code == 0, fresh.output
    assert chunk_files(out) == chunk_files(tmp_path / "fresh.zarr") != ref


def test_a_second_predict_into_a_live_runs_output_is_refused(forks, predicted, tmp_path):
    d, ref, _ = predicted
    out = tmp_path / "p.zarr"
    first = forks.start("predict", d / "in.zarr", out, "--model", d / "model", "--workers", 0,
                        *PREDICT_OPTS, faults="predict.block_recorded@3=stop")
    try:
        wait_until(lambda: is_stopped(first), "the first run to stop")
        r = predict_run(forks, d, out)
        assert r.rc == 1
        assert f"is being written by another emtile run (pid {first} on" in one_line(r)
        assert is_stopped(first)  # neither disturbed nor replaced
    finally:
        assert forks.kill(first).rc == -signal.SIGKILL
    assert resume_predict(forks, d, out, ref) == 3  # the dead run's lock does not block


# --------------------------------------------------------------------------- train

TRAIN_KILLS = 16


def train_args(d, out, *extra):
    return ["train", "--raw", d / "raw.zarr", "--labels", d / "labels.zarr", "--out", out,
            "--train-slices", "0:4", "--val-slices", "4:6", "--iterations", "6", "--val-every",
            "2", "--base", "4", "--depth", "2", "--tile", "68", "--batch-size", "2", "--seed",
            "1", "--workers", "0", "--no-progress", "--no-tune-segment", *extra]


def run_state(out):
    """What a finished run must reproduce: the weights of last/ and best/, and train.csv without
    its clock column."""
    with open(out / "train.csv", newline="") as f:
        rows = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(f)]
    return {"last": (out / "last" / "model.safetensors").read_bytes(),
            "best": (out / "best" / "model.safetensors").read_bytes(), "rows": rows}


@pytest.fixture(scope="module")
def trained(forks, synthetic_small, tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    write_store(d / "raw.zarr", synthetic_small[0])
    write_store(d / "labels.zarr", synthetic_small[1])
    r = forks.run(*train_args(d, d / "ref"), faults=f"trace={d / 'trace.txt'}")
    assert r.rc == 0, r.stderr
    return d, run_state(d / "ref"), (d / "trace.txt").read_text().split()


def check_nothing_lost(out):
    """An interrupted run folder: last/ (if any) loads, and train.csv holds every step it holds."""
    from emtile.training.run import STATE_FILE

    last = out / "last" if (out / "last").exists() else out / "last.old"
    if not (last / STATE_FILE).exists():
        return 0
    import torch

    k = torch.load(last / STATE_FILE, weights_only=True)["iteration"]
    with open(out / "train.csv", newline="") as f:
        logged = [int(r["iteration"]) for r in csv.DictReader(f)]
    assert logged[:k] == list(range(1, k + 1)), (k, logged)
    return k


def resume_train(forks, d, out, ref):
    """``--resume`` an interrupted run; it must end as the uninterrupted run did."""
    r = here(forks, *train_args(d, out, "--resume"))
    if not (out / "run.json").exists():  # stopped before it wrote anything: nothing to resume
        assert r.exit_code == 1 and r.output.startswith("Error: nothing to resume"), r.output
        r = here(forks, *train_args(d, out))
    assert r.exit_code == 0, r.output
    assert run_state(out) == ref
    assert json.loads((out / "run.json").read_text())["finished"] is True
    left = {p.name for p in out.iterdir()} - {"tensorboard"}
    assert left == {"best", "last", "run.json", "train.csv"}, left  # no .tmp / .old left over


def test_train_trace_lists_steps_checkpoints_and_writes(trained):
    _, ref, points = trained
    counts = Counter(points)
    assert counts["train.step"] == 6 and counts["train.checkpoint"] == 3
    assert counts["train.write"] >= 6 + 3 * 4  # rows, and each checkpoint's files and renames
    assert [int(r["iteration"]) for r in ref["rows"]] == list(range(1, 7))


@pytest.mark.slow
def test_train_sigkill_at_seeded_points_then_resume_is_identical(forks, trained, tmp_path):
    d, ref, points = trained
    last = Counter(points)
    # the training's own points (runs here tune no segmentation: --no-tune-segment; a tuning
    # that fails keeps the model, tests/test_segment_tuning.py)
    own = [p for p in points if p.startswith("train.")]
    picks = draw(own, TRAIN_KILLS, SEED + 3,
                 edges=[("train.write", 1),  # before run.json: nothing to resume yet
                        ("train.checkpoint", last["train.checkpoint"]),  # before calibrating
                        ("train.write", last["train.write"])])  # before it is marked finished
    assert {name for name, _ in picks} >= {"train.step", "train.checkpoint", "train.write"}, picks
    kept = []
    for k, (name, n) in enumerate(picks):
        out = tmp_path / f"run{k}"
        r = forks.run(*train_args(d, out), faults=f"{name}@{n}=kill")
        assert r.rc == -signal.SIGKILL, (name, n, r.rc, r.stderr)
        kept.append(check_nothing_lost(out))
        resume_train(forks, d, out, ref)
    assert max(kept) == 6 and min(kept) == 0  # killed after its last checkpoint, and before any


def test_train_killed_between_the_renames_of_a_save_resumes(forks, trained, tmp_path):
    """No fault point lies between the two renames of a folder replacement (see
    :func:`emtile.training.run.replace_folder`); this makes the state a kill there leaves, after
    the last checkpoint: ``last/`` and ``best/`` renamed to ``.old``, a half-written ``.tmp``."""
    import shutil

    d, ref, points = trained
    out = tmp_path / "run"
    r = forks.run(*train_args(d, out),
                  faults=f"train.checkpoint@{Counter(points)['train.checkpoint']}=kill")
    assert r.rc == -signal.SIGKILL
    def best_iteration(run):
        return json.loads((run / "best" / "metadata.json").read_text())["emtile"]["iteration"]

    assert best_iteration(out) == best_iteration(d / "ref")
    for name in ("last", "best"):
        (out / name).rename(out / f"{name}.old")
    shutil.copytree(out / "best.old", out / "best.tmp")
    (out / "best.tmp" / "model.safetensors").write_bytes(b"half")
    resume_train(forks, d, out, ref)  # best/ is the reference run's best model, calibrated once


@pytest.mark.parametrize("action,reason,code", [("enospc", "No space left on device", "ENOSPC"),
                                                ("eacces", "Permission denied", "EACCES")])
def test_train_failed_write_is_one_line_and_resume_finishes(forks, trained, tmp_path, action,
                                                            reason, code):
    d, ref, points = trained
    writes = Counter(points)["train.write"]
    rng = np.random.default_rng([SEED, 3, _faults.ACTIONS.index(action)])
    for n in sorted({writes, *rng.integers(1, writes, 3).tolist()}):
        out = tmp_path / f"{action}{n}"
        r = forks.run(*train_args(d, out), faults=f"train.write@{n}={action}")
        assert r.rc == 1, (n, r.stderr)
        line = one_line(r)
        assert line.startswith(f"Error: writing '{out}' failed: {reason}"), line
        assert line.endswith(f"({code}); the run keeps its last checkpoint: free space or fix "
                             f"permissions, then run with --resume to continue"), line
        check_nothing_lost(out)
        resume_train(forks, d, out, ref)


def test_a_second_train_into_a_live_runs_folder_is_refused(forks, trained, tmp_path):
    d, ref, _ = trained
    out = tmp_path / "run"
    first = forks.start(*train_args(d, out), faults="train.checkpoint@1=stop")
    try:
        wait_until(lambda: is_stopped(first), "the first run to stop")
        for extra in ((), ("--resume",), ("--overwrite",)):
            r = forks.run(*train_args(d, out, *extra))
            assert r.rc == 1
            assert f"is being written by another emtile run (pid {first} on" in one_line(r)
        assert is_stopped(first)
    finally:
        assert forks.kill(first).rc == -signal.SIGKILL
    assert check_nothing_lost(out) == 2
    resume_train(forks, d, out, ref)  # the dead run's lock does not block


# --------------------------------------------------------------------------- damaged, unfinished inputs


def damage(chunk_file):
    """Overwrite a chunk's compressed payload in place (same size), as a bad disk would."""
    data = bytearray(Path(chunk_file).read_bytes())
    data[16:48] = bytes(range(32))
    Path(chunk_file).write_bytes(bytes(data))


DAMAGED = ("Error: damaged input '{store}': chunk '0/c/1/1/0' (voxels z 1:2, y {y}:96, x 0:{y}) "
           "cannot be read (")


@pytest.fixture(scope="module")
def damaged(trained, predicted, synthetic_small, tmp_path_factory):
    """Copies of the inputs with chunk 1/1/0 damaged (z 1, y 48:96, x 0:48 of raw, y 56:96,
    x 0:56 of the prediction ref.zarr), and labels of ref.zarr's shape."""
    import shutil

    d = tmp_path_factory.mktemp("damaged")
    for src in (trained[0] / "raw.zarr", trained[0] / "labels.zarr", predicted[0] / "ref.zarr"):
        shutil.copytree(src, d / src.name)
    write_store(d / "truth.zarr", synthetic_small[1][:3], kind="labels")
    for name in ("raw.zarr", "ref.zarr"):
        damage(d / name / "0" / "c" / "1" / "1" / "0")
    return d


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_chunk_in_predict_is_one_line(forks, predicted, damaged, tmp_path, workers):
    d = predicted[0]
    out = tmp_path / "p.zarr"
    r = predict_run(forks, d, out, workers=workers, source=damaged / "raw.zarr")
    assert r.rc == 1 and one_line(r).startswith(DAMAGED.format(store=damaged / "raw.zarr", y=48))
    assert not is_complete(out)


def test_damaged_chunk_in_train_is_one_line_from_a_dataloader_worker(forks, trained, damaged,
                                                                    tmp_path):
    # one training slice, the damaged one: the first patch a worker reads holds the chunk
    args = ["train", "--raw", damaged / "raw.zarr", "--labels", damaged / "labels.zarr", "--out",
            tmp_path / "run", "--train-slices", "1", "--iterations", "2", "--base", "4",
            "--depth", "2", "--tile", "68", "--workers", "1", "--no-progress"]
    r = forks.run(*args)
    assert r.rc == 1 and one_line(r).startswith(DAMAGED.format(store=damaged / "raw.zarr", y=48))
    assert not (tmp_path / "run" / "last").exists()


def test_damaged_chunk_in_evaluate_is_one_line(forks, damaged, tmp_path):
    r = forks.run("evaluate", damaged / "ref.zarr", damaged / "truth.zarr", "--no-progress",
                  "--json", tmp_path / "s.json")
    assert r.rc == 1 and one_line(r).startswith(DAMAGED.format(store=damaged / "ref.zarr", y=56))
    assert not (tmp_path / "s.json").exists()


def test_every_command_refuses_an_unfinished_store_as_input(forks, synthetic_small, predicted,
                                                            tmp_path):
    raw, labels = synthetic_small
    unfinished = write_store(tmp_path / "unfinished.zarr", raw, complete=False)
    good = write_store(tmp_path / "labels.zarr", labels, kind="labels")
    model = predicted[0] / "model"
    commands = {
        "predict": ["predict", unfinished, tmp_path / "p.zarr", "--model", model, "--tile", "68"],
        "train": ["train", "--raw", unfinished, "--labels", good, "--out", tmp_path / "run",
                  "--train-slices", "0:4", "--iterations", "1", "--base", "4", "--depth", "2",
                  "--tile", "68"],
        "evaluate": ["evaluate", unfinished, good, "--json", tmp_path / "s.json"],
        "show": ["show", unfinished, "--labels", good, "-o", tmp_path / "f.png"],
        "convert": ["convert", unfinished, tmp_path / "c.zarr"],
    }
    for command, args in commands.items():
        r = forks.run(*args)
        assert r.rc == 1, (command, r.stderr)
        assert one_line(r) == (f"Error: input '{unfinished}' is an emtile store whose writer has "
                               f"not finished (interrupted, or still running; 'emtile info' "
                               f"shows complete NO): run the command that writes it again to "
                               f"finish it"), command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.zarr", "unfinished.zarr"]
