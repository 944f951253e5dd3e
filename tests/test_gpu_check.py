"""examples/gpu_check.sh: one line without CUDA; its steps, parsing, table and JSON on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import gpu_check  # noqa: E402

torch = pytest.importorskip("torch")


def _git_status():
    return subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT,
                          capture_output=True, text=True).stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA line needs a machine without")
def test_without_cuda_one_line_exit_0_nothing_written(tmp_path):
    before = _git_status()
    done = subprocess.run(["bash", str(ROOT / "examples" / "gpu_check.sh"), "--out",
                           "g.json"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("gpu_check: no CUDA device here (torch ")
    assert lines[0].endswith("; nothing measured")
    assert list(tmp_path.iterdir()) == []
    assert _git_status() == before


def _tiny_bench_cmd():
    return gpu_check.emtile_cmd(sys.executable, "bench", "--base", "2", "--depth", "2", "--tile",
                                "92", "--tiles", "2", "--device", "cpu", "--json")


@pytest.fixture(scope="module")
def saved_bench(tmp_path_factory):
    """The output of a real ``emtile bench --json`` run on the CPU with a tiny model, saved."""
    done = subprocess.run(_tiny_bench_cmd(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    path.write_text(done.stdout)
    return path


def _cat(path):
    return [sys.executable, "-c", f"print(open({str(path)!r}).read())"]


def test_bench_output_to_row_and_record(saved_bench):
    rec = gpu_check.run_step("tiny", _cat(saved_bench), 30, gpu_check.bench_figures)
    assert rec["status"] == "ok" and rec["returncode"] == 0, rec
    f = rec["figures"]
    assert f["base"] == 2 and f["tiles"] == 2 and f["device"] == "cpu" and f["amp"] == "off"
    assert f["ratio"] == pytest.approx(f["predict_s"] / f["model_s"])
    assert f["predict_mvox_s"] == pytest.approx(f["out_voxels"] / f["predict_s"] / 1e6)
    assert f["cuda_peak"] is None
    row = gpu_check.table_row(rec)
    assert row[:2] == ["tiny", "ok"]
    assert row[3] == f"{f['ratio']:.3f}"
    assert row[4] == f"{f['predict_mvox_s']:.1f}"
    assert row[6] == f"{f['model_gflops']:.0f}"
    assert row[7] == f"{f['peak_rss'] / 2**30:.2f}" and row[8] == "-"
    json.dumps(rec)  # the record goes into the JSON as it is


def test_failed_and_timed_out_steps_are_recorded():
    bad = gpu_check.run_step("bad", [sys.executable, "-c", "import sys; sys.exit(3)"], 30,
                             gpu_check.bench_figures)
    assert bad["status"] == "failed" and bad["returncode"] == 3 and bad["figures"] == {}
    slow = gpu_check.run_step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 2)
    assert slow["status"] == "timeout" and slow["returncode"] is None
    assert 2 <= slow["seconds"] < 30
    garbled = gpu_check.run_step("garbled", [sys.executable, "-c", "print('no json')"], 30,
                                 gpu_check.bench_figures)
    assert garbled["status"] == "failed" and "not understood" in garbled["error"]
    skipped = gpu_check.run_step("late", [sys.executable, "-c", "pass"], 1.5)
    assert skipped["status"] == "skipped"
    table = gpu_check.format_table([bad, slow, garbled, skipped]).splitlines()
    assert len(table) == 6 and table[0].split()[:2] == ["step", "status"]
    assert [ln.split()[1] for ln in table[2:]] == ["failed", "timeout", "failed", "skipped"]


def test_plan_covers_the_issue(tmp_path):
    a = SimpleNamespace(has_pipeline=False, has_dask_cuda=False, predict_gb=4.0, side=2048)
    steps = gpu_check.plan(a, "python", tmp_path)
    names = [s[0] for s in steps]
    for want in ("amp off", "amp bf16", "amp fp16", "bf16 no channels_last", "bf16 workers 0",
                 "bf16 workers 8", "bf16 base 64", "pipeline bf16", "predict 4 GB bf16",
                 "cluster cuda, 1 worker", "nvidia-smi", "versions"):
        assert want in names
    by_name = {s[0]: s for s in steps}
    assert by_name["pipeline bf16"][1] is None and "not available" in by_name["pipeline bf16"][4]
    assert by_name["cluster cuda, 1 worker"][4] == "dask-cuda not installed"
    assert "--no-channels-last" in by_name["bf16 no channels_last"][1]
    assert all(s[2] <= gpu_check.PREDICT_CAP_S for s in steps)
    assert gpu_check.parse_args([]).budget_s <= 480


def test_main_writes_json_and_table(tmp_path, monkeypatch, capsys, saved_bench):
    """The CUDA path end to end with the GPU steps swapped for CPU ones (a saved bench output)."""
    def plan(a, python, work):
        return [("tiny", _cat(saved_bench), 30, gpu_check.bench_figures, None),
                ("bad", [python, "-c", "raise SystemExit(2)"], 30, None, None),
                ("pipeline bf16", None, 90, None, "not available: no --pipeline")]

    monkeypatch.setattr(gpu_check, "cuda_line", lambda: None)
    monkeypatch.setattr(gpu_check, "plan", plan)
    out = tmp_path / "g.json"
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    gpu_check.main(["--out", str(out), "--budget-s", "200", "--workdir", str(tmp_path)])
    assert os.environ["TMPDIR"] == str(tmp_path)  # restored
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]  # its work folder is gone
    report = json.loads(out.read_text())
    assert [s["status"] for s in report["steps"]] == ["ok", "failed", "not available"]
    assert report["steps"][0]["figures"]["ratio"] > 0
    assert set(report) >= {"started", "budget_s", "total_s", "environment", "steps"}
    table = capsys.readouterr().out
    assert "tiny" in table and "not available" in table


def test_predict_helper_on_cpu(tmp_path, capsys):
    gpu_check.main(["--predict-run", "--device", "cpu", "--workdir", str(tmp_path),
                    "--predict-gb", "0.00002", "--side", "128"])
    first, last = capsys.readouterr().out.strip().splitlines()
    assert json.loads(first)["phase"] == "volume written"
    r = gpu_check.last_json(first + "\n" + last)
    assert r["shape"] == [1, 128, 128] and r["mvox_s"] > 0 and r["cuda_peak"] is None


def test_pipeline_is_detected_and_parsed():
    """This emtile's `bench --help` lists --pipeline, so the check runs it; its JSON parses."""
    assert gpu_check.has_option(sys.executable, "--pipeline")
    steps = gpu_check.plan(SimpleNamespace(has_pipeline=True, has_dask_cuda=False,
                                           predict_gb=4.0, side=2048), "python", Path("."))
    cmd = {s[0]: s for s in steps}["pipeline bf16"][1]
    assert cmd[-5:] == ["--pipeline", "--shape", "16,2048,2048", "--repeat", "2"]
    text = json.dumps({"depth": 4, "tile": 572, "batch_size": 1, "device": "cuda", "amp": "bf16",
                       "num_workers": None, "cores": 16, "volume_shape": [16, 2048, 2048],
                       "out_voxels": 67108864, "wall_s": 2.0, "pipeline_mvox_per_s": 33.5,
                       "parts": {"read_decode": 0.5}, "other_s": 1.5,
                       "output_equals_input": True}, indent=2)
    fig = gpu_check.pipeline_figures("log line\n" + text)
    assert fig["mvox_s"] == 33.5 and fig["parts"] == {"read_decode": 0.5}
    rec = {"name": "pipeline bf16", "status": "ok", "seconds": 9.0, "figures": fig}
    assert gpu_check.table_row(rec)[4] == "33.5"
