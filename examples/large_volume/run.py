"""A volume larger than memory through the ``emtile`` commands: time and peak memory per step.

    .venv/bin/python examples/large_volume/run.py --size-gb 4                # one 4 GB volume
    .venv/bin/python examples/large_volume/run.py --size-gb 0.5 4 --cleanup  # memory vs size
    .venv/bin/python examples/large_volume/run.py --size-gb 1 --model runs/isbi/seed0/model/best
    .venv/bin/python examples/large_volume/run.py --compare A/results.json B/results.json

For each size (GB of uint8 voxels, 10^9 bytes) it runs, as a user would:

1. ``build``: a ``Z x SIDE x SIDE`` uint8 TIFF stack made of the ISBI 2012 slices mirrored in z, y
   and x (real EM texture, never noise), written page by page: what a microscope export looks
   like, and never held in memory;
2. ``convert``: ``emtile convert stack.tif vol.zarr --voxel-size 50,4,4 --levels L``;
3. ``predict``: ``emtile predict --model M vol.zarr pred.zarr --threshold 0.5 --levels L``;
4. ``cluster``: the same prediction on a local Dask cluster, ``--cluster local
   --cluster-workers W``, into ``pred-cluster.zarr``;
5. ``segment``: ``emtile segment pred.zarr seg.zarr --levels L``.

Every step is a child process (the real command line; ``build`` is this script in a child), so
its figures are its own: wall seconds, seconds per GB, ``peak RSS``, the largest resident set of
any one process of the step (``ru_maxrss`` from ``os.wait4``: exact, covering the worker
processes it waited for), and ``tree RSS``, the largest sum of resident sets over the step's
whole process tree (sampled every 0.2 s with psutil: the memory of a cluster's workers together;
shared pages count once per process). The table goes to the screen and to
``OUT/<size>gb/results.json``; all sizes of one invocation to ``OUT/results.json``. With two or
more sizes, the ratio of peak RSS between the largest and the smallest volume is printed: memory
that does not grow with the volume gives about 1.

The model: ``--model`` (a model folder), else ``OUT/model/best`` when an earlier invocation
trained it, else one is trained first with ``emtile train`` on the ISBI data: the demo's model
(base 16, 400 iterations; ``--base``, ``--train-iterations``), a few minutes on 2 cores. Time and
memory depend on the model's width, so compare sizes with the same model.

Outputs stay in ``OUT`` (default ``bench-out/large_volume`` in the repository) for viewers;
``--cleanup`` removes each size's files once it is measured (the TIFF and the stores together
take several times the volume's size; the table's ``disk MB`` column gives each one).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("EMTILE_ISBI_DIR", REPO.parent / "shared" / "data" / "isbi2012"))
OUT = REPO / "bench-out" / "large_volume"
STEPS = ("build", "convert", "predict", "cluster", "segment")
VOXEL_SIZE = "50,4,4"  # nm, z,y,x: ISBI 2012's sections and pixels (the TIFF records none)
EMTILE = [sys.executable, "-m", "emtile.cli.main"]
SAMPLE_S = 0.2


# --------------------------------------------------------------------------- the volume


def volume_shape(size_gb, side):
    """``(Z, side, side)``: ``Z`` whole slices closest to ``size_gb`` GB of uint8 (at least 1)."""
    return max(1, round(size_gb * 1e9 / side**2)), side, side


def build_tiff(path, source, shape):
    """Write a uint8 TIFF stack of ``shape`` (Z, Y, X): ``source``'s slices mirrored along every
    axis (NumPy's ``reflect``: 0, 1, ..., n-1, n-2, ...), one page at a time (BigTIFF from
    2 GiB), so memory holds the source and one page whatever ``shape``."""
    import numpy as np
    import tifffile

    from emtile.geometry import reflect_index

    src = tifffile.imread(source)
    if src.ndim != 3 or src.dtype != np.uint8:
        sys.exit(f"{source} must be a uint8 (Z, Y, X) stack, got {src.dtype} {src.shape}")
    zi, yi, xi = (reflect_index(np.arange(n), m) for n, m in zip(shape, src.shape))
    rows = np.ix_(yi, xi)
    pages = (src[k][rows] for k in zi)
    nbytes = int(np.prod(shape))
    tifffile.imwrite(path, pages, shape=shape, dtype=np.uint8, photometric="minisblack",
                     bigtiff=nbytes >= 2**31)


# --------------------------------------------------------------------------- measuring a child


def _tree_rss(pid):
    """Sum of the resident sets of process ``pid`` and all its descendants, in bytes."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # ended between the listing and the read
            pass
    return total


def measure(cmd, log):
    """Run ``cmd`` with its output in the file ``log``; wall seconds and peak memory.

    Returns ``{"seconds", "peak_rss_mb", "tree_rss_mb", "returncode"}``: ``peak_rss_mb`` is
    ``ru_maxrss`` of the child from ``os.wait4`` (its largest process, descendants it waited for
    included), ``tree_rss_mb`` the largest sampled sum over its process tree. MB = 2^20 bytes.
    """
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(map(str, cmd)) + "\n\n")
        f.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
        tree = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree = max(tree, _tree_rss(proc.pid))
            time.sleep(SAMPLE_S)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss * unit / 2**20,
            "tree_rss_mb": max(tree, usage.ru_maxrss * unit) / 2**20,
            "returncode": proc.returncode}


def disk_mb(path):
    """Bytes on disk of a file or a folder (a Zarr store), in MB (2^20 bytes)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def step(name, cmd, folder, *, output, gb=None):
    """Run one step as a child process; its row of the table, or exit with its log's tail."""
    log = folder / f"{name}.log"
    shown = ["emtile", *cmd[len(EMTILE):]] if cmd[:len(EMTILE)] == EMTILE else cmd
    print(f"[{name}] {' '.join(map(str, shown))}", flush=True)
    r = measure(cmd, log)
    if r["returncode"]:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        sys.exit(f"step {name} failed (exit {r['returncode']}); the end of {log}:\n{tail}")
    row = {"step": name, "gb": gb, "seconds": round(r["seconds"], 2),
           "s_per_gb": round(r["seconds"] / gb, 2) if gb else None,
           "peak_rss_mb": round(r["peak_rss_mb"], 1), "tree_rss_mb": round(r["tree_rss_mb"], 1),
           "output": str(output), "disk_mb": round(disk_mb(output), 1)}
    print(f"[{name}] {row['seconds']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB "
          f"(tree {row['tree_rss_mb']:.0f} MB)", flush=True)
    return row


# --------------------------------------------------------------------------- the steps


def ensure_model(a):
    """The model folder to predict with: --model, an earlier run's, or one trained now.

    Returns ``(path, row)``; ``row`` is the training step's row when it trained one, else None.
    """
    if a.model is not None:
        if not (Path(a.model) / "config.json").exists():
            sys.exit(f"--model {a.model}: not a model folder (no config.json)")
        return Path(a.model), None
    best = a.out / "model" / "best"
    if (best / "config.json").exists():
        print(f"[model] reusing {best} (trained by an earlier run; remove it to train again)")
        return best, None
    if not (a.data / "train-volume.tif").exists():
        sys.exit(f"ISBI data not found in {a.data}: give --data DIR (or EMTILE_ISBI_DIR), "
                 "or a model with --model DIR")
    isbi = a.out / "isbi"
    isbi.mkdir(parents=True, exist_ok=True)
    for name, extra in (("train-volume", []), ("train-labels", ["--labels"])):
        step(f"isbi-{name}", [*EMTILE, "convert", a.data / f"{name}.tif", isbi / f"{name}.zarr",
                              "--voxel-size", VOXEL_SIZE, "--overwrite", "--no-progress", *extra],
             isbi, output=isbi / f"{name}.zarr")
    row = step("model", [*EMTILE, "train", "--raw", isbi / "train-volume.zarr",
                         "--labels", isbi / "train-labels.zarr", "--out", a.out / "model",
                         "--train-slices", "0:25", "--val-slices", "25:30", "--iterations",
                         a.train_iterations, "--base", a.base, "--val-every", 100, "--overwrite",
                         "--no-progress"],
               isbi, output=a.out / "model")
    return best, row


def run_size(a, size_gb, model):
    """Every step of ``a.steps`` on one volume of about ``size_gb`` GB; the run's record."""
    shape = volume_shape(size_gb, a.side)
    gb = shape[0] * shape[1] * shape[2] / 1e9
    folder = a.out / f"{size_gb:g}gb"
    folder.mkdir(parents=True, exist_ok=True)
    tif, vol = folder / "stack.tif", folder / "vol.zarr"
    pred, pred_cluster = folder / "pred.zarr", folder / "pred-cluster.zarr"
    seg = folder / "seg.zarr"
    levels = ["--levels", a.levels]
    threads = ["--threads", a.threads] if a.threads else []
    quiet = ["--overwrite", "--no-progress"]
    predict = [*EMTILE, "predict", "--model", model, "--tile", a.tile, "--threshold", 0.5,
               *levels, *quiet]
    commands = {
        "build": ([sys.executable, __file__, "--build", tif, "--shape", *shape,
                   "--source", a.data / "train-volume.tif"], tif),
        "convert": ([*EMTILE, "convert", tif, vol, "--voxel-size", VOXEL_SIZE, *levels, *quiet],
                    vol),
        "predict": ([*predict, *threads, vol, pred], pred),
        "cluster": ([*predict, "--cluster", "local", "--cluster-workers", a.cluster_workers,
                     vol, pred_cluster], pred_cluster),
        "segment": ([*EMTILE, "segment", pred if "predict" in a.steps or pred.exists()
                     else pred_cluster, seg, *levels, *quiet], seg),
    }
    print(f"\n== {size_gb:g} GB: {shape[0]} x {shape[1]} x {shape[2]} uint8 ({gb:.3f} GB) "
          f"in {folder}", flush=True)
    rows = [step(name, commands[name][0], folder, output=commands[name][1], gb=gb)
            for name in STEPS if name in a.steps]
    run = {"size_gb": size_gb, "gb": gb, "shape": list(shape),
           "model": None if model is None else str(model),
           "steps": rows}
    (folder / "results.json").write_text(json.dumps(run, indent=2) + "\n")
    if a.cleanup:
        shutil.rmtree(folder)
    return run


# --------------------------------------------------------------------------- reporting


def machine():
    """What the figures were measured on, how busy it was when the run started, and this
    launcher's own resident set (a floor of every ``peak RSS``: Linux counts the parent's pages
    in a child's ``ru_maxrss`` up to its exec, so the launcher imports nothing heavy)."""
    from importlib.metadata import version

    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "load_1min": round(os.getloadavg()[0], 2),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "platform": platform.platform(), "processor": _cpu_name(),
            "python": platform.python_version(), "torch": version("torch"),
            "emtile": version("emtile"),
            "launcher_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def format_table(runs):
    """The runs' rows as a text table, and the peak-RSS ratios when there are several sizes."""
    head = (f"{'step':<9}{'GB':>8}{'seconds':>10}{'s/GB':>9}{'peak RSS MB':>13}"
            f"{'tree RSS MB':>13}{'disk MB':>10}")
    lines = [head, "-" * len(head)]
    for run in runs:
        for r in run["steps"]:
            s_per_gb = f"{r['s_per_gb']:9.1f}" if r["s_per_gb"] is not None else f"{'':>9}"
            lines.append(f"{r['step']:<9}{run['gb']:8.3f}{r['seconds']:10.1f}{s_per_gb}"
                         f"{r['peak_rss_mb']:13.0f}{r['tree_rss_mb']:13.0f}{r['disk_mb']:10.0f}")
    ratios = rss_ratios(runs)
    if ratios:
        small, large = min(runs, key=lambda r: r["gb"]), max(runs, key=lambda r: r["gb"])
        lines += ["", f"peak RSS, {large['gb']:.3f} GB / {small['gb']:.3f} GB "
                      "(memory independent of the volume size: about 1; target <= 1.2):"]
        lines += [f"  {name:<9} peak {r['peak']:.3f}   tree {r['tree']:.3f}"
                  for name, r in ratios.items()]
    return "\n".join(lines)


def rss_ratios(runs):
    """``{step: {"peak": ratio, "tree": ratio}}`` of the largest volume's memory to the smallest's,
    for the steps both ran; empty with fewer than two sizes."""
    if len({r["gb"] for r in runs}) < 2:
        return {}
    small, large = min(runs, key=lambda r: r["gb"]), max(runs, key=lambda r: r["gb"])
    before = {r["step"]: r for r in small["steps"]}
    return {r["step"]: {"peak": r["peak_rss_mb"] / before[r["step"]]["peak_rss_mb"],
                        "tree": r["tree_rss_mb"] / before[r["step"]]["tree_rss_mb"]}
            for r in large["steps"] if r["step"] in before}


# --------------------------------------------------------------------------- command line


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size-gb", type=float, nargs="+", default=[4.0],
                   help="volume sizes in GB of uint8 voxels (10^9 bytes), each run in turn")
    p.add_argument("--side", type=int, default=2048, help="slice side in pixels")
    p.add_argument("--out", type=Path, default=OUT, help="output folder")
    p.add_argument("--data", type=Path, default=DATA, help="the ISBI 2012 folder")
    p.add_argument("--model", type=Path, default=None,
                   help="model folder to predict with (default: OUT/model/best, trained first "
                        "when missing)")
    p.add_argument("--base", type=int, default=16, help="width of the model trained when "
                                                        "there is none")
    p.add_argument("--train-iterations", type=int, default=400,
                   help="iterations of the model trained when there is none")
    p.add_argument("--tile", default="572", help="predict's --tile")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the local prediction (default: predict's)")
    p.add_argument("--cluster-workers", type=int, default=2, help="workers of the local cluster")
    p.add_argument("--levels", type=int, default=3,
                   help="resolution levels of every store (a pyramid for viewers)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated steps to run, of {','.join(STEPS)}")
    p.add_argument("--cleanup", action="store_true",
                   help="remove each size's files once measured (several GB each)")
    p.add_argument("--compare", type=Path, nargs="+", metavar="RESULTS_JSON",
                   help="print the table of earlier invocations' results.json files, run nothing")
    p.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the build step's child
    p.add_argument("--shape", type=int, nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    unknown = sorted(set(a.steps) - set(STEPS))
    if unknown or not a.steps:
        p.error(f"--steps {','.join(a.steps)}: unknown {','.join(unknown)}; choose from "
                f"{','.join(STEPS)}")
    if min(a.size_gb) <= 0 or a.side < 1:
        p.error("--size-gb and --side must be positive")
    return a


def main(argv=None):
    a = parse(argv)
    if a.build is not None:
        build_tiff(a.build, a.source, tuple(a.shape))
        return
    if a.compare:
        runs = [run for f in a.compare for run in json.loads(f.read_text())["runs"]]
        print(format_table(runs))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    if info["load_1min"] > info["cores"] / 2:
        print(f"warning: the machine is busy (load {info['load_1min']} on {info['cores']} cores): "
              "times and memory are not representative")
    need_model = {"predict", "cluster"} & set(a.steps)
    model, train_row = ensure_model(a) if need_model else (None, None)
    runs = [run_size(a, size, model) for size in a.size_gb]
    result = {"machine": info, "settings": {k: str(v) if isinstance(v, Path) else v
                                            for k, v in vars(a).items()
                                            if k not in ("build", "shape", "source", "compare")},
              "model": train_row, "runs": runs, "rss_ratios": rss_ratios(runs)}
    (a.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + format_table(runs))
    print(f"\nwritten {a.out / 'results.json'}")


if __name__ == "__main__":
    main()
