"""The shared trainer: one loop for every stage, on one process or many (torchrun).

Per optimizer step: ``grad_accum`` micro-batches per process; the loss is the objective's sum over
its items (tokens for language modeling, pairs for DPO) divided by the global item count of the
step, so 1 process with batch 2b and 2 processes with batch b compute the same loss and gradients.
Then gradient clipping, AdamW (fused on GPUs), and a warmup + cosine/linear schedule.

Parallelism is applied from outside the model (``parallelize``): activation checkpointing and
``torch.compile`` per block, and with more than one process FSDP2 (``fully_shard`` per block, then
the objective as root, so the LM head is unsharded inside the loss; bf16 parameters with fp32
gradient reduction on GPUs).

Every step logs loss, lr, grad norm, tokens/s, TFLOP/s, MFU (FLOPs/token = 6 N + 12 L d T, SPEC §7),
peak memory and the objective's metrics: to ``metrics.jsonl``, to the log, and to a progress bar at
a terminal; ``loss.png`` is drawn at the end. Checkpoints (torch.distributed.checkpoint: model,
optimizer, scheduler, data position, RNG) are written into a temporary directory and renamed into
place when complete, keeping the newest ``keep_last``; ``resume`` continues from the newest one
exactly. A NaN or infinite loss stops training with an error naming the step and the last good
checkpoint; nothing is saved after it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from .config import Config

logger = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, per device (SPEC §7)


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, a checkpoint of another shape...)."""


# ----------------------------------------------------------------------------- processes

def setup_distributed(device_setting: str = "auto"):
    """(rank, world_size, device); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_setting == "auto" else device_setting.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device(device_setting if device_setting not in ("auto", "cuda") else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def parallelize(objective: torch.nn.Module, blocks, config: Config, world: int, device: torch.device) -> torch.nn.Module:
    """Activation checkpointing, torch.compile and FSDP2, applied per block from outside the model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(blocks):
        if config.train.activation_checkpointing:
            block = checkpoint_wrapper(block)
        if config.train.compile:
            block.compile()
        blocks[index] = block
    if world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=DTYPES[config.model.dtype], reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(objective, mp_policy=policy)
    return objective


# ----------------------------------------------------------------------------- schedule

def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then constant, linear or cosine decay to min_ratio."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- checkpoints

class Checkpointer:
    """``directory/step-00000123`` checkpoints, each complete or absent (written under a temporary name)."""

    def __init__(self, directory: Path, keep_last: int, rank: int):
        self.directory, self.keep_last, self.rank = Path(directory), keep_last, rank

    def complete(self) -> List[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("step-"))

    def latest(self) -> Optional[Path]:
        found = self.complete()
        return found[-1] if found else None

    def save(self, step: int, model, optimizer, scheduler, stream) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.directory / f"step-{step:08d}"
        partial = self.directory / f".step-{step:08d}.partial"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(".step-*.partial"):  # from a crash during an earlier save
                shutil.rmtree(leftover, ignore_errors=True)
        barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
        torch.save({"stream": stream.state_dict(), "rng": _rng_state()}, partial / f"rank{self.rank}.pt")
        if self.rank == 0:
            (partial / "trainer.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict()}))
        barrier()
        if self.rank == 0:
            os.replace(partial, final)
            for old in self.complete()[:-self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: Path, model, optimizer, scheduler, stream) -> int:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
            detail = [line for line in str(error).splitlines() if line.strip()][-1].strip()
            raise TrainingError(f"cannot resume from {path}: it does not fit this model "
                                f"(a checkpoint of another model shape?): {detail}") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        trainer_state = json.loads((path / "trainer.json").read_text())
        scheduler.load_state_dict(trainer_state["scheduler"])
        local = torch.load(path / f"rank{self.rank}.pt", weights_only=False)
        stream.load_state_dict(local["stream"])
        _set_rng_state(local["rng"])
        return trainer_state["step"]


def _rng_state() -> Dict[str, object]:
    import numpy

    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, object]) -> None:
    import numpy

    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    import numpy

    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------- the loop

class Trainer:
    """Runs ``config.train.steps`` optimizer steps of ``objective`` over ``stream``.

    ``objective(**batch)`` returns ``(loss_sum, metrics)``: the loss summed over the batch's items
    and a dict of summed metric tensors; ``count(batch)`` the number of items (labeled tokens,
    preference pairs). ``flops_per_token(seq_len)`` gives the model's training FLOPs per token.
    """

    def __init__(self, config: Config, objective: torch.nn.Module, count: Callable[[Dict], int], stream,
                 *, rank: int, world: int, device: torch.device, flops_per_token: Callable[[int], float],
                 output_dir: Optional[Path] = None, name: str = "train"):
        self.config, self.objective, self.count, self.stream = config, objective, count, stream
        self.rank, self.world, self.device = rank, world, device
        self.flops_per_token = flops_per_token
        self.output_dir = Path(output_dir or config.train.output_dir)
        self.name = name
        optim = config.optim
        self.optimizer = torch.optim.AdamW(objective.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                           eps=optim.eps, weight_decay=optim.weight_decay,
                                           fused=device.type == "cuda")
        steps = config.train.steps
        warmup = optim.warmup_steps or int(optim.warmup_ratio * steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, steps, warmup, optim.schedule, optim.min_lr_ratio))
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", config.train.keep_last, rank)
        self.history: List[Dict[str, float]] = []
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        self.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card), None)

    def _log(self, record: Dict[str, float], bar) -> None:
        self.history.append(record)
        if self.rank != 0:
            return
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            bar.update(1)
        elif record["step"] % self.config.train.log_every == 0 or record["step"] == self.config.train.steps:
            extras = " ".join(f"{k}={v:.4g}" for k, v in record.items() if "/" in k)
            mfu = f" mfu={record['mfu']:.1%}" if record.get("mfu") is not None else ""
            memory = f" mem={record['peak_mem_gb']:.1f}GB" if record.get("peak_mem_gb") is not None else ""
            logger.info("%s step %d/%d loss=%.4f lr=%.3g grad_norm=%.3g tokens/s=%.0f tflops=%.3g%s%s %s",
                        self.name, record["step"], self.config.train.steps, record["loss"], record["lr"],
                        record["grad_norm"], record["tokens_per_s"], record["tflops"], mfu, memory, extras)

    def run(self) -> List[Dict[str, float]]:
        config = self.config
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        start_step = 0
        if config.train.resume and (latest := self.checkpointer.latest()) is not None:
            start_step = self.checkpointer.load(latest, self.objective, self.optimizer, self.scheduler, self.stream)
            logger.info("%s: resumed from %s at step %d", self.name, latest, start_step)
            if self.rank == 0 and (self.output_dir / "metrics.jsonl").exists():
                kept = [line for line in (self.output_dir / "metrics.jsonl").read_text().splitlines()
                        if json.loads(line)["step"] <= start_step]
                (self.output_dir / "metrics.jsonl").write_text("".join(k + "\n" for k in kept))
        elif self.rank == 0 and (self.output_dir / "metrics.jsonl").exists():
            (self.output_dir / "metrics.jsonl").unlink()
        bar = None
        if self.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=config.train.steps, initial=start_step, desc=self.name, unit="step")
        batches = iter(self.stream)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        for step in range(start_step + 1, config.train.steps + 1):
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            started = time.perf_counter()
            micro = [next(batches) for _ in range(config.train.grad_accum)]
            items = all_reduce_sum(torch.tensor(float(sum(self.count(b) for b in micro)), device=self.device))
            total_items = max(float(items), 1.0)
            loss_sum = torch.zeros((), device=self.device)
            metric_sums: Dict[str, torch.Tensor] = {}
            tokens = 0
            for batch in micro:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                tokens += batch["input_ids"].numel()
                batch_loss, metrics = self.objective(**batch)
                (batch_loss * (self.world / total_items)).backward()
                loss_sum += batch_loss.detach().float()
                for key, value in metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0) + value.detach().float()
            clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            loss = float(all_reduce_sum(loss_sum)) / total_items
            if not math.isfinite(loss):
                latest = self.checkpointer.latest()
                raise TrainingError(f"{self.name}: loss is {loss} at step {step}; stopped without saving. "
                                    f"Last good checkpoint: {latest or 'none'}")
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - started
            seq_len = micro[0]["input_ids"].shape[-1]
            tokens_per_s = tokens * self.world / seconds
            tflops = self.flops_per_token(seq_len) * tokens_per_s / 1e12
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens_per_s": tokens_per_s, "tflops": tflops,
                      "mfu": tflops / self.world / self.peak_tflops if self.peak_tflops else None,
                      "peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else None,
                      "seconds": seconds}
            for key, value in metric_sums.items():
                record[key] = float(all_reduce_sum(value)) / total_items
            self._log(record, bar)
            if config.train.save_every and step % config.train.save_every == 0 and step < config.train.steps:
                self.checkpointer.save(step, self.objective, self.optimizer, self.scheduler, self.stream)
        if bar is not None:
            bar.close()
        if self.rank == 0:
            plot_losses(self.output_dir / "metrics.jsonl", self.output_dir / "loss.png", self.name)
        return self.history


def plot_losses(metrics: Path, png: Path, title: str) -> Optional[Path]:
    """Loss (and lr) against step from a metrics.jsonl, drawn to a PNG; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss plot")
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    lr_axis = ax.twinx()
    lr_axis.plot([r["step"] for r in records], [r["lr"] for r in records], color="gray", alpha=0.5, label="lr")
    lr_axis.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
