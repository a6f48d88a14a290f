"""Make Captum's DeepLIFT family run correctly, or say why not, on real networks.

Two things go wrong with Captum's DeepLIFT on common segmentation networks:

* **Reused activation modules.** MONAI's SegResNet (and UNETR) call one
  ``nn.ReLU`` at several places of ``forward``; Captum keeps one input/output
  per module and fails with a message about missing attributes. Before DeepLIFT
  runs, one forward pass counts the calls of every module. Each module with a
  DeepLIFT rule that is called ``k > 1`` times is replaced, in a *structural
  copy* of the score model, by ``k`` copies used in call order (call ``i`` of a
  forward pass goes to copy ``i mod k``). A module found at several places of the
  module tree (SegResNet's ``act_mod`` is also ``conv_final[1]``) is split too:
  Captum would hook it once per place. The copy shares every parameter and
  buffer with the user's model (no memory, no change to it); only the module
  objects that carry Captum's hooks are new.
* **Modules without a DeepLIFT rule.** Captum propagates plain gradients
  through modules it has no rule for. That is exact for linear modules
  (convolutions, linear layers, batch norm in eval mode, average pooling,
  upsampling) but not for instance/group/layer norm, GELU, SiLU, PReLU or
  activations called as functions, where the attributions then no longer add
  up to ``F(x) - F(baseline)``. Such modules are named in a note on the result
  (see :mod:`.notes`) before DeepLIFT runs.

Under sliding-window execution DeepLIFT runs patch by patch, exactly: the stitched
function is linear in its patch outputs, so the multiplier of patch ``p``'s output is
its blended share ``w_p / W`` of the target's; each patch batch holds the input's
patches followed by the same patches of the reference (:func:`pair_patches`), which
is how Captum's rules find the reference activations.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods.lrp import network_of, user_model
from esegeta_engine.methods.notes import add_note
from esegeta_engine.methods.rectifiers import FunctionalCounter
from esegeta_engine.methods.registry import MethodContext

# Leaf modules whose gradient is DeepLIFT's exact multiplier (linear or affine maps).
LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.Bilinear, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Upsample, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad2d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.PixelShuffle,
)


def pair_patches(model: nn.Module) -> nn.Module:
    """Make every sliding window in ``model`` batch input and reference patches in pairs."""
    from esegeta_engine.forward.sliding import SlidingWindow

    for m in model.modules():
        if isinstance(m, SlidingWindow):
            m.paired = True
    return model


def has_rule(module: nn.Module) -> bool:
    """True if Captum's DeepLIFT has a rescale/maxpool/softmax rule for ``module``."""
    return type(module) in SUPPORTED_NON_LINEAR


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if not m._modules]


class _PerCallSite(nn.Module):
    """Stands in for a module called ``k`` times per forward: call ``i`` uses copy ``i mod k``."""

    def __init__(self, sites: list[nn.Module]) -> None:
        super().__init__()
        self.sites = nn.ModuleList(sites)
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        site = self.sites[self.calls % len(self.sites)]
        self.calls += 1
        return site(*args, **kwargs)


class _Alias(nn.Module):
    """A further place in the module tree of a split module: delegates to the first one.

    The first :class:`_PerCallSite` is held outside ``_modules``, so tree walks
    (Captum's ``model.apply``) see its copies once, not once per place.
    """

    def __init__(self, main: _PerCallSite) -> None:
        super().__init__()
        object.__setattr__(self, "main", main)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.main(*args, **kwargs)


def structural_copy(model: nn.Module, split: dict[int, int] | None = None,
                    memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """Copy the module tree of ``model``, sharing parameters, buffers and other attributes.

    New module objects (own hook and child dictionaries) with the same tensors:
    hooks registered on the copy never reach ``model``. ``split`` maps
    ``id(module)`` to a number of calls ``k``: such a module becomes ``k``
    copies used in call order at its first place in the tree, and an alias of
    those at any further place. ``memo`` maps the ids of original modules to
    their copies (filled in; the first place for split modules).
    """
    memo = {} if memo is None else memo
    split = split or {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in split:
            if id(m) in memo:
                return _Alias(memo[id(m)])  # type: ignore[arg-type]
            main = _PerCallSite([structural_copy(m) for _ in range(split[id(m)])])
            memo[id(m)] = main
            return main
        if id(m) in memo:
            return memo[id(m)]
        c = copy.copy(m)
        d = c.__dict__
        for key, value in list(d.items()):  # hook dicts, child/parameter/buffer dicts, sets
            if isinstance(value, (dict, set)):
                d[key] = copy.copy(value)
        memo[id(m)] = c
        d["_modules"] = {k: (None if v is None else clone(v)) for k, v in m._modules.items()}
        return c

    return clone(model)


class DeepLiftPlan:
    """What one counting forward pass found about a model, and the model DeepLIFT should run.

    Parameters
    ----------
    ctx : MethodContext
        The score model and inputs; one model evaluation (counted) is spent here.
    method : str
        Method name for the notes and errors.
    notes : list of str
        Where the note on unsupported modules goes.
    probe : callable, optional
        Runs the counting forward pass itself (under ``torch.no_grad``, with the counting hooks
        on): :mod:`.deeplift_twopass` counts during its reference pass, or on one patch. Default:
        the score model on the first input.
    split : bool
        Build the structural copy that splits reused rule modules (Captum's hooks need it).
    """

    def __init__(self, ctx: MethodContext, method: str, notes: list[str],
                 probe: Callable[[], Any] | None = None, split: bool = True) -> None:
        model = ctx.score_model
        calls: Counter[int] = Counter()
        counter = FunctionalCounter()
        handles = []

        def pre(module: nn.Module, args: Any) -> None:
            calls[id(module)] += 1
            counter.depth += 1

        def post(module: nn.Module, args: Any, out: Any) -> None:
            counter.depth -= 1

        names = {}
        # under sliding-window execution the network runs once per patch batch: count per network call
        net = getattr(getattr(model, "runner", None), "net", None) if getattr(model, "patchwise", False) else None
        runs = [0]
        try:
            for name, m in _leaves(model):
                names[id(m)] = (name, m)
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
            if isinstance(net, nn.Module):
                handles.append(net.register_forward_pre_hook(lambda m, a: runs.__setitem__(0, runs[0] + 1)))
            with torch.no_grad(), counter:
                if probe is not None:
                    probe()
                else:
                    model(ctx.inputs[:1].detach())
        finally:
            for h in handles:
                h.remove()
        if runs[0] > 1:
            calls = Counter({i: c // runs[0] for i, c in calls.items()})
            counter.calls = {k: v // runs[0] for k, v in counter.calls.items()}
        places = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        # Captum keeps one input/output per module object and hooks a module once per place
        # in the tree: split rule modules called more than once or found at several places.
        self.split = {i: max(calls.get(i, 0), 1) for i, (_, m) in names.items()
                      if has_rule(m) and (calls.get(i, 0) > 1 or places[i] > 1)}
        if ctx.layer is not None and calls.get(id(ctx.layer), 0) > 1:
            raise MethodError(
                f"{method}: layer '{ctx.layer_name or type(ctx.layer).__name__}' is called "
                f"{calls[id(ctx.layer)]} times per forward pass, so it has no single activation",
                "pick a layer the model calls once (see `esegeta layers MODEL`)")
        user = {id(m): n for n, m in user_model(network_of(model)).named_modules()}
        unsupported = [(user.get(id(m), n), m) for n, m in _leaves(model)
                       if calls.get(id(m)) and not has_rule(m) and not isinstance(m, LINEAR_MODULES)]
        self._note(method, notes, unsupported, counter.calls)
        self.model: nn.Module = model
        self.layer = ctx.layer
        if self.split and split:
            memo: dict[int, nn.Module] = {}
            self.model = structural_copy(model, self.split, memo)
            if ctx.layer is not None:
                self.layer = memo[id(ctx.layer)]

    @staticmethod
    def _note(method: str, notes: list[str], unsupported: list[tuple[str, nn.Module]],
              functional: dict[str, int]) -> None:
        if not unsupported and not functional:
            return
        by_type: dict[str, list[str]] = {}
        for name, m in unsupported:
            by_type.setdefault(type(m).__name__, []).append(name)
        parts = [f"{t} ({', '.join(ns[:2])}{f' and {len(ns) - 2} more' if len(ns) > 2 else ''})"
                 for t, ns in sorted(by_type.items())]
        parts += [f"functional {n} x{k}" for n, k in sorted(functional.items())]
        add_note(notes, (
            f"{method}: DeepLIFT has no rule for {'; '.join(parts)}; it passes plain gradients "
            "there, so the attributions do not add up to F(x) - F(baseline) (use integrated "
            "gradients, which needs no per-module rule, for a complete attribution)"))
