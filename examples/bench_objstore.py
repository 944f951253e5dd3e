"""Zarr v3 chunk throughput through emtile.locations: a local folder against s3:// on a local
S3-compatible server (moto's, in its own process, on 127.0.0.1), the same array written then
read back. Not a predict run: the I/O half of one, to see what the store layer costs.

    python examples/bench_objstore.py [--shape 32,512,512] [--chunks 1,256,256]

Needs moto[server] and s3fs (the test extra). Prints seconds and MB/s per store and the ratio.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import zarr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(loc, data, chunks):
    t0 = time.perf_counter()
    group = zarr.open_group(loc.zarr_store("w"), mode="w", zarr_format=3)
    arr = group.create_array("0", shape=data.shape, chunks=chunks, dtype=data.dtype)
    arr[:] = data
    t1 = time.perf_counter()
    back = zarr.open_group(loc.zarr_store("r"), mode="r")["0"][:]
    t2 = time.perf_counter()
    assert np.array_equal(back, data)
    return t1 - t0, t2 - t1


def main():
    from emtile.locations import Location

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="32,512,512")
    ap.add_argument("--chunks", default="1,256,256")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    chunks = tuple(int(v) for v in args.chunks.split(","))
    data = np.random.default_rng(0).random(shape, dtype=np.float32)
    mb = data.nbytes / 1e6
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        import s3fs

        for _ in range(100):
            try:
                s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
                break
            except Exception:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            results = {"local": _time(Location(os.path.join(tmp, "v.zarr")), data, chunks),
                       "s3": _time(Location("s3://bench/v.zarr"), data, chunks)}
    finally:
        server.terminate()
        server.wait()
    for name, (w, r) in results.items():
        print(f"{name:6s} write {w:6.2f} s ({mb / w:7.1f} MB/s)   read {r:6.2f} s ({mb / r:7.1f} MB/s)")
    (lw, lr), (sw, sr) = results["local"], results["s3"]
    print(f"s3/local speed: write {lw / sw:.2f}x, read {lr / sr:.2f}x ({mb:.0f} MB, chunks {chunks})")


if __name__ == "__main__":
    main()
