"""Closed-form per-sample gradient rules for Glow's own modules (the coupling convs use the Conv2d rule).

ActNorm and the invertible 1x1 conv reach the loss twice: through their output and through their
per-row log-determinant, whose gradient ``alpha_i = d(sum log p)/d logdet_i`` arrives as the second
output's gradient. Both parts are added per sample before squaring.
"""

from __future__ import annotations

import torch

from gradood.features.rules import Contribution, ModuleCall, conv_rule, register_rule
from gradood.models.glow import ActNorm, InvConv2dLU, LearnedPrior, ZeroConv2d


def _spatial(t: torch.Tensor) -> int:
    return t.shape[2] * t.shape[3]


def _logdet_term(call: ModuleCall, scale: int) -> torch.Tensor | int:
    """alpha_i * d logdet_i / d log-scale = alpha_i * H W for each channel (0 when logdet is unused)."""
    alpha = call.grads[1]
    return 0 if alpha is None else alpha[:, None] * scale


@register_rule(ActNorm, keep_args=False, keep_outputs=True)
def actnorm_rule(call: ModuleCall) -> dict[str, Contribution]:
    """out = (x + loc) exp(logs), logdet = H W sum(logs)."""
    m: ActNorm = call.module  # type: ignore[assignment]
    out, g = call.outputs[0], call.grad(0)
    return {
        "loc": g.sum((2, 3)) * torch.exp(m.logs).flatten(),
        "logs": (g * out).sum((2, 3)) + _logdet_term(call, _spatial(out)),
    }


@register_rule(InvConv2dLU)
def invconv_rule(call: ModuleCall) -> dict[str, Contribution]:
    """out = W x per pixel with W = P L U, L = lower * l_mask + I, U = upper * l_mask^T +
    diag(sign_s exp(log_s)); logdet = H W sum(log_s).

    The per-sample gradient w.r.t. W is D_i = sum_t g_t x_t^T; W is linear in L and in U, so
    dL = P^T D U^T and dU = L^T P^T D pull it back exactly, one batched matmul each.
    """
    m: InvConv2dLU = call.module  # type: ignore[assignment]
    x, g = call.args[0], call.grad(0)
    d = g.flatten(2) @ x.flatten(2).transpose(1, 2)
    s = m.sign_s * torch.exp(m.log_s)
    lower = torch.addcmul(m.eye, m.lower, m.l_mask)
    upper = torch.addcmul(torch.diag(s), m.upper, m.l_mask.T)
    pt_d = m.p.T @ d
    d_upper = lower.T @ pt_d
    return {
        "lower": (pt_d @ upper.T) * m.l_mask,
        "upper": d_upper * m.l_mask.T,
        "log_s": torch.diagonal(d_upper, dim1=1, dim2=2) * s + _logdet_term(call, _spatial(x)),
    }


@register_rule(ZeroConv2d, keep_outputs=True, covers=("conv",))
def zero_conv_rule(call: ModuleCall) -> dict[str, Contribution]:
    """out = conv(x) exp(3 logs); the inner conv's output gradient is g exp(3 logs), so this rule
    covers it too (one tap instead of two)."""
    m: ZeroConv2d = call.module  # type: ignore[assignment]
    out, g = call.outputs[0], call.grad(0)
    inner = ModuleCall(m.conv, call.args, {}, [None], [g * torch.exp(3 * m.logs)], call.batch_size)
    return {"logs": 3 * (g * out).sum((2, 3)), **{f"conv.{k}": v for k, v in conv_rule(inner).items()}}


@register_rule(LearnedPrior)
def learned_prior_rule(call: ModuleCall) -> dict[str, Contribution]:
    """log N(z; mean, exp(logs)^2) summed per row; its gradient gamma_i is a scalar per row."""
    m: LearnedPrior = call.module  # type: ignore[assignment]
    z, gamma = call.args[0], call.grad(0)
    gamma = gamma.view(-1, *([1] * (z.dim() - 1)))
    scaled = (z - m.mean) * torch.exp(-2 * m.logs)
    return {"mean": gamma * scaled, "logs": gamma * ((z - m.mean) * scaled - 1)}
