"""Model merging of Hugging Face Llama/Mistral checkpoints, mergekit-compatible (docs/method.md#merging).

SOLAR-10.7B-Instruct was released as Average(0.5, 0.5) of two fine-tunes; the paper also reports
Average(0.6, 0.4) and SLERP. The methods, each in its own module and registered with its
parameters and defaults (``registry.METHODS``):

- ``linear.py``: linear (weighted average);
- ``slerp.py``: slerp (two models, factor t);
- ``nuslerp.py``: nuslerp (two models or their task vectors, t from their weights);
- ``task_arithmetic.py``: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
  breadcrumbs_ties, della, della_linear (task vectors relative to a base model);
- ``model_stock.py``: model_stock (base and average, by the task vectors' agreement).

A new method is one module that calls ``registry.register`` and is imported by ``core``.

Parameters may be numbers, gradients over layers or filters on tensor names (``settings.py``), as
in mergekit's YAML (``config.py``). ``core.merge`` streams a merge to disk; ``merge_from_yaml`` runs
a YAML file. With the same YAML, results equal mergekit 0.1.5's bit for bit on the CPU; for
dare/della, ``seed=S`` (``--random-seed S``, default 0) matches ``mergekit-yaml --random-seed S``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .config import Recipe, read_recipe
from .core import merge
from .linear import linear_merge
from .registry import METHODS, MergeMethod, Parameter, get_method, register
from .slerp import SLERP_DOT_THRESHOLD, slerp
from .task_arithmetic import ties_merge

__all__ = [
    "METHODS",
    "MergeMethod",
    "Parameter",
    "SLERP_DOT_THRESHOLD",
    "get_method",
    "linear_merge",
    "merge",
    "merge_from_yaml",
    "merge_kwargs",
    "register",
    "slerp",
    "ties_merge",
]

logger = logging.getLogger(__name__)


def merge_kwargs(recipe: Recipe) -> dict:
    """merge()'s keyword arguments for a parsed YAML (all but dst and the output options)."""
    where = recipe.path
    if recipe.merge_method == "passthrough":
        raise ValueError(
            f"{where}: merge_method 'passthrough' stacks layers, which is depth up-scaling here: "
            f"run `solar upscale --config {where}`"
        )
    get_method(recipe.merge_method)
    slice_parameters = None
    if recipe.models is not None:
        sources = recipe.models
    else:
        if len(recipe.slices) != 1:
            raise ValueError(
                f"{where}: slices: only one slice spanning all layers (a whole-model merge) is supported "
                f"for {recipe.merge_method}, got {len(recipe.slices)} slices; to stack layers use "
                f"merge_method: passthrough with `solar upscale --config`"
            )
        sources, slice_parameters = recipe.slices[0].sources, recipe.slices[0].parameters
        from ..checkpoint import CheckpointReader

        for i, source in enumerate(sources):
            layers = CheckpointReader(source.model).config.get("num_hidden_layers")
            if list(source.layer_range) != [0, layers]:
                raise ValueError(
                    f"{where}: slices[0].sources[{i}]: layer_range {list(source.layer_range)} is not "
                    f"supported: only whole-model merges are, i.e. [0, {layers}] for {source.model} "
                    f"({layers} layers)"
                )
    return dict(
        models=[s.model for s in sources],
        method=recipe.merge_method,
        base_model=recipe.base_model,
        parameters=recipe.parameters,
        slice_parameters=slice_parameters,
        model_parameters=[s.parameters for s in sources],
        dtype=recipe.dtype,
        out_dtype=recipe.out_dtype,
        compute_dtype=recipe.compute_dtype,
        tokenizer_source=recipe.tokenizer_source,
        pad_to_multiple_of=recipe.pad_to_multiple_of,
        tokens=recipe.tokens,
        recipe=recipe.text,
    )


def merge_from_yaml(
    config_path: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    force: bool = False,
    max_shard_size: int | str = "5GB",
    progress: bool = False,
    dtype: str | torch.dtype | None = None,
    out_dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype | None = None,
    seed: int = 0,
    allow_crimes: bool = False,
) -> Path:
    """Runs the merge a mergekit YAML file describes (see ``config.py``); ``dtype``, ``out_dtype``
    and ``compute_dtype`` given here override the file's."""
    recipe = read_recipe(config_path)
    kwargs = merge_kwargs(recipe)
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype), ("compute_dtype", compute_dtype)):
        if value is not None:
            if kwargs[key] is not None and str(kwargs[key]) != str(value):
                logger.info("%s %s (given) overrides %s from %s", key, value, kwargs[key], recipe.path)
            kwargs[key] = value
    return merge(
        dst=dst,
        force=force,
        max_shard_size=max_shard_size,
        progress=progress,
        seed=seed,
        allow_crimes=allow_crimes,
        **kwargs,
    )
