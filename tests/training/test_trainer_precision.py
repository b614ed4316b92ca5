"""Precision of the optimizer's weights (issue 11): with bf16 compute no AdamW update is lost.

Modes, all from the same fp32 initial weights of the tiny model:
- "fp32": fp32 parameters, fp32 compute (the reference);
- "autocast": fp32 master parameters, bf16 compute (model.dtype=bfloat16, the default);
- "kahan": bf16 parameters with the Kahan-compensated AdamW (optim.master_weights=bf16_kahan);
- "plain_bf16": bf16 parameters updated by torch's AdamW (the trainer before this change), the
  failure the tests guard against: most small updates round away.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import lm_trainer, losses, pretrain_config, run_pretrain_on_two_processes, write_config
from training import stages
from training.config import load_config
from training.optim import KahanAdamW
from training.tokenizer import load_tokenizer
from training.trainer import compute_context, seed_everything

MODES = {
    "fp32": ("float32", "fp32"),
    "autocast": ("bfloat16", "fp32"),
    "kahan": ("bfloat16", "bf16_kahan"),
    "plain_bf16": ("bfloat16", "fp32"),
}


def tiny_config(workspace, out: Path, mode: str, lr: float, steps: int, batch_size: int = 4):
    dtype, master_weights = MODES[mode]
    return load_config(
        write_config(
            Path(str(out) + ".yaml"),
            model={"preset": "tiny", "tokenizer": str(workspace / "tokenizer"), "dtype": dtype, "backend": "torch"},
            data={"train": str(workspace / "corpus.jsonl"), "seq_len": 48},
            optim={"lr": lr, "schedule": "constant", "master_weights": master_weights},
            train={"steps": steps, "batch_size": batch_size, "output_dir": str(out), "seed": 3, "export": False},
        )
    )


def train_tiny(workspace, out: Path, mode: str, *, lr: float, steps: int, batch_size: int = 4):
    """(initial weights, final weights as the optimizer holds them, per-step history, the trainer)."""
    config = tiny_config(workspace, out, mode, lr, steps, batch_size)
    device = torch.device("cpu")
    tokenizer = load_tokenizer(workspace / "tokenizer")
    seed_everything(3)
    reference = stages.build_model(tiny_config(workspace, out, "fp32", lr, steps), device, tokenizer)
    model = stages.build_model(config, device, tokenizer)  # in the dtype the stage picks for this mode
    if mode == "plain_bf16":
        model.to(torch.bfloat16)
    with torch.no_grad():  # the same initial weights for every mode (rounded to bf16 where they are bf16)
        for param, start in zip(model.parameters(), reference.parameters()):
            param.copy_(start)
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = lm_trainer(config, model, tokenizer, out, mode, batch_size=batch_size)
    history = trainer.run()
    return initial, [p.detach().clone() for p in model.parameters()], history, trainer


def changed_fraction(initial, final) -> float:
    changed = sum(int((a != b).sum()) for a, b in zip(initial, final))
    return changed / sum(a.numel() for a in initial)


def test_the_modes_hold_the_weights_they_say(workspace, tmp_path):
    tokenizer = load_tokenizer(workspace / "tokenizer")
    for mode, expected in (("fp32", torch.float32), ("autocast", torch.float32), ("kahan", torch.bfloat16)):
        config = tiny_config(workspace, tmp_path / mode, mode, 1e-5, 1)
        assert stages.build_model(config, torch.device("cpu"), tokenizer).model.embed_tokens.weight.dtype == expected
    autocast = compute_context(tiny_config(workspace, tmp_path / "a", "autocast", 1e-5, 1), 1, torch.device("cpu"))
    with autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    _, _, _, trainer = train_tiny(workspace, tmp_path / "kahan_run", "kahan", lr=1e-5, steps=1)
    assert isinstance(trainer.optimizer, KahanAdamW)


@pytest.mark.parametrize("lr", [1e-5, 5e-7])
def test_bf16_compute_loses_no_update(workspace, tmp_path, lr):
    fractions = {}
    for mode in ("fp32", "autocast", "plain_bf16"):
        initial, final, _, _ = train_tiny(workspace, tmp_path / mode, mode, lr=lr, steps=10)
        fractions[mode] = changed_fraction(initial, final)
    assert abs(fractions["autocast"] - fractions["fp32"]) <= 0.05, fractions
    assert fractions["plain_bf16"] < fractions["fp32"] - 0.3, fractions  # what the fix is for


@pytest.mark.parametrize("lr", [1e-5, 5e-7])
def test_kahan_updates_sum_to_the_fp32_ones(workspace, tmp_path, lr):
    """bf16 weight + compensation carries the whole update: it moved as far as fp32's did."""
    initial, fp32_final, _, _ = train_tiny(workspace, tmp_path / "fp32", "fp32", lr=lr, steps=10)
    start, final, _, trainer = train_tiny(workspace, tmp_path / "kahan", "kahan", lr=lr, steps=10)
    effective = [p.float() + trainer.optimizer.state[q]["compensation"].float() for p, q in zip(final, trainer.params)]
    assert changed_fraction([s.float() for s in start], effective) >= changed_fraction(initial, fp32_final) - 0.05
    moved_fp32 = sum(float((b - a).abs().sum()) for a, b in zip(initial, fp32_final))
    moved_kahan = sum(float((b - a.float()).abs().sum()) for a, b in zip(start, effective))
    assert moved_kahan == pytest.approx(moved_fp32, rel=0.1)


def test_bf16_losses_track_fp32_over_50_steps(workspace, tmp_path):
    runs = {
        mode: [r["loss"] for r in train_tiny(workspace, tmp_path / mode, mode, lr=1e-3, steps=50, batch_size=2)[2]]
        for mode in ("fp32", "autocast", "kahan")
    }
    assert runs["fp32"][-1] < runs["fp32"][0] - 0.5  # it learns, so tracking means something
    bf16_eps = 2.0**-8
    for mode in ("autocast", "kahan"):
        gaps = [abs(a - b) / b for a, b in zip(runs[mode], runs["fp32"])]
        # bf16 rounds every matmul input to 2^-8 relative: allow a few of those on the loss, per step
        assert max(gaps) < 8 * bf16_eps and sum(gaps) / len(gaps) < 3 * bf16_eps, (mode, max(gaps))


def test_two_processes_with_bf16_compute_track_one(workspace, tmp_path):
    """World 2 on gloo: fp32 masters sharded by FSDP2, gathered in bf16 by its MixedPrecisionPolicy,
    against one process under autocast; both export the fp32 masters (train.export_dtype auto)."""
    from solar_kernels.model import load_pretrained

    def config(out, batch_size):
        values = pretrain_config(workspace, out, steps=4, batch_size=batch_size, export=True)
        values["model"]["dtype"] = "bfloat16"
        return write_config(Path(str(out) + ".yaml"), **values)

    stages.run_stage("pretrain", load_config(config(tmp_path / "one", 4)))
    run_pretrain_on_two_processes(config(tmp_path / "two", 2), port_offset=7)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=4 * 2.0**-8)
    one, two = load_pretrained(tmp_path / "one" / "final"), load_pretrained(tmp_path / "two" / "final")
    assert one.model.embed_tokens.weight.dtype == two.model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("mode", ["autocast", "kahan"])
def test_bf16_modes_resume_exactly(workspace, tmp_path, mode):
    """Checkpoints keep what the optimizer holds (fp32 masters; bf16 weights with their compensation)."""
    dtype, master_weights = MODES[mode]
    values = pretrain_config(workspace, tmp_path / "run", steps=6, save_every=2, export=False)
    values["model"]["dtype"], values["optim"]["master_weights"] = dtype, master_weights
    path = write_config(tmp_path / "c.yaml", **values)
    stages.run_stage("pretrain", load_config(path))
    straight = losses(tmp_path / "run")
    history = stages.run_stage("pretrain", load_config(path, ["--train.resume=true"]))["pretrain"]
    assert [r["step"] for r in history] == [5, 6]
    assert losses(tmp_path / "run") == straight
