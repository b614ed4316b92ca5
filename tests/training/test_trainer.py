"""The trainer on the CPU: stages run and export, determinism, exact resume after a killed
process, a crash during a save, NaN handling, and 2 processes (gloo, FSDP2) == 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from solar_kernels.model import load_pretrained
from tests.helpers import ROOT, losses, pretrain_config, run_pretrain, run_pretrain_on_two_processes, write_config
from tests.tolerances import rel_err
from training.config import load_config
from training.stages import run_stage
from training.trainer import TrainingError


def test_pretrain_logs_plots_and_exports(workspace, tmp_path):
    history = run_pretrain(workspace, tmp_path / "run", steps=12)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "peak_mem_gb"):
        assert key in records[0]
    assert sum(losses(tmp_path / "run")[-3:]) < sum(losses(tmp_path / "run")[:3])  # it learns
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    model = load_pretrained(tmp_path / "run" / "final")
    assert model.config.vocab_size == 320 and (tmp_path / "run" / "final" / "tokenizer.json").exists()
    assert len(history) == 12


def test_deterministic_on_cpu(workspace, tmp_path):
    run_pretrain(workspace, tmp_path / "a", export=False)
    run_pretrain(workspace, tmp_path / "b", export=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def _stage_process(config_path, extra=()):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    return subprocess.Popen(
        [sys.executable, "-m", "training.pretrain", "--config", str(config_path), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_resume_after_a_killed_process_matches_an_uninterrupted_run(workspace, tmp_path):
    steps = 24  # long enough that the kill always lands mid-run
    run_pretrain(workspace, tmp_path / "straight", steps=steps, export=False)
    config = write_config(
        tmp_path / "killed.yaml",
        **pretrain_config(workspace, tmp_path / "killed", steps=steps, save_every=2, export=False),
    )
    process = _stage_process(config)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            process.send_signal(signal.SIGKILL)  # not a clean exit
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.stdout.read()[-2000:]
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert checkpoints and checkpoints[-1] < f"step-{steps:08d}"
    resumed = _stage_process(config, ["--train.resume=true"])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resumed from" in output
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


def test_a_crash_during_save_leaves_the_previous_checkpoint(workspace, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    original, calls = dcp.save, {"n": 0}

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            original(*args, **kwargs)
            raise OSError("disk full during the second save")
        return original(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        run_pretrain(workspace, tmp_path / "run", steps=8, save_every=2, export=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith("step-")] == ["step-00000002"]
    monkeypatch.setattr(dcp, "save", original)
    history = run_pretrain(workspace, tmp_path / "run", steps=8, save_every=2, export=False, resume=True)
    assert history[0]["step"] == 3  # continued after the last complete checkpoint
    assert not list(checkpoints.glob(".step-*.partial"))  # the half-written one is cleaned up


def test_nan_loss_stops_with_the_last_good_checkpoint(workspace, tmp_path, monkeypatch):
    import training.objectives as objectives

    forward = objectives.LanguageModeling.forward
    state = {"calls": 0}

    def poisoned(self, *args, **kwargs):
        state["calls"] += 1
        loss, metrics = forward(self, *args, **kwargs)
        return (loss * float("nan") if state["calls"] == 5 else loss), metrics

    monkeypatch.setattr(objectives.LanguageModeling, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 5; .* Last good checkpoint: .*step-00000004"):
        run_pretrain(workspace, tmp_path / "run", steps=8, save_every=2, export=False)
    assert not (tmp_path / "run" / "final").exists()


def test_two_processes_match_one(workspace, tmp_path):
    single = pretrain_config(workspace, tmp_path / "one", steps=4, batch_size=4, export=True, eval_every=2)
    single["data"]["eval_fraction"] = 0.2  # and the eval loop runs on every rank, reduced
    run_stage("pretrain", load_config(write_config(tmp_path / "one.yaml", **single)))
    double = pretrain_config(workspace, tmp_path / "two", steps=4, batch_size=2, export=True, eval_every=2)
    double["data"]["eval_fraction"] = 0.2
    config = write_config(tmp_path / "two.yaml", **double)
    run_pretrain_on_two_processes(config)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one_eval, two_eval = _eval_records(tmp_path / "one"), _eval_records(tmp_path / "two")
    assert sorted(two_eval) == sorted(one_eval) == [2, 4]
    for step in (2, 4):
        for key in ("eval/loss", "eval/mean_token_accuracy", "eval/entropy", "num_tokens"):
            assert two_eval[step][key] == pytest.approx(one_eval[step][key], rel=1e-5), (step, key)
    one, two = load_pretrained(tmp_path / "one" / "final"), load_pretrained(tmp_path / "two" / "final")
    # Elementwise equality is not expected: Adam's first steps move every weight by about +-lr
    # whatever the gradient's size, so reduction-order noise on near-zero gradients flips some.
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        assert rel_err(b, a) < 1e-3, name


def test_cli_entry_and_bad_config(workspace, tmp_path, capsys):
    from solar_kernels.cli import main

    config = write_config(tmp_path / "c.yaml", **pretrain_config(workspace, tmp_path / "cli", steps=2, export=False))
    assert main(["pretrain", "--config", str(config), "--optim.lr=1e-3"]) == 0
    assert len(losses(tmp_path / "cli")) == 2
    assert main(["pretrain", "--config", str(config), "--optim.rate=1"]) == 2
    assert "unknown key optim.rate" in capsys.readouterr().err


def test_activation_checkpointing_changes_nothing_but_memory(workspace, tmp_path):
    run_pretrain(workspace, tmp_path / "plain", steps=3, export=False)
    run_pretrain(workspace, tmp_path / "ac", steps=3, export=False, activation_checkpointing=True)
    assert losses(tmp_path / "ac") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)


def test_resume_with_a_checkpoint_of_another_shape_fails_clearly(workspace, tmp_path, monkeypatch):
    run_pretrain(workspace, tmp_path / "run", steps=4, save_every=2, export=False)
    import training.stages as stages

    original = stages.preset
    monkeypatch.setattr(stages, "preset", lambda name, **kw: original(name, **{**kw, "intermediate_size": 96}))
    with pytest.raises(TrainingError, match="cannot resume from .*step-00000002.*another model shape"):
        run_pretrain(workspace, tmp_path / "run", steps=6, save_every=2, export=False, resume=True)


def test_streaming_pretraining_resumes_exactly(workspace, tmp_path):
    def streamed(**train):
        config = pretrain_config(workspace, tmp_path / "stream", export=False, **train)
        config["data"]["streaming"] = True
        return run_stage("pretrain", load_config(write_config(tmp_path / "s.yaml", **config)))["pretrain"]

    streamed(steps=6, save_every=3)
    first = losses(tmp_path / "stream")
    history = streamed(steps=6, save_every=3, resume=True)
    assert [r["step"] for r in history] == [4, 5, 6]
    assert losses(tmp_path / "stream") == first


def test_streaming_batches_split_ranks_and_resume():
    from training.data import StreamingBatches

    rows = lambda: iter({"i": i} for i in range(10))  # noqa: E731
    collate = lambda batch: [r["i"] for r in batch]  # noqa: E731
    whole = StreamingBatches(rows, 4, collate)
    stream = iter(whole)
    assert [next(stream) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]  # a new pass
    ranks = [iter(StreamingBatches(rows, 2, collate, rank=r, world_size=2)) for r in (0, 1)]
    assert [next(ranks[0]), next(ranks[1])] == [[0, 1], [2, 3]]
    resumed = StreamingBatches(rows, 4, collate)
    resumed.load_state_dict({"epoch": 0, "index": 1})
    assert next(iter(resumed)) == [4, 5, 6, 7]


def test_setup_distributed_takes_the_gpu_named(monkeypatch):
    from training.trainer import setup_distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup_distributed("cuda:1") == (0, 1, torch.device("cuda", 1))
    assert setup_distributed("cuda") == (0, 1, torch.device("cuda", 0))
    assert setup_distributed("cpu") == (0, 1, torch.device("cpu"))
    assert chosen == [torch.device("cuda", 1), torch.device("cuda", 0)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"train.device=cuda:1 names one GPU, but 2 processes were started"):
        setup_distributed("cuda:1")


def _eval_records(out):
    return {
        r["step"]: r
        for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
        if "eval/loss" in r
    }


def test_eval_loop_logs_the_held_out_loss_every_eval_every_steps_and_at_the_end(workspace, tmp_path):
    out = tmp_path / "run"
    path = write_config(
        tmp_path / "run.yaml", **pretrain_config(workspace, out, steps=5, eval_every=2, eval_steps=1, export=True)
    )
    config = load_config(path, ["--data.eval_fraction=0.2"])
    run_stage("pretrain", config)
    evaluated = _eval_records(out)
    assert sorted(evaluated) == [2, 4, 5]
    assert all(r["loss"] > 0 for r in evaluated.values())  # eval keys join the step's training record
    # the last eval is the exported model's loss on the first held-out batch, computed independently
    import solar_kernels as sk
    from training.data import collate_lm
    from training.stages import language_modeling_examples
    from training.tokenizer import load_tokenizer

    rows = language_modeling_examples("pretrain", config, load_tokenizer(str(workspace / "tokenizer")), held_out=True)
    batch = collate_lm(rows[:4], pad_id=0)
    model = load_pretrained(out / "final").eval()
    with torch.no_grad():
        hidden = model(batch["input_ids"], position_ids=batch["position_ids"], return_hidden=True)
        expected = sk.linear_cross_entropy(hidden, model.lm_head.weight, batch["labels"], backend="torch")
    assert evaluated[5]["eval/loss"] == pytest.approx(float(expected), rel=1e-5)


def test_resume_gives_the_same_eval_numbers(workspace, tmp_path):
    settings = dict(steps=6, eval_every=2, save_every=3, export=False)
    path = write_config(tmp_path / "run.yaml", **pretrain_config(workspace, tmp_path / "run", **settings))
    run_stage("pretrain", load_config(path, ["--data.eval_fraction=0.2"]))
    first = _eval_records(tmp_path / "run")
    history = run_stage("pretrain", load_config(path, ["--data.eval_fraction=0.2", "--train.resume=true"]))["pretrain"]
    assert [r["step"] for r in history] == [4, 5, 6]
    again = _eval_records(tmp_path / "run")
    assert sorted(again) == sorted(first) == [2, 4, 6]
    assert [again[s]["eval/loss"] for s in (2, 4, 6)] == [first[s]["eval/loss"] for s in (2, 4, 6)]
    assert again[6]["num_tokens"] == first[6]["num_tokens"] == 6 * 4 * 48  # restored from the checkpoint


def test_the_pretraining_eval_is_solar_evals_held_out_loss(workspace, tmp_path):
    """The trainer's held-out loss in continued pretraining is solar eval's (solar_kernels.evaluate):
    the same windows, each document on its own, the last partial window kept (fp32 model: equal)."""
    from solar_kernels import evaluate
    from training.stages import split_records
    from training.tokenizer import load_tokenizer

    out = tmp_path / "run"
    settings = dict(steps=2, eval_every=2, eval_steps=0, export=True)
    path = write_config(tmp_path / "run.yaml", **pretrain_config(workspace, out, **settings))
    config = load_config(path, ["--data.eval_fraction=0.2"])
    run_stage("pretrain", config)
    logged = _eval_records(out)[2]["eval/loss"]
    tokenizer = load_tokenizer(str(workspace / "tokenizer"))
    texts = [r["text"] for r in split_records(config.data.train, config, held_out=True, text_field="text")]
    windows = evaluate.token_windows(
        evaluate.encoded_documents(tokenizer, texts), config.data.seq_len, tokenizer.eos_token_id
    )
    assert len({len(w) for w in windows}) > 1, "some document should end in a partial window"
    nll, count = evaluate.heldout_nll(load_pretrained(out / "final").eval(), windows, batch_size=3)
    # fp32 both; the trainer's batches are padded packed rows, solar eval's plain causal ones (3e-5 apart)
    assert logged == pytest.approx(nll / count, rel=1e-4)
