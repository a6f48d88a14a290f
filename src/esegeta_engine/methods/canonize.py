"""Canonizers: rewrite a network into an equivalent one that LRP's rules can explain.

LRP has rules for linear layers and passes everything else through. Eval-mode
batch normalisation is an affine map per channel,
``BN(z) = gamma * (z - mu) / sqrt(var + eps) + beta``; passed through unchanged
it hides a rescaling of up to orders of magnitude from the rules (LRP-0 then
misses gradient x input by a factor of 10^5 on the bundled U-Net). Folded into
the convolution whose output it normalises,

    ``W' = W * s``, ``b' = (b - mu) * s + beta`` with ``s = gamma / sqrt(var + eps)``

(per output channel), the network computes the same function and every rule
sees the real weights (as zennit's ``MergeBatchNorm`` canonizer does).

:func:`fold_batch_norm` finds the pairs with one forward probe (a batch norm
whose input *is* a convolution's output), swaps in folded parameter objects and
an identity batch norm, checks on the probe that the network's output is
unchanged, and on exit puts the original parameter and buffer objects back (the
user's tensors are never written to). Normalisations it cannot fold — instance,
group and layer norm (their statistics come from the input), batch norm in
training mode or after anything but a convolution — are named in a note: LRP
passes relevance through them unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

CONVS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
UNFOLDABLE: tuple[type[nn.Module], ...] = (
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def find_pairs(net: nn.Module, probe: torch.Tensor, outputs: list[Any] | None = None
               ) -> list[tuple[nn.Module, nn.Module]]:
    """``(convolution, batch norm)`` pairs where the norm reads the convolution's output directly
    (``outputs``, if given, receives the probe's output: the unfolded network's, for the check)."""
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    pairs: list[tuple[nn.Module, nn.Module]] = []
    handles = []

    def conv_out(m: nn.Module, args: Any, y: Any) -> None:
        if isinstance(y, torch.Tensor):
            produced[id(y)] = (m, y)  # the tensor is held, so its id stays unique

    def bn_in(m: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in produced and not m.training:
            conv = produced[id(args[0])][0]
            if all(c is not conv and b is not m for c, b in pairs):
                pairs.append((conv, m))

    try:
        for m in net.modules():
            if isinstance(m, CONVS):
                handles.append(m.register_forward_hook(conv_out))
            elif isinstance(m, BATCH_NORMS):
                handles.append(m.register_forward_pre_hook(bn_in))
        with torch.no_grad():
            y = net(probe)
    finally:
        for h in handles:
            h.remove()
    if outputs is not None:
        outputs.append(y)
    return pairs


def _folded(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(bn.num_features, dtype=w.dtype,
                                                                       device=w.device)
    var = bn.running_var if bn.running_var is not None else torch.ones_like(b)
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros_like(b)
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(b)
    scale = gamma / torch.sqrt(var + bn.eps)
    out_axis = 1 if isinstance(conv, CONVS[3:]) else 0
    shape = [1] * w.dim()
    shape[out_axis] = -1
    if isinstance(conv, CONVS[3:]) and conv.groups > 1:  # (in, out/groups, ...): not per out channel
        raise ValueError("grouped transposed convolution")
    return w * scale.reshape(shape), (b - mean) * scale + beta


class _Swap:
    """Replace module attributes (parameters, buffers, plain values); restore the originals."""

    def __init__(self) -> None:
        self.saved: list[tuple[nn.Module, str, str, Any]] = []

    def set(self, m: nn.Module, name: str, value: Any) -> None:
        if name in m._parameters:
            kind = "param"
            self.saved.append((m, name, kind, m._parameters[name]))
            m._parameters[name] = None if value is None else nn.Parameter(value, requires_grad=False)
        elif name in m._buffers:
            self.saved.append((m, name, "buffer", m._buffers[name]))
            m._buffers[name] = value
        else:
            self.saved.append((m, name, "attr", m.__dict__[name]))
            m.__dict__[name] = value

    def restore(self) -> None:
        for m, name, kind, old in reversed(self.saved):
            if kind == "param":
                m._parameters[name] = old
            elif kind == "buffer":
                m._buffers[name] = old
            else:
                m.__dict__[name] = old
        self.saved.clear()


def _fold(swap: _Swap, conv: nn.Module, bn: nn.Module) -> None:
    w, b = _folded(conv, bn)
    swap.set(conv, "weight", w)
    if conv.bias is None:
        swap.saved.append((conv, "bias", "param", None))
        conv._parameters["bias"] = nn.Parameter(b, requires_grad=False)
    else:
        swap.set(conv, "bias", b)
    one = torch.ones_like(b)
    if bn.weight is not None:
        swap.set(bn, "weight", one)
        swap.set(bn, "bias", torch.zeros_like(b))
    swap.set(bn, "running_mean", torch.zeros_like(b))
    swap.set(bn, "running_var", one.clone())
    swap.set(bn, "eps", 0.0)
    swap.set(bn, "momentum", 0.0)


def unfolded_norms(net: nn.Module, folded: list[nn.Module]) -> dict[str, list[str]]:
    """Normalisation modules of ``net`` LRP passes through unchanged, by type name."""
    done = {id(m) for m in folded}
    found: dict[str, list[str]] = {}
    for name, m in net.named_modules():
        if isinstance(m, UNFOLDABLE + BATCH_NORMS) and id(m) not in done:
            found.setdefault(type(m).__name__, []).append(name or "(model)")
    return found


def describe_unfolded(method: str, found: dict[str, list[str]]) -> str:
    """The note naming normalisations relevance passes through unchanged."""
    parts = "; ".join(f"{t} ({', '.join(ns[:2])}{f' and {len(ns) - 2} more' if len(ns) > 2 else ''})"
                      for t, ns in sorted(found.items()))
    return (f"{method}: relevance passes through {parts} unchanged: they cannot be folded into a "
            "convolution (instance/group/layer norm use the input's own statistics; a batch norm must be "
            "in eval mode right after a convolution), so the map ignores their rescaling")


@contextlib.contextmanager
def fold_batch_norm(net: nn.Module, probe: torch.Tensor, rtol: float = 1e-4) -> Iterator[list[nn.Module]]:
    """Fold every eval-mode batch norm of ``net`` into the convolution before it, for the context.

    Parameters
    ----------
    net : nn.Module
        The network (shared with the user: only parameter/buffer *objects* are swapped, and
        the originals are put back on exit, whatever happens).
    probe : torch.Tensor
        An input ``net`` accepts (one patch or the input), used to find the pairs and to check
        that the folded network computes the same output.
    rtol : float
        Largest change of the probe's output, relative to its largest magnitude, accepted as
        rounding; a larger change (a convolution output also read elsewhere) undoes the folds.

    Yields
    ------
    list of nn.Module
        The batch norms folded (empty when none could be).
    """
    if not any(isinstance(m, BATCH_NORMS) and not m.training for m in net.modules()):
        yield []  # nothing to fold: no probe (one network call fewer)
        return
    unfolded: list[Any] = []
    pairs = find_pairs(net, probe, unfolded)
    swap = _Swap()
    folded: list[nn.Module] = []
    try:
        if pairs:
            before = unfolded[0]  # the probe's output before any fold: one network call fewer
            for conv, bn in pairs:
                try:
                    _fold(swap, conv, bn)
                    folded.append(bn)
                except ValueError:
                    continue
            with torch.no_grad():
                after = net(probe)
            if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor):
                scale = float(before.detach().abs().max()) or 1.0
                if float((after - before).abs().max()) > rtol * scale:
                    swap.restore()
                    folded.clear()
        yield folded
    finally:
        swap.restore()
