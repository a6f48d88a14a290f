"""Conservative LRP through MONAI's SwinUNETR, as a temporary canonizer (Ali et al. 2022's rules).

SwinUNETR's transformer (``SwinTransformer``) runs its attention on windows of tokens, shifted every
other block, with a relative position bias and a mask in the attention logits; its residual sums,
window partitions and shifts are written inside ``SwinTransformerBlock.forward``, and the hidden
states it hands to the decoder pass a functional layer norm (``proj_out``). For the run,
:func:`swin_rules` swaps in forwards that compute the same numbers with the backward of the
conservative rules of :mod:`.lrp_attention`:

``WindowAttention`` (the AH-rule)
    the softmax probabilities ``P`` (logits, relative position bias and shift mask included) are
    held constant, and the epsilon rule runs on the map left, linear in the values:
    ``y = W_o (P V(x)) + b_o``. The relative position bias and the mask enter the logits only, so
    with ``P`` constant they take no relevance (as queries and keys take none); the value and
    output biases absorb their share.
``SwinTransformerBlock`` residual sums
    ``x + attention(x)`` and ``x + mlp(x)`` share relevance by the epsilon rule of a sum
    (:class:`.lrp_attention.EpsilonSum`).
``SwinTransformer.proj_out``
    ``F.layer_norm`` without affine parameters takes the LN-rule (sigma held constant).
MONAI's ``UnetResBlock`` residual sums (SwinUNETR's and UNETR's encoders and decoders)
    the epsilon rule of a sum too.
Window partition, shift (``torch.roll``), reverse, padding and the patch merging's gather
    are permutations (or zero padding): autograd routes relevance through them exactly. The patch
    merging's ``LayerNorm`` is a module and takes the LN-rule like ``norm1``/``norm2``.

Before the rules are used, one probe through the network checks every swapped forward against
MONAI's own (``type(m).forward``) and every window attention against the rule's recomputation, to
``1e-6`` of the output's scale; a block that differs (another MONAI version) is refused by name.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods.lrp_rules import stabilise

WINDOW = ("WindowAttention",)
"""MONAI attention blocks whose rule sits in their swapped forward (the hooks leave them alone)."""
SWIN = ("SwinTransformerBlock", "SwinTransformer", "WindowAttention")
RESIDUAL = ("UnetResBlock",)
TOLERANCE = 1e-6


def monai_type(m: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether ``m`` is exactly one of MONAI's classes ``names`` (a user subclass is not)."""
    t = type(m)
    return t.__name__ in names and t.__module__.startswith("monai.")


def is_window_attention(m: nn.Module) -> bool:
    """MONAI's Swin window attention (its rule is in the canonizer's forward)."""
    return monai_type(m, WINDOW)


def window_probabilities(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The softmax probabilities of MONAI's ``WindowAttention`` at windows ``x`` ``(windows, n, c)``."""
    b, n, c = x.shape
    h = block.num_heads
    q, k, _ = block.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    logits = (q * block.scale) @ k.transpose(-2, -1)
    index = block.relative_position_index[:n, :n].reshape(-1)
    bias = block.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)
    logits = logits + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(b // nw, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, h, n, n)
    return logits.softmax(dim=-1)


def window_output(block: nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``block``'s output at ``x`` with the probabilities ``probs`` given: linear in ``x``."""
    b, n, c = x.shape
    h = block.num_heads
    v = block.qkv(x).reshape(b, n, 3, h, c // h)[:, :, 2].transpose(1, 2)
    return block.proj((probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, c))


def window_rule(block: nn.Module, a: torch.Tensor, mask: torch.Tensor | None, R: torch.Tensor,
                eps: float, rule: str = "held") -> torch.Tensor:
    """AH-rule on a window attention: the epsilon rule with its probabilities held constant
    (``rule="attnlrp"``: AttnLRP's rule, relevance to queries and keys too)."""
    if rule == "attnlrp":
        return window_attnlrp(block, a, mask, R, eps)
    a = a.detach().requires_grad_(True)
    with torch.enable_grad():
        probs = window_probabilities(block, a, mask).detach()
        z = window_output(block, a, probs)
        (g,) = torch.autograd.grad(z, a, R / stabilise(z.detach(), eps))
    return a.detach() * g


def window_attnlrp(block: nn.Module, a: torch.Tensor, mask: torch.Tensor | None, R: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """AttnLRP (:func:`.lrp_attnlrp.attention`) on a window attention: the relative position bias and the
    shift mask are the logits' extra term."""
    from esegeta_engine.methods import lrp_attnlrp

    b, n, c = a.shape
    h = block.num_heads
    index = block.relative_position_index[:n, :n].reshape(-1)
    extra = block.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0).detach()
    if mask is not None:
        extra = extra + mask.unsqueeze(1).repeat(b // mask.shape[0], 1, 1, 1)  # window w of image i: i * nw + w

    def heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = block.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        return q, k, v

    def project(o: torch.Tensor) -> torch.Tensor:
        return block.proj(o.transpose(1, 2).reshape(b, n, c))

    return lrp_attnlrp.attention(a, R, eps, heads, block.scale, extra, project)


class _HeldAttention(torch.autograd.Function):
    """MONAI's own window attention forward; the backward is :func:`window_rule`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: Any, block: nn.Module, eps: float,  # type: ignore[override]
                rule: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.mask, ctx.block, ctx.eps, ctx.rule = mask, block, eps, rule
        with torch.no_grad():
            return type(block).forward(block, x, mask)

    @staticmethod
    def backward(ctx: Any, R: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return window_rule(ctx.block, x, ctx.mask, R, ctx.eps, ctx.rule), None, None, None, None


def held_layer_norm(a: torch.Tensor, R: torch.Tensor, eps: float, norm_eps: float = 1e-5) -> torch.Tensor:
    """LN-rule on a layer norm without affine parameters over the last axis (sigma constant)."""
    sigma = torch.sqrt(a.var(dim=-1, unbiased=False, keepdim=True) + norm_eps)
    y = (a - a.mean(dim=-1, keepdim=True)) / sigma
    s = R / stabilise(y, eps)
    return a * (s - s.mean(dim=-1, keepdim=True)) / sigma


class _HeldLayerNorm(torch.autograd.Function):
    """``F.layer_norm(x, [c])`` over the last axis; the backward is :func:`held_layer_norm`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.eps = eps
        return F.layer_norm(x, [x.shape[-1]])

    @staticmethod
    def backward(ctx: Any, R: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return held_layer_norm(x.detach(), R, ctx.eps), None


def _checked(state: dict[str, Any], name: str, ours: torch.Tensor, monai: Any) -> None:
    """Record ``name`` when ``ours`` differs from MONAI's own result ``monai``."""
    if not isinstance(monai, torch.Tensor) or monai.shape != ours.shape or \
            float((ours - monai).abs().max()) > TOLERANCE * max(float(monai.abs().max()), 1.0):
        state["bad"].append(name)


def _attention_forward(state: dict[str, Any], name: str, eps: float) -> Any:
    def forward(self: nn.Module, x: torch.Tensor, mask: Any = None) -> torch.Tensor:
        y = _HeldAttention.apply(x, mask, self, eps, state["rule"])
        if state["checking"]:
            with torch.no_grad():
                _checked(state, name, window_output(self, x, window_probabilities(self, x, mask)), y)
        return y
    return forward


def _block_forward(state: dict[str, Any], name: str, eps: float) -> Any:
    from esegeta_engine.methods.lrp_attention import EpsilonSum

    def forward(self: nn.Module, x: torch.Tensor, mask_matrix: Any = None) -> torch.Tensor:
        y = EpsilonSum.apply(x, self.drop_path(self.forward_part1(x, mask_matrix)), eps)
        y = EpsilonSum.apply(y, self.forward_part2(y), eps)
        if state["checking"]:
            with torch.no_grad():
                _checked(state, name, y, type(self).forward(self, x, mask_matrix))
        return y
    return forward


def _proj_out(state: dict[str, Any], name: str, eps: float) -> Any:
    def proj_out(self: nn.Module, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        y = _HeldLayerNorm.apply(x.movedim(1, -1), eps).movedim(-1, 1) if normalize else x
        if state["checking"]:
            with torch.no_grad():
                _checked(state, f"{name}.proj_out", y, type(self).proj_out(self, x, normalize))
        return y
    return proj_out


def _residual_forward(state: dict[str, Any], name: str, eps: float) -> Any:
    from esegeta_engine.methods.lrp_attention import EpsilonSum

    def forward(self: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(inp)))))
        residual = inp
        if hasattr(self, "conv3"):
            residual = self.conv3(residual)
        if hasattr(self, "norm3"):
            residual = self.norm3(residual)
        y = self.lrelu(EpsilonSum.apply(out, residual, eps))
        if state["checking"]:
            with torch.no_grad():
                _checked(state, name, y, type(self).forward(self, inp))
        return y
    return forward


_NOTHING = object()
"""Marks an attribute the instance did not have before the swap."""

SWAPS = {"WindowAttention": ("forward", _attention_forward),
         "SwinTransformerBlock": ("forward", _block_forward),
         "SwinTransformer": ("proj_out", _proj_out),
         "UnetResBlock": ("forward", _residual_forward)}
"""MONAI class name -> (the attribute swapped on the instance, its factory)."""


def has_swin(net: nn.Module) -> bool:
    """Whether ``net`` holds MONAI's Swin transformer blocks."""
    return any(monai_type(m, SWIN) for m in net.modules())


@contextlib.contextmanager
def swin_rules(net: nn.Module, probe: torch.Tensor, eps: float, residual: bool = True,
               run_probe: bool = False, rule: str = "held") -> Iterator[list[str]]:
    """Give MONAI's Swin blocks (and ``UnetResBlock`` residuals) of ``net`` their rules for the context.

    Parameters
    ----------
    net : nn.Module
        The network; only instance attributes (``forward``, ``proj_out``) are set, removed on exit.
    probe : torch.Tensor
        An input ``net`` accepts (one patch under sliding windows): every swapped forward is checked
        on it against MONAI's own.
    eps : float
        The epsilon of the attention rule, the residual sums and the layer norm.
    residual : bool
        Also split ``UnetResBlock`` residual sums (done whenever the network has transformer blocks).
    run_probe : bool
        Run the probe even when nothing is swapped (other checks' hooks ride on it).
    rule : str
        The window attention's rule: ``held`` (Ali et al. 2022) or ``attnlrp`` (Achtibat et al. 2024).

    Yields
    ------
    list of str
        The names of the window attention blocks that take the AH-rule (empty: nothing swapped).
    """
    names = {id(m): n for n, m in net.named_modules()}
    kinds = SWIN + (RESIDUAL if residual else ())
    targets = [m for m in net.modules() if monai_type(m, kinds)]
    if not targets and not run_probe:
        yield []
        return
    state: dict[str, Any] = {"checking": True, "bad": [], "rule": rule}
    swapped: list[tuple[nn.Module, str, Any]] = []  # (module, attribute, what the instance had there)
    try:
        for m in targets:
            attr, make = SWAPS[type(m).__name__]
            swapped.append((m, attr, m.__dict__.get(attr, _NOTHING)))
            m.__dict__[attr] = types.MethodType(make(state, names[id(m)] or "(model)", eps), m)
        try:
            with torch.no_grad():
                net(probe)
        finally:
            state["checking"] = False
        if state["bad"]:
            bad = list(dict.fromkeys(state["bad"]))
            raise MethodError(
                f"lrp: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} compute(s) something other than the "
                "MONAI Swin/residual block the conservative rules reproduce (another MONAI version?)",
                "use a gradient method (integrated_gradients, input_x_gradient) for this model")
        yield [names[id(m)] for m in targets if is_window_attention(m)]
    finally:
        for m, attr, before in reversed(swapped):  # exactly what was there: the user's own attribute too
            if before is _NOTHING:
                m.__dict__.pop(attr, None)
            else:
                m.__dict__[attr] = before
