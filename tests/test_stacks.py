"""emtile.stacks (stacks slab by slab, binary labels, the writer thread) and emtile.volume's
open_input (paths or arrays): one home each; metrics, plot, sampling, the trainer, convert and
predict use them."""

import threading

import numpy as np
import pytest
import zarr

from emtile import EmtileError
from emtile.stacks import (LabelChecker, Stack, WriterThread, check_labels, open_stack,
                           resolve_slices, slab_depth, slice_runs)
from emtile.volume import open_input


def test_resolve_slices_forms_and_errors():
    assert resolve_slices(None, 3) == [0, 1, 2]
    assert resolve_slices(2, 3) == [2]
    assert resolve_slices(slice(1, None), 4) == [1, 2, 3]
    assert resolve_slices(np.array([3, 0, 3]), 4) == [0, 3]
    with pytest.raises(EmtileError, match=r"val_slices=2:9 is outside the volume, which has 5 slices \(0 to 4\)"):
        resolve_slices(slice(2, 9), 5, name="val_slices")
    with pytest.raises(EmtileError, match=r"slices=5,7 is outside the volume, which has 5 slices"):
        resolve_slices([1, 5, 7], 5)
    with pytest.raises(EmtileError, match="slices=0:4:2 has a step, which is not supported"):
        resolve_slices(slice(0, 4, 2), 5)
    with pytest.raises(EmtileError, match=r"slices is empty: give at least one slice index in 0..4"):
        resolve_slices([], 5)
    with pytest.raises(EmtileError, match=r"which has 1 slice \(0 to 0\)"):
        resolve_slices([1], 1)


def test_slice_runs_and_slab_depth():
    assert slice_runs([]) == []
    assert slice_runs([2, 3, 4, 7]) == [(2, 5), (7, 8)]
    assert slice_runs([0, 1, 2, 3, 4], max_len=2) == [(0, 2), (2, 4), (4, 5)]
    # (Z, 512, 512) uint8 is 256 KiB a slice: 64 MiB hold 256 slices, in whole chunks of 3
    assert slab_depth((1000, 512, 512), 1) == 256
    assert slab_depth((1000, 512, 512), 1, chunk_z=3) == 255
    assert slab_depth((10, 512, 512), 4) == 10  # never more than the stack
    assert slab_depth((10, 512, 512), 4, budget=1) == 1


def test_label_checker_accepts_one_encoding_across_slabs():
    checker = LabelChecker()
    fg = checker.foreground(np.array([[0, 255]], np.uint8), "slab 0")
    assert fg.dtype == bool and fg.tolist() == [[False, True]]
    checker.foreground(np.array([[255, 255]], np.uint8), "slab 1")
    with pytest.raises(EmtileError, match=r"labels are not binary in slab 2: found 3 values: 0, 1, 255"):
        checker.foreground(np.array([[1, 0]], np.uint8), "slab 2")  # 1 after 255: mixed
    with pytest.raises(EmtileError, match=r"found 4 values: 0, 0.5, 1, 2; .*threshold=T"):
        LabelChecker().foreground(np.array([0.0, 0.5, 1.0, 2.0]), "x")
    booleans = np.array([True, False])
    assert LabelChecker().foreground(booleans, "x") is booleans


def test_check_labels_reads_slice_by_slice_and_counts_the_foreground():
    class Spy:
        shape, dtype, ndim = (3, 2, 2), np.dtype(np.uint8), 3

        def __init__(self):
            self.keys = []

        def __getitem__(self, key):
            self.keys.append(key)
            return np.array([[1, 0], [0, 0]], np.uint8) * (key + 1 if key < 2 else 255)

    spy = Spy()
    with pytest.raises(EmtileError, match="not binary in slice 1: found 3 values: 0, 1, 2"):
        check_labels(spy, [0, 1])
    assert spy.keys == [0, 1]
    assert check_labels(Spy(), [0]) == 0.25


def test_open_input_paths_arrays_and_errors(tmp_path):
    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=(2, 3, 4), dtype="uint8")
    array, path = open_input(tmp_path / "v.zarr")
    assert array.shape == (2, 3, 4) and path == str(tmp_path / "v.zarr")
    array, path = open_input(z)
    assert array is z and path is None
    array, path = open_input([[1, 2], [3, 4]])
    assert isinstance(array, np.ndarray) and path is None
    with pytest.raises(EmtileError, match="raw must be a path or an array .*, got object"):
        open_input(object(), name="raw")


def test_stack_views_and_names():
    two_d = open_stack(np.ones((3, 4), np.uint8), name="pred")
    assert two_d.shape == (1, 3, 4) and two_d.display == "pred array"
    assert two_d.read(0, 1).shape == (1, 3, 4)
    channel = Stack(np.arange(2 * 3 * 4).reshape(1, 2, 3, 4), "c")
    np.testing.assert_array_equal(channel.read(1, 2, (slice(0, 2), slice(1, 3))),
                                  np.arange(24).reshape(2, 3, 4)[1:2, 0:2, 1:3])
    with pytest.raises(EmtileError, match=r"x has shape \(2, 2, 2, 2\): expected \(Z, Y, X\)"):
        Stack(np.zeros((2, 2, 2, 2)), "x")


def test_writer_thread_keeps_order_and_runs_off_the_callers_thread():
    done, threads = [], set()

    def work(i, value):
        done.append((i, value))
        threads.add(threading.current_thread().name)

    with WriterThread(work, initializer=lambda: threads.add("initialised")) as writer:
        for i in range(20):
            writer.put(i, i * i)
    assert done == [(i, i * i) for i in range(20)]
    assert threads == {"initialised", "emtile-writer"}


def test_writer_thread_raises_the_first_error_and_skips_the_rest():
    release = threading.Event()
    done = []

    def work(i):
        release.wait()
        if i == 1:
            raise ValueError("disk full")
        done.append(i)

    writer = WriterThread(work, depth=10)
    for i in range(5):
        writer.put(i)
    release.set()
    with pytest.raises(ValueError, match="disk full"):
        writer.close()
    assert done == [0]  # items after the failed one were skipped
    with pytest.raises(ValueError, match="disk full"):
        writer.put(9)


def test_writer_thread_abort_skips_what_is_queued():
    started, release, done = threading.Event(), threading.Event(), []

    def work(i):
        started.set()
        release.wait()
        done.append(i)

    writer = WriterThread(work, depth=10)
    for i in range(4):
        writer.put(i)
    started.wait()
    threading.Timer(0.2, release.set).start()  # item 0 finishes after abort() began waiting
    writer.abort()
    assert done == [0] and not writer.thread.is_alive()


def test_info_table_writes_sizes_as_tqdm_does(tmp_path):
    from click.testing import CliRunner

    from emtile.cli.main import main
    from emtile.store import create_image, mark_complete

    mark_complete(create_image(tmp_path / "v.zarr", (2, 512, 512), "uint8"))
    result = CliRunner().invoke(main, ["info", str(tmp_path / "v.zarr")])
    assert result.exit_code == 0, result.output
    assert "uncompressed  524kB\n" in result.output  # 2 x 512 x 512 bytes
    assert "complete      yes" in result.output


def test_slices_in_the_clis_spelling_from_python():
    """``"25:30"`` and ``"25,27"`` mean from Python what they mean on the command line (the
    README's API example uses them); anything else is one line naming the parameter."""
    from emtile import TrainSettings
    from emtile.stacks import resolve_slices

    assert resolve_slices("25:30", 30) == [25, 26, 27, 28, 29]
    assert resolve_slices(":2", 30) == [0, 1] and resolve_slices("3,1", 5) == [1, 3]
    with pytest.raises(EmtileError, match=r"slices='0-25' is not a slice range like 25:30"):
        resolve_slices("0-25", 30)
    with pytest.raises(EmtileError, match=r"outside the volume"):
        resolve_slices("25:31", 30)
    s = TrainSettings(train_slices="0:25", val_slices="25,27")
    assert s.train_slices == slice(0, 25) and s.val_slices == [25, 27]
    assert s.to_json()["train_slices"] == "0:25"
    with pytest.raises(EmtileError, match=r"val_slices='x' is not a slice range"):
        TrainSettings(train_slices="0:25", val_slices="x")
