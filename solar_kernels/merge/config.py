"""mergekit's merge YAML, read once for ``solar merge --config`` and ``solar upscale --config``.

One merge per file. Every key is either implemented or refused with a one-line error naming it;
nothing is ignored. Model paths are local checkpoint directories, resolved as mergekit does:
relative to the working directory (a relative path that exists only beside the YAML file is taken
from there, with a warning: mergekit would stop). Accepted::

    merge_method: ties               # any registered method, or passthrough (up-scaling)
    base_model: ./base
    models:                          # or slices: (below)
      - model: ./a
        parameters: {weight: 0.5, density: [0.2, 0.8]}
    slices:
      - sources:
          - {model: ./a, layer_range: [0, 32], parameters: {...}}
        parameters: {...}            # the slice's parameters
    parameters:                      # numbers, gradients or filters (see settings.py)
      t:
        - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
        - {value: 0.5}
    dtype: bfloat16                  # the dtype the sources are read in and the math runs in
    out_dtype: float16               # the stored dtype (default: dtype)
    compute_dtype: float32           # ours, not mergekit's: the math's dtype only

    tokenizer_source: union          # base, union or a model path: the output vocabulary, embedding
                                     # and LM-head rows rebuilt in it (see tokenizer.py)
    tokenizer:                       # instead of tokenizer_source (mergekit's block)
      source: union                  # the default, as mergekit
      pad_to_multiple_of: 32
      tokens:                        # rows for these tokens (added to the vocabulary if new)
        <|im_start|>: {source: ./a}  # ./a's row; or {kind: zero}; or {kind: model_token, model: ./a,
        <pad>: {source: {kind: zero}, force: true}   # token: "<s>"} (token_id: N); force: every model

Refused (mergekit has them, this package does not): ``modules``, ``chat_template``, a slice's ``base_model`` and
``residual_weight``, Hub model names and LoRA references (``model+lora``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TOP_KEYS = (
    "merge_method",
    "models",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "compute_dtype",
    "tokenizer_source",
    "tokenizer",
)
TOKENIZER_KEYS = ("source", "pad_to_multiple_of", "tokens")
# mergekit keys this package does not implement, and what to do instead.
REFUSED_KEYS = {
    "modules": "per-module merges are not supported; use models: or slices:",
    "chat_template": "the chat template is copied from the base (else first) model; edit tokenizer_config.json after",
}
SLICE_KEYS = ("sources", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODEL_KEYS = ("model", "parameters")
SLICE_REFUSED = {
    "base_model": "a per-slice base_model is not supported; give base_model at the top level",
    "residual_weight": "residual_weight is not supported",
}


@dataclass
class Source:
    """One input: a model, its layer range (None: all layers) and its own parameters."""

    model: Path
    layer_range: tuple[int, int] | None = None
    parameters: dict | None = None


@dataclass
class LayerSlice:
    sources: list[Source]
    parameters: dict | None = None


@dataclass
class Recipe:
    """A parsed merge YAML; ``text`` is the file as written (it goes into the model card)."""

    path: Path
    text: str
    merge_method: str
    models: list[Source] | None = None
    slices: list[LayerSlice] | None = None
    base_model: Path | None = None
    parameters: dict | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    compute_dtype: str | None = None
    tokenizer_source: str | Path | None = None
    pad_to_multiple_of: int | None = None
    tokens: dict | None = None


def _keys(where: str, data, allowed: tuple[str, ...], refused: dict[str, str] | None = None) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping with some of {', '.join(allowed)}, got {data!r}")
    for key in data:
        if refused and key in refused:
            raise ValueError(f"{where}: key {key!r} is not supported: {refused[key]}")
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}; expected some of {', '.join(allowed)}")
    return data


def _entries(
    path: Path, data: dict, key: str, allowed: tuple[str, ...], refused: dict[str, str] | None = None
) -> Iterator[tuple[str, dict]]:
    """(where, entry) for each entry of the list ``data[key]``, each entry's keys checked as it is
    reached (so the errors come in the file's order)."""
    entries = data[key]
    if not isinstance(entries, list):
        raise ValueError(f"{path}: {key} must be a list, got {entries!r}")
    for i, entry in enumerate(entries):
        where = f"{path}: {key}[{i}]"
        yield where, _keys(where, entry, allowed, refused)


def resolve_model(where: str, model, yaml_directory: Path | None = None) -> Path:
    """A local checkpoint directory, relative paths against the working directory (as mergekit);
    a relative path found only beside the YAML file (this package's earlier rule, where mergekit
    would fail) is used with a warning."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"{where}: a model must be a checkpoint directory path, got {model!r}")
    if "+" in model and not Path(model).expanduser().is_dir():
        raise ValueError(
            f"{where}: model {model!r}: LoRA references (model+lora) are not supported; merge the "
            f"adapter into the model first"
        )
    resolved = Path(model).expanduser()
    beside = yaml_directory / resolved if yaml_directory is not None and not resolved.is_absolute() else None
    if not resolved.is_dir() and beside is not None and beside.is_dir():
        logger.warning(
            "%s: model %r is not in the working directory; using %s beside the YAML file (mergekit "
            "reads relative paths from the working directory only)",
            where,
            model,
            beside,
        )
        return beside
    if not resolved.is_dir():
        raise ValueError(
            f"{where}: model {model!r} resolves to {resolved.absolute()}, which is not a directory "
            f"(relative paths are taken from the working directory, as mergekit does); only local "
            f"checkpoint directories are read (download Hub models first, e.g. "
            f"`huggingface-cli download {model} --local-dir DIR`)"
        )
    return resolved


def _parameters(where: str, value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: parameters must be a mapping, got {value!r}")
    return dict(value)


def _dtype(where: str, value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: expected a dtype name such as bfloat16, got {value!r}")
    return value


def read_recipe(config_path) -> Recipe:
    """Parses and checks a merge YAML (keys and paths; parameter values are checked by the merge)."""
    import yaml

    path = Path(config_path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read the merge YAML (one document, one merge per file): {error}") from None
    data = _keys(str(path), data, TOP_KEYS, REFUSED_KEYS)
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise ValueError(f"{path}: merge_method must name a merge method, got {method!r}")
    recipe = Recipe(
        path=path,
        text=text,
        merge_method=method,
        parameters=_parameters(f"{path}: parameters", data.get("parameters")),
        dtype=_dtype(f"{path}: dtype", data.get("dtype")),
        out_dtype=_dtype(f"{path}: out_dtype", data.get("out_dtype")),
        compute_dtype=_dtype(f"{path}: compute_dtype", data.get("compute_dtype")),
    )
    source = data.get("tokenizer_source")
    if data.get("tokenizer") is not None:
        if source is not None:
            raise ValueError(f"{path}: give tokenizer_source or a tokenizer: block, not both (as mergekit)")
        block = _keys(f"{path}: tokenizer", data["tokenizer"], TOKENIZER_KEYS)
        source = block.get("source", "union")
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise ValueError(f"{path}: tokenizer: pad_to_multiple_of must be a positive integer, got {pad!r}")
        recipe.pad_to_multiple_of = pad
        if block.get("tokens") is not None:
            from .tokenizer import parse_tokens

            recipe.tokens = parse_tokens(
                f"{path}: tokenizer: tokens",
                block["tokens"],
                lambda where, model: resolve_model(where, model, path.parent),
            )
    if source is not None:
        recipe.tokenizer_source = (
            source if source in ("base", "union") else resolve_model(f"{path}: tokenizer_source", source, path.parent)
        )
    if data.get("base_model") is not None:
        recipe.base_model = resolve_model(f"{path}: base_model", data["base_model"], path.parent)
    if ("models" in data) == ("slices" in data) or not (data.get("models") or data.get("slices")):
        raise ValueError(
            f"{path}: give exactly one of models or slices (a non-empty list), got "
            f"{'both' if 'models' in data and 'slices' in data else 'neither'}"
        )
    if data.get("models"):
        recipe.models = [
            Source(
                resolve_model(where, entry.get("model"), path.parent),
                parameters=_parameters(where, entry.get("parameters")),
            )
            for where, entry in _entries(path, data, "models", MODEL_KEYS)
        ]
    else:
        recipe.slices = []
        for where, layer_slice in _entries(path, data, "slices", SLICE_KEYS, SLICE_REFUSED):
            sources = layer_slice.get("sources")
            if not isinstance(sources, list) or not sources:
                raise ValueError(f"{where}: sources must be a non-empty list, got {sources!r}")
            parsed = []
            for i, source in enumerate(sources):
                source_where = f"{where}.sources[{i}]"
                source = _keys(source_where, source, SOURCE_KEYS)
                layer_range = source.get("layer_range")
                if not (
                    isinstance(layer_range, list)
                    and len(layer_range) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
                ):
                    raise ValueError(f"{source_where}: layer_range must be [start, end], got {layer_range!r}")
                parsed.append(
                    Source(
                        resolve_model(source_where, source.get("model"), path.parent),
                        tuple(layer_range),
                        _parameters(source_where, source.get("parameters")),
                    )
                )
            recipe.slices.append(LayerSlice(parsed, _parameters(where, layer_slice.get("parameters"))))
    return recipe
