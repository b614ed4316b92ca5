from __future__ import annotations

import json

import pytest

from solar_kernels.model import PRESETS, ModelConfig, preset


def test_solar_preset_matches_the_published_model():
    config = preset("solar-10.7b")
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (48, 4096, 14336)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (32, 8, 128, 32000)
    assert config.num_parameters() == 10_731_524_096  # docs/method.md#model-presets
    assert preset("mistral-7b").sliding_window == 4096 and preset("mistral-7b").model_type == "mistral"
    assert preset("llama-2-7b").num_kv_heads == 32 and preset("llama-2-7b").intermediate_size == 11008
    assert set(PRESETS) >= {"tiny", "llama-2-7b", "mistral-7b", "solar-10.7b"}


SOLAR_CONFIG_JSON = {  # upstage/SOLAR-10.7B-v1.0 config.json, as published (transformers 4.35)
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 48,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.35.2",
    "use_cache": False,
    "vocab_size": 32000,
}


def test_round_trip_of_a_transformers_4_config():
    config = ModelConfig.from_hf_config(SOLAR_CONFIG_JSON)
    assert config.num_layers == 48 and config.rope_theta == 10000.0
    assert config.to_hf_config() == SOLAR_CONFIG_JSON
    assert config.num_parameters() == 10_731_524_096


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_round_trip_of_a_transformers_config(kind, tmp_path):
    from tests.helpers import hf_tiny_config

    hf = hf_tiny_config(kind, rope_theta=5000.0)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    config = ModelConfig.from_hf_config(saved)
    assert config.rope_theta == 5000.0 and config.head_dim == 12
    assert (config.sliding_window == 5) == (kind == "mistral")
    assert config.to_hf_config() == saved


def test_changed_fields_are_written():
    config = ModelConfig.from_hf_config(SOLAR_CONFIG_JSON).replace(num_layers=64)
    assert config.to_hf_config()["num_hidden_layers"] == 64


def test_fresh_config_loads_in_transformers():
    from transformers import AutoConfig

    hf = preset("tiny").to_hf_config()
    loaded = AutoConfig.for_model(**hf)
    assert loaded.num_hidden_layers == 4 and loaded.num_key_value_heads == 2 and loaded.head_dim == 16


@pytest.mark.parametrize(
    "hf, message",
    [
        ({**SOLAR_CONFIG_JSON, "model_type": "gpt2"}, "model_type must be 'llama' or 'mistral', got 'gpt2'"),
        ({k: v for k, v in SOLAR_CONFIG_JSON.items() if k != "hidden_size"}, "config.json lacks hidden_size"),
        ({**SOLAR_CONFIG_JSON, "hidden_act": "gelu"}, "hidden_act must be 'silu', got 'gelu'"),
        ({**SOLAR_CONFIG_JSON, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "only default RoPE"),
        ({**SOLAR_CONFIG_JSON, "num_key_value_heads": 5}, r"num_heads \(32\) must be a multiple of num_kv_heads \(5\)"),
        ({**SOLAR_CONFIG_JSON, "num_hidden_layers": "4"}, r"key 'num_hidden_layers': expected int, got str \('4'\)"),
        ({**SOLAR_CONFIG_JSON, "rms_norm_eps": None}, r"key 'rms_norm_eps': expected int or float, got null"),
        (
            {**SOLAR_CONFIG_JSON, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
            "unsupported architecture GPT2LMHeadModel; expected LlamaForCausalLM or MistralForCausalLM",
        ),
        ([SOLAR_CONFIG_JSON], r"config.json: expected a JSON object \{\.\.\.\}, got a JSON list"),
    ],
)
def test_bad_configs(hf, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(hf)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'solar'; presets: tiny"):
        preset("solar")
