"""Depth up-scaling (DUS, SPEC §1): grow an n-layer checkpoint by stacking layer slices.

The SOLAR recipe: two copies of an n-layer model, the last m layers dropped from the first and the
first m from the second, stacked: s = 2(n - m) layers (n = 32, m = 8 gives SOLAR 10.7B's 48).
In general a plan is a list of half-open layer slices, each from a checkpoint of the same
architecture, renumbered consecutively:

    new[i] = base[i]                    for i < n - m
    new[i] = base[i - (n - m) + m]      for i >= n - m        (drop=m is slices [0, n-m), [m, n))

The embedding comes from the first slice's checkpoint, the final norm and the LM head from the
last slice's (mergekit's passthrough convention; for SOLAR both are the same model). Layers are
bit-exact copies unless ``dtype`` converts them.

Streaming: tensors are read one at a time and written shard by shard, so peak memory is about one
output shard (``max_shard_size``) plus one tensor, whatever the model's size. The output is a full
Hugging Face directory (config with the new ``num_hidden_layers``, tokenizer and generation files
copied from the first checkpoint, safetensors shards and index) built in a temporary directory
and renamed into place only when complete. A destination that is, is inside or contains any source
checkpoint is refused, with ``force`` too; sources must be Llama or Mistral checkpoints; a source's
``auto_map`` (remote code) is not copied.

mergekit's passthrough YAML is accepted (``upscale_from_yaml``)::

    slices:
      - sources:
          - model: ./mistral-7b          # local directories; relative to the YAML file
            layer_range: [0, 24]
      - sources:
          - model: ./mistral-7b
            layer_range: [8, 32]
    merge_method: passthrough
    dtype: bfloat16
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .checkpoint import (
    CheckpointError,
    CheckpointReader,
    ShardWriter,
    check_destination,
    copy_side_files,
    output_directory,
    parse_dtype,
    set_config_dtype,
    write_config,
)
from .model.config import check_architecture

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# config.json fields that must agree between checkpoints whose layers are stacked.
_ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "hidden_act",
                      "attention_bias", "mlp_bias", "tie_word_embeddings")


@dataclass(frozen=True)
class Slice:
    """Layers [start, end) of the checkpoint at ``source``."""

    source: Path
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.source}:{self.start}:{self.end}"


@dataclass
class UpscaleReport:
    path: Path
    num_layers: int
    bytes_written: int
    seconds: float

    @property
    def gb_per_second(self) -> float:
        return self.bytes_written / 1e9 / max(self.seconds, 1e-9)


def drop_plan(source: PathLike, num_layers: int, drop: int) -> List[Slice]:
    """SPEC §1: layers [0, n - m) then [m, n) of one checkpoint."""
    if isinstance(drop, bool) or not isinstance(drop, int) or drop <= 0 or 2 * drop >= num_layers:
        raise ValueError(
            f"depth_upscale: drop must be an int with 0 < drop < n/2 = {num_layers / 2:g} "
            f"(n = {num_layers} layers in {source}), got {drop!r}"
        )
    return [Slice(Path(source), 0, num_layers - drop), Slice(Path(source), drop, num_layers)]


def parse_slices(text: str, default_source: PathLike) -> List[Slice]:
    """``"0:24,8:32"`` (layers of ``default_source``) or ``"path/a:0:24,path/b:8:32"``."""
    slices = []
    for item in text.split(","):
        parts = item.strip().rsplit(":", 2)
        try:
            if len(parts) == 2:
                source, start, end = default_source, int(parts[0]), int(parts[1])
            elif len(parts) == 3:
                source, start, end = parts[0], int(parts[1]), int(parts[2])
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"--slices: expected START:END or PATH:START:END items separated by commas, got {item!r}"
            ) from None
        slices.append(Slice(Path(source), start, end))
    return slices


def slices_from_yaml(config_path: PathLike) -> Tuple[List[Slice], Optional[str]]:
    """(slices, dtype) from a mergekit passthrough YAML; model paths relative to the YAML file."""
    import yaml

    config_path = Path(config_path)
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{config_path}: cannot read the YAML ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a mapping with slices and merge_method")
    unknown = set(config) - {"slices", "merge_method", "dtype", "base_model", "tokenizer_source", "parameters"}
    if unknown:
        raise ValueError(f"{config_path}: unsupported keys {sorted(unknown)} for a passthrough merge")
    method = config.get("merge_method")
    if method != "passthrough":
        raise ValueError(
            f"{config_path}: depth up-scaling takes merge_method: passthrough, got {method!r} "
            "(linear, slerp and ties merges are `solar merge --config`)"
        )
    raw_slices = config.get("slices")
    if not isinstance(raw_slices, list) or not raw_slices:
        raise ValueError(f"{config_path}: slices must be a non-empty list")
    slices = []
    for number, entry in enumerate(raw_slices):
        sources = entry.get("sources") if isinstance(entry, dict) else None
        if not isinstance(sources, list) or len(sources) != 1:
            raise ValueError(f"{config_path}: slice {number} must have exactly one source for passthrough, got {sources!r}")
        source = sources[0]
        layer_range = source.get("layer_range") if isinstance(source, dict) else None
        if not (isinstance(layer_range, list) and len(layer_range) == 2 and all(isinstance(v, int) for v in layer_range)):
            raise ValueError(f"{config_path}: slice {number} needs layer_range: [start, end], got {layer_range!r}")
        model = Path(str(source.get("model")))
        if not model.is_absolute():
            model = config_path.parent / model
        slices.append(Slice(model, layer_range[0], layer_range[1]))
    return slices, config.get("dtype")


def _layer_tensors(reader: CheckpointReader) -> Dict[int, Dict[str, str]]:
    """{layer: {suffix: tensor name}} for a checkpoint's decoder layers."""
    layers: Dict[int, Dict[str, str]] = {}
    for name in reader.names():
        match = _LAYER.match(name)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = name
    return layers


def _open(path: PathLike) -> CheckpointReader:
    """A source checkpoint, refused unless it is a Llama/Mistral model (its layers are stacked by name)."""
    reader = CheckpointReader(path)
    check_architecture(reader.config, f"depth_upscale: {reader.path / 'config.json'}")
    return reader


def _check_plan(slices: Sequence[Slice], readers: Dict[Path, CheckpointReader]) -> None:
    first = readers[slices[0].source]
    for path, reader in readers.items():
        for key in _ARCHITECTURE_KEYS:
            if reader.config.get(key) != first.config.get(key):
                raise ValueError(
                    f"depth_upscale: checkpoints differ in {key}: {first.config.get(key)!r} in "
                    f"{first.path} vs {reader.config.get(key)!r} in {path}"
                )
    reference_suffixes = None
    for piece in slices:
        reader = readers[piece.source]
        n = reader.config.get("num_hidden_layers")
        if not (0 <= piece.start < piece.end <= n):
            raise ValueError(f"depth_upscale: slice {piece.start}:{piece.end} is outside the {n} layers of {piece.source}")
        layers = _layer_tensors(reader)
        for layer in range(piece.start, piece.end):
            suffixes = set(layers.get(layer, {}))
            reference_suffixes = reference_suffixes if reference_suffixes is not None else suffixes
            missing = sorted(reference_suffixes - suffixes)
            if missing or not suffixes:
                raise CheckpointError(f"{piece.source}: layer {layer} lacks tensors {missing or ['(all)']}")


def depth_upscale(
    src: Optional[PathLike],
    dst: PathLike,
    *,
    drop: Optional[int] = 8,
    slices: Optional[Sequence[Slice]] = None,
    dtype: Optional[str] = None,
    max_shard_size: Union[int, str] = "5GB",
    force: bool = False,
    progress: bool = False,
) -> UpscaleReport:
    """Write the up-scaled checkpoint to ``dst``: ``drop=m`` on ``src``, or an explicit slice plan."""
    start_time = time.perf_counter()
    target_dtype = parse_dtype(dtype)
    if slices is None and src is None:
        raise ValueError("depth_upscale: give src (with drop) or slices")
    if slices is not None and not slices:
        raise ValueError("depth_upscale: the slice plan is empty")
    check_destination(dst, [src] if slices is None else [s.source for s in slices])
    if slices is None:
        base = _open(src)
        slices = drop_plan(src, base.config.get("num_hidden_layers", 0), drop)
    slices = [Slice(Path(s.source), s.start, s.end) for s in slices]
    readers = {path: _open(path) for path in dict.fromkeys(s.source for s in slices)}
    _check_plan(slices, readers)
    first, last = readers[slices[0].source], readers[slices[-1].source]

    # (output name, reader, input name) in the order written: embedding, layers, the rest.
    plan: List[Tuple[str, CheckpointReader, str]] = []
    outside_layers = [n for n in first.names() if not _LAYER.match(n)]
    head_from_last = {"model.norm.weight", "lm_head.weight", "lm_head.bias"}
    for name in outside_layers:
        if name not in head_from_last:
            plan.append((name, first, name))
    new_layer = 0
    for piece in slices:
        layers = _layer_tensors(readers[piece.source])
        for layer in range(piece.start, piece.end):
            for suffix, name in layers[layer].items():
                plan.append((f"model.layers.{new_layer}.{suffix}", readers[piece.source], name))
            new_layer += 1
    for name in outside_layers:
        if name in head_from_last:
            if name not in last:
                raise CheckpointError(f"{last.path}: tensor {name!r} is missing")
            plan.append((name, last, name))

    def out_bytes(reader, name):
        if target_dtype is None:
            return reader.nbytes(name)
        numel = 1
        for size in reader.shape(name):
            numel *= size
        return numel * (2 if target_dtype != parse_dtype("float32") else 4)

    expected = sum(out_bytes(r, n) for _, r, n in plan)
    config = json.loads(json.dumps(first.config))
    config["num_hidden_layers"] = new_layer
    if target_dtype is not None:
        set_config_dtype(config, target_dtype)
    iterator = plan
    if progress:
        from tqdm import tqdm

        iterator = tqdm(plan, desc="upscale", unit="tensor")
    with output_directory(dst, force=force, expected_bytes=expected, tool="depth_upscale") as tmp:
        copy_side_files(first.path, tmp)
        write_config(tmp, config, source=str(first.path / "config.json"))
        writer = ShardWriter(tmp, max_shard_size)
        for out_name, reader, name in iterator:
            tensor = reader.get(name)
            if target_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(target_dtype)
            writer.add(out_name, tensor)
        writer.finish()
    seconds = time.perf_counter() - start_time
    logger.info("depth_upscale: %d -> %d layers, %.2f GB in %.1f s", first.config["num_hidden_layers"],
                new_layer, writer.total_size / 1e9, seconds)
    return UpscaleReport(Path(dst), new_layer, writer.total_size, seconds)


def upscale_from_yaml(config_path: PathLike, dst: PathLike, **kwargs) -> UpscaleReport:
    """``depth_upscale`` with the plan (and dtype, unless given) of a mergekit passthrough YAML."""
    slices, dtype = slices_from_yaml(config_path)
    kwargs.setdefault("dtype", dtype)
    return depth_upscale(None, dst, slices=slices, **kwargs)
