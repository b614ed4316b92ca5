"""patch_hf_model against the peer it replaces: the same transformers model, unpatched.

Every supported model type is built tiny (odd sizes, GQA, three layers mixing sliding-window and
full attention where the model has them, biases, q/k norms, scaled RoPE, soft-capping), with
non-trivial norm weights, and must give the unpatched model's logits, loss and gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

import solar_kernels as sk
from solar_kernels.patch import unpatch_hf_model
from tests.helpers import HF_TINY, hf_tiny_config
from tests.tolerances import assert_close

KINDS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
GEMMA = ("gemma2", "gemma3")
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def _config(kind: str, **overrides):
    """hf_tiny_config's sizes (``HF_TINY``: hidden 48, 4 query and 2 kv heads of 12, 3 layers, vocab
    101) for every kind; the sliding windows (4) are shorter than the test sequences."""
    from transformers import Gemma2Config, Gemma3TextConfig, Qwen2Config, Qwen3Config

    if kind in ("llama", "mistral"):
        return hf_tiny_config(kind, **overrides)
    common = dict(HF_TINY, pad_token_id=0, sliding_window=4, layer_types=LAYER_TYPES)
    if kind == "qwen2":  # q/k/v biases always; YaRN scales cos/sin by its attention factor
        yarn = dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=64, rope_theta=10000.0)
        return Qwen2Config(**{**common, "use_sliding_window": True, "rope_parameters": yarn, **overrides})
    if kind == "qwen3":
        return Qwen3Config(
            **{**common, "use_sliding_window": True, "head_dim": 12, "attention_bias": True, **overrides}
        )
    gemma = dict(common, head_dim=12, query_pre_attn_scalar=16)
    if kind == "gemma2":  # soft-capping (30 and 50 in Gemma 2) small enough to bite on these logits
        return Gemma2Config(**{**gemma, "attn_logit_softcapping": 1.0, "final_logit_softcapping": 1.0, **overrides})
    rope = {
        "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
        "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1000000.0),
    }
    return Gemma3TextConfig(**{**gemma, "rope_parameters": rope, **overrides})


def _reference(kind: str, device, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(_config(kind, **overrides), dtype=torch.float32).to(device)
    with torch.no_grad():  # Gemma's norms scale by (1 + w) and start at w = 0; the others at w = 1
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if kind in GEMMA else 1.0) + 0.3 * torch.randn_like(p))
    return model


def _models(kind, device, backend="triton", **patch_options):
    reference = _reference(kind, device)
    patched = sk.patch_hf_model(copy.deepcopy(reference), backend=backend, **patch_options)
    return reference, patched


def _batch(device, length=9):
    ids = torch.randint(3, 101, (2, length), device=device)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


@pytest.mark.parametrize("kind", KINDS)
def test_logits_loss_and_gradients_match(kind, device):
    reference, patched = _models(kind, device)
    ids, labels = _batch(device)
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    expected = reference(ids, labels=labels)
    got = patched(ids, labels=labels)
    assert got.logits is None  # the fused loss never builds [B, T, V]
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    expected.loss.backward()
    got.loss.backward()
    for (name, p), (_, q) in zip(reference.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind,backend", [(kind, "triton") for kind in KINDS] + [("llama", "torch")])
def test_trains_a_step_under_autocast_like_transformers(kind, backend, device):
    """Trainer/TRL with bf16=True: fp32 parameters, forward under autocast, backward after it, a
    step. Loss and every gradient as close to float64 as the unpatched model under the same
    autocast (tests/tolerances.py), all finite, each gradient fp32."""
    reference, patched = _models(kind, device, backend)
    exact_model = copy.deepcopy(reference).double()
    ids, labels = _batch(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        expected = reference(ids, labels=labels).loss
        got = patched(ids, labels=labels).loss
    exact = exact_model(ids, labels=labels).loss
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert_close("loss", got, expected, exact, torch.bfloat16)
    for loss in (expected, got, exact):
        loss.backward()
    named = zip(patched.named_parameters(), reference.parameters(), exact_model.parameters())
    for (name, p), q, e in named:
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        assert_close(name, p.grad, q.grad, e.grad, torch.bfloat16)
    before = [p.detach().clone() for p in patched.parameters()]
    torch.optim.SGD(patched.parameters(), lr=0.1).step()
    for old, p in zip(before, patched.parameters()):
        assert torch.isfinite(p).all() and not torch.equal(old, p)


def test_num_items_in_batch_matches_transformers(device):
    reference, patched = _models("llama", device)
    ids = torch.randint(0, 101, (2, 7), device=device)
    expected = reference(ids, labels=ids, num_items_in_batch=20).loss
    torch.testing.assert_close(patched(ids, labels=ids, num_items_in_batch=20).loss, expected, rtol=1e-5, atol=1e-6)


def test_shift_labels_and_ignore_index_match_transformers(device):
    """transformers' loss takes pre-shifted ``shift_labels`` and an ``ignore_index`` from the
    forward's kwargs; the fused loss honours both rather than shifting ``labels`` itself."""
    reference, patched = _models("llama", device)
    ids = torch.randint(0, 101, (2, 7), device=device)
    shift_labels = torch.randint(0, 101, (2, 7), device=device)
    shift_labels[0, :2] = -100
    for options in (dict(shift_labels=shift_labels), dict(ignore_index=int(ids[0, 3]))):
        expected = reference(ids, labels=ids, **options).loss
        got = patched(ids, labels=ids, **options).loss
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_skip_logits_as_liger(device):
    """Liger's forward switch: skip_logits=False gives transformers' logits and loss, True the
    fused loss (also the default with labels); True without labels is refused."""
    reference, patched = _models("qwen2", device)
    ids, labels = _batch(device)
    expected = reference(ids, labels=labels)
    built = patched(ids, labels=labels, skip_logits=False)
    torch.testing.assert_close(built.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(built.loss, expected.loss, rtol=1e-5, atol=1e-6)
    fused = patched(ids, labels=labels, skip_logits=True)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, expected.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="skip_logits=True needs labels .*, got labels=None"):
        patched(ids, skip_logits=True)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_still_works_after_patching(kind, device):
    reference, patched = _models(kind, device)
    prompt = torch.tensor([[1, 5, 9, 14, 20, 31]], device=device)  # longer than the sliding window
    args = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(prompt, **args), reference.generate(prompt, **args))


# Swapped forwards per decoder layer (3 layers) and in total: norms (+1 final), attentions, MLPs.
EXPECTED_SWAPS = {
    "llama": (2, 1, 1),
    "mistral": (2, 1, 1),
    "qwen2": (2, 1, 1),
    "qwen3": (4, 1, 1),  # input, post-attention, q_norm, k_norm
    "gemma2": (4, 1, 0),  # input, post-attention, pre- and post-feedforward; GeGLU MLP left alone
    "gemma3": (6, 1, 0),  # Gemma 2's four plus q_norm, k_norm
}


def _swapped(model: torch.nn.Module) -> dict[str, list[str]]:
    """Module names per patch function installed on them."""
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if forward is not None:
            found.setdefault(forward.__func__.__name__, []).append(name)
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_swaps_the_modules_expected_for_each_model(kind, device):
    reference, patched = _models(kind, device)
    norms, attentions, mlps = EXPECTED_SWAPS[kind]
    norm_forward = "_gemma_rms_norm_forward" if kind in GEMMA else "_rms_norm_forward"
    swapped = _swapped(patched)
    assert sorted(swapped) == sorted(
        [norm_forward, "_attention_forward", "_causal_lm_forward"] + (["_mlp_forward"] if mlps else [])
    )
    assert len(swapped[norm_forward]) == 3 * norms + 1 and "model.norm" in swapped[norm_forward]
    assert all("norm" in name for name in swapped[norm_forward])
    assert swapped["_attention_forward"] == [f"model.layers.{i}.self_attn" for i in range(3)]
    assert swapped.get("_mlp_forward", []) == [f"model.layers.{i}.mlp" for i in range(3)][: 3 * mlps]
    assert swapped["_causal_lm_forward"] == [""]
    if kind in ("qwen3", "gemma3"):
        assert "model.layers.2.self_attn.q_norm" in swapped[norm_forward]
        assert "model.layers.2.self_attn.k_norm" in swapped[norm_forward]
    # The embedding (Gemma's scaled by sqrt(hidden)) and lm_head are the model's own.
    assert "forward" not in patched.model.embed_tokens.__dict__ and "forward" not in patched.lm_head.__dict__
    if kind in GEMMA:
        assert patched.model.embed_tokens.embed_scale.item() == pytest.approx(48**0.5)


def test_only_the_swaps_asked_for(device):
    _, patched = _models("qwen3", device, rms_norm=False, mlp=False, loss=False)
    assert sorted(_swapped(patched)) == ["_attention_forward"]
    _, patched = _models("qwen3", device, rotary=False)
    assert sorted(_swapped(patched)) == ["_causal_lm_forward", "_mlp_forward", "_rms_norm_forward"]


@pytest.mark.parametrize("kind", KINDS)
def test_attention_implementation_gets_the_arguments_transformers_passes(kind, device):
    """sliding_window (Mistral from its config, Qwen/Gemma per layer) and Gemma 2's attention
    soft-capping reach the configured attention function as they do unpatched (flash attention
    reads them; the masks of eager and sdpa hide a dropped one)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls: list[dict] = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("solar_kernels_test_recorder", recording_attention)
    reference = _reference(kind, device)
    reference.set_attn_implementation("solar_kernels_test_recorder")
    patched = sk.patch_hf_model(copy.deepcopy(reference), backend="triton")
    ids, _ = _batch(device)
    with torch.no_grad():
        expected = reference(ids).logits
        reference_calls, calls[:] = list(calls), []
        got = patched(ids).logits
    assert len(reference_calls) == 3 and calls == reference_calls
    if kind != "llama":
        windows = [5, 5, 5] if kind == "mistral" else [4, None, 4]  # Mistral's applies to every layer
        assert [call["sliding_window"] for call in calls] == windows
    if kind == "gemma2":
        assert all(call["softcap"] == 1.0 for call in calls)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_patch_is_per_instance_and_reversible(kind, device):
    reference, patched = _models(kind, device)
    norm_class, mlp_class = type(reference.model.norm), type(reference.model.layers[0].mlp)
    assert norm_class.forward.__module__.startswith("transformers")
    assert mlp_class.forward.__module__.startswith("transformers")
    assert not _swapped(reference) and "forward" in patched.model.norm.__dict__
    unpatch_hf_model(patched)
    assert not _swapped(patched)
    assert not [
        name for name, module in patched.named_modules() if any(key.startswith("_solar") for key in module.__dict__)
    ]
    ids, labels = _batch(device, 6)
    with torch.no_grad():
        got, expected = patched(ids, labels=labels), reference(ids, labels=labels)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.loss, expected.loss)
    sk.patch_hf_model(patched)  # and it can be patched again
    assert _swapped(patched)


def test_bad_models():
    supported = (
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM"
    )
    with pytest.raises(TypeError, match=f"expected one of {supported}, got Linear"):
        sk.patch_hf_model(torch.nn.Linear(2, 2))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_config("llama"))
    sk.patch_hf_model(model)
    with pytest.raises(ValueError, match="already patched"):
        sk.patch_hf_model(model)


def test_refuses_gemma3_vision_language_model():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(
        text_config=_config("gemma3").to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    model = Gemma3ForConditionalGeneration(config)
    with pytest.raises(TypeError, match="expected a text-only causal LM, got Gemma3ForConditionalGeneration"):
        sk.patch_hf_model(model)
    assert not _swapped(model)


@pytest.mark.parametrize(
    "kind,options,what,switch",
    [("gemma3", {}, "RMSNorm", "rms_norm"), ("gemma2", {"rms_norm": False}, "soft-capped loss", "loss")],
)
def test_refuses_a_backend_without_what_the_model_needs_before_patching(kind, options, what, switch, device):
    """The CUDA twins have neither Gemma's norm nor soft-capping (on a CPU-only machine they
    are not there at all): refused at patch time, nothing patched."""
    model = _reference(kind, device)
    name = type(model).__name__
    with pytest.raises(ValueError, match=rf"{name}'s {what} cannot run on backend='cuda' \(.+\); pass {switch}=False"):
        sk.patch_hf_model(model, backend="cuda", **options)
    assert not _swapped(model)
    sk.patch_hf_model(model, backend="cuda", rms_norm=False, rotary=False, mlp=False, loss=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_refuses_a_non_silu_mlp_unless_mlp_is_left_alone(kind, device):
    model = _reference(kind, device, hidden_act="gelu")
    with pytest.raises(ValueError, match=r"mlp=True needs hidden_act='silu' .* hidden_act='gelu'; pass mlp=False"):
        sk.patch_hf_model(model)
    assert not _swapped(model)  # refused before anything was patched
    reference = copy.deepcopy(model)
    sk.patch_hf_model(model, mlp=False)
    assert "_mlp_forward" not in _swapped(model) and "_rms_norm_forward" in _swapped(model)
    ids, _ = _batch(device)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_gemma3_soft_capped_loss_matches(device):
    """Gemma 3's config may cap its logits too (Gemma 2's does, in the main parity test)."""
    reference = _reference("gemma3", device, final_logit_softcapping=1.0)
    patched = sk.patch_hf_model(copy.deepcopy(reference), backend="triton")
    ids, labels = _batch(device)
    expected, got = reference(ids, labels=labels), patched(ids, labels=labels)
    assert expected.logits.abs().max() < 1.0
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    expected.loss.backward()
    got.loss.backward()
    for (name, p), (_, q) in zip(reference.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
