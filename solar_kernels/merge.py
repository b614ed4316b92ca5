"""Model merging of Hugging Face Llama/Mistral checkpoints: linear, SLERP and TIES (SPEC §6).

SOLAR-10.7B-Instruct was released as Average(0.5, 0.5) of two fine-tunes; the paper also reports
Average(0.6, 0.4) and SLERP. Every method below works tensor by tensor, in fp32, on tensors that
have the same name and shape in every source.

Math, for one tensor (theta_i the tensor of model i, w_i its weight, all computed in fp32):

- linear:  merged = sum_i w_i * theta_i / sum_i w_i        (normalize=True; default w_i = 1)
           merged = sum_i w_i * theta_i                     (normalize=False)
- slerp:   two models a, b and a factor t in [0, 1] (t=0 gives a, t=1 gives b). The tensor is one
           flat vector; the angle comes from the normalized vectors,
               cos(omega) = <a, b> / (|a| |b|),
           and the raw (un-normalized) vectors are interpolated, as mergekit does:
               merged = sin((1 - t) omega) / sin(omega) * a + sin(t omega) / sin(omega) * b.
           When the vectors are nearly (anti)parallel, |cos(omega)| > SLERP_DOT_THRESHOLD (0.9995,
           mergekit's value, so results match mergekit's), sin(omega) is too small to divide by
           and the result is the linear interpolation (1 - t) a + t b; the same happens when either
           vector has norm <= eps, where the angle is undefined.
- ties:    TIES-merging (Yadav et al. 2023), relative to a base model theta_base:
           1. task vectors tau_i = theta_i - theta_base;
           2. trim: keep the k_i = max(1, floor(density_i * numel)) entries of tau_i largest in
              magnitude, zero the rest;
           3. elect a sign per entry: s = sign(sum_i w_i tau_i) over the trimmed tau_i (+ where the
              sum is exactly 0, as mergekit);
           4. disjoint mean over the models that agree, i.e. whose w_i tau_i is nonzero with sign s:
                  merged = sum_i w_i tau_i [agree_i] / sum_i w_i [agree_i]    (normalize=True;
                  0 where no model agrees)
                  merged = sum_i w_i tau_i [agree_i]                          (normalize=False);
           5. result = theta_base + lambda_ * merged.
           The base model is not one of the averaged models unless it is also listed in ``models``.

Weights must be non-negative with a positive sum when ``normalize=True``; with ``normalize=False``
any finite weights are allowed (a negative weight subtracts a model). Non-float tensors, if a
checkpoint has any, are copied unchanged from the reference model.

The reference model (the first model; for ties and for slerp with a ``base_model``, the base model)
supplies config.json, the tokenizer and generation_config side files, the tensor order and, with
``dtype=None``, each output tensor's dtype. With a ``dtype``, every float tensor is cast to it and
config.json's ``dtype``/``torch_dtype`` is updated.

Streaming and memory: tensor names and shapes of every source are checked from the safetensors
headers before anything is written (no tensor data is read for that). The merge then reads one
tensor name from every source (``CheckpointReader.get``), combines the fp32 copies and hands the
result to ``ShardWriter``, which holds at most one output shard (``max_shard_size``) in memory. Peak
memory is about one shard plus, for the largest tensor, an fp32 copy per source (ties: about two per
source and three more); a whole model is never loaded. The output is a complete Hugging Face
directory built in a temporary directory beside ``dst`` and renamed into place only when complete
(``output_directory``); an existing ``dst`` is refused unless ``force=True``, and a ``dst`` that is,
is inside or contains a source is always refused. A merge takes two or more models. The reference
model's ``auto_map`` (remote code) is not copied.

mergekit-style YAML read by ``merge_from_yaml`` (one merge per file; relative model paths are
resolved against the YAML file's directory; models are local checkpoint directories)::

    models:                          # linear: per-model weight (default 1.0 each)
      - model: ./a
        parameters: {weight: 0.6}
      - model: ./b
        parameters: {weight: 0.4}
    merge_method: linear
    parameters: {normalize: true}    # default true
    dtype: bfloat16

    slices:                          # slerp: one slice whose two sources span all layers,
      - sources:                     # or a plain `models:` list of two
          - {model: ./a, layer_range: [0, 32]}
          - {model: ./b, layer_range: [0, 32]}
    merge_method: slerp
    base_model: ./a                  # optional; must be one of the two; it is the t = 0 end
    parameters: {t: 0.5}             # required
    dtype: bfloat16

    models:                          # ties: per-model weight (default 1.0) and density
      - model: ./base                #   (default 1.0); an entry equal to base_model
      - model: ./a                   #   without parameters is the base, not a merged model
        parameters: {density: 0.5, weight: 0.5}
      - model: ./b
        parameters: {density: 0.5, weight: 0.5}
    merge_method: ties
    base_model: ./base               # required
    parameters: {normalize: true, lambda: 1.0}   # defaults; weight/density here are defaults
    dtype: float16

Top-level keys: merge_method, models or slices, base_model, parameters, dtype, out_dtype (the output
dtype wins over dtype; the math is always fp32). ``int8_mask`` is accepted and ignored: it only
changes how mergekit stores its masks, not the result. Per-layer gradients and filters for a
parameter (``t: [0, 0.5, 1]``), partial ``layer_range`` slices and merge methods other than the
three above are rejected with a ValueError; ``passthrough`` (layer stacking) is depth up-scaling:
``solar upscale --config``.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import (
    CheckpointError,
    CheckpointReader,
    ShardWriter,
    check_destination,
    copy_side_files,
    output_directory,
    parse_dtype,
    parse_size,
    set_config_dtype,
    write_config,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

METHODS = ("linear", "slerp", "ties")
# Above this |cos(angle)| slerp falls back to linear interpolation: mergekit's DOT_THRESHOLD, so a
# merge here gives mergekit's result. (Fine-tunes of one base are often this close in some tensors.)
SLERP_DOT_THRESHOLD = 0.9995


# ----------------------------------------------------------------------------------------------
# Per-tensor math
# ----------------------------------------------------------------------------------------------


def _check_same_shapes(op: str, tensors: Sequence[torch.Tensor]) -> None:
    for i, tensor in enumerate(tensors[1:], start=1):
        if tensor.shape != tensors[0].shape:
            raise ValueError(
                f"{op}: tensor {i} has shape {list(tensor.shape)}, expected {list(tensors[0].shape)} (tensor 0)"
            )


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i * tensors[i] (divided by sum_i w_i when ``normalize``), in fp32, returned in
    the first tensor's dtype."""
    if len(tensors) == 0 or len(tensors) != len(weights):
        raise ValueError(f"linear_merge: expected one weight per tensor, got {len(weights)} weights "
                         f"for {len(tensors)} tensors")
    _check_same_shapes("linear_merge", tensors)
    weights = [float(w) for w in weights]
    total = sum(weights)
    if normalize and total == 0:
        raise ValueError(f"linear_merge: weights must not sum to 0 with normalize=True, got {weights}")
    merged = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for weight, tensor in zip(weights, tensors):
        merged.add_(tensor.float(), alpha=weight)
    if normalize:
        merged.div_(total)
    return merged.to(tensors[0].dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), each treated as one flat vector;
    linear interpolation when they are nearly parallel (see the module docstring). fp32 inside,
    returned in a's dtype."""
    _check_same_shapes("slerp", [a, b])
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"slerp: t must be in [0, 1], got {t!r}")
    a32, b32 = a.float(), b.float()
    norm_a, norm_b = a32.norm().item(), b32.norm().item()
    cos_omega = 1.0
    if norm_a > eps and norm_b > eps:
        dot = torch.dot(a32.flatten(), b32.flatten()).item()
        cos_omega = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cos_omega) > SLERP_DOT_THRESHOLD:
        merged = (1.0 - t) * a32 + t * b32
    else:
        omega = math.acos(cos_omega)
        sin_omega = math.sin(omega)
        merged = a32 * (math.sin((1.0 - t) * omega) / sin_omega) + b32 * (math.sin(t * omega) / sin_omega)
    return merged.to(a.dtype)


def _trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its k = max(1, floor(density * numel)) largest-magnitude entries
    zeroed. Exactly k are kept: among entries tied at the k-th largest magnitude (common in bf16
    weights) the earliest are kept."""
    numel = delta.numel()
    # + 1e-6 so that e.g. 0.57 * 100 = 56.99999999999999 keeps 57 entries, not 56.
    keep = max(1, int(density * numel + 1e-6))
    if keep >= numel:
        return delta
    flat = delta.flatten()
    magnitude = flat.abs()
    # kthvalue (a selection, no sort) is several times faster than topk for keep ~ numel / 2.
    threshold = magnitude.kthvalue(numel - keep + 1).values  # the keep-th largest magnitude
    kept = magnitude > threshold
    missing = keep - int(kept.sum())
    kept[(magnitude == threshold).nonzero().squeeze(1)[:missing]] = True
    return torch.where(kept, flat, 0.0).view_as(delta)


def ties_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: Union[float, Sequence[float]],
    normalize: bool = True,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """TIES-merging of ``tensors`` relative to ``base`` (trim to ``density``, elect sign, disjoint
    mean; see the module docstring). ``density`` is one value or one per tensor. fp32 inside,
    returned in base's dtype."""
    count = len(tensors)
    densities = [density] * count if isinstance(density, numbers.Real) else list(density)
    if count == 0 or len(weights) != count or len(densities) != count:
        raise ValueError(f"ties_merge: expected one weight and one density per tensor, got {count} tensors, "
                         f"{len(weights)} weights, {len(densities)} densities")
    _check_same_shapes("ties_merge", [base, *tensors])
    for d in densities:
        if not 0.0 < d <= 1.0:
            raise ValueError(f"ties_merge: density must be in (0, 1], got {d!r}")
    base32 = base.float()
    # w_i * trimmed tau_i, one fp32 tensor per model.
    contributions = [float(w) * _trim_to_density(tensor.float() - base32, d)
                     for tensor, w, d in zip(tensors, weights, densities)]
    elected = torch.where(sum(contributions) >= 0, 1.0, -1.0)
    merged = torch.zeros_like(base32)
    divisor = torch.zeros_like(base32)
    for contribution, weight in zip(contributions, weights):
        agree = torch.sign(contribution) == elected  # nonzero and of the elected sign
        merged += torch.where(agree, contribution, 0.0)
        divisor += agree * float(weight)
    if normalize:
        merged = torch.where(divisor != 0, merged / torch.where(divisor != 0, divisor, 1.0), 0.0)
    return (base32 + float(lambda_) * merged).to(base.dtype)


# ----------------------------------------------------------------------------------------------
# Whole checkpoints
# ----------------------------------------------------------------------------------------------


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_arguments(method, models, weights, t, base_model, density, normalize, lambda_):
    """Validates merge()'s arguments; returns (models, weights, densities, base_model, t), normalized
    (for slerp with a base_model, models reordered so the base comes first)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Sequence) or len(models) == 0:
        raise ValueError(f"models must be a non-empty list of checkpoint directories, got {models!r}")
    models = [Path(m) for m in models]
    count = len(models)
    if count < 2:
        raise ValueError(f"a merge needs two or more models, got {count}: {[str(m) for m in models]}")

    if method == "slerp":
        if count != 2:
            raise ValueError(f"slerp merges exactly 2 models, got {count}: {[str(m) for m in models]}")
        t = _number("t", t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must be in [0, 1] (0 gives the first model, 1 the second), got {t!r}")
        if weights is not None:
            raise ValueError(f"weights do not apply to slerp (it interpolates by t), got {weights!r}")
    elif t != 0.5:
        raise ValueError(f"t applies only to slerp, got t={t!r} with method {method!r}")

    if method == "ties":
        if base_model is None:
            raise ValueError("method 'ties' needs base_model (the model the task vectors are taken from), got None")
        densities = [density] * count if isinstance(density, numbers.Real) else density
        if isinstance(densities, (str, bytes)) or not isinstance(densities, Sequence) or len(densities) != count:
            raise ValueError(f"density must be one number or one per model ({count}), got {density!r}")
        densities = [_number("density", d) for d in densities]
        for d in densities:
            if not 0.0 < d <= 1.0:
                raise ValueError(f"density must be in (0, 1] (the fraction of each task vector kept), got {d!r}")
    else:
        densities = None
        if density != 1.0:
            raise ValueError(f"density applies only to ties, got density={density!r} with method {method!r}")
        if lambda_ != 1.0:
            raise ValueError(f"lambda_ applies only to ties, got lambda_={lambda_!r} with method {method!r}")
    _number("lambda_", lambda_)

    if base_model is not None:
        base_model = Path(base_model)
        if method == "linear":
            raise ValueError(f"base_model does not apply to linear merges (every listed model is averaged), "
                             f"got {str(base_model)!r}")
        if method == "slerp":
            resolved = [m.resolve() for m in models]
            if base_model.resolve() not in resolved:
                raise ValueError(f"slerp base_model must be one of the two models {[str(m) for m in models]}, "
                                 f"got {str(base_model)!r}")
            if resolved.index(base_model.resolve()) == 1:
                models = models[::-1]  # the base is the t = 0 end

    if method != "slerp":
        if weights is None:
            weights = [1.0] * count
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != count:
            raise ValueError(f"weights must have one number per model ({count}), got {weights!r}")
        weights = [_number(f"weights[{i}]", w) for i, w in enumerate(weights)]
        if normalize and any(w < 0 for w in weights):
            raise ValueError(f"weights must be non-negative with normalize=True, got {weights}")
        if normalize and sum(weights) == 0:
            raise ValueError(f"weights must not all be zero with normalize=True, got {weights}")
    return models, weights, densities, base_model, t


def _check_same_tensors(reference: CheckpointReader, others: Sequence[CheckpointReader]) -> None:
    """Every source has the reference's tensor names, shapes and float-ness (headers only)."""
    names = reference.names()
    for reader in others:
        if reader is reference:
            continue
        for name in names:
            if name not in reader:
                raise CheckpointError(f"model {reader.path} has no tensor {name!r}, which {reference.path} has")
            if reader.shape(name) != reference.shape(name):
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
            raise CheckpointError(f"model {reader.path} has tensor {extra[0]!r}, which {reference.path} lacks "
                                  f"({len(extra)} such tensors)")


def merge(
    models: Sequence[PathLike],
    dst: PathLike,
    *,
    method: str,
    weights: Optional[Sequence[float]] = None,
    t: float = 0.5,
    base_model: Optional[PathLike] = None,
    density: Union[float, Sequence[float]] = 1.0,
    normalize: bool = True,
    lambda_: float = 1.0,
    dtype: Optional[Union[str, torch.dtype]] = None,
    max_shard_size: Union[int, str] = "5GB",
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Merges the checkpoint directories ``models`` into a new checkpoint directory ``dst``.

    ``method``: "linear" (``weights``, ``normalize``), "slerp" (two models, ``t``; an optional
    ``base_model``, one of the two, is the t = 0 end) or "ties" (``base_model`` required,
    ``weights``, ``density`` (one or one per model), ``normalize``, ``lambda_``). ``dtype`` None
    keeps the reference model's tensor dtypes, else "bfloat16", "float16" or "float32". Every
    argument and every source's tensor names and shapes are checked before anything is written.
    Returns ``dst``.
    """
    models, weights, densities, base_model, t = _check_arguments(
        method, models, weights, t, base_model, density, normalize, lambda_)
    out_dtype = parse_dtype(dtype)
    parse_size(max_shard_size)
    dst = Path(dst)
    sources = models + ([base_model] if method == "ties" else [])
    check_destination(dst, sources)

    readers = [CheckpointReader(m) for m in models]
    base = CheckpointReader(base_model) if method == "ties" else None
    reference = base if base is not None else readers[0]
    _check_same_tensors(reference, readers)
    names = reference.names()

    def out_dtype_of(name: str) -> torch.dtype:
        source = reference.dtype(name)
        return out_dtype if out_dtype is not None and source.is_floating_point else source

    expected_bytes = sum(math.prod(reference.shape(n)) * out_dtype_of(n).itemsize for n in names)
    config = dict(reference.config)
    if out_dtype is not None:
        set_config_dtype(config, out_dtype)
    logger.info("%s merge of %s%s into %s (%d tensors, %.2f GB)", method, ", ".join(map(str, models)),
                f" on base {base_model}" if base is not None else "", dst, len(names), expected_bytes / 1e9)

    def merged_tensor(name: str) -> torch.Tensor:
        if not reference.dtype(name).is_floating_point:
            return reference.get(name)
        tensors = [reader.get(name).float() for reader in readers]
        if method == "linear":
            merged = linear_merge(tensors, weights, normalize)
        elif method == "slerp":
            merged = slerp(tensors[0], tensors[1], t)
        else:
            merged = ties_merge(base.get(name).float(), tensors, weights, densities, normalize, lambda_)
        return merged.to(out_dtype_of(name))

    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc=f"{method} merge", unit="tensor")
    with output_directory(dst, force=force, expected_bytes=expected_bytes, tool="merge") as tmp:
        writer = ShardWriter(tmp, max_shard_size)
        for name in names:
            writer.add(name, merged_tensor(name))
        shards = writer.finish()
        write_config(tmp, config, source=str(reference.path / "config.json"))
        copied = copy_side_files(reference.path, tmp)
    logger.info("wrote %s: %d shard(s), config.json%s", dst, len(shards),
                "".join(f", {name}" for name in copied))
    return dst


# ----------------------------------------------------------------------------------------------
# mergekit-style YAML
# ----------------------------------------------------------------------------------------------

_YAML_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype")
# Top-level `parameters` each method reads (weight/density there are defaults for every model).
_GLOBAL_PARAMETERS = {
    "linear": ("normalize", "weight"),
    "slerp": ("t",),
    "ties": ("normalize", "lambda", "weight", "density", "int8_mask"),
}
_MODEL_PARAMETERS = {"linear": ("weight",), "slerp": (), "ties": ("weight", "density")}


def _yaml_parameters(where: str, parameters, allowed: Tuple[str, ...], method: str) -> Dict[str, object]:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ValueError(f"{where}: parameters must be a mapping, got {parameters!r}")
    unknown = [key for key in parameters if key not in allowed]
    if unknown:
        raise ValueError(f"{where}: parameter {unknown[0]!r} does not apply to {method} here; expected some of "
                         f"{', '.join(allowed) or '(none)'}")
    for key, value in parameters.items():
        if isinstance(value, (list, dict)):
            raise ValueError(f"{where}: parameter {key}: {value!r}: per-layer gradients and filters are not "
                             f"supported; give one number for the whole model")
    return dict(parameters)


class _YamlConfig:
    """One parsed merge YAML file; ``kwargs()`` gives merge()'s arguments."""

    def __init__(self, data, path: Path):
        self.path = path
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with merge_method and models (or slices), "
                             f"got {type(data).__name__}")
        unknown = [key for key in data if key not in _YAML_KEYS]
        if unknown:
            raise ValueError(f"{path}: unknown top-level key {unknown[0]!r}; expected some of {', '.join(_YAML_KEYS)}")
        method = data.get("merge_method")
        if method == "passthrough":
            raise ValueError(f"{path}: merge_method 'passthrough' stacks layers, which is depth up-scaling here: "
                             f"run `solar upscale --config {path}`")
        if method not in METHODS:
            raise ValueError(f"{path}: merge_method must be one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        self.parameters = _yaml_parameters(f"{path}: parameters", data.get("parameters"),
                                           _GLOBAL_PARAMETERS[method], method)
        self.base_model = self._resolve(data["base_model"]) if data.get("base_model") is not None else None
        if ("models" in data) == ("slices" in data):
            raise ValueError(f"{path}: give exactly one of models or slices, got "
                             f"{'both' if 'models' in data else 'neither'}")
        entries = self._models(data["models"]) if "models" in data else self._slices(data["slices"])
        self.entries: List[Tuple[Path, Dict[str, object]]] = entries
        self.dtype = data.get("out_dtype", data.get("dtype"))

    def _resolve(self, model) -> Path:
        if not isinstance(model, str):
            raise ValueError(f"{self.path}: a model must be a checkpoint directory path, got {model!r}")
        resolved = Path(model).expanduser()
        if not resolved.is_absolute():
            resolved = self.path.parent / resolved
        if not resolved.is_dir():
            raise ValueError(f"{self.path}: model {model!r} resolves to {resolved}, which is not a directory; "
                             f"only local checkpoint directories are read (download Hub models first, e.g. "
                             f"`huggingface-cli download {model} --local-dir DIR`)")
        return resolved

    def _entry(self, where: str, entry, keys: Tuple[str, ...]) -> Tuple[Path, Dict[str, object]]:
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"{where}: expected a mapping with a model key, got {entry!r}")
        unknown = [key for key in entry if key not in keys]
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; expected some of {', '.join(keys)}")
        parameters = _yaml_parameters(where, entry.get("parameters"), _MODEL_PARAMETERS[self.method], self.method)
        return self._resolve(entry["model"]), parameters

    def _models(self, models) -> List[Tuple[Path, Dict[str, object]]]:
        if not isinstance(models, list) or not models:
            raise ValueError(f"{self.path}: models must be a non-empty list, got {models!r}")
        return [self._entry(f"{self.path}: models[{i}]", entry, ("model", "parameters"))
                for i, entry in enumerate(models)]

    def _slices(self, slices) -> List[Tuple[Path, Dict[str, object]]]:
        """Only a single slice in which every source spans all layers: a whole-model merge."""
        if not isinstance(slices, list) or len(slices) != 1:
            count = len(slices) if isinstance(slices, list) else slices
            raise ValueError(f"{self.path}: slices: only one slice spanning all layers (a whole-model merge) is "
                             f"supported, got {count!r} slices; to stack layers use `solar upscale --config`")
        layer_slice = slices[0]
        if not isinstance(layer_slice, dict) or set(layer_slice) != {"sources"} or not isinstance(
                layer_slice["sources"], list) or not layer_slice["sources"]:
            raise ValueError(f"{self.path}: slices[0] must be a mapping with only a non-empty sources list, "
                             f"got {layer_slice!r}")
        entries = []
        for i, source in enumerate(layer_slice["sources"]):
            where = f"{self.path}: slices[0].sources[{i}]"
            model, parameters = self._entry(where, source, ("model", "layer_range", "parameters"))
            layers = CheckpointReader(model).config.get("num_hidden_layers")
            layer_range = source.get("layer_range")
            if layer_range != [0, layers]:
                raise ValueError(f"{where}: layer_range {layer_range!r} is not supported: only whole-model merges "
                                 f"are, i.e. [0, {layers}] for {model} ({layers} layers); to stack layers use "
                                 f"`solar upscale --config`")
            entries.append((model, parameters))
        return entries

    def kwargs(self) -> dict:
        """merge()'s keyword arguments (all but dst and the output options)."""
        entries = self.entries
        if self.method == "ties" and self.base_model is not None:
            # The base listed without parameters is the base, not a merged model.
            entries = [(model, parameters) for model, parameters in entries
                       if parameters or model.resolve() != self.base_model.resolve()]
        kwargs = dict(models=[model for model, _ in entries], method=self.method, base_model=self.base_model,
                      dtype=self.dtype)

        def per_model(key: str, default: float) -> List[object]:
            return [parameters.get(key, self.parameters.get(key, default)) for _, parameters in entries]

        if self.method == "slerp":
            if "t" not in self.parameters:
                raise ValueError(f"{self.path}: slerp needs parameters: {{t: ...}} (0 gives the base/first "
                                 f"model, 1 the other)")
            kwargs["t"] = self.parameters["t"]
            return kwargs
        kwargs["weights"] = per_model("weight", 1.0)
        kwargs["normalize"] = self.parameters.get("normalize", True)
        if not isinstance(kwargs["normalize"], bool):
            raise ValueError(f"{self.path}: normalize must be true or false, got {kwargs['normalize']!r}")
        if self.method == "ties":
            densities = per_model("density", 1.0)
            kwargs["density"] = densities[0] if len(set(densities)) == 1 else densities
            kwargs["lambda_"] = self.parameters.get("lambda", 1.0)
        return kwargs


def merge_from_yaml(
    config_path: PathLike,
    dst: PathLike,
    *,
    force: bool = False,
    max_shard_size: Union[int, str] = "5GB",
    progress: bool = False,
    dtype: Optional[Union[str, torch.dtype]] = None,
) -> Path:
    """Runs the merge described by a mergekit-style YAML file (see the module docstring); a
    ``dtype`` given here overrides the file's ``dtype``/``out_dtype``."""
    import yaml

    path = Path(config_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not a valid merge YAML (one document, one merge per file): {error}") from error
    kwargs = _YamlConfig(data, path).kwargs()
    if dtype is not None:
        if kwargs["dtype"] is not None and parse_dtype(kwargs["dtype"]) != parse_dtype(dtype):
            logger.info("output dtype %s (given) overrides %s from %s", dtype, kwargs["dtype"], path)
        kwargs["dtype"] = dtype
    return merge(dst=dst, force=force, max_shard_size=max_shard_size, progress=progress, **kwargs)
