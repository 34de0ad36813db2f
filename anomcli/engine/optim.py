"""Optimizer and learning-rate schedule used to train Dinomaly.

StableAdamW: Wortsman et al. 2023, "Stable and low-precision training for
large-scale vision-language models" (arXiv:2304.13013), Algorithm 2, as used
by Dinomaly (Guo et al., CVPR 2025). It is AdamW (decoupled weight decay,
bias-corrected moments, optional AMSGrad) plus per-tensor update clipping:
when a gradient is large compared with its running second moment, the
learning rate of that tensor shrinks, which replaces global gradient-norm
clipping and damps loss spikes.

The schedule is a linear warm-up followed by a cosine decay to a floor,
expressed as a multiplier of the base learning rate for ``LambdaLR``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["StableAdamW", "warmup_cosine_factor", "build_scheduler"]


class StableAdamW(torch.optim.Optimizer):
    """AdamW with per-tensor update clipping (StableAdamW).

    For every parameter tensor, each step:

    - ``m, v``: exponential moving averages of ``g`` and ``g**2``; ``m_hat``,
      ``v_hat`` their bias-corrected values.
    - ``RMS = sqrt(mean(g**2 / max(v_hat, eps**2)))`` over the tensor, and
      ``lr_t = lr / max(1, RMS / clip_threshold)``. ``v_hat`` here is the
      moving average itself, not the AMSGrad maximum, as in Wortsman et al.:
      the ratio measures how surprising this gradient is for the tensor.
    - decoupled weight decay ``p *= 1 - lr_t * weight_decay`` (the clipped
      rate scales the whole update, as in the paper's algorithm).
    - ``p -= lr_t * m_hat / (sqrt(v_hat) + eps)``; with ``amsgrad`` the
      denominator uses the running maximum of ``v`` instead of ``v``.

    With a clip threshold the RMS never reaches, the update equals
    ``torch.optim.AdamW`` with the same ``amsgrad``. On the first step
    ``v_hat == g**2`` so ``RMS <= 1``: a threshold of 1 never clips it.

    The scale stays a 0-d tensor on the parameter's device, so a step does
    not synchronise with the accelerator.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-4,
        amsgrad: bool = True,
        clip_threshold: float = 1.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if eps <= 0.0:
            raise ValueError(f"invalid eps: {eps} (must be > 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas} (each in [0, 1))")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if clip_threshold <= 0.0:
            raise ValueError(f"invalid clip_threshold: {clip_threshold} (must be > 0)")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            clip_threshold=clip_threshold,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every parameter that has a gradient; return the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            weight_decay = group["weight_decay"]
            amsgrad = group["amsgrad"]
            clip_threshold = group["clip_threshold"]

            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")

                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if amsgrad:
                        state["max_exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                # A state loaded from a checkpoint may hold the step as a tensor.
                step = int(state["step"]) + 1
                state["step"] = step
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias_correction1 = 1.0 - beta1**step
                bias_correction2 = 1.0 - beta2**step

                # Per-tensor update clipping; reduce in at least float32 so
                # half-precision parameters get a meaningful RMS.
                acc_dtype = torch.promote_types(p.dtype, torch.float32)
                v_hat = exp_avg_sq.to(acc_dtype) / bias_correction2
                ratio = grad.to(acc_dtype).square() / v_hat.clamp_(min=eps**2)
                rms = ratio.mean().sqrt()
                lr_t = lr / torch.clamp(rms / clip_threshold, min=1.0)  # 0-d tensor

                if weight_decay != 0.0:
                    p.mul_(1.0 - lr_t * weight_decay)

                if amsgrad:
                    max_exp_avg_sq = state["max_exp_avg_sq"]
                    torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
                    second = max_exp_avg_sq
                else:
                    second = exp_avg_sq
                denom = (second.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                p.sub_((exp_avg / denom) * (lr_t / bias_correction1))

        return loss


def warmup_cosine_factor(
    step: int, *, total_steps: int, warmup_steps: int, final_factor: float = 0.1
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    - warm-up, ``step < warmup_steps``: ``(step + 1) / warmup_steps``, so the
      first step already moves (a zero rate would waste it) and the factor
      reaches 1 at ``step == warmup_steps``;
    - cosine from 1 at ``warmup_steps`` down to ``final_factor`` at
      ``total_steps``;
    - ``final_factor`` from ``total_steps`` on.

    ``warmup_steps=0`` means no warm-up. If ``total_steps <= warmup_steps``
    the warm-up would swallow the whole run, so it is shortened to
    ``total_steps // 2`` and the second half decays.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps <= warmup_steps:
        warmup_steps = total_steps // 2

    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return final_factor
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 100,
    final_factor: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` applying :func:`warmup_cosine_factor`.

    Call ``.step()`` on it once per optimizer step.
    """
    # Validate now rather than on the first scheduler step.
    warmup_cosine_factor(
        0, total_steps=total_steps, warmup_steps=warmup_steps, final_factor=final_factor
    )

    def factor(step: int) -> float:
        return warmup_cosine_factor(
            step, total_steps=total_steps, warmup_steps=warmup_steps, final_factor=final_factor
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
