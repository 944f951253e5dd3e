"""``examples/isbi2012.ipynb`` runs from top to bottom (nbclient, a real Jupyter kernel) on a tiny
configuration of the ISBI data, shows its figures, prints the ISBI table and leaves complete
stores; and it is stored without outputs."""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from emtile import store

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOK = EXAMPLES / "isbi2012.ipynb"
TINY = {"EMTILE_NB_ITERATIONS": "5", "EMTILE_NB_BASE": "4", "EMTILE_NB_TRAIN_SLICES": "0:2",
        "EMTILE_NB_VAL_SLICES": "2:5"}


def test_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


def _output_text(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.slow
def test_runs_on_a_tiny_configuration(isbi_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("EMTILE_ISBI_DIR", str(Path(isbi_dir).resolve()))
    monkeypatch.setenv("EMTILE_NB_OUT", str(out))
    for name, value in TINY.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    # which interpreter the kernel runs: must be this one (the venv's), not another python3
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    # the kernel starts in examples/, as Jupyter starts it; a failing cell raises here
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert _output_text(code[-1]).strip() == sys.executable
    code = code[:n_code]
    figures = [c for c in code if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert len(figures) == 4  # training curve, two comparisons, the segmentation
    report = next(_output_text(c) for c in code if "format_report" in c.source)
    assert "V-Rand@0.5" in report and "V-Info@0.5" in report

    scores = json.loads((out / "scores.json").read_text())
    assert [d["z"] for d in scores["slices"]] == [2, 3, 4]
    assert 0 <= scores["mean"]["v_rand"] <= 1
    assert 0 <= scores["sweep"]["best_v_rand"]["value"] <= 1
    for name in ("train.zarr", "labels.zarr", "pred.zarr", "seg.zarr"):
        assert store.is_complete(out / name), name
    for name in ("train.zarr", "pred.zarr", "seg.zarr"):  # the ISBI voxel size, carried through
        assert list(store.voxel_size_nm(out / name)) == [50, 4, 4], name
    assert (out / "model" / "best" / "model.safetensors").exists()
