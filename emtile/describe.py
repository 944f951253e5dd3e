"""What ``emtile info`` says about anything emtile reads or writes: a volume, a model, a run.

:func:`describe` recognises the path and returns a plain dict; :func:`format_description` prints
it. Volumes (and prediction stores, with their provenance) are :func:`emtile.volume.info`'s.
A model folder (``config.json``) or bioimage.io package is described from its files alone:
architecture, parameters, valid tile sizes, the data it was trained on and at which voxel size,
its input normalisation, its calibration and its validation scores, each V-Rand named by its
threshold. A training run folder (``run.json``) is described by its settings, how far it got,
its best model and where to find it.
"""

import json
from pathlib import Path

from emtile._errors import EmtileError

__all__ = ["describe", "describe_model", "describe_run", "format_description", "is_run_folder"]

RUN_FILE = "run.json"  # emtile.training.run.RUN_FILE (not imported: it pulls in torch)


def is_run_folder(path):
    """True for a training run folder (``run.json``, written by ``emtile train``)."""
    p = Path(str(path))
    return p.is_dir() and (p / RUN_FILE).is_file()


def _is_model(path):
    from emtile.package import is_package

    p = Path(str(path))
    return (p.is_dir() and (p / "config.json").is_file()) or (p.exists() and is_package(p))


def describe(path, *, stats=False, progress=False):
    """Describe ``path``: ``{"what": "volume" | "model" | "run", ...}``.

    A volume's dict is :func:`emtile.volume.info`'s (``stats`` and ``progress`` are for it);
    a model's :func:`describe_model`'s; a run's :func:`describe_run`'s.
    """
    if is_run_folder(path):
        return describe_run(path)
    if _is_model(path):
        return describe_model(path)
    from emtile.volume import info

    return dict(info(path, stats=stats, progress=progress), what="volume")


def _metadata(path):
    from emtile.package import is_package, package_metadata
    from emtile.unet import load_metadata

    meta = package_metadata(path) if is_package(path) else load_metadata(path)
    return meta.get("emtile", {}) if isinstance(meta, dict) else {}


def describe_model(path):
    """A model folder or package as a dict: ``architecture`` (its config), ``parameters``,
    ``geometry`` (halo, smallest valid tile, step, a few valid sizes), and what its
    ``metadata.json`` records: ``training``, ``voxel_size``, ``normalization``, ``calibration``,
    ``metrics``."""
    import torch

    from emtile.model import load_model
    from emtile.package import is_package
    from emtile.unet import UNet

    net = load_model(path)  # checks the folder or package completely
    with torch.device("meta"):
        n_params = sum(p.numel() for p in UNet(**net.config).parameters())
    info = _metadata(path)
    sm = net.shape_map
    sizes = net.valid_sizes(sm.min_size, 1024)
    training = {k: info[k] for k in ("kind", "raw", "labels", "train_slices", "val_slices",
                                     "iteration", "iterations", "seed", "elapsed_s")
                if k in info}
    settings = info.get("settings") or {}
    return {
        "what": "model", "path": str(path),
        "format": "bioimage.io package" if is_package(path) else "emtile model folder",
        "architecture": dict(net.config), "parameters": int(n_params),
        "geometry": {"halo": sm.halo, "min_size": sm.min_size, "step": sm.align,
                     "valid_sizes": sizes, "border": 2 * sm.halo},
        "training": training,
        "settings": {k: settings[k] for k in ("lr", "loss", "w0", "class_balance", "freeze_bn",
                                              "tile", "amp", "normalize") if k in settings},
        "voxel_size": info.get("voxel_size"),
        "normalization": info.get("normalization"),
        "calibration": info.get("calibration"),
        "metrics": info.get("metrics") or {},
    }


def describe_run(path):
    """A training run folder as a dict: ``settings``, ``iterations_done`` (of ``last/``),
    ``best`` (:func:`describe_model` of ``best/``, when it exists), ``folders`` and ``log``."""
    p = Path(str(path))
    try:
        run = json.loads((p / RUN_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise EmtileError(f"{str(p / RUN_FILE)!r} cannot be read as a training run: {exc}") from None
    out = {"what": "run", "path": str(p), "settings": run.get("settings", {}),
           "raw": run.get("raw"), "labels": run.get("labels"),
           "train_slices": run.get("train_slices"), "val_slices": run.get("val_slices"),
           "normalization": run.get("normalization"), "voxel_size": run.get("voxel_size"),
           "folders": [n for n in ("best", "last") if (p / n / "config.json").exists()],
           "log": str(p / "train.csv") if (p / "train.csv").exists() else None,
           "iterations_done": None, "best": None}
    if "last" in out["folders"]:
        out["iterations_done"] = _metadata(p / "last").get("iteration")
    if "best" in out["folders"]:
        out["best"] = describe_model(p / "best")
    return out


# --------------------------------------------------------------------------- text


def _slices_text(zs):
    """Slice indices as runs: ``[0, 1, 2, 5]`` -> ``0:3,5``."""
    if not isinstance(zs, list) or not all(isinstance(z, int) for z in zs):
        return str(zs)
    from emtile.volume import slice_runs

    return ",".join(str(a) if b == a + 1 else f"{a}:{b}" for a, b in slice_runs(sorted(zs)))


def _sizes_text(g):
    sizes = g["valid_sizes"]
    shown = ", ".join(str(s) for s in sizes[:4])
    if 572 in sizes and sizes.index(572) > 3:
        shown += ", ..., 572"
    return (f"{g['min_size']} + {g['step']} n ({shown}, ...); output = input - {g['border']} "
            f"(context {g['halo']} px per side)")


def _calibration_text(cal):
    if not cal:
        return "none"
    from emtile.training.calibration import calibration_text

    text = calibration_text(cal)
    if cal.get("kept") is False:
        text = "tried and not kept: " + text
    return text


def _model_lines(d, indent=""):
    from emtile.normalize import describe as describe_normalization
    from emtile.training.validation import format_scores

    a, g, t = d["architecture"], d["geometry"], d["training"]
    lines = [
        f"architecture  U-Net 2-D, depth {a['depth']}, base {a['base']}, batch norm "
        f"{'on' if a['batch_norm'] else 'off'}, dropout {a['dropout']:g}, "
        f"{a['in_channels']} -> {a['out_channels']} channels",
        f"parameters    {d['parameters']:,}",
        f"tile sizes    {_sizes_text(g)}",
    ]
    if t:
        where = ", ".join(f"{k} {t[k]}" for k in ("raw", "labels") if k in t)
        sl = ", ".join(f"{k.replace('_', ' ')} {_slices_text(t[k])}"
                       for k in ("train_slices", "val_slices") if k in t)
        lines.append(f"trained on    {where}" + (f"; {sl}" if sl else ""))
        if "iteration" in t:
            lines.append(f"iteration     {t['iteration']} of {t.get('iterations', '?')}"
                         + (f" ({t['kind']} checkpoint)" if t.get("kind") else "")
                         + (f", seed {t['seed']}" if "seed" in t else ""))
    else:
        lines.append("trained on    (not recorded)")
    vs = d["voxel_size"]
    lines.append("voxel size    " + (" x ".join(f"{v:g}" for v in vs) + " nm (z, y, x of the "
                                     "training data)" if vs else "not recorded"))
    lines.append(f"normalisation {describe_normalization(d['normalization'])}")
    lines.append(f"calibration   {_calibration_text(d['calibration'])}")
    cal = d["calibration"] or {}
    lines.append(f"validation    {format_scores(d['metrics']) or 'not recorded'}"
                 + (" (before calibration)" if cal.get("kept") and cal.get("val_after") else ""))
    if cal.get("val_after") and cal.get("kept"):
        lines.append(f"  calibrated  {format_scores(cal['val_after'])}")
    return [indent + line for line in lines]


def format_description(d):
    """What ``emtile info`` prints for a :func:`describe` dict."""
    if d["what"] == "volume":
        from emtile.volume import format_info

        return format_info(d)
    if d["what"] == "model":
        return "\n".join([f"path          {d['path']}", f"kind          {d['format']}",
                          *_model_lines(d)])
    s = d["settings"]
    done = d["iterations_done"]
    lines = [f"path          {d['path']}",
             "kind          emtile training run",
             f"progress      {done if done is not None else 0} of {s.get('iterations', '?')} "
             f"iterations" + (" (resume with emtile train ... --resume)"
                              if done is not None and done < s.get("iterations", 0) else ""),
             f"data          raw {d['raw']}, labels {d['labels']}; train slices "
             f"{_slices_text(d['train_slices'])}, validation slices "
             f"{_slices_text(d['val_slices'])}",
             f"log           {d['log'] or '-'} (emtile show --log {d['path']} -o curve.png)"]
    if d["best"]:
        lines += ["", f"best model    {Path(d['path']) / 'best'}  (emtile predict --model "
                      f"{Path(d['path']) / 'best'} ...)", *_model_lines(d["best"], "  ")]
    else:
        lines.append("best model    none yet")
    return "\n".join(lines)
