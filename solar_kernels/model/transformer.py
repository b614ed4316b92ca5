"""A lean Llama/Mistral decoder on solar_kernels' fused ops, with Hugging Face parameter names.

    x = embed(tokens)
    for each block:  h = x + attention(rms_norm(x));  x = h + mlp(rms_norm(h))
    logits = lm_head(rms_norm(x))

Attention is grouped-query attention with rotary embeddings through
``torch.nn.functional.scaled_dot_product_attention`` (flash-attn's variable-length kernel is used
for packed rows on a GPU when flash-attn is installed). Module names match transformers'
``LlamaForCausalLM`` (``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj``, ``lm_head``...),
so state dicts are interchangeable.

Masking rules, in ``forward``:
- no ``position_ids``: plain causal attention (the fast ``is_causal`` path);
- ``position_ids`` given: a new document starts wherever a position is 0, and tokens attend only
  within their document (packed rows);
- ``attention_mask`` [B, S] (1 = real token, 0 = padding, S = cached + new tokens): padded keys are
  never attended to (left-padded batched generation); positions then count real tokens only;
- ``sliding_window`` (Mistral): a query sees at most that many positions back.

The model is plain PyTorch: parallelism, activation checkpointing and ``torch.compile`` are applied
from outside. Build big models with ``CausalLM.from_config(config, device=...)``: parameters are
created on the meta device and allocated once, on the target device.
"""

from __future__ import annotations

import importlib.util
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.rms_norm import RMSNorm
from ..ops.rotary import apply_rotary
from ..ops.swiglu import SwiGLU
from .config import ModelConfig

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] in fp32 for integer positions [B, T] (SPEC §4, as transformers)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class KVCache:
    """Keys and values of every layer for ``max_length`` positions, filled left to right."""

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, *, device=None, dtype=None):
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far (advanced by CausalLM.forward after all layers)

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v [B, Hkv, T, D] of ``layer``; return all of its keys and values so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def build_attention_mask(
    batch: int,
    query_len: int,
    key_len: int,
    device: torch.device,
    *,
    position_ids: Optional[torch.Tensor] = None,
    key_padding: Optional[torch.Tensor] = None,
    sliding_window: Optional[int] = None,
) -> Optional[torch.Tensor]:
    """Boolean mask [B, 1, T, S] (True = may attend) for queries at the last T of S positions.

    Returns None when plain causal attention is exact (no documents, padding or window in play).
    """
    documents = position_ids is not None and key_len == query_len
    window = sliding_window is not None and key_len > sliding_window
    if not documents and key_padding is None and not window and key_len == query_len:
        return None
    query_index = torch.arange(key_len - query_len, key_len, device=device)[:, None]  # [T, 1]
    key_index = torch.arange(key_len, device=device)[None, :]  # [1, S]
    allowed = (key_index <= query_index)[None, None]  # [1, 1, T, S]
    if window:
        allowed = allowed & (query_index - key_index < sliding_window)
    if documents:
        document = (position_ids == 0).cumsum(-1)  # [B, T]: a document starts at every position 0
        allowed = allowed & (document[:, None, :, None] == document[:, None, None, :])
    if key_padding is not None:
        allowed = allowed & key_padding.bool()[:, None, None, :]
    # A padding query may have nothing to attend to; let every query see itself so no row is empty
    # (an all-masked row gives NaN, and NaN values in the cache would leak through zero weights).
    allowed = allowed | (key_index == query_index)
    return allowed.expand(batch, 1, query_len, key_len)


def _flash_varlen(q, k, v, position_ids, sliding_window):
    """flash-attn over packed documents: q [B, H, T, D] -> [B, H, T, D]."""
    from flash_attn import flash_attn_varlen_func

    batch, heads, tokens, head_dim = q.shape
    starts = (position_ids == 0).clone()
    starts[:, 0] = True
    flat_starts = starts.reshape(-1).nonzero().squeeze(1)
    total = batch * tokens
    cu_seqlens = torch.cat([flat_starts, flat_starts.new_tensor([total])]).to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    window = (sliding_window - 1, 0) if sliding_window else (-1, -1)

    def rows(x):  # [B, H, T, D] -> [B*T, H, D]
        return x.transpose(1, 2).reshape(total, x.shape[1], head_dim)

    out = flash_attn_varlen_func(rows(q), rows(k), rows(v), cu_seqlens, cu_seqlens, max_len, max_len,
                                 causal=True, window_size=window)
    return out.view(batch, tokens, heads, head_dim).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        hd, bias = config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * hd, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, flash_positions=None, cache: Optional[KVCache] = None):
        """x [B, T, d]; ``flash_positions`` (packed rows' position_ids) selects flash-attn's varlen path."""
        batch, tokens, _ = x.shape
        hd = self.config.head_dim
        # [B, T, H*hd] -> [B, T, H, hd] -> [B, H, T, hd] views; rotary reads them through strides.
        q = self.q_proj(x).view(batch, tokens, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, -1, hd).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin, backend=self.config.backend)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # [B, Hkv, S, hd]
        if flash_positions is not None:
            out = _flash_varlen(q, k, v, flash_positions, self.config.sliding_window)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=k.shape[1] != q.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))  # [B, T, H*hd] -> [B, T, d]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend=config.backend)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend=config.backend)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias, backend=config.backend)

    def forward(self, x, cos, sin, mask, flash_positions=None, cache=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, flash_positions, cache)
        normed, h = self.post_attention_layernorm(attn, residual=x)  # h = x + attn, fused with the norm
        return h + self.mlp(normed)


class Decoder(nn.Module):
    """The body (Hugging Face's ``model.``): embedding, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend=config.backend)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    @classmethod
    def from_config(cls, config: ModelConfig, *, device="cpu", dtype=torch.float32, init: bool = True) -> "CausalLM":
        """Build on the meta device, then allocate once on ``device`` (and initialize unless ``init=False``)."""
        with torch.device("meta"):
            model = cls(config).to(dtype)
        if str(device) != "meta":
            model.to_empty(device=device)
            model.tie_weights()
            if init:
                model.init_weights()
        return model

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        """Hugging Face's initialization: N(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        cache: Optional[KVCache] = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V], or with ``return_hidden`` the final (normed) hidden states [B, T, d].

        ``attention_mask`` covers the cached and the new tokens: [B, cache.length + T].
        """
        if input_ids.dim() != 2:
            raise ValueError(f"CausalLM: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        batch, tokens = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + tokens > cache.max_length:
            raise ValueError(f"CausalLM: {past} cached + {tokens} new tokens exceed the cache's {cache.max_length}")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + tokens):
            raise ValueError(
                f"CausalLM: attention_mask must be [B, cached + new] = {(batch, past + tokens)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        positions = position_ids
        if positions is None:
            if attention_mask is not None:  # count real tokens only (left padding)
                positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
            else:
                positions = torch.arange(past, past + tokens, device=input_ids.device).expand(batch, tokens)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.model.embed_tokens(input_ids)
        use_flash = (HAS_FLASH_ATTN and position_ids is not None and attention_mask is None and cache is None
                     and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16))
        flash_positions = position_ids if use_flash else None
        mask = None if use_flash else build_attention_mask(
            batch, tokens, past + tokens, input_ids.device, position_ids=position_ids,
            key_padding=attention_mask, sliding_window=self.config.sliding_window,
        )
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, flash_positions, cache)
        if cache is not None:
            cache.length += tokens
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
