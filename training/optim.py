"""AdamW for bfloat16 parameters whose small updates are not lost: Kahan-compensated updates.

A bf16 weight w has 8 significant bits, so an update smaller than half its spacing
(|u| < 2^-9 |w|) rounds back to w and is lost; at the learning rates of fine-tuning (1e-5 to 5e-7)
most of AdamW's updates are. Here each parameter keeps a compensation buffer c (bf16, the same
shape) holding what rounding dropped, and every step applies the update plus that remainder:

    y      = u + c                   # the change wanted, in fp32
    w_new  = round_bf16(w + y)
    c      = y - (w_new - w)         # what rounding dropped this time, carried to the next step

so the sum of the applied changes equals the sum of the updates to within one rounding of c.
The Adam moments stay fp32 (exp_avg_sq in bf16 would lose the small squared gradients the same
way). Memory per parameter: bf16 weight 2 + bf16 gradient 2 + fp32 moments 8 + bf16 compensation 2
= 14 bytes, against 16 for fp32 master weights (docs/training.md).

The step counter lives on the host, as in ``torch.optim.AdamW`` (not fused), so reading it is no
device synchronization. Works on plain tensors and on FSDP2's sharded DTensors (elementwise only).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class KahanAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (AdamW) with Kahan-compensated parameter updates."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if not lr >= 0:
            raise ValueError(f"KahanAdamW: lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"KahanAdamW: betas must be in [0, 1), got {tuple(betas)}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)  # on the host, as torch's AdamW keeps it
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
            state["compensation"] = torch.zeros_like(param)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``Optimizer.load_state_dict``, which casts every floating state to its parameter's dtype;
        the moments are fp32 here, so they are put back from the (uncast) values given."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key in ("exp_avg", "exp_avg_sq"):
                value = state_dict["state"].get(saved_id, {}).get(key)
                if value is not None:
                    self.state[param][key] = value.to(device=param.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state(param)
                state["step"] += 1
                step = float(state["step"])  # a host tensor: no device synchronization
                grad = param.grad.float()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
                wanted = (exp_avg / denom).mul_(-lr / (1 - beta1**step))  # fp32 [param.shape]
                before = param.float()
                if weight_decay:
                    wanted.add_(before, alpha=-lr * weight_decay)
                wanted.add_(state["compensation"].float())
                param.copy_(before + wanted)  # rounds once to the parameter's dtype
                state["compensation"].copy_(wanted.sub_(param.float() - before))
        return loss
