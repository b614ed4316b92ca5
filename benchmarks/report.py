"""Collect one GPU run into ``benchmarks/results/<date>-<card>.{json,csv}`` and regenerate the
README's performance section from the results committed there.

    python -m benchmarks.report RUN_DIR [--into benchmarks/results] [--readme README.md]

RUN_DIR holds ``ops.json`` and/or ``train_step.json`` from ``benchmarks.ops`` / ``benchmarks.train_step``.
The README section between ``<!-- performance:start -->`` and ``<!-- performance:end -->`` is
rewritten from the newest result file of each card; nothing else in the README changes. Each op row
is checked against the targets of the benchmark issue (ratios to the ceilings measured in the run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import card_slug, write_csv

START, END = "<!-- performance:start -->", "<!-- performance:end -->"
# (op, mode) -> (measure, target): of_copy = share of the measured copy bandwidth; of_matmul = time
# over the time of the GEMMs the op must do, timed by the case's ``matmul`` contender (lower is
# better): three for linear_cross_entropy (logits, dhidden, dweight), four for the log-prob ops,
# whose backward recomputes the logits by design (benchmarks/cases.py).
MATMULS = {"linear_cross_entropy": 3, "linear_logprobs": 4, "sequence_logprobs": 4}
TARGETS = {
    ("rms_norm", "fwd"): ("of_copy", 0.90),
    ("rms_norm+residual", "fwd"): ("of_copy", 0.90),
    ("rms_norm", "bwd"): ("of_copy", 0.80),
    ("swiglu", "fwd"): ("of_copy", 0.90),
    ("swiglu", "bwd"): ("of_copy", 0.85),
    ("apply_rotary", "fwd+bwd"): ("of_copy", 0.80),
    ("linear_cross_entropy", "fwd+bwd"): ("of_matmul", 1.15),
    ("linear_logprobs", "fwd+bwd"): ("of_matmul", 1.15),
    ("sequence_logprobs", "fwd+bwd"): ("of_matmul", 1.15),
}


def _steps(run_dir: Path) -> list[dict[str, object]]:
    """gpu_check.sh's steps.tsv: one line per step (name, exit status, seconds, file it writes)."""
    path = run_dir / "steps.tsv"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        name, status, seconds, output = (line.split("\t") + ["", "", "", ""])[:4]
        steps.append(
            {
                "step": name,
                "status": status,
                "seconds": int(seconds or 0),
                "file": output,
                "wrote": bool(output) and (run_dir / output).exists(),
            }
        )
    return steps


def collect(run_dir: Path, into: Path) -> Path:
    """One run's files -> ``<date>-<card>.{json,csv}``: the op rows of every ``ops*.json`` (the Triton
    and CUDA steps of gpu_check.sh write ops.json and ops_cuda.json), speedups recomputed over all of
    them, the train step, the ceilings and the steps' log."""
    from benchmarks.ops import add_speedups

    op_parts = [json.loads(path.read_text()) for path in sorted(run_dir.glob("ops*.json"))]
    train = json.loads((run_dir / "train_step.json").read_text()) if (run_dir / "train_step.json").exists() else {}
    measured = json.loads((run_dir / "environment.json").read_text()) if (run_dir / "environment.json").exists() else {}
    if not op_parts and not train and not measured:
        raise SystemExit(f"{run_dir}: no ops*.json, train_step.json or environment.json")
    env = next(part["environment"] for part in [*op_parts, train, measured] if part)
    ops_rows = [row for part in op_parts for row in part.get("rows", [])]
    add_speedups(ops_rows)
    ceilings = next((part.get("ceilings") for part in [*op_parts, measured] if part.get("ceilings")), None)
    combined = {
        "environment": env,
        "ceilings": ceilings,
        "ops": ops_rows,
        "train_step": train.get("rows", []),
        "train_step_flops_per_token": train.get("flops_per_token"),
        "steps": _steps(run_dir),
    }
    into.mkdir(parents=True, exist_ok=True)
    stem = into / f"{env['date']}-{card_slug(env['card'])}"
    stem.with_suffix(".json").write_text(json.dumps(combined, indent=2) + "\n")
    rows = [{"suite": "ops", **r} for r in combined["ops"]] + [
        {"suite": "train_step", **r} for r in combined["train_step"]
    ]
    write_csv(stem.with_suffix(".csv"), rows, env)
    return stem.with_suffix(".json")


def target_verdict(row: dict, matmul_ms: float | None) -> str:
    target = TARGETS.get((row["op"], row["mode"]))
    if target is None or row.get("tokens", 0) < 16384:
        return ""
    measure, goal = target
    if measure == "of_copy":
        value = row.get("of_copy")
        return (
            ""
            if value is None
            else (f"met ({value:.0%} ≥ {goal:.0%})" if value >= goal else f"missed: {value:.0%} < {goal:.0%}")
        )
    if not matmul_ms:
        return ""
    ratio = row["median_ms"] / matmul_ms
    floor = f"its {MATMULS[row['op']]} matmuls"
    return f"met ({ratio:.2f}x ≤ {goal}x {floor})" if ratio <= goal else f"missed: {ratio:.2f}x > {goal}x {floor}"


def section(results_dir: Path) -> str:
    newest: dict[str, Path] = {}
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if "ops" in data and "environment" in data:
            newest[data["environment"]["card"]] = path
    if not newest:
        return (
            "No GPU measurements have been made yet: `benchmarks/gpu_check.sh` produces them, and this\n"
            "section is generated from `benchmarks/results/` by `python -m benchmarks.report`."
        )
    lines = []
    for card, path in sorted(newest.items()):
        data = json.loads(path.read_text())
        env, ceil = data["environment"], data.get("ceilings") or {}
        lines += [
            f"### {card} — {env['date']}, commit {env['commit']} (`{path.as_posix()}`)",
            "",
            f"Measured in the same run: copy {ceil.get('copy_gbps', 0):.0f} GB/s, bf16 GEMM "
            f"{ceil.get('gemm_tflops', 0):.0f} TFLOP/s. torch {env['torch']}, triton {env['triton']}.",
            "",
        ]
        ops = [r for r in data["ops"] if "median_ms" in r and r["op"] != "rms_norm_sweep"]
        if ops:
            tokens = 16384 if any(r["tokens"] == 16384 for r in ops) else max(r["tokens"] for r in ops)
            matmul = {
                (r["op"], r["mode"], r["dtype"]): r["median_ms"]
                for r in ops
                if r["contender"] == "matmul" and r["tokens"] == tokens
            }
            lines += [
                f"Ops at {tokens} tokens (SOLAR shapes):",
                "",
                "| op | mode | dtype | contender | ms | rate | of ceiling | vs torch | vs torch.compile | vs liger | target |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in ops:
                if r["tokens"] != tokens or r["contender"] not in ("triton", "cuda"):
                    continue
                rate = f"{r['gbps']:.0f} GB/s" if "gbps" in r else f"{r['tflops']:.0f} TFLOP/s"
                share = r.get("of_copy", r.get("of_gemm"))
                vs = [r.get(f"speedup_vs_{c}") for c in ("torch", "torch_compile", "liger")]
                verdict = (
                    target_verdict(r, matmul.get((r["op"], r["mode"], r["dtype"])))
                    if r["contender"] == "triton"
                    else ""
                )
                share = f"{share:.0%}" if share is not None else "–"
                lines.append(
                    f"| {r['op']} | {r['mode']} | {r['dtype']} | {r['contender']} | {r['median_ms']:.3f} | {rate} | "
                    f"{share} | " + " | ".join(f"{v:.2f}x" if v else "–" for v in vs) + f" | {verdict} |"
                )
            lines.append("")
        train = [r for r in data.get("train_step", []) if "step_s" in r]
        if train:
            lines += [
                f"Training step ({train[0]['layers']} SOLAR layers, seq {train[0]['seq']}, batch {train[0]['batch']}):",
                "",
                "| contender | ms/step | tokens/s | TFLOP/s | MFU | peak memory |",
                "|---|---|---|---|---|---|",
            ]
            for r in train:
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "–"
                memory = f"{r['peak_mem_gb']:.1f} GB" if r.get("peak_mem_gb") is not None else "–"
                lines.append(
                    f"| {r['contender']} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} | {r['tflops']:.0f} | "
                    f"{mfu} | {memory} |"
                )
            lines.append("")
    return "\n".join(lines).rstrip()


def update_readme(readme: Path, results_dir: Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{section(results_dir)}\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="folder with ops.json / train_step.json of one run")
    parser.add_argument("--into", default="benchmarks/results", help="where <date>-<card>.{json,csv} go")
    parser.add_argument("--readme", help="README to regenerate the performance section of")
    args = parser.parse_args(argv)
    if args.run_dir:
        print(f"wrote {collect(Path(args.run_dir), Path(args.into))}")
    if args.readme:
        update_readme(Path(args.readme), Path(args.into))
    return 0


if __name__ == "__main__":
    sys.exit(main())
