"""Helpers shared by several test modules: import them from here, never from another test module.

Tiny Hugging Face checkpoints (``hf_tiny_config``, ``make_checkpoint``, ``tensors``), a shard writer
that fails on demand (``break_shard_writer``), and tensors that start one element into their buffer
(``misaligned``), which sends the CUDA kernels down their scalar path.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from solar_kernels import checkpoint
from solar_kernels.checkpoint import CheckpointReader


def hf_tiny_config(kind: str, **overrides):
    """A small, odd-sized transformers config (``kind`` "llama" or "mistral"): GQA, three layers,
    head_dim 12."""
    from transformers import LlamaConfig, MistralConfig

    common = dict(vocab_size=101, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if kind == "mistral":
        return MistralConfig(sliding_window=common.pop("sliding_window", 5), **common)
    return LlamaConfig(**common)


def make_checkpoint(path: Path, *, layers: int = 6, seed: int = 0, max_shard_size: str = "30KB",
                    kind: str = "llama", **overrides) -> Path:
    """A random tiny checkpoint saved by transformers into ``path`` (several shards by default)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_tiny_config(kind, num_hidden_layers=layers, **overrides))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint directory ``path``, by name."""
    reader = CheckpointReader(path)
    return {name: reader.get(name) for name in reader.names()}


def break_shard_writer(monkeypatch, at: int, error: BaseException) -> list[str]:
    """Makes ``ShardWriter.add`` raise ``error`` on its ``at``-th call (a disk failure, a Ctrl-C
    in the middle of writing); returns the list of tensor names it was called with."""
    calls = []
    original = checkpoint.ShardWriter.add

    def add(self, name, tensor):
        calls.append(name)
        if len(calls) == at:
            raise error
        original(self, name, tensor)

    monkeypatch.setattr(checkpoint.ShardWriter, "add", add)
    return calls


def misaligned(*shape: int, dtype: torch.dtype, scale: float = 1.0, device: str = "cpu") -> torch.Tensor:
    """Random values (standard normal times ``scale``) in a tensor that starts one element into its
    buffer: not 16-byte aligned, so the CUDA kernels take their scalar path."""
    buffer = torch.randn(math.prod(shape) + 1, device=device).mul_(scale).to(dtype)
    tensor = buffer[1:].view(shape)
    if tensor.data_ptr() % 16 == 0:
        raise AssertionError(f"misaligned: {dtype} view at {tensor.data_ptr():#x} is 16-byte aligned")
    return tensor
