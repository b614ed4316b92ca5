"""Depth up-scaling streams: peak memory stays near one output shard, whatever the model's size.

Writes a synthetic Llama checkpoint of a few GB (random bf16 weights, written shard by shard),
up-scales it with ``solar upscale`` in a child process, and reports the child's peak RSS (VmHWM
of its own address space, read from /proc at its end: getrusage would also count the memory of
the parent it was forked from) next to the sizes read and written and the throughput, and the
peak RSS of a child that only imports the package. Results go to ``benchmarks/results/`` as JSON.

    python -m benchmarks.upscale_stream [--layers 16] [--shard-size 500MB] [--workdir /tmp/dus]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from solar_kernels.checkpoint import ShardWriter, parse_size, write_json
from solar_kernels.model import preset


def synthetic_checkpoint(path: Path, config, shard_size: str) -> int:
    """A checkpoint with the tensor names and shapes of ``config``, random bf16 values."""
    from solar_kernels.model import CausalLM

    path.mkdir(parents=True)
    write_json(path / "config.json", config.to_hf_config())
    writer = ShardWriter(path, shard_size)
    shapes = {n: p.shape for n, p in CausalLM.from_config(config, device="meta").named_parameters()}
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.add(name, torch.randn(shape, generator=generator, dtype=torch.float32).to(torch.bfloat16))
    writer.finish()
    return writer.total_size


_PEAK_RSS = "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')))"


def child_peak_rss(code: str) -> int:
    """Run ``code`` in a fresh Python; return the peak RSS of that process, in bytes."""
    done = subprocess.run([sys.executable, "-c", f"{code}\n{_PEAK_RSS}"], check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--drop", type=int, default=4)
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    config = preset(
        "llama-2-7b", hidden_size=2048, intermediate_size=5632, num_heads=16, num_kv_heads=16, num_layers=args.layers
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dus-bench-"))
    try:
        src, dst = work / "src", work / "dst"
        read_bytes = synthetic_checkpoint(src, config, "1GB")
        command = [
            "upscale",
            str(src),
            str(dst),
            "--drop",
            str(args.drop),
            "--max-shard-size",
            args.shard_size,
            "--no-progress",
        ]
        start = time.perf_counter()
        peak_rss = child_peak_rss(f"from solar_kernels.cli import main\nassert main({command!r}) == 0")
        seconds = time.perf_counter() - start
        written = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
        import_rss = child_peak_rss("import solar_kernels.cli, solar_kernels.upscale, torch")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "upscale_stream",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "layers_in": args.layers,
        "layers_out": 2 * (args.layers - args.drop),
        "gb_read_source": read_bytes / 1e9,
        "gb_written": written / 1e9,
        "seconds": seconds,
        "gb_per_second_written": written / 1e9 / seconds,
        "max_shard_size_mb": parse_size(args.shard_size) / 1e6,
        "peak_rss_mb": peak_rss / 1e6,
        "rss_after_import_mb": import_rss / 1e6,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['date']}-cpu-upscale-stream-{args.layers}l-{args.shard_size}.json").write_text(
        json.dumps(result, indent=2) + "\n"
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
