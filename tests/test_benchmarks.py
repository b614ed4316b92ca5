"""The benchmark suite's CPU mode: every benchmark runs on tiny shapes, so CI catches a broken one.
(Timings on the CPU mean nothing and are not judged; the structure of the results is.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    from benchmarks import ops, train_step

    out = tmp_path_factory.mktemp("bench")
    assert ops.main(["--cpu", "--out", str(out)]) == 0
    assert train_step.main(["--cpu", "--out", str(out), "--steps", "2", "--warmup", "1"]) == 0
    return out


def test_op_benchmark_rows(cpu_run):
    data = json.loads((cpu_run / "ops.json").read_text())
    rows = data["rows"]
    assert data["environment"]["commit"] and data["ceilings"]["copy_gbps"] > 0
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    ops = {r["op"] for r in rows}
    assert ops == {"rms_norm", "rms_norm+residual", "apply_rotary", "swiglu", "linear_cross_entropy",
                   "linear_logprobs", "rms_norm_sweep"}
    for row in rows:
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert ("gbps" in row) != ("tflops" in row)
    triton = [r for r in rows if r["contender"] == "triton" and r["mode"] == "fwd+bwd"]
    assert triton and all("speedup_vs_torch" in r for r in triton)
    assert {r["contender"] for r in rows if r["op"] == "linear_logprobs"} >= {"torch", "triton", "matmul"}
    assert (cpu_run / "ops.csv").read_text().count("\n") == len(rows) + 1
    assert (cpu_run / "speedups.png").stat().st_size > 0 and list(cpu_run.glob("rms_norm_sweep_*.png"))


def test_train_step_rows(cpu_run):
    data = json.loads((cpu_run / "train_step.json").read_text())
    rows = {r["contender"]: r for r in data["rows"]}
    assert {"ours-torch", "ours-triton", "hf", "hf+solar"} <= set(rows)
    for row in rows.values():
        assert "error" not in row, row
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0
    assert data["flops_per_token"] > 0


def test_report_collects_and_writes_the_readme_section(cpu_run, tmp_path):
    from benchmarks import report

    results = tmp_path / "results"
    assert report.main([str(cpu_run), "--into", str(results)]) == 0
    combined = json.loads(next(results.glob("*.json")).read_text())
    assert combined["ops"] and combined["train_step"]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\nrest\n")
    report.main(["--into", str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "| triton |" in text and "Training step" in text


def test_report_target_verdicts():
    from benchmarks.report import target_verdict

    row = {"op": "rms_norm", "mode": "fwd", "tokens": 16384, "of_copy": 0.93, "median_ms": 1.0}
    assert target_verdict(row, None).startswith("met")
    assert target_verdict({**row, "of_copy": 0.5}, None) == "missed: 50% < 90%"
    assert target_verdict({**row, "tokens": 4096}, None) == ""
    ce = {"op": "linear_cross_entropy", "mode": "fwd+bwd", "tokens": 16384, "median_ms": 1.3}
    assert target_verdict(ce, 1.0) == "missed: 1.30x > 1.15x matmul"


def test_pytest_benchmark_file_runs():
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout
