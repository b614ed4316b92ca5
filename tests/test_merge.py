"""Tests for solar_kernels/merge.py: the per-tensor math against hand-computed and independent
results, whole-checkpoint merges against the loaded state dicts, the YAML forms, the output
directory (transformers loads it, shards, dtype, side files), atomicity and every bad input."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from solar_kernels.checkpoint import CheckpointError, read_header
from solar_kernels.merge import SLERP_DOT_THRESHOLD, linear_merge, merge, merge_from_yaml, slerp, ties_merge
from tests.helpers import HF_TINY, break_shard_writer

transformers = pytest.importorskip("transformers")

# hf_tiny_config's model (HF_TINY: 4 query and 2 key/value heads), narrower and shorter: small checkpoints to merge.
TINY = dict(
    HF_TINY, vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2, max_position_embeddings=64
)


def _save_tiny(path, seed, max_shard_size="1GB", **overrides):
    """A tiny random Llama checkpoint; every parameter perturbed so models differ (the norm weights
    only slightly: like fine-tunes of one base, they stay nearly parallel across models)."""
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * (0.01 if parameter.ndim == 1 else 0.05))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def _state_dict(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _listing(directory):
    return sorted(os.listdir(directory))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    paths = {
        "a": _save_tiny(root / "a", seed=1, max_shard_size="10KB"),  # sharded
        "b": _save_tiny(root / "b", seed=2),  # one model.safetensors
        "c": _save_tiny(root / "c", seed=3, max_shard_size="16KB"),
        "base": _save_tiny(root / "base", seed=4),
        "wide": _save_tiny(root / "wide", seed=5, intermediate_size=48),
        "deep": _save_tiny(root / "deep", seed=6, num_hidden_layers=3),
    }
    (paths["a"] / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "which": "a"}))
    (paths["base"] / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "which": "base"}))
    assert (paths["a"] / "model.safetensors.index.json").is_file() and (paths["b"] / "model.safetensors").is_file()
    return paths


@pytest.fixture(scope="module")
def weights(sources):
    return {name: _state_dict(path) for name, path in sources.items()}


# ----------------------------------------------------------------------------------------------
# Per-tensor math
# ----------------------------------------------------------------------------------------------

# Hand-computed TIES example: base [10, 20, 30, 40], task vectors
#   tau_1 = [3, -1, 0.5, -2], tau_2 = [-1, -4, 2, 0.25], tau_3 = [2, 1, -3, 0.1].
# density 0.5 keeps 2 of 4 entries: [3, 0, 0, -2], [0, -4, 2, 0], [2, 0, -3, 0].
TIES_BASE = [10.0, 20.0, 30.0, 40.0]
TIES_TAUS = [[3.0, -1.0, 0.5, -2.0], [-1.0, -4.0, 2.0, 0.25], [2.0, 1.0, -3.0, 0.1]]
TIES_CASES = {
    # equal weights: sum [5, -4, -1, -2] -> signs [+, -, -, -]; agreeing means [2.5, -4, -3, -2].
    "equal": (dict(weights=[1, 1, 1], density=0.5), [12.5, 16.0, 27.0, 38.0]),
    # lambda scales the merged task vector.
    "lambda": (dict(weights=[1, 1, 1], density=0.5, lambda_=0.5), [11.25, 18.0, 28.5, 39.0]),
    # weights [1, 2, 1]: weighted [3,0,0,-2], [0,-8,4,0], [2,0,-3,0]; sum [5,-8,1,-2] flips entry 2 to +,
    # so only model 2 agrees there: 4 / 2 = 2. Means [(3+2)/2, -8/2, 4/2, -2/1].
    "weighted": (dict(weights=[1, 2, 1], density=0.5), [12.5, 16.0, 32.0, 38.0]),
    # normalize=False: plain sums of the agreeing weighted entries [5, -8, 4, -2].
    "unnormalized": (dict(weights=[1, 2, 1], density=0.5, normalize=False), [15.0, 12.0, 34.0, 38.0]),
    # densities [1, 0.5, 0.25]: [3,-1,0.5,-2], [0,-4,2,0], [0,0,-3,0]; sum [3,-5,-0.5,-2] -> [+,-,-,-];
    # means [3, (-1-4)/2, -3, -2].
    "per_model_density": (dict(weights=[1, 1, 1], density=[1.0, 0.5, 0.25]), [13.0, 17.5, 27.0, 38.0]),
}


@pytest.mark.parametrize("case", list(TIES_CASES))
def test_ties_hand_computed(case):
    kwargs, expected = TIES_CASES[case]
    base = torch.tensor(TIES_BASE)
    tensors = [base + torch.tensor(tau) for tau in TIES_TAUS]
    merged = ties_merge(base, tensors, **kwargs)
    torch.testing.assert_close(merged, torch.tensor(expected), rtol=0, atol=1e-6)


def test_ties_sign_edge_cases_and_dtype():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    tensors = [base + torch.tensor([4.0, 0.0, 0.0, 3.0]), base + torch.tensor([-1.0, 0.0, 2.0, -3.0])]
    merged = ties_merge(base, tensors, [1.0, 1.0], density=1.0)
    assert merged.dtype == torch.bfloat16
    # entry 0: sum 3 -> +, model 0 alone: 4. entry 1: no model moved, stays at the base.
    # entry 2: model 1 alone: 2. entry 3: sum exactly 0 elects + (as mergekit), model 0 alone: 3.
    assert merged.tolist() == [5.0, 2.0, 5.0, 7.0]


def test_ties_trim_keeps_exactly_k_with_tied_magnitudes():
    # density 0.4 of 5 entries keeps 2: the 2, then the earliest of the four entries tied at magnitude 1.
    merged = ties_merge(torch.zeros(5), [torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])], [1.0], density=0.4)
    assert merged.tolist() == [1.0, 0.0, 0.0, 0.0, 2.0]


@pytest.mark.parametrize("t, expected", [(0.5, [math.sqrt(2), math.sqrt(2)]), (1 / 3, [math.sqrt(3), 1.0])])
def test_slerp_orthogonal_known_answer(t, expected):
    # a and b at 90 degrees with norm 2: slerp stays on the circle of radius 2 (lerp would not).
    merged = slerp(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]), t)
    torch.testing.assert_close(merged, torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [2.0, -3.0], ids=["parallel", "antiparallel"])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_parallel_falls_back_to_linear(scale, t):
    a = torch.randn(7, 5)
    b = scale * a
    torch.testing.assert_close(slerp(a, b, t), (1 - t) * a + t * b, rtol=1e-6, atol=1e-6)


def test_slerp_endpoints_are_exact_and_dtype_kept():
    a, b = torch.randn(33, 17, dtype=torch.bfloat16), torch.randn(33, 17, dtype=torch.bfloat16)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    assert slerp(a, b, 0.4).dtype == torch.bfloat16


def test_linear_merge_fp32_inside_cast_back():
    a, b = torch.randn(129, dtype=torch.bfloat16), torch.randn(129, dtype=torch.bfloat16)
    merged = linear_merge([a, b], [0.6, 0.4])
    expected = ((0.6 * a.double() + 0.4 * b.double()) / 1.0).to(torch.bfloat16)
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged, expected, rtol=2**-8, atol=0)
    torch.testing.assert_close(
        linear_merge([a, b], [2.0, 1.0], normalize=False).double(), 2 * a.double() + b.double(), rtol=2**-7, atol=1e-6
    )


# ----------------------------------------------------------------------------------------------
# Whole checkpoints against the loaded state dicts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "models, kwargs, coefficients",
    [
        (("a", "b"), dict(weights=[0.6, 0.4]), [0.6, 0.4]),
        (("a", "b", "c"), dict(), [1 / 3, 1 / 3, 1 / 3]),  # default: equal weights
        (("a", "b"), dict(weights=[1.0, 0.5], normalize=False), [1.0, 0.5]),
        (("a", "b"), dict(weights=[3.0, 1.0]), [0.75, 0.25]),
    ],
    ids=["0.6-0.4", "equal-3", "unnormalized", "normalized-3-1"],
)
def test_linear_checkpoint(sources, weights, tmp_path, models, kwargs, coefficients):
    dst = merge([sources[m] for m in models], tmp_path / "out", method="linear", **kwargs)
    merged = _state_dict(dst)
    assert set(merged) == set(weights["a"])
    for name, tensor in merged.items():
        expected = sum(c * weights[m][name].double() for c, m in zip(coefficients, models))
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def _slerp_expected(a, b, t):
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float(a64 @ b64 / (a64.norm() * b64.norm()))
    if abs(cos) > SLERP_DOT_THRESHOLD:
        return ((1 - t) * a64 + t * b64).view(a.shape), "linear"
    omega = math.acos(cos)
    merged = (math.sin((1 - t) * omega) * a64 + math.sin(t * omega) * b64) / math.sin(omega)
    return merged.view(a.shape), "spherical"


def test_slerp_checkpoint(sources, weights, tmp_path):
    dst = merge([sources["a"], sources["b"]], tmp_path / "out", method="slerp", t=0.3)
    merged = _state_dict(dst)
    assert set(merged) == set(weights["a"])
    paths = set()
    for name, tensor in merged.items():
        expected, path = _slerp_expected(weights["a"][name], weights["b"][name], 0.3)
        paths.add(path)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    # The norm weights (near 1 in both) take the linear path, the random matrices the spherical one.
    assert paths == {"linear", "spherical"}


def test_slerp_checkpoint_parallel_falls_back_to_linear(sources, weights, tmp_path):
    doubled = tmp_path / "doubled"
    doubled.mkdir()
    (doubled / "config.json").write_bytes((sources["a"] / "config.json").read_bytes())
    save_file({name: 2 * tensor for name, tensor in weights["a"].items()}, str(doubled / "model.safetensors"))
    merged = _state_dict(merge([sources["a"], doubled], tmp_path / "out", method="slerp", t=0.3))
    for name, tensor in merged.items():
        torch.testing.assert_close(
            tensor, 0.7 * weights["a"][name] + 0.3 * 2 * weights["a"][name], rtol=1e-6, atol=1e-7, msg=name
        )


@pytest.mark.parametrize("t, source", [(0.0, "a"), (1.0, "b")])
def test_slerp_checkpoint_endpoints(sources, weights, tmp_path, t, source):
    merged = _state_dict(merge([sources["a"], sources["b"]], tmp_path / "out", method="slerp", t=t))
    for name, tensor in merged.items():
        assert torch.equal(tensor, weights[source][name]), name


def test_slerp_base_model_is_the_t0_end(sources, weights, tmp_path):
    dst = merge([sources["a"], sources["b"]], tmp_path / "out", method="slerp", t=0.0, base_model=sources["b"])
    for name, tensor in _state_dict(dst).items():
        assert torch.equal(tensor, weights["b"][name]), name


def _ties_expected(base, thetas, weights, densities, lambda_=1.0):
    """Straightforward TIES: trim by a magnitude threshold, then per-model sign checks."""
    kept = []
    for theta, weight, density in zip(thetas, weights, densities):
        tau = (theta.float() - base.float()).flatten()  # the same fp32 task vector the merge sees
        k = max(1, int(density * tau.numel() + 1e-6))
        threshold = tau.abs().sort(descending=True).values[k - 1]
        kept.append(weight * torch.where(tau.abs() >= threshold, tau, 0.0).double())
    sign = torch.ones_like(kept[0])
    sign[sum(kept) < 0] = -1
    numerator = torch.zeros_like(kept[0])
    denominator = torch.zeros_like(kept[0])
    for contribution, weight in zip(kept, weights):
        agrees = (contribution != 0) & (torch.sign(contribution) == sign)
        numerator[agrees] += contribution[agrees]
        denominator[agrees] += weight
    mean = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), 0.0)
    return base.double() + lambda_ * mean.view(base.shape)


def test_ties_checkpoint(sources, weights, tmp_path):
    dst = merge(
        [sources["a"], sources["b"], sources["c"]],
        tmp_path / "out",
        method="ties",
        base_model=sources["base"],
        weights=[0.5, 0.3, 0.2],
        density=[0.5, 0.7, 0.3],
        lambda_=0.8,
    )
    merged = _state_dict(dst)
    assert set(merged) == set(weights["base"])
    for name, tensor in merged.items():
        thetas = [weights[m][name] for m in ("a", "b", "c")]
        expected = _ties_expected(weights["base"][name], thetas, [0.5, 0.3, 0.2], [0.5, 0.7, 0.3], 0.8)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    # config and tokenizer come from the base model
    assert json.loads((dst / "tokenizer_config.json").read_text())["which"] == "base"


def test_non_float_tensors_copied_from_first_model(tmp_path):
    for name, step, value in (("x", 7, 1.0), ("y", 9, 3.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
        tensors = {"w": torch.full((3,), value), "step": torch.tensor([step])}
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    dst = merge([tmp_path / "x", tmp_path / "y"], tmp_path / "out", method="linear", dtype="float16")
    merged = load_file(dst / "model.safetensors")
    assert merged["step"].dtype == torch.int64 and merged["step"].tolist() == [7]
    assert merged["w"].dtype == torch.float16 and merged["w"].tolist() == [2.0, 2.0, 2.0]


# ----------------------------------------------------------------------------------------------
# The output directory
# ----------------------------------------------------------------------------------------------


def test_output_loads_in_transformers_and_runs(sources, weights, tmp_path):
    dst = merge([sources["a"], sources["b"]], tmp_path / "out", method="linear", progress=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=False).eval()
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    expected = {name: (weights["a"][name] + weights["b"][name]) / 2 for name in weights["a"]}
    reference.load_state_dict(expected)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 9, TINY["vocab_size"])


def test_sharding_respects_max_shard_size(sources, weights, tmp_path):
    limit = 8000
    dst = merge([sources["a"], sources["b"]], tmp_path / "out", method="linear", max_shard_size=limit)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (dst / "model.safetensors").exists()
    assert sorted(p.name for p in dst.glob("*.safetensors")) == shards
    total = 0
    for shard in shards:
        header = read_header(dst / shard)
        shard_bytes = sum(end - start for start, end in (info["data_offsets"] for info in header.values()))
        assert shard_bytes <= limit, shard
        total += shard_bytes
    assert index["metadata"]["total_size"] == total == sum(t.numel() * 4 for t in weights["a"].values())
    assert set(index["weight_map"]) == set(weights["a"])


def test_single_file_when_it_fits(sources, tmp_path):
    dst = merge([sources["a"], sources["b"]], tmp_path / "out", method="linear")
    assert (dst / "model.safetensors").is_file() and not (dst / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("dtype, name", [("bfloat16", "bfloat16"), (torch.float16, "float16")])
def test_dtype_conversion(sources, weights, tmp_path, dtype, name):
    # out_dtype: fp32 math on the fp32 sources, stored once in the output dtype.
    dst = merge([sources["a"], sources["b"]], tmp_path / "out", method="linear", weights=[0.6, 0.4], out_dtype=dtype)
    config = json.loads((dst / "config.json").read_text())
    assert config["dtype"] == name
    target = getattr(torch, name)
    for key, tensor in _state_dict(dst).items():
        assert tensor.dtype == target, key
        expected = 0.6 * weights["a"][key].double() + 0.4 * weights["b"][key].double()
        torch.testing.assert_close(tensor.double(), expected, rtol=2**-7, atol=1e-6, msg=key)


def test_config_and_side_files_copied(sources, tmp_path):
    dst = merge([sources["a"], sources["b"]], tmp_path / "out", method="linear")
    assert json.loads((dst / "config.json").read_text()) == json.loads((sources["a"] / "config.json").read_text())
    for side_file in ("generation_config.json", "tokenizer_config.json"):
        assert (dst / side_file).read_bytes() == (sources["a"] / side_file).read_bytes(), side_file


# ----------------------------------------------------------------------------------------------
# Atomicity
# ----------------------------------------------------------------------------------------------


def test_existing_dst_refused_unless_force(sources, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        merge([sources["a"], sources["b"]], dst, method="linear")
    assert _listing(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    assert _listing(tmp_path) == ["out"]
    merge([sources["a"], sources["b"]], dst, method="linear", force=True)
    assert "keep.txt" not in _listing(dst) and (dst / "config.json").is_file()
    assert _listing(tmp_path) == ["out"]


def test_failure_midway_leaves_no_output(sources, tmp_path, monkeypatch):
    calls = break_shard_writer(monkeypatch, 3, RuntimeError("disk on fire"))
    # A small shard size makes the first two adds flush a shard into the temporary directory.
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge([sources["a"], sources["b"]], tmp_path / "out", method="linear", max_shard_size=4000)
    assert len(calls) == 3
    assert _listing(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Bad input: raised before anything is written
# ----------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (("a", "b"), dict(method="average"), r"merge method must be one of breadcrumbs, .*ties, got 'average'"),
    (("a", "b"), dict(method="linear", weights=[1.0]), r"weights must have one value per model \(2\), got \[1.0\]"),
    (
        ("a", "b"),
        dict(method="linear", weights=[1.0, -1.0]),
        r"weights of tensor [\w.]+ sum "
        r"to 0, which normalize: true divides by",
    ),
    (("a", "b"), dict(method="linear", weights=[0, 0]), r"sum to 0.*got \[0, 0\]"),
    (
        ("a", "b"),
        dict(method="linear", weights=[1.0, "x"]),
        r"models\[1\] parameters: weight: expected a number, "
        r"a gradient .* got 'x'",
    ),
    (("a", "b"), dict(method="slerp", t=1.5), r"t must be in \[0, 1\].*got 1.5"),
    (("a", "b"), dict(method="slerp", t=-0.1), r"t must be in \[0, 1\].*got -0.1"),
    (("a", "b", "c"), dict(method="slerp"), r"slerp merges exactly 1 model\(s\) besides the base model .*/a, got 2"),
    (("a", "b"), dict(method="slerp", weights=[1, 1]), r"weights does not apply to slerp; its parameters are t"),
    (("a", "b"), dict(method="slerp", base_model="c"), r"slerp merges exactly 1 model\(s\) besides the base model"),
    (("a", "b"), dict(method="ties", base_model="base", density=0.0), r"density must be in \(0, 1\].*got 0.0"),
    (("a", "b"), dict(method="ties", base_model="base", density=1.5), r"density must be in \(0, 1\].*got 1.5"),
    (
        ("a", "b"),
        dict(method="ties", base_model="base", density=[0.5]),
        r"density must have one value per model "
        r"\(2\), got \[0.5\]",
    ),
    (("a", "b"), dict(method="ties"), r"method 'ties' needs base_model .* got None"),
    (
        ("a", "b"),
        dict(method="linear", density=0.5),
        r"density does not apply to linear; its parameters are "
        r"normalize, weight",
    ),
    (("a", "b"), dict(method="linear", t=0.7), r"t does not apply to linear"),
    (("a", "b"), dict(method="linear", base_model="base"), r"base_model does not apply to linear merges"),
    (("a", "b"), dict(method="linear", dtype="int8"), r"dtype must be one of float32, float16, bfloat16, got 'int8'"),
    (("a", "b"), dict(method="linear", max_shard_size="huge"), r"max_shard_size must be .* got 'huge'"),
    (
        ("a", "b"),
        dict(method="linear", parameters={"weight": [{"filter": "mlp", "valu": 1}]}),
        r"parameters: weight\[0\]: unknown key 'valu'; expected filter and value",
    ),
    (
        ("a", "b"),
        dict(method="slerp", parameters={"t": [{"filter": "mlp", "value": 0.5}]}),
        r"slerp needs parameter t for tensor (?!model\.layers\.\d+\.mlp)",
    ),
]


@pytest.mark.parametrize("models, kwargs, message", BAD_ARGUMENTS, ids=[str(i) for i in range(len(BAD_ARGUMENTS))])
def test_bad_arguments(sources, tmp_path, models, kwargs, message):
    if "base_model" in kwargs:
        kwargs = {**kwargs, "base_model": sources[kwargs["base_model"]]}
    with pytest.raises(ValueError, match=message):
        merge([sources[m] for m in models], tmp_path / "out", **kwargs)
    assert _listing(tmp_path) == []


def test_mismatched_shapes_name_model_and_tensor(sources, tmp_path):
    wide = re.escape(str(sources["wide"]))
    message = (
        rf"model {wide}: tensor 'model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight' has shape "
        rf"\[(48, 16|16, 48)\], expected \[(40, 16|16, 40)\] as in {re.escape(str(sources['a']))}"
    )
    with pytest.raises(CheckpointError, match=message):
        merge([sources["a"], sources["wide"]], tmp_path / "out", method="linear")
    assert _listing(tmp_path) == []


def test_mismatched_tensor_names(sources, tmp_path):
    a, deep = re.escape(str(sources["a"])), re.escape(str(sources["deep"]))
    with pytest.raises(CheckpointError, match=rf"model {deep} has tensor 'model\.layers\.2\.[\w.]+', which {a} lacks"):
        merge([sources["a"], sources["deep"]], tmp_path / "out", method="linear")
    with pytest.raises(CheckpointError, match=rf"model {a} has no tensor 'model\.layers\.2\.[\w.]+', which {deep} has"):
        merge([sources["deep"], sources["a"]], tmp_path / "out", method="slerp")
    with pytest.raises(CheckpointError, match=rf"model {deep} has tensor"):
        merge([sources["a"], sources["deep"]], tmp_path / "out", method="ties", base_model=sources["base"])
    assert _listing(tmp_path) == []


def test_missing_model_and_dst_equal_to_source(sources, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        merge([sources["a"], tmp_path / "nowhere"], tmp_path / "out", method="linear")
    with pytest.raises(ValueError, match=f"destination {sources['b']} is the source checkpoint {sources['b']}"):
        merge([sources["a"], sources["b"]], sources["b"], method="linear", force=True)
    assert _listing(tmp_path) == []


def test_one_model_is_not_a_merge(sources, tmp_path):
    for method, message in (
        ("linear", r"linear merges 2 or more model\(s\), got 1: \[.*/a'\]"),
        ("slerp", r"slerp merges exactly 1 model\(s\) besides the base model .*/a, got 0"),
    ):
        with pytest.raises(ValueError, match=message):
            merge([sources["a"]], tmp_path / "out", method=method)
    config = _write_yaml(tmp_path, f"models: [{{model: {sources['a']}}}]\nmerge_method: linear\n")
    with pytest.raises(ValueError, match=r"linear merges 2 or more model\(s\), got 1"):
        merge_from_yaml(config, tmp_path / "out")
    # ties: the base listed among the models is the base (as mergekit), so nothing is left to merge
    config = _write_yaml(
        tmp_path,
        f"models: [{{model: {sources['base']}, parameters: {{weight: 1}}}}]\n"
        f"merge_method: ties\nbase_model: {sources['base']}\n",
    )
    with pytest.raises(ValueError, match=r"ties merges 1 or more model\(s\) besides the base model .*, got 0"):
        merge_from_yaml(config, tmp_path / "out")
    assert _listing(tmp_path) == ["merge.yml"]


def test_one_task_vector_is_a_ties_merge(sources, weights, tmp_path):
    """As mergekit: ties with the base and one model is base + trimmed task vector."""
    dst = merge([sources["a"]], tmp_path / "out", method="ties", base_model=sources["base"], density=1.0)
    for name, tensor in _state_dict(dst).items():
        expected = weights["base"][name] + (weights["a"][name] - weights["base"][name])
        assert torch.equal(tensor, expected), name


def test_destination_in_or_around_any_source_is_refused(sources, tmp_path):
    before = _listing(sources["a"])
    cases = [
        (sources["a"] / "merged", [sources["a"], sources["b"]], {}, "is inside"),
        (sources["a"].parent, [sources["a"], sources["b"]], {}, "contains"),
        (sources["base"], [sources["a"], sources["b"]], {"method": "ties", "base_model": sources["base"]}, "is"),
    ]
    for dst, models, kwargs, relation in cases:
        with pytest.raises(ValueError, match=rf"destination {dst} {relation} the source checkpoint"):
            merge(models, dst, **{"method": "linear", **kwargs}, force=True)
    config = _write_yaml(
        tmp_path, f"models: [{{model: {sources['a']}}}, {{model: {sources['b']}}}]\nmerge_method: linear\n"
    )
    (tmp_path / "link").symlink_to(sources["b"])
    with pytest.raises(
        ValueError,
        match=rf"destination {tmp_path / 'link'} is the source checkpoint {sources['b']} "
        rf"\({sources['b']} and {sources['b']}\)",
    ):
        merge_from_yaml(config, tmp_path / "link", force=True)
    assert _listing(sources["a"]) == before and _listing(tmp_path) == ["link", "merge.yml"]


def test_ctrl_c_while_merging_removes_the_partial_output(sources, tmp_path, monkeypatch):
    calls = break_shard_writer(monkeypatch, 4, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        merge([sources["a"], sources["b"]], tmp_path / "out", method="linear", max_shard_size=4000)
    assert len(calls) == 4 and _listing(tmp_path) == []


def test_remote_code_is_not_copied_and_modes_follow_the_umask(sources, tmp_path, caplog):
    import shutil

    a = shutil.copytree(sources["a"], tmp_path / "a")
    config = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    (a / "generation_config.json").chmod(0o600)
    old = os.umask(0o077)
    try:
        with caplog.at_level("WARNING", logger="solar_kernels.checkpoint"):
            dst = merge([a, sources["b"]], tmp_path / "out", method="linear", max_shard_size=8000)
    finally:
        os.umask(old)
    assert json.loads((dst / "config.json").read_text()) == config  # all but auto_map, as it was
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f'dropped auto_map {{"AutoConfig": "configuration_x.XConfig"}} from {a / "config.json"}')
    modes = {name: (dst / name).stat().st_mode & 0o777 for name in _listing(dst)}
    assert sum(name.endswith(".safetensors") for name in modes) > 1 and "generation_config.json" in modes
    assert modes == dict.fromkeys(modes, 0o600) and dst.stat().st_mode & 0o777 == 0o700
    old = os.umask(0o002)
    try:
        dst = merge([a, sources["b"]], tmp_path / "out2", method="linear", max_shard_size=8000)
    finally:
        os.umask(old)
    assert {(dst / name).stat().st_mode & 0o777 for name in _listing(dst)} == {0o664}
    assert dst.stat().st_mode & 0o777 == 0o775


def test_yaml_dtype_overridden_by_the_caller(sources, tmp_path, caplog):
    config = _write_yaml(
        tmp_path,
        f"models: [{{model: {sources['a']}}}, {{model: {sources['b']}}}]\nmerge_method: linear\ndtype: float16\n",
    )
    with caplog.at_level("INFO", logger="solar_kernels.merge"):
        dst = merge_from_yaml(config, tmp_path / "out", dtype="bfloat16")
    assert {t.dtype for t in _state_dict(dst).values()} == {torch.bfloat16}
    assert f"dtype bfloat16 (given) overrides float16 from {config}" in caplog.text


# ----------------------------------------------------------------------------------------------
# mergekit-style YAML
# ----------------------------------------------------------------------------------------------


def _write_yaml(directory, text):
    path = directory / "merge.yml"
    path.write_text(text)
    return path


def _assert_same_checkpoint(left, right):
    left_tensors, right_tensors = _state_dict(left), _state_dict(right)
    assert set(left_tensors) == set(right_tensors)
    for name in left_tensors:
        assert left_tensors[name].dtype == right_tensors[name].dtype, name
        assert torch.equal(left_tensors[name], right_tensors[name]), name
    assert json.loads((left / "config.json").read_text()) == json.loads((right / "config.json").read_text())


def test_yaml_linear_relative_paths(sources, tmp_path, monkeypatch, caplog):
    config = _write_yaml(
        tmp_path,
        f"""
models:
  - model: {os.path.relpath(sources["a"], tmp_path)}
    parameters: {{weight: 0.6}}
  - model: ./{os.path.relpath(sources["b"], tmp_path)}
    parameters: {{weight: 0.4}}
merge_method: linear
parameters: {{normalize: true}}
dtype: bfloat16
""",
    )
    assert not os.path.isabs(os.path.relpath(sources["a"], tmp_path))
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the working directory, as in mergekit
    dst = merge_from_yaml(config, tmp_path / "yaml")
    expected = merge(
        [sources["a"], sources["b"]], tmp_path / "api", method="linear", weights=[0.6, 0.4], dtype="bfloat16"
    )
    _assert_same_checkpoint(dst, expected)
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    # Where the working directory has models of those names, they are the ones merged (as mergekit)...
    elsewhere = tmp_path / "elsewhere"
    for name in ("a", "b"):
        shutil.copytree(sources["c" if name == "a" else "b"], elsewhere / os.path.relpath(sources[name], tmp_path))
    monkeypatch.chdir(elsewhere)
    _assert_same_checkpoint(
        merge_from_yaml(config, tmp_path / "cwd"),
        merge([sources["c"], sources["b"]], tmp_path / "api_c", method="linear", weights=[0.6, 0.4], dtype="bfloat16"),
    )
    # ...and a path found only beside the YAML file is used with a warning (mergekit would stop).
    monkeypatch.chdir(sources["a"])
    with caplog.at_level("WARNING", logger="solar_kernels.merge"):
        _assert_same_checkpoint(merge_from_yaml(config, tmp_path / "beside"), expected)
    assert "is not in the working directory; using" in caplog.text


def test_yaml_slerp_slices(sources, tmp_path):
    config = _write_yaml(
        tmp_path,
        f"""
slices:
  - sources:
      - model: {sources["a"]}
        layer_range: [0, 2]
      - model: {sources["b"]}
        layer_range: [0, 2]
merge_method: slerp
base_model: {sources["a"]}
parameters:
  t: 0.3
dtype: float32
""",
    )
    dst = merge_from_yaml(config, tmp_path / "yaml")
    _assert_same_checkpoint(dst, merge([sources["a"], sources["b"]], tmp_path / "api", method="slerp", t=0.3))


def test_yaml_slerp_models_list_base_is_t0_end(sources, weights, tmp_path):
    config = _write_yaml(
        tmp_path,
        f"""
models:
  - model: {sources["a"]}
  - model: {sources["b"]}
merge_method: slerp
base_model: {sources["b"]}
parameters: {{t: 0.0}}
""",
    )
    dst = merge_from_yaml(config, tmp_path / "yaml")
    for name, tensor in _state_dict(dst).items():
        assert torch.equal(tensor, weights["b"][name]), name


def test_yaml_ties(sources, tmp_path):
    config = _write_yaml(
        tmp_path,
        f"""
models:
  - model: {sources["base"]}
  - model: {sources["a"]}
    parameters: {{density: 0.5, weight: 0.5}}
  - model: {sources["b"]}
    parameters: {{density: 0.3, weight: 0.5}}
merge_method: ties
base_model: {sources["base"]}
parameters: {{normalize: true, int8_mask: true}}
dtype: float16
""",
    )
    dst = merge_from_yaml(config, tmp_path / "yaml", max_shard_size="10KB")
    expected = merge(
        [sources["a"], sources["b"]],
        tmp_path / "api",
        method="ties",
        base_model=sources["base"],
        weights=[0.5, 0.5],
        density=[0.5, 0.3],
        dtype="float16",
    )
    _assert_same_checkpoint(dst, expected)
    assert (dst / "model.safetensors.index.json").is_file()


# @a and @b stand for the paths of sources a and b.
TWO = "models: [{model: @a}, {model: @b}]\n"
BAD_YAML = {
    "unknown_key": (TWO + "merge_method: linear\nmerge_methd: ties\n", r"unknown key 'merge_methd'; expected some of"),
    "tokenizer_source": (
        TWO + "merge_method: linear\ntokenizer_source: base\n",
        r"tokenizer_source: base needs base_model",
    ),
    "tokenizer_tokens": (
        TWO + "merge_method: linear\ntokenizer: {source: union, tokens: {x: {source: {kind: one}}}}\n",
        r"tokenizer: tokens\['x'\]: source must be a model path, \{kind: zero\} or \{kind: model_token, "
        r"model: PATH, token: TOKEN\} \(or token_id: N instead of token\), got \{'kind': 'one'\}",
    ),
    "tokenizer_and_source": (
        TWO + "merge_method: linear\ntokenizer_source: union\ntokenizer: {source: union}\n",
        r"give tokenizer_source or a tokenizer: block, not both",
    ),
    "tokenizer_pad": (
        TWO + "merge_method: linear\ntokenizer: {pad_to_multiple_of: 0}\n",
        r"tokenizer: pad_to_multiple_of must be a positive integer, got 0",
    ),
    "tokenizer_key": (
        TWO + "merge_method: linear\ntokenizer: {sauce: union}\n",
        r"tokenizer: unknown key 'sauce'; expected some of source, pad_to_multiple_of, tokens",
    ),
    "modules": (TWO + "merge_method: linear\nmodules: {}\n", r"key 'modules' is not supported"),
    "slice_base_model": (
        "slices:\n  - sources: [{model: @a, layer_range: [0, 2]}]\n    base_model: @b\nmerge_method: slerp\n",
        r"slices\[0\]: key 'base_model' is not supported",
    ),
    "unknown_source_key": (
        "slices:\n  - sources: [{model: @a, layer_range: [0, 2], weight: 1}]\nmerge_method: linear\n",
        r"slices\[0\]\.sources\[0\]: unknown key 'weight'",
    ),
    "unknown_filter_key": (
        TWO + "merge_method: slerp\nparameters: {t: [{filter: mlp, value: 0.5, when: 1}]}\n",
        r"parameters: t\[0\]: unknown key 'when'; expected filter and value",
    ),
    "passthrough": (
        "slices:\n  - sources: [{model: @a, layer_range: [0, 2]}]\nmerge_method: passthrough\n",
        r"'passthrough' stacks layers.*solar upscale --config",
    ),
    "unknown_method": (TWO + "merge_method: karcher\n", r"merge method must be one of .*, got 'karcher'"),
    "partial_slice": (
        "slices:\n  - sources:\n      - {model: @a, layer_range: [0, 1]}\n"
        "      - {model: @b, layer_range: [0, 1]}\nmerge_method: slerp\nparameters: {t: 0.5}\n",
        r"layer_range \[0, 1\] is not supported: only whole-model merges are, i\.e\. \[0, 2\]",
    ),
    "mismatched_slice": (
        "slices:\n  - sources:\n      - {model: @a, layer_range: [0, 2]}\n"
        "      - {model: @b, layer_range: [1, 2]}\nmerge_method: slerp\nparameters: {t: 0.5}\n",
        r"sources\[1\]: layer_range \[1, 2\] is not supported",
    ),
    "two_slices": (
        "slices:\n  - sources: [{model: @a, layer_range: [0, 1]}, {model: @b, layer_range: [0, 1]}]\n"
        "  - sources: [{model: @a, layer_range: [1, 2]}, {model: @b, layer_range: [1, 2]}]\n"
        "merge_method: slerp\nparameters: {t: 0.5}\n",
        r"only one slice .* got 2 slices",
    ),
    "bad_gradient": (
        TWO + "merge_method: slerp\nparameters: {t: [0, x, 1]}\n",
        r"parameters: t: expected a number, a gradient \(a non-empty list of numbers\)",
    ),
    "models_and_slices": (
        "models: [{model: @a}]\nslices: []\nmerge_method: linear\n",
        r"exactly one of models or slices .*, got both",
    ),
    "slerp_without_t": (TWO + "merge_method: slerp\n", r"slerp needs parameter t for tensor"),
    "slerp_three": (
        "models: [{model: @a}, {model: @b}, {model: @a}]\nmerge_method: slerp\nparameters: {t: 0.5}\n",
        r"slerp merges exactly 1 model\(s\) besides the base model .*/a, got 2",
    ),
    "ties_without_base": (TWO + "merge_method: ties\n", r"needs base_model"),
    "bad_model_parameter": (
        "models: [{model: @a, parameters: {density: 0.5}}, {model: @b}]\nmerge_method: linear\n",
        r"parameter 'density' does not apply to linear",
    ),
    "hub_model": (
        "models: [{model: upstage/SOLAR-10.7B-v1.0}, {model: @b}]\nmerge_method: linear\n",
        r"model 'upstage/SOLAR-10.7B-v1.0' resolves to .* which is not a directory",
    ),
    "two_documents": (TWO + "merge_method: linear\n---\nmerge_method: slerp\n", r"cannot read the merge YAML"),
    "models_not_a_list": ("models: {model: @a}\nmerge_method: linear\n", r"models must be a list, got \{'model': "),
    "slices_not_a_list": ("slices: {sources: []}\nmerge_method: linear\n", r"slices must be a list, got \{'sources'"),
    # entries are checked in the file's order: the first model's bad path before the second's bad key
    "errors_in_file_order": (
        "models: [{model: ./nowhere}, {model: @b, wieght: 1}]\nmerge_method: linear\n",
        r"models\[0\]: model './nowhere' resolves to",
    ),
    "bad_slice_key": (
        "slices:\n  - sources: [{model: @a, layer_range: [0, 1]}]\n    weight: 1\nmerge_method: linear\n",
        r"slices\[0\]: unknown key 'weight'; expected some of",
    ),
}


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_bad_yaml(sources, tmp_path, case):
    text, message = BAD_YAML[case]
    config = _write_yaml(tmp_path, text.replace("@a", str(sources["a"])).replace("@b", str(sources["b"])))
    with pytest.raises(ValueError, match=message):
        merge_from_yaml(config, tmp_path / "out")
    assert _listing(tmp_path) == ["merge.yml"]
