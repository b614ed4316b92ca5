"""What each stage minimizes, as modules that wrap the model (so FSDP2 can make the objective its
root and the LM head is unsharded inside the loss). No ``[B, T, V]`` logits tensor ever exists:
the model returns hidden states and the fused kernels compute the loss from them.

Each objective's ``forward(**batch)`` returns ``(loss_sum, metric_sums)`` over its items, and
``count(batch)`` the number of items, so the trainer can normalize over a whole step.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

import solar_kernels as sk
from solar_kernels.model import CausalLM


class LanguageModeling(nn.Module):
    """Next-token cross-entropy summed over labeled tokens (pretraining and SFT).

    ``packed``: rows hold several documents, so ``position_ids`` (restarting at 0 per document) are
    passed to the model, which then masks attention across documents; unpacked rows use the plain
    causal fast path.
    """

    def __init__(self, model: CausalLM, *, packed: bool):
        super().__init__()
        self.model = model
        self.packed = packed

    @staticmethod
    def count(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Labeled tokens, as a tensor on the batch's device (reading it would wait for the device)."""
        return (batch["labels"] != -100).sum()

    def forward(self, input_ids, labels, position_ids=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        hidden = self.model(input_ids, position_ids=position_ids if self.packed else None, return_hidden=True)
        loss = sk.linear_cross_entropy(hidden, self.model.lm_head.weight, labels, reduction="sum",
                                       backend=self.model.config.backend)
        return loss, {}


def sequence_logps(model: CausalLM, input_ids, labels) -> torch.Tensor:
    """log p(completion | prompt) per row [R] through the fused kernel (prompt tokens carry -100)."""
    hidden = model(input_ids, return_hidden=True)
    return sk.sequence_logprobs(hidden, model.lm_head.weight, labels, backend=model.config.backend)


class DirectPreference(nn.Module):
    """DPO over a batch of 2B rows: B chosen, then B rejected (one concatenated forward).

    ``reference_logps`` [2B] were computed once before training by the stage's reference model, so
    no reference model is held in memory. Log-probs are summed over completion tokens for every loss
    type (TRL 1.x); the ones that average (ipo, sigmoid_norm) and the sft term get the completion
    token counts. Metrics carry TRL 1.x's names and meanings, summed over pairs.
    """

    def __init__(self, model: CausalLM, *, beta: float, loss_type: str | list[str], label_smoothing: float,
                 loss_weights: list[float] | None = None, discopop_tau: float = 0.05):
        super().__init__()
        self.model = model
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.loss_weights, self.discopop_tau = loss_weights, discopop_tau

    @staticmethod
    def count(batch: Dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def forward(self, input_ids, labels, reference_logps=None, position_ids=None):
        """(loss_sum, metrics); without ``reference_logps``, just the rows' log-probs [2B] (the
        reference pass goes through here too, so a sharded model needs no other entry point)."""
        # Rows are single right-padded sequences: plain causal attention is exact, position_ids unused.
        logps = sequence_logps(self.model, input_ids, labels)
        if reference_logps is None:
            return logps
        pairs = input_ids.shape[0] // 2
        chosen, rejected = logps[:pairs], logps[pairs:]
        lengths = (labels != -100).sum(dim=1)  # completion tokens per row [2B]
        loss, chosen_rewards, rejected_rewards = sk.dpo_loss(
            chosen, rejected, reference_logps[:pairs].to(chosen.dtype), reference_logps[pairs:].to(chosen.dtype),
            beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            loss_weights=self.loss_weights, chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:],
            discopop_tau=self.discopop_tau)
        metrics = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        return loss * pairs, metrics


def flops_per_token_fn(config) -> "callable":
    """FLOPs/token = 6 N (no input embedding, LM head included) + 12 L d T (SPEC §7)."""
    n = config.num_parameters() - config.vocab_size * config.hidden_size

    def flops(seq_len: int) -> float:
        return 6 * n + 12 * config.num_layers * config.hidden_size * seq_len

    return flops
