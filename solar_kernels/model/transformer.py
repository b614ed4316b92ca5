"""A lean Llama/Mistral decoder on solar_kernels' fused ops, with Hugging Face parameter names.

    x = embed(tokens)
    for each block:  h = x + attention(rms_norm(x));  x = h + mlp(rms_norm(h))
    logits = lm_head(rms_norm(x))

Every add of the residual stream is fused into the RMSNorm that reads it (``rms_norm(x, w,
residual=r)`` returns ``(rms_norm(x + r), x + r)``): see ``Block``. Attention is grouped-query
attention with rotary embeddings; ``attention.py`` picks its kernel once per forward (is_causal
SDPA, flash-attn or torch varlen, FlexAttention, or chunked dense-mask SDPA) and
``CausalLM.last_attention_path`` records which one ran. Module names match transformers'
``LlamaForCausalLM`` (``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj``, ``lm_head``...),
so state dicts are interchangeable; the RoPE frequencies are a non-persistent buffer
(``model.rotary_emb.inv_freq``), so they are in no checkpoint.

Masking rules (``attention.allowed_keys``), from ``forward``'s arguments:
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

import torch
from torch import nn

from ..ops.rms_norm import RMSNorm
from ..ops.rotary import apply_rotary
from ..ops.swiglu import SwiGLU
from .attention import (
    HAS_FLASH_ATTN,
    AttentionPlan,
    attend,
    build_attention_mask,
    choose_attention_path,
    document_bounds,
    plan_attention,
)
from .config import ModelConfig

__all__ = [
    "HAS_FLASH_ATTN",
    "Attention",
    "Block",
    "CausalLM",
    "Decoder",
    "KVCache",
    "LayerKVCache",
    "RotaryEmbedding",
    "build_attention_mask",
]


class RotaryEmbedding(nn.Module):
    """cos, sin [B, T, head_dim] in fp32 for integer positions [B, T] (docs/method.md#rotary-embedding, as transformers).

    ``inv_freq`` [head_dim / 2] is a non-persistent fp32 buffer. It is recomputed on first use when it
    is not an fp32 tensor on the positions' device: a model built on the meta device and filled
    parameter by parameter (``load_pretrained``), or cast whole by ``model.to(dtype)``.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.frequencies(None), persistent=False)

    def frequencies(self, device) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponent)

    def reset_buffers(self) -> None:
        self.inv_freq = self.frequencies(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != position_ids.device or self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.frequencies(position_ids.device)
        freqs = position_ids.float()[..., None] * self.inv_freq  # [B, T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class LayerKVCache(nn.Module):
    """One layer's keys and values [B, Hkv, max_length, D], written at the slots a forward names."""

    def __init__(self, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int, *, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.register_buffer("keys", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("values", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at slots ``input_pos`` [T]; return the whole cache (attention
        reads only the live slots)."""
        self.keys.index_copy_(2, input_pos, k.to(self.keys.dtype))
        self.values.index_copy_(2, input_pos, v.to(self.values.dtype))
        return self.keys, self.values


class KVCache(nn.Module):
    """A ``LayerKVCache`` per layer for ``max_length`` positions, filled left to right."""

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, *, device=None, dtype=None):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        self.layers = nn.ModuleList(
            LayerKVCache(batch_size, config.num_kv_heads, max_length, config.head_dim, device=device, dtype=dtype)
            for _ in range(config.num_layers)
        )
        self.batch_size, self.max_length = batch_size, max_length
        self.length = 0  # positions filled so far (advanced by CausalLM.forward after all layers)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        hd, bias = config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * hd, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, plan: AttentionPlan, cache: LayerKVCache | None = None):
        """x [B, T, d] -> [B, T, d]; ``plan`` says which kernel runs and carries its masks."""
        batch, tokens, _ = x.shape
        hd = self.config.head_dim
        # [B, T, H*hd] -> [B, T, H, hd] -> [B, H, T, hd] views; rotary reads them through strides.
        q = self.q_proj(x).view(batch, tokens, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, -1, hd).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin, backend=self.config.backend)
        if cache is not None:
            k, v = cache.update(plan.input_pos, k, v)  # [B, Hkv, max_length, hd]
        out = attend(q, k, v, plan)  # [B, H, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))  # [B, T, H*hd] -> [B, T, d]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend=config.backend)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend=config.backend)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias, backend=config.backend)

    def forward(self, x, residual, cos, sin, plan: AttentionPlan, cache: LayerKVCache | None = None):
        """The residual stream arrives as two summands, ``x + residual`` (the first block: x alone,
        ``residual`` None), and leaves as two, ``(mlp_out, h)``, so every add is fused into a norm:

            stream = x + residual
            h      = stream + attention(rms_norm(stream))
            out    = h + mlp(rms_norm(h))              returned as (mlp(rms_norm(h)), h)

        The next block's input norm (or the decoder's final norm) adds the MLP output.
        """
        if residual is None:
            normed, stream = self.input_layernorm(x), x
        else:
            normed, stream = self.input_layernorm(x, residual)
        normed, h = self.post_attention_layernorm(self.self_attn(normed, cos, sin, plan, cache), residual=stream)
        return self.mlp(normed), h


class Decoder(nn.Module):
    """The body (Hugging Face's ``model.``): embedding, rotary frequencies, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend=config.backend)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The attention path the latest forward took (one of attention.ATTENTION_PATHS).
        self.last_attention_path: str | None = None
        if config.tie_word_embeddings:
            self.tie_weights()

    @classmethod
    def from_config(cls, config: ModelConfig, *, device="cpu", dtype=torch.float32, init: bool = True) -> CausalLM:
        """Build on the meta device, then allocate once on ``device`` (and initialize unless ``init=False``)."""
        with torch.device("meta"):
            model = cls(config).to(dtype)
        if str(device) != "meta":
            model.to_empty(device=device)
            model.tie_weights()
            model.model.rotary_emb.reset_buffers()  # to_empty left it uninitialized
            if init:
                model.init_weights()
        return model

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Hugging Face's initialization: N(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.model.embed_tokens.weight.dtype

    def _check_inputs(self, input_ids, position_ids, attention_mask, cache, cu_seqlens, max_seqlen) -> int:
        """Raise on inputs that do not fit together; return the number of cached positions."""
        if input_ids.dim() != 2:
            raise ValueError(f"CausalLM: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        batch, tokens = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None:
            if cache.batch_size != batch or len(cache.layers) != len(self.model.layers):
                raise ValueError(
                    f"CausalLM: the cache holds {cache.batch_size} rows of {len(cache.layers)} layers, expected "
                    f"{batch} rows (input_ids) of {len(self.model.layers)} layers (the model)"
                )
            if past + tokens > cache.max_length:
                raise ValueError(f"CausalLM: {past} cached + {tokens} new tokens exceed the cache's {cache.max_length}")
        if position_ids is not None and tuple(position_ids.shape) != (batch, tokens):
            raise ValueError(
                f"CausalLM: position_ids must be [B, T] = {(batch, tokens)}, got {tuple(position_ids.shape)}"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + tokens):
            raise ValueError(
                f"CausalLM: attention_mask must be [B, cached + new] = {(batch, past + tokens)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if (cu_seqlens is None) != (max_seqlen is None):
            raise ValueError(
                "CausalLM: pass cu_seqlens and max_seqlen together, got only "
                + ("cu_seqlens" if max_seqlen is None else "max_seqlen")
            )
        if cu_seqlens is not None:
            _check_cu_seqlens(
                cu_seqlens,
                max_seqlen,
                position_ids,
                batch,
                tokens,
                input_ids.device,
                packed=position_ids is not None and attention_mask is None and past == 0,
            )
        return past

    def attention_path(self, input_ids, position_ids=None, attention_mask=None, *, cache=None) -> str:
        """The attention path ``forward`` takes with these of its inputs (nothing is computed)."""
        past = self._check_inputs(input_ids, position_ids, attention_mask, cache, None, None)
        window = self.config.sliding_window
        return choose_attention_path(
            device_type=input_ids.device.type,
            dtype=self._compute_dtype(input_ids.device),
            packed=position_ids is not None and past == 0,
            padded=attention_mask is not None,
            windowed=window is not None and past + input_ids.shape[1] > window,
            cached=past > 0,
        )

    def prepare(
        self, input_ids, position_ids=None, attention_mask=None, cache=None, cu_seqlens=None, max_seqlen=None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionPlan]:
        """Everything the blocks share, once per forward: RoPE cos/sin [B, T, hd] and the attention plan."""
        past = self._check_inputs(input_ids, position_ids, attention_mask, cache, cu_seqlens, max_seqlen)
        batch, tokens = input_ids.shape
        positions = position_ids
        if positions is None:
            if attention_mask is not None:  # count real tokens only (left padding)
                positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
            else:
                positions = torch.arange(past, past + tokens, device=input_ids.device).expand(batch, tokens)
        cos, sin = self.model.rotary_emb(positions)
        plan = plan_attention(
            batch,
            tokens,
            input_ids.device,
            self._compute_dtype(input_ids.device),
            past=past,
            position_ids=position_ids,
            key_padding=attention_mask,
            sliding_window=self.config.sliding_window,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )
        return cos, sin, plan

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V], or with ``return_hidden`` the final (normed) hidden states [B, T, d].

        ``attention_mask`` covers the cached and the new tokens: [B, cache.length + T].
        ``cu_seqlens`` [N + 1] (int32, the documents' starts in the flattened B * T tokens, ending
        with B * T) and ``max_seqlen`` (the longest document) may come with packed ``position_ids``
        from the data pipeline, sparing the varlen paths their one sync per forward; they must
        describe the same documents as ``position_ids`` (checked only when on the CPU: on a GPU the
        check would cost the sync they save).
        """
        cos, sin, plan = self.prepare(input_ids, position_ids, attention_mask, cache, cu_seqlens, max_seqlen)
        self.last_attention_path = plan.path
        x, residual = self.model.embed_tokens(input_ids), None
        for i, block in enumerate(self.model.layers):
            x, residual = block(x, residual, cos, sin, plan, cache.layers[i] if cache is not None else None)
        x = self.model.norm(x) if residual is None else self.model.norm(x, residual)[0]
        if cache is not None:
            cache.length += input_ids.shape[1]
        return x if return_hidden else self.lm_head(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def _check_cu_seqlens(
    cu_seqlens, max_seqlen, position_ids, batch: int, tokens: int, device: torch.device, *, packed: bool
) -> None:
    if not packed:
        raise ValueError(
            "CausalLM: cu_seqlens and max_seqlen describe packed rows: they need position_ids, "
            "and no attention_mask or cached tokens"
        )
    if (
        not isinstance(cu_seqlens, torch.Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.numel() < 2
        or cu_seqlens.dtype != torch.int32
        or cu_seqlens.device != device
    ):
        got = (
            f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)} on {cu_seqlens.device}"
            if isinstance(cu_seqlens, torch.Tensor)
            else type(cu_seqlens).__name__
        )
        raise ValueError(
            f"CausalLM: cu_seqlens must be a 1-D int32 tensor of N + 1 >= 2 offsets on {device}, got {got}"
        )
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or not 1 <= max_seqlen <= tokens:
        raise ValueError(f"CausalLM: max_seqlen must be an int in [1, T = {tokens}], got {max_seqlen!r}")
    if cu_seqlens.device.type != "cpu":
        return
    expected, longest = document_bounds(position_ids, batch, tokens, device)
    if not torch.equal(cu_seqlens, expected) or max_seqlen != longest:
        offsets = cu_seqlens.tolist()
        raise ValueError(
            f"CausalLM: cu_seqlens and max_seqlen must describe position_ids' documents "
            f"({expected.tolist()[:8]}{'...' if expected.numel() > 8 else ''}, {longest}), got "
            f"{offsets[:8]}{'...' if len(offsets) > 8 else ''}, {max_seqlen}"
        )
