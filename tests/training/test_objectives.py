"""The objectives' token metrics against TRL 1.16 on the same tensors (tests/fixtures/trl/
token_metrics.json, written by TRL's own SFTTrainer.compute_loss, DPOTrainer._compute_loss and fused
LM head through tests/fixtures/trl/token_metrics.py), and the trainer's num_tokens count."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from training.objectives import DirectPreference, LanguageModeling, token_statistics
from training.trainer import _Totals

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "trl" / "token_metrics.json").read_text())
WEIGHT = torch.tensor(FIXTURE["weight"])


class FixedHidden(nn.Module):
    """A model whose final hidden states are given: what the objectives read of a CausalLM."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden
        self.lm_head = nn.Linear(WEIGHT.shape[1], WEIGHT.shape[0], bias=False)
        self.lm_head.weight.data = WEIGHT.clone()
        self.config = SimpleNamespace(backend="torch")

    def forward(self, input_ids, position_ids=None, return_hidden=True):
        return self.hidden


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """TRL's unshifted labels (position t is predicted from t-1) in this project's convention."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def test_sft_loss_entropy_and_token_accuracy_match_trl():
    totals = _Totals(torch.device("cpu"))
    for batch, trl in zip(FIXTURE["sft"]["batches"], FIXTURE["sft"]["trl"]):
        labels = shifted(torch.tensor(batch["labels"]))
        objective = LanguageModeling(FixedHidden(torch.tensor(batch["hidden"])), packed=False)
        with torch.no_grad():
            loss_sum, metrics = objective(labels.clamp(min=0), labels)
        items = LanguageModeling.count({"labels": labels})
        assert float(loss_sum / items) == pytest.approx(trl["loss"], rel=1e-6)
        assert float(metrics["entropy"] / items) == pytest.approx(trl["entropy"], rel=1e-6)
        assert float(metrics["mean_token_accuracy"] / items) == pytest.approx(trl["mean_token_accuracy"], abs=1e-7)
        # num_tokens: TRL adds up attention_mask (prompt tokens count, padding does not), cumulatively
        attention_mask = torch.tensor(batch["attention_mask"])
        totals.add({"input_ids": labels, "attention_mask": attention_mask}, items.float(), loss_sum, {})
        assert _Totals.means(totals.vector([]).tolist(), [])["num_tokens"] == trl["num_tokens"]
    assert FIXTURE["sft"]["trl"][0]["mean_token_accuracy"] > 0  # the fixture's tie case counts once


def test_a_tie_at_the_maximum_counts_for_the_first_id_only():
    hidden = torch.zeros(1, 2, WEIGHT.shape[1])
    hidden[..., 0] = 4.0  # two vocabulary rows share the largest logit (token_metrics.py)
    low, high = 3, 5
    logits = hidden[0] @ WEIGHT.T
    assert logits[0, low] == logits[0, high] == logits[0].max()
    stats = token_statistics(hidden, WEIGHT, torch.tensor([[low, high]]))
    assert stats["is_top1"].tolist() == [[1.0, 0.0]]  # argmax is the first maximum, as in TRL


def test_dpo_token_metrics_match_trl():
    case = FIXTURE["dpo"]
    input_ids = torch.tensor(case["input_ids"])
    completion = torch.tensor(case["completion_mask"])
    labels = shifted(input_ids.masked_fill(completion == 0, -100))
    objective = DirectPreference(
        FixedHidden(torch.tensor(case["hidden"])), beta=case["beta"], loss_type="sigmoid", label_smoothing=0.0
    )
    with torch.no_grad():
        loss_sum, metrics = objective(input_ids, labels, torch.tensor(case["reference_logps"]))
    pairs = DirectPreference.count({"input_ids": input_ids})
    trl = case["trl"]
    assert float(loss_sum / pairs) == pytest.approx(trl["loss"], rel=1e-6)
    for name in ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected"):
        total, count = metrics[name]
        assert float(total / count) == pytest.approx(trl[name], rel=1e-5, abs=1e-7), name
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert float(metrics[name] / pairs) == pytest.approx(trl[name], rel=1e-5), name
    totals = _Totals(torch.device("cpu"))
    totals.add(
        {"input_ids": input_ids, "attention_mask": torch.tensor(case["attention_mask"])},
        torch.tensor(float(pairs)),
        loss_sum,
        metrics,
    )
    means = _Totals.means(totals.vector(list(metrics)).tolist(), list(metrics))
    assert means["num_tokens"] == trl["num_tokens"]
    assert means["mean_token_accuracy"] == pytest.approx(trl["mean_token_accuracy"], abs=1e-7)


def test_token_statistics_chunks_give_the_same_numbers(monkeypatch):
    import training.objectives as objectives

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, WEIGHT.shape[1], generator=generator)
    labels = torch.randint(-1, WEIGHT.shape[0], (3, 11), generator=generator).masked_fill_(
        torch.rand(3, 11, generator=generator) < 0.3, -100
    )
    whole = token_statistics(hidden, WEIGHT, labels)
    monkeypatch.setattr(objectives, "_LOGITS_PER_CHUNK", 4 * WEIGHT.shape[0])  # 4 rows per chunk
    chunked = token_statistics(hidden, WEIGHT, labels)
    logits = hidden @ WEIGHT.T
    keep = (labels != -100).float()
    reference = torch.distributions.Categorical(logits=logits).entropy() * keep
    for name in whole:  # a matmul over fewer rows may round differently in the last bit
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole["entropy"], reference, rtol=1e-5, atol=1e-6)
    assert (whole["entropy"][labels == -100] == 0).all() and whole["entropy"].sum() > 0
