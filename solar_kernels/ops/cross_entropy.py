"""Cross-entropy of logits a caller already holds, from the LM head's per-row step.

Math, for row t with logits z [V], label y, class weights w [V] (all 1 without ``weight``),
s = ``label_smoothing``, eps = s / V, c = ``softcap``, a = ``lse_square_scale``:

    z'_i   = c * tanh(z_i / c)                     (only with softcap; else z' = z)
    lse    = logsumexp(z')
    ce_t   = (1 - s) * w_y * (lse - z'_y) + eps * sum_i w_i * (lse - z'_i)
    zl_t   = a * lse^2                             (z-loss, PaLM's, unweighted)
    d ce_t / d z'_i = (1 - s) w_y (p_i - onehot_i) + eps (W p_i - w_i),  p = softmax(z'), W = sum_i w_i
    d zl_t / d z'_i = 2 a lse p_i;   d z'_i / d z_i = 1 - tanh^2(z_i / c)

``reduction``: "none" gives ce_t + zl_t per row (0 where the label is ``ignore_index``); "sum" the
sums; "mean" sum_t ce_t / sum_t w_y + sum_t zl_t / n over the n non-ignored rows (the class
weights normalize as in ``torch.nn.functional.cross_entropy``; the z-loss is divided by n, as
Liger-Kernel 0.8.5 does), 0 when n = 0 (PyTorch gives NaN there). ``return_token_accuracy`` is the
share of non-ignored rows whose first largest z' is the label ("none": 1.0/0.0 per row; NaN when
n = 0, as Liger). With ``return_z_loss`` or ``return_token_accuracy`` the result is a
``CrossEntropyOutput`` (loss, z_loss, token_accuracy): the loss includes the z-loss, the other two
carry no gradient. This is ``torch.nn.functional.cross_entropy`` (with ``weight``,
``label_smoothing``, ``ignore_index``, ``reduction``) and Liger-Kernel's ``LigerCrossEntropyLoss``.

Shapes and dtypes: logits [N, V] fp32, fp16 or bf16 (any row stride); labels [N] int64 or int32;
weight [V], any float dtype (used in fp32). The arithmetic is fp32; loss and z-loss come back in the
logits' dtype (as PyTorch and Liger return them), rounded once; the accuracy in fp32; the
gradient in the logits' dtype.

How: the forward runs ``_logprobs_kernel`` (solar_kernels/ops/linear_logprobs.py) over the logits,
reading them only, and keeps the log-sum-exp per row; backward runs it again with its gradient
mode on a copy of the logits, which becomes the gradient. Liger instead overwrites the caller's
logits with their gradient in its forward (one [N, V] tensor less); here the caller's logits stay as
they were, because autograd or the caller may still read them (a tensor used twice, a logged
value), and the gradient is allocated in backward, so no [N, V] gradient is held from forward to
backward either.

Backends: "triton" and "torch" have every option; "cuda" (the C++ twin of the row step) only the
plain loss, and refuses the options with a one-line error; "auto" picks one that has the call.
Under ``torch.autocast`` on the logits' device the loss and z-loss come back in fp32, as eager
``torch.nn.functional.cross_entropy`` does there (autocast runs it in fp32); the gradient still
comes back in the logits' dtype.
"""

from __future__ import annotations

import logging

import torch

from .._checks import check_float_tensor
from ._autocast import autocast_on
from ._common import as_rows
from ._registry import custom_op
from .linear_logprobs import (
    FORWARD_OPTIONS_SCHEMA,
    GRADIENT_OPTIONS_SCHEMA,
    CrossEntropyOutput,
    ForwardOptions,
    RowOptions,
    _check_label_values,
    _logprobs_rows,
    ce_forward_options,
    ce_gradient,
    ce_result,
    ce_row_outputs,
    ce_scales,
    ce_token_losses,
    check_ce_call,
    check_labels,
    fake_row_outputs,
    row_backend,
)

logger = logging.getLogger(__name__)

__all__ = ["CrossEntropyOutput", "cross_entropy", "cross_entropy_ref"]


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The logits' dtype, or fp32 under autocast (module docstring)."""
    return torch.float32 if autocast_on(logits.device) else logits.dtype


def cross_entropy_ref(
    logits,
    labels,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    lse_square_scale=0.0,
    return_z_loss=False,
    softcap=None,
    weight=None,
    return_token_accuracy=False,
):
    """``cross_entropy`` (its arguments, less ``backend``): the module docstring's math in plain
    PyTorch, on logits [..., V] and labels [...]: full fp32 log-softmax, results in the logits' dtype."""
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    vocab = z.shape[-1]
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    class_weight = weight.float() if weight is not None else torch.ones(vocab, device=z.device)
    lse = z.logsumexp(-1)
    logp = z.log_softmax(-1)
    label_weight = torch.where(valid, class_weight[safe], 0.0)
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    smooth = -(logp * class_weight).sum(-1)  # sum_i w_i (lse - z_i)
    ce = torch.where(valid, (1 - label_smoothing) * label_weight * nll + label_smoothing / vocab * smooth, 0.0)
    z_loss = torch.where(valid, lse_square_scale * lse.square(), 0.0)
    correct = (valid & (z.argmax(-1) == labels)).float()
    if reduction == "none":
        loss, z_total, accuracy = ce + z_loss, z_loss, correct
    else:
        count = valid.sum()
        if reduction == "sum":
            loss, z_total = ce.sum() + z_loss.sum(), z_loss.sum()
        else:
            weight_total = label_weight.sum() if weight is not None else count.float()
            z_total = z_loss.sum() / count.clamp_min(1)
            loss = ce.sum() / torch.where(count > 0, weight_total, 1.0) + z_total
        accuracy = correct.sum() / count
    dtype = _loss_dtype(logits)
    return ce_result(
        loss.to(dtype), z_total.detach().to(dtype), accuracy.detach(), return_z_loss, return_token_accuracy
    )


@custom_op(
    "cross_entropy_fwd",
    lambda logits, *_: fake_row_outputs(logits, 4),
    f"(Tensor logits, Tensor labels, SymInt ignore_index, str backend, {FORWARD_OPTIONS_SCHEMA}) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _cross_entropy_fwd_op(logits, labels, ignore_index, backend, *ce_options):
    """Per-row ce_t, zl_t, correct flag and log-sum-exp, fp32 [N]; the logits are only read."""
    class_weight, label_smoothing, lse_square_scale, softcap, want_accuracy = ForwardOptions(*ce_options)
    rows, vocab = logits.shape
    options = ce_forward_options(rows, logits.device, class_weight, label_smoothing, softcap, want_accuracy)
    implementation = row_backend(backend, rows, vocab, logits.device, options)
    # The PyTorch row step works in place on fp32 logits (16-bit ones it widens into a copy).
    source = logits.clone() if implementation == "torch" and logits.dtype == torch.float32 else logits
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    _logprobs_rows(implementation, source, labels, logp, lse, lse, ignore_index, True, False, options)
    ce, z_loss = ce_token_losses(
        logp, lse, options, labels, ignore_index, class_weight, label_smoothing, lse_square_scale, vocab
    )
    return *ce_row_outputs(ce, z_loss, options.correct), lse


@custom_op(
    "cross_entropy_bwd",
    lambda logits, *_: torch.empty_like(logits, memory_format=torch.contiguous_format),
    "(Tensor logits, Tensor labels, Tensor lse, Tensor grad, SymInt ignore_index, str backend, "
    f"{GRADIENT_OPTIONS_SCHEMA}) -> Tensor",
)
def _cross_entropy_bwd_op(logits, labels, lse, grad, ignore_index, backend, *gradient_options):
    """d loss / d logits [N, V] in the logits' dtype: a copy of the logits, overwritten by the row
    step from the saved log-sum-exp and the per-row coefficients (``ce_gradient``)."""
    options = RowOptions.for_gradient(*gradient_options)
    rows, vocab = logits.shape
    dlogits = logits.clone(memory_format=torch.contiguous_format)
    implementation = row_backend(backend, rows, vocab, logits.device, options)
    _logprobs_rows(implementation, dlogits, labels, lse, lse, grad, ignore_index, False, True, options)
    return dlogits


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, backend, class_weight, label_smoothing, lse_square_scale, softcap, _ = inputs
    ctx.save_for_backward(logits, labels, output[3], class_weight)
    ctx.ignore_index, ctx.backend = ignore_index, backend
    ctx.ce_options = (label_smoothing, lse_square_scale, softcap)  # ce_gradient's, in its order
    ctx.mark_non_differentiable(output[2], output[3])


def _backward(ctx, grad_ce, grad_z, *_unused):
    logits, labels, lse, class_weight = ctx.saved_tensors
    grad, options = ce_gradient(
        labels, ctx.ignore_index, class_weight, *ctx.ce_options, logits.shape[1], grad_ce.float(), grad_z.float()
    )
    dlogits = _cross_entropy_bwd_op(
        logits, labels, lse, grad, ctx.ignore_index, ctx.backend, *options.gradient_arguments()
    )
    return dlogits, *([None] * 8)


torch.library.register_autograd("solar_kernels::cross_entropy_fwd", _backward, setup_context=_setup_context)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
    softcap: float | None = None,
    weight: torch.Tensor | None = None,
    return_token_accuracy: bool = False,
    backend: str | None = None,
):
    """Cross-entropy of ``logits`` [N, V] against ``labels`` [N] (module docstring): the loss in
    the logits' dtype, or a ``CrossEntropyOutput`` with ``return_z_loss``/``return_token_accuracy``."""
    op = "cross_entropy"
    check_float_tensor(op, "logits", logits, ndims=(2,))
    check_labels(op, labels, ignore_index, "logits", logits, (logits.shape[0],), "logits.shape[0]")
    vocab = logits.shape[1]
    _check_label_values(op, labels, vocab, ignore_index)
    ce_options, resolved = check_ce_call(
        op,
        reduction,
        label_smoothing,
        lse_square_scale,
        softcap,
        weight,
        return_z_loss,
        return_token_accuracy,
        vocab,
        logits.device,
        "weight",
        backend,
    )
    rows = as_rows(logits, vocab)
    ce, z_loss, correct, _ = _cross_entropy_fwd_op(rows, labels.contiguous(), ignore_index, resolved, *ce_options)
    dtype = _loss_dtype(logits)
    if reduction == "none":
        loss, z_total, accuracy = ce + z_loss, z_loss, correct
    else:
        count, scale_ce, scale_z = ce_scales(labels, ignore_index, ce_options.class_weight, reduction)
        z_total = z_loss.sum() * scale_z
        loss = ce.sum() * scale_ce + z_total
        accuracy = correct.sum() / count
    return ce_result(loss.to(dtype), z_total.detach().to(dtype), accuracy, return_z_loss, return_token_accuracy)
