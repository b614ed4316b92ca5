"""Token log-probabilities through the LM head, without ever holding the full logits.

Math, for token t with hidden state h_t [d], LM head W [V, d], optional bias b [V], label y_t:

    z_t        = W h_t + b                          (logits, [V])
    logp[t]    = z_t[y_t] - logsumexp(z_t)          (fp32; 0 where y_t == ignore_index)
    d logp[t] / d z_t = onehot(y_t) - softmax(z_t)

``linear_cross_entropy`` is ``-mean`` (or ``-sum``) of logp over the non-ignored tokens, and
``sequence_logprobs`` its per-row sum (or mean) over a [B, T] batch: the log-likelihood DPO needs.
Labels are already shifted by the caller (the label at position t is the token at t + 1).

How: tokens are processed in chunks of ``chunk_size`` rows. For each chunk the logits [C, V] come
from one matmul in the hidden dtype (cuBLAS on a GPU); a per-row step reduces each row to its
log-sum-exp and label logit in fp32 and, when a gradient is wanted, overwrites the chunk's logits
in place with ``g_t * (onehot - softmax)``; two more matmuls turn that into the chunk's dhidden
and its share of dweight. Only one chunk's logits exist at a time, in forward and backward. The
per-row step is the Triton ``_logprobs_kernel`` below or its CUDA C++ twin
(``torch.ops.solar_kernels_C.logprobs_``, csrc/logprobs.cu), both behind the kernel record
``LOGPROBS`` (solar_kernels/ops/_registry.py), or for ``backend="torch"`` the same
arithmetic in PyTorch ops (``_logprobs_rows_torch``, in place on the chunk): the chunking, the
matmuls and the autograd are shared by all three backends. ``*_ref`` below are the plain unchunked
references (full ``[N, V]`` logits) that tests compare against.

- ``linear_logprobs`` / ``sequence_logprobs`` (a gradient per token): forward keeps only the
  log-sum-exp per token; backward recomputes each chunk's logits (4 matmuls in all).
- ``linear_cross_entropy`` with ``reduction="mean"|"sum"`` (a scalar loss): the gradients are
  computed during the forward, while the logits are at hand, and only scaled in backward
  (3 matmuls in all, the minimum).

Cross-entropy options (``linear_cross_entropy``, and ``cross_entropy`` in cross_entropy.py, which runs
the same row step on logits it is given), as Liger-Kernel 0.8.5's fused linear cross-entropy has
them. For a row with logits z [V], class weights w (1 without ``ce_weight``), s = label_smoothing,
eps = s / V, c = softcap, a = lse_square_scale:

    z'_i = c * tanh(z_i / c)                (softcap; in fp32 inside the row step; else z' = z)
    ce_t = (1 - s) * w_y * (lse - z'_y) + eps * (W * lse - S),   W = sum_i w_i,  S = sum_i w_i z'_i
    zl_t = a * lse^2                        (z-loss, unweighted)

"mean" is sum_t ce_t / sum_t w_y + sum_t zl_t / n over the n non-ignored tokens (PyTorch's
normalization of class weights; Liger's unweighted z-loss), "sum" the sums, "none" ce_t + zl_t
per token. The returned loss includes the z-loss; ``return_z_loss`` also returns it alone
(reduced like the loss), ``return_token_accuracy`` the share of non-ignored tokens whose first
largest z' is the label (per token for "none"; NaN when n = 0, as Liger), both without gradient,
together in a ``CrossEntropyOutput``. The row step computes lse, logp = z'_y - lse, S and the
argmax per row; the loss is put together from these [N] vectors. Its gradient mode writes

    dz_i = (1 - tanh^2(z_i / c)) * (g (onehot_i - p_i) + h (W p_i - w_i) + q lse p_i),  p = softmax(z')

with per-row coefficients g = -(1 - s) w_y G, h = eps G, q = 2 a Gz for G = d loss / d ce_t and
Gz = d loss / d zl_t (``ce_gradient``); without options this is the log-probs' g (onehot - p). The
CUDA C++ twin has no options: an explicit ``backend="cuda"`` with one is refused, "auto" runs
Triton (or, where only CUDA runs, PyTorch). ``reduction="none"`` keeps the log-sum-exp per token
and computes the gradients in backward, like ``linear_logprobs``.

Chunk rule (``default_chunk_rows``): 4096 rows, fewer when they do not fit, i.e. at most
``2**28 // V`` rows (a chunk's logits stay within 2**28 elements, 512 MiB in bf16: 4096 rows up to
V = 65536, 2048 at V = 128256) and fewer than half of the N tokens (chunking always saves at least
half of the full logits); rounded down to whole 64-row tiles from 128 rows up. On the CPU the cap is
``2**22`` logits (16 MiB in fp32, 85 rows at V = 49152): there memory, not the matmul's size, is
the limit, and a 1022-token fwd + bwd at V = 49152 took the same time at 64, 128, 256 and 448 rows
(1.05-1.08 s on 2 cores).

dweight and dbias accumulate over chunks in fp32 inside the matmul: ``addmm`` into an fp32
accumulator, with ``out_dtype=torch.float32`` for 16-bit inputs where the device has it (CUDA,
torch >= 2.8), else (the CPU) from the chunk's operands widened to fp32, which is exact for 16-bit
values; no per-chunk partial is rounded. One final scale-and-cast turns the accumulator into the
weight's dtype: at the end of the backward pass, or for the cross-entropy in its backward, where
the fp32 accumulator, held from the forward, is multiplied by ``grad_loss`` and rounded once,
straight into the result (the held gradient takes V * d * 4 bytes instead of a 16-bit copy's 2; the
peak, accumulator plus result, stays V * d * 6 as when the forward made that copy). Ignored
tokens read no logits in the kernel and give exactly zero gradient.

Shapes: hidden [N, d] or [B, T, d]; weight [V, d]; bias [V]; labels [N] or [B, T] (int64 or
int32). Dtypes: hidden, weight and bias all fp32, fp16 or bf16 (the same); log-probs and losses
in fp32; gradients in their input's dtype.

Under ``torch.autocast`` these ops behave like the eager ``F.linear(hidden, weight, bias)`` they
replace followed by an fp32 log-softmax (Hugging Face's ``logits.float()``): hidden, weight and bias
are cast to the autocast dtype (so they may come in different dtypes, e.g. bf16 hidden states and an
fp32 weight), the matmuls run in it, log-probs and losses come out in fp32, and each gradient comes
back in its leaf's dtype through the cast (an fp32 weight gets an fp32 grad). ``*_ref`` run under the
same autocast do the same.

Labels outside [0, V) other than ignore_index: on the CPU, and on a GPU when the environment
variable ``SOLAR_KERNELS_CHECK_LABELS=1`` is set, a ``ValueError`` names the first such label
before any work (a host sync). On a GPU without the flag there is no sync: the kernel makes that
token's log-prob and gradient NaN, so the loss is NaN rather than silently wrong.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import _checks
from .._backend import BACKEND_ENV_VAR, resolve_backend
from ._autocast import autocast_disabled, cast_like_linear
from ._common import as_rows, cast_to
from ._registry import Kernel, custom_op, register, rows_width

logger = logging.getLogger(__name__)

CHECK_LABELS_ENV_VAR = "SOLAR_KERNELS_CHECK_LABELS"
_REDUCTIONS = ("mean", "sum", "none")
# Vocabulary columns per loop step of one row: 4096 fp32 values over 8 warps, 16 per thread.
_BLOCK_V = 4096
# Rows per chunk: 4096 makes each chunk's matmuls large enough to run near peak on a GPU ([4096, d]
# by [d, V]); a chunk's logits are capped at 2**28 elements (512 MiB in bf16) for large vocabularies.
_MAX_CHUNK_ROWS = 4096
_MAX_CHUNK_LOGITS = 2**28
_MAX_CHUNK_LOGITS_CPU = 2**22


def linear_logprobs_ref(hidden, weight, labels, bias=None, ignore_index=-100) -> torch.Tensor:
    """``linear_logprobs`` (its arguments, positional) in plain PyTorch: full logits in the hidden
    dtype, upcast to fp32 (as HF does)."""
    logits = _full_logits(hidden, weight, bias)
    valid = labels != ignore_index
    picked = logits.log_softmax(-1).gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1))
    return torch.where(valid, picked.squeeze(-1), 0.0)


def _full_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The references' logits: one matmul in the hidden dtype, upcast to fp32 (as HF does)."""
    return torch.nn.functional.linear(hidden, weight, bias).float()


def _per_sequence(logp: torch.Tensor, labels: torch.Tensor, ignore_index: int, average: bool) -> torch.Tensor:
    """Token log-probs [B, T] (0 where ignored) summed per row, or averaged over the row's counted
    tokens (a row with none gives 0): [B]."""
    total = logp.sum(-1)
    if average:
        return total / (labels != ignore_index).sum(-1).clamp_min(1)
    return total


def linear_cross_entropy_ref(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean", **options):
    """``linear_cross_entropy`` (its arguments) as ``cross_entropy_ref`` of the full logits in the
    hidden dtype, upcast to fp32 (as HF does); ``options`` are its options, with the class weights as
    ``ce_weight``. "mean" divides by the non-ignored count (the sum of their class weights), 0 if none."""
    from .cross_entropy import cross_entropy_ref  # that module builds on this one

    if "ce_weight" in options:
        options["weight"] = options.pop("ce_weight")
    logits = _full_logits(hidden, weight, bias)
    return cross_entropy_ref(logits, labels, ignore_index=ignore_index, reduction=reduction, **options)


def sequence_logprobs_ref(hidden, weight, labels, bias=None, ignore_index=-100, average=False) -> torch.Tensor:
    """``sequence_logprobs`` (its arguments): the per-row sum (or mean) of ``linear_logprobs_ref``
    over non-ignored tokens; [B, T] -> [B]."""
    return _per_sequence(linear_logprobs_ref(hidden, weight, labels, bias, ignore_index), labels, ignore_index, average)


@triton.jit
def _tanh(x):
    # tl has no tanh (libdevice's is a stub under the interpreter): an odd series where the exp form
    # would cancel (|x| < 0.3, error < 5e-8 relative), (1 - e) / (1 + e) with e = exp(-2|x|) elsewhere.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    x2 = x * x
    series = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.3, series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def _logprobs_kernel(
    Z,
    LABELS,
    LOGP,
    LSE,
    GRAD,
    CLASS_WEIGHT,
    CLASS_WEIGHT_SUM,
    SMOOTH_OUT,
    CORRECT,
    GRAD_SMOOTH,
    GRAD_Z,
    stride_z_row,
    stride_grad_row,
    n_vocab,
    ignore_index,
    softcap,
    COMPUTE_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    SMOOTH_SUM: tl.constexpr,
    SMOOTH_GRAD: tl.constexpr,
    Z_LOSS: tl.constexpr,
    ACCURACY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program per token row of the chunk's logits Z [C, V]. With SOFTCAP every logit z is read
    # as softcap * tanh(z / softcap) (in fp32); the flags after it are the cross-entropy options
    # (module docstring: "Cross-entropy options").
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < n_vocab)
    z_row = Z + row * stride_z_row
    if COMPUTE_LSE:
        # Online log-sum-exp over vocabulary tiles; ignored rows load nothing (all -inf).
        row_max = tl.full((), float("-inf"), tl.float32)
        sum_exp = tl.zeros((), tl.float32)
        smooth_sum = tl.zeros((), tl.float32)  # sum_i w_i z_i (w_i = 1 without class weights)
        best = tl.zeros((), tl.int32)  # first column of the row's largest logit
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            load_mask = (cols < n_vocab) & valid
            z = tl.load(z_row + cols, mask=load_mask, other=float("-inf")).to(tl.float32)
            if SOFTCAP:
                z = tl.where(load_mask, softcap * _tanh(z / softcap), float("-inf"))
            tile_max = tl.max(z, axis=0)
            if ACCURACY:
                tile_best = tl.min(tl.where(z == tile_max, cols, n_vocab), axis=0)
                best = tl.where(tile_max > row_max, tile_best, best)
            if SMOOTH_SUM:
                if HAS_CLASS_WEIGHT:
                    w = tl.load(CLASS_WEIGHT + cols, mask=load_mask, other=0.0)
                    smooth_sum += tl.sum(w * tl.where(load_mask, z, 0.0), axis=0)
                else:
                    smooth_sum += tl.sum(tl.where(load_mask, z, 0.0), axis=0)
            new_max = tl.maximum(row_max, tile_max)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            sum_exp = sum_exp * tl.exp(row_max - shift) + tl.sum(tl.exp(z - shift), axis=0)
            row_max = new_max
        lse = row_max + tl.log(tl.where(valid, sum_exp, 1.0))
        z_label = tl.load(z_row + tl.where(valid & in_range, label, 0), mask=valid & in_range, other=0.0)
        z_label = z_label.to(tl.float32)
        if SOFTCAP:
            z_label = softcap * _tanh(z_label / softcap)
        logp = tl.where(valid, z_label - lse, 0.0)
        tl.store(LOGP + row, tl.where(valid & ~in_range, float("nan"), logp))
        lse = tl.where(valid, lse, 0.0)
        tl.store(LSE + row, lse)
        if SMOOTH_SUM:
            tl.store(SMOOTH_OUT + row, tl.where(valid, smooth_sum, 0.0))
        if ACCURACY:
            tl.store(CORRECT + row, tl.where(valid & in_range & (best.to(tl.int64) == label), 1.0, 0.0))
    else:
        lse = tl.load(LSE + row)
    if WRITE_GRAD:
        # Z is overwritten in place with its gradient (module docstring):
        #   dz_i = chain_i * (g * (onehot_i - p_i) + h * (W p_i - w_i) + q * lse * p_i),
        # g = d loss / d logp[row], h the label-smoothing and q the z-loss coefficient of the row,
        # p = softmax, W = sum_i w_i, chain_i = 1 - tanh^2 (softcap) or 1.
        g = tl.load(GRAD + row * stride_grad_row).to(tl.float32)
        g = tl.where(valid, g, 0.0)
        g = tl.where(valid & ~in_range, float("nan"), g)
        p_coef = -g
        h = 0.0
        if SMOOTH_GRAD:
            h = tl.where(valid, tl.load(GRAD_SMOOTH + row), 0.0)
            if HAS_CLASS_WEIGHT:
                p_coef += h * tl.load(CLASS_WEIGHT_SUM)
            else:
                p_coef += h * n_vocab
        if Z_LOSS:
            p_coef += tl.where(valid, tl.load(GRAD_Z + row), 0.0) * lse
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            col_mask = cols < n_vocab
            load_mask = col_mask & valid
            z = tl.load(z_row + cols, mask=load_mask, other=float("-inf")).to(tl.float32)
            if SOFTCAP:
                t = _tanh(z / softcap)
                z = tl.where(load_mask, softcap * t, float("-inf"))
            dz = tl.where(cols == label, g, 0.0) + p_coef * tl.exp(z - lse)
            if SMOOTH_GRAD:
                if HAS_CLASS_WEIGHT:
                    dz -= h * tl.load(CLASS_WEIGHT + cols, mask=load_mask, other=0.0)
                else:
                    dz -= h
            if SOFTCAP:
                dz = tl.where(load_mask, dz * (1.0 - t * t), 0.0)
            tl.store(z_row + cols, cast_to(dz, Z.dtype.element_ty), mask=col_mask)


@dataclasses.dataclass
class RowOptions:
    """The cross-entropy options of the per-row step, for one pass (slice with ``rows``).

    Inputs: ``softcap``; ``class_weight`` [V] fp32 and its sum [] (``class_weight_sum``). Outputs of
    a pass that computes the log-sum-exp: ``smooth_sum`` [C] (sum_i w_i z_i per row) and ``correct``
    [C] (1.0 where the row's first largest logit is its label). Per-row gradient coefficients
    (module docstring) ``grad_smooth`` h and ``grad_z`` q, [C] contiguous fp32. Unset ones are off.
    """

    softcap: float | None = None
    class_weight: torch.Tensor | None = None
    class_weight_sum: torch.Tensor | None = None
    smooth_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    grad_smooth: torch.Tensor | None = None
    grad_z: torch.Tensor | None = None

    def rows(self, start: int, end: int) -> RowOptions:
        def part(t):
            return t[start:end] if t is not None else None

        return dataclasses.replace(
            self,
            smooth_sum=part(self.smooth_sum),
            correct=part(self.correct),
            grad_smooth=part(self.grad_smooth),
            grad_z=part(self.grad_z),
        )

    @classmethod
    def for_gradient(
        cls,
        softcap: float | None = None,
        class_weight: torch.Tensor | None = None,
        grad_smooth: torch.Tensor | None = None,
        grad_z: torch.Tensor | None = None,
    ) -> RowOptions:
        """The options of a gradient pass, from a backward custom op's flat arguments (a schema has
        no place for a dataclass; the dispatcher leaves out trailing ones that are None, their
        default in GRADIENT_OPTIONS_SCHEMA)."""
        return cls(
            softcap=softcap,
            class_weight=class_weight,
            grad_smooth=grad_smooth,
            grad_z=grad_z,
            class_weight_sum=class_weight.sum() if class_weight is not None else None,
        )

    def gradient_arguments(self) -> tuple[float | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(softcap, class_weight, grad_smooth, grad_z): the flat arguments of a backward custom op
        that ``for_gradient`` turns back into these options."""
        return self.softcap, self.class_weight, self.grad_smooth, self.grad_z

    @property
    def plain(self) -> bool:
        """No option is on: the per-row step of the log-probs (the CUDA kernel's only mode)."""
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))


_PLAIN = RowOptions()

# The custom ops' schemas are built from the pieces they share: the LM head's tensors, which every op
# over hidden states takes first (``_chunked_pass``'s order), the gradients a pass computes, and the
# row step's cross-entropy options, in a forward op's order and in ``RowOptions.gradient_arguments``'
# (a backward op's). An option left at its default is off.
_LM_HEAD_SCHEMA = "Tensor hidden, Tensor weight, Tensor? bias, Tensor labels"
_NEEDS_SCHEMA = "bool need_dhidden, bool need_dweight, bool need_dbias"
FORWARD_OPTIONS_SCHEMA = (
    "Tensor? class_weight=None, float label_smoothing=0., float lse_square_scale=0., float? softcap=None, "
    "bool want_accuracy=False"
)
GRADIENT_OPTIONS_SCHEMA = (
    "float? softcap=None, Tensor? class_weight=None, Tensor? grad_smooth=None, Tensor? grad_z=None"
)


class ForwardOptions(NamedTuple):
    """A forward op's cross-entropy options, its trailing arguments (FORWARD_OPTIONS_SCHEMA: the same
    order and defaults). The dispatcher leaves out trailing arguments equal to their defaults, so the
    op reads them through this, ``ForwardOptions(*options)``."""

    class_weight: torch.Tensor | None = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    softcap: float | None = None
    want_accuracy: bool = False


def _logprobs_rows_torch(logits, labels, logp, lse, grad, ignore_index, compute_lse, write_grad, options=_PLAIN):
    """``_logprobs_kernel`` in PyTorch ops, with its arguments, results and rules: fp32 arithmetic,
    ignored rows all zero, out-of-range labels NaN. Works in place on the chunk's logits [C, V]
    (through one fp32 copy for 16-bit logits), which it leaves as scratch when ``write_grad`` is off."""
    vocab = logits.shape[1]
    valid = labels != ignore_index
    out_of_range = valid & ((labels < 0) | (labels >= vocab))
    index = torch.where(valid & ~out_of_range, labels, 0).long().unsqueeze(1)  # [C, 1]
    z = logits if logits.dtype == torch.float32 else logits.float()  # [C, V] fp32
    chain = None
    if options.softcap is not None:
        z = z.div_(options.softcap).tanh_()  # tanh(z / softcap), in place
        chain = 1.0 - z * z if write_grad else None  # d capped / d z
        z.mul_(options.softcap)
    weight = options.class_weight
    if compute_lse:
        if options.correct is not None:
            options.correct.copy_((valid & ~out_of_range & (z.argmax(1) == labels)).float())
        if options.smooth_sum is not None:
            smooth = (z * weight).sum(1) if weight is not None else z.sum(1)
            options.smooth_sum.copy_(torch.where(valid, smooth, 0.0))
        row_max = z.amax(1, keepdim=True)  # [C, 1]
        z_label = z.gather(1, index)
        exp = z.sub_(row_max).exp_()  # exp(z - max), in place
        sum_exp = exp.sum(1, keepdim=True)
        row_lse = (row_max + sum_exp.log()).squeeze(1)
        row_logp = torch.where(valid, z_label.squeeze(1) - row_lse, 0.0)
        logp.copy_(torch.where(out_of_range, float("nan"), row_logp))
        lse.copy_(torch.where(valid, row_lse, 0.0))
        row_lse = lse
    elif write_grad:
        exp = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, from the saved log-sum-exp
        sum_exp = None
        row_lse = lse
    if not write_grad:
        return
    g = torch.where(valid, grad.float(), 0.0)  # d loss / d logp per row
    g = torch.where(out_of_range, float("nan"), g)
    p_coef = -g
    if options.grad_smooth is not None:
        h = torch.where(valid, options.grad_smooth, 0.0)
        p_coef = p_coef + h * (options.class_weight_sum if weight is not None else vocab)
    if options.grad_z is not None:
        p_coef = p_coef + torch.where(valid, options.grad_z, 0.0) * row_lse
    row_scale = p_coef if sum_exp is None else p_coef / sum_exp.squeeze(1)
    dz = exp.mul_(row_scale.unsqueeze(1))  # p_coef * softmax
    dz.scatter_add_(1, index, g.unsqueeze(1))  # + g at the label
    if options.grad_smooth is not None:
        dz.sub_(h.unsqueeze(1) * weight if weight is not None else h.unsqueeze(1))
    if chain is not None:
        dz.mul_(chain)
    dz.masked_fill_(~valid.unsqueeze(1), 0.0)  # exact zeros, whatever an ignored row's logits were
    if dz is not logits:
        logits.copy_(dz)


def _logprobs_rows(backend, logits, labels, logp, lse, grad, ignore_index, compute_lse, write_grad, options=_PLAIN):
    """The per-row step over one chunk's logits [C, V], in place: the record ``LOGPROBS`` (Triton's
    kernel or its CUDA twin, which has no cross-entropy options), or the PyTorch ops of
    ``_logprobs_rows_torch``."""
    if backend == "torch":
        _logprobs_rows_torch(logits, labels, logp, lse, grad, ignore_index, compute_lse, write_grad, options)
        return
    LOGPROBS.launch(
        backend,
        logits,
        labels,
        logp,
        lse,
        grad,
        ignore_index=ignore_index,
        compute_lse=compute_lse,
        write_grad=write_grad,
        options=options,
    )


def _logprobs_triton(logits, labels, logp, lse, grad, ignore_index, compute_lse, write_grad, options=_PLAIN):
    """``_logprobs_kernel`` over the chunk, in place (the arguments of ``_logprobs_rows``)."""
    vocab = logits.shape[1]
    dummy = lse  # for the pointers of options that are off: never read or written

    def ptr(t):
        return t if t is not None else dummy

    _logprobs_kernel[(logits.shape[0],)](
        logits,
        labels,
        logp,
        lse,
        grad,
        ptr(options.class_weight),
        ptr(options.class_weight_sum),
        ptr(options.smooth_sum),
        ptr(options.correct),
        ptr(options.grad_smooth),
        ptr(options.grad_z),
        logits.stride(0),
        grad.stride(0),
        vocab,
        ignore_index,
        options.softcap if options.softcap is not None else 1.0,
        COMPUTE_LSE=compute_lse,
        WRITE_GRAD=write_grad,
        SOFTCAP=options.softcap is not None,
        HAS_CLASS_WEIGHT=options.class_weight is not None,
        SMOOTH_SUM=options.smooth_sum is not None,
        SMOOTH_GRAD=options.grad_smooth is not None,
        Z_LOSS=options.grad_z is not None,
        ACCURACY=options.correct is not None,
        BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(vocab)),
        num_warps=8,
    )


def _logprobs_example(rows: int, width: int, dtype: torch.dtype, device, make=torch.randn):
    """One chunk of ``rows`` rows over a vocabulary of ``width``: logits, labels, logp, lse, grad."""
    logits = make(rows, width, dtype=dtype, device=device)
    labels = torch.randint(0, max(1, width), (rows,), device=device)
    logp, lse, grad = (make(rows, dtype=torch.float32, device=device) for _ in range(3))
    return logits, labels, logp, lse, grad


# The per-row step, in place on (logits, labels, logp, lse, grad): no outputs of its own. The CUDA op
# (csrc/logprobs.cu, logprobs_host.cpp) is torch.ops.solar_kernels_C.logprobs_ and runs the plain
# step only. Variants: the cross-entropy forward (lse and gradient in one pass, what auto times), the
# log-probs forward (lse only) and backward (gradient from the saved lse).
LOGPROBS = register(
    Kernel(
        "logprobs",
        "linear_logprobs",
        triton=_logprobs_triton,
        outputs=lambda *inputs: (),
        rows_width=lambda logits, *rest: rows_width(logits),
        example=_logprobs_example,
        variants=tuple(
            {"ignore_index": -100, "compute_lse": lse, "write_grad": grad}
            for lse, grad in ((True, True), (True, False), (False, True))
        ),
        cuda_name="logprobs_",
        cuda_runs=lambda *inputs, options=_PLAIN, **rest: options.plain,
        cuda_options=("ignore_index", "compute_lse", "write_grad"),
        in_place=(0, 2, 3),
        shape_of=lambda config, tokens: (default_chunk_rows(tokens, config.vocab_size), config.vocab_size),
    )
)


def row_backend(backend: str, rows: int, vocab: int, device: torch.device, options: RowOptions) -> str:
    """The implementation of the row step for a pass over ``rows`` rows: ``backend``, or for "auto"
    this GPU's choice, which is Triton where options are on (the CUDA kernel has none; an explicit
    "cuda" with options was refused by ``backend_for_options``)."""
    return LOGPROBS.choose(backend, rows, vocab, device, cuda_runs=options.plain)


def default_chunk_rows(n_rows: int, vocab_size: int, device_type: str = "cuda") -> int:
    """Rows per chunk: 4096 where they fit (module docstring), always < half of the ``n_rows`` tokens;
    ``device_type`` "cpu" caps a chunk's logits at 2**22 instead of 2**28."""
    max_logits = _MAX_CHUNK_LOGITS_CPU if device_type == "cpu" else _MAX_CHUNK_LOGITS
    rows = min(_MAX_CHUNK_ROWS, max_logits // vocab_size, (n_rows - 1) // 2)
    if rows >= 128:
        rows -= rows % 64  # whole 64-row tiles for the matmuls
    return max(1, rows)


_ADDMM_OUT_DTYPE_RUNS: dict[tuple[str, torch.dtype], bool] = {}  # probed once each


def _addmm_out_dtype_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)`` runs for ``dtype``
    operands on this kind of device: on CUDA since torch 2.8; not on the CPU (torch 2.14 has no CPU
    kernel for ``aten::addmm.dtype_out``). Probed once per device type and dtype on a 1 x 1 problem."""
    key = (device.type, dtype)
    if key not in _ADDMM_OUT_DTYPE_RUNS:
        acc = torch.zeros(1, 1, dtype=torch.float32, device=device)
        one = torch.ones(1, 1, dtype=dtype, device=device)
        try:  # unsupported dtypes and devices raise at the call; no sync to read the result
            torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
            runs = True
        except (TypeError, RuntimeError) as error:  # no out_dtype (torch < 2.8), or no kernel here
            logger.debug("addmm with out_dtype does not run for %s on %s: %s", dtype, device.type, error)
            runs = False
        _ADDMM_OUT_DTYPE_RUNS[key] = runs
    return _ADDMM_OUT_DTYPE_RUNS[key]


def _add_matmul_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32, accumulated in fp32 inside the matmul: no [V, d] partial."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _addmm_out_dtype_runs(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        # The chunk's operands widened to fp32 (exact for 16-bit values): temporaries of the chunk's
        # size, [V, C] and [C, d], never a rounded [V, d] partial.
        acc.addmm_(a.float(), b.float())


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    *,
    lse: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
    backend: str = "triton",
    options: RowOptions = _PLAIN,
):
    """One pass over token chunks of hidden [N, d] and labels [N].

    Without ``lse`` it computes logp and lse [N] (fp32). With ``grad`` (d loss / d logp, [N] or
    expanded) it also returns the gradients ``needs`` asks for, in the order (dhidden, dweight, dbias)
    (None otherwise): dhidden in the hidden dtype, dweight and dbias as their fp32 accumulators, for
    the caller's final scale-and-cast. ``backend`` runs the per-row step: "torch", "triton", "cuda"
    or "auto" (decided once for this pass's chunk shape). ``options`` are the cross-entropy options
    of the per-row step, over all N rows (its outputs are filled). Autocast is off inside: the caller has chosen the dtypes.
    """
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    compute_lse = lse is None
    if compute_lse:
        logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
    else:
        logp = lse  # not written: COMPUTE_LSE is off
    write_grad = grad is not None
    need_dhidden, need_dweight, need_dbias = needs
    dhidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dhidden else None
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dweight else None
    dbias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_dbias else None
    grad_arg = grad if write_grad else lse
    implementation = row_backend(backend, min(chunk_rows, n_rows), vocab, hidden.device, options)
    with autocast_disabled(hidden.device):
        for start in range(0, n_rows, chunk_rows):
            end = min(start + chunk_rows, n_rows)
            hidden_chunk = hidden[start:end]
            logits = torch.nn.functional.linear(hidden_chunk, weight, bias)  # [C, V], hidden dtype
            _logprobs_rows(
                implementation,
                logits,
                labels[start:end],
                logp[start:end],
                lse[start:end],
                grad_arg[start:end],
                ignore_index,
                compute_lse,
                write_grad,
                options.rows(start, end),
            )
            if not write_grad:
                continue
            dlogits = logits  # overwritten in place by the per-row step
            if need_dhidden:
                torch.mm(dlogits, weight, out=dhidden[start:end])
            if need_dweight:
                _add_matmul_fp32(dweight, dlogits.t(), hidden_chunk)  # [V, C] @ [C, d]
            if need_dbias:
                dbias.add_(dlogits.sum(0, dtype=torch.float32))
    return logp, lse, (dhidden, dweight, dbias)


def _or_empty(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return tensor if tensor is not None else like.new_empty(0)


# A custom op's fake (``custom_op``'s ``fake``) names its leading arguments up to the last one it
# shapes its outputs from and takes the rest as ``*_``: the dispatcher passes them all positionally.
def fake_row_outputs(like: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """A fake's ``count`` per-row outputs: fp32 [like.shape[0]] each, on ``like``'s device."""
    return tuple(like.new_empty(like.shape[0], dtype=torch.float32) for _ in range(count))


def _fake_gradients(
    hidden: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, bool, bool], accumulator_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fake's (dhidden, dweight, dbias) as the real op returns them: contiguous, shaped like hidden,
    weight and [V] where ``needs`` asks for them (dweight and dbias in ``accumulator_dtype``), empty
    otherwise."""
    need_dhidden, need_dweight, need_dbias = needs
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dhidden else hidden.new_empty(0),
        weight.new_empty(weight.shape, dtype=accumulator_dtype) if need_dweight else weight.new_empty(0),
        weight.new_empty(weight.shape[0], dtype=accumulator_dtype) if need_dbias else weight.new_empty(0),
    )


@custom_op(
    "linear_logprobs_fwd",
    lambda hidden, *_: fake_row_outputs(hidden, 2),
    f"({_LM_HEAD_SCHEMA}, SymInt ignore_index, SymInt chunk_rows, str backend) -> (Tensor, Tensor)",
)
def _logprobs_fwd_op(hidden, weight, bias, labels, ignore_index, chunk_rows, backend):
    """Per-row log-probs and log-sum-exps, fp32 [N]."""
    logp, lse, _ = _chunked_pass(hidden, weight, bias, labels, ignore_index, chunk_rows, backend=backend)
    return logp, lse


def _logprobs_bwd_fake(
    grad, hidden, weight, bias, labels, lse, ignore_index, chunk_rows, need_dhidden, need_dweight, need_dbias, *_
):
    return _fake_gradients(hidden, weight, (need_dhidden, need_dweight, need_dbias), weight.dtype)


@custom_op(
    "linear_logprobs_bwd",
    _logprobs_bwd_fake,
    f"(Tensor grad, {_LM_HEAD_SCHEMA}, Tensor lse, SymInt ignore_index, SymInt chunk_rows, {_NEEDS_SCHEMA}, "
    f"str backend, {GRADIENT_OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor)",
)
def _logprobs_bwd_op(
    grad,
    hidden,
    weight,
    bias,
    labels,
    lse,
    ignore_index,
    chunk_rows,
    need_dhidden,
    need_dweight,
    need_dbias,
    backend,
    *gradient_options,
):
    """(dhidden, dweight, dbias) in their inputs' dtypes, each empty where not asked for."""
    options = RowOptions.for_gradient(*gradient_options)
    needs = (need_dhidden, need_dweight, need_dbias)
    _, _, (dhidden, dweight, dbias) = _chunked_pass(
        hidden,
        weight,
        bias,
        labels,
        ignore_index,
        chunk_rows,
        lse=lse,
        grad=grad,
        needs=needs,
        backend=backend,
        options=options,
    )
    # The final cast of the fp32 accumulators (the upstream grad is already in every row's g).
    dweight = dweight.to(weight.dtype) if dweight is not None else None
    dbias = dbias.to(weight.dtype) if dbias is not None else None
    return _or_empty(dhidden, hidden), _or_empty(dweight, weight), _or_empty(dbias, weight)


def _save_per_token(ctx, inputs, lse, *more_tensors):
    """What ``_per_token_backward`` reads, saved by a per-token forward's setup_context: the leading
    inputs (hidden, weight, bias, labels, ignore_index, chunk_rows, backend) every per-token op takes
    first, its log-sum-exp, then ``more_tensors``."""
    hidden, weight, bias, labels, ignore_index, chunk_rows, backend = inputs[:7]
    ctx.save_for_backward(hidden, weight, bias, labels, lse, *more_tensors)
    ctx.ignore_index, ctx.chunk_rows, ctx.backend = ignore_index, chunk_rows, backend
    ctx.has_bias = bias is not None


def _logprobs_setup_context(ctx, inputs, output):
    _save_per_token(ctx, inputs, output[1])
    ctx.mark_non_differentiable(output[1])


def _per_token_backward(ctx, grad, n_other_inputs, options=_PLAIN):
    """The backward of a per-token forward (log-probs, per-token cross-entropy): ``_logprobs_bwd_op``
    from the saved log-sum-exp, for the gradients autograd asks for; None for the ``n_other_inputs``
    inputs after (hidden, weight, bias)."""
    need_dhidden, need_dweight, need_dbias = ctx.needs_input_grad[:3]
    need_dbias = need_dbias and ctx.has_bias
    lm_head_and_lse = ctx.saved_tensors[:5]  # (hidden, weight, bias, labels, lse), as _save_per_token saves them
    dhidden, dweight, dbias = _logprobs_bwd_op(
        grad,
        *lm_head_and_lse,
        ctx.ignore_index,
        ctx.chunk_rows,
        need_dhidden,
        need_dweight,
        need_dbias,
        ctx.backend,
        *options.gradient_arguments(),
    )
    return (
        dhidden if need_dhidden else None,
        dweight if need_dweight else None,
        dbias if need_dbias else None,
        *([None] * n_other_inputs),
    )


def _logprobs_backward(ctx, grad_logp, _grad_lse):
    return _per_token_backward(ctx, grad_logp, n_other_inputs=4)


torch.library.register_autograd(
    "solar_kernels::linear_logprobs_fwd", _logprobs_backward, setup_context=_logprobs_setup_context
)


def _label_weights(labels: torch.Tensor, ignore_index: int, class_weight: torch.Tensor | None) -> torch.Tensor:
    """w_y per row, fp32 [N]: the label's class weight (1 without class weights), 0 where ignored."""
    valid = labels != ignore_index
    if class_weight is None:
        return valid.float()
    index = torch.where(valid, labels, 0).long().clamp(0, class_weight.shape[0] - 1)  # out-of-range rows are NaN anyway
    return torch.where(valid, class_weight[index], 0.0)


def _per_row(values: torch.Tensor, rows: int) -> torch.Tensor:
    """``values`` ([rows] or a scalar) as a contiguous fp32 [rows] tensor (the kernel reads stride 1)."""
    return values.float().expand(rows).contiguous()


def ce_gradient(
    labels: torch.Tensor,
    ignore_index: int,
    class_weight: torch.Tensor | None,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    vocab: int,
    grad_ce: torch.Tensor,
    grad_z: torch.Tensor,
) -> tuple[torch.Tensor, RowOptions]:
    """The per-row gradient arguments of the row step for d loss / d ce_t = ``grad_ce`` and
    d loss / d zloss_t = ``grad_z`` (each [N] or a scalar): g = -(1 - s) w_y grad_ce, h = s / V grad_ce,
    q = 2 lse_square_scale grad_z (module docstring), with the options the step reads."""
    rows = labels.shape[0]
    g = -(1.0 - label_smoothing) * _label_weights(labels, ignore_index, class_weight) * grad_ce
    options = RowOptions(
        softcap=softcap,
        class_weight=class_weight if label_smoothing > 0 else None,
        class_weight_sum=class_weight.sum() if class_weight is not None and label_smoothing > 0 else None,
        grad_smooth=_per_row(label_smoothing / vocab * grad_ce, rows) if label_smoothing > 0 else None,
        grad_z=_per_row(2.0 * lse_square_scale * grad_z, rows) if lse_square_scale != 0 else None,
    )
    return g.float().expand(rows), options


def ce_forward_options(
    rows: int,
    device: torch.device,
    class_weight: torch.Tensor | None,
    label_smoothing: float,
    softcap: float | None,
    want_accuracy: bool,
) -> RowOptions:
    """The row step's options for a forward pass, with its per-row outputs allocated."""
    return RowOptions(
        softcap=softcap,
        class_weight=class_weight if label_smoothing > 0 else None,
        smooth_sum=torch.empty(rows, dtype=torch.float32, device=device) if label_smoothing > 0 else None,
        correct=torch.empty(rows, dtype=torch.float32, device=device) if want_accuracy else None,
    )


def ce_token_losses(
    logp: torch.Tensor,
    lse: torch.Tensor,
    options: RowOptions,
    labels: torch.Tensor,
    ignore_index: int,
    class_weight: torch.Tensor | None,
    label_smoothing: float,
    lse_square_scale: float,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row cross-entropy ce_t and z-loss (None when its scale is 0), fp32 [N], from a forward
    pass's log-probs, log-sum-exps and smoothing sums; 0 on ignored rows."""
    ce = -(1.0 - label_smoothing) * _label_weights(labels, ignore_index, class_weight) * logp
    if label_smoothing > 0:
        class_sum = class_weight.sum() if class_weight is not None else vocab
        ce = ce + label_smoothing / vocab * (class_sum * lse - options.smooth_sum)  # eps * sum_i w_i (lse - z_i)
    z_loss = lse_square_scale * lse.square() if lse_square_scale != 0 else None
    return ce, z_loss


def ce_row_outputs(
    ce: torch.Tensor, z_loss: torch.Tensor | None, correct: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce_t, zl_t, correct), fp32 [N], as the per-row custom ops return them: ``ce_token_losses``'s
    two and the forward options' accuracy flags, zeros for either when off (a custom op returns
    tensors, each its own: outputs must not alias)."""
    z_loss = z_loss if z_loss is not None else torch.zeros_like(ce)
    return ce, z_loss, correct if correct is not None else torch.zeros_like(ce)


def ce_scales(
    labels: torch.Tensor,
    ignore_index: int,
    class_weight: torch.Tensor | None,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(non-ignored count, scale of the summed ce_t, scale of the summed z-loss), fp32 scalars: for
    "mean" 1 / sum of w_y (the count without class weights) and 1 / count, 1 and 1 for "sum"; a
    batch with no counted token scales by 1 (its loss is 0)."""
    count = (labels != ignore_index).sum().to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=labels.device)
    if reduction != "mean":
        return count, one, one
    weight_total = _label_weights(labels, ignore_index, class_weight).sum() if class_weight is not None else count
    return count, 1.0 / torch.where(count > 0, weight_total, 1.0), 1.0 / count.clamp_min(1)


def _cross_entropy_fwd_fake(
    hidden, weight, bias, labels, ignore_index, reduction, chunk_rows, need_dhidden, need_dweight, need_dbias, *_
):
    scalars = tuple(hidden.new_empty((), dtype=torch.float32) for _ in range(3))  # loss, z-loss, accuracy
    return *scalars, *_fake_gradients(hidden, weight, (need_dhidden, need_dweight, need_dbias), torch.float32)


@custom_op(
    "linear_cross_entropy_fwd",
    _cross_entropy_fwd_fake,
    f"({_LM_HEAD_SCHEMA}, SymInt ignore_index, str reduction, SymInt chunk_rows, {_NEEDS_SCHEMA}, str backend, "
    f"{FORWARD_OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _cross_entropy_fwd_op(
    hidden,
    weight,
    bias,
    labels,
    ignore_index,
    reduction,
    chunk_rows,
    need_dhidden,
    need_dweight,
    need_dbias,
    backend,
    *ce_options,
):
    """Scalar loss, z-loss and token accuracy and, when asked, the loss's gradients (computed now,
    scaled by the upstream grad later): dhidden in the hidden dtype, dweight and dbias as fp32
    accumulators, cast once in backward. z-loss and accuracy are 0 when not asked for."""
    class_weight, label_smoothing, lse_square_scale, softcap, want_accuracy = ForwardOptions(*ce_options)
    vocab = weight.shape[0]
    count, scale_ce, scale_z = ce_scales(labels, ignore_index, class_weight, reduction)
    needs = (need_dhidden, need_dweight, need_dbias)
    options = ce_forward_options(hidden.shape[0], hidden.device, class_weight, label_smoothing, softcap, want_accuracy)
    grad = None
    if any(needs):
        grad, grad_options = ce_gradient(
            labels, ignore_index, class_weight, label_smoothing, lse_square_scale, softcap, vocab, scale_ce, scale_z
        )
        options = dataclasses.replace(grad_options, smooth_sum=options.smooth_sum, correct=options.correct)
    logp, lse, (dhidden, dweight, dbias) = _chunked_pass(
        hidden, weight, bias, labels, ignore_index, chunk_rows, grad=grad, needs=needs, backend=backend, options=options
    )
    ce, z_loss = ce_token_losses(
        logp, lse, options, labels, ignore_index, class_weight, label_smoothing, lse_square_scale, vocab
    )
    loss = ce.sum() * scale_ce
    z_total = z_loss.sum() * scale_z if z_loss is not None else torch.zeros_like(loss)
    accuracy = options.correct.sum() / count if want_accuracy else torch.zeros_like(loss)
    return (
        loss + z_total,
        z_total,
        accuracy,
        _or_empty(dhidden, hidden),
        _or_empty(dweight, weight),
        _or_empty(dbias, weight),
    )


def _cross_entropy_setup_context(ctx, inputs, output):
    _, z_loss, accuracy, dhidden, dweight, dbias = output
    ctx.save_for_backward(dhidden, dweight, dbias)
    ctx.mark_non_differentiable(z_loss, accuracy, dhidden, dweight, dbias)
    # no zero-filled grads for the non-differentiable outputs: one would be [V, d] fp32 (0.11 GB at V = 49152)
    ctx.set_materialize_grads(False)
    ctx.weight_dtype = inputs[1].dtype


def _scale_and_cast(accumulator: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``accumulator * scale`` (fp32) rounded once to ``dtype``, written straight into the result:
    no fp32 temporary of the accumulator's size. The accumulator is left as it is, so a second
    backward through the same forward (``retain_graph=True``, as the benchmarks time it) gives the
    same gradients."""
    if torch.is_grad_enabled():  # a differentiable backward (create_graph=True): out= is not
        return (accumulator * scale).to(dtype)
    return torch.mul(accumulator, scale, out=torch.empty_like(accumulator, dtype=dtype))


def _cross_entropy_backward(ctx, grad_loss, *_unused):
    dhidden, dweight, dbias = ctx.saved_tensors
    need_dhidden, need_dweight, need_dbias = ctx.needs_input_grad[:3]
    return (
        dhidden * grad_loss if need_dhidden else None,
        _scale_and_cast(dweight, grad_loss, ctx.weight_dtype) if need_dweight else None,
        _scale_and_cast(dbias, grad_loss, ctx.weight_dtype) if need_dbias else None,
        *([None] * 13),  # the op's other inputs
    )


torch.library.register_autograd(
    "solar_kernels::linear_cross_entropy_fwd", _cross_entropy_backward, setup_context=_cross_entropy_setup_context
)


@custom_op(
    "linear_cross_entropy_tokens_fwd",
    lambda hidden, *_: fake_row_outputs(hidden, 4),
    f"({_LM_HEAD_SCHEMA}, SymInt ignore_index, SymInt chunk_rows, str backend, {FORWARD_OPTIONS_SCHEMA}) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _cross_entropy_tokens_fwd_op(hidden, weight, bias, labels, ignore_index, chunk_rows, backend, *ce_options):
    """Per-token loss (cross-entropy plus z-loss), z-loss, correct flag and log-sum-exp, fp32 [N];
    the gradients come in backward, from the saved log-sum-exp (4 matmuls in all, as log-probs)."""
    class_weight, label_smoothing, lse_square_scale, softcap, want_accuracy = ForwardOptions(*ce_options)
    vocab = weight.shape[0]
    options = ce_forward_options(hidden.shape[0], hidden.device, class_weight, label_smoothing, softcap, want_accuracy)
    logp, lse, _ = _chunked_pass(
        hidden, weight, bias, labels, ignore_index, chunk_rows, backend=backend, options=options
    )
    ce, z_loss = ce_token_losses(
        logp, lse, options, labels, ignore_index, class_weight, label_smoothing, lse_square_scale, vocab
    )
    ce, z_loss, correct = ce_row_outputs(ce, z_loss, options.correct)
    return ce + z_loss, z_loss, correct, lse


def _cross_entropy_tokens_setup_context(ctx, inputs, output):
    class_weight, label_smoothing, lse_square_scale, softcap, _ = inputs[7:]
    _save_per_token(ctx, inputs, output[3], class_weight)
    ctx.ce_options = (label_smoothing, lse_square_scale, softcap)  # ce_gradient's, in its order
    ctx.mark_non_differentiable(*output[1:])


def _cross_entropy_tokens_backward(ctx, grad_loss, *_unused):
    _, weight, _, labels, _, class_weight = ctx.saved_tensors  # _save_per_token's, class weights last
    grad_loss = grad_loss.float()
    grad, options = ce_gradient(
        labels, ctx.ignore_index, class_weight, *ctx.ce_options, weight.shape[0], grad_loss, grad_loss
    )
    return _per_token_backward(ctx, grad, n_other_inputs=9, options=options)


torch.library.register_autograd(
    "solar_kernels::linear_cross_entropy_tokens_fwd",
    _cross_entropy_tokens_backward,
    setup_context=_cross_entropy_tokens_setup_context,
)


def _cast_and_check(op, hidden, weight, labels, bias, ignore_index, chunk_size, hidden_ndims=(2, 3)):
    """(hidden, weight, bias) in the dtype autocast gives ``F.linear`` (``cast_like_linear``), after
    every check of the LM-head ops' shared arguments: nothing runs on bad input."""
    hidden, weight, bias = cast_like_linear(hidden, weight, bias)
    _checks.check_float_tensor(op, "hidden", hidden, ndims=hidden_ndims)
    _checks.check_float_tensor(op, "weight", weight, ndims=(2,))
    _checks.check_same_device_dtype(op, "hidden", hidden, weight=weight, bias=bias)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: weight must be [V, d] with d = {hidden.shape[-1]} (hidden.shape[-1]), got {tuple(weight.shape)}"
        )
    if bias is not None:
        _checks.check_float_tensor(op, "bias", bias, ndims=(1,))
        _checks.check_shape(op, "bias", bias, (weight.shape[0],), "weight.shape[0]")
    check_labels(op, labels, ignore_index, "hidden", hidden, tuple(hidden.shape[:-1]), "hidden.shape[:-1]")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_label_values(op, labels, weight.shape[0], ignore_index)
    return hidden, weight, bias


def check_labels(op, labels, ignore_index, reference_name, reference, shape, why):
    """labels: an int64/int32 tensor of ``shape`` on ``reference``'s device; ignore_index an int."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: labels must be int64 or int32, got {labels.dtype}")
    _checks.check_same_device(op, reference_name, reference, labels=labels)
    _checks.check_shape(op, "labels", labels, shape, why)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")


def _check_label_values(op, labels, vocab, ignore_index):
    """Labels in [0, V) or ignore_index; checked where it costs no GPU sync, or when asked to."""
    if torch.compiler.is_compiling():
        return
    if labels.device.type != "cpu" and os.environ.get(CHECK_LABELS_ENV_VAR) != "1":
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{op}: labels{list(position)} = {int(labels[position])} is outside [0, {vocab}) "
            f"(vocab size from weight) and is not ignore_index ({ignore_index})"
        )


def _flat_inputs(hidden, labels, weight, chunk_size):
    hidden2d = as_rows(hidden, hidden.shape[-1])
    labels1d = labels.reshape(-1).contiguous()
    chunk_rows = chunk_size or default_chunk_rows(hidden2d.shape[0], weight.shape[0], hidden2d.device.type)
    return hidden2d, labels1d, chunk_rows


def _token_logprobs(op, hidden, weight, labels, bias, ignore_index, chunk_size, backend, hidden_ndims):
    """The log-prob ops' path: checks, backend, the chunked forward; fp32 log-probs shaped like ``labels``."""
    hidden, weight, bias = _cast_and_check(op, hidden, weight, labels, bias, ignore_index, chunk_size, hidden_ndims)
    resolved = resolve_backend(op, backend, hidden.device)
    hidden2d, labels1d, chunk_rows = _flat_inputs(hidden, labels, weight, chunk_size)
    logp, _ = _logprobs_fwd_op(hidden2d, weight, bias, labels1d, ignore_index, chunk_rows, resolved)
    return logp.view(labels.shape)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[label] per token, fp32, shaped like ``labels``.

    0 where ``labels == ignore_index``. ``chunk_size`` (rows per chunk) overrides the default.
    """
    return _token_logprobs(
        "linear_logprobs", hidden, weight, labels, bias, ignore_index, chunk_size, backend, hidden_ndims=(2, 3)
    )


@dataclasses.dataclass
class CrossEntropyOutput:
    """What the cross-entropy ops return when ``return_z_loss`` or ``return_token_accuracy`` is set
    (Liger-Kernel's ``CrossEntropyOutput``, without its ``predicted_tokens``): ``loss`` includes the
    z-loss; ``z_loss`` and ``token_accuracy`` are None unless asked for, and carry no gradient."""

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None


def _check_class_weight(op: str, weight_name: str, class_weight, vocab: int, device: torch.device):
    """The class weights (``weight_name`` in ``op``) as a contiguous fp32 [V] tensor, or None."""
    if class_weight is None:
        return None
    _checks.check_float_tensor(op, weight_name, class_weight, ndims=(1,), dtypes=(*_checks.FLOAT_DTYPES, torch.float64))
    _checks.check_shape(op, weight_name, class_weight, (vocab,), "one weight per class")
    _checks.check_same_device(op, "the logits", torch.empty(0, device=device), **{weight_name: class_weight})
    if class_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{op}: {weight_name} requires grad, expected a constant: class weights get no gradient "
            "(as in torch.nn.functional.cross_entropy and Liger-Kernel); pass it detached"
        )
    return class_weight.detach().to(torch.float32).contiguous()


def backend_for_options(op: str, resolved: str, requested: str | None, active: list[str]) -> str:
    """The resolved backend, if it has the cross-entropy options in ``active`` (names): the CUDA
    C++ kernel has none. An explicit "cuda" is refused; "auto" that resolved to CUDA alone (no
    Triton here) runs the PyTorch backend; "auto" over both runs Triton (``_chunked_pass``)."""
    if not active or resolved != "cuda":
        return resolved
    explicit = requested if requested is not None else (os.environ.get(BACKEND_ENV_VAR) or "auto")
    if explicit == "auto":
        logger.debug("%s: %s not in the CUDA kernel: the torch backend runs", op, ", ".join(active))
        return "torch"
    raise RuntimeError(
        f"{op}: {', '.join(active)} not implemented by backend 'cuda' (the CUDA C++ kernel); "
        "backends 'triton', 'torch' and 'auto' implement it"
    )


def active_ce_options(label_smoothing, lse_square_scale, softcap, class_weight, return_token_accuracy, weight_name):
    """The names of the options that are on, as the user spelled them."""
    names = []
    for name, on in (
        ("label_smoothing", label_smoothing > 0),
        ("lse_square_scale", lse_square_scale != 0),
        ("softcap", softcap is not None),
        (weight_name, class_weight is not None),
        ("return_token_accuracy", return_token_accuracy),
    ):
        if on:
            names.append(name)
    return names


def check_ce_call(
    op: str,
    reduction: str,
    label_smoothing,
    lse_square_scale,
    softcap,
    class_weight,
    return_z_loss,
    return_token_accuracy,
    vocab: int,
    device: torch.device,
    weight_name: str,
    backend: str | None,
) -> tuple[ForwardOptions, str]:
    """The cross-entropy ops' checks after their tensor checks, before any work: ``reduction`` and
    the options, returned as the forward ops' options (the class weights as a contiguous fp32 [V]
    tensor or None, label_smoothing, lse_square_scale and softcap as floats, want_accuracy from
    ``return_token_accuracy``), then the backend that has them (resolved, then
    ``backend_for_options``). ``weight_name``: the class weights' argument name in ``op``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not _checks.is_finite_number(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not _checks.is_finite_number(lse_square_scale) or lse_square_scale < 0:
        raise ValueError(f"{op}: lse_square_scale must be a finite float >= 0, got {lse_square_scale!r}")
    if softcap is not None and (not _checks.is_finite_number(softcap) or softcap <= 0):
        raise ValueError(f"{op}: softcap must be None or a finite float > 0, got {softcap!r}")
    for name, flag in (("return_z_loss", return_z_loss), ("return_token_accuracy", return_token_accuracy)):
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be True or False, got {flag!r}")
    class_weight = _check_class_weight(op, weight_name, class_weight, vocab, device)
    label_smoothing, lse_square_scale = float(label_smoothing), float(lse_square_scale)
    softcap = None if softcap is None else float(softcap)
    resolved = resolve_backend(op, backend, device)
    active = active_ce_options(
        label_smoothing, lse_square_scale, softcap, class_weight, return_token_accuracy, weight_name
    )
    options = ForwardOptions(class_weight, label_smoothing, lse_square_scale, softcap, return_token_accuracy)
    return options, backend_for_options(op, resolved, backend, active)


def ce_result(loss, z_loss, accuracy, return_z_loss: bool, return_token_accuracy: bool):
    """``loss`` alone, or a ``CrossEntropyOutput`` when z-loss or accuracy was asked for (as Liger)."""
    if not return_z_loss and not return_token_accuracy:
        return loss
    return CrossEntropyOutput(loss, z_loss if return_z_loss else None, accuracy if return_token_accuracy else None)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
    softcap: float | None = None,
    ce_weight: torch.Tensor | None = None,
    return_token_accuracy: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """Cross-entropy of the LM head's logits against ``labels``, in fp32 (Liger-Kernel 0.8.5's
    ``liger_fused_linear_cross_entropy``; module docstring, "Cross-entropy options").

    ``reduction``: "mean" over non-ignored tokens (weighted by ``ce_weight`` of their labels; 0 when
    every token is ignored, where PyTorch's ``cross_entropy`` gives NaN), "sum", or "none" (per
    token, shaped like labels, 0 where ignored). Returns the loss, or a ``CrossEntropyOutput`` when
    ``return_z_loss`` or ``return_token_accuracy`` is set.
    """
    op = "linear_cross_entropy"
    hidden, weight, bias = _cast_and_check(op, hidden, weight, labels, bias, ignore_index, chunk_size)
    ce_options, resolved = check_ce_call(
        op,
        reduction,
        label_smoothing,
        lse_square_scale,
        softcap,
        ce_weight,
        return_z_loss,
        return_token_accuracy,
        weight.shape[0],
        hidden.device,
        "ce_weight",
        backend,
    )
    hidden2d, labels1d, chunk_rows = _flat_inputs(hidden, labels, weight, chunk_size)
    if reduction == "none":
        loss, z_loss, correct, _ = _cross_entropy_tokens_fwd_op(
            hidden2d, weight, bias, labels1d, ignore_index, chunk_rows, resolved, *ce_options
        )
        return ce_result(
            loss.view(labels.shape),
            z_loss.view(labels.shape),
            correct.view(labels.shape),
            return_z_loss,
            return_token_accuracy,
        )
    grad_on = torch.is_grad_enabled()
    loss, z_loss, accuracy, *_ = _cross_entropy_fwd_op(
        hidden2d,
        weight,
        bias,
        labels1d,
        ignore_index,
        reduction,
        chunk_rows,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
        resolved,
        *ce_options,
    )
    return ce_result(loss, z_loss, accuracy, return_z_loss, return_token_accuracy)


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    average: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Sum (or, with ``average=True``, mean) of token log-probs per row: hidden [B, T, d] -> [B], fp32.

    Only tokens whose label is not ``ignore_index`` count (prompt tokens carry -100 in DPO); a row
    with none gives 0.
    """
    logp = _token_logprobs(
        "sequence_logprobs", hidden, weight, labels, bias, ignore_index, chunk_size, backend, hidden_ndims=(3,)
    )
    return _per_sequence(logp, labels, ignore_index, average)
