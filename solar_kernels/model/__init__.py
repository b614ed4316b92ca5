"""The lean Llama/Mistral model: config, decoder, generation, Hugging Face checkpoint interop."""

from .config import PRESETS, ModelConfig, preset
from .generate import generate
from .hf import load_pretrained, save_pretrained
from .transformer import CausalLM, KVCache

__all__ = ["PRESETS", "CausalLM", "KVCache", "ModelConfig", "generate", "load_pretrained", "preset",
           "save_pretrained"]
