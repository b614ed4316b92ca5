"""The benchmark suite's CPU mode: every benchmark runs on tiny shapes, so CI catches a broken one.
(Timings on the CPU mean nothing and are not judged; the structure of the results is.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, run_checked


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    from benchmarks import ops, train_step

    out = tmp_path_factory.mktemp("bench")
    assert ops.main(["--cpu", "--out", str(out)]) == 0
    assert (
        train_step.main(["--cpu", "--out", str(out), "--seq", "16", "--layers", "1", "--steps", "1", "--warmup", "0"])
        == 0
    )
    return out


def test_op_benchmark_rows(cpu_run):
    data = json.loads((cpu_run / "ops.json").read_text())
    rows = data["rows"]
    assert data["environment"]["commit"] and data["ceilings"]["copy_gbps"] > 0
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    ops = {r["op"] for r in rows}
    assert ops == {
        "rms_norm",
        "rms_norm+residual",
        "apply_rotary",
        "swiglu",
        "linear_cross_entropy",
        "linear_logprobs",
        "rms_norm_sweep",
    }
    for row in rows:
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert ("gbps" in row) != ("tflops" in row)
    triton = [r for r in rows if r["contender"] == "triton" and r["mode"] == "fwd+bwd"]
    assert triton and all("speedup_vs_torch" in r for r in triton)
    assert {r["contender"] for r in rows if r["op"] == "linear_logprobs"} >= {"torch", "triton", "matmul"}
    assert (cpu_run / "ops.csv").read_text().count("\n") == len(rows) + 1
    assert (cpu_run / "speedups.png").stat().st_size > 0 and list(cpu_run.glob("rms_norm_sweep_*.png"))


def test_train_step_rows(cpu_run):
    """Every (activation checkpointing, packing, contender) case wrote its row, with the attention
    path that ran: packed rows of ours took a packed-capable path (on the CPU: sdpa_mask)."""
    data = json.loads((cpu_run / "train_step.json").read_text())
    rows = {(r["ac"], r["packing"], r["contender"]): r for r in data["rows"]}
    contenders = ("ours-torch", "ours-triton", "hf", "hf+solar")
    assert set(rows) == {
        (ac, p, c) for ac in ("none", "full", "selective") for p in ("unpacked", "packed") for c in contenders
    }
    assert len(data["rows"]) == len(rows)
    assert data["flops_per_token"] > 0 and data["compute_dtype"] == "float32" and data["master_dtype"] == "float32"
    for (ac, packing, contender), row in rows.items():
        assert "error" not in row, row
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["tflops"] > 0
        assert row["mfu"] is None and "verdicts" not in row  # no peak, no verdicts on the CPU
        if contender.startswith("ours-"):
            assert row["attention_path"] == ("sdpa_mask" if packing == "packed" else "sdpa_causal"), row
        else:
            assert row["attention_path"] == f"hf-sdpa-{'packed' if packing == 'packed' else 'causal'}", row
        if contender != "hf":
            assert row["speedup_vs_hf"] == pytest.approx(
                row["tokens_per_s"] / rows[(ac, packing, "hf")]["tokens_per_s"]
            )


def test_train_step_packed_batch_restarts_positions_per_document():
    from benchmarks.train_step import make_batch

    batch = make_batch(3, 64, 100, packed=True, eos=2)
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    for row in range(3):
        starts = (positions[row] == 0).nonzero().flatten().tolist()
        assert starts[0] == 0 and len(starts) >= 3  # documents of 8 to 32 tokens in a row of 64
        for end in starts[1:]:
            assert ids[row, end - 1] == 2 and labels[row, end - 1] == -100  # a document ends in eos, predicts nothing
        inner = [t for t in range(63) if t + 1 not in starts]
        assert torch.equal(labels[row, inner], ids[row, [t + 1 for t in inner]])
    assert (labels[:, -1] == -100).all()
    plain = make_batch(3, 64, 100, packed=False, eos=2)
    assert torch.equal(plain["position_ids"], torch.arange(64).repeat(3, 1)) and (plain["input_ids"] != 2).all()


def test_train_step_contenders_compute_the_same_loss_on_packed_rows():
    """Ours and transformers start from the same weights, and transformers masks packed rows per
    document (it does not when a KV cache is in use), so the first losses agree; under the trainer's
    selective checkpointing too (a KV cache appended to twice broke its recomputation)."""
    from benchmarks.train_step import build, make_batch
    from solar_kernels.model import preset
    from training.config import Config

    config = preset("tiny").replace(num_layers=2)
    batch = make_batch(2, 64, config.vocab_size, packed=True, eos=2)
    train = Config()
    train.model.dtype, train.train.activation_checkpointing = "float32", "selective"
    losses = {}
    for name in ("ours-torch", "hf"):
        objective = build(name, config, train, torch.device("cpu"), True)
        loss, _ = objective(**batch)
        loss.backward()
        losses[name] = loss.item()
    assert objective.last_attention_path == "hf-sdpa-packed"
    assert losses["hf"] == pytest.approx(losses["ours-torch"], rel=1e-5)


def test_train_step_verdicts():
    from benchmarks.train_step import speedups, verdicts

    def row(contender, packing, tokens_per_s, mfu=None):
        return {"contender": contender, "ac": "none", "packing": packing, "tokens_per_s": tokens_per_s, "mfu": mfu}

    rows = [
        row("ours-triton", "unpacked", 1400.0, 0.55),
        row("hf", "unpacked", 1000.0),
        row("hf+liger", "unpacked", 1250.0),
        row("ours-triton", "packed", 1200.0, 0.47),
        row("hf", "packed", 1000.0),
        {"contender": "hf+liger", "ac": "none", "packing": "packed", "error": "OutOfMemoryError"},
    ]
    speedups(rows)
    verdicts(rows)
    assert rows[0]["verdicts"] == {
        "mfu": "met: 55.0% vs 50%",
        "vs_hf": "met: 1.40x vs 1.30x",
        "vs_hf+liger": "missed: 1.12x vs 1.15x",
    }
    assert rows[3]["verdicts"] == {
        "mfu": "missed: 47.0% vs 50%",
        "vs_hf": "missed: 1.20x vs 1.30x",
        "packed": "missed: 14.3% slower than unpacked vs 10%",
    }
    assert "verdicts" not in rows[1] and "speedup_vs_hf+liger" not in rows[3]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--batch", "0"], "--batch must be at least 1, got 0"),
        (["--seq", "1"], "--seq must be at least 2, got 1"),
        (["--layers", "two"], "--layers must be a positive integer or 'auto', got 'two'"),
        (["--ac", "some"], "invalid choice: 'some'"),
    ],
)
def test_train_step_refuses_bad_arguments(args, expected, capsys, tmp_path):
    from benchmarks import train_step

    with pytest.raises(SystemExit):
        train_step.main(["--cpu", "--out", str(tmp_path), *args])
    assert expected in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any work


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
    assert target_verdict(ce, 1.0) == "missed: 1.30x > 1.15x its 3 matmuls"
    # the log-prob ops are held to their own four matmuls (the backward recomputes the logits)
    lp = {**ce, "op": "linear_logprobs", "median_ms": 1.1}
    assert target_verdict(lp, 1.0) == "met (1.10x ≤ 1.15x its 4 matmuls)"
    assert target_verdict({**lp, "op": "sequence_logprobs"}, 1.0).startswith("met")


def test_logprob_matmul_floor_counts_the_recomputed_logits():
    from benchmarks.cases import TINY, _logprob_case

    shapes = {}
    for op in ("linear_cross_entropy", "linear_logprobs"):
        case = _logprob_case(op, 8, TINY, torch.float32, torch.device("cpu"), ["torch"])
        inputs = case.make_inputs()
        shapes[op] = [tuple(t.shape) for t in case.contenders["matmul"](inputs, "fwd+bwd")]
    logits, dhidden, dweight = (8, TINY["vocab"]), (8, TINY["d"]), (TINY["vocab"], TINY["d"])
    assert shapes["linear_cross_entropy"] == [logits, dhidden, dweight]
    assert shapes["linear_logprobs"] == [logits, dhidden, dweight, logits]


def test_environment_without_git(monkeypatch):
    from benchmarks import common

    monkeypatch.delenv("SOLAR_KERNELS_COMMIT", raising=False)
    monkeypatch.setattr(common.shutil, "which", lambda name: None)  # an image with no git
    assert common.environment(torch.device("cpu"))["commit"] == "unknown"
    monkeypatch.setenv("SOLAR_KERNELS_COMMIT", "abc1234")
    assert common.environment(torch.device("cpu"))["commit"] == "abc1234"


def test_report_merges_the_triton_and_cuda_op_files(tmp_path):
    from benchmarks import report

    env = {"date": "2026-12-01", "card": "NVIDIA H200", "commit": "abc", "torch": "2.11", "triton": "3.6"}
    row = {"op": "swiglu", "mode": "fwd", "dtype": "bfloat16", "shape": "tokens=16384", "tokens": 16384}
    for stem, contender, ms in (("ops", "triton", 2.0), ("ops_cuda", "cuda", 1.0)):
        rows = [{**row, "contender": contender, "median_ms": ms}]
        (tmp_path / f"{stem}.json").write_text(
            json.dumps({"environment": env, "ceilings": {"copy_gbps": 4000}, "rows": rows})
        )
    (tmp_path / "steps.tsv").write_text(
        "op benchmarks (Triton)\t0\t90\tops.json\ntrain step\t124\t100\ttrain_step.json\n"
    )
    combined = json.loads(report.collect(tmp_path, tmp_path / "out").read_text())
    cuda = next(r for r in combined["ops"] if r["contender"] == "cuda")
    assert cuda["speedup_vs_triton"] == 2.0
    assert combined["steps"] == [
        {"step": "op benchmarks (Triton)", "status": "0", "seconds": 90, "file": "ops.json", "wrote": True},
        {"step": "train step", "status": "124", "seconds": 100, "file": "train_step.json", "wrote": False},
    ]


def test_gpu_check_rehearsal_runs_every_step_and_builds_the_report(tmp_path):
    """benchmarks/gpu_check.sh end to end on the CPU (GPU_CHECK_REHEARSAL=1): every step ran within
    its budget, wrote its file, and the report step ran last and built the combined results."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "SANITIZE")}
    # CUDA_BUILD_S=1: the extension's build runs out of time, so the Triton-only fallback is what runs
    env.update(
        GPU_CHECK_REHEARSAL="1",
        OUT=str(out),
        PY=sys.executable,
        BUDGET_S="420",
        SOLAR_KERNELS_COMMIT="rehearsal",
        CUDA_BUILD_S="1",
    )
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    log = done.stdout[-4000:] + done.stderr[-2000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    names = [s[0] for s in steps]
    assert names == [
        "environment + ceilings",
        "install",
        "op benchmarks (Triton)",
        "train step",
        "op benchmarks (CUDA)",
        "tests",
        "report",
    ], log
    for name, status, _seconds, output in steps:
        assert status in ("0", "5") if name == "tests" else status == "0", (name, status, log)  # 5: no test selected
        assert not output or (out / output).stat().st_size > 0, (name, output)
    assert "installing Triton-only" in (out / "install.log").read_text()
    combined = json.loads(next(out.glob("*-x8664cpu.json")).read_text())
    assert combined["environment"]["commit"] == "rehearsal"
    assert {r["contender"] for r in combined["ops"]} >= {"torch", "triton"}
    assert {r["timing"] for r in combined["ops"] if "median_ms" in r} == {"wall clock"}
    assert {r["contender"] for r in combined["train_step"]} == {"ours-triton", "hf"}
    assert [s["step"] for s in combined["steps"]] == names[:-1] and all(
        s["wrote"] for s in combined["steps"] if s["file"]
    )


def test_pytest_benchmark_file_runs():
    done = run_checked(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        unset=("PYTEST_ADDOPTS",),
    )
    assert " passed" in done.stdout
