"""End-to-end training step of a SOLAR-shaped model, through the trainer's own step code.

    python -m benchmarks.train_step --batch 4 --seq 4096   # GPU: 16K tokens/step, d 4096, I 14336, 32/8 heads, vocab 32000
    python -m benchmarks.train_step --layers 48            # all of SOLAR 10.7B (default: as many layers as fit, up to 48)
    python -m benchmarks.train_step --ac none selective --packing packed
    python -m benchmarks.train_step --cpu                  # tiny model on the CPU: checks the script runs (CI)

Every case is one (activation checkpointing policy, packed or unpacked rows, contender). A case
runs ``training.trainer.Trainer``'s step (``_train_step``: autocast to bf16 over fp32 master
weights, the backward, gradient clipping, fused AdamW and the LR schedule, no host sync) on an
objective wrapped by ``training.trainer.parallelize`` (the activation checkpointing users get), so
the numbers are those of ``solar pretrain``. Timing is the trainer's own: the steps of a window run
back to back and are read back with one synchronization (``_flush``); ``--repeats`` windows give
the spread. Packed rows hold several documents, ``position_ids`` restarting at 0 per document
(as ``training.data`` packs pretraining rows); unpacked rows are one sequence each.

Contenders, on the same weights: our model with each backend that runs here (loss through
``sk.linear_cross_entropy`` on the final hidden states, ``training.objectives.LanguageModeling``),
transformers' ``LlamaForCausalLM`` with SDPA attention (packed rows masked per document by
transformers from the ``position_ids``), the same patched with ``sk.patch_hf_model``, and patched
with Liger-Kernel when it is installed (run last within a case group: Liger patches transformers'
classes globally). Each row records the attention path that ran (``CausalLM.last_attention_path``;
``hf-sdpa-packed``/``hf-sdpa-causal`` for transformers), tokens/s, TFLOP/s, MFU and peak memory;
the results are written after every case. On a GPU each row of ours carries the target verdicts.

FLOP convention (docs/method.md#byte-and-flop-counts): FLOPs/token = 6 * N (parameters without the input embedding, LM head
included) + 12 * L * d * seq; MFU = achieved / the card's dense bf16 peak (989 TFLOP/s on H100/H200).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import solar_kernels as sk
from benchmarks.common import environment, format_table, peak_bf16_tflops, write_rows
from solar_kernels._backend import unavailable_reason
from solar_kernels.model import CausalLM, ModelConfig, preset
from solar_kernels.model.config import PRESETS
from training.config import Config
from training.objectives import LanguageModeling, flops_per_token_fn
from training.trainer import Trainer, parallelize, parameter_dtype

# Training memory per parameter: fp32 master, fp32 gradient, AdamW's two fp32 states, and the bf16
# copy autocast makes for the forward.
_BYTES_PER_PARAM = 18
# Activation memory per layer and token for this shape without checkpointing (x, norms, q/k/v,
# attention out, gate, up, silu, residuals in bf16): about (8 d + 4 I) * 2 bytes; rounded up.
_ACTIVATION_BYTES_PER_TOKEN_LAYER = lambda c: int(1.25 * (8 * c.hidden_size + 4 * c.intermediate_size) * 2)  # noqa: E731
AC_POLICIES = ("none", "full", "selective")
PACKINGS = ("unpacked", "packed")
# Targets (issue 11), judged on the GPU only.
TARGET_MFU, TARGET_VS_HF, TARGET_VS_LIGER, TARGET_PACKED_LOSS = 0.50, 1.30, 1.15, 0.10


def flops_per_token(config: ModelConfig, seq: int) -> float:
    return flops_per_token_fn(config)(seq)


def layers_that_fit(config: ModelConfig, tokens: int, device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    per_layer = config.replace(num_layers=1).num_parameters(include_embeddings=False) * _BYTES_PER_PARAM
    per_layer += tokens * _ACTIVATION_BYTES_PER_TOKEN_LAYER(config)
    fixed = 2 * config.vocab_size * config.hidden_size * _BYTES_PER_PARAM + 6 * (1 << 30)  # + logits, workspace
    return max(1, min(48, int((0.9 * free - fixed) // per_layer)))


def make_batch(batch: int, seq: int, vocab: int, *, packed: bool, eos: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch in the format of ``training.data``: ``labels[t] = input_ids[t+1]`` (-100 at a row's
    end and after each document's closing eos). Packed rows hold documents of 1/8 to 1/2 of the row
    (the last one cut by the row's end), each ending in eos, ``position_ids`` restarting at 0."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    ids[ids == eos] = (eos + 1) % vocab
    positions = torch.arange(seq).repeat(batch, 1)
    if packed:
        low, high = max(1, seq // 8), max(2, seq // 2)
        for row in range(batch):
            start = 0
            while start < seq:
                end = min(seq, start + int(torch.randint(low, high + 1, (), generator=generator)))
                positions[row, start:end] = torch.arange(end - start)
                if end < seq:
                    ids[row, end - 1] = eos
                start = end
    labels = F.pad(ids[:, 1:], (0, 1), value=-100).masked_fill(ids == eos, -100)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


class HFLanguageModeling(nn.Module):
    """``LanguageModeling`` for a transformers model: the same batch, the loss summed over labeled
    tokens, through the model's own loss (which Liger replaces with its fused one)."""

    def __init__(self, model: nn.Module, *, packed: bool):
        super().__init__()
        self.model, self.packed = model, packed
        self.last_attention_path: str | None = None

    count = staticmethod(LanguageModeling.count)

    def forward(self, input_ids, labels, position_ids=None):
        from transformers.masking_utils import find_packed_sequence_indices

        positions = position_ids if self.packed else None
        masked = positions is not None and find_packed_sequence_indices(positions) is not None
        self.last_attention_path = f"hf-{self.model.config._attn_implementation}-{'packed' if masked else 'causal'}"
        # transformers shifts the labels itself: give it labels[t-1] at t, the same targets. No KV
        # cache: with one, transformers ignores the documents in position_ids (and recomputation under
        # activation checkpointing would append to it a second time).
        loss = self.model(
            input_ids=input_ids,
            position_ids=positions,
            labels=F.pad(labels[:, :-1], (1, 0), value=-100),
            use_cache=False,
        ).loss
        return loss * self.count({"labels": labels}), {}


def build(name: str, config: ModelConfig, train: Config, device: torch.device, packed: bool) -> nn.Module:
    """The objective of contender ``name`` on the weights seeded 0, wrapped as the trainer wraps it."""
    torch.manual_seed(0)
    dtype = parameter_dtype(train)
    if name.startswith("ours-"):
        model = CausalLM.from_config(config.replace(backend=name[len("ours-") :]), device=device, dtype=dtype)
        objective = LanguageModeling(model, packed=packed)
        return parallelize(objective, model.model.layers, train, 1, device)
    from transformers import AutoConfig, AutoModelForCausalLM

    source = CausalLM.from_config(config, device=device, dtype=dtype)  # the same weights as ours
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**config.to_hf_config()), dtype=dtype, attn_implementation="sdpa"
        )
    model.load_state_dict(source.state_dict())
    del source
    patch = name.partition("+")[2]
    if patch == "solar":
        sk.patch_hf_model(model)
    elif patch == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    objective = HFLanguageModeling(model, packed=packed)
    return parallelize(objective, model.model.layers, train, 1, device)


def attention_path(objective: nn.Module) -> str | None:
    inner = getattr(objective, "model", None)
    return getattr(inner, "last_attention_path", None) or getattr(objective, "last_attention_path", None)


def measure(
    objective: nn.Module,
    train: Config,
    batch: dict,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    repeats: int,
    flops: float,
    work_dir: Path,
) -> dict[str, object]:
    """``repeats`` windows of ``steps`` trainer steps after ``warmup`` steps; the trainer's records."""

    def forever():
        while True:
            yield batch

    trainer = Trainer(
        train,
        objective,
        LanguageModeling.count,
        forever(),
        rank=0,
        world=1,
        device=device,
        flops_per_token=lambda seq: flops,
        output_dir=work_dir,
        name="bench",
    )
    batches, step = forever(), 0
    for _ in range(warmup):
        step += 1
        trainer._train_step(step, batches)
    trainer._flush()  # waits for the warm-up; the window (and the peak memory) starts here
    windows = []
    for _ in range(repeats):
        for _ in range(steps):
            step += 1
            trainer._train_step(step, batches)
        trainer._flush()
        windows.append(trainer.history[-1])
    rates = [w["tokens_per_s"] for w in windows]
    best = windows[rates.index(statistics.median_low(rates))]
    return {
        "step_s": best["seconds"],
        "tokens_per_s": best["tokens_per_s"],
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "tflops": best["tflops"],
        "mfu": best["mfu"],
        "peak_mem_gb": max((w["peak_mem_gb"] or 0) for w in windows) or None,
        "first_loss": trainer.history[0]["loss"],
        "last_loss": trainer.history[-1]["loss"],
    }


def verdicts(rows: list[dict[str, object]]) -> None:
    """Target verdicts on every timed row of ours (GPU runs only): MFU, tokens/s against transformers
    eager and + Liger in the same (ac, packing) group, packed against unpacked of the same contender."""
    timed = [r for r in rows if "tokens_per_s" in r]
    for row in timed:
        if not str(row["contender"]).startswith("ours-"):
            continue
        found = {}
        if row.get("mfu") is not None:
            found["mfu"] = f"{'met' if row['mfu'] >= TARGET_MFU else 'missed'}: {row['mfu']:.1%} vs {TARGET_MFU:.0%}"
        for other, target in (("hf", TARGET_VS_HF), ("hf+liger", TARGET_VS_LIGER)):
            ratio = row.get(f"speedup_vs_{other}")
            if ratio is not None:
                found[f"vs_{other}"] = f"{'met' if ratio >= target else 'missed'}: {ratio:.2f}x vs {target:.2f}x"
        if row["packing"] == "packed":
            base = next(
                (
                    r
                    for r in timed
                    if r["contender"] == row["contender"] and r["ac"] == row["ac"] and r["packing"] == "unpacked"
                ),
                None,
            )
            if base is not None:
                loss = 1 - row["tokens_per_s"] / base["tokens_per_s"]
                found["packed"] = (
                    f"{'met' if loss <= TARGET_PACKED_LOSS else 'missed'}: {loss:.1%} slower than "
                    f"unpacked vs {TARGET_PACKED_LOSS:.0%}"
                )
        row["verdicts"] = found


def speedups(rows: list[dict[str, object]]) -> None:
    timed = [r for r in rows if "tokens_per_s" in r]
    for row in timed:
        for other in timed:
            if other is not row and (other["ac"], other["packing"]) == (row["ac"], row["packing"]):
                row[f"speedup_vs_{other['contender']}"] = row["tokens_per_s"] / other["tokens_per_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cpu", action="store_true", help="the CPU (tiny model unless --preset/--layers say otherwise)"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default solar-10.7b; tiny with --cpu)")
    parser.add_argument(
        "--hidden", type=int, help="override the preset's hidden size (intermediate = 2.75x, heads d/64)"
    )
    parser.add_argument("--layers", default="auto", help="decoder layers, or 'auto': as many as fit (max 48)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 4096; 32 with --cpu)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 4: 16K tokens; 2 with --cpu)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="timed windows per case (their spread is recorded)")
    parser.add_argument(
        "--ac", nargs="+", choices=AC_POLICIES, default=list(AC_POLICIES), help="activation checkpointing"
    )
    parser.add_argument("--packing", nargs="+", choices=PACKINGS, default=list(PACKINGS))
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        help="compute dtype over fp32 masters (default bfloat16; float32 with --cpu)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (train.compile)")
    parser.add_argument("--contenders", nargs="+", help="subset, in the order to run, e.g. ours-triton hf hf+liger")
    parser.add_argument("--out", default="benchmarks/results/local")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the CPU check")
    for name in ("seq", "batch", "steps", "repeats", "hidden"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "seq" else 1):
            parser.error(f"--{name} must be at least {2 if name == 'seq' else 1}, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.layers != "auto" and not (args.layers.isdigit() and int(args.layers) >= 1):
        parser.error(f"--layers must be a positive integer or 'auto', got {args.layers!r}")
    device = torch.device("cpu" if args.cpu else "cuda")
    seq = args.seq or (32 if args.cpu else 4096)
    batch_size = args.batch or (2 if args.cpu else 4)
    base = preset(args.preset or ("tiny" if args.cpu else "solar-10.7b"))
    if args.hidden:
        base = base.replace(
            hidden_size=args.hidden,
            intermediate_size=int(2.75 * args.hidden) // 64 * 64 or 64,
            num_heads=max(1, args.hidden // 64),
            num_kv_heads=max(1, args.hidden // 256),
        )
    if args.layers != "auto":
        layers = int(args.layers)
    else:
        layers = 2 if args.cpu else layers_that_fit(base, batch_size * seq, device)
    config = base.replace(num_layers=layers, max_position_embeddings=max(seq, base.max_position_embeddings))
    env = environment(device)
    peak = peak_bf16_tflops(env["card"])
    compute = args.dtype or ("float32" if args.cpu else "bfloat16")
    available = [f"ours-{b}" for b in ("torch", "triton", "cuda") if unavailable_reason(b, device) is None]
    available += ["hf", "hf+solar"]
    try:
        import liger_kernel  # noqa: F401

        available.append("hf+liger")
    except ImportError:
        pass
    contenders = [c for c in args.contenders if c in available] if args.contenders else available
    skipped = [c for c in args.contenders or [] if c not in available]
    per_token = flops_per_token(config, seq)
    print(
        f"{env['card']}: {layers} layers, d {config.hidden_size}, seq {seq}, batch {batch_size}, "
        f"{config.num_parameters() / 1e9:.3f}B parameters, {per_token / 1e9:.2f} GFLOP/token, compute {compute} "
        f"over fp32 masters" + (f"; not available here: {', '.join(skipped)}" if skipped else ""),
        flush=True,
    )
    rows: list[dict[str, object]] = []
    extra = {
        "flops_per_token": per_token,
        "peak_bf16_tflops": peak,
        "compute_dtype": compute,
        "master_dtype": "float32",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
    }

    def save() -> list[Path]:
        """The rows so far: written after every case, so a run cut short keeps what it measured."""
        speedups(rows)
        if device.type == "cuda":
            verdicts(rows)
        return write_rows(rows, env, extra, Path(args.out), "train_step")

    batches = {
        p: make_batch(
            batch_size,
            seq,
            config.vocab_size,
            packed=p == "packed",
            eos=config.eos_token_id if config.eos_token_id is not None else 2,
        )
        for p in args.packing
    }
    for ac in args.ac:
        for packing in args.packing:
            train = Config()
            train.model.dtype = compute
            train.train.activation_checkpointing, train.train.compile = ac, args.compile
            train.train.steps, train.train.batch_size = args.warmup + args.steps * args.repeats, batch_size
            batch = {k: v.to(device) for k, v in batches[packing].items()}
            for name in contenders:
                row = {
                    "contender": name,
                    "ac": ac,
                    "packing": packing,
                    "layers": layers,
                    "seq": seq,
                    "batch": batch_size,
                    "compile": args.compile,
                    "compute_dtype": compute,
                }
                objective = None
                try:
                    objective = build(name, config, train, device, packing == "packed")
                    with tempfile.TemporaryDirectory() as work_dir:
                        result = measure(
                            objective,
                            train,
                            batch,
                            device,
                            steps=args.steps,
                            warmup=args.warmup,
                            repeats=args.repeats,
                            flops=per_token,
                            work_dir=Path(work_dir),
                        )
                    row["attention_path"] = attention_path(objective)
                    row.update(result)
                except Exception as error:  # report a case that cannot run (out of memory, say) and go on
                    row["error"] = f"{type(error).__name__}: {error}"[:300]
                finally:
                    objective = None
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                save()
                print(
                    f"{name} ac={ac} {packing}: "
                    + (
                        row["error"]
                        if "error" in row
                        else f"{row['step_s'] * 1e3:.1f} ms/step, {row['tokens_per_s']:.0f} tokens/s, {row['attention_path']}"
                    ),
                    flush=True,
                )
    files = save()
    print(
        format_table(
            rows,
            [
                "contender",
                "ac",
                "packing",
                "attention_path",
                "step_s",
                "tokens_per_s",
                "tflops",
                "mfu",
                "peak_mem_gb",
                "speedup_vs_hf",
                "error",
            ],
        )
    )
    print("wrote " + ", ".join(str(f) for f in files))
    return 1 if any("error" in r and str(r["contender"]).startswith("ours-") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
