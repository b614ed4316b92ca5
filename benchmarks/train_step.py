"""End-to-end training step: forward + backward + AdamW step of a SOLAR-shaped model.

    python -m benchmarks.train_step                   # GPU: d 4096, I 14336, 32/8 heads, vocab 32000, seq 4096, bf16
    python -m benchmarks.train_step --layers 48       # all of SOLAR 10.7B (default: as many layers as fit, up to 48)
    python -m benchmarks.train_step --compile         # torch.compile each block / the HF model
    python -m benchmarks.train_step --cpu             # tiny model on the CPU: checks the script runs (CI)

Contenders: our model with each backend that runs here (loss through ``sk.linear_cross_entropy``
on the final hidden states), transformers' ``LlamaForCausalLM`` of the same shape with SDPA
attention, the same patched with ``sk.patch_hf_model``, and patched with Liger-Kernel when it is
installed (run last: Liger patches transformers' classes globally). Reports the median step time,
tokens/s, achieved TFLOP/s, MFU and peak memory.

FLOP convention (SPEC §7): FLOPs/token = 6 * N (parameters without the input embedding, LM head
included) + 12 * L * d * seq; MFU = achieved / the card's dense bf16 peak (989 TFLOP/s on H100/H200).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import solar_kernels as sk
from benchmarks.common import environment, format_table, peak_bf16_tflops, sync, write_rows
from solar_kernels._backend import unavailable_reason
from solar_kernels.model import CausalLM, ModelConfig, preset

# Training memory per parameter with bf16 weights, bf16 gradients and AdamW's two bf16 states.
_BYTES_PER_PARAM = 8
# Activation memory per layer and token for this shape (x, norms, q/k/v, attention out, gate, up,
# silu, residuals in bf16): about (8 d + 4 I) * 2 bytes; rounded up for workspace.
_ACTIVATION_BYTES_PER_TOKEN_LAYER = lambda c: int(1.25 * (8 * c.hidden_size + 4 * c.intermediate_size) * 2)  # noqa: E731


def flops_per_token(config: ModelConfig, seq: int) -> int:
    n = config.num_parameters() - config.vocab_size * config.hidden_size  # no input embedding
    return 6 * n + 12 * config.num_layers * config.hidden_size * seq


def layers_that_fit(config: ModelConfig, tokens: int, device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    per_layer = config.replace(num_layers=1).num_parameters(include_embeddings=False) * _BYTES_PER_PARAM
    per_layer += tokens * _ACTIVATION_BYTES_PER_TOKEN_LAYER(config)
    fixed = 2 * config.vocab_size * config.hidden_size * _BYTES_PER_PARAM + 6 * (1 << 30)  # + logits, workspace
    return max(1, min(48, int((0.9 * free - fixed) // per_layer)))


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    return F.pad(ids[:, 1:], (0, 1), value=-100)


def ours(config: ModelConfig, backend: str, device, dtype, compile_blocks: bool):
    model = CausalLM.from_config(config.replace(backend=backend), device=device, dtype=dtype)
    if compile_blocks:
        for block in model.model.layers:
            block.compile()

    def loss_fn(ids):
        hidden = model(ids, return_hidden=True)
        return sk.linear_cross_entropy(hidden, model.lm_head.weight, shifted_labels(ids), backend=backend)

    return model, loss_fn


def hf(config: ModelConfig, device, dtype, compile_model: bool, patch: Optional[str]):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config.to_hf_config())
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    if patch == "solar":
        sk.patch_hf_model(model)
    elif patch == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    if compile_model:
        model.compile()

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    return model, loss_fn


def measure(model, loss_fn: Callable, ids: torch.Tensor, device, steps: int, warmup: int) -> Dict[str, float]:
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    del optimizer
    return {"step_s": statistics.median(times), "first_loss": losses[0], "last_loss": losses[-1], "peak_mem_gb": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny model on the CPU (checks the script, no real numbers)")
    parser.add_argument("--layers", default="auto", help="decoder layers, or 'auto': as many as fit (max 48)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 4096; 32 with --cpu)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile per block (ours) / whole model (HF)")
    parser.add_argument("--contenders", nargs="+", help="subset, e.g. ours-triton hf hf+liger")
    parser.add_argument("--out", default="benchmarks/results/local")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the CPU check")
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    seq = args.seq or (32 if args.cpu else 4096)
    base = preset("tiny") if args.cpu else preset("solar-10.7b")
    layers = int(args.layers) if args.layers != "auto" else (2 if args.cpu else layers_that_fit(base, args.batch * seq, device))
    config = base.replace(num_layers=layers, max_position_embeddings=max(seq, base.max_position_embeddings))
    env = environment(device)
    peak = peak_bf16_tflops(env["card"])
    contenders = [f"ours-{b}" for b in ("torch", "triton", "cuda") if unavailable_reason(b, device) is None]
    contenders += ["hf", "hf+solar"]
    if device.type == "cuda":
        try:
            import liger_kernel  # noqa: F401

            contenders.append("hf+liger")
        except ImportError:
            pass
    if args.contenders:
        contenders = [c for c in args.contenders if c in contenders]  # in the order asked: the first matter most
    ids = torch.randint(0, config.vocab_size, (args.batch, seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    per_token = flops_per_token(config, seq)
    print(f"{env['card']}: {layers} layers, d {config.hidden_size}, seq {seq}, batch {args.batch}, "
          f"{config.num_parameters() / 1e9:.2f}B parameters, {per_token / 1e9:.1f} GFLOP/token", flush=True)
    rows: List[Dict[str, object]] = []
    extra = {"flops_per_token": per_token, "peak_bf16_tflops": peak}

    def save() -> List[Path]:
        """The rows so far, speedups included: written after every contender, so a run cut short
        (gpu_check.sh's timeouts) keeps what it measured."""
        timed = [r for r in rows if "step_s" in r]
        for row in timed:
            for other in timed:
                if other is not row:
                    row[f"speedup_vs_{other['contender']}"] = other["step_s"] / row["step_s"]
        return write_rows(rows, env, extra, Path(args.out), "train_step")

    for name in contenders:
        torch.manual_seed(0)
        row = {"contender": name, "layers": layers, "seq": seq, "batch": args.batch, "compile": args.compile}
        try:
            if name.startswith("ours-"):
                model, loss_fn = ours(config, name[len("ours-"):], device, dtype, args.compile)
            else:
                model, loss_fn = hf(config, device, dtype, args.compile, name.partition("+")[2] or None)
            result = measure(model, loss_fn, ids, device, args.steps, args.warmup)
        except Exception as error:  # report a contender that cannot run (out of memory, say) and go on
            row["error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
            save()
            print(f"{name}: {row['error']}", flush=True)
            continue
        finally:
            model = loss_fn = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        tokens_per_s = args.batch * seq / result["step_s"]
        row.update(result, tokens_per_s=tokens_per_s, tflops=per_token * tokens_per_s / 1e12)
        row["mfu"] = row["tflops"] / peak if peak else None
        rows.append(row)
        save()
        print(f"{name}: {result['step_s'] * 1e3:.1f} ms/step, {tokens_per_s:.0f} tokens/s", flush=True)
    files = save()
    print(format_table(rows, ["contender", "layers", "seq", "step_s", "tokens_per_s", "tflops", "mfu", "peak_mem_gb",
                              "speedup_vs_hf", "error"]))
    print("wrote " + ", ".join(str(f) for f in files))
    return 1 if any("error" in r and r["contender"].startswith("ours-") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
