"""The decoder's attention: planned once per forward, then one kernel call (or a few) per layer.

    out = softmax(q k^T / sqrt(D) + mask) v     q [B, H, T, D]; k, v [B, Hkv, S, D] (GQA: H = g * Hkv)

The T queries are the last T of S positions (S = cached + new). The keys a query may see
(``allowed_keys`` holds the rules; ``build_attention_mask`` and ``attention_ref`` are the dense
reference every path is tested against):
- causal: key position <= query position;
- packed documents (``position_ids`` given, nothing cached): a document starts wherever a position
  is 0, and a token attends only within its document;
- key padding (``attention_mask`` [B, S], 0 = padding): padded keys are never attended to;
- sliding window w (Mistral): key position > query position - w;
- a query with nothing else to see attends to itself, so no row is empty (an all-masked row gives
  NaN, and NaN in the cache would leak through zero weights).

Paths, in the order ``choose_attention_path`` tries them (``AttentionPlan.path`` is the one taken):

| path                | when                                                          | score memory   |
|---------------------|---------------------------------------------------------------|----------------|
| ``sdpa_causal``     | no packing, padding, cache or cutting window                  | fused SDPA     |
| ``flash_attn_varlen`` | packed or windowed rows, CUDA, fp16/bf16, flash-attn installed | O(T)         |
| ``torch_varlen``    | the same without flash-attn: ``torch.nn.attention.varlen``    | O(T)           |
| ``flex``            | packed or windowed rows on CUDA otherwise (fp32, old torch)   | O(T), compiled |
| ``sdpa_mask``       | the CPU, padding or cached keys (generation), else            | query chunks   |

``sdpa_mask`` runs SDPA over chunks of ``QUERY_CHUNK`` queries, each with its own boolean mask
[B, 1, c, S_c] over only the keys the chunk can reach (causal: up to its last query; a window: from
its first query's window start). The largest tensor is then B * c * S elements (the mask, and
SDPA's float copy of it on the CPU) instead of a B * 1 * T * S mask and, on CUDA where a mask with
GQA leaves only the math kernel, B * H * T * S scores. The masks are built once per forward.

The varlen paths need the documents' starts in the flattened B * T tokens (``cu_seqlens``) and the
longest document (``max_seqlen``): ``document_bounds`` derives them from ``position_ids`` with one
device-to-host copy per forward, or the caller passes them and no copy is made. FlexAttention's
block mask is built once per forward; it runs compiled on CUDA (eager FlexAttention materializes
every score) and eagerly elsewhere (forward only: torch has no FlexAttention backward on the CPU).

``torch.nn.attention.varlen.varlen_attn`` changed between releases: torch 2.9 takes ``is_causal``,
2.10 and 2.11 take ``window_size``, 2.12+ add ``enable_gqa``. The call below reads the signature:
without ``window_size`` windowed rows go to ``flex``; without ``enable_gqa`` k and v are repeated
to H heads first. The kernel is CUDA-only, fp16/bf16.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn

    _TORCH_VARLEN_PARAMS = frozenset(inspect.signature(_torch_varlen_attn).parameters)
except ImportError:  # torch < 2.9
    _torch_varlen_attn, _TORCH_VARLEN_PARAMS = None, frozenset()
HAS_TORCH_VARLEN = _torch_varlen_attn is not None
HAS_FLEX_ATTENTION = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None

ATTENTION_PATHS = ("sdpa_causal", "flash_attn_varlen", "torch_varlen", "flex", "sdpa_mask")
_VARLEN_PATHS = ("flash_attn_varlen", "torch_varlen")


def torch_varlen_windows() -> bool:
    """Whether this torch's varlen_attn takes window_size (2.10 and later; 2.9 has only is_causal)."""
    return "window_size" in _TORCH_VARLEN_PARAMS


# Queries per SDPA call on the dense-mask path: the mask and scores of one chunk are
# [B, 1 or H, 128, S], 1/32 of the whole at T = 4096.
QUERY_CHUNK = 128


def choose_attention_path(
    *,
    device_type: str,
    dtype: torch.dtype,
    packed: bool,
    padded: bool,
    windowed: bool,
    cached: bool,
    has_flash_attn: bool | None = None,
    has_torch_varlen: bool | None = None,
    has_torch_varlen_windows: bool | None = None,
    has_flex: bool | None = None,
) -> str:
    """The attention path for a forward (pure: the situation in, a name from ATTENTION_PATHS out).

    ``packed``: rows hold documents (position_ids given, nothing cached); ``padded``: an
    attention_mask marks padded keys; ``windowed``: a sliding window shorter than the keys;
    ``cached``: keys from earlier calls precede the queries. The ``has_*`` flags default to what
    is installed.
    """
    has_flash_attn = HAS_FLASH_ATTN if has_flash_attn is None else has_flash_attn
    has_torch_varlen = HAS_TORCH_VARLEN if has_torch_varlen is None else has_torch_varlen
    windows = torch_varlen_windows() if has_torch_varlen_windows is None else has_torch_varlen_windows
    has_flex = HAS_FLEX_ATTENTION if has_flex is None else has_flex
    if padded or cached:  # generation: the decode steps' masks are [B, 1, 1, S]
        return "sdpa_mask"
    if not packed and not windowed:
        return "sdpa_causal"
    if device_type == "cuda":
        if dtype in (torch.float16, torch.bfloat16):
            if has_flash_attn:
                return "flash_attn_varlen"
            if has_torch_varlen and (windows or not windowed):
                return "torch_varlen"
        if has_flex:
            return "flex"
    return "sdpa_mask"


@dataclass
class AttentionPlan:
    """What every layer's attention needs, built once per forward by ``plan_attention``."""

    path: str
    # New tokens T, and live keys S = past + T (a cache's slots beyond S are never read).
    query_len: int
    key_len: int
    past: int
    # The sliding window, only when it cuts (S > window).
    sliding_window: int | None = None
    # [T] cache slots the new keys and values are written to (past .. past + T - 1).
    input_pos: torch.Tensor | None = None
    # Varlen paths: [N + 1] int32 document starts in the flattened B * T tokens, and the longest one.
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    # flex: the document-causal (windowed) BlockMask.
    block_mask: Any = None
    # sdpa_mask: (q0, q1, k0, k1, mask [B, 1, q1 - q0, k1 - k0]) per chunk of queries.
    chunks: list[tuple[int, int, int, int, torch.Tensor]] = field(default_factory=list)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] index of each token's document within its row: a document starts at every position 0."""
    return (position_ids == 0).cumsum(-1)


def allowed_keys(
    queries: tuple[int, int],
    keys: tuple[int, int],
    batch: int,
    device: torch.device,
    *,
    document: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean mask [B, 1, q1 - q0, k1 - k0] (True = may attend) for queries at positions [q0, q1)
    and keys at [k0, k1). ``document`` [B, S] (documents apply only when nothing is cached, so
    token index = position); ``key_padding`` [B, S] (nonzero = real token)."""
    (q0, q1), (k0, k1) = queries, keys
    query_index = torch.arange(q0, q1, device=device)[:, None]  # [Tq, 1]
    key_index = torch.arange(k0, k1, device=device)[None, :]  # [1, Sk]
    allowed = (key_index <= query_index)[None, None]  # [1, 1, Tq, Sk]
    if sliding_window is not None:
        allowed = allowed & (query_index - key_index < sliding_window)
    if document is not None:
        allowed = allowed & (document[:, None, q0:q1, None] == document[:, None, None, k0:k1])
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, k0:k1].bool()
    allowed = allowed | (key_index == query_index)
    return allowed.expand(batch, 1, q1 - q0, k1 - k0)


def build_attention_mask(
    batch: int,
    query_len: int,
    key_len: int,
    device: torch.device,
    *,
    position_ids: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """The whole boolean mask [B, 1, T, S] for queries at the last T of S positions (the reference).

    Returns None when plain causal attention is exact (no documents, padding or window in play).
    """
    documents = position_ids is not None and key_len == query_len
    window = sliding_window if sliding_window is not None and key_len > sliding_window else None
    if not documents and key_padding is None and window is None and key_len == query_len:
        return None
    return allowed_keys(
        (key_len - query_len, key_len),
        (0, key_len),
        batch,
        device,
        document=document_ids(position_ids) if documents else None,
        key_padding=key_padding,
        sliding_window=window,
    )


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Plain SDPA with the whole mask (causal when None): q [B, H, T, D], k, v [B, Hkv, S, D]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1]
    )


def document_bounds(
    position_ids: torch.Tensor | None, batch: int, tokens: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """(cu_seqlens [N + 1] int32 on ``device``, max_seqlen) of the documents in the flattened B * T
    tokens; every row starts a document. Without position_ids each row is one document (no sync);
    with them, one device-to-host copy of the start flags is the forward's only sync."""
    if position_ids is None:
        return torch.arange(0, (batch + 1) * tokens, tokens, dtype=torch.int32, device=device), tokens
    starts = position_ids == 0
    starts[:, 0] = True
    begins = starts.reshape(-1).cpu().nonzero().squeeze(1)  # the sync
    cu_seqlens = torch.cat([begins, begins.new_tensor([batch * tokens])]).to(torch.int32)
    max_seqlen = int(cu_seqlens.diff().max())
    if device.type == "cuda":  # from pinned memory the copy up does not wait for the GPU
        return cu_seqlens.pin_memory().to(device, non_blocking=True), max_seqlen
    return cu_seqlens.to(device), max_seqlen


def _supports(path: str, *, packed: bool, padded: bool, windowed: bool, cached: bool) -> bool:
    if path == "sdpa_mask":
        return True
    if path == "sdpa_causal":
        return not (packed or padded or windowed or cached)
    if path == "torch_varlen" and windowed and not torch_varlen_windows():
        return False
    return not (padded or cached)


def plan_attention(
    batch: int,
    tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    past: int = 0,
    position_ids: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    sliding_window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    path: str | None = None,
) -> AttentionPlan:
    """Choose the path (or take ``path``) and build what it needs: cu_seqlens, a block mask or the
    chunk masks. ``key_padding`` [B, past + T]; ``position_ids`` [B, T] mark documents only when
    nothing is cached (``past`` 0)."""
    key_len = past + tokens
    packed = position_ids is not None and past == 0
    window = sliding_window if sliding_window is not None and key_len > sliding_window else None
    situation = dict(packed=packed, padded=key_padding is not None, windowed=window is not None, cached=past > 0)
    if path is None:
        path = choose_attention_path(device_type=device.type, dtype=dtype, **situation)
    elif path not in ATTENTION_PATHS:
        raise ValueError(f"plan_attention: path must be one of {ATTENTION_PATHS}, got {path!r}")
    elif not _supports(path, **situation):
        raise ValueError(f"plan_attention: path {path!r} cannot run {situation}")
    plan = AttentionPlan(path, tokens, key_len, past, window, input_pos=torch.arange(past, key_len, device=device))
    document = document_ids(position_ids) if packed else None
    if path in _VARLEN_PATHS:
        if cu_seqlens is None:
            cu_seqlens, max_seqlen = document_bounds(position_ids if packed else None, batch, tokens, device)
        plan.cu_seqlens, plan.max_seqlen = cu_seqlens, max_seqlen
    elif path == "flex":
        plan.block_mask = _block_mask(batch, tokens, device, document, window)
    elif path == "sdpa_mask":
        for q0 in range(0, tokens, QUERY_CHUNK):
            q1 = min(tokens, q0 + QUERY_CHUNK)
            k0 = max(0, past + q0 - window + 1) if window is not None else 0  # the first query's window
            k1 = past + q1  # causal: nothing after the chunk's last query
            mask = allowed_keys(
                (past + q0, past + q1),
                (k0, k1),
                batch,
                device,
                document=document,
                key_padding=key_padding,
                sliding_window=window,
            )
            plan.chunks.append((q0, q1, k0, k1, mask))
    logger.debug("attention path %s for B=%d T=%d past=%d", path, batch, tokens, past)
    return plan


def _block_mask(batch: int, tokens: int, device: torch.device, document: torch.Tensor | None, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        if document is not None:
            keep = keep & (document[b, q_idx] == document[b, kv_idx])
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    return create_block_mask(
        document_causal, batch if document is not None else None, None, tokens, tokens, device=device
    )


@functools.cache
def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    batch, heads, tokens, head_dim = q.shape

    def rows(x):  # [B, h, T, D] -> [B*T, h, D]: a view for the [B, T, h, D]-contiguous projections
        return x.transpose(1, 2).reshape(batch * tokens, x.shape[1], head_dim)

    cu, longest = plan.cu_seqlens, plan.max_seqlen
    # A window of w positions including the query's own is w - 1 keys to the left.
    window = (plan.sliding_window - 1, 0) if plan.sliding_window is not None else (-1, 0)
    if plan.path == "flash_attn_varlen":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(
            rows(q),
            rows(k),
            rows(v),
            cu,
            cu,
            longest,
            longest,
            causal=True,
            window_size=window if plan.sliding_window is not None else (-1, -1),
        )
    else:
        kwargs: dict[str, Any] = {}
        if "enable_gqa" in _TORCH_VARLEN_PARAMS:
            kwargs["enable_gqa"] = k.shape[1] != heads
        elif k.shape[1] != heads:
            k, v = (x.repeat_interleave(heads // k.shape[1], dim=1) for x in (k, v))
        if "window_size" in _TORCH_VARLEN_PARAMS:
            kwargs["window_size"] = window
        else:
            kwargs["is_causal"] = True
        out = _torch_varlen_attn(rows(q), rows(k), rows(v), cu, cu, longest, longest, **kwargs)
    return out.view(batch, tokens, heads, head_dim).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, Hkv, >= S, D] (a cache's slots past S are
    ignored) along ``plan``; returns [B, H, T, D], possibly a transposed view."""
    k, v = k[:, :, : plan.key_len], v[:, :, : plan.key_len]
    gqa = k.shape[1] != q.shape[1]
    if plan.path == "sdpa_causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if plan.path == "sdpa_mask":
        outs = [
            F.scaled_dot_product_attention(
                q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], attn_mask=mask, enable_gqa=gqa
            )
            for q0, q1, k0, k1, mask in plan.chunks
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    if plan.path == "flex":
        return _flex_attention(q.is_cuda)(q, k, v, block_mask=plan.block_mask, enable_gqa=gqa)
    return _varlen(q, k, v, plan)
