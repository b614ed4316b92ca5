"""The shared trainer: one loop for every stage, on one process or many (torchrun).

Per optimizer step: ``grad_accum`` micro-batches per process; the loss is the objective's sum over
its items (tokens for language modeling, pairs for DPO) divided by the global item count of the
step, so 1 process with batch 2b and 2 processes with batch b compute the same loss and gradients.
Then gradient clipping, AdamW (fused on GPUs), and a warmup + cosine/linear schedule.

Precision (docs/training.md): ``model.dtype`` is the compute dtype. With ``optim.master_weights:
fp32`` (the default) the parameters, gradients and Adam states are fp32: one process computes
under ``torch.autocast(dtype=model.dtype)``, several get FSDP2's ``MixedPrecisionPolicy(param_dtype=
model.dtype, reduce_dtype=float32)``, so no update is lost to bf16 rounding. ``bf16_kahan`` keeps
bf16 parameters and a Kahan-compensated AdamW (``training/optim.py``). Checkpoints hold the
optimizer's weights; the Hugging Face export is written in ``model.dtype``.

Parallelism is applied from outside the model (``parallelize``): activation checkpointing ("full",
or "selective": matmul and attention outputs kept, the rest recomputed; every ``ac_every``-th
block), ``torch.compile`` per block, and with more than one process FSDP2 (``fully_shard`` per
block, then the objective as root, so the LM head is unsharded inside the loss).

A step never waits for the device: item counts, losses and metrics stay tensors (all-reduced as
tensors) and are read back once per ``train.log_every`` steps (and before every checkpoint), when
every step of the window goes to ``metrics.jsonl``, the log and the progress bar, with the window's
average time per step; loss, lr, grad norm, tokens/s, TFLOP/s, MFU (FLOPs/token = 6 N + 12 L d T,
docs/method.md#byte-and-flop-counts) and peak memory. A NaN or infinite loss found there stops training with an error naming
its step and the last good checkpoint; nothing is saved after it (a checkpoint is written only
after the steps before it were read back and found finite).

Checkpoints (torch.distributed.checkpoint for model and optimizer; JSON for the scheduler, the data
position and the Python/NumPy RNGs; tensors loaded with ``weights_only=True`` for the torch RNGs;
nothing is unpickled) are written into a temporary directory and renamed into place when complete,
keeping the newest ``keep_last``. ``resume`` continues from the newest usable one exactly, falling
back to an older one when a file is corrupt. A run is never written over another one silently: an
``output_dir`` that holds a run needs ``resume`` or ``overwrite``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pickle
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from solar_kernels.checkpoint import parse_dtype

from .config import Config
from .plots import plot_losses

logger = logging.getLogger(__name__)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, per device (docs/benchmarking.md#the-validation-gpus)
# What a run writes into its output_dir (sDPO: also into stage1/, stage2/, ...).
RUN_MARKERS = ("metrics.jsonl", "checkpoints", "final")
RUN_FILES = RUN_MARKERS + ("loss.png",)


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, a checkpoint of another shape...)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: a KeyboardInterrupt that knows the step and the newest checkpoint."""

    def __init__(self, name: str, step: int, checkpoint: Path | None):
        super().__init__(f"{name} interrupted at step {step}")
        self.name, self.step, self.checkpoint = name, step, checkpoint


class CheckpointUnusable(Exception):
    """A checkpoint folder that cannot be resumed from (a corrupt, truncated or foreign file)."""


# ----------------------------------------------------------------------------- processes


def setup_distributed(device_setting: str = "auto"):
    """(rank, world_size, device); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_setting == "auto" else device_setting.startswith("cuda")
    if device_setting.startswith("cuda:") and world > 1:
        raise ValueError(
            f"train.device={device_setting} names one GPU, but {world} processes were started; "
            f"expected cuda or auto (each process takes cuda:LOCAL_RANK)"
        )
    if use_cuda:  # one process: the GPU named (cuda:N), else cuda:LOCAL_RANK
        index = int(device_setting.split(":")[1]) if device_setting.startswith("cuda:") else local_rank
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
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


# ----------------------------------------------------------------------------- output directory


def previous_run(directory: Path) -> list[Path]:
    """What an earlier run left in ``directory`` (and its sDPO ``stage*/`` folders); empty if none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [directory / name for name in RUN_FILES if (directory / name).exists()]
    for stage in sorted(directory.glob("stage*")):
        if stage.is_dir() and previous_run(stage):
            found.append(stage)
    return found if any(p.name in RUN_MARKERS or p.name.startswith("stage") for p in found) else []


def prepare_output_dir(directory: Path, *, resume: bool, overwrite: bool, rank: int) -> None:
    """Refuse an output_dir that holds a run unless ``resume`` (continue it) or ``overwrite``
    (delete that run's files: metrics.jsonl, loss.png, checkpoints/, final/, stage*/; nothing else)."""
    found = previous_run(directory)
    if not found or resume:
        return
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
    if not overwrite:
        raise ValueError(
            f"train.output_dir {directory} already holds a run ({names}); continue it with "
            f"--train.resume=true, replace it with --train.overwrite=true, or choose another output_dir"
        )
    if rank == 0:
        for path in found:
            _remove(path)
        logger.warning("train.overwrite: deleted the previous run in %s (%s)", directory, names)
    barrier()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------- precision


def parameter_dtype(config: Config) -> torch.dtype:
    """The dtype the optimizer's parameters are stored in: fp32 masters unless bf16_kahan."""
    return torch.float32 if config.optim.master_weights == "fp32" else parse_dtype(config.model.dtype)


def compute_context(
    config: Config, world: int, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """The context a forward runs in: autocast to model.dtype over fp32 parameters on one process
    (several processes cast through FSDP2's policy instead); nothing when they already agree."""
    compute = parse_dtype(config.model.dtype)
    if world > 1 or compute == parameter_dtype(config):
        return contextlib.nullcontext
    # With activation checkpointing autocast's weight cache is off: it would hold a compute-dtype copy
    # of every weight until the forward ends (2 bytes/parameter), which checkpointing is there to avoid;
    # the recomputation in backward casts again either way.
    checkpointing = config.train.activation_checkpointing not in ("none", False)
    return functools.partial(torch.autocast, device_type=device.type, dtype=compute, cache_enabled=not checkpointing)


@functools.cache
def libc_function(name: str):
    """The C library's function ``name`` through ctypes, or None where there is none (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


def release_freed_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim(0)``). A CPU step frees
    small blocks between ones that stay (the first step makes Adam's state of the small parameters),
    and those pages otherwise stay resident: 0.08 GB at 198 M parameters. False where there is none."""
    trim = libc_function("malloc_trim")
    return trim is not None and trim(0) in (0, 1)


def make_optimizer(config: Config, params, device: torch.device) -> torch.optim.Optimizer:
    optim = config.optim
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    if optim.master_weights == "bf16_kahan":
        from .optim import KahanAdamW

        return KahanAdamW(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs, fused=device.type == "cuda")


# ----------------------------------------------------------------------------- parallelism


def _matmul_ops() -> set:
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    return {getattr(aten, name).default for name in names if hasattr(aten, name)}


def _keep_matmul_outputs(ctx, op, *args, **kwargs):
    """Selective activation checkpointing: keep what is expensive to recompute (matmuls, attention),
    recompute the rest (norms, rotary, activations, elementwise), which costs memory bandwidth only."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _keep_matmul_outputs.ops else CheckpointPolicy.PREFER_RECOMPUTE


_keep_matmul_outputs.ops = _matmul_ops()


def checkpoint_block(block: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``block`` with activation checkpointing: "full" or "selective"."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "full":
        return checkpoint_wrapper(block)
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        return checkpoint_wrapper(
            block, context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_matmul_outputs)
        )
    raise ValueError(f"activation checkpointing must be full or selective, got {mode!r}")


def parallelize(
    objective: torch.nn.Module, blocks, config: Config, world: int, device: torch.device
) -> torch.nn.Module:
    """Activation checkpointing, torch.compile and FSDP2, applied per block from outside the model."""
    mode = config.train.activation_checkpointing
    for index, block in enumerate(blocks):
        if mode not in ("none", False) and index % config.train.ac_every == 0:
            block = checkpoint_block(block, "full" if mode is True else mode)
        if config.train.compile:
            block.compile()
        blocks[index] = block
    if world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # fp32 masters are sharded; each block is gathered in the compute dtype; gradients reduce in fp32.
        policy = MixedPrecisionPolicy(param_dtype=parse_dtype(config.model.dtype), reduce_dtype=torch.float32)
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

# Besides torch.distributed.checkpoint's own classes and torch dtypes: none of these runs code.
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Reads torch.distributed.checkpoint's ``.metadata`` (a pickle) admitting only the classes that
    file is made of, so a crafted one cannot run code."""

    def find_class(self, module: str, name: str):
        allowed = (
            module.startswith("torch.distributed.checkpoint.")
            or (module, name) in _METADATA_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            real_load = pickle.load
            try:  # FileSystemReader.read_metadata calls pickle.load; only this call is restricted
                pickle.load = lambda file, **kw: _MetadataUnpickler(file).load()
                return super().read_metadata(*args, **kwargs)
            finally:
                pickle.load = real_load

    return SafeReader(str(path))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class Checkpointer:
    """``directory/step-00000123`` checkpoints, each complete or absent (written under a temporary name)."""

    def __init__(self, directory: Path, keep_last: int, rank: int):
        self.directory, self.keep_last, self.rank = Path(directory), keep_last, rank

    def complete(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("step-"))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self, step: int, model, optimizer, scheduler, stream, num_tokens: int = 0) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.directory / f"step-{step:08d}"
        partial = self.directory / f".step-{step:08d}.partial"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in [*self.directory.glob(".step-*.partial"), *self.directory.glob(".step-*.stale")]:
                _remove(leftover)  # from a crash during an earlier save
        barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
        plain, tensors = _rank_state(stream)
        (partial / f"rank{self.rank}.json").write_text(json.dumps(plain))
        torch.save(tensors, partial / f"rank{self.rank}.tensors.pt")
        if self.rank == 0:
            (partial / "trainer.json").write_text(
                json.dumps({"step": step, "scheduler": scheduler.state_dict(), "num_tokens": num_tokens})
            )
        barrier()
        if self.rank == 0:
            if final.exists():  # an earlier run's, or one that resume found unusable: set aside, then dropped
                stale = self.directory / f".step-{step:08d}.stale"
                os.replace(final, stale)
                os.replace(partial, final)
                _remove(stale)
            else:
                os.replace(partial, final)
            for old in self.complete()[: -self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def _read_small_files(self, path: Path) -> tuple[dict, dict, dict]:
        """trainer.json, this rank's JSON state and its tensors (``weights_only=True``)."""
        trainer_file, plain_file = path / "trainer.json", path / f"rank{self.rank}.json"
        tensor_file = path / f"rank{self.rank}.tensors.pt"
        texts = {}
        for file in (trainer_file, plain_file):
            try:
                texts[file] = json.loads(file.read_text())
            except (OSError, ValueError) as error:
                raise CheckpointUnusable(f"{file}: {_first_line(error)}") from None
        try:
            tensors = torch.load(tensor_file, weights_only=True, map_location="cpu")
        except Exception as error:  # noqa: BLE001 - any reason: the file is not a plain tensor file
            raise CheckpointUnusable(
                f"{tensor_file} does not load as plain tensors (weights_only=True): {_first_line(error)}"
            ) from None
        trainer_state, plain = texts[trainer_file], texts[plain_file]
        problems = [
            (trainer_file, key)
            for key in ("step", "scheduler")
            if not isinstance(trainer_state, dict) or key not in trainer_state
        ]
        problems += [
            (plain_file, key)
            for key in ("stream", "python_rng", "numpy_rng")
            if not isinstance(plain, dict) or key not in plain
        ]
        problems += [
            (tensor_file, key)
            for key in ("torch_rng", "numpy_keys")
            if not isinstance(tensors, dict) or key not in tensors
        ]
        if problems:
            file, key = problems[0]
            raise CheckpointUnusable(f"{file} has no {key!r} (written by another version of the trainer?)")
        return trainer_state, plain, tensors

    def load(self, path: Path, model, optimizer, scheduler, stream) -> int:
        """Load ``path`` into the training state; ``CheckpointUnusable`` (on every rank alike) if a file
        of it is corrupt, truncated, foreign, or does not fit this model."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        try:
            small, problem = self._read_small_files(path), None
        except CheckpointUnusable as error:
            small, problem = None, str(error)
        device = next(iter(model.parameters())).device  # NCCL reduces device tensors only
        failed = all_reduce_sum(torch.tensor([0.0 if problem is None else 1.0], device=device))
        if problem is not None or float(failed) > 0:  # every rank falls back together
            raise CheckpointUnusable(problem or f"{path}: another rank's files are unusable (see its log)")
        trainer_state, plain, tensors = small
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        try:
            dcp.load(state, storage_reader=_safe_reader(path))
        except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
            detail = [line for line in str(error).splitlines() if line.strip()][-1].strip()
            hint = (
                " (a checkpoint of another model shape?)"
                if "size" in detail.lower() or "mismatch" in detail.lower()
                else ""
            )
            raise CheckpointUnusable(f"{path}: it does not fit this model{hint}: {detail}") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        stream.load_state_dict(plain["stream"])
        _set_rng_state(plain, tensors)
        return trainer_state["step"]


def _rank_state(stream) -> tuple[dict, dict]:
    """This process's data position and RNG states as (JSON-able values, plain tensors)."""
    import numpy

    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = numpy.random.get_state()
    plain = {
        "stream": stream.state_dict(),
        "python_rng": [version, list(internal), gauss],
        "numpy_rng": {
            "name": name,
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    tensors = {"torch_rng": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(numpy.int64))}
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def _set_rng_state(plain: dict, tensors: dict) -> None:
    import numpy

    version, internal, gauss = plain["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    state = plain["numpy_rng"]
    numpy.random.set_state(
        (
            state["name"],
            tensors["numpy_keys"].numpy().astype(numpy.uint32),
            state["position"],
            state["has_gauss"],
            state["cached_gaussian"],
        )
    )
    torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])


def seed_everything(seed: int) -> None:
    import numpy

    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------- the loop


@dataclass
class _StepResult:
    """One finished step, still on the device: ``_Totals.vector`` and the grad norm."""

    step: int
    lr: float
    sums: torch.Tensor
    tokens: int
    seq_len: int


class Trainer:
    """Runs ``config.train.steps`` optimizer steps of ``objective`` over ``stream``.

    ``objective(**batch)`` returns ``(loss_sum, metrics)``: the loss summed over the batch's items
    and a dict of summed metric tensors; ``count(batch)`` the number of items (labeled tokens,
    preference pairs), a tensor or an int. ``flops_per_token(seq_len)`` gives the model's training
    FLOPs per token. ``evaluation()`` gives a fresh iterator of held-out batches (None: no eval);
    they are evaluated every ``train.eval_every`` steps and after the last step.
    """

    def __init__(
        self,
        config: Config,
        objective: torch.nn.Module,
        count: Callable[[dict], object],
        stream,
        *,
        rank: int,
        world: int,
        device: torch.device,
        flops_per_token: Callable[[int], float],
        output_dir: Path | None = None,
        name: str = "train",
        evaluation: Callable[[], object] | None = None,
    ):
        self.config, self.objective, self.count, self.stream = config, objective, count, stream
        self.rank, self.world, self.device = rank, world, device
        self.flops_per_token = flops_per_token
        self.output_dir = Path(output_dir or config.train.output_dir)
        self.name = name
        self.evaluation = evaluation
        self.num_tokens = 0  # real input tokens trained on so far, every process (TRL's num_tokens)
        self.params = [p for p in objective.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(config, self.params, device)
        self._grad_norms: list[torch.Tensor] | None = None  # step_in_backward's, while run() runs
        if config.optim.step_in_backward and world > 1:
            raise ValueError(
                f"config: optim.step_in_backward runs on one process (FSDP2 reduces gradients after "
                f"backward), got {world} processes"
            )
        self.autocast = compute_context(config, world, device)
        optim = config.optim
        steps = config.train.steps
        warmup = optim.warmup_steps or int(optim.warmup_ratio * steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, steps, warmup, optim.schedule, optim.min_lr_ratio)
        )
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", config.train.keep_last, rank)
        self.history: list[dict[str, float]] = []
        self.metric_names: list[str] | None = None
        self._pending: list[_StepResult] = []
        self._window_started = time.perf_counter()
        self._bar = None
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        self.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card), None)

    def _step_in_backward(self) -> list:
        """``optim.step_in_backward``: each parameter is updated by the optimizer as soon as backward
        has accumulated its gradient, which is then freed, so no step holds every gradient at once.
        When a hook runs, the parameters before it have had their gradients freed and the ones after
        it have none yet, so ``optimizer.step()`` updates this parameter alone (one optimizer: the
        checkpoint and the schedule are the same as without it). The hooks' handles, removed when
        the run ends (the next sDPO stage's trainer registers its own)."""
        self._grad_norms = []

        def step(param: torch.Tensor) -> None:
            self._grad_norms.append(torch.linalg.vector_norm(param.grad.detach()))
            self.optimizer.step()
            param.grad = None

        return [param.register_post_accumulate_grad_hook(step) for param in self.params]

    def _log(self, record: dict[str, float]) -> None:
        self.history.append(record)
        if self.rank != 0:
            return
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        elif record["step"] % self.config.train.log_every == 0 or record["step"] == self.config.train.steps:
            extras = " ".join(f"{k}={v:.4g}" for k, v in record.items() if "/" in k)
            mfu = f" mfu={record['mfu']:.1%}" if record.get("mfu") is not None else ""
            memory = f" mem={record['peak_mem_gb']:.1f}GB" if record.get("peak_mem_gb") is not None else ""
            logger.info(
                "%s step %d/%d loss=%.4f lr=%.3g grad_norm=%.3g tokens/s=%.0f tflops=%.3g%s%s %s",
                self.name,
                record["step"],
                self.config.train.steps,
                record["loss"],
                record["lr"],
                record["grad_norm"],
                record["tokens_per_s"],
                record["tflops"],
                mfu,
                memory,
                extras,
            )

    def _resume(self) -> int:
        """Load the newest usable checkpoint (falling back past unusable ones); the step it ends."""
        candidates = self.checkpointer.complete()[::-1]
        problems = []
        for path in candidates:
            try:
                step = self.checkpointer.load(path, self.objective, self.optimizer, self.scheduler, self.stream)
            except CheckpointUnusable as error:
                problems.append(str(error))
                logger.warning(
                    "%s: checkpoint %s is unusable (%s); falling back to the one before it", self.name, path.name, error
                )
                continue
            logger.info("%s: resumed from %s at step %d", self.name, path, step)
            self.num_tokens = json.loads((path / "trainer.json").read_text()).get("num_tokens", 0)
            return step
        if candidates:
            raise TrainingError(
                f"cannot resume from any checkpoint in {self.checkpointer.directory}: " + "; ".join(problems)
            )
        logger.info("%s: no checkpoint in %s; starting at step 0", self.name, self.checkpointer.directory)
        return 0

    def _truncate_metrics(self, start_step: int) -> None:
        """Keep the metrics of the steps up to the resumed checkpoint; a half-written last line (the
        process died while writing it) is dropped with a warning, a broken line elsewhere is an error."""
        path = self.output_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                step = record["step"]
            except (ValueError, TypeError, KeyError):
                if number == len(lines):
                    logger.warning("%s: dropped the half-written last line of %s", self.name, path)
                    break
                raise TrainingError(
                    f"cannot resume: {path} line {number} is not a metrics record "
                    f"({line[:60]!r}); fix or delete that line"
                ) from None
            if step <= start_step:
                kept.append(line + "\n")
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, path)

    def run(self) -> list[dict[str, float]]:
        config = self.config
        if not config.train.resume and (found := previous_run(self.output_dir)):
            raise TrainingError(
                f"{self.name}: {self.output_dir} already holds a run ({', '.join(p.name for p in found)}); "
                f"set train.resume or train.overwrite"
            )
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        start_step = self._resume() if config.train.resume else 0
        if config.train.resume and self.rank == 0:
            self._truncate_metrics(start_step)
        if self.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=config.train.steps, initial=start_step, desc=self.name, unit="step")
        batches = iter(self.stream)
        self._start_window()
        step = start_step
        hooks = self._step_in_backward() if config.optim.step_in_backward else []
        try:
            for step in range(start_step + 1, config.train.steps + 1):
                self._train_step(step, batches)
                last = step == config.train.steps
                saving = bool(config.train.save_every) and step % config.train.save_every == 0 and not last
                evaluating = (
                    self.evaluation is not None
                    and bool(config.train.eval_every)
                    and (step % config.train.eval_every == 0 or last)
                )
                evaluated = {step: self.evaluate()} if evaluating else None
                if step % config.train.log_every == 0 or last or saving or evaluating:
                    self._flush(evaluated)
                if saving:
                    self.checkpointer.save(
                        step, self.objective, self.optimizer, self.scheduler, self.stream, self.num_tokens
                    )
        except KeyboardInterrupt:
            self._flush()  # the steps that finished are kept in metrics.jsonl
            raise TrainingInterrupted(self.name, step, self.checkpointer.latest()) from None
        finally:
            for hook in hooks:
                hook.remove()
            self._grad_norms = None
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        if self.rank == 0:
            plot_losses(self.output_dir / "metrics.jsonl", self.output_dir / "loss.png", self.name)
        return self.history

    def _train_step(self, step: int, batches) -> None:
        """One optimizer step; nothing here waits for the device (the results stay tensors)."""
        config = self.config
        micro = [
            {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            for _ in range(config.train.grad_accum)
        ]
        counts = [torch.as_tensor(self.count(batch), dtype=torch.float32, device=self.device) for batch in micro]
        items = all_reduce_sum(torch.stack(counts).sum())
        scale = self.world / items.clamp(min=1.0)
        totals = _Totals(self.device)
        for batch, batch_items in zip(micro, counts):
            with self.autocast():
                batch_loss, metrics = self.objective(**_model_inputs(batch))
            (batch_loss * scale).backward()
            totals.add(batch, batch_items, batch_loss, metrics)
        if self.metric_names is None:
            self.metric_names = list(totals.metrics)
        lr = self.scheduler.get_last_lr()[0]
        if self._grad_norms is not None:  # step_in_backward: every parameter was updated in backward
            grad_norm = (
                torch.linalg.vector_norm(torch.stack(self._grad_norms))
                if self._grad_norms
                else torch.zeros((), device=self.device)
            )
            self._grad_norms.clear()
        else:
            clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        sums = all_reduce_sum(totals.vector(self.metric_names))
        self.scheduler.step()
        self._pending.append(
            _StepResult(
                step,
                lr,
                torch.cat([sums, grad_norm.detach().double().reshape(1)]),
                sum(batch["input_ids"].numel() for batch in micro),
                micro[0]["input_ids"].shape[-1],
            )
        )
        if self._bar is not None:
            self._bar.update(1)
        if self.device.type == "cpu":
            release_freed_heap()

    def evaluate(self) -> dict[str, float]:
        """``eval/<name>`` of the held-out batches, in eval mode without gradients, reduced over every
        process (each evaluates its slice of every batch); reads the values back (one synchronization)."""
        totals = _Totals(self.device)
        training = self.objective.training
        self.objective.eval()
        try:
            with torch.no_grad():
                for batch in self.evaluation():
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                    batch_items = torch.as_tensor(self.count(batch), dtype=torch.float32, device=self.device)
                    with self.autocast():
                        batch_loss, metrics = self.objective(**_model_inputs(batch))
                    totals.add(batch, batch_items, batch_loss, metrics)
        finally:
            self.objective.train(training)
        names = list(totals.metrics)
        values = all_reduce_sum(totals.vector(names)).tolist()  # waits for the device
        means = _Totals.means(values, names)
        record = {
            f"eval/{key}": value for key, value in means.items() if key not in ("num_tokens", "packing_efficiency")
        }
        logger.info("%s eval: %s", self.name, " ".join(f"{k}={v:.4g}" for k, v in record.items()))
        return record

    def _start_window(self) -> None:
        self._window_started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _flush(self, evaluated: dict[int, dict[str, float]] | None = None) -> None:
        """Read the pending steps back from the device (one synchronization), log them (with the eval
        metrics of the steps in ``evaluated``), and stop on a NaN or infinite loss."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.stack([p.sums for p in pending]).tolist()  # waits for the device
        seconds = (time.perf_counter() - self._window_started) / len(pending)
        peak = torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else None
        self._start_window()
        for result, (*sums, grad_norm) in zip(pending, values):
            means = _Totals.means(sums, self.metric_names)
            loss = means.pop("loss")
            if not math.isfinite(loss):
                raise TrainingError(
                    f"{self.name}: loss is {loss} at step {result.step}; stopped without saving. "
                    f"Last good checkpoint: {self.checkpointer.latest() or 'none'}"
                )
            self.num_tokens += int(means.pop("num_tokens"))
            tokens_per_s = result.tokens * self.world / seconds
            tflops = self.flops_per_token(result.seq_len) * tokens_per_s / 1e12
            record = {
                "step": result.step,
                "loss": loss,
                "lr": result.lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "tflops": tflops,
                "mfu": tflops / self.world / self.peak_tflops if self.peak_tflops else None,
                "peak_mem_gb": peak,
                "seconds": seconds,
                "num_tokens": self.num_tokens,
                **means,
                **(evaluated or {}).get(result.step, {}),
            }
            self._log(record)


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without ``attention_mask``: rows are right-padded and causal, so the objective needs
    no mask; the trainer counts the real tokens with it (``num_tokens``)."""
    return {k: v for k, v in batch.items() if k != "attention_mask"}


class _Totals:
    """Sums of one step's (or one evaluation's) micro-batches, kept on the device.

    An objective's metric is a tensor summed over its items (divided by the item count when read)
    or a ``(sum, count)`` pair with its own count (per-token metrics of a pair objective). Besides the
    loss and metrics, the real (non-padding) input tokens: ``attention_mask``'s ones, or every token
    when the batch has no mask. Accumulated in float64, so counts stay exact.
    """

    def __init__(self, device: torch.device):
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.items, self.loss, self.tokens, self.slots = zero, zero, zero, zero
        self.metrics: dict[str, list[torch.Tensor]] = {}

    def add(self, batch: dict[str, torch.Tensor], items: torch.Tensor, loss: torch.Tensor, metrics: dict) -> None:
        mask, slots = batch.get("attention_mask"), batch["input_ids"].numel()
        tokens = mask.sum().double() if mask is not None else slots
        self.items = self.items + items.double()
        self.loss = self.loss + loss.detach().double()
        self.tokens, self.slots = self.tokens + tokens, self.slots + slots
        for key, value in metrics.items():
            total, count = value if isinstance(value, tuple) else (value, items)
            previous = self.metrics.get(key, [0, 0])
            self.metrics[key] = [previous[0] + total.detach().double(), previous[1] + torch.as_tensor(count).double()]

    def vector(self, names: list[str]) -> torch.Tensor:
        """[items, loss, tokens, token slots, sum and count of each of ``names``] (float64, on the device)."""
        pairs = [part for name in names for part in self.metrics[name]]
        return torch.stack(
            [
                self.items,
                self.loss,
                self.tokens,
                self.slots,
                *(torch.as_tensor(p, dtype=torch.float64, device=self.items.device) for p in pairs),
            ]
        )

    @staticmethod
    def means(values: list[float], names: list[str]) -> dict[str, float]:
        """{"loss", "num_tokens", "packing_efficiency", each name}: the loss per item, the real tokens,
        their share of the token slots, each metric per its count (0 when its count is 0, as TRL logs
        an empty batch)."""
        items, loss, tokens, slots, *pairs = values
        out = {"loss": loss / max(items, 1.0), "num_tokens": tokens, "packing_efficiency": tokens / max(slots, 1.0)}
        for index, name in enumerate(names):
            total, count = pairs[2 * index], pairs[2 * index + 1]
            out[name] = total / count if count > 0 else 0.0
        return out
