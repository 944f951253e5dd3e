"""Injected faults in real processes: SIGKILL at points drawn by a seeded generator, and writes that
fail part-way (ENOSPC, EACCES) at the store layer. After each, a plain re-run must give a store
byte-identical to an uninterrupted run's, and nothing may look complete before it is.

The hooks are :mod:`emtile._faults` (``_EMTILE_FAULTS``); ``trace=PATH`` lists every point an
uninterrupted run reaches, and the kill points are drawn from that list.
"""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
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
RUNNER = ("import sys, emtile.volume as v; v.SLAB_BYTES = 2 * 64 * 64; "
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
    assert len(points) >= 40


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
