"""nnU-Net's sliding window, test-time mirroring and fold ensemble, with gradients.

The forward pass is ``nnUNetPredictor.predict_logits_from_preprocessed_data`` step by
step: nnU-Net's patch steps (``compute_steps_for_sliding_window``, step 0.5 of the
patch), its Gaussian (``compute_gaussian``, sigma 1/8 of the patch, float16), each patch
predicted on itself and on every mirrored copy over the checkpoint's allowed axes and
averaged, the Gaussian-weighted sum accumulated in float16 as nnU-Net does, each fold's
logits averaged. It runs without a graph. The backward recomputes one mirrored copy of one patch
of one fold at a time with gradients and back-propagates that patch's
share of the upstream gradient, so only one network call's graph is alive — the gradient of the
deployed function (float16 rounding passed straight through).

Every network call (patch × mirror × fold) goes through ``before_call`` (counting,
cancellation).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Slicer = tuple[object, ...]


@dataclass
class WindowPlan:
    """nnU-Net's patches for one preprocessed input size."""

    shape: tuple[int, ...]
    padded: tuple[int, ...]
    revert: tuple[slice, ...]
    slicers: list[Slicer]
    gaussian: torch.Tensor | float

    @classmethod
    def of(cls, shape: Sequence[int], patch: Sequence[int], step: float, use_gaussian: bool = True) -> WindowPlan:
        """The padding, slicers and Gaussian nnU-Net uses for a ``(*spatial)`` input."""
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

        shape = tuple(int(s) for s in shape)
        patch = tuple(int(p) for p in patch)
        lead = len(shape) - len(patch)
        padded = list(shape)
        revert: list[slice] = [slice(None)] * len(shape)
        for k, p in enumerate(patch):  # acvl_utils.pad_nd_image: pad below and above to the patch size
            a = lead + k
            diff = max(p - shape[a], 0)
            padded[a] = shape[a] + diff
            revert[a] = slice(diff // 2, diff // 2 + shape[a])
        steps = compute_steps_for_sliding_window(tuple(padded[lead:]), patch, step)
        slicers: list[Slicer] = []
        for d in range(padded[0] if lead else 1):
            for start in itertools.product(*steps):
                box = [slice(s, s + p) for s, p in zip(start, patch)]
                slicers.append((slice(None), d, *box) if lead else (slice(None), *box))
        g = (compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, device=torch.device("cpu"))
             if use_gaussian else 1.0)
        return cls(shape, tuple(padded), tuple(revert), slicers, g)

    def pad(self, data: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``(C, *spatial)`` to the padded size (nnU-Net's ``pad_nd_image``)."""
        if self.padded == self.shape:
            return data
        out = data.new_zeros((data.shape[0], *self.padded))
        out[(slice(None), *self.revert)] = data
        return out


@dataclass
class Ensemble:
    """The networks of the folds and how each patch is predicted."""

    networks: Sequence[nn.Module]
    mirror_axes: tuple[int, ...] | None
    num_heads: int
    before_call: Callable[[int], None] | None = None
    copies: list[tuple[int, ...]] | None = None  # one ensemble member: only these mirrored copies
    recomputing: bool = False  # True while the backward recomputes patches (counted apart from the forward)
    on_reuse: Callable[[int], None] | None = None  # told how many network calls a reused forward saved
    tap: object | None = None  # a layer tap (models.member_layer) told of every member the backward recomputes
    _last: tuple | None = None  # (weights' identity and versions, data, logits) of the last forward

    def _weights(self) -> tuple:
        return tuple((id(p), p._version) for net in self.networks for p in net.parameters())

    def cached_logits(self, data: torch.Tensor, plan: WindowPlan, graph: bool) -> torch.Tensor:
        """:meth:`logits`, reused when the same weights saw the same data last time (no network call).

        The engine's prediction pass and the method's first evaluation see the same scan: the
        gradient methods' forward then costs nothing and only the backward recomputes patches.
        A forward whose hooks must fire (``graph``) always runs.
        """
        if not graph and self._last is not None:
            weights, seen, logits = self._last
            if seen.shape == data.shape and weights == self._weights() and torch.equal(seen, data):
                if self.on_reuse is not None:
                    self.on_reuse(len(plan.slicers) * self.calls_per_patch)
                return logits
        logits = self.logits(data, plan, graph=graph)
        self._last = (self._weights(), data.detach().clone(), logits) if not graph else None
        return logits

    @property
    def copy_axes(self) -> list[tuple[int, ...]]:
        """The mirrored copies averaged for each patch: () (the patch itself) and every mirror set."""
        return list(self.copies) if self.copies is not None else [(), *self.mirror_sets]

    @property
    def mirror_sets(self) -> list[tuple[int, ...]]:
        """Axis combinations flipped besides the original (nnU-Net's order)."""
        if not self.mirror_axes:
            return []
        axes = [m + 2 for m in self.mirror_axes]
        return [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]

    @property
    def calls_per_patch(self) -> int:
        """Network evaluations per patch: every mirrored copy of every fold."""
        return len(self.copy_axes) * len(self.networks)

    def _net(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.before_call is not None:
            self.before_call(1)
        return net(x)

    def predict_copy(self, net: nn.Module, x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        """The network on one mirrored copy of ``x``, flipped back (``axes``: () for the patch itself)."""
        if not axes:
            return self._net(net, x)
        return torch.flip(self._net(net, torch.flip(x, axes)), axes)

    def predict_patch(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``_internal_maybe_mirror_and_predict``: the patch and its mirrored copies, averaged."""
        if self.copies is not None:  # a member: its own copies only
            total = sum(self.predict_copy(net, x, axes) for axes in self.copies)
            return total / len(self.copies)  # type: ignore[operator]
        prediction = self._net(net, x)
        sets = self.mirror_sets
        if sets:
            if max(self.mirror_axes or (0,)) > x.ndim - 3:
                raise ValueError("mirror axes do not match the input's dimension")
            for axes in sets:
                prediction = prediction + torch.flip(self._net(net, torch.flip(x, axes)), axes)
            prediction = prediction / (len(sets) + 1)
        return prediction

    def logits(self, data: torch.Tensor, plan: WindowPlan, graph: bool = False) -> torch.Tensor:
        """Fold-averaged logits of ``data`` ``(C, *spatial)`` as nnU-Net computes them (float16)."""
        padded = plan.pad(data)
        total = None
        for net in self.networks:
            acc = torch.zeros((self.num_heads, *plan.padded), dtype=torch.half, device=data.device)
            n_pred = torch.zeros(plan.padded, dtype=torch.half, device=data.device)
            for sl in plan.slicers:
                with torch.set_grad_enabled(graph):
                    patch = padded[sl][None]
                    pred = self.predict_patch(net, patch.requires_grad_(True) if graph else patch)[0].detach()
                pred = pred * plan.gaussian if isinstance(plan.gaussian, torch.Tensor) else pred
                acc[sl] += pred
                n_pred[sl[1:]] += plan.gaussian
            torch.div(acc, n_pred, out=acc)
            logits = acc[(slice(None), *plan.revert)]
            total = logits if total is None else total + logits
        assert total is not None
        if len(self.networks) > 1:
            total /= len(self.networks)
        return total


class EnsembleFunction(torch.autograd.Function):
    """Ensemble logits forward (float16 as nnU-Net); patch-by-patch recomputation in backward."""

    @staticmethod
    def forward(ctx, data: torch.Tensor, ens: Ensemble, plan: WindowPlan) -> torch.Tensor:  # type: ignore[override]
        ctx.ens = ens
        ctx.plan = plan
        ctx.save_for_backward(data)
        hooked = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                     or getattr(m, "_backward_pre_hooks", None) for net in ens.networks for m in net.modules())
        return ens.cached_logits(data.detach(), plan, graph=bool(hooked)).float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (data,) = ctx.saved_tensors
        ens: Ensemble = ctx.ens
        plan: WindowPlan = ctx.plan
        n_pred = torch.zeros(plan.padded, dtype=torch.half, device=data.device)
        for sl in plan.slicers:
            n_pred[sl[1:]] += plan.gaussian
        up = torch.zeros((grad_out.shape[0], *plan.padded), device=data.device)
        up[(slice(None), *plan.revert)] = grad_out.float()
        up = up / n_pred.float() / len(ens.networks)
        gauss = plan.gaussian.float() if isinstance(plan.gaussian, torch.Tensor) else 1.0
        copies = ens.copy_axes  # the mean over mirrored copies is linear: one copy's graph at a time
        ens.recomputing = True
        try:
            return _recompute(ens, plan, data, up, gauss, copies)
        finally:
            ens.recomputing = False


def _recompute(ens: Ensemble, plan: WindowPlan, data: torch.Tensor, up: torch.Tensor, gauss: torch.Tensor | float,
               copies: list[tuple[int, ...]]) -> tuple[torch.Tensor, None, None]:
    """The patch-by-patch backward: each mirrored copy of each patch of each fold, one graph at a time."""
    padded = plan.pad(data.detach())
    grad = torch.zeros_like(padded)
    tap: Any = ens.tap
    with torch.enable_grad(), (tap.attached(plan) if tap is not None else contextlib.nullcontext()):
        for f, net in enumerate(ens.networks):
            for p, sl in enumerate(plan.slicers):
                share = (up[sl] * gauss)[None] / len(copies)
                for axes in copies:
                    patch = padded[sl][None].clone().requires_grad_(True)
                    y = ens.predict_copy(net, patch, axes)
                    (g,) = torch.autograd.grad(y, patch, share)
                    grad[sl] += g[0]
                    del y, g, patch
                    if tap is not None:  # the layer's copy in this member: its activation and gradient
                        tap.member(f, p, axes)
    return grad[(slice(None), *plan.revert)].to(data.dtype), None, None
