"""Adam / AdamW over megatron's main (fp32) parameters in one pass per tensor, with gradient clipping folded in.

megatron's mixed-precision step without Transformer Engine or Apex is: the gradient norm, a pass that multiplies
every fp32 gradient by the clipping coefficient (clip_grad_by_total_norm_fp32), Adam, and the master→model copy.
`FusedAdam` fills megatron's `Adam` slot (the TE / Apex FusedAdam signature: `adam_w_mode`) and takes the
clipping coefficient from megatron's clip function instead (`scale_grads`, called by the clip shim in
platform/megatron_compat.py): the update reads each gradient once and multiplies it on the way, which is the
same fp32 product the separate pass would have stored (H200, 2.26 B parameters: the 4.9 ms pass goes).

The update is `adam_update_`: on CUDA tensors a Triton kernel (ops/triton_adam.py), elsewhere the same math in
torch (the reference the tests compare the kernel with). Its state is torch's Adam state (`step` a float32 cpu
tensor as torch's non-fused Adam keeps it, `exp_avg`, `exp_avg_sq`), so checkpoints move between the two.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

# main parameter -> weak reference to the FusedAdam that updates it (megatron's clip function knows only the
# parameters). Weak both ways: the optimizer holds its parameters, so a strong value would keep every optimizer
# (and its moments) alive for as long as the process.
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def adam_update_(param, grad, exp_avg, exp_avg_sq, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, decoupled: bool, grad_scale: float = 1.0) -> None:
    """One Adam step of one tensor in place (torch's single-tensor Adam math); grad is multiplied by grad_scale
    first. decoupled: AdamW's weight decay (param *= 1 - lr * wd) instead of Adam's L2 term in the gradient."""
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / (1 - beta1**step)
    if param.is_cuda:
        from .triton_adam import triton_adam_update_

        triton_adam_update_(param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, decoupled=decoupled, grad_scale=grad_scale,
                            step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt)
        return
    g = grad.float() * grad_scale if grad_scale != 1.0 else grad.float()
    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            g = g.add(param, alpha=weight_decay)
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class FusedAdam(torch.optim.Adam):
    """torch's Adam (adam_w_mode=True: AdamW) updated by `adam_update_`, with megatron's clipping folded in."""

    def __init__(self, params, adam_w_mode: bool = True, **kwargs):
        super().__init__(params, decoupled_weight_decay=adam_w_mode, **kwargs)
        self._grad_scale = 1.0

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            _OWNERS[p] = weakref.ref(self)

    @staticmethod
    def owning(params) -> "FusedAdam | None":
        """The FusedAdam that updates every one of params, or None."""
        owners = [_OWNERS[p]() if p in _OWNERS else None for p in params]
        first = owners[0] if owners else None
        return first if all(o is first for o in owners) else None

    def scale_grads(self, coeff: float) -> None:
        """The next step uses grad * coeff (megatron's clipping), without writing the product back."""
        self._grad_scale *= coeff

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, self._grad_scale = self._grad_scale, 1.0
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["differentiable"]:
                raise ValueError("FusedAdam supports neither amsgrad, maximize nor differentiable")
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                elif state["step"].device.type != "cpu":  # loaded from a fused / capturable torch Adam: once
                    state["step"] = state["step"].cpu()
                for key in ("exp_avg", "exp_avg_sq"):  # megatron's init_state_fn may have made these already
                    if key not in state:
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # a new tensor, not += 1: megatron's distributed optimizer restores one step tensor shared by every
                # parameter's state (DistributedOptimizer.load_state_dict without TE / Apex), which an in-place
                # add would advance once per parameter
                state["step"] = state["step"] + 1
                adam_update_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step=int(state["step"].item()),
                             lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                             weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
                             grad_scale=grad_scale)
        return loss
