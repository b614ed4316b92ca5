"""What every benchmark shares: the environment record, timing, the ceilings, and result files.

Method (docs/benchmarking.md#method): time with CUDA events through ``triton.testing.do_bench`` after
warm-up, report the median with p20/p80; rotate among several input sets when one set would fit
in L2; measure the device-to-device copy bandwidth and the bf16 GEMM rate in the same run, so every
GB/s and TFLOP/s is read against this card's own ceilings. On the CPU (``--cpu``) the same code runs
tiny shapes with a wall clock: that mode checks that the benchmarks work, its numbers mean nothing.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from training.trainer import PEAK_BF16_TFLOPS

logger = logging.getLogger(__name__)

# Achieved rates are read against the dense bf16 peak of the card (the trainer's table, for MFU) and
# against the GEMM rate measured in the same run.


def _commit() -> str:
    """SOLAR_KERNELS_COMMIT (gpu_check.sh sets it where the copied tree has no .git), else git's
    short hash (+ "-dirty"), else "unknown": the GPU image may have no git at all."""
    given = os.environ.get("SOLAR_KERNELS_COMMIT")
    if given:
        return given
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        return "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def environment(device: torch.device) -> dict[str, object]:
    import triton

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    return {
        "date": datetime.date.today().isoformat(),
        "card": card,
        "commit": _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }


def card_slug(card: str) -> str:
    """A file-name-safe short card name: "NVIDIA H100 80GB HBM3" -> "h100"."""
    for name in ("H200", "H100", "A100", "L40S", "B200"):
        if name in card:
            return name.lower()
    return "".join(c for c in card.lower() if c.isalnum())[:16] or "device"


def peak_bf16_tflops(card: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object], device: torch.device, *, cpu_reps: int = 3, graph: bool = False
) -> dict[str, object]:
    """Median, p20 and p80 of ``fn``'s time in milliseconds, and ``timing``: how it was measured.

    ``graph=True`` (the memory-bound ops: 60-130 us kernels behind ~50 us of custom-op dispatch and
    ~270 us of autograd on a slow host CPU) replays ``fn`` from a CUDA graph
    (``triton.testing.do_bench_cudagraph``), so launch gaps are not counted; when ``fn`` cannot be
    captured it falls back to CUDA events around single calls and says so in ``timing``.
    """
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        if graph:
            try:
                median, p20, p80 = do_bench_cudagraph(fn, rep=100, quantiles=[0.5, 0.2, 0.8])
                return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "timing": "cudagraph"}
            except Exception as error:  # not capturable (a host sync, say): time it with events instead
                logger.warning("CUDA graph capture failed, timing with events: %s", error)
                torch.cuda.synchronize(device)
                method = f"events (cudagraph failed: {type(error).__name__})"
        else:
            method = "events"
        median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "timing": method}
    fn()  # warm-up (first call compiles or traces)
    samples = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "p20_ms": samples[0],
        "p80_ms": samples[-1],
        "timing": "wall clock",
    }


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Device memory ``fn`` allocates above what is allocated before it (outputs included)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 20
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)


def rotation(bytes_per_set: int, device: torch.device, limit: int = 8) -> int:
    """Input sets to cycle through so that one pass over them is at least twice the L2 cache."""
    return max(1, min(limit, math.ceil(2 * l2_bytes(device) / max(bytes_per_set, 1))))


def ceilings(device: torch.device) -> dict[str, float]:
    """Device-to-device copy GB/s (read + write) and bf16 GEMM TFLOP/s, measured now."""
    if device.type == "cuda":
        src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        copy = time_ms(lambda: dst.copy_(src), device)["median_ms"]
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        gemm = time_ms(lambda: a @ b, device)["median_ms"]
        del src, dst, a, b
        return {"copy_gbps": 2 * (1 << 30) / copy / 1e6, "gemm_tflops": 2 * n**3 / gemm / 1e9}
    src = torch.randn(1 << 22)
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src), device)["median_ms"]
    a = torch.randn(256, 256)
    gemm = time_ms(lambda: a @ a, device)["median_ms"]
    return {"copy_gbps": 2 * src.numel() * 4 / copy / 1e6, "gemm_tflops": 2 * 256**3 / gemm / 1e9}


def write_csv(path: Path, rows: list[dict[str, object]], env: dict[str, object]) -> Path:
    """One CSV line per row, the environment's columns first and repeated in every line; the row
    columns are every key of any row, in first-seen order (a row without one leaves it empty)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*env, *columns])
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **row})
    return path


def write_rows(
    rows: list[dict[str, object]], env: dict[str, object], extra: dict[str, object], out_dir: Path, stem: str
) -> list[Path]:
    """``<stem>.csv`` (one row per measurement, environment in every row) and ``<stem>.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    write_csv(csv_path, rows, env)
    json_path.write_text(json.dumps({"environment": env, **extra, "rows": rows}, indent=2, default=str) + "\n")
    return [csv_path, json_path]


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    table = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) if table else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in table]
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m benchmarks.common --out DIR [--cpu]``: the environment and this card's ceilings,
    measured now, to ``DIR/environment.json`` (the first step of benchmarks/gpu_check.sh)."""
    import argparse

    parser = argparse.ArgumentParser(description="environment and ceilings of this machine")
    parser.add_argument("--out", required=True, help="folder for environment.json")
    parser.add_argument("--cpu", action="store_true", help="the CPU (checks the step, no real numbers)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the CPU check")
    device = torch.device("cpu" if args.cpu else "cuda")
    env = environment(device)
    ceiling = ceilings(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(json.dumps({"environment": env, "ceilings": ceiling}, indent=2) + "\n")
    print(
        f"{env['card']}: copy {ceiling['copy_gbps']:.0f} GB/s, bf16 GEMM {ceiling['gemm_tflops']:.1f} TFLOP/s; "
        f"torch {env['torch']}, triton {env['triton']}, cuda {env['cuda']}, commit {env['commit']}"
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
