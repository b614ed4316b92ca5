"""What each stage minimizes, as modules that wrap the model (so FSDP2 can make the objective its
root and the LM head is unsharded inside the loss). No ``[B, T, V]`` logits tensor ever exists:
the model returns hidden states and the fused kernels compute the loss from them.

Each objective's ``forward(**batch)`` returns ``(loss_sum, metric_sums)`` over its items, and
``count(batch)`` the number of items, so the trainer can normalize over a whole step. A metric is a
sum over the items, or a ``(sum, count)`` pair when it is averaged over something else (tokens).

Token metrics, with TRL 1.16's names and meanings (``token_statistics``): ``entropy`` (nats, of the
predictive distribution) and ``mean_token_accuracy`` (argmax == label, the first maximum winning a
tie) over the trained tokens; for DPO, entropy over both responses' completion tokens, accuracy over
the chosen ones, and ``logits/chosen``, ``logits/rejected`` (the mean logit over the vocabulary,
averaged over completion tokens). They come from one extra no-grad pass through the LM head, in
chunks of rows, so no ``[B, T, V]`` logits tensor exists there either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import solar_kernels as sk
from solar_kernels.model import CausalLM

# Rows of logits per chunk of the metrics pass: about 2**22 logits (16 MB in fp32) at a time (its
# softmax and entropy temporaries are a few chunks at a time: a small part of a CPU step's peak).
_LOGITS_PER_CHUNK = 1 << 22


@torch.no_grad()
def token_statistics(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> dict[str, torch.Tensor]:
    """Per-token ``entropy``, ``is_top1`` and ``mean_logit`` of ``hidden @ weight.T`` ([B, T] each,
    fp32, 0 where ``labels == ignore_index``), as TRL 1.16's fused LM head computes them.

    ``hidden`` [B, T, d], ``weight`` [V, d], ``labels`` [B, T] (shifted: position t predicts
    labels[t]). The logits are made in chunks of rows in the dtype ``F.linear`` gives (autocast's
    compute dtype when active), then taken to fp32. Every position is scored (selecting the labeled
    ones would wait for the device), so a step pays one LM-head forward matmul more (SOLAR 10.7B:
    ~0.4% of its FLOPs).
    """
    flat = hidden.detach().reshape(-1, hidden.shape[-1])  # [N, d]
    targets = labels.reshape(-1)  # [N]
    rows = max(1, _LOGITS_PER_CHUNK // weight.shape[0])
    entropy, top1, mean = [], [], []
    for start in range(0, flat.shape[0], rows):
        logits = F.linear(flat[start : start + rows], weight.detach()).float()  # [rows, V]
        logp = torch.log_softmax(logits, dim=-1)
        entropy.append(-(logp.exp() * logp).sum(-1))
        top1.append(logits.argmax(-1) == targets[start : start + rows])  # argmax: the first maximum
        mean.append(logits.mean(-1))
    keep = (targets != ignore_index).float()
    return {
        name: (torch.cat(parts).float() * keep).view(labels.shape)
        for name, parts in (("entropy", entropy), ("is_top1", top1), ("mean_logit", mean))
    }


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
    def count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Labeled tokens, as a tensor on the batch's device (reading it would wait for the device)."""
        return (batch["labels"] != -100).sum()

    def forward(self, input_ids, labels, position_ids=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.model(input_ids, position_ids=position_ids if self.packed else None, return_hidden=True)
        loss = sk.linear_cross_entropy(
            hidden, self.model.lm_head.weight, labels, reduction="sum", backend=self.model.config.backend
        )
        stats = token_statistics(hidden, self.model.lm_head.weight, labels)  # over the trained tokens
        return loss, {"mean_token_accuracy": stats["is_top1"].sum(), "entropy": stats["entropy"].sum()}


def sequence_logps(model: CausalLM, input_ids, labels, *, return_hidden: bool = False):
    """log p(completion | prompt) per row [R] through the fused kernel (prompt tokens carry -100);
    with ``return_hidden``, also the final hidden states [R, T, d]."""
    hidden = model(input_ids, return_hidden=True)
    logps = sk.sequence_logprobs(hidden, model.lm_head.weight, labels, backend=model.config.backend)
    return (logps, hidden) if return_hidden else logps


class DirectPreference(nn.Module):
    """DPO over a batch of 2B rows: B chosen, then B rejected (one concatenated forward).

    ``reference_logps`` [2B] were computed once before training by the stage's reference model, so
    no reference model is held in memory. Log-probs are summed over completion tokens for every loss
    type (TRL 1.x); the ones that average (ipo, sigmoid_norm) and the sft term get the completion
    token counts. Metrics carry TRL 1.x's names and meanings, summed over pairs.
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        beta: float,
        loss_type: str | list[str],
        label_smoothing: float,
        loss_weights: list[float] | None = None,
        discopop_tau: float = 0.05,
    ):
        super().__init__()
        self.model = model
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.loss_weights, self.discopop_tau = loss_weights, discopop_tau

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def forward(self, input_ids, labels, reference_logps=None, position_ids=None):
        """(loss_sum, metrics); without ``reference_logps``, just the rows' log-probs [2B] (the
        reference pass goes through here too, so a sharded model needs no other entry point)."""
        # Rows are single right-padded sequences: plain causal attention is exact, position_ids unused.
        logps, hidden = sequence_logps(self.model, input_ids, labels, return_hidden=True)
        if reference_logps is None:
            return logps
        pairs = input_ids.shape[0] // 2
        chosen, rejected = logps[:pairs], logps[pairs:]
        lengths = (labels != -100).sum(dim=1)  # completion tokens per row [2B]
        loss, chosen_rewards, rejected_rewards = sk.dpo_loss(
            chosen,
            rejected,
            reference_logps[:pairs].to(chosen.dtype),
            reference_logps[pairs:].to(chosen.dtype),
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            loss_weights=self.loss_weights,
            chosen_lengths=lengths[:pairs],
            rejected_lengths=lengths[pairs:],
            discopop_tau=self.discopop_tau,
        )
        metrics = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        stats = token_statistics(hidden, self.model.lm_head.weight, labels)  # completion tokens only
        chosen_tokens, rejected_tokens = lengths[:pairs].sum(), lengths[pairs:].sum()
        metrics["entropy"] = (stats["entropy"].sum(), chosen_tokens + rejected_tokens)
        metrics["mean_token_accuracy"] = (stats["is_top1"][:pairs].sum(), chosen_tokens)  # TRL: chosen only
        metrics["logits/chosen"] = (stats["mean_logit"][:pairs].sum(), chosen_tokens)
        metrics["logits/rejected"] = (stats["mean_logit"][pairs:].sum(), rejected_tokens)
        return loss * pairs, metrics


def flops_per_token_fn(config) -> callable:
    """FLOPs/token = 6 N (no input embedding, LM head included) + 12 L d T (docs/method.md#byte-and-flop-counts)."""
    n = config.num_parameters() - config.vocab_size * config.hidden_size

    def flops(seq_len: int) -> float:
        return 6 * n + 12 * config.num_layers * config.hidden_size * seq_len

    return flops
