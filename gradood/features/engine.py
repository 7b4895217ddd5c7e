"""Exact per-sample (per-group) squared gradient norms from ONE batched forward and ONE backward.

Forward hooks put a tap (an identity autograd node) on the outputs of every parameter-owning module.
The backward is taken w.r.t. a dummy leaf that only the taps feed, so autograd runs every node between
the loss and the taps but never the parameters' AccumulateGrad nodes: convolutions and linear layers
compute their input gradients only. When a tap's backward fires it holds d(sum log p)/d(output) of one
module call; the module's rule (:mod:`gradood.features.rules`) turns it into per-sample gradients or an
outer-product factorisation, which is reduced to per-group squared norms right there, so peak memory
stays that of a plain backward plus one bounded workspace.

Parameters no hook can see (used outside any module) are handled by a whole-model ``vmap(grad)`` over
just those parameters. A coverage check (on the first batch by default) compares, for every parameter,
the batch sum of what the rules produced with autograd's own batch gradient and fails loudly, naming
the parameter, when a use escaped the hooks.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from gradood.features import glow_rules, strategies  # noqa: F401  (glow_rules registers rules)
from gradood.features.core import group_spans, num_groups, trainable_parameters
from gradood.features.reference import per_row_grads
from gradood.features.rules import Contribution, ModuleCall, Outer, RuleSpec, find_rule, replay_rule
from gradood.models.base import DensityModel

#: bytes of scratch (unfolded patches, Gram matrices, materialised gradients) one reduction step may use
WORKSPACE_BYTES = 64 << 20


class CoverageError(RuntimeError):
    """The per-sample gradients of some parameter do not add up to its batch gradient."""


class _Tap(torch.autograd.Function):
    """Identity on a module's outputs whose backward hands their gradients to ``on_grads``.

    It returns detached aliases (same storage, no copy) rather than its inputs: an input returned
    as-is would count as a view, and a following in-place op (``ReLU(inplace=True)``) would be refused.
    """

    @staticmethod
    def forward(ctx: Any, leaf: Tensor, on_grads: Any, *outputs: Tensor) -> Any:
        ctx.on_grads = on_grads
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        ctx.on_grads(grads)
        return (None, None, *grads)


@dataclass(frozen=True)
class _Run:
    """``n_groups`` consecutive groups of ``size`` rows each, starting at row ``row`` / group ``group``."""

    row: int
    group: int
    n_groups: int
    size: int


@dataclass(frozen=True)
class _Layout:
    """The row groups of one batch: labels on the compute device, runs of equal-size groups (each
    reshapes to [groups, size, ...] without padding) and the counts, all known without a device sync."""

    groups: Tensor
    n_groups: int
    runs: tuple[_Run, ...]

    @staticmethod
    def of(groups: Tensor, device: torch.device) -> _Layout:
        runs: list[_Run] = []
        for g, (start, stop) in enumerate(group_spans(groups)):
            size = stop - start
            if runs and runs[-1].size == size:
                last = runs[-1]
                runs[-1] = _Run(last.row, last.group, last.n_groups + 1, size)
            else:
                runs.append(_Run(start, g, 1, size))
        return _Layout(groups.to(device), num_groups(groups), tuple(runs))

    @property
    def one_row_per_group(self) -> bool:
        return all(run.size == 1 for run in self.runs)


def _flatten(output: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """A module output's leaves and how to rebuild it; plain tensors and tuples skip the pytree."""
    if isinstance(output, Tensor):
        return [output], lambda leaves: leaves[0]
    if type(output) is tuple:
        return list(output), tuple
    leaves, spec = tree_flatten(output)
    return leaves, lambda new: tree_unflatten(new, spec)


#: elements per partial sum in :func:`_sqnorms`
NORM_BLOCK = 1024


def _sqnorms(t: Tensor, dim: int) -> Tensor:
    """Squared norms along ``dim`` in the tensor's own dtype, to ~1e-7 relative in float32.

    ``vector_norm`` is the fastest reduction (no temporary, unlike ``vecdot``'s multiply-then-sum) but
    accumulates ~r eps of error over r terms (2e-5 at a million), so long rows are reduced in blocks of
    ``NORM_BLOCK`` whose squares are then summed; widening the whole tensor first would cost more.
    """
    t = t.movedim(dim, -1)
    r = t.shape[-1]
    if r < 4 * NORM_BLOCK:
        return torch.linalg.vecdot(t, t)
    main = r - r % NORM_BLOCK
    blocks = t[..., :main].unflatten(-1, (-1, NORM_BLOCK))
    out = torch.linalg.vector_norm(blocks, dim=-1).square().sum(-1)
    if main < r:
        out = out + torch.linalg.vecdot(t[..., main:], t[..., main:])
    return out


@dataclass
class _Accumulator:
    """What a pass has gathered for one parameter."""

    #: squared norm per group, for parameters fed by a single module call (reduced immediately)
    sqnorm: Tensor | None = None
    #: per-group gradient sums (float64, flattened), for parameters fed by several calls
    group_sum: Tensor | None = None
    #: sum over the batch of the per-sample gradients (coverage check only)
    batch_sum: Tensor | None = None

    def add_batch_sum(self, t: Tensor) -> None:
        self.batch_sum = t if self.batch_sum is None else self.batch_sum + t

    def result(self, n_groups: int, device: torch.device) -> Tensor:
        """float64 [G] squared norms."""
        if self.group_sum is not None:
            return self.group_sum.square().sum(1)
        if self.sqnorm is not None:
            return self.sqnorm.to(torch.float64)
        return torch.zeros(n_groups, dtype=torch.float64, device=device)


@dataclass
class _Pass:
    """State of one extraction: recorded calls, per-parameter accumulators, the group layout."""

    engine: FeatureEngine
    layout: _Layout
    check: bool
    tap_leaf: Tensor
    recording: bool = True
    #: recorded module calls per parameter; a parameter fed by one call is reduced as soon as it arrives
    calls: Counter[str] = field(default_factory=Counter)
    accs: dict[str, _Accumulator] = field(default_factory=dict)
    #: modules called on something other than the batch's rows (e.g. rows repeated per noise draw);
    #: their parameters go to the whole-model vmap instead
    irregular: set[nn.Module] = field(default_factory=set)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.recording:
            return None
        leaves, rebuild = _flatten(output)
        tapped = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad]
        if not tapped:
            return None
        if any(leaves[i].dim() == 0 or leaves[i].shape[0] != len(self.layout.groups) for i in tapped):
            self.irregular.add(module)  # rows are not the batch's rows: rules cannot split it per sample
            return None
        for name in self.engine.module_params[module].values():
            self.calls[name] += 1
        spec = self.engine.rules[module]
        call = ModuleCall(
            module,
            args if spec.keep_args else (),
            kwargs if spec.keep_args else {},
            list(leaves) if spec.keep_outputs else [None] * len(leaves),
            [None] * len(leaves),
            batch_size=len(self.layout.groups),
        )
        outs = _Tap.apply(self.tap_leaf, partial(self.on_grads, call, tapped), *[leaves[i] for i in tapped])
        for i, t in zip(tapped, outs, strict=True):
            leaves[i] = t
        return rebuild(leaves)

    def on_grads(self, call: ModuleCall, tapped: list[int], grads: tuple[Tensor, ...]) -> None:
        if call.module in self.irregular:
            return
        for i, g in zip(tapped, grads, strict=True):
            call.grads[i] = g
        names = self.engine.module_params[call.module]
        for local, contribution in self.engine.rules[call.module].rule(call).items():
            if local in names:  # rules may also cover frozen parameters
                self.add(names[local], contribution)
        call.args, call.kwargs, call.outputs, call.grads = (), {}, [], []

    def add(self, name: str, c: Contribution, rows: slice | None = None) -> None:
        """Fold one contribution (for all rows, or for ``rows`` only) into the parameter's accumulator."""
        acc = self.accs.setdefault(name, _Accumulator())
        if isinstance(c, Outer):
            self._add_outer(acc, c, eager=self.calls[name] == 1)
            return
        c = c.flatten(1)
        if self.check:
            acc.add_batch_sum(c.sum(0))
        if rows is None and self.calls[name] == 1 and self.layout.one_row_per_group:
            acc.sqnorm = _sqnorms(c, 1)
            return
        acc.group_sum = self._group_sum(acc, c.shape[1], c.device)
        acc.group_sum.index_add_(0, self.layout.groups[rows or slice(None)], c.to(torch.float64))

    def _group_sum(self, acc: _Accumulator, numel: int, device: torch.device) -> Tensor:
        if acc.group_sum is None:
            return torch.zeros(self.layout.n_groups, numel, dtype=torch.float64, device=device)
        return acc.group_sum

    def _add_outer(self, acc: _Accumulator, o: Outer, eager: bool) -> None:
        """Squared norms (single call) or group gradient sums (several calls), one chunk of groups at a
        time so unfolded patches, Gram matrices and materialised gradients stay within the workspace."""
        pieces = []
        for run in self.layout.runs:
            strategy = self.engine.choose(o, run, eager)
            step = max(1, self.engine.workspace_bytes // strategies.bytes_per_group(o, run.size, strategy))
            for g0 in range(0, run.n_groups, step):
                g1 = min(g0 + step, run.n_groups)
                rows = slice(run.row + g0 * run.size, run.row + g1 * run.size)
                result = strategies.run(o, strategy, rows, run.size)
                if strategy == "ghost":
                    pieces.append(result)
                    if self.check:
                        acc.add_batch_sum(strategies.batch_sum(o, rows))
                    continue
                if self.check:
                    acc.add_batch_sum(result.sum(1).T.flatten())
                if eager:
                    pieces.append(_sqnorms(result, 2).sum(0))
                else:
                    grads = strategies.param_order(result).to(torch.float64)
                    acc.group_sum = self._group_sum(acc, grads.shape[1], grads.device)
                    acc.group_sum[run.group + g0 : run.group + g1] += grads
        if eager:
            acc.sqnorm = pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class FeatureEngine:
    """Hook-based extractor for one model; keeps the coverage-check state between batches."""

    def __init__(
        self,
        model: DensityModel,
        check: str = "first",
        strategy: str = "time",
        workspace_bytes: int = WORKSPACE_BYTES,
    ):
        """``check``: first | always | never (coverage check). ``strategy``: how Outer factorisations
        are reduced: time (each option timed once per shape on the device, cached), cost (a FLOP
        model), or a strategy name (ghost, bmm, grouped, correlated, shifted) forced wherever it applies."""
        if check not in ("first", "always", "never"):
            raise ValueError(f"check must be first, always or never, got {check!r}")
        self.strategy = strategy
        self._choices: dict[tuple, str] = {}
        self.model = model
        self.check = check
        self.checked = False
        self.workspace_bytes = workspace_bytes
        self.params = trainable_parameters(model)
        self.signature = _signature(model)
        name_of = {id(p): name for name, p in self.params.items()}
        specs = {module: self._rule_spec(module) for module in model.modules()}
        covered = {module.get_submodule(c) for module, spec in specs.items() for c in spec.covers}
        #: hooked module -> {local parameter name: global feature name}; covered children's parameters
        #: are listed under their parent as "child.name"
        self.module_params: dict[nn.Module, dict[str, str]] = {}
        for module, spec in specs.items():
            if module in covered:
                continue
            owned = [module.named_parameters(recurse=False)]
            owned += [module.get_submodule(c).named_parameters(prefix=c, recurse=False) for c in spec.covers]
            own = {local: name_of[id(p)] for named in owned for local, p in named if id(p) in name_of}
            if own:
                self.module_params[module] = own
        self.rules = {module: specs[module] for module in self.module_params}

    def choose(self, o: Outer, run: _Run, eager: bool) -> str:
        key = (o.kind, o.blocks, o.p, o.d, o.positions, run.size, eager, *o.materialisers)
        if key not in self._choices:
            options = strategies.candidates(o, run.size, eager)
            if self.strategy in strategies.candidates(o, run.size, eager, prune=False):
                choice = self.strategy
            elif self.strategy == "time" and len(options) > 1:
                choice = strategies.timed_choice(
                    o, run.row, run.size, run.n_groups, options, self.workspace_bytes
                )
            else:
                choice = strategies.cost_model_choice(o, run.size, options)
            self._choices[key] = choice
        return self._choices[key]

    def _rule_spec(self, module: nn.Module) -> RuleSpec:
        spec = find_rule(module)
        if spec.rule is not replay_rule:
            return spec
        numel = sum(p.numel() for p in module.parameters(recurse=False))
        chunk = max(1, self.workspace_bytes // (4 * max(numel, 1)))
        return RuleSpec(partial(replay_rule, chunk_size=chunk))

    def __call__(self, x: Tensor, noise: dict[str, Tensor], groups: Tensor) -> tuple[Tensor, Tensor]:
        """(log_prob [N], squared norms [G, L]), both float64, for rows ``x`` in contiguous ``groups``."""
        check = self.check == "always" or (self.check == "first" and not self.checked)
        tap_leaf = torch.zeros((), device=x.device, dtype=x.dtype, requires_grad=True)
        state = _Pass(self, _Layout.of(groups, x.device), check, tap_leaf)
        handles = [m.register_forward_hook(state.hook, with_kwargs=True) for m in self.module_params]
        try:
            log_prob = self.model.log_prob(x, noise)
        finally:
            for handle in handles:
                handle.remove()
            state.recording = False
        irregular = {name for module in state.irregular for name in self.module_params[module].values()}
        uncovered = [name for name in self.params if name not in state.calls or name in irregular]
        # the one backward: runs every tap (and so every rule); parameters appear only where their
        # batch gradient is needed (the coverage check, or to tell used uncovered ones from unused)
        wrt = list(self.params) if check else uncovered
        batch_grads: dict[str, Tensor | None] = {}
        if log_prob.requires_grad:
            grads = torch.autograd.grad(
                log_prob.sum(), [tap_leaf, *(self.params[n] for n in wrt)], allow_unused=True
            )
            batch_grads = dict(zip(wrt, grads[1:], strict=True))
        used_uncovered = [n for n in uncovered if batch_grads.get(n) is not None]
        if used_uncovered:
            for start, row_grads, lp in per_row_grads(self.model, x, noise, used_uncovered):
                for name, g in row_grads.items():
                    state.add(name, g, rows=slice(start, start + len(lp)))
        if check:
            self._check_coverage(state, batch_grads)
            self.checked = True
        n_groups = state.layout.n_groups
        results = [state.accs.get(n, _Accumulator()).result(n_groups, x.device) for n in self.params]
        sqnorms = torch.stack(results, 1) if results else x.new_zeros(n_groups, 0, dtype=torch.float64)
        return log_prob.detach().to(torch.float64), sqnorms

    def _check_coverage(self, state: _Pass, batch_grads: dict[str, Tensor | None]) -> None:
        """Per-sample gradients (or their factors) summed over the batch must give autograd's batch
        gradient for every parameter; measured against the larger of that gradient's norm and the
        root of the summed per-group squared norms, so cancellation across rows cannot fake an error.
        That scale is floored at 1e-3 of the largest parameter's: a gradient that is zero in exact
        arithmetic (a bias feeding a one-channel GroupNorm) is float noise on both sides, and two noises
        disagree completely without any use of the parameter escaping the hooks."""
        if not self.params:
            return
        tol = max(1e4 * torch.finfo(next(iter(self.params.values())).dtype).eps, 1e-9)
        diffs, scales = [], []
        for name, p in self.params.items():
            expected = batch_grads.get(name)
            expected = (
                torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if expected is None else expected
            )
            acc = state.accs.get(name, _Accumulator())
            got = expected.new_zeros(p.numel()) if acc.batch_sum is None else acc.batch_sum
            diff = (got.to(torch.float64) - expected.flatten().to(torch.float64)).norm()
            scale = torch.maximum(
                expected.to(torch.float64).norm(), acc.result(state.layout.n_groups, p.device).sum().sqrt()
            )
            diffs.append(diff)
            scales.append(scale)
        scale = torch.stack(scales)
        floor = (1e-3 * scale.max()).clamp_min(torch.finfo(torch.float64).tiny)
        rel = (torch.stack(diffs) / torch.maximum(scale, floor)).cpu().tolist()
        bad = [
            f"{name} (relative error {e:.2e})"
            for name, e in zip(self.params, rel, strict=True)
            if not e <= tol
        ]
        if bad:
            raise CoverageError(
                f"{type(self.model).__name__}: per-sample gradients do not add up to the batch gradient for "
                f"{', '.join(bad)}. A use of the parameter escapes the hooks (outside its module's forward, "
                "or a rule that does not match the module): register a rule for it, or use method='vmap'."
            )


_ENGINES: weakref.WeakKeyDictionary[nn.Module, FeatureEngine] = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    return tuple((name, id(p)) for name, p in trainable_parameters(model).items())


def engine_sqnorms(
    model: DensityModel, x: Tensor, noise: dict[str, Tensor], groups: Tensor
) -> tuple[Tensor, Tensor]:
    """The engine cached per model, so the coverage check runs on a model's first batch only."""
    engine = _ENGINES.get(model)
    if engine is None or engine.signature != _signature(model):
        engine = _ENGINES[model] = FeatureEngine(model)
    return engine(x, noise, groups)
