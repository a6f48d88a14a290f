"""Where a layer's cells sit on its network input, and the move that puts a mirrored copy back on them.

A layer reached through convolutions, poolings and transposed convolutions samples its input
on an affine grid: along each spatial axis cell ``j`` is centred at input voxel
``u = S j + c`` (``S``: cumulative stride; ``c``: the offset its kernels and paddings leave).
:func:`layer_places` derives ``(S, c)`` from the network's geometry, composing per operation
on the way to the layer:

* convolution / pooling ``(k, s, p, dilation d)``: ``S' = S s``, ``c' = c + S (d (k-1)/2 - p)``;
* transposed convolution: ``S' = S / s``, ``c' = c + S (p - d (k-1)/2) / s``;
* integer upsampling by ``f`` (``align_corners`` off): ``S' = S / f``, ``c' = c - S (f-1) / (2 f)``;
* padding ``l`` voxels before an axis: ``c' = c - S l``;
* normalisations, activations, dropout and elementwise functions keep the grid; a
  concatenation or sum of tensors on different grids gives a **mixture** (several ``(S, c)``);
  a tensor pooled to one cell (a squeeze-excitation weight) has no grid and leaves the other's.

**How, without touching the user's network.** The network is run once on a private
structural copy whose parameters and buffers live on the ``meta`` device (shapes only: no
data, no arithmetic), under a :class:`~torch.overrides.TorchFunctionMode` that sees every
torch function the forward calls and records each result's grid. Torch function modes are
per thread and the copy shares no hook, parameter or attribute dictionary with the user's
network, so nothing any other thread runs meanwhile — the same network in another job, another
network — can see the derivation (``torch.fx`` tracing, used before, replaced
``nn.Module.__call__`` for the whole process while it ran). An operation whose effect on the
grid is not known marks its result as unknown; only a layer that depends on it is refused.

A mirrored copy ``flip(x)`` of a patch of ``P`` voxels gives, flipped back on the layer grid,
cell ``j`` centred at ``P - 1 - S (L - 1 - j) - c`` (``L`` cells): the unmirrored copy's
centre moved by ``d = P - 1 - S (L - 1) - 2 c`` input voxels (``S - 1`` for nnU-Net's kernel-3,
padding-1 strided convolutions, where ``P = S L``). :func:`mirror_move` returns that move per
axis; it is exact when the layer has one grid and that grid tiles the patch (``S L = P``);
otherwise the nearest whole move with the reason it is not exact, and a layer on several grids (a
concatenation of paths, e.g. a U-Net decoder stage after its skip) is not moved, with the reason.
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class Place:
    """Cell ``j`` of a grid sits at input voxel ``stride * j + start`` (per spatial axis)."""

    stride: tuple[float, ...]
    start: tuple[float, ...]


class Unknown(Exception):
    """The layer's grid cannot be derived (the reason names the module or function)."""


@dataclass(frozen=True)
class _Lost:
    """A value whose grid is not known (``why`` names the operation)."""

    why: str


_SAME = {"relu", "relu_", "leaky_relu", "leaky_relu_", "gelu", "silu", "elu", "elu_", "selu", "celu", "prelu",
         "rrelu", "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax", "softplus", "softsign", "mish",
         "hardswish", "hardsigmoid", "hardtanh", "hardtanh_", "relu6", "dropout", "dropout1d", "dropout2d",
         "dropout3d", "alpha_dropout", "feature_alpha_dropout", "instance_norm", "batch_norm", "group_norm",
         "layer_norm", "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type",
         "type_as", "cpu", "cuda", "abs", "neg", "__neg__", "exp", "sqrt", "square", "clamp", "clamp_", "clip",
         "requires_grad_"}
_COMBINE = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "__add__", "__radd__",
            "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__",
            "__rtruediv__", "__itruediv__", "maximum", "minimum", "where", "addcmul", "__pow__", "pow"}
_CAT = {"cat", "concat", "concatenate"}
_SPLIT = {"split", "chunk", "tensor_split"}
_GLOBAL = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
           "adaptive_max_pool2d", "adaptive_max_pool3d"}


def _tuple(v: object, nd: int) -> tuple[float, ...]:
    if isinstance(v, (tuple, list, torch.Size)):
        return tuple(float(x) for x in v) if len(v) != 1 else (float(v[0]),) * nd
    return (float(v),) * nd  # type: ignore[arg-type]


def _through(places: set[Place], stride: tuple[float, ...], step: tuple[float, ...]) -> set[Place]:
    """Compose: the new grid's stride factor and its first cell's offset in the old grid's cells."""
    return {Place(tuple(S * s for S, s in zip(p.stride, stride)),
                  tuple(c + S * o for c, S, o in zip(p.start, p.stride, step))) for p in places}


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: object = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _window(places: set[Place], args: tuple, kwargs: dict, nd: int, name: str) -> set[Place]:
    """Convolution or pooling: ``S' = S s``, ``c' = c + S (d (k-1)/2 - p)``."""
    conv = name.startswith("conv")
    k = _tuple(_arg(args, kwargs, 1, "weight").shape[2:] if conv else _arg(args, kwargs, 1, "kernel_size"), nd)
    s = _arg(args, kwargs, 3 if conv else 2, "stride", 1)
    s = k if s is None or (isinstance(s, (tuple, list)) and not s) else _tuple(s, nd)
    d = _tuple(_arg(args, kwargs, 5 if conv else 4, "dilation", 1) if "avg" not in name else 1, nd)
    p = _arg(args, kwargs, 4 if conv else 3, "padding", 0)
    if isinstance(p, str):
        if p == "same" and any(x != 1 for x in s):
            raise Unknown(f"{name} with padding 'same' and a stride")
        p = tuple(float(int(dd * (kk - 1)) // 2) for kk, dd in zip(k, d)) if p == "same" else (0.0,) * nd
    p = _tuple(p, nd)
    return _through(places, s, tuple(dd * (kk - 1) / 2 - pp for kk, pp, dd in zip(k, p, d)))


def _transposed(places: set[Place], args: tuple, kwargs: dict, nd: int) -> set[Place]:
    k = _tuple(_arg(args, kwargs, 1, "weight").shape[2:], nd)
    s, p, d = (_tuple(_arg(args, kwargs, i, n, dv), nd)
               for i, n, dv in ((3, "stride", 1), (4, "padding", 0), (7, "dilation", 1)))
    return _through(places, tuple(1 / x for x in s), tuple((pp - dd * (kk - 1) / 2) / ss
                                                           for kk, ss, pp, dd in zip(k, s, p, d)))


def _upsampled(places: set[Place], args: tuple, kwargs: dict, out: torch.Tensor, nd: int) -> set[Place]:
    x, scale = args[0], _arg(args, kwargs, 2, "scale_factor")
    f = _tuple(scale, nd) if scale is not None else tuple(o / i for o, i in zip(out.shape[2:], x.shape[2:]))
    if _arg(args, kwargs, 4, "align_corners") or any(v != int(v) or v < 1 for v in f):
        raise Unknown("interpolate without a whole scale factor (or with align_corners)")
    return _through(places, tuple(1 / v for v in f), tuple((1 / v - 1) / 2 for v in f))


def _padded(places: set[Place], args: tuple, kwargs: dict, nd: int) -> set[Place]:
    pad = list(_arg(args, kwargs, 1, "pad"))
    before = [float(pad[2 * (nd - 1 - a)]) if 2 * (nd - 1 - a) < len(pad) else 0.0 for a in range(nd)]
    return _through(places, (1.0,) * nd, tuple(-b for b in before))


def _flat(value: object) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _flat(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _flat(item)]
    return [value]


class _GridMode(TorchFunctionMode):
    """Records each tensor's grid (a set of :class:`Place`, a :class:`_Lost`, or None: no grid) in this thread."""

    def __init__(self, nd: int) -> None:
        super().__init__()
        self.nd = nd
        self.grids: dict[int, tuple[torch.Tensor, object]] = {}  # the tensor is kept: its id stays unique

    def of(self, t: object) -> object:
        entry = self.grids.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def set(self, t: torch.Tensor, value: object) -> None:
        self.grids[id(t)] = (t, value)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name == "__setitem__" and any(self.of(t) is not None for t in _flat(args)):  # into or from a grid
            self.set(args[0], _Lost("assigning into a tensor"))
        made = [t for t in _flat(out) if isinstance(t, torch.Tensor)]
        if made:
            found = [v for v in (self.of(t) for t in _flat((args, kwargs))) if v is not None]
            value = None if not found else next((v for v in found if isinstance(v, _Lost)), None)
            if found and value is None:
                try:
                    value = self._rule(name, func, set().union(*found), args, kwargs, made[0])
                except Unknown as why:
                    value = _Lost(str(why))
            for t in made:
                self.set(t, value)
        return out

    def _rule(self, name: str, func: Any, grids: set[Place], args: tuple, kwargs: dict,
              out: torch.Tensor) -> object:
        nd = self.nd
        if name in _SAME or name in _COMBINE:
            return grids
        if name in _CAT or name in _SPLIT:
            dim = _arg(args, kwargs, 1 if name in _CAT else 2, "dim", 0)
            if not isinstance(dim, int) or dim % (nd + 2) != 1:
                raise Unknown(f"{'concatenation' if name in _CAT else name} along dimension {dim}")
            return grids
        if name.startswith(("conv1d", "conv2d", "conv3d", "max_pool", "avg_pool")):
            return _window(grids, args, kwargs, nd, name)
        if name.startswith("conv_transpose"):
            return _transposed(grids, args, kwargs, nd)
        if name in ("interpolate", "upsample"):
            return _upsampled(grids, args, kwargs, out, nd)
        if name == "pad":
            return _padded(grids, args, kwargs, nd)
        if name in _GLOBAL and all(s == 1 for s in out.shape[2:]):
            return None  # one cell for the whole input: no grid of its own
        if name == "__getitem__" and isinstance(args[0], torch.Tensor) and out.shape[2:] == args[0].shape[2:] \
                and not any(isinstance(i, (torch.Tensor, list)) for i in _flat(args[1])):
            return grids  # channels or batch picked, every spatial cell kept
        method = getattr(func, "__objclass__", None) is not None
        raise Unknown(f"tensor method .{name}()" if method else f"function {name}")


def _skeleton(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with parameters and buffers on the ``meta`` device and no hooks (``net`` only read)."""
    memo: dict[int, Any] = {}
    for t in [*net.parameters(), *net.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    originals = list(net.modules())
    forwards = []
    for m in originals:
        state = m.__dict__.copy()
        for key, value in state.items():
            if "hooks" in key and isinstance(value, dict):
                memo[id(value)] = type(value)()
        forwards.append(state.get("forward"))
    skeleton = copy.deepcopy(net, memo)
    for m, c, own in zip(originals, skeleton.modules(), forwards):
        while own is not None and hasattr(own, "_esegeta_saved"):  # an activation-checkpointing wrapper
            own = own._esegeta_saved
        if not callable(own):
            c.__dict__.pop("forward", None)
        elif getattr(own, "__self__", None) is m:
            object.__setattr__(c, "forward", types.MethodType(own.__func__, c))
    return skeleton


def _example(net: nn.Module, nd: int, spatial: tuple[int, ...] | None) -> torch.Tensor:
    """A meta input: the first layer's input channels, ``spatial`` or a size every stride divides."""
    channels = next((int(m.in_channels) for m in net.modules() if isinstance(getattr(m, "in_channels", None), int)),
                    1)
    if spatial is None:
        strides = [_tuple(getattr(m, "stride", 1) or 1, nd) for m in net.modules()
                   if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
                                     nn.modules.pooling._AvgPoolNd))]
        spatial = tuple(max(8, 4 * int(math.prod(s[a] for s in strides))) for a in range(nd))
    return torch.empty((1, channels, *spatial), device="meta")


def layer_places(net: nn.Module, layer: nn.Module, layer_input: bool, nd: int,
                 spatial: tuple[int, ...] | None = None) -> set[Place]:
    """The grids of ``layer``'s output (or first input) on ``net``'s input grid (raises :class:`Unknown`).

    ``spatial``: the patch size the network runs on (default: a size every stride divides).
    ``net`` is only read; the derivation runs on a private meta-device copy (module docstring).
    """
    try:
        path = next(n for n, m in net.named_modules(remove_duplicate=False) if m is layer)
    except StopIteration:
        raise Unknown("the layer is not a module of the network") from None
    try:
        skeleton = _skeleton(net)
        x = _example(net, nd, spatial)
    except Exception as exc:  # a network that cannot be copied
        raise Unknown(f"the network could not be copied ({type(exc).__name__})") from None
    calls: list[list[object]] = []
    inner = skeleton.get_submodule(path)
    mode = _GridMode(nd)

    def seen(m: nn.Module, args: tuple, out: object) -> None:  # read now: a later in-place op (``out += skip``)
        value = (args[0] if args else None) if layer_input else out  # changes the tensor, not the layer's output
        calls.append([mode.of(t) for t in _flat(value) if isinstance(t, torch.Tensor)])

    handle = inner.register_forward_hook(seen)
    try:
        with mode, torch.no_grad():
            mode.set(x, {Place((1.0,) * nd, (0.0,) * nd)})
            skeleton(x)
    except Unknown:
        raise
    except Exception as exc:  # a network that cannot run on shapes alone
        if not calls:
            raise Unknown(f"the network could not be run on a shape-only copy ({type(exc).__name__})") from None
    finally:
        handle.remove()
    if len(calls) != 1:
        raise Unknown(f"the layer is called {len(calls)} times in one forward")
    values = calls[0]
    lost = next((v for v in values if isinstance(v, _Lost)), None)
    if lost is not None:
        raise Unknown(lost.why)
    return set().union(*[v for v in values if isinstance(v, set)])


@dataclass(frozen=True)
class MirrorMove:
    """Per spatial axis: the whole-voxel move of a flipped-back copy, and why it is not exact (None: exact)."""

    voxels: tuple[int, ...]
    inexact: str | None


def mirror_move(places: set[Place], patch: tuple[int, ...], cells: tuple[int, ...], name: str,
                why_unknown: str = "") -> MirrorMove:
    """The move ``d = P - 1 - S (L - 1) - 2 c`` per axis (module docstring), exact or with the reason why not."""
    if not places:
        return MirrorMove((0,) * len(patch), f"layer '{name}': its grid on the input could not be derived"
                          f"{f' ({why_unknown})' if why_unknown else ''}, so its mirrored copies are not moved "
                          "(on a layer of cumulative stride S a flipped-back copy sits up to S - 1 voxels off)")
    moves = [[P - 1 - S * (L - 1) - 2 * c for S, c, P, L in zip(p.stride, p.start, patch, cells)] for p in places]
    if len(places) > 1:  # nnU-Net averages such a layer's mirrored outputs unmoved too
        spread = sorted({tuple(round(v, 3) for v in m) for m in moves})
        return MirrorMove((0,) * len(patch), f"layer '{name}': its channels sit on {len(places)} different grids "
                          f"(a concatenation or sum of paths with different strides or offsets; mirror moves "
                          f"{spread} voxels), so no one move aligns its mirrored copies: they are not moved")
    move = moves[0]
    whole = tuple(int(round(v)) for v in move)
    why = []
    (place,) = places
    for a, (S, P, L) in enumerate(zip(place.stride, patch, cells)):
        if abs(S * L - P) > 1e-6:
            why.append(f"along axis {a} its {L} cells at stride {S:g} do not tile the patch's {P} voxels "
                       "(the map is stretched onto the patch)")
    if any(abs(v - w) > 1e-6 for v, w in zip(move, whole)):
        why.append(f"the move {tuple(round(v, 3) for v in move)} is not a whole number of voxels")
    return MirrorMove(whole, f"layer '{name}': mirrored copies moved by {whole} voxels, not exactly: "
                      + "; ".join(why) if why else None)
