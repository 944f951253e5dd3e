"""emtile ``--tile auto`` against MONAI's ``sliding_window_inference``, same volume, same width.

    bash .ci/setup && .venv/bin/python -m pip install -e '.[bench]'   # once: adds monai
    .venv/bin/python examples/bench_vs_monai.py                          # 8 x 2048 x 2048
    .venv/bin/python examples/bench_vs_monai.py --slices 2 --size 1024

Needs monai (the benchmark-only extra ``bench``; it is not an emtile dependency).

One run: the volume (ISBI 2012 slices mirrored to ``--slices`` x ``--size`` x ``--size``) is written
once as OME-Zarr, then each method runs in its own subprocess (so each peak RSS is its own), reads
the volume from Zarr and writes float32 probabilities to Zarr:

- emtile: the paper's valid-convolution U-Net (base ``--base``, depth 4, random weights),
  :func:`emtile.predict` with ``tile="auto"`` (no overlap, no blending: tiling is exact);
- MONAI: ``BasicUNet`` with the same widths (padded convolutions), ``sliding_window_inference``
  with roi ``--roi``, overlap ``--overlap``, gaussian blending, channels_last like emtile.

Each method's clock starts once its libraries are imported (torch; MONAI's inferers; emtile's
predictor, which ``import emtile`` leaves for the first call) and covers everything after: the
model built and its weights loaded from disk, first-call costs (oneDNN primitives,
emtile's compiled Numba kernels loaded from their cache), reading, every forward pass, writing.

A third subprocess measures the seam figure on the first slice: the max relative difference between
each method's tiled output and the same model's single forward pass over the whole slice (emtile:
over the mirror-padded slice), relative to the whole-slice output's range.

Target (issue 3): emtile >= 1.5x faster, and seam-free where MONAI's windows differ from its
whole-slice pass.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012" / "train-volume.tif"


def monai_model(base):
    from monai.networks.nets import BasicUNet

    # levels base, 2b, 4b, 8b, 16b like emtile's UNet(base, depth=4); no normalisation
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, norm=None,
                     features=(base, 2 * base, 4 * base, 8 * base, 16 * base, base))


def peak_rss_gib():
    from emtile.bench import peak_rss

    own, children = peak_rss()
    return own / 2**30, children / 2**30


def run_emtile(a):
    import torch  # noqa: F401  (imported before the clock starts, as run_monai's are)
    import zarr  # noqa: F401

    import emtile
    import emtile.predictor  # noqa: F401  (emtile imports its modules lazily)

    t0 = time.perf_counter()
    r = emtile.predict(a.dir / "emtile-model", a.dir / "vol.zarr", a.dir / "emtile.zarr", tile="auto",
                       dtype="float32", progress=False)
    seconds = time.perf_counter() - t0
    own, children = peak_rss_gib()
    return {"seconds": seconds, "rss": own, "rss_workers": children, "tile": r.tile[-1],
            "out_tile": r.out_tile[-1], "tiles": r.tiles, "efficiency": r.efficiency}


def run_monai(a):
    import torch
    from monai.inferers import sliding_window_inference

    from emtile.store import create_image, mark_complete
    from emtile.volume import open_volume

    t0 = time.perf_counter()
    model = monai_model(a.base)
    model.load_state_dict(torch.load(a.dir / "monai-model.pt", weights_only=True))
    model = model.eval().to(memory_format=torch.channels_last)

    def predictor(w):
        return model(w.contiguous(memory_format=torch.channels_last))

    vol = open_volume(a.dir / "vol.zarr")
    out = create_image(a.dir / "monai.zarr", vol.shape, np.float32)
    with torch.inference_mode():
        for z in range(vol.shape[0]):
            x = torch.from_numpy(vol[z].astype(np.float32) / np.float32(255))[None, None]
            y = sliding_window_inference(x, (a.roi, a.roi), 1, predictor, overlap=a.overlap,
                                         mode="gaussian")
            out["0"][z] = torch.sigmoid(y)[0, 0].numpy()
    mark_complete(out)
    seconds = time.perf_counter() - t0
    own, children = peak_rss_gib()
    return {"seconds": seconds, "rss": own, "rss_workers": children}


def relative_difference(tiled, whole):
    return float(np.abs(tiled - whole).max() / max(float(whole.max() - whole.min()), 1e-12))


def run_seams(a):
    import torch

    import emtile
    from emtile.geometry import read_window
    from emtile.normalize import dtype_scaled
    from emtile.volume import open_volume

    vol = open_volume(a.dir / "vol.zarr")
    ny, nx = vol.shape[1:]
    res = {}
    with torch.inference_mode():
        # emtile: one pass over the mirror-padded slice (a valid size covering it), cropped
        net = emtile.load_model(a.dir / "emtile-model")
        h = net.halo
        n = next(s for s in net.valid_sizes(max(ny, nx) + 2 * h, max(ny, nx) + 2 * h + 64))
        window = dtype_scaled(read_window(vol, (0, -h, -h), (1, n - h, n - h)))
        whole = torch.sigmoid(net(torch.from_numpy(window)[None]))[0, 0, :ny, :nx].numpy()
        tiled = open_volume(a.dir / "emtile.zarr")[0]
        res["emtile"] = relative_difference(tiled, whole)
        del net, window, whole
        # MONAI: one pass over the whole slice
        model = monai_model(a.base)
        model.load_state_dict(torch.load(a.dir / "monai-model.pt", weights_only=True))
        model.eval()
        x = torch.from_numpy(vol[0].astype(np.float32) / np.float32(255))[None, None]
        whole = torch.sigmoid(model(x))[0, 0].numpy()
        tiled = open_volume(a.dir / "monai.zarr")[0]
        res["monai"] = relative_difference(tiled, whole)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=8, help="slices in the volume")
    p.add_argument("--size", type=int, default=2048, help="slice side (pixels)")
    p.add_argument("--base", type=int, default=16, help="U-Net width (first level channels)")
    p.add_argument("--roi", type=int, default=512, help="MONAI window size")
    p.add_argument("--overlap", type=float, default=0.25, help="MONAI window overlap")
    p.add_argument("--data", type=Path, default=ISBI, help="stack whose slices are mirrored")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--run", choices=["emtile", "monai", "seams"], help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.run:  # a subprocess: one method, figures as JSON on the last line
        print(json.dumps({"emtile": run_emtile, "monai": run_monai, "seams": run_seams}[a.run](a)))
        return

    import torch

    import emtile
    from emtile.bench import mirrored_volume

    with tempfile.TemporaryDirectory(prefix="emtile-vs-monai-") as tmp:
        tmp = Path(tmp)
        mirrored_volume(tmp / "vol.zarr", (a.slices, a.size, a.size), source=a.data)
        torch.manual_seed(a.seed)
        emtile.save_model(emtile.UNet(base=a.base, depth=4), tmp / "emtile-model")
        torch.save(monai_model(a.base).state_dict(), tmp / "monai-model.pt")
        args = [sys.executable, __file__, "--dir", str(tmp), "--base", str(a.base), "--roi",
                str(a.roi), "--overlap", str(a.overlap)]
        res = {}
        for name in ("emtile", "monai", "seams"):
            done = subprocess.run(args + ["--run", name], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr}")
            res[name] = json.loads(done.stdout.strip().splitlines()[-1])

    e, m, s = res["emtile"], res["monai"], res["seams"]
    mpx = a.slices * a.size * a.size / 1e6
    print(f"volume {a.slices}x{a.size}x{a.size} (mirrored {a.data.name}), U-Net width {a.base}, "
          f"torch threads {torch.get_num_threads()}, float32 output to Zarr")
    print(f"emtile: valid convolutions, tile auto = {e['tile']} -> {e['out_tile']}, {e['tiles']} "
          f"tiles, efficiency {e['efficiency']:.0%}")
    print(f"MONAI:  BasicUNet (padded), sliding_window_inference roi {a.roi}, overlap {a.overlap}, "
          f"gaussian")
    print()
    head = f"{'':<8}{'time s':>9}{'Mpx/s':>8}{'peak RSS GiB':>14}{'(+workers)':>11}{'seam (max rel. diff)':>22}"
    print(head)
    print("-" * len(head))
    for name, r in (("emtile", e), ("MONAI", m)):
        print(f"{name:<8}{r['seconds']:>9.1f}{mpx / r['seconds']:>8.3f}{r['rss']:>14.2f}"
              f"{r['rss_workers']:>11.2f}{s[name.lower()]:>22.2e}")
    print(f"\nemtile is {m['seconds'] / e['seconds']:.2f}x faster (target >= 1.5x)")


if __name__ == "__main__":
    main()
