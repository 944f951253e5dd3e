"""Check an exported package against emtile: bioimage.io's own runtime vs ``emtile predict``.

    python examples/bioimageio_check.py MODEL_DIR --raw vol.zarr --slices 25:30 [--tile 572]

Needs ``pip install 'emtile[bioimageio]'``. Steps:

1. ``emtile export MODEL_DIR`` into a temporary ``model.zip``;
2. ``emtile predict --model MODEL_DIR`` over the slices (uint8 and float32 probabilities), and
   ``--model model.zip`` (uint8): these two must be byte-identical;
3. ``bioimageio.core`` runs the package on each slice the way its description allows: the slice
   is padded by core's own ``Tensor.pad`` with the padding the package declares (``reflect``,
   emtile's mirroring) by ``halo`` on each side and up to the next valid size, core runs its
   pre-processing, the weights and its post-processing (``predict_sample_without_blocking``),
   and the output's first 512x512 pixels are the slice's probabilities;
4. core's float32 probabilities are turned into uint8 as emtile stores them (``rint(255 p)``) and
   compared with emtile's bytes; the largest float32 difference is printed too, and again for
   emtile run in core's memory format (``channels_last=False``), which leaves only the sigmoid's
   implementation (NumPy's ``1 / (1 + exp(-x))`` in core, ``torch.sigmoid`` in emtile) to differ;
5. the same with core's default padding (``symmetric``, used when a package declares none), to
   show what the declaration changes: only pixels near the slice border (within the halo, plus
   up to ``2**depth - 1`` pixels where the max-pooling windows reach further on one side);
6. core's blockwise prediction (``predict_sample_with_blocking``) is attempted and its outcome
   printed: bioimage.io's tiler crops a halo from same-size outputs and cannot place the blocks of
   a model whose output is smaller than its input by a size offset (which is how the format
   describes a valid-convolution network).

The slices default to the model's validation slices; ``--raw`` to the volume it was trained on.

A 3-D model (``UNet(ndim=3)``) is checked on the whole ``--raw`` volume (give a small one, e.g.
a 40 x 72 x 80 crop): ``emtile predict`` with the folder and with the package (byte-identical),
and ``bioimageio.core`` on the volume padded by its own ``Tensor.pad`` as the package declares
(``reflect``, by the halo of each axis and up to the next valid size per axis), compared with
emtile's float32 probabilities of every channel.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import emtile
from emtile.export import export_model
from emtile.unet import load_folder, load_metadata


def parse_slices(text):
    a, _, b = text.partition(":")
    return list(range(int(a), int(b))) if b else [int(x) for x in text.split(",")]


def emtile_predict(model, raw, zs, out, *, tile, dtype, channels_last=True):
    z0, z1 = min(zs), max(zs) + 1
    emtile.predict(model, raw, out, tile=tile, dtype=dtype, roi=((z0, z1), None, None),
                   num_workers=0, device="cpu", progress=False, channels_last=channels_last)
    return np.asarray(emtile.open_volume(out)[:])[[z - z0 for z in zs]]


def core_predict(package, raw, zs, halo, shape_map, pad_mode=None):
    """bioimage.io core's prediction of each slice, padded by core as the package declares (or
    with ``pad_mode``)."""
    from bioimageio.core import Sample, Tensor, create_prediction_pipeline, load_description

    descr = load_description(package)
    pad_mode = pad_mode or descr.inputs[0].pad
    input_id, output_id = descr.inputs[0].id, descr.outputs[0].id
    out, blockwise = [], None
    with create_prediction_pipeline(descr, devices=["cpu"]) as pp:
        for z in zs:
            img = np.asarray(raw[z])
            widths = {}
            for axis, n in zip(("y", "x"), img.shape):
                total = next(v for v in range(n + 2 * halo, n + 2 * halo + shape_map.align + 1)
                             if shape_map.is_valid(v))
                widths[axis] = (halo, total - n - halo)
            def sample():  # a whole slice: not a valid model input until it is padded
                tensor = Tensor.from_numpy(img[None, None], dims=("batch", "channel", "y", "x"))
                return Sample(members={input_id: tensor}, stat={}, id=f"z{z}")

            if blockwise is None:  # core's own tiler, once, to record what it does
                try:
                    pp.predict_sample_with_blocking(sample(), ns=1)
                    blockwise = "ran"
                except Exception as exc:  # noqa: BLE001 (reported, not hidden)
                    blockwise = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            padded = sample().pad({input_id: widths}, mode=pad_mode)
            pred = pp.predict_sample_without_blocking(padded)
            p = pred.members[output_id].data.values[0, 0]
            out.append(p[:img.shape[0], :img.shape[1]])
    return np.stack(out).astype(np.float32), str(pad_mode), blockwise


def core_predict_3d(package, vol, net):
    """bioimage.io core's prediction of the whole (Z, Y, X) ``vol``, padded by core as the
    package declares: (C, Z, Y, X) float32."""
    from bioimageio.core import Sample, Tensor, create_prediction_pipeline, load_description

    descr = load_description(package)
    sm, input_id = net.shape_map, descr.inputs[0].id
    widths = {}
    for a, (axis, n) in enumerate(zip("zyx", vol.shape)):
        halo = sm.halos[a]
        total = next(v for v in range(n + 2 * halo, n + 2 * halo + sm.aligns[a] + 1)
                     if sm.output_along(v, a) is not None)
        widths[axis] = (halo, total - n - halo)
    tensor = Tensor.from_numpy(vol[None, None], dims=("batch", "channel", "z", "y", "x"))
    sample = Sample(members={input_id: tensor}, stat={}, id="volume")
    with create_prediction_pipeline(descr, devices=["cpu"]) as pp:
        pred = pp.predict_sample_without_blocking(
            sample.pad({input_id: widths}, mode=descr.inputs[0].pad))
    p = pred.members[descr.outputs[0].id].data.values[0]
    return np.asarray(p[:, :vol.shape[0], :vol.shape[1], :vol.shape[2]], np.float32)


def check_3d(args, net):
    """The 3-D check (see the module docstring)."""
    raw_path = args.raw or load_metadata(args.model).get("emtile", {}).get("raw")
    vol = np.asarray(emtile.open_volume(raw_path)[:])
    with tempfile.TemporaryDirectory(prefix="bioimageio-check-") as tmp:
        tmp = Path(tmp)
        print(export_model(args.model, tmp / "model.zip", sample=raw_path))
        tile = tuple(next(v for v in range(min(n + 2 * h, 160), 10**4)
                          if net.shape_map.output_along(v, a) is not None)
                     for a, (n, h) in enumerate(zip(vol.shape, net.shape_map.halos)))
        outs = {}
        for key, model, dtype in (("folder", args.model, "uint8"), ("zip", tmp / "model.zip",
                                                                     "uint8"),
                                  ("float", args.model, "float32")):
            emtile.predict(model, raw_path, tmp / f"{key}.zarr", dtype=dtype, tile=tile,
                           num_workers=0, device="cpu", progress=False)
            outs[key] = np.asarray(emtile.open_volume(tmp / f"{key}.zarr")[:])
        core = core_predict_3d(tmp / "model.zip", vol, net)
    ours = outs["float"].reshape(core.shape)
    print(f"volume {vol.shape} of {raw_path}, {core.shape[0]} channel(s)")
    print(f"emtile --model model.zip vs --model {args.model}: "
          f"{'byte-identical' if np.array_equal(outs['zip'], outs['folder']) else 'DIFFERENT'}")
    diff = np.abs(core - ours)
    print(f"bioimageio.core (padding reflect) vs emtile, float32: largest |difference| "
          f"{float(diff.max()):.3g}, {int((core != ours).sum())} of {core.size} values not "
          f"bit-identical")


def to_uint8(p):
    """emtile's storage of probabilities, ``rint(clip(p, 0, 1) * 255)`` (stitch.normalize)."""
    from emtile.stitch import normalize

    acc = p[None].astype(np.float32)
    return normalize(acc, np.ones(p.shape, np.float32), dtype=np.uint8)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model folder (e.g. run/best)")
    ap.add_argument("--raw", help="volume to predict [default: the one the model was trained on]")
    ap.add_argument("--slices", help="slices to compare, e.g. 25:30 [default: validation slices]")
    ap.add_argument("--tile", type=int, default=572, help="emtile predict's tile size")
    args = ap.parse_args()

    net = load_folder(args.model)
    if net.ndim == 3:
        return check_3d(args, net)
    meta = load_metadata(args.model).get("emtile", {})
    raw_path = args.raw or meta.get("raw")
    zs = parse_slices(args.slices) if args.slices else meta.get("val_slices") or [0]
    raw = emtile.open_volume(raw_path)
    with tempfile.TemporaryDirectory(prefix="bioimageio-check-") as tmp:
        tmp = Path(tmp)
        result = export_model(args.model, tmp / "model.zip", sample=raw_path, sample_slice=zs[0])
        print(result)
        ours = emtile_predict(args.model, raw_path, zs, tmp / "folder.zarr", tile=args.tile,
                              dtype="uint8")
        ours_f = emtile_predict(args.model, raw_path, zs, tmp / "folder_f32.zarr",
                                tile=args.tile, dtype="float32")
        plain = emtile_predict(args.model, raw_path, zs, tmp / "plain.zarr", tile=args.tile,
                               dtype="float32", channels_last=False)
        from_zip = emtile_predict(tmp / "model.zip", raw_path, zs, tmp / "zip.zarr",
                                  tile=args.tile, dtype="uint8")
        core_f, pad_mode, blockwise = core_predict(tmp / "model.zip", raw, zs, net.halo,
                                                   net.shape_map)
        core_sym, _, _ = core_predict(tmp / "model.zip", raw, zs, net.halo, net.shape_map,
                                      pad_mode="symmetric")
    core_u8 = to_uint8(core_f)
    diff = np.abs(core_u8.astype(np.int16) - ours.astype(np.int16))
    print(f"slices {zs[0]}..{zs[-1]} of {raw_path}, shape {ours.shape}, emtile tile {args.tile}")
    print(f"emtile --model model.zip vs --model {args.model}: "
          f"{'byte-identical' if np.array_equal(from_zip, ours) else 'DIFFERENT'}")
    print(f"bioimageio.core (padding {pad_mode}) vs emtile, uint8: "
          f"{int((diff > 0).sum())} of {diff.size} pixels differ, largest difference {diff.max()}")
    print(f"bioimageio.core vs emtile, float32: largest |difference| "
          f"{float(np.abs(core_f - ours_f).max()):.3g}, "
          f"{int((core_f != ours_f).sum())} pixels not bit-identical")
    print(f"bioimageio.core vs emtile with channels_last=False (core's memory format), float32: "
          f"largest |difference| {float(np.abs(core_f - plain).max()):.3g}, "
          f"{int((core_f != plain).sum())} pixels not bit-identical; uint8: "
          f"{int((to_uint8(plain) != core_u8).sum())} pixels differ")
    sym = to_uint8(core_sym) != core_u8
    if sym.any():
        yy, xx = np.nonzero(sym)[1:]
        h, w = ours.shape[1:]
        inward = int(np.minimum.reduce([yy, h - 1 - yy, xx, w - 1 - xx]).max())
        where = f"the farthest {inward} px from the slice border (halo {net.halo})"
    else:
        where = "none"
    print(f"bioimageio.core with its default padding (symmetric, edge pixel repeated) instead of "
          f"the declared reflect: {int(sym.sum())} uint8 pixels change; {where}")
    print(f"bioimageio.core's own tiler (predict_sample_with_blocking): {blockwise}")


if __name__ == "__main__":
    main()
