import copy

import pytest
import torch

import solar_kernels as sk
from solar_kernels.patch import unpatch_hf_model
from tests.model.conftest import hf_tiny_config
from tests.tolerances import assert_close


def _models(kind, device, backend="triton"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    reference = AutoModelForCausalLM.from_config(hf_tiny_config(kind), dtype=torch.float32).to(device)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    patched = sk.patch_hf_model(copy.deepcopy(reference), backend=backend)
    return reference, patched


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_logits_loss_and_gradients_match(kind, device):
    reference, patched = _models(kind, device)
    ids = torch.randint(0, 101, (2, 9), device=device)
    labels = ids.clone()
    labels[:, :3] = -100
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_trains_a_step_under_autocast_like_transformers(backend, device):
    """Trainer/TRL with bf16=True: fp32 parameters, forward under autocast, backward after it, a
    step. Loss and every gradient as close to float64 as the unpatched model under the same
    autocast (tests/tolerances.py), all finite, each gradient fp32."""
    reference, patched = _models("llama", device, backend)
    exact_model = copy.deepcopy(reference).double()
    ids = torch.randint(0, 101, (2, 9), device=device)
    labels = ids.clone()
    labels[:, :3] = -100
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


def test_generate_still_works_after_patching(device):
    reference, patched = _models("llama", device)
    prompt = torch.tensor([[1, 5, 9, 14]], device=device)
    args = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(prompt, **args), reference.generate(prompt, **args))


def test_patch_is_per_instance_and_reversible(device):
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    reference, patched = _models("llama", device)
    assert LlamaRMSNorm.forward.__module__.startswith("transformers")
    assert LlamaMLP.forward.__module__.startswith("transformers")
    assert "forward" not in reference.model.norm.__dict__ and "forward" in patched.model.norm.__dict__
    unpatch_hf_model(patched)
    assert "forward" not in patched.model.norm.__dict__ and "forward" not in patched.__dict__
    ids = torch.randint(0, 101, (1, 6), device=device)
    assert patched(ids, labels=ids).logits is not None


def test_bad_models():
    with pytest.raises(TypeError, match="expected one of LlamaForCausalLM, MistralForCausalLM, got Linear"):
        sk.patch_hf_model(torch.nn.Linear(2, 2))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_tiny_config("llama"))
    sk.patch_hf_model(model)
    with pytest.raises(ValueError, match="already patched"):
        sk.patch_hf_model(model)
