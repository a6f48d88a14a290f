"""The last decoder stage's opening (up-sampling, skip concat, first conv block) with an in-place-activated backward.

The fused decoder (:mod:`.checkpoint_decoder`) ran this opening as one checkpointed step. Its backward
recomputed the whole step before differentiating it, and at the full-resolution level that
recomputation is the run's peak: the up-sampled half, the concatenation (twice the skip's
channels), the CPU convolution library's blocked copy of it and the convolution's output are all
alive at once, on top of the gradient buffers that are already waiting.

None of them is needed. With the network's parameters frozen (the engine's own copies: an attribution
needs input gradients only), a convolution's input gradient needs only its weight, and the
normalisation + LeakyReLU can be differentiated from their output alone (the idea of in-place
activated normalisation, Rota Bulò et al., CVPR 2018): LeakyReLU is invertible, the normalised value
is ``(n - beta) / gamma``, and the per-channel ``mean`` and ``1/std`` are tiny. :class:`_Opening`
therefore saves only the block's output — which the next block keeps anyway as its input, so it is
shared storage — and the two per-channel statistics, and runs nothing again in the backward. The
backward also consumes the concatenation's two halves one at a time: a convolution over a
concatenation is the sum of convolutions over its parts with the weight split along its input
channels, so the gradient of each part is computed on its own (the up-sampled half's goes straight
into the transposed convolution's input gradient and is freed) and the concatenation's gradient is
never formed.

The forward runs the block's own modules (same numbers as the network's forward, bit for bit). The
backward computes the same derivative in another order: equal to plain autograd within float32
rounding (tested). Only the exact structure this was written for is used (:func:`opening_refusal`):
nnU-Net's ``ConvDropoutNormReLU`` as ``Conv -> InstanceNorm(affine, no running stats) -> LeakyReLU``,
a plain transposed convolution, no hooks or instance forwards on any of them, every parameter frozen;
otherwise the opening stays one checkpointed step and the run's record says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from esegeta_engine.forward.cancel_points import current_check

BLOCK = "dynamic_network_architectures.building_blocks.simple_conv_blocks.ConvDropoutNormReLU"
"""The first block's class (exactly this class): ``forward(x) = self.all_modules(x)``."""
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
UPS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
SLABS = 2
"""Slabs of the convolutions' input gradients along the first axis (see :func:`_input_grad`): 2, as 4 or 8 cost
1.4x the CPU time at a 32x64x64 patch (the library is slow on thin slabs); 8 would save one more U."""
FULL = (torch.float32, torch.float64)
"""Precisions the normalised value is recovered in (see :data:`MAX_SHIFT`); others keep the recomputed step."""
MAX_SHIFT = 32.0
"""Largest ``|beta| / |gamma|`` of a norm whose normalised value is recovered from its output: the recovered
value's error is about this times float32's epsilon (relative error of the gradient below ~4e-6)."""


def _path(m: Any) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def block_refusal(block: nn.Module, ours: Callable[[Any], bool] = lambda f: False) -> str | None:
    """Why ``block`` cannot run as :class:`_Block` (None: it can); ``ours(forward)``: an engine wrapper."""
    if _path(block) != BLOCK:
        return f"the block's class {_path(block)} is not {BLOCK}"
    mods = list(getattr(block, "all_modules", []))
    kinds = [type(m) for m in mods]
    if len(mods) != 3 or kinds[0] not in CONVS or kinds[1] not in NORMS or kinds[2] is not nn.LeakyReLU:
        return "the block is not exactly convolution -> InstanceNorm -> LeakyReLU"
    conv, norm, act = mods
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return "the block's convolution is grouped, pads with other than zeros or pads by name"
    slope = float(act.negative_slope)
    if not (math.isfinite(slope) and slope > 0):  # the output's sign and value give back the input only then
        return f"the block's LeakyReLU slope is {slope:g}, not above 0 (its input cannot be recovered from its output)"
    if any(p.dtype not in FULL for p in block.parameters()):
        return "a parameter of the block is not float32 or float64 (recovering the normalised value needs it)"
    if not norm.affine or norm.track_running_stats:
        return "the block's InstanceNorm is not affine without running statistics"
    for m in (block, block.all_modules, *mods):
        own = m.__dict__.get("forward")
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or (own is not None and not ours(own)):
            return "a module of the block has hooks or its own instance forward"
    if any(p.requires_grad for p in block.parameters()):
        return "a parameter requires a gradient (the in-place-activated backward gives input gradients only)"
    ratio = float((norm.bias.abs() / norm.weight.abs()).max()) if norm.weight.numel() else 0.0
    if not ratio <= MAX_SHIFT:  # also a zero scale (inf) or NaN
        return (f"an InstanceNorm shift is {ratio:.3g}x its scale (above {MAX_SHIFT:g}: the normalised value "
                "recovered from the output would lose more than float32 rounding)")
    return None


def opening_refusal(up: nn.Module, block: nn.Module, ours: Callable[[Any], bool] = lambda f: False) -> str | None:
    """Why ``block(cat(up(low), skip))`` cannot run as :class:`_Opening` (None: it can)."""
    why = block_refusal(block, ours)
    if why is not None:
        return why
    own = up.__dict__.get("forward")
    if type(up) not in UPS or up.groups != 1 or up._forward_hooks or up._forward_pre_hooks or up._backward_hooks \
            or (own is not None and not ours(own)):
        return "the up-sampling is not a plain transposed convolution without hooks"
    if any(p.requires_grad for p in up.parameters()):
        return "a parameter of the up-sampling requires a gradient"
    return None


def opening(up: nn.Module, block: nn.Module, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``block(cat(up(low), skip))``, saving only its output for the backward (see the module docstring)."""
    return _Opening.apply(low, skip, up, block)


def block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)``, saving only its output for the backward."""
    return _Block.apply(x, block)


def _conv_grad(grad: torch.Tensor, like: tuple[int, ...], conv: nn.Module, weight: torch.Tensor,
               transposed: bool = False) -> torch.Tensor:
    """The input gradient (shape ``like``) of ``conv``'s geometry with ``weight`` for output gradient ``grad``."""
    out_pad = list(conv.output_padding) if transposed else [0] * len(conv.stride)
    dummy = grad.new_empty(1).expand(like)  # only its shape is read
    return torch.ops.aten.convolution_backward(
        grad, dummy, weight, None, list(conv.stride), list(conv.padding), list(conv.dilation), transposed,
        out_pad, conv.groups, (True, False, False))[0]


def full_precision(x: torch.Tensor) -> bool:
    """Whether a run on ``x`` keeps float32/float64 activations (no autocast on its device): see :data:`FULL`."""
    return x.dtype in FULL and not torch.is_autocast_enabled(x.device.type)


def _same(conv: nn.Module) -> bool:
    """A stride-1 convolution with 'same' padding on every spatial axis (its rows can be slabbed)."""
    return all(v == 1 for v in (*conv.stride, *conv.dilation)) and \
        all(k == 2 * pad + 1 for k, pad in zip(conv.kernel_size, conv.padding))


def _rows(grad: torch.Tensor, conv: nn.Module, weight: torch.Tensor, z0: int, z1: int,
          channels: int) -> torch.Tensor:
    """Rows ``z0:z1`` (first spatial axis) of a :func:`_same` convolution's input gradient: from the
    output gradient's same rows plus the kernel's halo, so the library's copies are a slab's size."""
    pad, depth = conv.padding[0], grad.shape[2]
    a, b = max(z0 - pad, 0), min(z1 + pad, depth)
    g = _conv_grad(grad[:, :, a:b].contiguous(), (grad.shape[0], channels, b - a, *grad.shape[3:]), conv, weight)
    return g[:, :, z0 - a:z1 - a]


def _bounds(depth: int) -> list[tuple[int, int]]:
    edges = [round(i * depth / SLABS) for i in range(SLABS + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _input_grad(grad: torch.Tensor, like: tuple[int, ...], conv: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """:func:`_conv_grad` of a stride-1 convolution, in slabs where it is :func:`_same`."""
    if not _same(conv) or tuple(like[2:]) != tuple(grad.shape[2:]):
        return _conv_grad(grad, like, conv, weight)
    out = grad.new_empty(like)
    for z0, z1 in _bounds(grad.shape[2]):
        out[:, :, z0:z1] = _rows(grad, conv, weight, z0, z1, like[1])
    return out


def _opening_grads(g_c: torch.Tensor, up: nn.Module, conv: nn.Module, low_shape: tuple[int, ...],
                   skip_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``low`` and ``skip`` from the one at ``conv(cat(up(low), skip))``'s output, ``g_c``.

    The concatenation's gradient is never formed: each half's comes from its part of the weight. Where the
    up-sampling's kernel equals its stride along the first axis, the up-sampled half's gradient exists only
    a slab at a time, each slab going at once into the transposed convolution's input gradient.
    """
    b, _, *spatial = g_c.shape
    split = up.out_channels
    w_up, w_skip = conv.weight[:, :split].contiguous(), conv.weight[:, split:].contiguous()
    s = up.stride[0]
    if _same(conv) and up.kernel_size[0] == s and up.padding[0] == 0 and up.output_padding[0] == 0 \
            and low_shape[2] * s == spatial[0]:
        g_low = g_c.new_empty(low_shape)
        for l0, l1 in _bounds(low_shape[2]):
            g_up = _rows(g_c, conv, w_up, l0 * s, l1 * s, split)
            g_low[:, :, l0:l1] = _conv_grad(g_up, (*low_shape[:2], l1 - l0, *low_shape[3:]), up, up.weight, True)
            del g_up
    else:
        g_up = _input_grad(g_c, (b, split, *skip_shape[2:]), conv, w_up)  # the concat's half: the skip's grid
        g_low = _conv_grad(g_up, low_shape, up, up.weight, transposed=True)
        del g_up
    return g_low, _input_grad(g_c, skip_shape, conv, w_skip)


def _run_block(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's own modules on ``x`` (the network's numbers exactly) and each channel's variance."""
    conv, norm, act = block.all_modules
    c = conv(x)
    b, ch = c.shape[:2]
    var = torch.var(c.reshape(b, ch, -1), dim=2, unbiased=False)
    return act(norm(c)), var


def _norm_act_grad(y: torch.Tensor, var: torch.Tensor, grad: torch.Tensor, block: nn.Module,
                   check: Callable[[], None] | None = None) -> torch.Tensor:
    """The gradient at the convolution's output, from the block's output ``y`` alone (see the module docstring).

    ``check``: the run's Cancel/deadline check, called before each channel (this backward is long at full
    resolution and runs no module, so :mod:`.cancel_points` has no other place to stop it)."""
    _, norm, act = block.all_modules
    slope = float(act.negative_slope)
    gamma, beta = norm.weight, norm.bias
    rstd = torch.rsqrt(var + norm.eps)  # (b, ch)
    g_c = torch.empty_like(y)
    b, ch = y.shape[:2]
    for i in range(b):  # one channel at a time: the temporaries are one channel's size
        for k in range(ch):
            if check is not None:
                check()
            yk, gk = y[i, k], grad[i, k]
            pos = yk > 0
            g_x = torch.where(pos, gk, gk * slope) * gamma[k]  # LeakyReLU's backward from its output's sign
            xhat = (torch.where(pos, yk, yk / slope) - beta[k]) / gamma[k]  # LeakyReLU inverted, normalised
            g_c[i, k] = (g_x - g_x.mean() - xhat * (g_x * xhat).mean()) * rstd[i, k]
    return g_c


def _conv_output_grad(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    """The gradient at the block's convolution output from what the forward saved (its output is freed)."""
    y, var = ctx.saved_tensors
    g_c = _norm_act_grad(y, var, grad, ctx.block, ctx.check)
    del y
    return g_c


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, block: nn.Module) -> torch.Tensor:
        y, var = _run_block(block, x)
        ctx.save_for_backward(y, var)
        ctx.block, ctx.shape, ctx.check = block, x.shape, current_check()
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        conv = ctx.block.all_modules[0]
        return _input_grad(_conv_output_grad(ctx, grad), tuple(ctx.shape), conv, conv.weight), None


class _Opening(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, low: torch.Tensor, skip: torch.Tensor, up: nn.Module, block: nn.Module) -> torch.Tensor:
        y, var = _run_block(block, torch.cat((up(low), skip), 1))
        ctx.save_for_backward(y, var)
        ctx.up, ctx.block, ctx.shapes, ctx.check = up, block, (low.shape, skip.shape), current_check()
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        low_shape, skip_shape = ctx.shapes
        g_low, g_skip = _opening_grads(_conv_output_grad(ctx, grad), ctx.up, ctx.block.all_modules[0], low_shape,
                                       skip_shape)
        return g_low, g_skip, None, None
