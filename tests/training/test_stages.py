"""SFT and DPO/sDPO stages on the CPU: they run, train what they should, and DPO with precomputed
reference log-probs equals DPO with a live reference model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import solar_kernels as sk
from solar_kernels.model import load_pretrained
from tests.helpers import write_config
from training import data as data_lib
from training.config import load_config
from training.objectives import DirectPreference
from training.stages import run_stage
from training.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def base_model(workspace, tmp_path_factory):
    """A tiny model pretrained a few steps (the starting point of SFT and DPO)."""
    out = tmp_path_factory.mktemp("base")
    config = write_config(
        out / "c.yaml",
        model={"preset": "tiny", "tokenizer": str(workspace / "tokenizer"), "dtype": "float32", "backend": "torch"},
        data={"train": str(workspace / "corpus.jsonl"), "seq_len": 48},
        train={"steps": 4, "batch_size": 4, "output_dir": str(out / "run")},
    )
    run_stage("pretrain", load_config(config))
    return out / "run" / "final"


def stage_config(path, base_model, out, **sections):
    merged = {
        "model": {"checkpoint": str(base_model), "dtype": "float32", "backend": "torch"},
        "data": {"seq_len": 96, "max_prompt_length": 48},
        "optim": {"lr": 1.0e-3},
        "train": {"steps": 6, "batch_size": 4, "output_dir": str(out)},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return load_config(write_config(path, **merged))


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("packing, strategy, completion_only", [(False, "greedy", True), (True, "bfd", False)])
def test_sft(workspace, base_model, tmp_path, packing, strategy, completion_only):
    config = stage_config(
        tmp_path / "sft.yaml",
        base_model,
        tmp_path / "sft",
        data={
            "train": str(workspace / "sft.jsonl"),
            "packing": packing,
            "packing_strategy": strategy,
            "completion_only": completion_only,
        },
        train={"steps": 10},
    )
    history = run_stage("sft", config)["sft"]
    assert len(history) == 10 and history[-1]["loss"] < history[0]["loss"]
    assert load_pretrained(tmp_path / "sft" / "final").config.num_layers == 4
    for record in history:  # TRL's token metrics, and the share of the rows that is not padding
        assert 0 <= record["mean_token_accuracy"] <= 1 and record["entropy"] > 0
        assert 0 < record["packing_efficiency"] <= 1
    assert history[-1]["mean_token_accuracy"] > history[0]["mean_token_accuracy"]
    steps_tokens = [b["num_tokens"] - a["num_tokens"] for a, b in zip(history, history[1:])]
    assert all(0 < n <= 4 * 96 for n in steps_tokens)  # real tokens per step, cumulative


def test_dpo_metrics_and_export(workspace, base_model, tmp_path):
    from training import demo_data

    held_out = tmp_path / "held_out.jsonl"  # pairs the training data does not hold
    held_out.write_text("".join(json.dumps(r) + "\n" for r in demo_data.math_preference_records(8, 7)))
    config = stage_config(
        tmp_path / "dpo.yaml",
        base_model,
        tmp_path / "dpo",
        data={"train": str(workspace / "pairs.jsonl"), "eval_path": str(held_out)},
        dpo={"beta": 0.1},
        train={"steps": 16, "eval_every": 8},
    )
    history = run_stage("dpo", config)["dpo"]
    records = metrics(tmp_path / "dpo")
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "entropy",
        "mean_token_accuracy",
        "logits/chosen",
        "logits/rejected",
    ):
        assert key in records[0]
        assert [r["step"] for r in records if f"eval/{key}" in r] == [8, 16]  # the held-out pairs, same names
    assert records[7]["eval/rewards/margins"] != 0 and "eval/loss" in records[15]
    # The first step's policy is its reference: rewards are exactly zero, the loss exactly log 2.
    assert records[0]["rewards/chosen"] == 0 and records[0]["rewards/margins"] == 0
    assert records[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert sum(r["rewards/margins"] for r in history[-4:]) > 0  # it learns to prefer the chosen answers
    assert (tmp_path / "dpo" / "final" / "config.json").exists()


@pytest.mark.parametrize(
    "loss_type, loss_weights", [("sigmoid", None), ("ipo", None), (["sigmoid", "sft"], [1.0, 0.5])]
)
def test_precomputed_reference_equals_a_live_reference_model(workspace, base_model, loss_type, loss_weights):
    tokenizer = load_tokenizer(workspace / "tokenizer")
    records = [json.loads(line) for line in (workspace / "pairs.jsonl").read_text().splitlines()][:6]
    examples = data_lib.dpo_examples(records, tokenizer, 96, 48)
    batch = data_lib.collate_dpo(examples, tokenizer.pad_token_id)
    reference = load_pretrained(base_model, backend="torch").eval()
    policy = load_pretrained(base_model, backend="torch")
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    options = dict(beta=0.2, loss_type=loss_type, label_smoothing=0.0, loss_weights=loss_weights)
    objective = DirectPreference(policy, **options)
    with torch.no_grad():
        precomputed = DirectPreference(reference, **options)(batch["input_ids"], batch["labels"])
    loss_sum, _ = objective(batch["input_ids"], batch["labels"], precomputed)
    # the same loss with a reference model held in memory, evaluated on the fly
    live_ref = sk.sequence_logprobs(
        reference(batch["input_ids"], return_hidden=True), reference.lm_head.weight, batch["labels"]
    )
    policy_logps = sk.sequence_logprobs(
        policy(batch["input_ids"], return_hidden=True), policy.lm_head.weight, batch["labels"]
    )
    n = len(examples)
    lengths = (batch["labels"] != -100).sum(dim=1)  # ipo and sft use the completion token counts
    live, _, _ = sk.dpo_loss(
        policy_logps[:n],
        policy_logps[n:],
        live_ref[:n],
        live_ref[n:],
        beta=0.2,
        loss_type=loss_type,
        loss_weights=loss_weights,
        chosen_lengths=lengths[:n],
        rejected_lengths=lengths[n:],
    )
    torch.testing.assert_close(loss_sum / n, live)


def test_held_out_examples_are_never_trained_on(workspace, base_model, tmp_path):
    from training.stages import language_modeling_examples, preference_examples

    tokenizer = load_tokenizer(workspace / "tokenizer")
    config = stage_config(
        tmp_path / "sft.yaml",
        base_model,
        tmp_path / "sft",
        data={"train": str(workspace / "sft.jsonl"), "eval_fraction": 0.25},
    )
    train = language_modeling_examples("sft", config, tokenizer)
    held_out = language_modeling_examples("sft", config, tokenizer, held_out=True)
    source = str(workspace / "pairs.jsonl")
    pairs = [preference_examples(source, config, tokenizer, held_out=h) for h in (False, True)]
    config.data.eval_fraction = 0.0
    assert language_modeling_examples("sft", config, tokenizer, held_out=True) is None
    everything, all_pairs = (
        language_modeling_examples("sft", config, tokenizer),
        preference_examples(source, config, tokenizer),
    )
    rows = lambda examples, key="input_ids": {tuple(e[key]) for e in examples}  # noqa: E731
    # a partition of the examples: a quarter of the records held out, none of them trained on
    assert len(held_out) >= 12 and len(train) + len(held_out) == len(everything)
    assert not rows(train) & rows(held_out) and rows(train) | rows(held_out) == rows(everything)
    chosen = [rows(examples, "chosen_input_ids") for examples in (*pairs, all_pairs)]
    assert len(pairs[1]) >= 10 and not chosen[0] & chosen[1] and chosen[0] | chosen[1] == chosen[2]


def test_sdpo_stages_chain_references(workspace, base_model, tmp_path):
    config = stage_config(
        tmp_path / "sdpo.yaml",
        base_model,
        tmp_path / "sdpo",
        train={"steps": 4, "eval_every": 4, "eval_steps": 1},
        data={"eval_path": str(workspace / "pairs.jsonl")},
        dpo={"stages": [str(workspace / "easy.jsonl"), str(workspace / "hard.jsonl")], "order_by_accuracy": True},
    )
    histories = run_stage("dpo", config)
    # one held-out set (data.eval_path) evaluated at the end of each stage against that stage's reference
    for stage in ("stage1", "stage2"):
        assert [r["step"] for r in metrics(tmp_path / "sdpo" / stage) if "eval/loss" in r] == [4]
    # both stages trained, in the order of their initial accuracy (which the data decides)
    assert sorted(histories) == ["dpo-stage1", "dpo-stage2"]
    for history in histories.values():
        # each stage starts from its own reference (the previous stage's end): zero rewards at step 1
        assert history[0]["rewards/margins"] == 0 and history[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    stage2_start = metrics(tmp_path / "sdpo" / "stage2")[0]["logps/chosen"]
    stage1_start = metrics(tmp_path / "sdpo" / "stage1")[0]["logps/chosen"]
    assert stage1_start != stage2_start
    assert (tmp_path / "sdpo" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": "missing.jsonl"}, "missing.jsonl"),
    ],
)
def test_bad_data(base_model, tmp_path, data, message):
    config = stage_config(tmp_path / "bad.yaml", base_model, tmp_path / "bad", data=data)
    with pytest.raises(ValueError, match=message):
        run_stage("sft", config)


def test_empty_dataset(base_model, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    config = stage_config(
        tmp_path / "bad.yaml", base_model, tmp_path / "bad", data={"train": str(tmp_path / "empty.jsonl")}
    )
    with pytest.raises(ValueError):
        run_stage("sft", config)


def test_malformed_records(base_model, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "2+2?", "answer": "4"}\n')
    config = stage_config(
        tmp_path / "bad.yaml", base_model, tmp_path / "bad", data={"train": str(tmp_path / "bad.jsonl")}
    )
    with pytest.raises(ValueError, match="prompt"):
        run_stage("sft", config)


def test_export_saves_a_tokenizer_loaded_by_hub_name(workspace, base_model, tmp_path):
    from training.objectives import LanguageModeling
    from training.stages import export

    config = load_config(
        None, ["--model.preset=tiny", "--model.tokenizer=org/tokenizer-by-hub-name", "--model.dtype=float32"]
    )
    model = load_pretrained(base_model, backend="torch")
    tokenizer = load_tokenizer(workspace / "tokenizer")  # stands in for the one fetched by hub name
    export(config, LanguageModeling(model, packed=False), model, tmp_path / "final", 0, tokenizer)
    assert (tmp_path / "final" / "tokenizer.json").is_file()
    assert load_tokenizer(tmp_path / "final").encode("2 + 2 = 4") == tokenizer.encode("2 + 2 = 4")
    assert load_pretrained(tmp_path / "final").config.num_layers == model.config.num_layers
