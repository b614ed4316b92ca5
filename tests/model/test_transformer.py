from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from solar_kernels.model import CausalLM, KVCache, ModelConfig, attention, load_pretrained, preset
from solar_kernels.model.transformer import HAS_FLASH_ATTN, LayerKVCache, build_attention_mask
from tests.tolerances import rel_err

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers_fp32(hf_checkpoint, backend, device):
    path, hf = hf_checkpoint
    hf = hf.to(device)
    ours = load_pretrained(path, device=device, backend=backend)
    ids = torch.randint(0, 101, (2, 11), device=device)  # longer than Mistral's window of 5
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers_bf16(hf_checkpoint, backend, device):
    path, hf = hf_checkpoint
    hf = hf.to(device)
    ids = torch.randint(0, 101, (2, 9), device=device)
    with torch.no_grad():
        reference = hf(ids).logits.double()  # fp32 model
        hf_bf16 = hf.to(torch.bfloat16)(ids).logits
        ours = load_pretrained(path, device=device, dtype="bfloat16", backend=backend)(ids)
    assert ours.dtype == torch.bfloat16
    # Within bf16 rounding of the fp32 reference: no worse than transformers' own bf16 run, give or take.
    assert rel_err(ours, reference) <= 2 * rel_err(hf_bf16, reference) + 1e-2


def test_hidden_states_feed_the_lm_head(device):
    model = CausalLM.from_config(preset("tiny"), device=device)
    ids = torch.randint(0, 512, (2, 6), device=device)
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
        assert hidden.shape == (2, 6, 64)
        torch.testing.assert_close(model.lm_head(hidden), model(ids))


def test_solar_builds_on_meta_without_allocating():
    model = CausalLM.from_config(preset("solar-10.7b"), device="meta")
    assert model.num_parameters() == 10_731_524_096
    assert all(p.device.type == "meta" for p in model.parameters())


def test_from_config_allocates_once(device):
    """Materializing allocates each parameter once on its device: the model's bytes, no second copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith("empty") and isinstance(out, torch.Tensor) and out.device.type != "meta":
                Allocations.total += out.numel() * out.element_size()
            return out

    config = preset("tiny", num_layers=2)
    with Allocations():
        model = CausalLM.from_config(config, device=device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert params <= Allocations.total < 1.5 * params


def test_tied_embeddings(device):
    model = CausalLM.from_config(preset("tiny", tie_word_embeddings=True), device=device)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == preset("tiny", tie_word_embeddings=True).num_parameters()


def test_packed_documents_do_not_attend_across(device):
    """A packed row of two documents equals the two documents run separately."""
    model = CausalLM.from_config(preset("tiny"), device=device).eval()
    a = torch.randint(0, 512, (1, 5), device=device)
    b = torch.randint(0, 512, (1, 7), device=device)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).to(device)[None]
    with torch.no_grad():
        out = model(packed, position_ids=positions)
        torch.testing.assert_close(out[:, :5], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 5:], model(b), rtol=1e-5, atol=1e-5)
        leaked = model(packed)  # without position_ids the second document sees the first
        assert not torch.allclose(leaked[:, 5:], model(b), atol=1e-3)


def test_attention_mask_rules():
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    mask = build_attention_mask(1, 5, 5, torch.device("cpu"), position_ids=positions)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask, expected.bool())
    window = build_attention_mask(1, 4, 4, torch.device("cpu"), sliding_window=2)[0, 0]
    assert torch.equal(window, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]).bool())
    padded = build_attention_mask(1, 3, 3, torch.device("cpu"), key_padding=torch.tensor([[0, 1, 1]]))[0, 0]
    assert torch.equal(padded, torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]]).bool())  # pad query sees itself only
    assert build_attention_mask(2, 4, 4, torch.device("cpu")) is None


def test_cached_and_uncached_logits_agree(device):
    model = CausalLM.from_config(preset("tiny"), device=device).eval()
    ids = torch.randint(0, 512, (2, 10), device=device)
    cache = KVCache(model.config, 2, 10, device=device)
    with torch.no_grad():
        full = model(ids)
        first = model(ids[:, :6], cache=cache)
        steps = [model(ids[:, t : t + 1], cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 10


def test_bad_forward_inputs(device):
    model = CausalLM.from_config(preset("tiny"), device=device)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\], got shape \(5,\)"):
        model(torch.zeros(5, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, cached \+ new\] = \(1, 3\), got \(1, 4\)"):
        model(torch.zeros(1, 3, dtype=torch.long, device=device), attention_mask=torch.ones(1, 4, device=device))
    cache = KVCache(model.config, 1, 2, device=device)
    with pytest.raises(ValueError, match="exceed the cache's 2"):
        model(torch.zeros(1, 3, dtype=torch.long, device=device), cache=cache)


def test_model_config_validation():
    with pytest.raises(ValueError, match="head_dim must be even"):
        ModelConfig(hidden_size=30, num_heads=2, num_kv_heads=1)


def test_residual_adds_are_fused_into_the_norms(device):
    """No add of the [B, T, d] stream runs outside a norm: each block's input norm takes the previous
    block's MLP add, the final norm the last one (the unfused model ran one per block)."""

    class StreamAdds(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (
                func.overloadpacket.__name__ == "add"
                and isinstance(out, torch.Tensor)
                and tuple(out.shape) == (2, 5, 64)
            ):
                StreamAdds.count += 1
            return out

    model = CausalLM.from_config(preset("tiny", backend="triton"), device=device).eval()
    ids = torch.randint(0, 512, (2, 5), device=device)
    with torch.no_grad():
        with StreamAdds():
            fused = model(ids, return_hidden=True)
        # The same stream written out with separate adds, through the torch reference ops.
        x = model.model.embed_tokens(ids)
        cos, sin, plan = model.prepare(ids)
        for block in model.model.layers:
            h = x + block.self_attn(block.input_layernorm(x), cos, sin, plan)
            x = h + block.mlp(block.post_attention_layernorm(h))
        unfused = model.model.norm(x)
    assert StreamAdds.count == 0
    assert rel_err(fused, unfused) <= 1e-6


def test_rope_frequencies_are_a_buffer_outside_checkpoints(device):
    model = CausalLM.from_config(preset("tiny"), device=device)
    rotary = model.model.rotary_emb
    assert dict(model.named_buffers())["model.rotary_emb.inv_freq"] is rotary.inv_freq
    assert not any("inv_freq" in name for name in model.state_dict())
    expected = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    torch.testing.assert_close(rotary.inv_freq.double().cpu(), expected)
    model.to(torch.bfloat16)  # casts buffers too: the frequencies come back in fp32 on first use
    cos, _ = rotary(torch.arange(3, device=device)[None])
    assert rotary.inv_freq.dtype == torch.float32 and cos.dtype == torch.float32
    meta = CausalLM.from_config(preset("tiny"), device="meta").model.rotary_emb  # as load_pretrained builds it
    meta(torch.arange(3, device=device)[None])
    torch.testing.assert_close(meta.inv_freq, rotary.inv_freq)


def test_cache_writes_at_positions_and_never_reads_unfilled_slots(device):
    model = CausalLM.from_config(preset("tiny"), device=device).eval()
    ids = torch.randint(0, 512, (2, 7), device=device)
    cache = KVCache(model.config, 2, 16, device=device)
    for layer in cache.layers:  # NaN in the unfilled slots would leak through any read of them
        layer.keys.fill_(float("nan"))
        layer.values.fill_(float("nan"))
    with torch.no_grad():
        full = model(ids)
        first = model(ids[:, :4], cache=cache)
        steps = [model(ids[:, t : t + 1], cache=cache) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.layers[0].keys[:, :, :7].isfinite().all() and cache.layers[0].keys[:, :, 7:].isnan().all()

    layer = LayerKVCache(1, 2, 6, 4, device=device)
    k, v = torch.randn(1, 2, 2, 4, device=device), torch.randn(1, 2, 2, 4, device=device)
    keys, values = layer.update(torch.tensor([3, 4], device=device), k, v)
    assert torch.equal(keys[:, :, 3:5], k) and torch.equal(values[:, :, 3:5], v)
    assert not keys[:, :, [0, 1, 2, 5]].any()


def test_bad_cache_arguments(device):
    model = CausalLM.from_config(preset("tiny"), device=device)
    with pytest.raises(ValueError, match="KVCache: max_length must be a positive int, got 0"):
        KVCache(model.config, 1, 0)
    cache = KVCache(model.config, 2, 8, device=device)
    with pytest.raises(ValueError, match=r"the cache holds 2 rows of 4 layers, expected 3 rows \(input_ids\) of 4"):
        model(torch.zeros(3, 2, dtype=torch.long, device=device), cache=cache)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash-attn is not installed")
def test_flash_attn_varlen_matches_sdpa(monkeypatch):
    model = CausalLM.from_config(preset("tiny"), device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 512, (2, 12), device="cuda")
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]] * 2, device="cuda")
    with torch.no_grad():
        flash = model(ids, position_ids=positions)
        assert model.last_attention_path == "flash_attn_varlen"
        monkeypatch.setattr(attention, "choose_attention_path", lambda **situation: "sdpa_mask")
        sdpa = model(ids, position_ids=positions)
    assert rel_err(flash, sdpa) < 2e-2
