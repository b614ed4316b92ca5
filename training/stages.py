"""The stages: ``pretrain`` (continued pretraining), ``sft`` (instruction tuning), ``dpo`` (DPO, or
sDPO with ``dpo.stages``), each as ``solar <stage> --config FILE [--section.key=value ...]`` and as
``torchrun --nproc_per_node N -m training.<stage> --config FILE ...``.

A stage: build the model (from a Hugging Face checkpoint, or a preset at random), tokenize the
data with the checkpoint's tokenizer, wrap the model in its objective, parallelize, train, and
export the result in Hugging Face format to ``<output_dir>/final`` (with the tokenizer files).

sDPO (docs/method.md#sdpo): the preference data come as a list of stages; stage t starts from the model at the
end of stage t-1 and uses it as its reference (its log-probs computed once, before the stage's
first step). With ``dpo.order_by_accuracy`` the stages are first ordered easy to hard by the
initial model's preference accuracy on each (the share of pairs whose chosen response has the
higher summed log-prob under it).

With several processes, each process tokenizes the whole dataset and takes its slice of every
global batch; every process builds the full model before it is sharded (fine up to a model that
fits one device; SOLAR 10.7B in bf16 is 21 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from solar_kernels import evaluate
from solar_kernels.model import CausalLM, load_pretrained, preset
from solar_kernels.model.hf import save_pretrained

from . import data as data_lib
from .config import Config, load_config
from .objectives import DirectPreference, LanguageModeling, flops_per_token_fn
from .tokenizer import load_tokenizer
from .trainer import (
    Checkpointer,
    Trainer,
    TrainingError,
    TrainingInterrupted,
    barrier,
    compute_context,
    parallelize,
    parameter_dtype,
    prepare_output_dir,
    seed_everything,
    setup_distributed,
)

logger = logging.getLogger(__name__)
STAGES = ("pretrain", "sft", "dpo")


def build_model(config: Config, device: torch.device, tokenizer) -> CausalLM:
    """From the checkpoint, or the preset at random with the tokenizer's vocabulary and special ids,
    in the optimizer's parameter dtype (fp32 master weights unless optim.master_weights says otherwise)."""
    dtype = parameter_dtype(config)
    if config.model.checkpoint:
        model = load_pretrained(config.model.checkpoint, device=device, dtype=dtype, backend=config.model.backend)
        if model.config.vocab_size < len(tokenizer):
            raise ValueError(
                f"model: the checkpoint's vocabulary ({model.config.vocab_size}) is smaller than the "
                f"tokenizer's ({len(tokenizer)})"
            )
        return model
    model_config = preset(
        config.model.preset,
        backend=config.model.backend,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=max(config.data.seq_len, 512),
    )
    return CausalLM.from_config(model_config, device=device, dtype=dtype)


def tokenizer_path(config: Config) -> str:
    path = config.model.tokenizer or config.model.checkpoint
    if path is None:
        raise ValueError("config: model.tokenizer is required when the model comes from a preset")
    return path


def _records(source, config: Config, *, streaming: bool = False, text_field: str | None = None):
    records = data_lib.load_records(source, streaming=streaming, text_field=text_field)
    if config.data.max_examples is not None and not streaming:
        records = records.select(range(min(config.data.max_examples, len(records))))
    return records


def split_records(source, config: Config, *, held_out: bool, text_field: str | None = None):
    """The records of ``source`` to train on (``held_out=False``) or to evaluate on: with
    ``data.eval_fraction`` its seeded held-out share (the two parts never overlap), else
    ``data.eval_path``'s records; None when there is no held-out split."""
    if held_out and config.data.eval_path:
        return _records(config.data.eval_path, config, text_field=text_field)
    if held_out and not config.data.eval_fraction:
        return None
    records = _records(source, config, text_field=text_field)
    if not config.data.eval_fraction:
        return records
    train, evaluation = data_lib.split_records(records, config.data.eval_fraction, config.data.eval_seed)
    return evaluation if held_out else train


def streaming_rows(config: Config, tokenizer):
    """A function giving a fresh iterator of packed pretraining rows over the streamed dataset."""
    records = _records(config.data.train, config, streaming=True, text_field=config.data.text_field)

    def rows():
        return data_lib.pretrain_rows(records, tokenizer, config.data.seq_len, text_field=config.data.text_field)

    return rows


def language_modeling_examples(stage: str, config: Config, tokenizer, *, held_out: bool = False) -> list[dict] | None:
    """The training rows of data.train (``held_out``: of the held-out split; None without one)."""
    text_field = config.data.text_field if stage == "pretrain" else None
    records = split_records(config.data.train, config, held_out=held_out, text_field=text_field)
    if records is None:
        return None
    if stage == "pretrain" and held_out:  # solar eval's windows: the curve and solar eval read the same loss
        examples = data_lib.held_out_rows(records, tokenizer, config.data.seq_len, text_field=text_field)
    elif stage == "pretrain":
        examples = list(data_lib.pretrain_rows(records, tokenizer, config.data.seq_len, text_field=text_field))
    else:
        examples = data_lib.sft_examples(
            records,
            tokenizer,
            config.data.seq_len,
            prompt_format=config.data.prompt_format,
            completion_only=config.data.completion_only,
        )
        if config.data.packing:
            count = len(examples)
            examples = data_lib.pack_examples(
                examples, config.data.seq_len, pad_id=tokenizer.pad_token_id, strategy=config.data.packing_strategy
            )
            logger.info(
                "%s: packed %d%s examples into %d rows of %d tokens (%s): packing efficiency %.1f%%",
                stage,
                count,
                " held-out" if held_out else "",
                len(examples),
                config.data.seq_len,
                config.data.packing_strategy,
                100 * data_lib.packing_efficiency(examples),
            )
    if not examples:
        split = "held-out" if held_out else "training"
        raise ValueError(f"{stage}: the data gave no {split} rows (fewer tokens than data.seq_len?)")
    return examples


def preference_examples(source, config: Config, tokenizer, *, held_out: bool = False) -> list[dict] | None:
    """The preference pairs of ``source`` (``held_out``: of the held-out split; None without one)."""
    records = split_records(source, config, held_out=held_out)
    if records is None:
        return None
    where = config.data.eval_path if held_out and config.data.eval_path else source
    return data_lib.dpo_examples(
        records,
        tokenizer,
        config.data.seq_len,
        config.data.max_prompt_length,
        prompt_format=config.data.prompt_format,
        source=where,
    )


def evaluation_batches(examples: list[dict] | None, collate, config: Config, rank: int, world: int):
    """A function giving a fresh iterator of the held-out batches (the same ones every time, in order):
    ``train.eval_steps`` batches, at most one pass (0: one pass; its last batch is completed with the
    first rows, as every batch of every process has batch_size rows); None without held-out rows."""
    if examples is None or not config.train.eval_every:
        return None
    passes = -(-len(examples) // (config.train.batch_size * world))
    count = min(config.train.eval_steps, passes) if config.train.eval_steps else passes

    def batches():
        stream = data_lib.BatchStream(
            examples,
            config.train.batch_size,
            collate,
            seed=0,
            shuffle=False,
            rank=rank,
            world_size=world,
            drop_last=False,
        )
        return itertools.islice(iter(stream), count)

    return batches


def _with_reference(examples: list[dict], objective, batch_size: int, pad_id: int, device, compute=None) -> list[dict]:
    """Each pair gets its reference log-probs: one no-grad pass of the current model (through the
    objective, so a sharded model works) over the pairs, in order, in the training compute dtype."""
    size = batch_size
    out = []
    with torch.no_grad(), (compute or contextlib.nullcontext)():
        for i in range(0, len(examples), size):
            chunk = examples[i : i + size]
            batch = data_lib.collate_dpo(chunk, pad_id)
            logps = objective(batch["input_ids"].to(device), batch["labels"].to(device)).float().cpu()
            for j, example in enumerate(chunk):
                out.append(
                    {**example, "reference_chosen": float(logps[j]), "reference_rejected": float(logps[len(chunk) + j])}
                )
    return out


def collate_preferences(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    batch = data_lib.collate_dpo(examples, pad_id)
    batch["reference_logps"] = torch.tensor(
        [e["reference_chosen"] for e in examples] + [e["reference_rejected"] for e in examples], dtype=torch.float32
    )
    return batch


def _initial_accuracy(objective, examples: list[dict], pad_id: int, batch_size: int, device, compute=None) -> float:
    """``evaluate.preference_accuracy`` of the model before training, from the objective's log-probs."""
    scored = _with_reference(examples, objective, batch_size, pad_id, device, compute)
    return evaluate.preference_accuracy([e["reference_chosen"] - e["reference_rejected"] for e in scored])


def export(config: Config, wrapped: torch.nn.Module, model, path: Path, rank: int, tokenizer) -> None:
    """Gather the full state dict (from every shard) and write a Hugging Face directory on rank 0, in
    ``train.export_dtype`` ("auto": the dtype the optimizer kept the weights in, so fp32 masters are
    not rounded to the compute dtype), with the tokenizer's files (copied from its folder, or saved
    from ``tokenizer`` when it came by hub name)."""
    import tempfile

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tensors = {name.removeprefix("model."): tensor for name, tensor in state.items()}  # objective.model.*
        with tempfile.TemporaryDirectory() as saved:
            side_files = Path(tokenizer_path(config))
            if not side_files.is_dir():
                tokenizer.save_pretrained(saved)
                side_files = Path(saved)
            save_pretrained(
                model,
                path,
                state_dict=tensors,
                force=True,
                side_files_from=side_files,
                dtype=parameter_dtype(config) if config.train.export_dtype == "auto" else config.train.export_dtype,
            )
    barrier()


def run_stage(stage: str, config: Config) -> dict[str, object]:
    """Train one stage (every sDPO stage for ``dpo``); returns each stage's per-step history."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    rank, world, device = setup_distributed(config.train.device)
    output_dir = Path(config.train.output_dir)
    prepare_output_dir(output_dir, resume=config.train.resume, overwrite=config.train.overwrite, rank=rank)
    seed_everything(config.train.seed)
    tokenizer = load_tokenizer(tokenizer_path(config))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = build_model(config, device, tokenizer)
    compute = compute_context(config, world, device)
    if stage == "pretrain" and config.data.streaming:
        examples = streaming_rows(config, tokenizer)
        objective = LanguageModeling(model, packed=True)
        held_out = language_modeling_examples(stage, config, tokenizer, held_out=True)
        runs = [(stage, examples, held_out, lambda ex: data_lib.collate_lm(ex, pad_id), output_dir)]
    elif stage in ("pretrain", "sft"):
        examples = language_modeling_examples(stage, config, tokenizer)
        held_out = language_modeling_examples(stage, config, tokenizer, held_out=True)
        objective = LanguageModeling(model, packed=stage == "pretrain" or config.data.packing)
        runs = [(stage, examples, held_out, lambda ex: data_lib.collate_lm(ex, pad_id), output_dir)]
    else:
        objective = DirectPreference(
            model,
            beta=config.dpo.beta,
            loss_type=config.dpo.loss_type,
            label_smoothing=config.dpo.label_smoothing,
            loss_weights=config.dpo.loss_weights,
            discopop_tau=config.dpo.discopop_tau,
        )
        sources = config.dpo.stages or [config.data.train]
        chunks = [preference_examples(source, config, tokenizer) for source in sources]
        shared = preference_examples(None, config, tokenizer, held_out=True) if config.data.eval_path else None
        held_outs = [
            shared if config.data.eval_path else preference_examples(source, config, tokenizer, held_out=True)
            for source in sources
        ]
        runs = [
            (
                f"dpo-stage{i + 1}" if len(chunks) > 1 else "dpo",
                chunk,
                held_outs[i],
                lambda ex: collate_preferences(ex, pad_id),
                output_dir / f"stage{i + 1}" if len(chunks) > 1 else output_dir,
            )
            for i, chunk in enumerate(chunks)
        ]
    objective = parallelize(objective, model.model.layers, config, world, device)
    if stage == "dpo" and config.dpo.order_by_accuracy and len(runs) > 1:
        accuracy = [
            _initial_accuracy(objective, run[1], pad_id, config.train.batch_size, device, compute) for run in runs
        ]
        order = sorted(range(len(runs)), key=lambda i: -accuracy[i])  # easy (high accuracy) first
        logger.info("sDPO: initial preference accuracy per stage %s; training order %s", accuracy, order)
        runs = [runs[i] for i in order]
    histories: dict[str, object] = {}
    for name, examples, held_out, collate, stage_dir in runs:
        if stage == "dpo":  # the model as it is now (the end of the previous stage) is the reference
            examples = _with_reference(examples, objective, config.train.batch_size, pad_id, device, compute)
            if held_out is not None and config.train.eval_every:
                held_out = _with_reference(held_out, objective, config.train.batch_size, pad_id, device, compute)
        if callable(examples):  # streamed rows, read in order and never held in memory
            stream = data_lib.StreamingBatches(examples, config.train.batch_size, collate, rank=rank, world_size=world)
        else:
            stream = data_lib.BatchStream(
                examples, config.train.batch_size, collate, seed=config.train.seed, rank=rank, world_size=world
            )
        # no reference to the trainer outlives its run: its optimizer state is freed before the next
        # stage's reference pass and the export
        histories[name] = Trainer(
            config,
            objective,
            objective.count,
            stream,
            rank=rank,
            world=world,
            device=device,
            flops_per_token=flops_per_token_fn(model.config),
            output_dir=stage_dir,
            name=name,
            evaluation=evaluation_batches(held_out, collate, config, rank, world),
        ).run()
    if config.train.export:
        export(config, objective, model, output_dir / "final", rank, tokenizer)
    return histories


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def resume_command(stage: str, argv: Sequence[str]) -> str:
    """The command line that continues this run: the same arguments, ``--train.resume=true``."""
    kept = [a for a in argv if not a.startswith(("--train.resume=", "--train.overwrite="))]
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    launcher = f"torchrun --nproc_per_node {local_world} -m training.{stage}" if local_world > 1 else f"solar {stage}"
    return " ".join([launcher, *(shlex.quote(a) for a in kept), "--train.resume=true"])


def _report_interrupt(name: str, interrupt: KeyboardInterrupt, config: Config | None, argv: Sequence[str]) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    checkpoint = getattr(interrupt, "checkpoint", None)
    if checkpoint is None and config is not None and not isinstance(interrupt, TrainingInterrupted):
        checkpoint = Checkpointer(Path(config.train.output_dir) / "checkpoints", 0, 0).latest()
    where = f" at step {interrupt.step}" if isinstance(interrupt, TrainingInterrupted) else ""
    saved = f"last checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written yet (see train.save_every)"
    print(f"solar {name}: interrupted{where}; {saved}", file=sys.stderr)
    print(f"resume with: {resume_command(name, argv)}", file=sys.stderr)


def main(stage: str | None = None, argv: Sequence[str] | None = None) -> int:
    """``solar <stage>``: 0 when done, 2 with a one-line error for bad input, 130 on Ctrl-C (after
    saying where the last checkpoint is and how to resume)."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=f"solar {stage or '<stage>'}", description="Train a stage; overrides look like --optim.lr=1e-5"
    )
    if stage is None:
        parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", help="YAML/JSON config (training/configs/)")
    args, overrides = parser.parse_known_args(argv)
    name = stage or args.stage
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = None
    try:
        config = load_config(args.config, overrides)
        run_stage(name, config)
    except KeyboardInterrupt as interrupt:
        rest = list(argv)
        if stage is None:
            rest.remove(name)  # the positional stage argument
        _report_interrupt(name, interrupt, config, rest)
        return 130
    except (ValueError, TrainingError, OSError, yaml.YAMLError) as error:
        print(f"solar {name}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0
