"""Every op under ``torch.autocast(dtype=torch.bfloat16)`` over fp32 leaves, as Hugging Face's Trainer
and TRL run ``bf16=True``: forward and every gradient against the op's ``*_ref`` run under the same
autocast (both judged against float64), outputs in the reference's dtype, each gradient in its
leaf's dtype, on every backend; backward outside the autocast region (the Trainer's way) and inside.
"""

from __future__ import annotations

import pytest
import torch

import solar_kernels as sk
from solar_kernels.ops.linear_logprobs import linear_cross_entropy_ref, linear_logprobs_ref, sequence_logprobs_ref
from solar_kernels.ops.rms_norm import rms_norm_ref
from solar_kernels.ops.rotary import apply_rotary_ref
from solar_kernels.ops.swiglu import swiglu_ref
from tests.helpers import IGNORE, rope_tables
from tests.tolerances import assert_close

AMP = torch.bfloat16


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _run(fn, leaves, upstream, device, autocast, backward_inside):
    """fn's outputs and the gradients of ``leaves`` (fresh copies) for the upstream grads."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    with torch.autocast(device.type, dtype=AMP, enabled=autocast):
        outs = _outputs(fn(*leaves))
        if backward_inside:
            grads = torch.autograd.grad(outs, leaves, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    if not backward_inside:
        grads = torch.autograd.grad(outs, leaves, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    return [o.detach() for o in outs], grads


def check(ours, ref, leaves, device, floor_dtype=AMP, backward_inside=False):
    """ours vs ref, both under autocast, against ref in float64 without it."""
    with torch.autocast(device.type, dtype=AMP):
        shapes = [o.shape for o in _outputs(ref(*leaves))]
    upstream = [torch.randn(shape, device=device) for shape in shapes]
    outs, grads = _run(ours, leaves, upstream, device, True, backward_inside)
    outs_ref, grads_ref = _run(ref, leaves, upstream, device, True, backward_inside)
    outs_exact, grads_exact = _run(ref, [t.double() for t in leaves], upstream, device, False, False)
    for i, (a, b, c) in enumerate(zip(outs, outs_ref, outs_exact)):
        assert a.dtype == b.dtype, f"output {i}: {a.dtype}, the reference under autocast gives {b.dtype}"
        assert_close(f"output {i}", a, b, c, floor_dtype)
    for i, (a, b, c, leaf) in enumerate(zip(grads, grads_ref, grads_exact, leaves)):
        assert a.dtype == leaf.dtype, f"gradient {i}: {a.dtype} for a {leaf.dtype} leaf"
        assert_close(f"gradient {i}", a, b, c, floor_dtype)
    return outs


@pytest.fixture(params=[False, True], ids=["backward_after", "backward_inside"])
def backward_inside(request):
    return request.param


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
def test_rms_norm(x_dtype, device, any_backend, backward_inside):
    """LlamaRMSNorm under autocast: fp32 math; a bf16 x with an fp32 weight gives an fp32 y, as HF's."""
    x = torch.randn(3, 7, 123, device=device).to(x_dtype)
    weight = 1 + 0.3 * torch.randn(123, device=device)
    outs = check(
        lambda x, w: sk.rms_norm(x, w, 1e-5, backend=any_backend),
        lambda x, w: rms_norm_ref(x, w, 1e-5),
        [x, weight],
        device,
        floor_dtype=x_dtype,
        backward_inside=backward_inside,
    )
    assert outs[0].dtype == torch.float32


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
def test_rms_norm_fused_residual(x_dtype, device, any_backend, backward_inside):
    """h = x + residual with a bf16 branch output and the fp32 residual stream: h and y fp32."""
    x = torch.randn(9, 123, device=device).to(x_dtype)
    residual = 4 * torch.randn(9, 123, device=device)
    weight = 1 + 0.3 * torch.randn(123, device=device)
    outs = check(
        lambda x, r, w: sk.rms_norm(x, w, 1e-5, residual=r, backend=any_backend),
        lambda x, r, w: rms_norm_ref(x, w, 1e-5, residual=r),
        [x, residual, weight],
        device,
        floor_dtype=x_dtype,
        backward_inside=backward_inside,
    )
    assert [o.dtype for o in outs] == [torch.float32, torch.float32]


def test_rms_norm_mixed_dtypes_match_transformers(device, any_backend):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(123, eps=1e-5).to(device)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.3 * torch.randn(123, device=device))
    x = torch.randn(5, 123, device=device, dtype=torch.bfloat16)
    with torch.autocast(device.type, dtype=AMP):
        ours = sk.rms_norm(x, hf.weight, 1e-5, backend=any_backend)
        expected = hf(x)
    assert ours.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    # Outside autocast y keeps x's dtype, as documented.
    assert sk.rms_norm(x, hf.weight, 1e-5, backend=any_backend).dtype == torch.bfloat16


@pytest.mark.parametrize("casting_mode", ["gemma", "none"])
def test_rms_norm_gemma_and_none_modes_keep_h_dtype(casting_mode, device, any_backend, backward_inside):
    """Liger's gemma and none modes (Gemma's offset 1) under autocast: y in h's dtype, not the llama
    mode's promotion (Gemma's RMSNorm returns ``type_as(x)``, Liger x's dtype); h as eager promotes."""
    x = torch.randn(3, 7, 123, device=device).to(torch.bfloat16)
    weight = 0.3 * torch.randn(123, device=device)
    options = dict(offset=1.0, casting_mode=casting_mode)
    any_backend = "auto" if any_backend == "cuda" else any_backend  # the CUDA twin lacks them: auto takes Triton
    outs = check(
        lambda x, w: sk.rms_norm(x, w, 1e-5, backend=any_backend, **options),
        lambda x, w: rms_norm_ref(x, w, 1e-5, **options),
        [x, weight],
        device,
        floor_dtype=torch.bfloat16,
        backward_inside=backward_inside,
    )
    assert outs[0].dtype == torch.bfloat16
    residual = 4 * torch.randn(3, 7, 123, device=device)
    outs = check(
        lambda x, r, w: sk.rms_norm(x, w, 1e-5, residual=r, backend=any_backend, **options),
        lambda x, r, w: rms_norm_ref(x, w, 1e-5, residual=r, **options),
        [x, residual, weight],
        device,
        floor_dtype=torch.bfloat16,
        backward_inside=backward_inside,
    )
    assert [o.dtype for o in outs] == [torch.float32, torch.float32]


def test_rms_norm_gemma_mode_matches_transformers(device, any_backend):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    hf = GemmaRMSNorm(123, eps=1e-5).to(device)
    with torch.no_grad():
        hf.weight.copy_(0.3 * torch.randn(123, device=device))
    x = torch.randn(5, 123, device=device, dtype=torch.bfloat16)
    backend = "auto" if any_backend == "cuda" else any_backend  # the CUDA twin lacks the gemma mode
    with torch.autocast(device.type, dtype=AMP):
        ours = sk.rms_norm(x, hf.weight, 1e-5, offset=1.0, casting_mode="gemma", backend=backend)
        expected = hf(x)
    assert ours.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("qk_dtype", [torch.float32, torch.bfloat16], ids=["qk_fp32", "qk_bf16"])
def test_apply_rotary(qk_dtype, device, any_backend, backward_inside):
    """q, k from autocast's bf16 projections with fp32 cos/sin tables: q', k' and grads in q's dtype."""
    q = torch.randn(2, 4, 7, 34, device=device).to(qk_dtype)
    k = torch.randn(2, 2, 7, 34, device=device).to(qk_dtype)
    cos, sin = rope_tables(torch.arange(7, device=device) * 37, 34)
    outs = check(
        lambda q, k: sk.apply_rotary(q, k, cos, sin, backend=any_backend),
        lambda q, k: apply_rotary_ref(q, k, cos, sin),
        [q, k],
        device,
        floor_dtype=qk_dtype,
        backward_inside=backward_inside,
    )
    assert [o.dtype for o in outs] == [qk_dtype, qk_dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu(dtype, device, any_backend, backward_inside):
    gate = (3 * torch.randn(5, 123, device=device)).to(dtype)
    up = torch.randn(5, 123, device=device).to(dtype)
    outs = check(
        lambda g, u: sk.swiglu(g, u, backend=any_backend),
        swiglu_ref,
        [gate, up],
        device,
        floor_dtype=dtype,
        backward_inside=backward_inside,
    )
    assert outs[0].dtype == dtype


def _lm_head_inputs(device, hidden_dtype, shape=(3, 11), d=40, vocab=257):
    hidden = torch.randn(*shape, d, device=device).to(hidden_dtype)
    weight = torch.randn(vocab, d, device=device) / d**0.5 * 2
    bias = torch.randn(vocab, device=device)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < 0.3] = IGNORE
    return hidden, weight, bias, labels


def _ce_options(device):
    return dict(
        label_smoothing=0.1, lse_square_scale=1e-3, softcap=6.0, ce_weight=torch.linspace(0.5, 1.5, 257, device=device)
    )


LM_HEAD_CASES = {
    "logprobs": (
        lambda b: lambda h, w, y, bias: sk.linear_logprobs(h, w, y, bias=bias, chunk_size=8, backend=b),
        lambda h, w, y, bias: linear_logprobs_ref(h, w, y, bias),
    ),
    "cross_entropy_mean": (
        lambda b: lambda h, w, y, bias: sk.linear_cross_entropy(h, w, y, bias=bias, chunk_size=8, backend=b),
        lambda h, w, y, bias: linear_cross_entropy_ref(h, w, y, bias),
    ),
    "cross_entropy_sum": (
        lambda b: lambda h, w, y, bias: sk.linear_cross_entropy(h, w, y, bias=bias, reduction="sum", backend=b),
        lambda h, w, y, bias: linear_cross_entropy_ref(h, w, y, bias, reduction="sum"),
    ),
    "cross_entropy_none": (
        lambda b: lambda h, w, y, bias: sk.linear_cross_entropy(h, w, y, bias=bias, reduction="none", backend=b),
        lambda h, w, y, bias: linear_cross_entropy_ref(h, w, y, bias, reduction="none"),
    ),
    # The cross-entropy options (Liger's), class weights in fp32 whatever the autocast dtype; the
    # CUDA run takes them through "auto" (the CUDA kernel has none).
    "cross_entropy_options_mean": (
        lambda b: (
            lambda h, w, y, bias: sk.linear_cross_entropy(
                h, w, y, bias=bias, chunk_size=8, backend=b if b != "cuda" else "auto", **_ce_options(h.device)
            )
        ),
        lambda h, w, y, bias: linear_cross_entropy_ref(h, w, y, bias, **_ce_options(h.device)),
    ),
    "cross_entropy_options_none": (
        lambda b: (
            lambda h, w, y, bias: sk.linear_cross_entropy(
                h, w, y, bias=bias, reduction="none", backend=b if b != "cuda" else "auto", **_ce_options(h.device)
            )
        ),
        lambda h, w, y, bias: linear_cross_entropy_ref(h, w, y, bias, reduction="none", **_ce_options(h.device)),
    ),
    "sequence": (
        lambda b: lambda h, w, y, bias: sk.sequence_logprobs(h, w, y, bias=bias, average=True, backend=b),
        lambda h, w, y, bias: sequence_logprobs_ref(h, w, y, bias, average=True),
    ),
}


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["hidden_fp32", "hidden_bf16"])
@pytest.mark.parametrize("which", list(LM_HEAD_CASES))
def test_lm_head_ops(which, hidden_dtype, device, any_backend, backward_inside):
    """Like F.linear under autocast: bf16 matmuls, fp32 log-probs and losses, fp32 grads for fp32
    leaves; a bf16 hidden with an fp32 weight (different dtypes) works as it does for F.linear."""
    hidden, weight, bias, labels = _lm_head_inputs(device, hidden_dtype)
    make_ours, ref = LM_HEAD_CASES[which]
    ours = make_ours(any_backend)
    outs = check(
        lambda h, w, b: ours(h, w, labels, b),
        lambda h, w, b: ref(h, w, labels, b),
        [hidden, weight, bias],
        device,
        backward_inside=backward_inside,
    )
    assert outs[0].dtype == torch.float32


def test_lm_head_ops_cast_like_linear(device, any_backend):
    """The logits are those of autocast's F.linear: the loss equals the reference's to fp32 rounding."""
    hidden, weight, _, labels = _lm_head_inputs(device, torch.float32, shape=(20,))
    with torch.autocast(device.type, dtype=AMP):
        ours = sk.linear_cross_entropy(hidden, weight, labels, backend=any_backend)
        expected = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(hidden, weight).float(), labels, ignore_index=IGNORE
        )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # and differs from the fp32 loss by bf16 rounding: the matmul really ran in bf16
    assert (ours - torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE)).abs() > 1e-6


def test_logits_cross_entropy_under_autocast(device, any_backend):
    """sk.cross_entropy on bf16 logits under autocast: an fp32 loss, as eager F.cross_entropy there,
    and the gradient in the logits' dtype."""
    logits = (3 * torch.randn(13, 77, device=device)).bfloat16().requires_grad_()
    labels = torch.randint(0, 77, (13,), device=device)
    labels[:3] = IGNORE
    with torch.autocast(device.type, dtype=AMP):
        ours = sk.cross_entropy(
            logits, labels, label_smoothing=0.1, backend=any_backend if any_backend != "cuda" else "auto"
        )  # CUDA has no options
        expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=0.1)
    assert ours.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(ours, logits)
    assert grad.dtype == torch.bfloat16
    assert sk.cross_entropy(logits, labels, backend=any_backend).dtype == torch.bfloat16  # outside autocast


@pytest.mark.parametrize("which", ["cross_entropy", "rms_norm"])
def test_torch_compile_fullgraph_under_autocast(which, device, any_backend):
    hidden, weight, _, labels = _lm_head_inputs(device, torch.float32, shape=(3, 7), d=16, vocab=90)
    norm_weight = 1 + 0.3 * torch.randn(16, device=device)
    used = (hidden, norm_weight) if which == "rms_norm" else (hidden, norm_weight, weight)
    leaves = [t.clone().requires_grad_() for t in used]

    def f(h, nw, w=None):
        normed = sk.rms_norm(h, nw, 1e-5, backend=any_backend)
        if w is None:
            return normed.pow(2).sum()
        return sk.linear_cross_entropy(normed, w, labels, backend=any_backend) * 1.5

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    with torch.autocast(device.type, dtype=AMP):
        eager = f(*leaves)
        out = compiled(*leaves)
    torch.testing.assert_close(out, eager)
    for a, e, leaf in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(eager, leaves), leaves):
        assert a.dtype == leaf.dtype
        torch.testing.assert_close(a, e)
