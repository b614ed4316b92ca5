"""Load and save Hugging Face checkpoint directories for ``CausalLM`` (docs/method.md#checkpoint-layout).

``load_pretrained`` builds the model on the meta device and fills it tensor by tensor from the
safetensors files (read lazily by ``CheckpointReader``), so a model is allocated once, on its
target device. ``save_pretrained`` writes config.json, generation_config.json and safetensors
shards (plus the index when there are several) atomically; ``transformers`` loads the result.
Tensors are written in the model's parameter order, so save -> load -> save is bitwise identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint import (
    CheckpointError,
    CheckpointReader,
    output_directory,
    parse_dtype,
    set_config_dtype,
    write_hf_files,
    write_json,
)
from .config import ModelConfig
from .transformer import CausalLM

# Buffers some older checkpoints carry that the model recomputes.
_IGNORED_TENSORS = ("rotary_emb.inv_freq",)


def load_pretrained(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
) -> CausalLM:
    """A ``CausalLM`` from a Hugging Face Llama/Mistral directory; ``dtype`` None keeps the checkpoint's."""
    reader = CheckpointReader(path)
    config = ModelConfig.from_hf_config(reader.config, backend=backend)
    target_dtype = parse_dtype(dtype)
    model = CausalLM.from_config(config, device="meta")
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set(params) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    present = {n for n in reader.names() if not n.endswith(_IGNORED_TENSORS)}
    missing, unexpected = sorted(expected - present), sorted(present - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{reader.path}: tensors do not match a {config.num_layers}-layer {config.model_type} model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name in sorted(expected):
        shape = tuple(params[name].shape)
        if reader.shape(name) != shape:
            raise CheckpointError(
                f"{reader.path}: tensor {name!r} has shape {reader.shape(name)}, the config implies {shape}"
            )
    for name in sorted(expected):
        tensor = reader.get(name).to(device=device, dtype=target_dtype or reader.dtype(name))
        module_name, _, attr = name.rpartition(".")
        setattr(
            model.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=params[name].requires_grad)
        )
    model.tie_weights()
    return model


def save_pretrained(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str = "5GB",
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    side_files_from: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face directory at ``path`` (atomically; refuses an existing
    ``path`` unless ``force``). ``state_dict`` (HF names), as in transformers, is written instead of
    the model's parameters: a full state dict gathered from an FSDP-sharded model, whose own
    parameters are shards; the model then gives only its config. ``side_files_from`` copies
    tokenizer files from another checkpoint."""
    config = model.config
    target_dtype = parse_dtype(dtype)
    tensors = dict(model.named_parameters() if state_dict is None else state_dict)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    out_dtype = target_dtype or next(iter(tensors.values())).dtype
    expected_bytes = sum(t.numel() for t in tensors.values()) * torch.empty((), dtype=out_dtype).element_size()
    hf_config = set_config_dtype(config.to_hf_config(), out_dtype)
    with output_directory(path, force=force, expected_bytes=expected_bytes, tool="save_pretrained") as tmp:
        write_hf_files(
            tmp,
            ((name, tensor.detach().to(out_dtype)) for name, tensor in tensors.items()),
            hf_config,
            config_source="the model's config",
            side_files_from=side_files_from,
            max_shard_size=max_shard_size,
        )
        if not (tmp / "generation_config.json").exists():  # side_files_from had none
            write_json(tmp / "generation_config.json", config.generation_config())
    return Path(path)
