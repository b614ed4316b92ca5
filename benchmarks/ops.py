"""Op benchmarks: every op of the public API, forward, backward and both, for every contender.

    python -m benchmarks.ops                 # on the GPU: SOLAR shapes at 4K/16K/32K tokens, bf16
    python -m benchmarks.ops --dtype bf16 --dtype fp16 --dtype fp32 --ops rms_norm swiglu
    python -m benchmarks.ops --cpu           # tiny shapes on the CPU: checks the suite runs (CI)

Contenders: ``torch`` (the op's ``*_ref``, eager), ``torch_compile`` (the same reference under
``torch.compile``; on a GPU at 16K tokens only, since compiling costs 10-30 s per op and shape), our ``triton`` and ``cuda`` backends, Liger-Kernel and flash-attn's Triton
RMSNorm when they are installed, and for the log-prob ops ``matmul``: the GEMMs alone.
Per row: median ms with p20/p80, achieved GB/s (memory-bound ops, minimum bytes; see cases.py) or
TFLOP/s (log-prob ops), the ratio to the copy bandwidth or GEMM rate measured in the same run,
peak extra memory of forward+backward, and the speedup over every other contender. Writes
``ops.csv``/``ops.json`` and PNG charts into ``--out``, and prints a short table last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import torch

from benchmarks.cases import Case, build_cases
from benchmarks.common import ceilings, environment, format_table, peak_extra_bytes, rotation, time_ms, write_rows
from solar_kernels.checkpoint import SHORT_DTYPE_NAMES, parse_dtype
from training.plots import figure as _figure
from training.plots import save as _save

logger = logging.getLogger(__name__)
MODES = ("fwd", "bwd", "fwd+bwd")


def _outputs(result) -> list[torch.Tensor]:
    items = result if isinstance(result, (tuple, list)) else (result,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


def _timed_fn(case: Case, contender: str, mode: str, input_sets: list[dict[str, torch.Tensor]]):
    """A no-argument function that runs one ``mode`` of ``contender``, cycling over input sets."""
    fn = case.contenders[contender]
    if contender == "matmul":
        sets = itertools.cycle(input_sets)
        return lambda: fn(next(sets), mode)
    leaves = [[i[n] for n in case.grad_inputs] for i in input_sets]
    if mode == "fwd":
        sets = itertools.cycle(input_sets)
        return lambda: fn(next(sets))
    if mode == "fwd+bwd":
        pairs = itertools.cycle(zip(input_sets, leaves))

        def forward_backward():
            inputs, wrt = next(pairs)
            outs = _outputs(fn(inputs))
            return torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs])

        return forward_backward
    # bwd: forward once per input set outside the timed region; backward repeats on the kept graph
    graphs = []
    for inputs, wrt in zip(input_sets, leaves):
        outs = _outputs(fn(inputs))
        graphs.append((outs, wrt, [torch.randn_like(o) for o in outs]))
    cycle = itertools.cycle(graphs)

    def backward():
        outs, wrt, grads = next(cycle)
        return torch.autograd.grad(outs, wrt, grads, retain_graph=True)

    return backward


def run_case(case: Case, device: torch.device, ceiling: dict[str, float]) -> list[dict[str, object]]:
    per_set = sum(case.bytes.values()) // 3 if case.bytes else 0
    input_sets = [case.make_inputs() for _ in range(rotation(per_set, device) if per_set else 1)]
    rows = []
    for contender in case.contenders:
        for mode in MODES:
            row = {
                "op": case.op,
                "mode": mode,
                "dtype": str(case.dtype).replace("torch.", ""),
                "shape": case.label,
                "tokens": case.shape.get("tokens"),
                "width": case.shape.get("d", case.shape.get("intermediate")),
                "contender": contender,
            }
            try:
                # memory-bound cases replay a CUDA graph: their kernels are shorter than the dispatch
                timing = time_ms(_timed_fn(case, contender, mode, input_sets), device, graph=bool(case.bytes))
            except Exception as error:  # a contender that cannot run this case is reported, not fatal
                logger.warning("%s %s %s %s failed: %s", case.op, case.label, contender, mode, error)
                rows.append({**row, "error": f"{type(error).__name__}: {error}"[:200]})
                continue
            row.update(timing)
            if case.bytes:
                row["gbps"] = case.bytes[mode] / timing["median_ms"] / 1e6
                row["of_copy"] = row["gbps"] / ceiling["copy_gbps"]
            if case.flops:
                row["tflops"] = case.flops[mode] / timing["median_ms"] / 1e9
                row["of_gemm"] = row["tflops"] / ceiling["gemm_tflops"]
            if mode == "fwd+bwd":
                extra = peak_extra_bytes(_timed_fn(case, contender, mode, input_sets[:1]), device)
                row["peak_extra_mb"] = extra / 1e6 if extra is not None else None
            rows.append(row)
    return rows


def add_speedups(rows: list[dict[str, object]]) -> None:
    """speedup_vs_<other> = other's median time / this row's, within one op, shape, dtype and mode."""
    groups: dict[tuple, list[dict[str, object]]] = {}
    for row in rows:
        if "median_ms" in row:
            groups.setdefault((row["op"], row["shape"], row["dtype"], row["mode"]), []).append(row)
    for group in groups.values():
        for row in group:
            for other in group:
                if other is not row:
                    row[f"speedup_vs_{other['contender']}"] = other["median_ms"] / row["median_ms"]


def charts(rows: list[dict[str, object]], out_dir: Path) -> list[Path]:
    # Charts are a view of the CSV: without matplotlib (fetch_wheels.sh brings it) the numbers remain.
    written = []
    sweep = [r for r in rows if r["op"] == "rms_norm_sweep" and "gbps" in r]
    for dtype in sorted({r["dtype"] for r in sweep}):
        fig = _figure(figsize=(11, 4))
        if fig is None:
            return written
        axes = fig.subplots(1, 2)
        for ax, mode in zip(axes, ("fwd", "bwd")):
            for contender in sorted({r["contender"] for r in sweep}):
                points = sorted(
                    (r["width"], r["gbps"])
                    for r in sweep
                    if r["dtype"] == dtype and r["mode"] == mode and r["contender"] == contender
                )
                if points:
                    ax.plot(*zip(*points), marker="o", label=contender)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("width d")
            ax.set_ylabel("GB/s (minimum bytes)")
            ax.set_title(f"rms_norm {mode}, {dtype}")
            ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"rms_norm_sweep_{dtype}.png", dpi=110))
    main_rows = [r for r in rows if r["op"] != "rms_norm_sweep" and r["mode"] == "fwd+bwd" and "median_ms" in r]
    if main_rows:
        tokens = max(r["tokens"] for r in main_rows)
        ours = [r for r in main_rows if r["tokens"] == tokens and r["contender"] in ("triton", "cuda")]
        baselines = sorted({k[len("speedup_vs_") :] for r in ours for k in r if k.startswith("speedup_vs_")})
        labels = [f"{r['op']}\n{r['contender']} {r['dtype']}" for r in ours]
        fig = _figure(figsize=(max(6, 1.2 * len(ours)), 4))
        if fig is None:
            return written
        ax = fig.subplots()
        width = 0.8 / max(1, len(baselines))
        for k, base in enumerate(baselines):
            ax.bar(
                [i + k * width for i in range(len(ours))],
                [r.get(f"speedup_vs_{base}", 0) for r in ours],
                width,
                label=f"vs {base}",
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + width * (len(baselines) - 1) / 2 for i in range(len(ours))], labels, fontsize=7)
        ax.set_ylabel("speedup, forward+backward")
        ax.set_title(f"{tokens} tokens")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out_dir / "speedups.png", dpi=110))
    return written


# Ceilings measured on the validation machines (docs/benchmarking.md#the-validation-gpus), for the
# floors in --counts.
VALIDATION_CEILINGS = {"H100": (3.0e12, 798e12), "H200": (4.3e12, 790e12)}


def counts_table() -> str:
    """Markdown: minimum bytes or FLOPs per SOLAR-shaped bf16 case and mode, and the floor time
    they imply on the H100 and H200 at the copy bandwidth / GEMM rate measured there
    (docs/benchmarking.md#the-validation-gpus)."""
    lines = ["| op | tokens | mode | minimum | H100 floor | H200 floor |", "|---|---|---|---|---|---|"]
    for case in build_cases(torch.device("cpu"), [torch.bfloat16], cpu=False, sweep=False):
        for mode in MODES:
            if case.bytes:
                amount, index = case.bytes[mode], 0
                shown = f"{amount / 1e6:.0f} MB"
            else:
                amount, index = case.flops[mode], 1
                shown = f"{amount / 1e12:.2f} TFLOP"
            floors = [f"{amount / VALIDATION_CEILINGS[card][index] * 1e3:.3f} ms" for card in ("H100", "H200")]
            lines.append(f"| {case.op} | {case.shape['tokens']} | {mode} | {shown} | {floors[0]} | {floors[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (checks the suite, no real numbers)")
    parser.add_argument(
        "--dtype",
        action="append",
        choices=list(SHORT_DTYPE_NAMES.values()),
        help="repeatable; default bf16 (fp32 on --cpu)",
    )
    parser.add_argument("--ops", nargs="+", help="subset of ops (default all)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the RMSNorm width sweep")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default 16384 32768 4096)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no new case after this many seconds (results so far are kept)",
    )
    parser.add_argument(
        "--contenders",
        nargs="+",
        help="subset of contenders (default all that run here; the log-prob ops keep their matmul floor)",
    )
    parser.add_argument(
        "--ceilings-from",
        help="environment.json of `python -m benchmarks.common` from this run: "
        "reuse its ceilings instead of measuring them again",
    )
    parser.add_argument("--stem", default="ops", help="result file names: <stem>.csv, <stem>.json")
    parser.add_argument("--out", default="benchmarks/results/local", help="output folder")
    parser.add_argument(
        "--counts",
        action="store_true",
        help="print the minimum bytes / FLOPs of every SOLAR-shaped case and the floors they imply, then exit",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.counts:
        print(counts_table())
        return 0
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the CPU check")
    device = torch.device("cpu" if args.cpu else "cuda")
    dtypes = [parse_dtype(d) for d in (args.dtype or (["fp32"] if args.cpu else ["bf16"]))]
    env = environment(device)
    ceiling = json.loads(Path(args.ceilings_from).read_text())["ceilings"] if args.ceilings_from else ceilings(device)
    print(
        f"{env['card']}: copy {ceiling['copy_gbps']:.0f} GB/s, bf16 GEMM {ceiling['gemm_tflops']:.1f} TFLOP/s "
        f"(measured now)",
        flush=True,
    )
    rows: list[dict[str, object]] = []
    out = Path(args.out)
    start = time.perf_counter()
    cases = build_cases(device, dtypes, cpu=args.cpu, ops=args.ops, sweep=not args.no_sweep, tokens=args.tokens)
    if args.contenders:
        for case in cases:
            case.contenders = {k: v for k, v in case.contenders.items() if k in args.contenders or k == "matmul"}
        cases = [c for c in cases if set(c.contenders) - {"matmul"}]
        if not cases:
            logger.warning("none of the contenders %s runs here: nothing to time", args.contenders)
    for number, case in enumerate(cases):
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(f"time budget of {args.budget_s:.0f} s spent: {len(cases) - number} cases not run", flush=True)
            break
        print(f"{case.op} {case.label} {case.dtype}", flush=True)
        rows += run_case(case, device, ceiling)
        add_speedups(rows)
        write_rows(rows, env, {"ceilings": ceiling}, out, args.stem)  # after every case: a cut-short run keeps its rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    files = write_rows(rows, env, {"ceilings": ceiling}, out, args.stem) + (charts(rows, out) if rows else [])
    shown = [
        r
        for r in rows
        if r["op"] != "rms_norm_sweep"
        and "median_ms" in r
        and r["tokens"] == max(r2["tokens"] for r2 in rows if r2["op"] != "rms_norm_sweep")
    ]
    for r in shown:
        r["rate"] = f"{r['gbps']:.0f} GB/s" if "gbps" in r else f"{r['tflops']:.1f} TF/s"
        r["of_ceiling"] = r.get("of_copy", r.get("of_gemm"))
    print(
        format_table(
            shown,
            [
                "op",
                "mode",
                "dtype",
                "tokens",
                "contender",
                "median_ms",
                "rate",
                "of_ceiling",
                "peak_extra_mb",
                "speedup_vs_torch",
            ],
        )
    )
    print("wrote " + ", ".join(str(f) for f in files))
    failed = [r for r in rows if "error" in r and r["contender"] in ("triton", "cuda")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
