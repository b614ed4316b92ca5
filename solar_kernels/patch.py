"""Swap solar_kernels' fused ops into an already-built transformers causal LM.

``patch_hf_model(model)`` changes that one model instance, never a transformers class or module.
Supported: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``. Only modules whose class comes from the model's own
modeling file are touched. What is swapped:

- RMSNorm: every ``*RMSNorm`` module's forward becomes ``sk.rms_norm`` with its own weight. Llama,
  Mistral and Qwen norms are ``w * x_hat`` (Llama's casting); Gemma's are ``(1 + w) * x_hat`` with
  everything in fp32 and one cast back (``offset=1.0, casting_mode="gemma"``). Per decoder layer that
  is 2 norms for Llama, Mistral and Qwen2; 2 plus the per-head ``q_norm``/``k_norm`` for Qwen3; 4
  (input, post-attention, pre- and post-feedforward) for Gemma 2; those 4 plus ``q_norm``/``k_norm``
  for Gemma 3; and the final norm in every model.
- Rotary: every attention module's forward rotates q and k with ``sk.apply_rotary`` (one launch for
  both) from the cos/sin tables the model's own rotary module computed, so the RoPE scaling types
  transformers implements (linear, dynamic, YaRN, llama3: a scaled table, the same rotation; tests
  use YaRN and Gemma 3's per-layer-type tables with linear scaling) are honoured. Qwen3's and
  Gemma 3's ``q_norm``/``k_norm`` run before the rotation, as in transformers.
  The attention itself is still the implementation the model was configured with, called with the
  arguments transformers passes (scaling, ``sliding_window``, Gemma 2's ``attn_logit_softcapping``).
- MLP: where the MLP is a SwiGLU (``hidden_act="silu"``: Llama, Mistral, Qwen2, Qwen3) its forward
  becomes ``down_proj(sk.swiglu(gate_proj(x), up_proj(x)))``. Gemma's MLP is a GeGLU
  (``gelu_pytorch_tanh``), which the project has no fused op for: it is left as it is.
- Loss: the causal-LM forward, when ``labels`` are passed, computes the loss with
  ``sk.linear_cross_entropy`` from the final hidden states, so the ``[B, T, V]`` logits are never
  built; the returned output then has ``logits=None`` (pass no labels, or Liger's
  ``skip_logits=False``, to get logits and transformers' own loss). Labels are
  shifted as transformers does (the loss at position t predicts label t + 1; -100 is ignored), and
  ``num_items_in_batch``, ``ignore_index`` and pre-shifted ``shift_labels`` are honoured as in
  transformers' loss. Gemma's ``final_logit_softcapping``
  (30 in Gemma 2's config) is the op's ``softcap``: ``cap * tanh(logits / cap)`` inside the fused
  loss, in fp32 (transformers caps in lm_head's output dtype, bf16 under autocast).

Left alone everywhere: embeddings (Gemma's ``* sqrt(hidden_size)`` scaling stays inside its
embedding module), the attention kernel, and ``lm_head`` when no labels are passed (generation
runs through the swapped modules and picks the same tokens).
``Gemma3ForConditionalGeneration`` (the vision-language model) is refused. A config the patch
cannot honour (a Llama-family MLP with ``hidden_act`` other than silu while ``mlp=True``), or an
explicit ``backend`` that lacks an option the model needs (the CUDA twins have neither Gemma's norm
nor soft-capping), is refused in one line before anything is patched.

Parameters, buffers, state dicts and optimizers are untouched; ``unpatch_hf_model`` restores the
original forwards.

Under ``torch.autocast`` (how transformers' Trainer and TRL run ``bf16=True`` over fp32 parameters)
each swapped op does what autocast does to the code it replaces (each op's module docstring says
what): the loss's matmuls run in the autocast dtype like ``lm_head``'s would, the loss is fp32, and
every parameter gets its gradient in its own dtype.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops.linear_logprobs import linear_cross_entropy
from .ops.rms_norm import rms_norm
from .ops.rotary import apply_rotary
from .ops.swiglu import swiglu

logger = logging.getLogger(__name__)

_PATCHED_ATTR = "_solar_kernels_patched"


def _no_attention_kwargs(attention: torch.nn.Module) -> dict:
    return {}


def _config_sliding_window(attention: torch.nn.Module) -> dict:
    return {"sliding_window": getattr(attention.config, "sliding_window", None)}


def _layer_sliding_window(attention: torch.nn.Module) -> dict:
    return {"sliding_window": attention.sliding_window}


def _layer_sliding_window_and_softcap(attention: torch.nn.Module) -> dict:
    return {"sliding_window": attention.sliding_window, "softcap": attention.attn_logit_softcapping}


@dataclass(frozen=True)
class _Family:
    """What one model type's modules look like to the patch."""

    gemma_norm: bool  # (1 + w) * x_hat in fp32, eps in ``.eps``; else w * x_hat, eps in ``.variance_epsilon``
    swiglu_mlp: bool  # the MLP is down(act(gate(x)) * up(x)) with act = config.hidden_act
    attention_kwargs: Callable[[torch.nn.Module], dict]  # what transformers passes the attention besides scaling


_FAMILIES = {
    "LlamaForCausalLM": _Family(False, True, _no_attention_kwargs),
    "MistralForCausalLM": _Family(False, True, _config_sliding_window),
    "Qwen2ForCausalLM": _Family(False, True, _layer_sliding_window),
    "Qwen3ForCausalLM": _Family(False, True, _layer_sliding_window),
    "Gemma2ForCausalLM": _Family(True, False, _layer_sliding_window_and_softcap),
    "Gemma3ForCausalLM": _Family(True, False, _layer_sliding_window),
}
SUPPORTED = tuple(_FAMILIES)


def _rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=self._solar_backend)


def _gemma_rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.eps, offset=1.0, casting_mode="gemma", backend=self._solar_backend)


def _mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self._solar_backend))


def _attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
):
    """transformers' attention of the supported models with the rotary embedding done by sk.apply_rotary."""
    namespace = sys.modules[type(self).__module__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)  # [B, T, H, hd], then [B, H, T, hd] views
    query = self.q_proj(hidden_states).view(hidden_shape)
    key = self.k_proj(hidden_states).view(hidden_shape)
    if hasattr(self, "q_norm"):  # Qwen3, Gemma 3: RMSNorm over each head, before the rotation
        query, key = self.q_norm(query), self.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary(query, key, cos, sin, backend=self._solar_backend)
    past_key_values = past_key_values if past_key_values is not None else kwargs.pop("past_key_value", None)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    implementation = self.config._attn_implementation
    functions = namespace.ALL_ATTENTION_FUNCTIONS
    if hasattr(functions, "get_interface"):
        attention = functions.get_interface(implementation, namespace.eager_attention_forward)
    else:
        attention = namespace.eager_attention_forward if implementation == "eager" else functions[implementation]
    out, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **self._solar_attention_kwargs(self),
        **kwargs,
    )
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _causal_lm_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    skip_logits = kwargs.pop("skip_logits", None)  # Liger's switch: False builds the logits
    if skip_logits and labels is None:
        raise ValueError("patch_hf_model: skip_logits=True needs labels (the fused loss), got labels=None")
    if labels is None or skip_logits is False:
        return self._solar_original_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # transformers' ForCausalLMLoss options, which it also takes from the forward's kwargs.
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **kwargs,
    )
    hidden = outputs.last_hidden_state
    if shift_labels is None:  # transformers' shift: position t predicts label t + 1, the last nothing
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "sum" if num_items is not None else "mean"
    softcap = getattr(self.config, "final_logit_softcapping", None)  # Gemma's cap * tanh(logits / cap)
    loss = linear_cross_entropy(
        hidden,
        self.lm_head.weight,
        shift_labels.to(hidden.device),
        bias=self.lm_head.bias,
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=softcap,
        backend=self._solar_backend,
    )
    if num_items is not None:
        loss = loss / num_items
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


def _check_config(name: str, family: _Family, config, mlp: bool) -> None:
    """Refuse, in one line, a config whose behaviour the swapped modules would not reproduce."""
    if family.swiglu_mlp and mlp and getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"patch_hf_model: mlp=True needs hidden_act='silu' (a SwiGLU MLP), got "
            f"{name} with hidden_act={config.hidden_act!r}; pass mlp=False to keep its MLP"
        )


def _check_backend(
    name: str, model: torch.nn.Module, backend: str | None, gemma_norm: bool, softcap: float | None
) -> None:
    """An explicit backend that lacks an option this model needs (the CUDA twins have no offset,
    casting modes or soft-capping) is refused now, by one real call on one row, rather than at the
    first forward."""
    norm = model.model.norm.weight.detach()
    if backend is None or norm.device.type == "meta":
        return
    head = model.lm_head.weight.detach()
    probes = []
    if gemma_norm:
        probes.append(
            (
                "RMSNorm",
                "rms_norm",
                lambda: rms_norm(norm[None], norm, offset=1.0, casting_mode="gemma", backend=backend),
            )
        )
    if softcap is not None:
        labels = torch.zeros(1, dtype=torch.long, device=head.device)
        probes.append(
            (
                "soft-capped loss",
                "loss",
                lambda: linear_cross_entropy(head[:1], head, labels, softcap=softcap, backend=backend),
            )
        )
    for what, switch, probe in probes:
        try:
            with torch.no_grad():
                probe()
        except (ValueError, RuntimeError) as error:
            raise ValueError(
                f"patch_hf_model: {name}'s {what} cannot run on backend={backend!r} ({error}); "
                f"pass {switch}=False or another backend"
            ) from None


def patch_hf_model(
    model: torch.nn.Module,
    *,
    backend: str | None = None,
    rms_norm: bool = True,
    rotary: bool = True,
    mlp: bool = True,
    loss: bool = True,
) -> torch.nn.Module:
    """Patch ``model`` (one of ``SUPPORTED``, a transformers causal LM) in place; returns it."""
    name = type(model).__name__
    if name == "Gemma3ForConditionalGeneration":
        raise TypeError(
            "patch_hf_model: expected a text-only causal LM, got Gemma3ForConditionalGeneration "
            "(vision-language); load the text model as Gemma3ForCausalLM to patch it"
        )
    family = _FAMILIES.get(name)
    if family is None:
        raise TypeError(f"patch_hf_model: expected one of {', '.join(SUPPORTED)}, got {name}")
    if getattr(model, _PATCHED_ATTR, False):
        raise ValueError("patch_hf_model: this model is already patched (call unpatch_hf_model first)")
    _check_config(name, family, model.config, mlp)
    softcap = getattr(model.config, "final_logit_softcapping", None) if loss else None
    _check_backend(name, model, backend, rms_norm and family.gemma_norm, softcap)
    modeling_file = type(model).__module__
    norm_forward = _gemma_rms_norm_forward if family.gemma_norm else _rms_norm_forward
    replacements = []
    for module in model.modules():
        if type(module).__module__ != modeling_file:
            continue
        kind = type(module).__name__
        if rms_norm and kind.endswith("RMSNorm"):
            replacements.append((module, norm_forward))
        elif rotary and kind.endswith("Attention") and hasattr(module, "q_proj"):
            module._solar_attention_kwargs = family.attention_kwargs
            replacements.append((module, _attention_forward))
        elif mlp and family.swiglu_mlp and kind.endswith("MLP") and hasattr(module, "gate_proj"):
            replacements.append((module, _mlp_forward))
    if mlp and not family.swiglu_mlp:
        logger.info("patch_hf_model: %s's MLP is a GeGLU (no fused op): left as it is", name)
    if loss:
        model._solar_original_forward = model.forward
        replacements.append((model, _causal_lm_forward))
    for module, forward in replacements:
        module._solar_backend = backend
        module.forward = types.MethodType(forward, module)
    setattr(model, _PATCHED_ATTR, True)
    return model


def unpatch_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``patch_hf_model``: every module's forward is its class's again."""
    for module in model.modules():
        if "_solar_backend" in module.__dict__:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_solar_attention_kwargs", None)
            del module._solar_backend
    model.__dict__.pop("_solar_original_forward", None)
    model.__dict__.pop(_PATCHED_ATTR, None)
    return model
