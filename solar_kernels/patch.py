"""Swap solar_kernels' fused ops into an already-built transformers Llama/Mistral model.

``patch_hf_model(model)`` changes that one model instance, never a transformers class or module:

- every ``*RMSNorm`` module's forward becomes ``sk.rms_norm`` (same weight parameter);
- every attention module's forward rotates q and k with ``sk.apply_rotary`` (one launch for both)
  and then calls the attention implementation the model was configured with, as before;
- every MLP's forward becomes ``down_proj(sk.swiglu(gate_proj(x), up_proj(x)))``;
- the causal-LM forward, when ``labels`` are passed, computes the loss with
  ``sk.linear_cross_entropy`` from the final hidden states, so the ``[B, T, V]`` logits are never
  built; the returned output then has ``logits=None`` (pass no labels to get logits). Labels are
  shifted as transformers does (the loss at position t predicts label t + 1; -100 is ignored), and
  ``num_items_in_batch`` is honoured as in transformers' loss.

Parameters, buffers, state dicts and optimizers are untouched; ``unpatch_hf_model`` restores the
original forwards.

Under ``torch.autocast`` (how transformers' Trainer and TRL run ``bf16=True`` over fp32 parameters)
each swapped op does what autocast does to the code it replaces (each op's module docstring says
what): the loss's matmuls run in the autocast dtype like ``lm_head``'s would, the loss is fp32, and
every parameter gets its gradient in its own dtype.
"""

from __future__ import annotations

import sys
import types
from typing import Optional

import torch
import torch.nn.functional as F

from .ops.linear_logprobs import linear_cross_entropy
from .ops.rms_norm import rms_norm
from .ops.rotary import apply_rotary
from .ops.swiglu import swiglu

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")
_PATCHED_ATTR = "_solar_kernels_patched"


def _rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=self._solar_backend)


def _mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self._solar_backend))


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       past_key_values=None, **kwargs):
    """transformers' Llama/Mistral attention with the rotary embedding done by sk.apply_rotary."""
    namespace = sys.modules[type(self).__module__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)  # [B, T, H, hd], then [B, H, T, hd] views
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
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
    out, weights = attention(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    if labels is None:
        return self._solar_original_forward(input_ids=input_ids, attention_mask=attention_mask,
                                            position_ids=position_ids, past_key_values=past_key_values,
                                            inputs_embeds=inputs_embeds, use_cache=use_cache,
                                            logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)
    hidden = outputs.last_hidden_state
    # transformers' shift: position t predicts label t + 1; the last position predicts nothing.
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
    reduction = "sum" if num_items is not None else "mean"
    loss = linear_cross_entropy(hidden, self.lm_head.weight, shifted, bias=self.lm_head.bias,
                                reduction=reduction, backend=self._solar_backend)
    if num_items is not None:
        loss = loss / num_items
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def patch_hf_model(model: torch.nn.Module, *, backend: Optional[str] = None, rms_norm: bool = True,
                   rotary: bool = True, mlp: bool = True, loss: bool = True) -> torch.nn.Module:
    """Patch ``model`` (a transformers ``LlamaForCausalLM``/``MistralForCausalLM``) in place; returns it."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise TypeError(f"patch_hf_model: expected one of {', '.join(SUPPORTED)}, got {name}")
    if getattr(model, _PATCHED_ATTR, False):
        raise ValueError("patch_hf_model: this model is already patched (call unpatch_hf_model first)")
    if getattr(model.config, "hidden_act", "silu") != "silu":
        raise ValueError(f"patch_hf_model: the MLP must use silu, got hidden_act={model.config.hidden_act!r}")
    replacements = []
    for module in model.modules():
        kind = type(module).__name__
        if rms_norm and kind.endswith("RMSNorm"):
            replacements.append((module, _rms_norm_forward))
        elif rotary and kind.endswith("Attention") and hasattr(module, "q_proj"):
            replacements.append((module, _attention_forward))
        elif mlp and kind.endswith("MLP") and hasattr(module, "gate_proj"):
            replacements.append((module, _mlp_forward))
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
            del module._solar_backend
    model.__dict__.pop("_solar_original_forward", None)
    model.__dict__.pop(_PATCHED_ATTR, None)
    return model
