"""Memory and export settings of the trainer: ``optim.step_in_backward`` (each parameter updated as its
gradient completes), autocast's weight cache under activation checkpointing, ``train.export_dtype``.

The oracle for step_in_backward is the ordinary step (every gradient, then ``optimizer.step()``)
with clipping off: the same AdamW arithmetic per parameter, so the weights must come out equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from solar_kernels.model import CausalLM, load_pretrained, preset
from solar_kernels.model.hf import save_pretrained
from tests.helpers import cpu_trainer, lm_trainer, pretrain_config, write_config
from training import stages
from training.config import load_config
from training.tokenizer import load_tokenizer
from training.trainer import compute_context, seed_everything


@pytest.fixture(scope="module")
def tied_checkpoint(workspace, tmp_path_factory):
    """A tiny model with tied embeddings (as SmolLM2's), so one parameter gets two gradients."""
    seed_everything(5)
    model = CausalLM.from_config(preset("tiny", tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("tied") / "model"
    save_pretrained(model, path, state_dict=model.state_dict(), side_files_from=workspace / "tokenizer")
    return path


def config_for(
    workspace,
    checkpoint: Path,
    out: Path,
    *,
    step_in_backward: bool,
    dtype: str = "float32",
    master_weights: str = "fp32",
    checkpointing: str = "none",
    **train,
):
    values = pretrain_config(
        workspace, out, steps=3, batch_size=2, export=False, activation_checkpointing=checkpointing, **train
    )
    values["model"] = {"checkpoint": str(checkpoint), "dtype": dtype, "backend": "torch"}
    values["optim"].update(
        grad_clip=0.0, weight_decay=0.1, master_weights=master_weights, step_in_backward=step_in_backward
    )
    return load_config(write_config(Path(str(out) + ".yaml"), **values))


def make_trainer(config, workspace, out: Path, name: str):
    """A trainer over the tiny corpus; the model is built from the config's checkpoint with a fixed seed."""
    tokenizer = load_tokenizer(workspace / "tokenizer")
    seed_everything(3)
    model = stages.build_model(config, torch.device("cpu"), tokenizer)
    return model, lm_trainer(config, model, tokenizer, out, name)


@pytest.mark.parametrize(
    "mode",
    [("float32", "fp32", "none"), ("bfloat16", "fp32", "full"), ("bfloat16", "bf16_kahan", "selective")],
    ids=["fp32", "autocast_full_ac", "kahan"],
)
def test_the_same_weights_and_grad_norms_as_the_ordinary_step(workspace, tied_checkpoint, tmp_path, mode):
    dtype, master_weights, checkpointing = mode
    runs = {}
    for in_backward in (False, True):
        out = tmp_path / f"run_{in_backward}"
        config = config_for(
            workspace,
            tied_checkpoint,
            out,
            step_in_backward=in_backward,
            dtype=dtype,
            master_weights=master_weights,
            checkpointing=checkpointing,
        )
        model, trainer = make_trainer(config, workspace, out, "in_backward" if in_backward else "ordinary")
        initial = [p.detach().clone() for p in model.parameters()]
        history = trainer.run()
        runs[in_backward] = ([p.detach().clone() for p in model.parameters()], history)
        assert all(not torch.equal(a, b) for a, b in zip(initial, model.parameters()))  # every parameter trained
        assert all(p.grad is None for p in model.parameters())
        assert not any(p._post_accumulate_grad_hooks for p in model.parameters())  # removed after the run
    (ordinary, ordinary_history), (in_backward, in_backward_history) = runs[False], runs[True]
    assert model.model.embed_tokens.weight is model.lm_head.weight  # the tied parameter was trained once a step
    for a, b in zip(ordinary, in_backward):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert [r["loss"] for r in in_backward_history] == [r["loss"] for r in ordinary_history]
    assert [r["grad_norm"] for r in in_backward_history] == pytest.approx(
        [r["grad_norm"] for r in ordinary_history], rel=1e-6
    )


def test_no_step_holds_two_gradients(workspace, tied_checkpoint, tmp_path):
    """Every optimizer step inside backward sees exactly one gradient: the one it updates."""
    config = config_for(workspace, tied_checkpoint, tmp_path / "run", step_in_backward=True, checkpointing="full")
    model, trainer = make_trainer(config, workspace, tmp_path / "run", "in_backward")
    seen = []
    for param in model.parameters():  # registered first, so it runs just before the trainer's step
        param.register_post_accumulate_grad_hook(
            lambda _: seen.append(sum(p.grad is not None for p in model.parameters()))
        )
    trainer.run()
    assert seen == [1] * (3 * len(list(model.parameters())))


def test_a_second_run_on_the_same_model_steps_once_per_gradient(workspace, tied_checkpoint, tmp_path):
    """sDPO runs one trainer per stage on the same model: the first one's hooks are gone by then."""
    finals = {}
    for in_backward in (False, True):
        out = tmp_path / f"run_{in_backward}"
        config = config_for(workspace, tied_checkpoint, out, step_in_backward=in_backward)
        model, first = make_trainer(config, workspace, out / "one", "first")
        first.run()
        second = cpu_trainer(config, first.objective, first.stream, first.flops_per_token, out / "two", "second")
        second.run()
        finals[in_backward] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(finals[False], finals[True]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"optim": {"grad_clip": 1.0}}, "needs optim.grad_clip=0 and train.grad_accum=1, got grad_clip=1.0"),
        ({"train": {"grad_accum": 2}}, "got grad_clip=0.0 and grad_accum=2"),
    ],
)
def test_settings_that_need_every_gradient_are_refused(workspace, tied_checkpoint, tmp_path, setting, message):
    values = pretrain_config(workspace, tmp_path / "run", grad_accum=setting.get("train", {}).get("grad_accum", 1))
    values["optim"].update({"grad_clip": 0.0, "step_in_backward": True, **setting.get("optim", {})})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(write_config(tmp_path / "c.yaml", **values))


def test_more_than_one_process_is_refused(workspace, tied_checkpoint, tmp_path):
    config = config_for(workspace, tied_checkpoint, tmp_path / "run", step_in_backward=True)
    model, trainer = make_trainer(config, workspace, tmp_path / "run", "one")
    with pytest.raises(ValueError, match="step_in_backward runs on one process.*got 2 processes"):
        cpu_trainer(config, trainer.objective, trainer.stream, trainer.flops_per_token, tmp_path / "two", world=2)


@pytest.mark.parametrize(
    "dtype, master_weights, export_dtype, expected",
    [
        ("bfloat16", "fp32", "auto", torch.float32),  # fp32 masters are exported as they are
        ("bfloat16", "bf16_kahan", "auto", torch.bfloat16),
        ("bfloat16", "fp32", "bfloat16", torch.bfloat16),
        ("float32", "fp32", "float16", torch.float16),
    ],
)
def test_export_dtype(workspace, tied_checkpoint, tmp_path, dtype, master_weights, export_dtype, expected):
    values = pretrain_config(workspace, tmp_path / "run", steps=2, batch_size=2, export=True, export_dtype=export_dtype)
    values["model"] = {"checkpoint": str(tied_checkpoint), "dtype": dtype, "backend": "torch"}
    values["optim"]["master_weights"] = master_weights
    stages.run_stage("pretrain", load_config(write_config(tmp_path / "c.yaml", **values)))
    exported = load_pretrained(tmp_path / "run" / "final")
    assert {p.dtype for p in exported.parameters()} == {expected}
    if expected == torch.float32:  # nothing was rounded on the way out: the export is the trained masters
        assert (tmp_path / "run" / "final" / "model.safetensors").stat().st_size > 4 * exported.num_parameters()


def test_a_bad_export_dtype_is_refused(workspace, tmp_path):
    values = pretrain_config(workspace, tmp_path / "run", export_dtype="fp8")
    with pytest.raises(ValueError, match="train.export_dtype must be auto, bfloat16, float16, float32, got 'fp8'"):
        load_config(write_config(tmp_path / "c.yaml", **values))


@pytest.mark.parametrize("checkpointing, cache", [("none", True), ("full", False), ("selective", False)])
def test_autocast_keeps_no_weight_copies_under_activation_checkpointing(
    workspace, tied_checkpoint, tmp_path, checkpointing, cache
):
    config = config_for(
        workspace,
        tied_checkpoint,
        tmp_path / "run",
        step_in_backward=False,
        dtype="bfloat16",
        checkpointing=checkpointing,
    )
    with compute_context(config, 1, torch.device("cpu"))():
        assert torch.is_autocast_enabled("cpu") and torch.is_autocast_cache_enabled() == cache


def test_each_cpu_step_hands_the_freed_heap_back(workspace, tied_checkpoint, tmp_path, monkeypatch):
    """On the CPU every step ends with ``release_freed_heap`` (glibc's malloc_trim), which runs here."""
    from training import trainer as trainer_module

    assert trainer_module.release_freed_heap() is True  # glibc: the function exists and runs
    calls = []
    monkeypatch.setattr(trainer_module, "release_freed_heap", lambda: calls.append(1) or True)
    config = config_for(workspace, tied_checkpoint, tmp_path / "run", step_in_backward=True)
    _, trainer = make_trainer(config, workspace, tmp_path / "run", "trim")
    trainer.run()
    assert len(calls) == config.train.steps
