"""Training configuration: nested dataclasses, a YAML/JSON file, and ``--section.key=value`` overrides.

    config = load_config("training/configs/tiny_pretrain.yaml", ["--optim.lr=3e-4", "--train.steps=50"])

Every field has a comment saying what it does and why its default. An unknown section or key, or
a value of the wrong type, is a ``ValueError`` naming it and listing what exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from solar_kernels.fields import at_least, below_minimum


@dataclass
class ModelSection:
    # Hugging Face checkpoint directory to start from (what `solar upscale` writes, say).
    checkpoint: str | None = None
    # Or a solar_kernels preset ("tiny", "solar-10.7b", ...) initialized at random (pretraining from scratch).
    preset: str | None = None
    # Tokenizer directory; None: the checkpoint's own (SPEC: tokenized with the checkpoint's tokenizer).
    tokenizer: str | None = None
    # Kernel backend for the model's ops (None: solar_kernels decides per device).
    backend: str | None = None
    # Parameter dtype: bfloat16 on GPUs (FSDP2 reduces gradients in float32); float32 on the CPU.
    dtype: str = "bfloat16"


@dataclass
class DataSection:
    # Local json/jsonl/parquet/text files (or a folder), or a Hugging Face hub dataset name.
    train: str | list[str] = ""
    # Pretraining only: stream the dataset (large hub sets): rows are tokenized and packed on the fly,
    # in stream order (no shuffle), never held in memory; resume re-reads and skips what was consumed.
    streaming: bool = False
    # Field with the raw text (pretraining).
    text_field: str = "text"
    # Tokens per row: packed rows for pretraining and packed SFT, the length limit otherwise.
    seq_len: int = at_least(1, 2048)
    # SFT: pack several examples into one row (positions restart per example; no cross-example attention).
    packing: bool = False
    # SFT packing: "greedy" (in order, a new row when the next example does not fit; the behaviour
    # before this key existed), "bfd" (best-fit decreasing, TRL's default: fewer rows, never splits an
    # example) or "wrapped" (concatenate and cut: full rows, examples split at row ends).
    packing_strategy: str = "greedy"
    # SFT: train on the answers only (TRL's completion_only_loss=True, its default for prompt/completion
    # data), or false: on every token, prompts included.
    completion_only: bool = True
    # SFT/DPO prompt format: "solar" (### User: / ### Assistant:, docs/method.md#prompt-format) or "chat_template".
    prompt_format: str = "solar"
    # DPO: tokens of prompt kept when prompt + response exceed seq_len (the prompt's end is kept).
    max_prompt_length: int = 512
    # Use only the first N examples (None: all); for smoke runs and the demo.
    max_examples: int | None = None
    # Held-out split for train.eval_every (docs/training.md), one of: files in the format of data.train
    # (for sDPO one preference set evaluated in every stage), or a share of data.train's records set
    # aside before tokenization (by a permutation seeded with eval_seed, not train.seed, so the split
    # stays put when the training seed changes); held-out records are never trained on.
    eval_path: str | list[str] = ""
    eval_fraction: float = 0.0
    eval_seed: int = 0


@dataclass
class OptimSection:
    # Peak learning rate (AdamW). SOLAR's DPO used 5e-7 (Zephyr recipe); pretraining uses far larger.
    lr: float = 1e-5
    # AdamW betas, epsilon and decoupled weight decay.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Learning-rate shape after warmup: "cosine", "linear" or "constant".
    schedule: str = "cosine"
    # Warmup as a share of the steps (docs/method.md#training-recipe: 0.1 for DPO), or absolute steps when warmup_steps > 0.
    warmup_ratio: float = 0.0
    warmup_steps: int = at_least(0, 0)
    # Floor of the decay, as a share of lr.
    min_lr_ratio: float = 0.1
    # Global gradient-norm clip (0 disables).
    grad_clip: float = 1.0
    # Where the optimizer's weights live when model.dtype (the compute dtype) is bfloat16 (docs/training.md):
    # "fp32" keeps fp32 parameters and Adam states and computes in model.dtype (autocast on one process,
    # FSDP2's param_dtype on several), so no update is lost to bf16 rounding; "bf16_kahan" keeps bf16
    # parameters with a Kahan-compensated AdamW (2 bytes/parameter less, the same updates).
    master_weights: str = "fp32"
    # Update each parameter as soon as its gradient is complete in backward and free that gradient
    # (torchtune's optimizer_in_bwd): the step never holds every gradient at once, which saves one
    # parameter-sized buffer (4 bytes/parameter with fp32 masters). Needs grad_clip 0 and grad_accum 1
    # (both need every gradient before any update) and one process; the grad_norm metric is kept.
    step_in_backward: bool = False


@dataclass
class TrainSection:
    # Optimizer steps to run (per stage for sDPO).
    steps: int = at_least(1, 100)
    # Rows per process per micro-batch; the global batch is batch_size * grad_accum * processes.
    batch_size: int = at_least(1, 8)
    grad_accum: int = at_least(1, 1)
    seed: int = 0
    # Where metrics.jsonl, checkpoints/, the loss plot and the exported model go.
    output_dir: str = "runs/default"
    # Log every N steps (every step goes to metrics.jsonl regardless).
    log_every: int = at_least(1, 1)
    # Checkpoint every N steps (0: only the final export); keep the last K checkpoints.
    save_every: int = at_least(0, 0)
    keep_last: int = at_least(0, 2)
    # Continue from the newest complete checkpoint in output_dir/checkpoints.
    resume: bool = False
    # Replace a previous run in output_dir instead of refusing; see resume.
    overwrite: bool = False
    # Recompute activations in backward (memory for compute): "none", "full" (keep only each block's
    # input), "selective" (keep matmul and attention outputs, recompute the cheap ops); true is "full".
    activation_checkpointing: bool | str = "none"
    # Checkpoint every k-th block only (1: every block); the others keep all their activations.
    ac_every: int = 1
    # torch.compile each block.
    compile: bool = False
    # "auto": cuda:LOCAL_RANK when there is a GPU, else cpu.
    device: str = "auto"
    # Export the final model in Hugging Face format to output_dir/final.
    export: bool = True
    # The exported weights' dtype: "auto" is the dtype the optimizer kept them in (fp32 masters export
    # fp32, as transformers' Trainer saves an fp32 model trained with bf16=True; bf16_kahan exports
    # bfloat16), or bfloat16 / float16 / float32.
    export_dtype: str = "auto"
    # Evaluate on the held-out split (data.eval_path or data.eval_fraction) every N steps and after the
    # last one (0: never), over eval_steps batches of batch_size rows per process (0: the whole split);
    # logged as eval/<name> in the same metrics.jsonl record as the step's training metrics.
    eval_every: int = at_least(0, 0)
    eval_steps: int = at_least(0, 0)


@dataclass
class DPOSection:
    # DPO temperature beta, loss type and label smoothing (docs/method.md; TRL 1.x's names and meanings:
    # "sigmoid" is plain DPO, conservative DPO with label_smoothing is "cdpo").
    beta: float = 0.1
    # One loss type, or several combined with loss_weights (RPO: [sigmoid, sft] with [1, alpha]).
    loss_type: str | list[str] = "sigmoid"
    label_smoothing: float = 0.0
    # Weights of the loss types (None: 1 each), and discopop's temperature (TRL's default).
    loss_weights: list[float] | None = None
    discopop_tau: float = 0.05
    # sDPO: preference data per stage, trained in order; each stage starts from and is referenced
    # against the model at the end of the previous one. Empty: one stage on data.train.
    stages: list[str | list[str]] = field(default_factory=list)
    # Order the stages easy to hard by the initial model's preference accuracy on each.
    order_by_accuracy: bool = False


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    dpo: DPOSection = field(default_factory=DPOSection)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked (and converted where unambiguous) against a field's type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[-1] if errors else f"{where}: unsupported value {value!r}")
    if origin in (list, list):
        items = value if isinstance(value, (list, tuple)) else None
        if items is None:
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(items)] if args else list(items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def _apply(config: Config, section: str, key: str, value: Any) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ValueError(f"config: unknown section {section!r}; sections: {', '.join(sections)}")
    target = getattr(config, section)
    hints = typing.get_type_hints(type(target))
    if key not in hints:
        raise ValueError(f"config: unknown key {section}.{key}; {section} has: {', '.join(hints)}")
    setattr(target, key, _coerce(value, hints[key], f"config: {section}.{key}"))


def _parse_override(text: str):
    import yaml

    if not text.startswith("--") or "=" not in text:
        raise ValueError(f"config override must look like --section.key=value, got {text!r}")
    path, raw = text[2:].split("=", 1)
    if path.count(".") != 1:
        raise ValueError(f"config override must name section.key, got {path!r}")
    section, key = path.split(".")
    if raw == "":
        return section, key, ""
    try:
        return section, key, yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ValueError(
            f"config override --{path}: {raw!r} is not a valid YAML value ({_yaml_problem(error)})"
        ) from error


def _yaml_problem(error: Exception) -> str:
    """A YAML error in one line: what the parser found (without its multi-line excerpt of the text)."""
    return " ".join(str(getattr(error, "problem", None) or error).split())


def read_yaml_or_json(path: Path, caller: str = "config") -> Any:
    """The parsed contents of a JSON file (by its suffix) or a YAML one; a one-line ``ValueError``
    starting with ``caller`` and naming the file, and where in it, for unreadable, non-UTF-8 or
    malformed text."""
    import yaml

    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{caller}: cannot read {path} ({error.strerror})") from error
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{caller}: {path} is not UTF-8 text: byte 0x{raw[error.start]:02x} at byte offset {error.start} "
            f"(line {line}); save the file as UTF-8"
        ) from error
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{caller}: {path} line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})"
            ) from error
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        raise ValueError(f"{caller}: {path}{where} not valid YAML ({_yaml_problem(error)})") from error


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """A Config from a YAML/JSON file (sections of keys), then ``--section.key=value`` overrides."""
    config = Config()
    if path is not None:
        path = Path(path)
        data = read_yaml_or_json(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"config: {path} must hold a mapping of sections")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ValueError(f"config: section {section!r} in {path} must be a mapping, got {values!r}")
            for key, value in values.items():
                _apply(config, section, key, value)
    for text in overrides:
        _apply(config, *_parse_override(text))
    validate(config)
    return config


# data.prompt_format: SOLAR's "### User:" format (docs/method.md#prompt-format) or the tokenizer's own chat template.
PROMPT_FORMATS = ("solar", "chat_template")
# data.packing_strategy (training/data/packing.py: pack_examples).
PACKING_STRATEGIES = ("greedy", "bfd", "wrapped")
# Fields that are shares, in [0, 1].
_FRACTIONS = (("optim", "warmup_ratio"), ("optim", "min_lr_ratio"))
# "name" or "org/name": what the Hugging Face hub accepts as a repository id.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def validate(config: Config) -> None:
    """Every check that needs no data, so a bad setting fails before any model or data is loaded."""
    if (config.model.checkpoint is None) == (config.model.preset is None):
        raise ValueError("config: give exactly one of model.checkpoint and model.preset")
    if config.model.dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"config: model.dtype must be bfloat16, float16 or float32, got {config.model.dtype!r}")
    if config.optim.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"config: optim.schedule must be cosine, linear or constant, got {config.optim.schedule!r}")
    if config.data.prompt_format not in PROMPT_FORMATS:
        raise ValueError(
            f"config: data.prompt_format must be {' or '.join(PROMPT_FORMATS)}, got {config.data.prompt_format!r}"
        )
    if config.data.packing_strategy not in PACKING_STRATEGIES:
        raise ValueError(
            f"config: data.packing_strategy must be {', '.join(PACKING_STRATEGIES)}, "
            f"got {config.data.packing_strategy!r}"
        )
    from solar_kernels.ops.dpo_loss import LOSS_TYPES, check_loss_options

    loss_types = [config.dpo.loss_type] if isinstance(config.dpo.loss_type, str) else config.dpo.loss_type
    for loss_type in loss_types:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"config: dpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    try:
        check_loss_options(
            config.dpo.beta,
            config.dpo.loss_type,
            config.dpo.label_smoothing,
            config.dpo.loss_weights,
            config.dpo.discopop_tau,
        )
    except ValueError as error:
        raise ValueError(f"config: dpo: {error}") from None
    for section in dataclasses.fields(config):  # the integer bounds declared with at_least
        bad = below_minimum(getattr(config, section.name))
        if bad is not None:
            key, minimum, value = bad
            raise ValueError(f"config: {section.name}.{key} must be >= {minimum}, got {value}")
    for section, key in _FRACTIONS:
        value = getattr(getattr(config, section), key)
        if not 0 <= value <= 1:  # NaN fails too
            raise ValueError(f"config: {section}.{key} must be in [0, 1], got {value}")
    if not config.optim.lr > 0:
        raise ValueError(f"config: optim.lr must be > 0, got {config.optim.lr}")
    if not config.optim.grad_clip >= 0:
        raise ValueError(f"config: optim.grad_clip must be >= 0 (0 disables clipping), got {config.optim.grad_clip}")
    _check_device(config.train.device)
    # model.checkpoint is read by solar_kernels' own loader, which reads local directories only; a
    # tokenizer may also be a hub name ("org/name"), which transformers fetches or finds in its cache.
    if config.model.checkpoint is not None:
        _check_directory("model.checkpoint", config.model.checkpoint, hub_name_allowed=False)
    if config.model.tokenizer is not None:
        _check_directory("model.tokenizer", config.model.tokenizer, hub_name_allowed=True)
    if config.train.export:
        _check_export_target(config)
    _validate_training(config)


def _check_device(device: str) -> None:
    expected = "auto, cpu, cuda or cuda:N"
    if device in ("auto", "cpu"):
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"config: train.device must be {expected}, got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise ValueError(
            f"config: train.device={device!r} but no CUDA GPU is available (torch.cuda.is_available() is False); "
            f"use auto or cpu"
        )
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ValueError(
            f"config: train.device={device!r} but this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
        )


def _check_directory(key: str, path: str, *, hub_name_allowed: bool) -> None:
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise ValueError(f"config: {key}: {path} is a file, expected a directory")
    if hub_name_allowed and _HUB_NAME.fullmatch(path) and ".." not in path:
        return
    raise ValueError(f"config: {key}: no such directory {path}")


def _check_export_target(config: Config) -> None:
    """The export replaces output_dir/final: refuse one that is, holds or lies inside an input folder."""
    from solar_kernels.checkpoint import path_relation  # symlinks and ".." resolved

    final = Path(config.train.output_dir, "final")
    for key in ("checkpoint", "tokenizer"):
        source = getattr(config.model, key)
        if source is None or not os.path.isdir(source):
            continue
        relation = path_relation(final, source)
        if relation is not None:
            raise ValueError(
                f"config: train.output_dir/final ({final.resolve()}) {relation} model.{key} ({Path(source).resolve()}), "
                f"so the export would overwrite the input model; choose another train.output_dir or set "
                f"train.export=false"
            )


MASTER_WEIGHTS = ("fp32", "bf16_kahan")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
EXPORT_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _validate_training(config: Config) -> None:
    """The trainer's own settings: master weights, activation checkpointing, resume/overwrite."""
    train, optim = config.train, config.optim
    if optim.master_weights not in MASTER_WEIGHTS:
        raise ValueError(
            f"config: optim.master_weights must be {' or '.join(MASTER_WEIGHTS)}, got {optim.master_weights!r}"
        )
    if optim.master_weights == "bf16_kahan" and config.model.dtype != "bfloat16":
        raise ValueError(
            f"config: optim.master_weights=bf16_kahan keeps bfloat16 parameters, so it needs "
            f"model.dtype=bfloat16, got {config.model.dtype!r}"
        )
    if optim.step_in_backward and (optim.grad_clip > 0 or train.grad_accum > 1):
        raise ValueError(
            f"config: optim.step_in_backward updates each parameter before the others' gradients "
            f"exist, so it needs optim.grad_clip=0 and train.grad_accum=1, got grad_clip="
            f"{optim.grad_clip} and grad_accum={train.grad_accum}"
        )
    if train.export_dtype not in EXPORT_DTYPES:
        raise ValueError(f"config: train.export_dtype must be {', '.join(EXPORT_DTYPES)}, got {train.export_dtype!r}")
    if isinstance(train.activation_checkpointing, bool):  # the older true/false spelling
        train.activation_checkpointing = "full" if train.activation_checkpointing else "none"
    if train.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"config: train.activation_checkpointing must be {', '.join(ACTIVATION_CHECKPOINTING)} "
            f"(or true/false), got {train.activation_checkpointing!r}"
        )
    if train.ac_every < 1:
        raise ValueError(f"config: train.ac_every must be >= 1, got {train.ac_every}")
    _validate_eval(config)
    if train.resume and train.overwrite:
        raise ValueError(
            "config: train.resume and train.overwrite exclude each other (continue the run in "
            "output_dir, or replace it); got both true"
        )


def _validate_eval(config: Config) -> None:
    """The held-out split and the eval schedule agree: one split source, and a split when evaluating."""
    data, train = config.data, config.train
    if not 0 <= data.eval_fraction < 1:  # NaN fails too
        raise ValueError(f"config: data.eval_fraction must be in [0, 1) (0: no split), got {data.eval_fraction}")
    if data.eval_path and data.eval_fraction > 0:
        raise ValueError(
            f"config: give one of data.eval_path and data.eval_fraction, got both "
            f"({data.eval_path!r} and {data.eval_fraction})"
        )
    if data.eval_fraction > 0 and data.streaming:
        raise ValueError(
            "config: data.eval_fraction cannot split a streamed dataset (data.streaming=true); "
            "give the held-out rows as data.eval_path"
        )
    if train.eval_every > 0 and not data.eval_path and data.eval_fraction == 0:
        raise ValueError(
            f"config: train.eval_every={train.eval_every} needs a held-out split; set data.eval_path "
            f"or data.eval_fraction"
        )
