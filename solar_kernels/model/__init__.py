"""The lean Llama/Mistral model: config, decoder, attention paths, generation, Hugging Face checkpoint interop."""

from __future__ import annotations

from .attention import ATTENTION_PATHS, choose_attention_path
from .config import PRESETS, ModelConfig, preset
from .generate import generate
from .hf import load_pretrained, save_pretrained
from .transformer import CausalLM, KVCache

__all__ = [
    "ATTENTION_PATHS",
    "PRESETS",
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "choose_attention_path",
    "generate",
    "load_pretrained",
    "preset",
    "save_pretrained",
]
