"""Cost of ``emtile.markers.content_token`` (the resume fingerprint's input token) on a big store.

Builds a Zarr v3 array with ``--chunks`` chunk files (tiny ones: the token reads no data, only
one ``stat`` per file), then times the token ``--repeat`` times (page cache warm after the first)
and, for comparison, SHA-256 over every chunk's bytes (what a content hash of the whole input
would cost; here the chunks are tiny, so on real data that column grows with the data size).

    python examples/bench_content_token.py --chunks 100000 [--workdir DIR]
"""

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path


def build(root, n_chunks):
    """An OME-Zarr-shaped store: ``root/0`` with ``n_chunks`` chunk files of 64 bytes."""
    import zarr

    side = 100
    z = max(1, n_chunks // side)
    zarr.open_group(root, mode="w", zarr_format=3)
    arr = zarr.create_array(store=root, name="0", shape=(z, side * 128, 128), chunks=(1, 128, 128),
                            dtype="u1")
    payload = os.urandom(64)
    folder = Path(root) / "0" / "c"
    made = 0
    for i in range(z):
        for j in range(side):
            if made == n_chunks:
                return arr
            d = folder / str(i) / str(j)
            d.mkdir(parents=True, exist_ok=True)
            (d / "0").write_bytes(payload)
            made += 1
    return arr


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from emtile.markers import content_token

    work = Path(tempfile.mkdtemp(prefix="emtile-token-", dir=args.workdir))
    try:
        store = work / "vol.zarr"
        t = time.perf_counter()
        build(store, args.chunks)
        print(f"built {args.chunks} chunk files in {time.perf_counter() - t:.1f} s")
        for k in range(args.repeat):
            t = time.perf_counter()
            content_token(store)
            print(f"content_token run {k + 1}: {time.perf_counter() - t:.3f} s")
        t = time.perf_counter()
        h = hashlib.sha256()
        for f in sorted((store / "0").rglob("*")):
            if f.is_file():
                h.update(f.read_bytes())
        print(f"sha256 of every chunk's bytes: {time.perf_counter() - t:.3f} s "
              f"(chunks of 64 bytes; grows with the data on real stores)")
        print(f"load average: {os.getloadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
