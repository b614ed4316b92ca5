"""Model configuration: one dataclass, named presets, and Hugging Face ``config.json`` round trips.

Presets carry the published config values (docs/method.md#model-presets): ``solar-10.7b`` (48 layers, 10,731,524,096
parameters), ``mistral-7b``, ``llama-2-7b``, and ``tiny`` for tests and the demo.

``from_hf_config`` reads a Llama or Mistral ``config.json`` dict (transformers 4.x ``rope_theta`` or
5.x ``rope_parameters``); ``to_hf_config`` writes it back with every key it did not model kept as
it was, so an unmodified round trip gives the same dict.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint import check_config_types
from ..fields import at_least, below_minimum

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def check_architecture(hf: dict, where: str) -> None:
    """A one-line ValueError unless the ``config.json`` dict ``hf`` is a Llama or Mistral model
    (its ``architectures``, when listed, and its ``model_type``, which defaults to llama)."""
    expected = sorted(ARCHITECTURES.values())
    for architecture in hf.get("architectures") or []:
        if architecture not in expected:
            raise ValueError(f"{where}: unsupported architecture {architecture}; expected {' or '.join(expected)}")
    model_type = hf.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{where}: model_type must be 'llama' or 'mistral', got {model_type!r}")


@dataclass
class ModelConfig:
    # Vocabulary size V of the embedding and LM head.
    vocab_size: int = at_least(1, 32000)
    # Model width d.
    hidden_size: int = at_least(1, 4096)
    # Width of the SwiGLU MLP's inner layer.
    intermediate_size: int = at_least(1, 14336)
    # Decoder blocks; SOLAR 10.7B is 48 (two 24-layer slices of a 32-layer base).
    num_layers: int = at_least(1, 32)
    # Query heads; key/value heads below (GQA when fewer).
    num_heads: int = at_least(1, 32)
    num_kv_heads: int = at_least(1, 8)
    # Per-head width; None means hidden_size // num_heads (derived in __post_init__).
    head_dim: int | None = None
    # RoPE base; inverse frequencies theta^(-2j/head_dim).
    rope_theta: float = 10000.0
    # Longest position the model was trained for (informational; RoPE itself has no limit).
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    # Share the embedding matrix with the LM head (no lm_head.weight in checkpoints).
    tie_word_embeddings: bool = False
    # Mistral's sliding-window attention: a token sees at most this many positions back.
    sliding_window: int | None = None
    # Biases on q/k/v/o projections and on the MLP projections (both False in Llama and Mistral).
    attention_bias: bool = False
    mlp_bias: bool = False
    # "llama" or "mistral": the Hugging Face model_type and architecture written to config.json.
    model_type: str = "llama"
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    # Which kernels the model calls (None: solar_kernels picks per device; see solar_kernels._backend).
    backend: str | None = None
    # config.json keys this class does not model, written back unchanged by to_hf_config.
    hf_extra: dict[str, Any] = field(default_factory=dict)
    # The keys the source config.json had (empty for a config not read from one): to_hf_config
    # writes a modeled key the source lacked only when its value differs from Hugging Face's default.
    hf_keys: tuple = ()

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig: hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                    f"({self.num_heads}) when head_dim is not given"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"ModelConfig: model_type must be one of {sorted(ARCHITECTURES)}, got {self.model_type!r}")
        bad = below_minimum(self)
        if bad is not None:
            name, _, value = bad
            raise ValueError(f"ModelConfig: {name} must be a positive int, got {value!r}")

    def replace(self, **changes) -> ModelConfig:
        changes.setdefault("hf_extra", copy.deepcopy(self.hf_extra))
        return dataclasses.replace(self, **changes)

    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Parameter count computed from the shapes (no tensors needed)."""
        d, hd = self.hidden_size, self.head_dim
        q_out, kv_out = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * q_out + 2 * d * kv_out + q_out * d
        if self.attention_bias:
            attn += q_out + 2 * kv_out + d
        mlp = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        total = self.num_layers * per_layer + d
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    # ---------------------------------------------------------------- Hugging Face config.json

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
        """A config from a Hugging Face Llama/Mistral ``config.json`` dict."""
        check_config_types(hf, "from_hf_config: config.json")
        check_architecture(hf, "from_hf_config")
        hf = copy.deepcopy(hf)
        keys = tuple(sorted(hf))
        model_type = hf.get("model_type", "llama")
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in hf
        ]
        if missing:
            raise ValueError(f"from_hf_config: config.json lacks {', '.join(missing)}")
        rope = hf.pop("rope_parameters", None) or {}
        rope_scaling = hf.get("rope_scaling")
        rope_type = rope.get("rope_type", (rope_scaling or {}).get("rope_type", "default"))
        if rope_type not in (None, "default"):
            raise ValueError(f"from_hf_config: only default RoPE is supported, got rope_type {rope_type!r}")
        taken = {
            "vocab_size": hf.pop("vocab_size"),
            "hidden_size": hf.pop("hidden_size"),
            "intermediate_size": hf.pop("intermediate_size"),
            "num_layers": hf.pop("num_hidden_layers"),
            "num_heads": hf.pop("num_attention_heads"),
            "num_kv_heads": hf.pop("num_key_value_heads", None),
            "head_dim": hf.pop("head_dim", None),
            "rope_theta": float(rope.get("rope_theta", hf.pop("rope_theta", 10000.0))),
            "max_position_embeddings": hf.pop("max_position_embeddings", 4096),
            "rms_norm_eps": hf.pop("rms_norm_eps", 1e-6),
            "tie_word_embeddings": hf.pop("tie_word_embeddings", False),
            "sliding_window": hf.pop("sliding_window", None) if model_type == "mistral" else None,
            "attention_bias": hf.pop("attention_bias", False),
            "mlp_bias": hf.pop("mlp_bias", False),
            "model_type": hf.pop("model_type", "llama"),
            "initializer_range": hf.pop("initializer_range", 0.02),
            "bos_token_id": hf.pop("bos_token_id", None),
            "eos_token_id": hf.pop("eos_token_id", None),
            "pad_token_id": hf.pop("pad_token_id", None),
        }
        if taken["num_kv_heads"] is None:
            taken["num_kv_heads"] = taken["num_heads"]
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"from_hf_config: hidden_act must be 'silu', got {hf['hidden_act']!r}")
        taken.update(overrides)
        return cls(**taken, hf_extra=hf, hf_keys=keys)

    def generation_config(self) -> dict[str, int]:
        """The ``generation_config.json`` dict written where no checkpoint gives one: the special ids."""
        generation = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}
        if self.pad_token_id is not None:
            generation["pad_token_id"] = self.pad_token_id
        return generation

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict for this config; for one read by ``from_hf_config`` and not
        changed, exactly the dict it was read from."""
        out = copy.deepcopy(self.hf_extra)
        fresh = not self.hf_keys
        modeled = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": out.get("hidden_act", "silu"),
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "mistral":
            modeled["sliding_window"] = self.sliding_window
        hf_defaults = {
            "head_dim": self.hidden_size // self.num_heads,
            "attention_bias": False,
            "mlp_bias": False,
            "pad_token_id": None,
            "tie_word_embeddings": False,
        }
        for key, value in modeled.items():
            if key == "architectures" and not fresh and key not in self.hf_keys:
                continue  # a bare config.json (no model saved with it) has none
            if fresh or key in self.hf_keys or key not in hf_defaults or value != hf_defaults[key]:
                out[key] = value
        # transformers 4.x reads rope_theta, 5.x rope_parameters: keep the spelling the source used.
        if fresh or "rope_parameters" in self.hf_keys:
            out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if fresh or "rope_parameters" not in self.hf_keys:
            out["rope_theta"] = self.rope_theta
        return out


def _preset_row(
    vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, positions: int, **fields
) -> ModelConfig:
    """One row of PRESETS: its sizes in the table's column order, rms_norm_eps 1e-5 (every preset's,
    as published), then any other field by name."""
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        max_position_embeddings=positions,
        rms_norm_eps=1e-5,
        **fields,
    )


# fmt: off
PRESETS: dict[str, ModelConfig] = {
    #                           vocab  hidden  intermediate  layers  heads  kv heads  positions
    "tiny":        _preset_row(   512,     64,          176,      4,     4,        2,       512),
    "llama-2-7b":  _preset_row( 32000,   4096,        11008,     32,    32,       32,      4096),
    "mistral-7b":  _preset_row( 32000,   4096,        14336,     32,    32,        8,     32768,
                               sliding_window=4096, model_type="mistral"),
    "solar-10.7b": _preset_row( 32000,   4096,        14336,     48,    32,        8,      4096),
}
# fmt: on


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of a named preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
