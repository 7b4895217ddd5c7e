"""Per-module rules: a module call's inputs and output gradients -> per-sample parameter gradients.

The engine records every call of a parameter-owning module and, during the single backward pass, hands
the rule for its type a :class:`ModuleCall` holding the gradient of the summed log-likelihood w.r.t.
each output. A rule returns, per parameter it owns (local name), either

- a dense per-sample gradient ``[N, *param.shape]`` (cheap closed forms: biases, norms, ActNorm), or
- an :class:`Outer` factorisation ``sum_t g_t a_t^T`` (Linear, convolutions), which the engine reduces
  by the ghost-norm identity or by materialising, whichever is cheaper, without ever forming the batch
  weight gradient.

Model authors add rules for their own modules with :func:`register_rule`; a module without a rule is
replayed under ``torch.func.vmap(grad)`` for its own parameters (:func:`replay_rule`), which is exact
for any module whose rows are independent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

#: rows [start, stop) -> tensor for those rows; lets the engine chunk large intermediates (unfold)
RowFn = Callable[[slice], Tensor]


@dataclass
class ModuleCall:
    """One recorded call of a module on ``batch_size`` rows.

    ``outputs`` are the flattened output leaves (``None`` where the rule did not ask to keep them) and
    ``grads`` d(sum log p)/d(leaf) (``None`` for leaves that carry no gradient).
    """

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Any]
    grads: list[Tensor | None]
    batch_size: int

    def grad(self, i: int = 0) -> Tensor:
        g = self.grads[i]
        if g is None:
            raise ValueError(f"output {i} of {type(self.module).__name__} carries no gradient")
        return g


@dataclass
class Outer:
    """Per-sample gradient of a weight laid out as ``blocks`` blocks of ``[p, d]`` (conv groups):
    block k of row n is ``out_grads(n)[k] @ activations(n)[k]^T``, summed over ``positions`` T.

    The engine reduces it by the ghost-norm identity, by one bmm per row, or by one of the rule's own
    ``materialisers``, whichever is fastest for the shape (see :mod:`gradood.features.strategies`);
    ``kind`` names the rule's variant in that choice's cache key. A materialiser maps rows to their
    per-sample gradients as ``[m, n, r]``, the parameter's flat order being ``[r, m]`` (m = 1 for plain
    layouts, the kernel taps for the shifted-window kernel, which writes each tap's block contiguously).
    """

    activations: RowFn  # rows -> [n, blocks, d, T]
    out_grads: RowFn  # rows -> [n, blocks, p, T]
    blocks: int
    p: int
    d: int
    positions: int
    kind: str = ""
    materialisers: dict[str, RowFn] = field(default_factory=dict)


Contribution = Tensor | Outer
Rule = Callable[[ModuleCall], dict[str, Contribution]]


@dataclass(frozen=True)
class RuleSpec:
    rule: Rule
    #: the rule reads ``call.args`` / ``call.outputs``; what it does not read is not held until the
    #: backward reaches the module, so memory stays that of a plain backward
    keep_args: bool = True
    keep_outputs: bool = False
    #: child modules whose own parameters the rule also returns (as "child.name"); they get no hook of
    #: their own, which saves a tap where the parent can derive the child's output gradient
    covers: tuple[str, ...] = ()


_RULES: dict[type[nn.Module], RuleSpec] = {}


def register_rule(
    *module_types: type[nn.Module],
    keep_args: bool = True,
    keep_outputs: bool = False,
    covers: tuple[str, ...] = (),
) -> Callable[[Rule], Rule]:
    """Decorator: use ``rule`` for these module types (and subclasses that keep their ``forward``)."""

    def deco(rule: Rule) -> Rule:
        for t in module_types:
            _RULES[t] = RuleSpec(rule, keep_args, keep_outputs, covers)
        return rule

    return deco


def find_rule(module: nn.Module) -> RuleSpec:
    """The rule of the nearest registered base class whose ``forward`` the module still uses, else the
    generic :func:`replay_rule`."""
    for cls in type(module).__mro__:
        if cls in _RULES and type(module).forward is cls.forward:
            return _RULES[cls]
    return RuleSpec(replay_rule)


def _rows(t: Tensor) -> RowFn:
    return lambda r: t[r]


@register_rule(nn.Linear)
def linear_rule(call: ModuleCall) -> dict[str, Contribution]:
    m: nn.Linear = call.module  # type: ignore[assignment]
    n = call.batch_size
    x = call.args[0].reshape(n, -1, m.in_features)
    g = call.grad().reshape(n, -1, m.out_features)
    out: dict[str, Contribution] = {
        "weight": Outer(
            activations=lambda r: x[r].transpose(1, 2).unsqueeze(1),
            out_grads=lambda r: g[r].transpose(1, 2).unsqueeze(1),
            blocks=1,
            p=m.out_features,
            d=m.in_features,
            positions=x.shape[1],
            kind="linear",
        )
    }
    if m.bias is not None:
        out["bias"] = g.sum(1)
    return out


def _conv_patches(x: Tensor, m: nn.Conv2d | nn.ConvTranspose2d) -> Tensor:
    """im2col of the padded input in the channel-major order of the weight: [n, C * kh * kw, T].

    One strided copy of a windowed view: on CPU about twice as fast as ``F.unfold``. For a transposed
    conv ``x`` is its output gradient (the adjoint conv's input), padded by ``padding``."""
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(_padding(m)):
        return x.flatten(2)
    x, _ = _zero_padded(x, m, keep_zero_padding=False)
    n, c, h, w = x.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    sn, sc, sy, sx = x.stride()
    windows = x.as_strided(
        (n, c, kh, kw, ho, wo), (sn, sc, dh * sy, dw * sx, sh * sy, sw * sx), x.storage_offset()
    )
    return windows.reshape(n, c * kh * kw, ho * wo)


def _shifted_window_grads(x: Tensor, g: Tensor, m: nn.Conv2d) -> Tensor:
    """Per-sample weight gradients of a stride-1 conv without im2col or padding copies of the input,
    as [kh * kw, n, C_out * C_in / k].

    Input and output gradient are flattened over a common row width, so kernel tap (i, j) pairs output
    position (h, w) with input index (h + i dh - top) W + (w + j dw - left), a fixed offset: each tap
    is one bmm of a slice of the output gradient with a shifted slice of the input, both strided views
    that BLAS reads without copying. Padding is handled by zeroing the output-gradient columns whose
    partner falls off the row (one masked copy per column offset) and by clipping the slices.
    """
    n, k, (kh, kw), (dh, dw) = x.shape[0], m.groups, m.kernel_size, m.dilation
    left, _, top, _ = m._reversed_padding_repeated_twice
    (h_in, w_in), (h_out, w_out) = x.shape[-2:], g.shape[-2:]
    width = max(w_in, w_out)
    x = F.pad(x, (0, width - w_in)) if width > w_in else x
    g = F.pad(g, (0, width - w_out)) if width > w_out else g
    flat_x = x.reshape(n * k, -1, h_in * width)  # [n k, C_in / k, H W]
    out = g.new_empty(kh * kw, n * k, m.out_channels // k, m.in_channels // k)
    for j in range(kw):
        shift = j * dw - left
        lo, hi = max(0, -shift), min(width, w_in - shift)  # columns whose partner is inside the row
        masked = g if (lo, hi) == (0, width) else F.pad(g[..., lo:hi], (lo, width - hi))
        flat_g = masked.reshape(n * k, -1, h_out * width)  # [n k, p, H_out W]
        for i in range(kh):
            offset = (i * dh - top) * width + shift
            start, stop = max(0, -offset), min(h_out * width, h_in * width - offset)
            window = flat_x[:, :, start + offset : stop + offset].transpose(1, 2)
            torch.bmm(flat_g[:, :, start:stop], window, out=out[i * kw + j])
    return out.reshape(kh * kw, n, -1)


def _zero_padded(
    x: Tensor, m: nn.Conv2d | nn.ConvTranspose2d, keep_zero_padding: bool = True
) -> tuple[Tensor, tuple[int, int]]:
    """``x`` and the symmetric zero padding a weight-gradient convolution over it should use; other
    padding (asymmetric, reflect, ...), or any padding unless ``keep_zero_padding``, is applied to ``x``."""
    left, right, top, bottom = _padding(m)
    mode = getattr(m, "padding_mode", "zeros")
    if not any((left, right, top, bottom)):
        return x, (0, 0)
    if keep_zero_padding and left == right and top == bottom and mode == "zeros":
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom), mode="constant" if mode == "zeros" else mode), (0, 0)


def _grouped_conv_grads(x: Tensor, g: Tensor, m: nn.Conv2d | nn.ConvTranspose2d) -> Tensor:
    """Per-sample weight gradients as the weight gradient of ONE grouped convolution in which every
    row is its own set of groups (the backend's conv kernels, no im2col): [1, n, weight.numel()].

    ``x`` is what the weight is correlated with and ``g`` the output side, so a transposed conv passes
    its output gradient as ``x`` and its input as ``g``.
    """
    n = x.shape[0]
    x, padding = _zero_padded(x, m)
    grads = torch.nn.grad.conv2d_weight(
        x.reshape(1, -1, *x.shape[2:]),
        (n * m.weight.shape[0], *m.weight.shape[1:]),
        g.reshape(1, -1, *g.shape[2:]),
        stride=m.stride,
        padding=padding,
        dilation=m.dilation,
        groups=n * m.groups,
    )
    return grads.reshape(1, n, -1)


def _correlated_grads(x: Tensor, g: Tensor, m: nn.Conv2d | nn.ConvTranspose2d) -> Tensor:
    """Per-sample weight gradients as ONE forward convolution with the roles swapped: input channels
    become the batch, rows become channels, and every row's output gradient is the kernel (dilated by
    the stride) slid over its own input; the output, cropped to the kernel size, is the gradient:
    [1, n, weight.numel()]. Fast where the weight gradient's own kernels are slow: few input channels
    and many positions (a first layer on raw pixels). ``x``/``g`` as in :func:`_grouped_conv_grads`.
    """
    n, k, (kh, kw) = x.shape[0], m.groups, m.kernel_size
    x, padding = _zero_padded(x, m)
    d_in, d_out = x.shape[1] // k, g.shape[1] // k
    rows_as_channels = x.unflatten(1, (k, d_in)).permute(2, 0, 1, 3, 4).flatten(1, 2)  # [d_in, n k, H, W]
    kernels = g.reshape(n * k * d_out, 1, *g.shape[2:])
    out = F.conv2d(
        rows_as_channels, kernels, padding=padding, stride=m.dilation, dilation=m.stride, groups=n * k
    )[..., :kh, :kw]  # [d_in, n k d_out, kh, kw]
    out = out.unflatten(1, (n, k * d_out)).permute(1, 2, 0, 3, 4)  # [n, C_out, d_in, kh, kw]
    return out.reshape(1, n, -1)


def _padding(m: nn.Conv2d | nn.ConvTranspose2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding the weight gradient sees (a transposed conv's adjoint
    conv pads its output gradient by ``padding``)."""
    if isinstance(m, nn.Conv2d):
        return tuple(m._reversed_padding_repeated_twice)  # type: ignore[return-value]
    return (m.padding[1], m.padding[1], m.padding[0], m.padding[0])


def _conv_weight(m: nn.Conv2d | nn.ConvTranspose2d, a: Tensor, g: Tensor, kind: str) -> Outer:
    """The weight's per-sample gradient as the correlation of ``a`` (unfolded into the activations) with
    ``g`` (the output side), both [n, C, H, W]: a conv passes its input and its output gradient, a
    transposed conv (the adjoint of a conv with the same weight) the other way round."""
    n, k = len(a), m.groups
    g_blocks = g.reshape(n, k, g.shape[1] // k, -1)
    materialisers = {"grouped": lambda r: _grouped_conv_grads(a[r], g[r], m)}
    if m.kernel_size != (1, 1):  # a 1x1 conv's per-sample gradient is one plain matmul: bmm
        materialisers["correlated"] = lambda r: _correlated_grads(a[r], g[r], m)
        if isinstance(m, nn.Conv2d) and m.stride == (1, 1) and m.padding_mode == "zeros":
            materialisers["shifted"] = lambda r: _shifted_window_grads(a[r], g[r], m)
    return Outer(
        activations=lambda r: _conv_patches(a[r], m).unflatten(1, (k, -1)),
        out_grads=_rows(g_blocks),
        blocks=k,
        p=g.shape[1] // k,
        d=m.weight[0].numel(),
        positions=g_blocks.shape[-1],
        kind=f"{kind}{m.kernel_size}s{m.stride}",
        materialisers=materialisers,
    )


def _conv_contributions(
    m: nn.Conv2d | nn.ConvTranspose2d, weight: Outer, g_out: Tensor
) -> dict[str, Contribution]:
    out: dict[str, Contribution] = {"weight": weight}
    if m.bias is not None:
        out["bias"] = g_out.flatten(2).sum(-1)
    return out


@register_rule(nn.Conv2d)
def conv_rule(call: ModuleCall) -> dict[str, Contribution]:
    m: nn.Conv2d = call.module  # type: ignore[assignment]
    x, g_out = call.args[0], call.grad()
    return _conv_contributions(m, _conv_weight(m, x, g_out, "conv"), g_out)


@register_rule(nn.ConvTranspose2d)
def conv_transpose_rule(call: ModuleCall) -> dict[str, Contribution]:
    m: nn.ConvTranspose2d = call.module  # type: ignore[assignment]
    x, g_out = call.args[0], call.grad()
    return _conv_contributions(m, _conv_weight(m, g_out, x, "conv_transpose"), g_out)


def _group_norm_stats(call: ModuleCall) -> tuple[Tensor, Tensor]:
    """Per-(row, group) mean and 1/std of a GroupNorm call: the ones autograd saved for the module's own
    backward (which has not run yet when the rule fires) when the output came straight from the
    native kernel, else recomputed: re-reading the input costs as much as the module's forward."""
    node = call.outputs[0].grad_fn
    if type(node).__name__ == "NativeGroupNormBackward0":
        return node._saved_result1, node._saved_result2
    m: nn.GroupNorm = call.module  # type: ignore[assignment]
    x = call.args[0]
    _, mean, rstd = torch.ops.aten.native_group_norm(
        x, None, None, x.shape[0], m.num_channels, x[0, 0].numel(), m.num_groups, m.eps
    )
    return mean, rstd


@register_rule(nn.GroupNorm, keep_outputs=True)
def group_norm_rule(call: ModuleCall) -> dict[str, Contribution]:
    """Per-sample affine gradients from the backend's fused kernel: the batch of ``n`` rows is viewed as
    ONE row of ``n * C`` channels in ``n * groups`` groups (the same statistics), whose weight and bias
    gradients are exactly the per-(row, channel) sums of ``g * x_hat`` and ``g``; x_hat is never written."""
    m: nn.GroupNorm = call.module  # type: ignore[assignment]
    x, g = call.args[0], call.grad()
    n, c = x.shape[0], m.num_channels
    positions = x[0, 0].numel()
    mean, rstd = _group_norm_stats(call)
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        g.reshape(1, n * c, positions),
        x.reshape(1, n * c, positions),
        mean.reshape(1, -1),
        rstd.reshape(1, -1),
        None,
        1,
        n * c,
        positions,
        n * m.num_groups,
        [False, True, m.bias is not None],
    )
    out: dict[str, Contribution] = {"weight": weight.reshape(n, c)}
    if m.bias is not None:
        out["bias"] = bias.reshape(n, c)
    return out


@register_rule(nn.LayerNorm)
def layer_norm_rule(call: ModuleCall) -> dict[str, Contribution]:
    m: nn.LayerNorm = call.module  # type: ignore[assignment]
    x, g = call.args[0], call.grad()
    x_hat = F.layer_norm(x, m.normalized_shape, eps=m.eps)
    shape = (x.shape[0], -1, *m.normalized_shape)
    out: dict[str, Contribution] = {"weight": (g * x_hat).reshape(shape).sum(1)}
    if m.bias is not None:
        out["bias"] = g.reshape(shape).sum(1)
    return out


def replay_rule(call: ModuleCall, chunk_size: int = 64) -> dict[str, Contribution]:
    """Generic fallback: per-sample VJP of the module w.r.t. its own parameters by ``vmap(grad)``.

    Tensor arguments whose first dimension is the batch are vmapped, everything else (and the
    module's children and buffers) is shared. Exact whenever each output row depends on its input row only.
    """
    m, n = call.module, call.batch_size
    own = {name: p.detach() for name, p in m.named_parameters(recurse=False) if p.requires_grad}
    batched = lambda t: isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n  # noqa: E731
    inputs, spec = tree_flatten((call.args, call.kwargs))
    is_batched = [batched(t) for t in inputs]
    rows_in = [t.detach() for t, b in zip(inputs, is_batched, strict=True) if b]
    cotangents = [g for g in call.grads if g is not None]
    if not all(batched(g) for g in cotangents):
        raise ValueError(f"cannot replay {type(m).__name__} per sample: an output has no batch dimension")

    def row_objective(params: dict[str, Tensor], row_in: list[Tensor], row_cot: list[Tensor]) -> Tensor:
        it = iter(row_in)
        leaves = [next(it).unsqueeze(0) if b else t for t, b in zip(inputs, is_batched, strict=True)]
        args, kwargs = tree_unflatten(leaves, spec)
        outputs, _ = tree_flatten(functional_call(m, params, tuple(args), kwargs))
        tapped = [o for o, g in zip(outputs, call.grads, strict=True) if g is not None]
        return sum((o.squeeze(0) * c).sum() for o, c in zip(tapped, row_cot, strict=True))

    per_row = vmap(grad(row_objective), in_dims=(None, 0, 0))
    chunks = []
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        chunks.append(per_row(own, [t[rows] for t in rows_in], [c[rows] for c in cotangents]))
    return {name: torch.cat([c[name] for c in chunks]) for name in own}
