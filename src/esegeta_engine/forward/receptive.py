"""Which input voxels can change the output voxels a target reads: a safe receptive-field bound.

A perturbation (an occlusion window, a supervoxel, a RISE mask) that leaves the input
unchanged on every voxel the target's output voxels depend on cannot change the score. This
module computes a superset of that dependency region by a **linearised probe**: the network
runs once more on an input of ones, with every operation replaced by one of the same
*dependency pattern* whose local derivatives are positive, and the region is the support of
the gradient of the target's output voxels:

* convolutions, transposed convolutions and linear layers use weights of one: every input a
  weight touches counts and none cancels. The backward pass only adds positive numbers that do
  not shrink through these layers, so nothing underflows to zero (a sum may overflow to
  ``inf``, which still counts as a dependency);
* activations (ReLU, LeakyReLU, PReLU, GELU, sigmoid, ... and clamps) become the identity, so a
  unit that happens to be dead on the probe still passes its dependency on (a plain gradient
  probe would miss it: that is why the plain gradient is not used);
* max pooling becomes average pooling over the same windows (a max depends on its whole window,
  its gradient only on the winner);
* normalisations that use the input's own statistics (instance, group and layer norm, batch norm
  in training mode) become ``x + mean(x)`` over the axes they normalise: every voxel of those axes
  counts; eval-mode batch norm is pointwise (identity); softmax becomes ``x + sum(x)`` along its axis;
* subtraction becomes addition and negation the identity, so values stay positive and products
  keep positive derivatives.

Any other torch operation the forward pass calls (``where``, ``abs``, ``max``, ``detach``,
comparisons, ...) is not known to keep dependencies, and the probe stops with
:class:`ReceptiveFieldUnknown` naming it: callers then fall back to a coarser bound (the
patches a target reads) or skip nothing. The bound is therefore safe for networks built from
the listed operations; it is structural (the same for every input), not a property of one probe
input. It can over-estimate (a weight that is exactly zero still counts) but not under-estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_IDENTITY = frozenset({
    "relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "rrelu_", "relu6", "hardtanh",
    "hardtanh_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "gelu", "silu", "mish", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "softplus", "hardswish", "hardsigmoid", "logsigmoid", "threshold",
    "threshold_", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max", "neg", "__neg__",
    "negative", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "contiguous", "float", "double", "half", "bfloat16"})
"""Operations replaced by the identity (on their first argument)."""

_SAFE = frozenset({
    # shapes, properties and factories (no dependency between voxels)
    "dim", "size", "numel", "__len__", "get:shape", "get:dtype", "get:device", "get:ndim",
    "get:requires_grad", "get:is_cuda", "get:layout", "get:grad_fn", "ones", "zeros", "ones_like",
    "zeros_like", "empty", "empty_like", "full", "full_like", "arange", "tensor", "is_floating_point",
    "is_complex", "type", "__format__", "__repr__", "__bool__", "__index__", "__int__", "__float__",
    # layout: every output element is one input element
    "view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze",
    "expand", "expand_as", "repeat", "__getitem__", "narrow", "split", "chunk", "unbind", "cat",
    "concat", "concatenate", "stack", "movedim", "moveaxis", "flip", "roll", "clone", "to",
    "pad", "pixel_shuffle", "pixel_unshuffle", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear", "view_as", "reshape_as", "swapaxes", "t",
    # positive sums and products (values stay positive in the probe)
    "add", "add_", "__add__", "__radd__", "__iadd__", "sum", "mean", "mul", "mul_", "__mul__",
    "__rmul__", "__imul__", "matmul", "__matmul__", "bmm", "mm", "einsum", "exp", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "scaled_dot_product_attention"})
"""Operations whose local derivatives are non-negative where their inputs are positive."""


class ReceptiveFieldUnknown(Exception):
    """The network calls an operation the probe does not know to keep dependencies."""


def _linear_weight(w: torch.Tensor, fan: int) -> torch.Tensor:
    return torch.ones(w.shape, dtype=torch.float32, device=w.device)


def _conv(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x, w, *rest = args
    rest = rest[1:] if rest else []  # the bias: no dependency
    kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
    return func(x, _linear_weight(w, w[0].numel()), None, *rest, **kwargs)


def _conv_transpose(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x, w, *rest = args
    rest = rest[1:] if rest else []
    kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
    groups = kwargs.get("groups", rest[3] if len(rest) > 3 else 1)  # stride, padding, output_padding, groups
    return func(x, _linear_weight(w, (w.shape[0] // groups) * w[0, 0].numel()), None, *rest, **kwargs)


def _linear(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x, w = args[0], args[1]
    return F.linear(x, _linear_weight(w, w.shape[-1]))


def _spread(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    return x + x.mean(dim=tuple(dims), keepdim=True)


def _batch_norm(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0]
    training = kwargs.get("training", args[5] if len(args) > 5 else False)
    running = args[1] if len(args) > 1 else kwargs.get("running_mean")
    return _spread(x, [0, *range(2, x.dim())]) if training or running is None else x


def _instance_norm(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0]
    stats = kwargs.get("use_input_stats", args[5] if len(args) > 5 else True)
    return _spread(x, range(2, x.dim())) if stats else x


def _group_norm(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0]
    return _spread(x, range(1, x.dim()))


def _layer_norm(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0]
    shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
    n = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    return _spread(x, range(x.dim() - n, x.dim()))


def _softmax(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        raise ReceptiveFieldUnknown(f"{getattr(func, '__name__', func)} without dim")
    return x + x.sum(dim=dim, keepdim=True)


def _max_pool(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0]
    nd = x.dim() - 2
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    given = dict(zip(names, args[1:]))
    given.update({k: v for k, v in kwargs.items() if k in names})
    dilation = given.get("dilation", 1)
    if given.get("return_indices") or any(d != 1 for d in _tuple(dilation, nd)):
        raise ReceptiveFieldUnknown(f"{getattr(func, '__name__', func)} with indices or dilation")
    kernel = given["kernel_size"]
    stride = given.get("stride") or kernel
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    return pool(x, kernel, stride, given.get("padding", 0), bool(given.get("ceil_mode", False)))


def _adaptive_max(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0]
    if kwargs.get("return_indices") or (len(args) > 2 and args[2]):
        raise ReceptiveFieldUnknown("adaptive max pooling with indices")
    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[x.dim() - 3]
    return pool(x, args[1] if len(args) > 1 else kwargs["output_size"])


def _sub(func: Callable, args: tuple, kwargs: dict) -> Any:
    a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
    if not isinstance(a, torch.Tensor):  # scalar - tensor
        return b
    if not isinstance(b, torch.Tensor):  # tensor - scalar: no dependency added
        return a
    return a + b


def _div(func: Callable, args: tuple, kwargs: dict) -> Any:
    a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
    if not isinstance(b, torch.Tensor):
        return a
    if not isinstance(a, torch.Tensor):
        return b
    return a * b  # positive derivative in both (a / b has a negative one in b)


def _tuple(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


_HANDLERS: dict[str, Callable[[Callable, tuple, dict], Any]] = {
    **{f"conv{d}d": _conv for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": _conv_transpose for d in (1, 2, 3)},
    "linear": _linear, "batch_norm": _batch_norm, "instance_norm": _instance_norm,
    "group_norm": _group_norm, "layer_norm": _layer_norm, "rms_norm": _layer_norm,
    "softmax": _softmax, "log_softmax": _softmax, "softmin": _softmax,
    **{f"{p}max_pool{d}d{s}": _max_pool for p in ("", "_") for d in (1, 2, 3)
       for s in ("", "_with_indices")},
    **{f"adaptive_max_pool{d}d{s}": _adaptive_max for d in (1, 2, 3) for s in ("", "_with_indices")},
    "sub": _sub, "sub_": _sub, "__sub__": _sub, "__isub__": _sub, "subtract": _sub,
    "__rsub__": lambda f, a, k: _sub(f, (a[1], a[0]), k), "rsub": _sub,
    "div": _div, "div_": _div, "__truediv__": _div, "__itruediv__": _div, "true_divide": _div,
    "divide": _div, "__rtruediv__": lambda f, a, k: _div(f, (a[1], a[0]), k),
}


def _name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        return "get:" + str(getattr(getattr(func, "__self__", None), "__name__", "?"))
    return name


class _Linearised(TorchFunctionMode):
    """Every torch call replaced by its positive, dependency-keeping counterpart (see module doc)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        if name in _IDENTITY:
            return args[0] if args else kwargs.get("input")
        handler = _HANDLERS.get(name)
        if handler is not None:
            return handler(func, args, kwargs)
        if name in _SAFE:
            return func(*args, **kwargs)
        raise ReceptiveFieldUnknown(name)


def dependency(net: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int],
               masks: Sequence[torch.Tensor], device: torch.device | None = None) -> list[torch.Tensor]:
    """For each output mask, the input voxels its output voxels can depend on.

    Parameters
    ----------
    net : callable
        ``(1, C, *spatial) -> (1, K, *spatial_out)``: the network as the method calls it.
    shape : sequence of int
        The input's shape ``(1, C, *spatial)``.
    masks : sequence of torch.Tensor
        Boolean masks on the output's spatial grid (all channels are read).
    device : torch.device, optional
        Where the probe runs (default: the CPU).

    Returns
    -------
    list of torch.Tensor
        Boolean masks on the input's spatial grid, one per output mask (a superset of the voxels
        whose change can change an output inside the mask; see the module docstring).

    Raises
    ------
    ReceptiveFieldUnknown
        If the forward pass uses an operation the probe does not know.
    """
    x = torch.ones(tuple(shape), dtype=torch.float32, device=device).requires_grad_(True)
    with torch.enable_grad(), _Linearised():
        y = net(x)
    if not isinstance(y, torch.Tensor) or y.dim() != x.dim() or not y.requires_grad:
        raise ReceptiveFieldUnknown("the output is not a differentiable tensor on a spatial grid")
    out = []
    for k, mask in enumerate(masks):
        weight = mask.to(y.device, torch.float32).expand(y.shape[1], *mask.shape)[None]
        (g,) = torch.autograd.grad(y, x, weight, retain_graph=k + 1 < len(masks))
        out.append((g[0] != 0).any(dim=0))
    return out
