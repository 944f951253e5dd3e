"""The store's rules on real stores in tmp_path: completeness, safe replacement, resume state, the
one output rule (never write over an input), write errors, and the one-run-per-output lock."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

import emtile
from emtile import EmtileError, store
from emtile.cli.main import main
from emtile.store import (check_output, create_image, is_complete, lock_path, mark_complete,
                          output_lock, prepare_output, write_errors)


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def stack(tmp_path, rng):
    data = rng.integers(0, 255, size=(4, 32, 32), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    return path, data


def store_bytes(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------ completeness


def test_complete_only_after_mark_complete(tmp_path):
    out = tmp_path / "o.zarr"
    group = create_image(out, (2, 8, 8), np.uint8)
    assert group.attrs["emtile"]["complete"] is False and not is_complete(out)
    group["0"][:] = 1
    mark_complete(group, note="x")
    assert is_complete(out)
    assert zarr.open_group(out, mode="r").attrs["emtile"]["note"] == "x"


def test_foreign_store_and_non_store_are_not_complete(tmp_path):
    zarr.create_array(store=tmp_path / "foreign.zarr", shape=(2, 2), dtype="u1")
    (tmp_path / "plain").mkdir()
    for path in ("foreign.zarr", "plain", "missing"):
        assert not is_complete(tmp_path / path)


# ------------------------------------------------------------------ prepare_output


def test_prepare_output_states(tmp_path):
    out = tmp_path / "o.zarr"
    assert prepare_output(out) == "new"
    create_image(out, (2, 8, 8), np.uint8)  # incomplete
    assert prepare_output(out, resume=True) == "resume" and out.exists()
    assert prepare_output(out) == "replaced" and not out.exists()
    mark_complete(create_image(out, (2, 8, 8), np.uint8))
    with pytest.raises(EmtileError, match=r"already exists; pass overwrite=True"):
        prepare_output(out)
    with pytest.raises(EmtileError, match="already exists"):
        prepare_output(out, resume=True)  # a finished store is never resumed
    assert is_complete(out)
    assert prepare_output(out, overwrite=True) == "replaced" and not out.exists()


def test_prepare_output_never_deletes_a_non_store(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("data")
    (tmp_path / "file.zarr").write_text("data")
    for name, what in (("folder", "folder"), ("file.zarr", "file")):
        with pytest.raises(EmtileError, match=f"existing {what} that is not a Zarr store"):
            prepare_output(tmp_path / name, overwrite=True)
    assert (tmp_path / "folder" / "keep.txt").read_text() == "data"
    assert (tmp_path / "file.zarr").read_text() == "data"


def test_an_empty_folder_is_reused(tmp_path):
    (tmp_path / "o.zarr").mkdir()  # what a run killed as it created the store leaves
    assert prepare_output(tmp_path / "o.zarr") == "new"


def test_replacing_leaves_no_trash(tmp_path):
    out = tmp_path / "o.zarr"
    create_image(out, (2, 8, 8), np.uint8)
    trash = tmp_path / f".o.zarr{store.TRASH}deadbeef"  # a killed removal's left-over
    trash.mkdir()
    (trash / "c").write_bytes(b"x")
    prepare_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_prepare_output_checks_the_folder(tmp_path):
    with pytest.raises(EmtileError, match="does not exist"):
        prepare_output(tmp_path / "no" / "o.zarr")


# ------------------------------------------------------------------ the output rule


@pytest.fixture
def inputs(tmp_path):
    """Every kind of input the rule must see through."""
    (tmp_path / "out").mkdir()
    tif = tmp_path / "a.tif"
    tifffile.imwrite(tif, np.zeros((2, 8, 8), np.uint8))
    pred = tmp_path / "pred.zarr"
    create_image(pred, (2, 8, 8), np.uint8)
    zarr.open_group(pred, mode="r+").create_group("labels")
    create_image(pred / "labels" / "mask", (2, 8, 8), np.uint8)
    (tmp_path / "slices").mkdir()
    for i in range(2):
        tifffile.imwrite(tmp_path / "slices" / f"s{i}.tif", np.zeros((8, 8), np.uint8))
    (tmp_path / "vol.h5").write_bytes(b"")
    os.symlink(tmp_path / "out", tmp_path / "link")
    return tmp_path


@pytest.mark.parametrize("inp,out,how", [
    ("out/self.zarr", "out/self.zarr", "is"),
    ("./out/../out/self.zarr/", "out/self.zarr", "is"),
    ("out/self.zarr", "link/self.zarr", "is"),  # through a symlink
    ("out/self.zarr", "out", "holds"),
    ("out/self.zarr", "out/self.zarr/x.zarr", "lies inside"),
    ("a.tif", "a.tif", "is"),
    ("a.tif", ".", "holds"),
    ("pred.zarr/labels/mask", "pred.zarr", "holds"),
    ("pred.zarr/labels/mask", "pred.zarr/labels/mask", "is"),
    ("pred.zarr/labels/mask", "pred.zarr/labels/other.zarr", "lies inside"),  # the input's store
    ("slices/*.tif", "slices/s1.tif", "is"),
    ("slices/*.tif", "slices", "holds"),
    ("slices", "slices/vol.zarr", "lies inside"),
    ("vol.h5/raw", "vol.h5", "is"),
])
def test_output_that_is_holds_or_lies_inside_an_input_is_refused(inputs, monkeypatch, inp, out,
                                                                   how):
    monkeypatch.chdir(inputs)
    (inputs / "out" / "self.zarr").mkdir(exist_ok=True)
    expected = re.escape(f"output '{out}' {how} the input '{inp}'") + ".*could destroy"
    with pytest.raises(EmtileError, match=expected):
        check_output(out, inputs=["a.tif", inp])


@pytest.mark.parametrize("inp,out", [("out/self.zarr", "out/other.zarr"),
                                     ("pred.zarr/labels/mask", "mask.zarr"),
                                     ("slices/*.tif", "slices.zarr"), ("a.tif", "a.zarr")])
def test_outputs_beside_inputs_are_fine(inputs, monkeypatch, inp, out):
    monkeypatch.chdir(inputs)
    check_output(out, inputs=[inp, None, np.zeros(3)])


def test_files_to_write_are_checked(inputs):
    out = inputs / "new.zarr"
    check_output(out, inputs=[inputs / "a.tif"], files={"json_path": inputs / "s.json"})
    with pytest.raises(EmtileError, match=r"json_path='.*pred\.zarr/s\.json' lies inside the input"):
        check_output(None, inputs=[inputs / "pred.zarr"], files={"json_path": inputs / "pred.zarr/s.json"})
    with pytest.raises(EmtileError, match=r"csv_path='.*missing_dir/s\.csv': its folder .* does not exist"):
        check_output(out, files={"csv_path": inputs / "missing_dir" / "s.csv"})
    with pytest.raises(EmtileError, match=r"output='.*slices' is an existing folder; give a file path"):
        check_output(None, files={"output": inputs / "slices"})
    with pytest.raises(EmtileError, match=r"output file '.*x\.png': its folder .* does not exist"):
        check_output(None, files=[inputs / "nope" / "x.png"])


def test_an_existing_file_is_replaced_unless_overwrite_is_false(tmp_path):
    package = tmp_path / "m.zip"
    package.write_text("mine")
    check_output(None, files={"path": package})  # files are replaced by default (--json, -o)
    with pytest.raises(EmtileError, match=r"^path='.*m\.zip' already exists; pass overwrite=True "
                                          r"to replace it$"):
        check_output(None, files={"path": package}, overwrite=False)
    check_output(None, files={"path": package}, overwrite=True)
    check_output(None, files={"path": tmp_path / "new.zip"}, overwrite=False)


def test_unwritable_folder_is_refused(tmp_path):
    with pytest.raises(EmtileError, match="is not writable"):
        check_output("/proc/emtile-test.zarr")


@pytest.mark.parametrize("spelling", ["out/self.zarr", "./out/../out/self.zarr/", "out//self.zarr"])
def test_convert_never_writes_over_its_input(tmp_path, stack, monkeypatch, spelling):
    """The issue's case: convert X X --overwrite destroyed X (all zeros, marked complete)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert run_cli("convert", stack[0], "out/self.zarr", "--no-progress").exit_code == 0
    before = store_bytes(tmp_path / "out" / "self.zarr")
    r = run_cli("convert", spelling, "out/self.zarr", "--overwrite", "--no-progress")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "is the input" in r.output and len(r.output.strip().splitlines()) == 1
    assert store_bytes(tmp_path / "out" / "self.zarr") == before
    np.testing.assert_array_equal(emtile.open_volume(tmp_path / "out" / "self.zarr")[:], stack[1])


# ------------------------------------------------------------------ write errors


def test_write_errors_become_one_line(tmp_path):
    with pytest.raises(store.StoreWriteError, match=r"writing 'o\.zarr' failed: No space left on "
                                                    r"device \(ENOSPC\); the output is left incomplete"):
        with write_errors("o.zarr"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(KeyError):  # not a write failure: untouched
        with write_errors("o.zarr"):
            raise KeyError("x")


def test_a_real_read_only_output_folder(tmp_path, stack):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders")
    out = tmp_path / "ro" / "o.zarr"
    out.parent.mkdir()
    out.parent.chmod(0o555)
    try:
        r = run_cli("convert", stack[0], out)
        assert r.exit_code == 1 and "is not writable" in r.output
    finally:
        out.parent.chmod(0o755)


# ------------------------------------------------------------------ locks


def test_lock_records_the_holder_and_is_removed(tmp_path):
    out = tmp_path / "o.zarr"
    with output_lock(out) as path:
        assert path == lock_path(tmp_path / "./o.zarr/") == tmp_path / ".o.zarr.emtile-lock"
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(EmtileError, match=rf"output '.*o\.zarr' is being written by another "
                                              rf"emtile run \(pid {os.getpid()} on"):
            with output_lock(tmp_path / "o.zarr/"):  # the same output, spelled differently
                pass
    assert not path.exists()
    with output_lock(out):  # free again
        pass


HOLD = """
import os, sys, time
from emtile.store import output_lock
with output_lock(sys.argv[1]):
    child = 0
    if sys.argv[2] == "orphan":  # a reader process that outlives its killed parent
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
    print("held", child, flush=True)
    time.sleep(60)
"""


def hold_lock(out, mode="plain"):
    """A process holding ``out``'s lock; returns it and the pid of its forked child (or 0)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), mode], stdout=subprocess.PIPE,
                            text=True)
    word, child = proc.stdout.readline().split()
    assert word == "held"
    return proc, int(child)


def test_lock_of_a_live_process_refuses_and_a_killed_one_does_not(tmp_path):
    out = tmp_path / "o.zarr"
    proc, _ = hold_lock(out)
    try:
        with pytest.raises(EmtileError, match=f"another emtile run \\(pid {proc.pid} on"):
            with output_lock(out):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_path(out).exists()  # left behind by the killed run...
    with output_lock(out):  # ...and stale
        pass


def test_lock_kept_by_orphans_of_a_killed_run_is_stale(tmp_path):
    import fcntl

    out = tmp_path / "o.zarr"
    proc, child = hold_lock(out, mode="orphan")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        with open(lock_path(out)) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the fork still holds the flock
        with output_lock(out):  # but the record names a dead run: stale
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_lock_without_flock_uses_the_record(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "o.zarr"
    path = lock_path(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with output_lock(out):  # dead on this host: stale, taken over
        assert json.loads(path.read_text())["pid"] == os.getpid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(),
                                    "started": "then"}))
        with pytest.raises(EmtileError, match=f"pid {live.pid} on"):
            with output_lock(out):
                pass
    finally:
        live.kill()
        live.wait()
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(EmtileError, match=r"pid 1 on elsewhere.*delete '.*\.o\.zarr\.emtile-lock'"):
        with output_lock(out):
            pass
