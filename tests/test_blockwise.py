"""emtile.blockwise: one driver for every blockwise stage, here and on real Dask workers on
127.0.0.1; one runner whose options are checked once for every command; every command's
defaults are its settings' fields."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import click
import cloudpickle
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from emtile import EmtileError
from emtile.blockwise import Pass, Runner, Stage, run_stage
from emtile.cli.main import main
from emtile.distributed import start_cluster
from emtile.store import create_image, is_complete, mark_complete

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- a toy stage


@dataclass(frozen=True)
class ToyJob:
    input: str
    output: str
    rows: int  # rows of the first axis per block
    log: str  # each block appends "pass id" here: what ran


class ToyPlan:
    """Blocks of ``rows`` rows along the first axis."""

    def __init__(self, n, rows):
        self.n, self.rows = n, rows

    def __len__(self):
        return -(-self.n // self.rows)

    def box(self, i):
        return slice(i * self.rows, min(self.n, (i + 1) * self.rows))


def _log(job, name, ids):
    with open(job.log, "a") as f:
        f.writelines(f"{name} {i}\n" for i in ids)


def double_blocks(job, ids):
    """Pass 1: ``work/twice = 2 * input``; a block's result is its voxel count."""
    src = zarr.open_array(job.input, mode="r")
    dst = zarr.open_group(job.output, mode="r+")["work/twice"]
    plan = ToyPlan(src.shape[0], job.rows)
    out = []
    for i in ids:
        box = plan.box(i)
        dst[box] = 2 * np.asarray(src[box], np.int32)
        out.append(int(np.prod(dst[box].shape)))
    _log(job, "double", ids)
    return out


def shift_blocks(job, ids):
    """Pass 2 reads pass 1's output: ``0 = work/twice + 1``."""
    group = zarr.open_group(job.output, mode="r+")
    plan = ToyPlan(group["0"].shape[0], job.rows)
    for i in ids:
        box = plan.box(i)
        group["0"][box] = np.asarray(group["work/twice"][box]) + 1
    _log(job, "shift", ids)
    return [1] * len(ids)


class Counts:
    """Pass 1 keeps each block's voxel count in ``work/counts``, written before its markers."""

    def __init__(self, group):
        self.array, self.rows = group["work/counts"], {}

    def add(self, i, n):
        self.rows[i] = n

    def full(self):
        return len(self.rows) >= 2

    def flush(self):
        for i, n in self.rows.items():
            self.array[i] = n
        self.rows.clear()


def toy_stage(inp, out, log, rows=2):
    """A two-pass stage over the volume at ``inp`` (a Zarr array)."""
    shape = zarr.open_array(str(inp), mode="r").shape
    job = ToyJob(str(inp), str(out), rows, str(log))
    plan = ToyPlan(shape[0], rows)

    def create():
        group = create_image(out, shape, np.int32, chunks=(rows,) + shape[1:])
        work = group.create_group("work")
        work.create_array("twice", shape=shape, chunks=(rows,) + shape[1:], dtype="int32")
        work.create_array("counts", shape=(len(plan),), chunks=(len(plan),), dtype="int64")
        return group

    def describe(i):
        return f"rows {plan.box(i)}"

    def finish(group):
        from emtile.store import remove_store

        total = int(np.asarray(group["work/counts"][:]).sum())
        remove_store(Path(out) / "work")
        return {"voxels": total}

    passes = (Pass(name="toy 1/2", fn=double_blocks, job=job, plan=plan, describe=describe,
                   markers="done1", point="toy.double.recorded", keep=Counts),
              Pass(name="toy 2/2", fn=shift_blocks, job=job, plan=plan, describe=describe,
                   markers="done2", point="toy.shift.recorded"))
    return Stage(name="toy", output=str(out), inputs=(str(inp),),
                 fingerprint={"input": str(inp), "rows": rows}, create=create, passes=passes,
                 markers_group="work", finish=finish)


@pytest.fixture
def volume(tmp_path):
    path = tmp_path / "in.zarr"
    a = zarr.create_array(str(path), shape=(11, 6, 5), chunks=(3, 6, 5), dtype="uint8")
    values = np.random.default_rng(0).integers(0, 200, a.shape).astype(np.uint8)
    a[...] = values
    return path, values


@pytest.fixture(scope="module")
def client():
    with start_cluster("local", workers=2) as (c, _):
        yield c


def ran(log):
    lines = Path(log).read_text().split() if Path(log).exists() else []
    return sorted((name, int(i)) for name, i in zip(lines[::2], lines[1::2]))


def test_toy_stage_here_and_on_a_cluster_gives_the_same_bytes(tmp_path, volume, client):
    inp, values = volume
    expect = 2 * values.astype(np.int32) + 1
    for name, runner in (("here", None), ("client", Runner(client=client, blocks_per_task=3))):
        out, log = tmp_path / f"{name}.zarr", tmp_path / f"{name}.log"
        result = run_stage(toy_stage(inp, out, log), runner, progress=False)
        assert is_complete(out) and not result.resumed and result.blocks_done == (0, 0)
        np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][...], expect)
        assert result.attrs == {"voxels": values.size}  # pass 1's kept results, all of them
        assert ran(log) == sorted((p, i) for p in ("double", "shift") for i in range(6))
        assert "work" not in zarr.open_group(str(out), mode="r")
    assert result.where == "a Dask client"


KILLED = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from test_blockwise import toy_stage
    from emtile.blockwise import run_stage
    run_stage(toy_stage(sys.argv[2], sys.argv[3], sys.argv[4]), progress=False)
""")


def _killed(inp, out, log, fault):
    env = dict(os.environ, _EMTILE_FAULTS=fault)
    r = subprocess.run([sys.executable, "-c", KILLED, str(TESTS), str(inp), str(out), str(log)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert out.exists() and not is_complete(out)


def test_a_killed_run_resumes_with_only_the_missing_blocks(tmp_path, volume, client):
    """SIGKILL after 3 blocks of pass 1 are recorded, resumed here; SIGKILL after 2 blocks of
    pass 2, resumed on a cluster: each re-run does only what its markers do not record."""
    inp, values = volume
    expect = 2 * values.astype(np.int32) + 1
    out, log = tmp_path / "out.zarr", tmp_path / "a.log"
    _killed(inp, out, log, "toy.double.recorded@3=kill")
    again = tmp_path / "again.log"
    result = run_stage(toy_stage(inp, out, again), progress=False)
    assert result.resumed and result.blocks_done == (3, 0)
    assert ran(again) == [("double", i) for i in range(3, 6)] + [("shift", i) for i in range(6)]
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][...], expect)
    assert result.attrs == {"voxels": values.size}  # counts kept by the killed run were on disk

    out2 = tmp_path / "out2.zarr"
    _killed(inp, out2, tmp_path / "b.log", "toy.shift.recorded@2=kill")
    again = tmp_path / "again2.log"
    result = run_stage(toy_stage(inp, out2, again), Runner(client=client), progress=False)
    assert result.resumed and result.blocks_done == (6, 2)
    assert ran(again) == [("shift", i) for i in range(2, 6)]
    np.testing.assert_array_equal(zarr.open_group(str(out2), mode="r")["0"][...], expect)


def test_another_fingerprint_starts_over_and_overwrite_never_resumes(tmp_path, volume):
    inp, _ = volume
    out = tmp_path / "out.zarr"
    _killed(inp, out, tmp_path / "a.log", "toy.shift.recorded@1=kill")
    log = tmp_path / "b.log"
    result = run_stage(toy_stage(inp, out, log, rows=3), progress=False)  # another plan
    assert not result.resumed and len(ran(log)) == 2 * 4
    _killed(inp, out.with_name("o2.zarr"), tmp_path / "c.log", "toy.shift.recorded@1=kill")
    log = tmp_path / "d.log"
    result = run_stage(toy_stage(inp, out.with_name("o2.zarr"), log), overwrite=True,
                       progress=False)
    assert not result.resumed and len(ran(log)) == 2 * 6


def test_the_output_is_checked_before_anything_runs(tmp_path, volume):
    inp, _ = volume
    with pytest.raises(EmtileError, match="is the input"):
        run_stage(toy_stage(inp, inp, tmp_path / "a.log"), progress=False)
    done = tmp_path / "done.zarr"
    run_stage(toy_stage(inp, done, tmp_path / "b.log"), progress=False)
    with pytest.raises(EmtileError, match="already exists; pass overwrite=True"):
        run_stage(toy_stage(inp, done, tmp_path / "c.log"), progress=False)
    assert not (tmp_path / "a.log").exists() and not (tmp_path / "c.log").exists()


# --------------------------------------------------------------------------- the runner


RUNNER_ERRORS = [  # (Runner keywords, library line, CLI options, CLI line or click's)
    (dict(cluster="lokal"), "cluster='lokal' is not a cluster: choose local, slurm, cuda",
     ["--cluster", "lokal"], "Error: --cluster lokal is not a cluster: choose local, slurm, cuda"),
    (dict(cluster="local", scheduler_file="s.json"),
     "give either cluster= or scheduler_file=, not both",
     ["--cluster", "local", "--scheduler-file", "s.json"],
     "Error: give either --cluster or --scheduler-file, not both"),
    (dict(blocks_per_task=0), "blocks_per_task=0 must be a positive integer",
     ["--blocks-per-task", "0"], "Invalid value for '--blocks-per-task'"),
    (dict(blocks_per_task=True), "blocks_per_task=True must be a positive integer", None, None),
    (dict(retries=-1), "retries=-1 must be 0 or a positive integer",
     ["--retries", "-1"], "Invalid value for '--retries'"),
    (dict(retries=1.5), "retries=1.5 must be 0 or a positive integer", None, None),
    (dict(cluster="local", cluster_workers=0), "cluster_workers=0 must be a positive integer",
     ["--cluster", "local", "--cluster-workers", "0"], "Invalid value for '--cluster-workers'"),
    (dict(cluster_timeout=0), "cluster_timeout=0 must be a positive number of seconds",
     ["--cluster-timeout", "0"], "Invalid value for '--cluster-timeout'"),
    (dict(cluster_timeout=float("nan")), "cluster_timeout=nan must be a positive number", None,
     None),
    (dict(client=object(), cluster="local"), "give either client= or cluster=", None, None),
]


@pytest.mark.parametrize("kwargs, line", [(k, m) for k, m, _, _ in RUNNER_ERRORS])
def test_bad_runner_values_are_one_line(kwargs, line):
    with pytest.raises(EmtileError, match="^" + line.replace("(", r"\(")):
        Runner(**kwargs)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A model folder and a volume for predict, a probability map for segment."""
    from emtile.unet import UNet, save_model

    d = tmp_path_factory.mktemp("inputs")
    save_model(UNet(base=2, depth=2), d / "model")
    for name, kind in (("in.zarr", "image"), ("pred.zarr", "probabilities")):
        g = create_image(d / name, (2, 40, 40), np.uint8, kind=kind)
        g["0"][...] = 128
        mark_complete(g)
    return d


@pytest.mark.parametrize("command", ["predict", "segment"])
@pytest.mark.parametrize("args, line", [(a, m) for _, _, a, m in RUNNER_ERRORS if a])
def test_every_command_refuses_bad_runner_options_in_one_line(inputs, tmp_path, command, args,
                                                              line):
    out = tmp_path / "out.zarr"
    argv = {"predict": ["predict", "--model", str(inputs / "model"), str(inputs / "in.zarr")],
            "segment": ["segment", str(inputs / "pred.zarr")]}[command]
    result = CliRunner().invoke(main, [*argv, str(out), "--no-progress", *args])
    assert result.exit_code != 0 and line in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()
    if line.startswith("Error:"):  # ours, not click's usage text
        assert len(result.output.strip().splitlines()) == 1


def test_runner_threads_and_spec():
    assert Runner().threads() is None and not Runner().distributed
    local = Runner(cluster="local", cluster_workers=2)
    assert local.distributed and local.spec()["kind"] == "local"
    assert local.threads() == max(1, (os.cpu_count() or 1) // 2)
    assert Runner(cluster="tcp://10.0.0.5:8786").threads() == 1


# --------------------------------------------------------------------------- defaults


def _settings_of(command):
    from emtile.settings import PredictSettings, SegmentSettings
    from emtile.training.settings import TrainSettings

    return {"predict": PredictSettings, "segment": SegmentSettings, "train": TrainSettings}[command]


@pytest.mark.parametrize("command", ["predict", "segment", "train"])
def test_every_cli_default_is_its_settings_field(command):
    """Each option named after a settings (or runner) field defaults to that field's default,
    so no command repeats a default; and every settings field a user sets has its option."""
    cmd = main.get_command(click.Context(main), command)
    fields = {f.name: f for f in dataclasses.fields(_settings_of(command))}
    if command != "train":
        fields.update({f.name: f for f in dataclasses.fields(Runner)
                       if f.metadata.get("cli", True)})
    ctx = click.Context(cmd)
    checked = set()
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.name not in fields:
            continue
        f = fields[p.name]
        if f.default is dataclasses.MISSING:
            continue
        given = p.get_default(ctx)
        cli = None if given is None or type(given).__name__ == "Sentinel" else \
            p.type_cast_value(ctx, given)
        assert cli == f.default, f"--{p.name}: {cli!r} != {f.default!r}"
        checked.add(p.name)
    internal = {"predict": {"max_tile_memory", "max_block_px", "chunk_size", "normalize",
                            "channels_last"},
                "segment": {"seed_cap", "seed_radius", "interior_rounds"},
                "train": {"val_tile"}}[command]
    missing = {n for n, f in fields.items() if f.default is not dataclasses.MISSING} - checked
    assert missing <= internal | {"base", "depth", "batch_norm", "train_slices", "val_slices"}, \
        missing


def test_a_finish_cut_short_is_redone_not_resumed(tmp_path, volume):
    """``finish`` removes the working group with ``store.remove_store``, which renames it away
    first: a run killed while it is deleted finds no markers and starts over, never resumes
    from half-deleted arrays."""
    import os

    inp, values = volume
    out, log = tmp_path / "out.zarr", tmp_path / "a.log"
    stage = toy_stage(inp, out, log)

    def broken(group):
        os.rename(out / "work", out / ".work-trash")  # remove_store's first step, then death
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(dataclasses.replace(stage, finish=broken), progress=False)
    assert not is_complete(out)
    again = tmp_path / "b.log"
    result = run_stage(toy_stage(inp, out, again), progress=False)
    assert not result.resumed and len(ran(again)) == 2 * 6
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][...],
                                  2 * values.astype(np.int32) + 1)


@pytest.mark.parametrize("message, expect", [
    ("threshold=1.5 must be a number", "--threshold 1.5 must be a number"),
    ("give either cluster= or scheduler_file=, not both (cluster='local')",
     "give either --cluster or --scheduler-file, not both (--cluster local)"),
    ("output '/runs/levels=2/o.zarr' exists; pass overwrite=True",
     "output '/runs/levels=2/o.zarr' exists; pass --overwrite"),  # never inside quotes
    ("block_size=1,16 must give", "--block-size 1,16 must give"),
    ("keep_boundaries=False here", "no --keep-boundaries here"),
    ("pred='x.zarr' is not one; seeds='peaks'", "PRED x.zarr is not one; --seeds peaks"),
    ("foo=3 and the_threshold=2", "foo=3 and the_threshold=2"),  # not the command's
])
def test_the_cli_names_flags_where_the_library_names_keywords(message, expect):
    from emtile.cli.main import as_flags

    command = main.get_command(click.Context(main), "segment")
    assert as_flags(message, command) == expect
