"""``merge``: one registered method applied tensor by tensor to whole checkpoints, streamed.

Plan first, then write. Every argument, every source's tensor names and shapes (safetensors headers
only) and every parameter's value for every tensor and model are checked before anything is
written. The merge then reads one tensor name from every source (``CheckpointReader.get``),
combines them and hands the result to ``ShardWriter``, which holds at most one output shard
(``max_shard_size``) in memory: peak memory is about one shard plus a few copies of the largest
tensor per source; a whole model is never loaded. The output is built in a temporary directory
beside ``dst`` and renamed into place when complete (``checkpoint.output_directory``).

Dtypes, as mergekit: ``dtype`` is the dtype every source tensor is cast to on reading and the
method computes in (None: the sources' dtypes promoted, so bf16 with fp32 is fp32); the output is stored in ``out_dtype``, else in the
computed dtype. ``compute_dtype`` (ours, not mergekit's) overrides the dtype of the math only, e.g.
``compute_dtype="float32"`` with ``dtype="bfloat16"``: exact fp32 math on the un-rounded sources,
stored in bf16. Non-float tensors are copied from the reference model (the base model, else the
first), which also gives config.json (with ``num_hidden_layers`` unchanged and the output dtype),
the tokenizer and generation files; its ``auto_map`` (remote code) is never copied. A README.md
model card with the recipe is written beside the weights, as mergekit does.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..checkpoint import (
    LAYER_NAME,
    CheckpointError,
    CheckpointReader,
    PathLike,
    check_destination,
    output_directory,
    parse_dtype,
    parse_size,
    set_config_dtype,
    write_hf_files,
)
from . import linear, model_stock, nuslerp, slerp, task_arithmetic  # noqa: F401  (each registers its methods)
from .card import write_card
from .registry import REQUIRED, MergeMethod, get_method
from .settings import check_parameters, resolve
from .tokenizer import VOCABULARY_TENSORS, TokenizerPlan, plan_tokenizer, token_source_yaml

logger = logging.getLogger(__name__)

# config.json fields two models must share to be merged without --allow-crimes.
ARCHITECTURE_KEYS = ("model_type", "architectures")


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's t for a tensor: i / (n - 1) for a tensor of decoder layer i of n (1 when n == 1),
    0 for tensors outside the layers."""
    match = LAYER_NAME.match(name)
    if not match:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def check_architectures(readers: Sequence[CheckpointReader], allow_crimes: bool) -> None:
    """Refuses checkpoints of different architectures (Llama with Mistral) unless ``allow_crimes``."""
    first = readers[0]
    for reader in readers[1:]:
        for key in ARCHITECTURE_KEYS:
            if reader.config.get(key) != first.config.get(key):
                message = (
                    f"models of different architectures: {key} {first.config.get(key)!r} in {first.path} vs "
                    f"{reader.config.get(key)!r} in {reader.path}"
                )
                if not allow_crimes:
                    raise ValueError(
                        f"{message}; pass allow_crimes=True / --allow-crimes to merge them anyway "
                        f"(as mergekit's --allow-crimes)"
                    )
                logger.warning("%s (allowed: allow_crimes)", message)
                return


def _check_same_tensors(
    reference: CheckpointReader, others: Sequence[CheckpointReader], any_rows: Sequence[str] = ()
) -> None:
    """Every source has the reference's tensor names, shapes (any row count for the tensors in
    ``any_rows``) and float-ness (headers only)."""
    names = reference.names()
    for reader in others:
        if reader is reference:
            continue
        for name in names:
            if name not in reader:
                raise CheckpointError(f"model {reader.path} has no tensor {name!r}, which {reference.path} has")
            if (
                reader.shape(name) != reference.shape(name)
                if name not in any_rows
                else tuple(reader.shape(name))[1:] != tuple(reference.shape(name))[1:]
            ):
                raise CheckpointError(
                    f"model {reader.path}: tensor {name!r} has shape {list(reader.shape(name))}, "
                    f"expected {list(reference.shape(name))} as in {reference.path}"
                )
            if reader.dtype(name).is_floating_point != reference.dtype(name).is_floating_point:
                raise CheckpointError(
                    f"model {reader.path}: tensor {name!r} has dtype {reader.dtype(name)}, "
                    f"{reference.path} has {reference.dtype(name)} (float and non-float cannot be merged)"
                )
        extra = [name for name in reader.names() if name not in reference]
        if extra:
            raise CheckpointError(
                f"model {reader.path} has tensor {extra[0]!r}, which {reference.path} lacks ({len(extra)} such tensors)"
            )


def _check_levels(method: MergeMethod, parameters, slice_parameters, model_parameters, count: int):
    """Checked settings: (top-level dict, slice dict, one dict per model)."""
    global_names = method.parameter_names() + method.tensor_parameter_names()
    top = check_parameters("parameters", parameters, global_names, method.name)
    in_slice = check_parameters("slice parameters", slice_parameters, global_names, method.name)
    if model_parameters is None:
        model_parameters = [None] * count
    if isinstance(model_parameters, Mapping) or len(model_parameters) != count:
        raise ValueError(
            f"model_parameters must be one mapping (or None) per model ({count}), got {model_parameters!r}"
        )
    per_model = [
        check_parameters(f"models[{i}] parameters", level, method.tensor_parameter_names(), method.name)
        for i, level in enumerate(model_parameters)
    ]
    return top, in_slice, per_model


def _legacy_parameters(method: MergeMethod, count: int, weights, t, density, normalize, lambda_):
    """merge()'s keyword arguments as a top-level dict and per-model dicts (only those given)."""
    top: dict = {}
    per_model: list[dict] = [{} for _ in range(count)]
    given = {
        "weights": weights is not None,
        "t": t is not None,
        "density": density is not None,
        "normalize": normalize is not None,
        "lambda_": lambda_ is not None,
    }
    owner = {"weights": "weight", "t": "t", "density": "density", "normalize": "normalize", "lambda_": "lambda"}
    names = method.parameter_names() + method.tensor_parameter_names()
    for argument, is_given in given.items():
        if is_given and owner[argument] not in names:
            raise ValueError(f"{argument} does not apply to {method.name}; its parameters are {', '.join(names)}")
    for argument, key in (("weights", "weight"), ("density", "density")):
        value = {"weights": weights, "density": density}[argument]
        if value is None:
            continue
        if isinstance(value, (list, tuple)):  # one value per model (gradients go in parameters=)
            if len(value) != count:
                raise ValueError(f"{argument} must have one value per model ({count}), got {value!r}")
            for entry, v in zip(per_model, value):
                entry[key] = v
        elif argument == "weights":
            raise ValueError(f"weights must be a list with one value per model ({count}), got {weights!r}")
        else:
            top[key] = value
    for key, value in (("t", t), ("normalize", normalize), ("lambda", lambda_)):
        if value is not None:
            top[key] = value
    return top, per_model


def merge(
    models: Sequence[PathLike],
    dst: PathLike,
    *,
    method: str,
    weights: Sequence | None = None,
    t=None,
    base_model: PathLike | None = None,
    density=None,
    normalize: bool | None = None,
    lambda_: float | None = None,
    parameters: Mapping | None = None,
    slice_parameters: Mapping | None = None,
    model_parameters: Sequence[Mapping | None] | None = None,
    dtype: str | torch.dtype | None = None,
    out_dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype | None = None,
    seed: int = 0,
    allow_crimes: bool = False,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    progress: bool = False,
    tokenizer_source: str | os.PathLike | None = None,
    pad_to_multiple_of: int | None = None,
    tokens: Mapping | None = None,
    recipe: str | None = None,
) -> Path:
    """Merges the checkpoint directories ``models`` into a new checkpoint directory ``dst``.

    ``method``: a registered method (``solar_kernels.merge.METHODS``: linear, slerp, nuslerp,
    task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
    della_linear, model_stock). Its parameters come from ``parameters`` (one setting for all models: a number,
    a gradient over layers or filters, see ``settings``), ``slice_parameters`` (the same, asked
    first) and ``model_parameters`` (one mapping per model, asked before both), or from the
    shorthands ``weights`` (one per model), ``density`` (one, or one per model), ``t``,
    ``normalize`` and ``lambda_``. A ``base_model`` listed in ``models`` is the base, not a merged
    model (as in mergekit). ``seed`` seeds the random masks of dare/della: ``seed=S`` draws them as
    ``mergekit-yaml --random-seed S`` does on the CPU. ``allow_crimes`` allows
    models whose architectures differ. ``tokenizer_source`` (mergekit's: "base", "union" or a model
    directory) gives the output vocabulary, every model's embedding and LM-head rows rebuilt in it
    before the merge, as mergekit does (``tokenizer.py``; ``pad_to_multiple_of`` pads it, as
    mergekit's ``tokenizer:`` block, and so does ``tokens``, its ``tokens:``: token ->
    ``tokenizer.TokenSource``). ``recipe`` is the text put in the model card (default: one
    generated from the arguments). Returns ``dst``.
    """
    spec = get_method(method)
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Sequence) or len(models) == 0:
        raise ValueError(f"models must be a non-empty list of checkpoint directories, got {models!r}")
    models = [Path(m) for m in models]
    resolved = [m.resolve() for m in models]
    for i, model in enumerate(resolved):
        if model in resolved[:i]:
            logger.warning(
                "model %s is listed twice: each entry is merged as a model of its own (mergekit keeps "
                "one entry per model)",
                models[i],
            )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if base_model is not None:
        base_model = Path(base_model)
        if spec.base_model == "none":
            raise ValueError(
                f"base_model does not apply to {method} merges (every listed model is merged), got {str(base_model)!r}"
            )
    elif spec.base_model == "required":
        raise ValueError(f"method {method!r} needs base_model (the model the task vectors are taken from), got None")

    # The base listed among the models is the base (mergekit); per-model values given for it are dropped.
    shorthand_count = len(models)
    if model_parameters is not None and (isinstance(model_parameters, Mapping) or len(model_parameters) != len(models)):
        raise ValueError(
            f"model_parameters must be one mapping (or None) per model ({len(models)}), got {model_parameters!r}"
        )
    legacy_top, legacy_per_model = _legacy_parameters(spec, shorthand_count, weights, t, density, normalize, lambda_)
    model_levels = list(model_parameters) if model_parameters is not None else [None] * len(models)
    model_levels = [
        {**(legacy or {}), **(given or {})} or None for legacy, given in zip(legacy_per_model, model_levels)
    ]
    if base_model is None and spec.base_model == "first":
        base_model = models[0]  # slerp: the first model is the t = 0 end
        models, model_levels = models[1:], model_levels[1:]
    elif base_model is not None:
        keep = [i for i, m in enumerate(models) if m.resolve() != base_model.resolve()]
        models, model_levels = [models[i] for i in keep], [model_levels[i] for i in keep]
    count = len(models)
    if count < spec.min_models or (spec.max_models is not None and count > spec.max_models):
        wanted = f"exactly {spec.min_models}" if spec.min_models == spec.max_models else f"{spec.min_models} or more"
        besides = f" besides the base model {base_model}" if base_model is not None else ""
        raise ValueError(f"{method} merges {wanted} model(s){besides}, got {count}: {[str(m) for m in models]}")
    top, in_slice, per_model = _check_levels(
        spec, {**legacy_top, **(parameters or {})}, slice_parameters, model_levels, count
    )

    load_dtype = parse_dtype(dtype)
    store_dtype = parse_dtype(out_dtype)
    math_dtype = parse_dtype(compute_dtype) or load_dtype
    parse_size(max_shard_size)
    dst = Path(dst)
    sources = models + ([base_model] if base_model is not None else [])
    check_destination(dst, sources)

    readers = [CheckpointReader(m) for m in models]
    base = CheckpointReader(base_model) if base_model is not None else None
    reference = base if base is not None else readers[0]
    every_reader = [*readers, *([base] if base is not None else [])]
    check_architectures([reference, *readers], allow_crimes)
    for option, value in (("pad_to_multiple_of", pad_to_multiple_of), ("tokens", tokens)):
        if value is not None and tokenizer_source is None:
            raise ValueError(
                f"{option} applies with tokenizer_source only, got {option} {value!r} and no tokenizer_source"
            )
    vocabulary_names = [n for n in VOCABULARY_TENSORS if n in reference] if tokenizer_source is not None else []
    _check_same_tensors(reference, readers, vocabulary_names)
    names = reference.names()
    num_layers = reference.config.get("num_hidden_layers") or 1
    side_files_from = reference.path
    vocabulary: TokenizerPlan | None = None
    if tokenizer_source is not None:
        vocabulary = tokenizer_plan(
            "tokenizer_source", tokenizer_source, every_reader, base_model, pad_to_multiple_of, tokens
        )
        vocabulary.row_sources([r.path for r in every_reader], base_model)  # tokens: rules checked now
        side_files_from = vocabulary.donor

    # Every parameter's value for every tensor and model, checked before anything is written.
    plan: dict[str, tuple[dict, list[dict]]] = {}
    for name in names:
        if not reference.dtype(name).is_floating_point:
            continue
        position = layer_position(name, num_layers)
        values = {}
        for p in spec.parameters:
            value = resolve(p.name, (in_slice, top), name, position, p.default)
            if value is REQUIRED:
                raise ValueError(
                    f"{method} needs parameter {p.name} for tensor {name} (give parameters: {{{p.name}: ...}})"
                )
            values[p.name] = p.check(f"tensor {name}", value)
        model_values = []
        for i, own in enumerate(per_model):
            entry = {}
            for p in spec.tensor_parameters:
                value = resolve(p.name, (own, in_slice, top), name, position, p.default)
                if value is REQUIRED:
                    raise ValueError(f"{method} needs parameter {p.name} for model {models[i]}, tensor {name}")
                entry[p.name] = p.check(f"model {models[i]}, tensor {name}", value)
            model_values.append(entry)
        if spec.name == "linear" and values["normalize"] and sum(e["weight"] for e in model_values) == 0:
            raise ValueError(
                f"linear: the weights of tensor {name} sum to 0, which normalize: true divides by; "
                f"got {[e['weight'] for e in model_values]}"
            )
        plan[name] = (values, model_values)

    def stored_dtype(name: str, computed: torch.dtype) -> torch.dtype:
        return store_dtype if store_dtype is not None and computed.is_floating_point else computed

    def out_shape(name: str) -> tuple[int, ...]:
        shape = tuple(reference.shape(name))
        return (vocabulary.rows, *shape[1:]) if name in vocabulary_names else shape

    def computed_dtype(name: str) -> torch.dtype:
        """dtype, else (as mergekit) the sources' dtypes promoted: bf16 with fp32 is fp32."""
        if not reference.dtype(name).is_floating_point:
            return reference.dtype(name)
        if load_dtype is not None:
            return load_dtype
        promoted = reference.dtype(name)
        for reader in every_reader:
            promoted = torch.promote_types(promoted, reader.dtype(name))
        return promoted

    expected_bytes = sum(math.prod(out_shape(n)) * stored_dtype(n, computed_dtype(n)).itemsize for n in names)
    config = dict(reference.config)
    if store_dtype or load_dtype:
        set_config_dtype(config, store_dtype or load_dtype)
    if vocabulary is not None:
        config["vocab_size"] = vocabulary.rows
    logger.info(
        "%s merge of %s%s into %s (%d tensors, %.2f GB)",
        method,
        ", ".join(map(str, models)),
        f" on base {base_model}" if base is not None else "",
        dst,
        len(names),
        expected_bytes / 1e9,
    )

    def merged_tensor(name: str) -> torch.Tensor:
        if not reference.dtype(name).is_floating_point:
            return reference.get(name)
        values, model_values = plan[name]

        # mergekit rounds the sources to dtype (else to their promoted dtype) first; an explicit
        # compute_dtype reads them unrounded.
        target = math_dtype or computed_dtype(name)

        def load(reader: CheckpointReader) -> torch.Tensor:
            tensor = reader.get(name)
            return tensor if tensor.dtype == target else tensor.to(target)

        tensors = [load(reader) for reader in readers]
        base_tensor = load(base) if base is not None else None
        if name in vocabulary_names:  # rows in the output vocabulary, as mergekit (base last, as it lists it)
            rebuilt = vocabulary.rebuild(
                [*tensors, *([base_tensor] if base is not None else [])], [r.path for r in every_reader], base_model
            )
            tensors, base_tensor = rebuilt[: len(tensors)], (rebuilt[-1] if base is not None else None)
        merged = spec.combine(base_tensor, tensors, values, model_values, generator)
        return merged.to(stored_dtype(name, computed_dtype(name)))

    # Random masks as mergekit --random-seed draws them: one generator, tensors in sorted name order.
    generator = torch.Generator().manual_seed(seed) if spec.random else None
    iterator = sorted(names) if spec.random else names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"{method} merge", unit="tensor")
    card_recipe = recipe or _recipe(
        method,
        models,
        base_model,
        top,
        per_model,
        dtype=dtype,
        out_dtype=out_dtype,
        compute_dtype=compute_dtype,
        tokenizer_source=tokenizer_source,
        pad_to_multiple_of=pad_to_multiple_of,
        tokens=tokens,
    )
    with output_directory(dst, force=force, expected_bytes=expected_bytes, tool="merge") as tmp:
        tensors = ((name, merged_tensor(name)) for name in iterator)
        source = str(reference.path / "config.json")
        copied = write_hf_files(
            tmp, tensors, config, config_source=source, side_files_from=side_files_from, max_shard_size=max_shard_size
        )
        if vocabulary is not None:
            vocabulary.write(tmp)
        write_card(tmp, name=dst.name, method=method, models=models, base_model=base_model, recipe=card_recipe)
    logger.info("wrote %s: config.json, README.md%s", dst, "".join(f", {name}" for name in copied))
    return dst


def tokenizer_plan(
    where: str,
    tokenizer_source,
    readers: Sequence[CheckpointReader],
    base_model: PathLike | None,
    pad_to_multiple_of: int | None,
    tokens: Mapping | None = None,
) -> TokenizerPlan:
    """``tokenizer.plan_tokenizer`` for checkpoints (their config vocab_size and embedding rows)."""
    embedding = VOCABULARY_TENSORS[0]
    sizes = {r.path.resolve(): r.config.get("vocab_size") for r in readers}
    rows = {r.path.resolve(): (r.shape(embedding)[0] if embedding in r else None) for r in readers}
    for reader in readers:
        for name in VOCABULARY_TENSORS[1:]:
            if name in reader and embedding in reader and reader.shape(name)[0] != reader.shape(embedding)[0]:
                raise ValueError(
                    f"{where}: {reader.path}: {name} has {reader.shape(name)[0]} rows but {embedding} "
                    f"{reader.shape(embedding)[0]}; expected one row per token in both"
                )
    models = [r.path for r in readers if base_model is None or r.path.resolve() != Path(base_model).resolve()]
    return plan_tokenizer(
        where,
        tokenizer_source,
        models,
        Path(base_model) if base_model is not None else None,
        sizes,
        rows,
        pad_to_multiple_of,
        dict(tokens) if tokens is not None else None,
    )


def _recipe(method, models, base_model, top, per_model, *, pad_to_multiple_of=None, tokens=None, **options) -> str:
    """A mergekit-style YAML recipe for a merge given as arguments; each of ``options`` (dtype,
    out_dtype, compute_dtype, tokenizer_source) that is not None is written under its name, in the
    order given."""
    import yaml

    def plain(value):
        return (
            [dict(filter=f, value=v) if f is not None else dict(value=v) for f, v in value]
            if isinstance(value, tuple)
            else value
        )

    recipe: dict = {"merge_method": method}
    if base_model is not None:
        recipe["base_model"] = str(base_model)
    recipe["models"] = [
        {"model": str(m), **({"parameters": {k: plain(v) for k, v in p.items()}} if p else {})}
        for m, p in zip(models, per_model)
    ]
    if top:
        recipe["parameters"] = {k: plain(v) for k, v in top.items()}
    for key, value in options.items():
        if value is not None:
            recipe[key] = str(value).replace("torch.", "")
    if pad_to_multiple_of is not None or tokens:  # mergekit's tokenizer: block instead of tokenizer_source
        block: dict = {"source": recipe.pop("tokenizer_source")}
        if pad_to_multiple_of is not None:
            block["pad_to_multiple_of"] = pad_to_multiple_of
        if tokens:
            block["tokens"] = {token: token_source_yaml(rule) for token, rule in tokens.items()}
        recipe["tokenizer"] = block
    return yaml.safe_dump(recipe, sort_keys=False).rstrip()
