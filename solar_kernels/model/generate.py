"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), batched.

Prompts of different lengths are left-padded into one batch; an attention mask keeps padding out
of attention and positions count real tokens only, so each row decodes exactly as it would alone.
Each row stops at its first EOS (which is kept in its output) or after ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .transformer import CausalLM, KVCache


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax when temperature is 0, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first one always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (token id lists); ``eos_token_id`` defaults to the config's."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(
            f"generate: need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
        )
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((batch, longest), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, longest + max_new_tokens), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every row's last prompt token is aligned
        ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), device=device)
        mask[row, longest - len(prompt) : longest] = 1
    cache = KVCache(model.config, batch, longest + max_new_tokens, device=device, dtype=dtype)
    logits = model(ids, attention_mask=mask[:, :longest], cache=cache)[:, -1]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_ids = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        next_ids = next_ids.masked_fill(finished, pad_token_id)
        for row in (~finished).nonzero().flatten().tolist():
            outputs[row].append(int(next_ids[row]))
        if eos is not None:
            finished |= next_ids == eos
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask[:, longest + step] = 1
        logits = model(next_ids[:, None], attention_mask=mask[:, : longest + step + 1], cache=cache)[:, -1]
    return outputs
