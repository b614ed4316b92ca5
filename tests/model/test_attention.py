"""The attention paths of solar_kernels/model/attention.py: each equals the dense-mask reference.

flash-attn and torch's varlen kernel run only on CUDA; on the CPU they are replaced by a per-document
reference kernel with the same calling convention, which checks the glue around them (layout,
cu_seqlens, max_seqlen, window and GQA arguments for every varlen_attn signature torch has had).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from solar_kernels.model import CausalLM, attention, preset
from solar_kernels.model.attention import (
    attend,
    attention_ref,
    build_attention_mask,
    choose_attention_path,
    document_bounds,
    plan_attention,
)
from tests.tolerances import rel_err

CPU = torch.device("cpu")


def packed_positions(rows: list[list[int]]) -> torch.Tensor:
    """position_ids [B, T] for rows of documents with the given lengths."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


# Row 0 has a one-token document and documents across the 128-query chunk boundaries.
ROWS = [[130, 1, 60, 109], [5, 200, 95]]


def qkv(batch=2, heads=4, kv_heads=2, tokens=300, head_dim=16, requires_grad=False):
    # [B, T, H, D] storage seen as [B, H, T, D], as the model's projections are.
    make = lambda h: torch.randn(batch, tokens, h, head_dim).transpose(1, 2).requires_grad_(requires_grad)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any op produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class OpCounter(TorchDispatchMode):
    def __init__(self, *names):
        super().__init__()
        self.counts = dict.fromkeys(names, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.counts:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def varlen_reference(q, k, v, cu_seqlens, max_seqlen, left: int):
    """Causal attention within each [cu[i], cu[i+1]) of rows q [N, H, D], k, v [N, Hkv, D]; a query
    sees at most ``left`` keys before it (-1: all)."""
    offsets = cu_seqlens.tolist()
    assert max_seqlen == max(b - a for a, b in zip(offsets, offsets[1:]))
    assert offsets[0] == 0 and offsets[-1] == q.shape[0]
    outs = []
    for a, b in zip(offsets, offsets[1:]):
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
        allowed = (j <= i) & ((i - j <= left) if left >= 0 else True)
        outs.append(
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1),
                k[a:b].transpose(0, 1),
                v[a:b].transpose(0, 1),
                attn_mask=allowed,
                enable_gqa=k.shape[1] != q.shape[1],
            ).transpose(0, 1)
        )
    return torch.cat(outs)


def fake_flash_attn(monkeypatch):
    """flash_attn.flash_attn_varlen_func on the CPU (flash-attn's convention: GQA native)."""
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, window_size=(-1, -1)):
        assert causal and cu_q is cu_k and max_q == max_k and window_size[1] in (-1, 0)
        calls.append(cu_q)
        return varlen_reference(q, k, v, cu_q, max_q, window_size[0])

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    return calls


def fake_torch_varlen(monkeypatch, params: frozenset):
    """torch.nn.attention.varlen.varlen_attn on the CPU, taking only the keywords of ``params``."""
    calls = []

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs):
        assert set(kwargs) <= params, f"{set(kwargs) - params} not in this torch's varlen_attn"
        assert kwargs.get("enable_gqa", False) or key.shape[1] == query.shape[1]
        if "window_size" in params:
            left, right = kwargs["window_size"]
            assert right == 0
        else:
            assert kwargs["is_causal"]
            left = -1
        calls.append(cu_seq_q)
        return varlen_reference(query, key, value, cu_seq_q, max_q, left)

    monkeypatch.setattr(attention, "_torch_varlen_attn", varlen_attn)
    monkeypatch.setattr(attention, "_TORCH_VARLEN_PARAMS", params)
    return calls


TORCH_VARLEN_APIS = {
    "torch2.9": frozenset({"is_causal", "return_aux"}),
    "torch2.11": frozenset({"return_aux", "scale", "window_size"}),
    "torch2.14": frozenset({"return_aux", "scale", "window_size", "enable_gqa"}),
}


# ----------------------------------------------------------------------------- path choice

CASES = [
    # (situation, flags, expected)
    (dict(device_type="cpu", dtype=torch.float32), {}, "sdpa_causal"),
    (dict(device_type="cuda", dtype=torch.bfloat16), dict(has_flash_attn=True), "sdpa_causal"),
    (dict(device_type="cpu", dtype=torch.bfloat16, packed=True), dict(has_flash_attn=True), "sdpa_mask"),
    (dict(device_type="cpu", dtype=torch.float32, windowed=True), {}, "sdpa_mask"),
    (dict(device_type="cpu", dtype=torch.float32, padded=True), {}, "sdpa_mask"),
    (dict(device_type="cpu", dtype=torch.float32, cached=True), {}, "sdpa_mask"),
    (dict(device_type="cuda", dtype=torch.bfloat16, packed=True), dict(has_flash_attn=True), "flash_attn_varlen"),
    (dict(device_type="cuda", dtype=torch.float16, windowed=True), dict(has_flash_attn=True), "flash_attn_varlen"),
    (dict(device_type="cuda", dtype=torch.bfloat16, packed=True), dict(has_flash_attn=False), "torch_varlen"),
    (
        dict(device_type="cuda", dtype=torch.bfloat16, packed=True, windowed=True),
        dict(has_flash_attn=False, has_torch_varlen_windows=False),
        "flex",
    ),
    (
        dict(device_type="cuda", dtype=torch.bfloat16, packed=True, windowed=True),
        dict(has_flash_attn=False, has_torch_varlen_windows=True),
        "torch_varlen",
    ),
    (dict(device_type="cuda", dtype=torch.float32, packed=True), dict(has_flash_attn=True), "flex"),
    (
        dict(device_type="cuda", dtype=torch.bfloat16, packed=True),
        dict(has_flash_attn=False, has_torch_varlen=False),
        "flex",
    ),
    (dict(device_type="cuda", dtype=torch.float32, packed=True), dict(has_flex=False), "sdpa_mask"),
    (dict(device_type="cuda", dtype=torch.bfloat16, packed=True, padded=True), dict(has_flash_attn=True), "sdpa_mask"),
    (
        dict(device_type="cuda", dtype=torch.bfloat16, cached=True, windowed=True),
        dict(has_flash_attn=True),
        "sdpa_mask",
    ),
]


@pytest.mark.parametrize("situation, flags, expected", CASES)
def test_path_choice(situation, flags, expected):
    situation = dict(dict(packed=False, padded=False, windowed=False, cached=False), **situation)
    defaults = dict(has_flash_attn=False, has_torch_varlen=True, has_torch_varlen_windows=True, has_flex=True)
    assert choose_attention_path(**situation, **dict(defaults, **flags)) == expected


def test_path_choice_reads_what_is_installed_at_call_time(monkeypatch):
    situation = dict(device_type="cuda", dtype=torch.bfloat16, packed=True, padded=False, windowed=False, cached=False)
    monkeypatch.setattr(attention, "HAS_FLASH_ATTN", True)
    assert choose_attention_path(**situation) == "flash_attn_varlen"
    monkeypatch.setattr(attention, "HAS_FLASH_ATTN", False)
    monkeypatch.setattr(attention, "HAS_TORCH_VARLEN", False)
    monkeypatch.setattr(attention, "HAS_FLEX_ATTENTION", False)
    assert choose_attention_path(**situation) == "sdpa_mask"


def test_model_reports_its_attention_path():
    model = CausalLM.from_config(preset("tiny", backend="torch", sliding_window=6)).eval()
    ids = torch.randint(0, 512, (2, 5))
    packed = packed_positions([[2, 3], [5]])
    with torch.no_grad():
        assert model.attention_path(ids) == "sdpa_causal"  # the window (6) does not cut 5 tokens
        assert model.attention_path(torch.randint(0, 512, (2, 7))) == "sdpa_mask"  # it cuts 7 on the CPU
        assert model.attention_path(ids, packed) == "sdpa_mask"
        assert model.attention_path(ids, attention_mask=torch.ones(2, 5)) == "sdpa_mask"
        for args, kwargs in [((ids,), {}), ((ids, packed), {}), ((ids,), dict(attention_mask=torch.ones(2, 5)))]:
            model(*args, **kwargs)
            assert model.last_attention_path == model.attention_path(*args, **kwargs)
        from solar_kernels.model import KVCache

        cache = KVCache(model.config, 2, 8)
        model(ids[:, :3], cache=cache)
        attention_path_after_prefill = model.attention_path(ids[:, :1], cache=cache)
    assert attention_path_after_prefill == "sdpa_mask"  # decoding against cached keys


def test_forced_path_must_fit_the_situation():
    with pytest.raises(ValueError, match=r"path must be one of .*'sdpa_mask'\), got 'math'"):
        plan_attention(1, 4, CPU, torch.float32, path="math")
    with pytest.raises(ValueError, match=r"path 'sdpa_causal' cannot run \{'packed': True"):
        plan_attention(1, 4, CPU, torch.float32, position_ids=torch.tensor([[0, 1, 0, 1]]), path="sdpa_causal")
    with pytest.raises(ValueError, match=r"path 'flex' cannot run .*'cached': True"):
        plan_attention(1, 1, CPU, torch.float32, past=3, path="flex")


# ----------------------------------------------------------------------------- paths vs the dense reference


@pytest.mark.parametrize("window", [None, 37])
def test_dense_chunks_match_reference_forward_and_backward(window):
    q, k, v = qkv(requires_grad=True)
    positions = packed_positions(ROWS)
    plan = plan_attention(2, 300, CPU, torch.float32, position_ids=positions, sliding_window=window)
    assert plan.path == "sdpa_mask" and len(plan.chunks) == 3
    got = attend(q, k, v, plan)
    expected = attention_ref(
        q, k, v, build_attention_mask(2, 300, 300, CPU, position_ids=positions, sliding_window=window)
    )
    assert rel_err(got, expected) <= 1e-6
    grad = torch.randn_like(got)
    ours = torch.autograd.grad(got, (q, k, v), grad)
    ref = torch.autograd.grad(expected, (q, k, v), grad)
    for name, a, b in zip("qkv", ours, ref):
        assert rel_err(a, b) <= 1e-5, name


def test_dense_chunks_with_padding_and_cache_match_reference():
    """Decoding 140 new queries (two chunks) after 20 cached positions, with left padding and a window."""
    q, _, _ = qkv(tokens=140)
    _, k, v = qkv(tokens=160)
    padding = torch.ones(2, 160, dtype=torch.long)
    padding[1, :9] = 0
    plan = plan_attention(2, 140, CPU, torch.float32, past=20, key_padding=padding, sliding_window=50)
    assert plan.path == "sdpa_mask" and [c[:4] for c in plan.chunks] == [(0, 128, 0, 148), (128, 140, 99, 160)]
    expected = attention_ref(q, k, v, build_attention_mask(2, 140, 160, CPU, key_padding=padding, sliding_window=50))
    assert rel_err(attend(q, k, v, plan), expected) <= 1e-6


def test_dense_path_memory_is_bounded_for_a_4k_row():
    batch, heads, tokens = 1, 4, 4096
    q, k, v = qkv(batch, heads, 2, tokens, 8)
    positions = packed_positions([[1000, 3000, 96]])
    probe = LargestTensor()
    with probe:
        got = attend(q, k, v, plan_attention(batch, tokens, CPU, torch.float32, position_ids=positions))
    assert probe.largest < batch * heads * tokens * tokens / 4
    expected = attention_ref(q, k, v, build_attention_mask(batch, tokens, tokens, CPU, position_ids=positions))
    assert rel_err(got, expected) <= 1e-6


@pytest.mark.parametrize("window", [None, 37])
def test_flex_attention_on_cpu_matches_reference(window):
    """FlexAttention runs eagerly on the CPU (forward only): the document-causal block mask is right."""
    q, k, v = qkv()
    positions = packed_positions(ROWS)
    with torch.no_grad():
        plan = plan_attention(2, 300, CPU, torch.float32, position_ids=positions, sliding_window=window, path="flex")
        got = attend(q, k, v, plan)
        expected = attention_ref(
            q, k, v, build_attention_mask(2, 300, 300, CPU, position_ids=positions, sliding_window=window)
        )
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("kernel", ["flash_attn", *TORCH_VARLEN_APIS])
def test_varlen_glue_matches_reference(monkeypatch, kernel, window):
    if kernel == "flash_attn":
        calls = fake_flash_attn(monkeypatch)
        path = "flash_attn_varlen"
    else:
        calls = fake_torch_varlen(monkeypatch, TORCH_VARLEN_APIS[kernel])
        path = "torch_varlen"
    q, k, v = qkv(requires_grad=True)
    positions = packed_positions(ROWS)
    if kernel == "torch2.9" and window is not None:  # no window_size: the chooser sends these rows to flex
        with pytest.raises(ValueError, match="path 'torch_varlen' cannot run .*'windowed': True"):
            plan_attention(2, 300, CPU, torch.float32, position_ids=positions, sliding_window=window, path=path)
        return
    plan = plan_attention(2, 300, CPU, torch.float32, position_ids=positions, sliding_window=window, path=path)
    assert plan.cu_seqlens.tolist() == [0, 130, 131, 191, 300, 305, 505, 600] and plan.max_seqlen == 200
    got = attend(q, k, v, plan)
    expected = attention_ref(
        q, k, v, build_attention_mask(2, 300, 300, CPU, position_ids=positions, sliding_window=window)
    )
    assert rel_err(got, expected) <= 1e-6
    assert len(calls) == 1
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        assert rel_err(a, b) <= 1e-5


def test_windowed_rows_without_documents_are_one_document_each(monkeypatch):
    fake_flash_attn(monkeypatch)
    q, k, v = qkv(tokens=50)
    plan = plan_attention(2, 50, CPU, torch.float32, sliding_window=9, path="flash_attn_varlen")
    assert plan.cu_seqlens.tolist() == [0, 50, 100] and plan.max_seqlen == 50
    expected = attention_ref(q, k, v, build_attention_mask(2, 50, 50, CPU, sliding_window=9))
    assert rel_err(attend(q, k, v, plan), expected) <= 1e-6


def test_document_bounds():
    cu, longest = document_bounds(torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 0, 1]]), 2, 5, CPU)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 7, 8, 10] and longest == 3  # row 1 starts mid-document
    cu, longest = document_bounds(None, 3, 4, CPU)
    assert cu.tolist() == [0, 4, 8, 12] and longest == 4


# ----------------------------------------------------------------------------- through the model


def mistral(window=5):
    return CausalLM.from_config(preset("tiny", backend="torch", sliding_window=window, model_type="mistral")).eval()


def test_mistral_window_with_packing_equals_documents_alone():
    model = mistral(window=5)
    lengths = [7, 9, 4]
    docs = [torch.randint(0, 512, (1, n)) for n in lengths]
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), position_ids=packed_positions([lengths]))
        offset = 0
        for doc in docs:
            torch.testing.assert_close(packed[:, offset : offset + doc.shape[1]], model(doc), rtol=1e-5, atol=1e-5)
            offset += doc.shape[1]
        no_window = CausalLM.from_config(preset("tiny", backend="torch")).eval()
        no_window.load_state_dict(model.state_dict())
        assert not torch.allclose(no_window(docs[1]), model(docs[1]), atol=1e-3)  # the window cuts 9 tokens


@pytest.mark.parametrize("path", ["flex", "torch_varlen", "flash_attn_varlen"])
def test_model_paths_match_the_dense_path(monkeypatch, path):
    model = mistral(window=6)
    ids = torch.randint(0, 512, (2, 40))
    positions = packed_positions([[17, 1, 22], [40]])
    with torch.no_grad():
        dense = model(ids, position_ids=positions)
        assert model.last_attention_path == "sdpa_mask"
        fake_flash_attn(monkeypatch)
        fake_torch_varlen(monkeypatch, TORCH_VARLEN_APIS["torch2.14"])
        monkeypatch.setattr(attention, "choose_attention_path", lambda **situation: path)
        got = model(ids, position_ids=positions)
    assert model.last_attention_path == path
    assert rel_err(got, dense) <= 1e-5


def test_packed_forward_on_cpu_is_bounded_and_exact(monkeypatch):
    """A packed T=1024 row never holds a [B, H, T, T] tensor, nor a quarter of one; same logits as one chunk."""
    model = CausalLM.from_config(preset("tiny", backend="torch")).eval()
    batch, tokens, heads = 1, 1024, model.config.num_heads
    ids = torch.randint(0, 512, (batch, tokens))
    positions = packed_positions([[300, 500, 224]])
    probe = LargestTensor()
    with torch.no_grad():
        with probe:
            hidden = model(ids, position_ids=positions, return_hidden=True)
        monkeypatch.setattr(attention, "QUERY_CHUNK", tokens)  # one chunk: the whole [B, 1, T, T] mask
        whole = model(ids, position_ids=positions, return_hidden=True)
    assert probe.largest < batch * heads * tokens * tokens / 4
    assert rel_err(hidden, whole) <= 1e-6


def test_varlen_bounds_are_computed_once_per_forward(monkeypatch):
    """One host copy and nonzero for all layers (the old flash path ran nonzero and int(max) per layer)."""
    model = CausalLM.from_config(preset("tiny", backend="torch")).eval()
    assert len(model.model.layers) == 4
    calls = fake_torch_varlen(monkeypatch, TORCH_VARLEN_APIS["torch2.14"])
    monkeypatch.setattr(attention, "choose_attention_path", lambda **situation: "torch_varlen")
    ids = torch.randint(0, 512, (2, 12))
    positions = packed_positions([[4, 8], [5, 7]])
    counter = OpCounter("nonzero", "_local_scalar_dense")
    with torch.no_grad():
        # The fake kernel's own .tolist() runs outside the counter: count only the model's ops.
        original = attention._torch_varlen_attn

        def uncounted(*args, **kwargs):
            with torch.utils._python_dispatch._disable_current_modes():
                return original(*args, **kwargs)

        monkeypatch.setattr(attention, "_torch_varlen_attn", uncounted)
        with counter:
            model(ids, position_ids=positions)
    assert counter.counts == {"nonzero": 1, "_local_scalar_dense": 1}
    assert len(calls) == 4 and all(c is calls[0] for c in calls)


def test_caller_given_cu_seqlens_skip_the_bounds(monkeypatch):
    model = CausalLM.from_config(preset("tiny", backend="torch")).eval()
    fake_torch_varlen(monkeypatch, TORCH_VARLEN_APIS["torch2.14"])
    monkeypatch.setattr(attention, "choose_attention_path", lambda **situation: "torch_varlen")
    ids = torch.randint(0, 512, (2, 12))
    positions = packed_positions([[4, 8], [5, 7]])
    cu_seqlens = torch.tensor([0, 4, 12, 17, 24], dtype=torch.int32)
    with torch.no_grad():
        derived = model(ids, position_ids=positions)
        monkeypatch.setattr(attention, "document_bounds", lambda *a: pytest.fail("document_bounds was called"))
        given = model(ids, position_ids=positions, cu_seqlens=cu_seqlens, max_seqlen=8)
    torch.testing.assert_close(given, derived)


def test_bad_packing_arguments():
    model = CausalLM.from_config(preset("tiny", backend="torch"))
    ids = torch.zeros(2, 6, dtype=torch.long)
    positions = packed_positions([[2, 4], [6]])
    with pytest.raises(ValueError, match=r"position_ids must be \[B, T\] = \(2, 6\), got \(2, 5\)"):
        model(ids, position_ids=positions[:, :5])
    with pytest.raises(ValueError, match="pass cu_seqlens and max_seqlen together, got only cu_seqlens"):
        model(ids, position_ids=positions, cu_seqlens=torch.tensor([0, 2, 6, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D int32 tensor .* got torch.int64 \(4,\)"):
        model(ids, position_ids=positions, cu_seqlens=torch.tensor([0, 2, 6, 12]), max_seqlen=6)
    with pytest.raises(ValueError, match=r"max_seqlen must be an int in \[1, T = 6\], got 7"):
        model(ids, position_ids=positions, cu_seqlens=torch.tensor([0, 2, 6, 12], dtype=torch.int32), max_seqlen=7)
    with pytest.raises(
        ValueError, match=r"must describe position_ids' documents \(\[0, 2, 6, 12\], 6\), got \[0, 3, 6, 12\]"
    ):
        model(ids, position_ids=positions, cu_seqlens=torch.tensor([0, 3, 6, 12], dtype=torch.int32), max_seqlen=6)
    with pytest.raises(ValueError, match="need position_ids, and no attention_mask"):
        model(ids, cu_seqlens=torch.tensor([0, 6, 12], dtype=torch.int32), max_seqlen=6)


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["torch_varlen", "flex", "flash_attn_varlen"])
@pytest.mark.parametrize("window", [None, 6])
def test_gpu_paths_match_the_dense_path(monkeypatch, path, window):
    if path == "flash_attn_varlen" and not attention.HAS_FLASH_ATTN:
        pytest.skip("flash-attn is not installed")
    if path == "torch_varlen" and not (
        attention.HAS_TORCH_VARLEN and (window is None or attention.torch_varlen_windows())
    ):
        pytest.skip(f"torch {torch.__version__} has no varlen_attn for this case")
    model = CausalLM.from_config(preset("tiny", sliding_window=window), device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 512, (2, 200), device="cuda")
    positions = packed_positions([[70, 1, 129], [200]]).cuda()
    with torch.no_grad():
        monkeypatch.setattr(attention, "choose_attention_path", lambda **situation: "sdpa_mask")
        dense = model(ids, position_ids=positions)
        monkeypatch.setattr(attention, "choose_attention_path", lambda **situation: path)
        got = model(ids, position_ids=positions)
    assert model.last_attention_path == path
    assert rel_err(got, dense) < 2e-2


@pytest.mark.gpu
def test_gpu_packed_bf16_takes_a_varlen_or_flex_path():
    model = CausalLM.from_config(preset("tiny"), device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (2, 16), device="cuda")
    positions = packed_positions([[8, 8], [16]]).cuda()
    assert model.attention_path(ids, positions) in ("flash_attn_varlen", "torch_varlen", "flex")
