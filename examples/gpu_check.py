"""The CUDA check of issue 23 (item 6): the GPU figures emtile needs, in one run of at most 8 min.

    bash examples/gpu_check.sh [--out gpu-check.json] [--budget-s 480] [--predict-gb 4]

(the shell script picks the interpreter, ``${PYTHON:-.venv/bin/python}``, and calls this file).
On a machine without CUDA it prints one line and exits 0, writing nothing. On CUDA it runs, each
step in its own process group under a timeout taken from the remaining budget:

- ``emtile bench --device cuda --base 16 --tile 572 --tiles 64 --repeat 3 --json`` at ``--amp
  off``, ``bf16``, ``fp16``; bf16 with ``--no-channels-last``; bf16 with ``--workers 0, 2, 4, 8``;
  base 64 at bf16 (pinned memory is predict's default on CUDA: there is no switch to time);
- ``emtile bench --pipeline --shape 16,2048,2048`` (predict's data path with a null model, and
  its parts) when this emtile has it (issue 23 item 1), else "not available";
- a predict of a ~4 GB uint8 volume (``emtile.bench.mirrored_volume``) with ``--amp bf16``:
  seconds, Mvoxel/s, peak RSS, CUDA peak memory;
- ``emtile predict --cluster cuda --cluster-workers 1`` on a smaller volume (needs dask-cuda);
- ``nvidia-smi`` and the torch / CUDA / cuDNN versions.

A step that fails or runs out of time is recorded as such and the next one runs. Everything goes
to one JSON (``--out``) and a table: step, predict / model ratio, Mvoxel/s, GFLOP/s, peak memory.
"""

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = ["bench", "--device", "cuda", "--base", "16", "--tile", "572", "--tiles", "64",
         "--repeat", "3", "--json"]
# (name, extra options of `emtile bench`); channels_last on at bf16 is the "amp bf16" step
BENCH_STEPS = [
    ("amp off", ["--amp", "off"]),
    ("amp bf16", ["--amp", "bf16"]),
    ("amp fp16", ["--amp", "fp16"]),
    ("bf16 no channels_last", ["--amp", "bf16", "--no-channels-last"]),
    ("bf16 workers 0", ["--amp", "bf16", "--workers", "0"]),
    ("bf16 workers 2", ["--amp", "bf16", "--workers", "2"]),
    ("bf16 workers 4", ["--amp", "bf16", "--workers", "4"]),
    ("bf16 workers 8", ["--amp", "bf16", "--workers", "8"]),
    ("bf16 base 64", ["--amp", "bf16", "--base", "64"]),
]
# `emtile bench --pipeline`: a volume of 16 x 2048^2 (67 Mvoxel) instead of --tiles 64 (9.6)
PIPELINE = ["--shape", "16,2048,2048", "--repeat", "2"]
BENCH_CAP_S = 90  # the most one step may take (or the budget left, if less)
PREDICT_CAP_S = 180
GIB = 2.0**30


def emtile_cmd(python, *args):
    """The ``emtile`` command line run by ``python`` (whichever interpreter the caller chose)."""
    return [python, "-c", "import sys; from emtile.cli.main import main; sys.argv[0] = 'emtile'; "
            "main()", *args]


# --------------------------------------------------------------------------- running one step


def run_step(name, cmd, timeout_s, parse=None):
    """Run ``cmd`` in its own process group for at most ``timeout_s`` seconds; return its record.

    The record: ``name``, ``command``, ``status`` ("ok", "failed", "timeout" or "skipped"),
    ``returncode``, ``seconds``, ``figures`` (``parse(stdout)`` when it succeeded, else ``{}``)
    and, on failure, the last lines of its stderr as ``error``. On timeout the whole group (the
    command and its DataLoader workers) is killed.
    """
    rec = {"name": name, "command": [str(c) for c in cmd], "status": "skipped",
           "returncode": None, "seconds": 0.0, "figures": {}}
    if timeout_s < 2:
        rec["error"] = "no time left in the budget"
        return rec
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(rec["command"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    except OSError as e:
        rec.update(status="failed", error=f"could not start: {e}")
        return rec
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        rec.update(status="timeout", seconds=time.perf_counter() - t0,
                   error=f"timed out after {timeout_s:.0f} s", stdout_tail=out[-2000:])
        return rec
    rec.update(returncode=proc.returncode, seconds=time.perf_counter() - t0)
    if proc.returncode != 0:
        rec.update(status="failed", error="\n".join(err.strip().splitlines()[-8:]))
        return rec
    rec["status"] = "ok"
    if parse is not None:
        try:
            rec["figures"] = parse(out)
        except (ValueError, KeyError, TypeError) as e:
            rec.update(status="failed", error=f"output not understood: {e!r}")
    return rec


def last_json(text):
    """The last JSON object a command printed (from the last line starting with ``{`` that
    begins one, to its end: ``emtile bench --json`` prints one object over several lines)."""
    lines = text.splitlines()
    for i in reversed(range(len(lines))):
        if lines[i].startswith("{"):
            try:
                obj, _ = json.JSONDecoder().raw_decode("\n".join(lines[i:]))
            except ValueError:
                continue
            return obj
    raise ValueError("no JSON object in the output")


def bench_figures(text):
    """The figures of an ``emtile bench --json`` output that the check keeps."""
    r = last_json(text)
    keep = ("base", "depth", "tile", "tiles", "batch_size", "device", "amp", "channels_last",
            "num_workers", "model_s", "predict_s", "ratio", "ratio_rounds", "out_voxels",
            "gflop_per_tile", "model_gflops", "predict_gflops", "peak_rss",
            "peak_rss_children", "cuda_peak")
    fig = {k: r[k] for k in keep}
    fig["model_mvox_s"] = r["model_vox_s"] / 1e6
    fig["predict_mvox_s"] = r["predict_vox_s"] / 1e6
    return fig


def pipeline_figures(text):
    """The figures of an ``emtile bench --pipeline --json`` output (its Mvoxel/s as ``mvox_s``
    for the table)."""
    r = last_json(text)
    keep = ("depth", "tile", "batch_size", "device", "amp", "num_workers", "cores",
            "volume_shape", "out_voxels", "wall_s", "pipeline_mvox_per_s", "parts", "other_s",
            "output_equals_input")
    fig = {k: r[k] for k in keep}
    fig["mvox_s"] = r["pipeline_mvox_per_s"]
    return fig


def table_row(rec):
    """One row of the table: step, status, seconds, ratio, Mvoxel/s, GFLOP/s, peak memory."""
    f = rec.get("figures") or {}

    def num(key, fmt, scale=1.0):
        v = f.get(key)
        return "-" if v is None else format(v / scale, fmt)

    mvox = f.get("predict_mvox_s", f.get("mvox_s"))
    return [rec["name"], rec["status"], f"{rec['seconds']:.1f}", num("ratio", ".3f"),
            "-" if mvox is None else f"{mvox:.1f}", num("model_mvox_s", ".1f"),
            num("model_gflops", ".0f"), num("peak_rss", ".2f", GIB),
            num("cuda_peak", ".2f", GIB)]


TABLE_HEAD = ["step", "status", "s", "ratio", "Mvox/s", "model Mvox/s", "model GFLOP/s",
              "RSS GiB", "CUDA GiB"]


def format_table(records):
    """The records as a fixed-width table (the ratio is predict / model alone)."""
    rows = [TABLE_HEAD] + [table_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEAD))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers run on the GPU


def predict_run(a):
    """``--predict-run``: write a volume, predict it on CUDA at bf16, print the figures as JSON."""
    import torch

    import emtile
    from emtile.bench import mirrored_volume, peak_rss

    work = Path(a.workdir)
    z = max(1, round(a.predict_gb * 1e9 / a.side**2))
    torch.manual_seed(0)
    emtile.save_model(emtile.UNet(base=16, depth=4), work / "model")
    t0 = time.perf_counter()
    mirrored_volume(work / "vol.zarr", (z, a.side, a.side))
    t_write = time.perf_counter() - t0
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = emtile.predict(work / "model", work / "vol.zarr", work / "pred.zarr", tile=572,
                       device=a.device, amp="bf16" if cuda else "off", progress=False,
                       overwrite=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    own, children = peak_rss()
    voxels = z * a.side**2
    print(json.dumps({"phase": "volume written", "write_s": t_write}), flush=True)
    print(json.dumps({"shape": [z, a.side, a.side], "gb": voxels / 1e9, "write_s": t_write,
                      "predict_s": seconds, "mvox_s": voxels / seconds / 1e6, "tiles": r.tiles,
                      "peak_rss": own, "peak_rss_children": children,
                      "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None}))


def make_volume(a):
    """``--make-volume``: a small volume and a model for the cluster step."""
    import torch

    import emtile
    from emtile.bench import mirrored_volume

    work = Path(a.workdir)
    torch.manual_seed(0)
    emtile.save_model(emtile.UNet(base=16, depth=4), work / "model")
    mirrored_volume(work / "small.zarr", (16, a.side, a.side))


def versions_figures(_out=None):
    """torch, CUDA, cuDNN and the device, from this interpreter."""
    import torch

    import emtile

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "emtile": getattr(emtile, "__version__", None),
            "device": torch.cuda.get_device_name(0),
            "bf16_supported": torch.cuda.is_bf16_supported()}


# --------------------------------------------------------------------------- the check


def cuda_line():
    """``None`` when torch sees a CUDA device, else the one line to print."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    return f"gpu_check: no CUDA device here (torch {torch.__version__}, {build}); nothing measured"


def nvidia_smi_figures(text):
    """``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv`` as dicts."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    keys = [k.strip() for k in lines[0].split(",")]
    return {"gpus": [dict(zip(keys, (v.strip() for v in ln.split(",")))) for ln in lines[1:]]}


def plan(a, python, work):
    """The steps in the order they run: ``(name, command or None, cap seconds, parse, note)``;
    the most wanted figures first, so a budget that runs out cuts the least useful ones."""
    py = [python, str(Path(__file__).resolve())]
    benches = {name: emtile_cmd(python, *BENCH, *extra) for name, extra in BENCH_STEPS}
    pipeline = emtile_cmd(python, *BENCH, "--amp", "bf16", "--pipeline", *PIPELINE)
    steps = [
        ("versions", py + ["--versions"], 60, last_json, None),
        ("nvidia-smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                        "--format=csv"], 30, nvidia_smi_figures, None),
    ]
    steps += [(n, benches[n], BENCH_CAP_S, bench_figures, None) for n in ("amp bf16", "amp off",
                                                                   "amp fp16")]
    steps.append(("pipeline bf16", pipeline if a.has_pipeline else None, BENCH_CAP_S,
                  pipeline_figures,
                  None if a.has_pipeline else "not available: emtile bench has no --pipeline"))
    steps.append((f"predict {a.predict_gb:g} GB bf16",
                  py + ["--predict-run", "--workdir", str(work), "--predict-gb",
                        str(a.predict_gb), "--side", str(a.side)], PREDICT_CAP_S, last_json,
                  None))
    cluster = None if not a.has_dask_cuda else emtile_cmd(
        python, "predict", "--model", str(work / "model"), str(work / "small.zarr"),
        str(work / "small-pred.zarr"), "--cluster", "cuda", "--cluster-workers", "1",
        "--device", "cuda", "--amp", "bf16", "--no-progress", "--overwrite")
    steps.append(("make small volume", py + ["--make-volume", "--workdir", str(work), "--side",
                                             str(a.side)] if cluster else None, 60, None,
                  None if cluster else "dask-cuda not installed"))
    steps.append(("cluster cuda, 1 worker", cluster, 120, None,
                  None if cluster else "dask-cuda not installed"))
    steps += [(n, benches[n], BENCH_CAP_S, bench_figures, None) for n, _ in BENCH_STEPS
              if n not in ("amp bf16", "amp off", "amp fp16")]
    return steps


def run_all(a, python, work, start):
    """Run the plan within ``a.budget_s`` seconds of ``start``; return the records."""
    records = []
    for name, cmd, cap, parse, note in plan(a, python, work):
        if cmd is None:
            records.append({"name": name, "command": [], "status": "not available",
                            "returncode": None, "seconds": 0.0, "figures": {}, "note": note})
            continue
        left = a.budget_s - (time.perf_counter() - start)
        rec = run_step(name, cmd, min(cap, left), parse)
        if name.startswith("cluster") and rec["status"] == "ok":
            voxels = 16 * a.side**2
            rec["figures"] = {"out_voxels": voxels, "mvox_s": voxels / rec["seconds"] / 1e6,
                              "note": "seconds include starting the cluster"}
        records.append(rec)
        print(f"gpu_check: {name}: {rec['status']} ({rec['seconds']:.1f} s)", file=sys.stderr,
              flush=True)
    return records


def has_option(python, option):
    """Whether ``emtile bench --help`` lists ``option``."""
    done = subprocess.run(emtile_cmd(python, "bench", "--help"), capture_output=True, text=True)
    return option in done.stdout


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON written")
    p.add_argument("--budget-s", type=float, default=480.0, help="total wall time (seconds)")
    p.add_argument("--predict-gb", type=float, default=4.0, help="size of the predicted volume")
    p.add_argument("--side", type=int, default=2048, help="slice side of the volumes")
    p.add_argument("--workdir", default=None, help="where the volumes go (temp)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests: cpu
    for flag in ("--versions", "--predict-run", "--make-volume"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.versions:
        return print(json.dumps(versions_figures()))
    if a.predict_run:
        return predict_run(a)
    if a.make_volume:
        return make_volume(a)
    python = sys.executable
    line = cuda_line()
    if line is not None:
        return print(line)
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    a.has_pipeline = has_option(python, "--pipeline")
    a.has_dask_cuda = subprocess.run([python, "-c", "import dask_cuda"],
                                     capture_output=True).returncode == 0
    with tempfile.TemporaryDirectory(prefix="emtile-gpu-check-", dir=a.workdir) as work:
        # the steps' own temporary files go here too, so a step killed on timeout leaves none
        (Path(work) / "tmp").mkdir()
        old = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(Path(work) / "tmp")
        try:
            records = run_all(a, python, Path(work), t0)
        finally:
            os.environ.pop("TMPDIR") if old is None else os.environ.update(TMPDIR=old)
    env = {r["name"]: r["figures"] for r in records if r["name"] in ("versions", "nvidia-smi")}
    report = {"tool": "examples/gpu_check.py", "started": started, "budget_s": a.budget_s,
              "total_s": time.perf_counter() - t0, "python": python, "environment": env,
              "has_pipeline": a.has_pipeline, "has_dask_cuda": a.has_dask_cuda,
              "pinned_memory": "on (predict's default on CUDA; no switch to time)",
              "steps": records}
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    v = env.get("versions") or {}
    print(f"{v.get('device', '?')}: torch {v.get('torch', '?')}, CUDA {v.get('cuda', '?')}, "
          f"cuDNN {v.get('cudnn', '?')}, {report['total_s']:.0f} s in all")
    print(format_table(records))
    print(f"\nratio = predict / model alone; Mvox/s = predict's output voxels per second; "
          f"written {a.out}")


if __name__ == "__main__":
    main()
