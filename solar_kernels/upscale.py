"""Depth up-scaling (DUS, docs/method.md#dus-layer-plan): grow an n-layer checkpoint by stacking layer slices.

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
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import LAYER_NAME, CheckpointError, CheckpointReader, PathLike
from .model.config import check_architecture

logger = logging.getLogger(__name__)

# mergekit passthrough's one parameter: a factor every tensor is multiplied by (None: unchanged).
PASSTHROUGH_PARAMETERS = ("scale",)
# config.json fields that must agree between checkpoints whose layers are stacked.
_ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
)


@dataclass(frozen=True)
class Slice:
    """Layers [start, end) of the checkpoint at ``source``; ``parameters`` (the slice's) and
    ``source_parameters`` (its source's) are mergekit passthrough parameters (only ``scale``)."""

    source: Path
    start: int
    end: int
    parameters: dict | None = field(default=None, compare=False, hash=False)
    source_parameters: dict | None = field(default=None, compare=False, hash=False)

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


def drop_plan(source: PathLike, num_layers: int, drop: int) -> list[Slice]:
    """docs/method.md#dus-layer-plan: layers [0, n - m) then [m, n) of one checkpoint."""
    if isinstance(drop, bool) or not isinstance(drop, int) or drop <= 0 or 2 * drop >= num_layers:
        raise ValueError(
            f"depth_upscale: drop must be an int with 0 < drop < n/2 = {num_layers / 2:g} "
            f"(n = {num_layers} layers in {source}), got {drop!r}"
        )
    return [Slice(Path(source), 0, num_layers - drop), Slice(Path(source), drop, num_layers)]


def parse_slices(text: str, default_source: PathLike) -> list[Slice]:
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


def slices_from_yaml(config_path: PathLike) -> tuple[list[Slice], str | None]:
    """(slices, dtype) from a mergekit passthrough YAML (read by ``merge.config.read_recipe``:
    model paths relative to the working directory, as mergekit; every key implemented or refused)."""
    recipe = _passthrough_recipe(config_path)
    return recipe[0], recipe[1]["dtype"]


def _passthrough_parameters(where: str, parameters: dict | None) -> dict | None:
    """Checked passthrough parameters (only ``scale``: a number, gradient or filters), or None."""
    from .merge.settings import check_parameters

    if not parameters:
        return None
    return check_parameters(where, parameters, PASSTHROUGH_PARAMETERS, "passthrough")


def _passthrough_recipe(config_path: PathLike) -> tuple[list[Slice], dict]:
    """(slices, depth_upscale keyword arguments) of a mergekit passthrough YAML."""
    from .merge.config import read_recipe

    recipe = read_recipe(config_path)
    where = recipe.path
    if recipe.merge_method != "passthrough":
        raise ValueError(
            f"{where}: depth up-scaling takes merge_method: passthrough, got {recipe.merge_method!r} "
            f"(other methods are `solar merge --config`)"
        )
    if recipe.slices is None:
        raise ValueError(f"{where}: passthrough needs slices: (layer ranges to stack), got models:")
    if recipe.compute_dtype is not None:
        raise ValueError(f"{where}: compute_dtype does not apply to passthrough (nothing is computed but scale)")

    checked = _passthrough_parameters
    top = checked(f"{where}: parameters", recipe.parameters)
    slices = []
    for number, layer_slice in enumerate(recipe.slices):
        if len(layer_slice.sources) != 1:
            raise ValueError(
                f"{where}: slices[{number}] must have exactly one source for passthrough, got "
                f"{len(layer_slice.sources)}"
            )
        source = layer_slice.sources[0]
        slices.append(
            Slice(
                source.model,
                source.layer_range[0],
                source.layer_range[1],
                parameters=checked(f"{where}: slices[{number}] parameters", layer_slice.parameters),
                source_parameters=checked(f"{where}: slices[{number}].sources[0] parameters", source.parameters),
            )
        )
    kwargs = dict(
        dtype=recipe.dtype,
        out_dtype=recipe.out_dtype,
        parameters=top,
        base_model=recipe.base_model,
        tokenizer_source=recipe.tokenizer_source,
        pad_to_multiple_of=recipe.pad_to_multiple_of,
        tokens=recipe.tokens,
        recipe=recipe.text,
    )
    return slices, kwargs


def _layer_tensors(reader: CheckpointReader) -> dict[int, dict[str, str]]:
    """{layer: {suffix: tensor name}} for a checkpoint's decoder layers."""
    layers: dict[int, dict[str, str]] = {}
    for name in reader.names():
        match = LAYER_NAME.match(name)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = name
    return layers


def _open(path: PathLike) -> CheckpointReader:
    """A source checkpoint, refused unless it is a Llama/Mistral model (its layers are stacked by name)."""
    reader = CheckpointReader(path)
    check_architecture(reader.config, f"depth_upscale: {reader.path / 'config.json'}")
    return reader


def _check_plan(slices: Sequence[Slice], readers: dict[Path, CheckpointReader], vocabularies_may_differ: bool) -> None:
    first = readers[slices[0].source]
    for path, reader in readers.items():
        for key in _ARCHITECTURE_KEYS:
            if key == "vocab_size" and vocabularies_may_differ:  # tokenizer_source rebuilds the rows
                continue
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
            raise ValueError(
                f"depth_upscale: slice {piece.start}:{piece.end} is outside the {n} layers of {piece.source}"
            )
        layers = _layer_tensors(reader)
        for layer in range(piece.start, piece.end):
            suffixes = set(layers.get(layer, {}))
            reference_suffixes = reference_suffixes if reference_suffixes is not None else suffixes
            missing = sorted(reference_suffixes - suffixes)
            if missing or not suffixes:
                raise CheckpointError(f"{piece.source}: layer {layer} lacks tensors {missing or ['(all)']}")


def depth_upscale(
    src: PathLike | None,
    dst: PathLike,
    *,
    drop: int | None = 8,
    slices: Sequence[Slice] | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    parameters: dict | None = None,
    base_model: PathLike | None = None,
    tokenizer_source: PathLike | None = None,
    pad_to_multiple_of: int | None = None,
    tokens: dict | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    progress: bool = False,
    recipe: str | None = None,
) -> UpscaleReport:
    """Write the up-scaled checkpoint to ``dst``: ``drop=m`` on ``src``, or an explicit slice plan.

    As mergekit's passthrough: every tensor is read in ``dtype`` (None: its own), multiplied by its
    ``scale`` when one is given (``parameters``, a slice's ``parameters`` or ``source_parameters``:
    numbers, gradients over the slice's layers or filters on tensor names, see
    ``merge.settings``) and stored in ``out_dtype`` (default: as read). ``base_model`` (None: the
    first slice's checkpoint) gives config.json and the tokenizer and generation files;
    ``tokenizer_source`` (mergekit's: "base", "union" or a model directory) the output vocabulary,
    the embedding's and LM head's rows rebuilt in it as mergekit does (``merge.tokenizer``;
    ``pad_to_multiple_of`` pads it, ``tokens`` sets rows, as mergekit's ``tokenizer:`` block)."""
    from .merge.card import write_card
    from .merge.settings import resolve

    start_time = time.perf_counter()
    load_dtype = checkpoint.parse_dtype(dtype)
    store_dtype = checkpoint.parse_dtype(out_dtype)
    if slices is None and src is None:
        raise ValueError("depth_upscale: give src (with drop) or slices")
    if slices is not None and not slices:
        raise ValueError("depth_upscale: the slice plan is empty")
    parameters = _passthrough_parameters("depth_upscale: parameters", parameters)
    sources = [src] if slices is None else [s.source for s in slices]
    checkpoint.check_destination(dst, sources + ([base_model] if base_model is not None else []))
    if slices is None:
        base = _open(src)
        slices = drop_plan(src, base.config.get("num_hidden_layers", 0), drop)
    slices = [
        Slice(
            Path(s.source),
            s.start,
            s.end,
            _passthrough_parameters(f"depth_upscale: slice {s} parameters", s.parameters),
            _passthrough_parameters(f"depth_upscale: slice {s} source parameters", s.source_parameters),
        )
        for s in slices
    ]
    readers = {path: _open(path) for path in dict.fromkeys(s.source for s in slices)}
    config_reader = readers[slices[0].source]
    if base_model is not None:
        base_path = Path(base_model)
        config_reader = readers.get(base_path) or _open(base_path)
        readers.setdefault(base_path, config_reader)
    _check_plan(slices, readers, tokenizer_source is not None)
    first, last = readers[slices[0].source], readers[slices[-1].source]
    side_files_from = config_reader.path
    vocabulary = None
    for option, value in (("pad_to_multiple_of", pad_to_multiple_of), ("tokens", tokens)):
        if value is not None and tokenizer_source is None:
            raise ValueError(
                f"depth_upscale: {option} applies with tokenizer_source only, got {option} {value!r} "
                f"and no tokenizer_source"
            )
    if tokenizer_source is not None:
        from .merge.core import tokenizer_plan
        from .merge.tokenizer import VOCABULARY_TENSORS

        vocabulary = tokenizer_plan(
            "depth_upscale: tokenizer_source",
            tokenizer_source,
            list(readers.values()),
            base_model,
            pad_to_multiple_of,
            tokens,
        )
        for reader in (first, last):  # the embedding's and LM head's one source each; tokens: rules checked now
            vocabulary.row_sources([reader.path], base_model)
        side_files_from = vocabulary.donor

    # (output name, reader, input name, scale) in the order written: embedding, layers, the rest.
    # scale as mergekit evaluates it: the source's, then the slice's, then the top-level parameters,
    # on the input tensor's name, at t = 0 outside the layers and i / (n - 1) for layer i of n.
    def scale_of(piece: Slice, input_name: str, t: float):
        value = resolve("scale", (piece.source_parameters, piece.parameters, parameters), input_name, t, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"depth_upscale: scale for {input_name} must be a number, got {value!r}")
        return value

    plan: list[tuple[str, CheckpointReader, str, float | None]] = []
    outside_layers = [n for n in first.names() if not LAYER_NAME.match(n)]
    head_from_last = {"model.norm.weight", "lm_head.weight", "lm_head.bias"}
    for name in outside_layers:
        if name not in head_from_last:
            plan.append((name, first, name, scale_of(slices[0], name, 0.0)))
    new_layer = 0
    for piece in slices:
        layers = _layer_tensors(readers[piece.source])
        count = piece.end - piece.start
        for offset, layer in enumerate(range(piece.start, piece.end)):
            t = offset / (count - 1) if count > 1 else 1.0
            for suffix, name in layers[layer].items():
                plan.append(
                    (f"model.layers.{new_layer}.{suffix}", readers[piece.source], name, scale_of(piece, name, t))
                )
            new_layer += 1
    for name in outside_layers:
        if name in head_from_last:
            if name not in last:
                raise CheckpointError(f"{last.path}: tensor {name!r} is missing")
            plan.append((name, last, name, scale_of(slices[-1], name, 0.0)))

    def stored(reader, name) -> torch.dtype:
        source = reader.dtype(name)
        if not source.is_floating_point:
            return source
        return store_dtype or load_dtype or source

    def out_shape(reader, name) -> tuple[int, ...]:
        shape = tuple(reader.shape(name))
        return (vocabulary.rows, *shape[1:]) if vocabulary is not None and name in VOCABULARY_TENSORS else shape

    expected = sum(math.prod(out_shape(r, n)) * stored(r, n).itemsize for _, r, n, _ in plan)
    config = json.loads(json.dumps(config_reader.config))
    config["num_hidden_layers"] = new_layer
    if vocabulary is not None:
        config["vocab_size"] = vocabulary.rows
    if store_dtype or load_dtype:
        checkpoint.set_config_dtype(config, store_dtype or load_dtype)
    iterator = plan
    if progress:
        from tqdm import tqdm

        iterator = tqdm(plan, desc="upscale", unit="tensor")

    def written():
        for out_name, reader, name, scale in iterator:
            tensor = reader.get(name)
            if tensor.is_floating_point():
                if load_dtype is not None and tensor.dtype != load_dtype:
                    tensor = tensor.to(load_dtype)
                if vocabulary is not None and name in VOCABULARY_TENSORS:  # one source: mergekit's rows
                    tensor = vocabulary.rebuild([tensor], [reader.path], base_model)[0]
                if scale is not None:
                    tensor = tensor * scale
                if store_dtype is not None and tensor.dtype != store_dtype:
                    tensor = tensor.to(store_dtype)
            yield out_name, tensor

    card_recipe = recipe or _recipe(slices, dtype, out_dtype)
    with checkpoint.output_directory(dst, force=force, expected_bytes=expected, tool="depth_upscale") as tmp:
        source = str(config_reader.path / "config.json")
        checkpoint.write_hf_files(
            tmp, written(), config, config_source=source, side_files_from=side_files_from, max_shard_size=max_shard_size
        )
        if vocabulary is not None:
            vocabulary.write(tmp)  # the union's tokenizer.json, over the copied one
        write_card(
            tmp,
            name=Path(dst).name,
            method="passthrough (depth up-scaling)",
            models=[s.source for s in slices],
            base_model=Path(base_model) if base_model is not None else None,
            recipe=card_recipe,
        )
    seconds = time.perf_counter() - start_time
    logger.info(
        "depth_upscale: %d -> %d layers, %.2f GB in %.1f s",
        first.config["num_hidden_layers"],
        new_layer,
        expected / 1e9,
        seconds,
    )
    return UpscaleReport(Path(dst), new_layer, expected, seconds)


def _recipe(slices: Sequence[Slice], dtype, out_dtype) -> str:
    """The mergekit passthrough YAML of a slice plan (for the model card)."""
    import yaml

    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(s.source), "layer_range": [s.start, s.end]}]} for s in slices],
    }
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None:
            recipe[key] = str(value).replace("torch.", "")
    return yaml.safe_dump(recipe, sort_keys=False).rstrip()


def upscale_from_yaml(config_path: PathLike, dst: PathLike, **kwargs) -> UpscaleReport:
    """``depth_upscale`` with the plan of a mergekit passthrough YAML; ``dtype``/``out_dtype``
    given here override the file's."""
    slices, recipe_kwargs = _passthrough_recipe(config_path)
    for key, value in recipe_kwargs.items():
        if kwargs.get(key) is None:
            kwargs[key] = value
    return depth_upscale(None, dst, slices=slices, **kwargs)
