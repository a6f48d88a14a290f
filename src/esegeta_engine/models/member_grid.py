"""Where a layer's cells sit on its network input, and the move that puts a mirrored copy back on them.

A layer reached through convolutions, poolings and transposed convolutions samples its input
on an affine grid: along each spatial axis cell ``j`` is centred at input voxel
``u = S j + c`` (``S``: cumulative stride; ``c``: the offset its kernels and paddings leave).
:func:`layer_places` derives ``(S, c)`` from the network's geometry by tracing it
(``torch.fx``) and composing, per module on the way to the layer:

* convolution / pooling ``(k, s, p, dilation d)``: ``S' = S s``, ``c' = c + S (d (k-1)/2 - p)``;
* transposed convolution: ``S' = S / s``, ``c' = c + S (p - d (k-1)/2) / s``;
* integer upsampling by ``f`` (``align_corners`` off): ``S' = S / f``, ``c' = c - S (f-1) / (2 f)``;
* normalisations, activations, dropout and elementwise functions keep the grid; a
  concatenation or sum of tensors on different grids gives a **mixture** (several ``(S, c)``).

A mirrored copy ``flip(x)`` of a patch of ``P`` voxels gives, flipped back on the layer grid,
cell ``j`` centred at ``P - 1 - S (L - 1 - j) - c`` (``L`` cells): the unmirrored copy's
centre moved by ``d = P - 1 - S (L - 1) - 2 c`` input voxels (``S - 1`` for nnU-Net's kernel-3,
padding-1 strided convolutions, where ``P = S L``). :func:`mirror_move` returns that move per
axis; it is exact when the layer has one grid and that grid tiles the patch (``S L = P``);
otherwise the nearest whole move with the reason it is not exact, and a layer on several grids (a
concatenation of paths, e.g. a U-Net decoder stage after its skip) is not moved, with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Place:
    """Cell ``j`` of a grid sits at input voxel ``stride * j + start`` (per spatial axis)."""

    stride: tuple[float, ...]
    start: tuple[float, ...]


class Unknown(Exception):
    """The layer's grid cannot be derived (the reason names the module or function)."""


_SAME = (nn.Identity, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.modules.dropout._DropoutNd, nn.Dropout,
         nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus,
         nn.Mish, nn.Hardswish, nn.ReLU6, nn.Softmax, nn.LogSoftmax)
_SAME_FUNCTIONS = {F.relu, F.leaky_relu, F.gelu, F.silu, F.elu, F.sigmoid, F.tanh, F.softmax, F.dropout,
                   torch.relu, torch.sigmoid, torch.tanh, torch.softmax, F.instance_norm, F.batch_norm}
_COMBINE = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
            torch.cat, torch.concat, torch.cat}
_SAME_METHODS = {"contiguous", "clone", "float", "half", "double", "to", "relu", "sigmoid", "tanh", "type_as",
                 "add", "mul", "sub", "div", "add_", "mul_", "relu_"}


def _tuple(v: object, nd: int) -> tuple[float, ...]:
    return tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else (float(v),) * nd  # type: ignore[arg-type]


def _through(places: set[Place], stride: tuple[float, ...], step: tuple[float, ...]) -> set[Place]:
    """Compose: the new grid's stride factor and its first cell's offset in the old grid's cells."""
    return {Place(tuple(S * s for S, s in zip(p.stride, stride)),
                  tuple(c + S * o for c, S, o in zip(p.start, p.stride, step))) for p in places}


def _module(m: nn.Module, places: set[Place], nd: int) -> set[Place]:
    if isinstance(m, _SAME):
        return places
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        k, s, p, d = (_tuple(v, nd) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
        return _through(places, tuple(1 / x for x in s), tuple((pp - dd * (kk - 1) / 2) / ss
                                                                 for kk, ss, pp, dd in zip(k, s, p, d)))
    if isinstance(m, nn.modules.conv._ConvNd):
        k, s, d = (_tuple(v, nd) for v in (m.kernel_size, m.stride, m.dilation))
        if isinstance(m.padding, str):
            if m.padding == "same" and any(x != 1 for x in s):
                raise Unknown(f"{type(m).__name__} with padding 'same' and a stride")
            p = tuple(dd * (kk - 1) / 2 for kk, dd in zip(k, d)) if m.padding == "same" else (0.0,) * nd
        else:
            p = _tuple(m.padding, nd)
        return _through(places, s, tuple(dd * (kk - 1) / 2 - pp for kk, pp, dd in zip(k, p, d)))
    if isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
        k = _tuple(m.kernel_size, nd)
        s = _tuple(m.stride if m.stride is not None else m.kernel_size, nd)
        p = _tuple(m.padding, nd)
        d = _tuple(getattr(m, "dilation", 1), nd)
        return _through(places, s, tuple(dd * (kk - 1) / 2 - pp for kk, pp, dd in zip(k, p, d)))
    if isinstance(m, nn.Upsample):
        return _upsampled(places, m.scale_factor, m.align_corners, nd, type(m).__name__)
    raise Unknown(f"module {type(m).__name__}")


def _upsampled(places: set[Place], scale: object, align: bool | None, nd: int, what: str) -> set[Place]:
    f = _tuple(scale, nd) if scale is not None else None
    if f is None or align or any(x != int(x) or x < 1 for x in f):
        raise Unknown(f"{what} without a whole scale factor (or with align_corners)")
    return _through(places, tuple(1 / x for x in f), tuple((1 / x - 1) / 2 for x in f))


class _Tracer(fx.Tracer):
    def __init__(self, leaf: nn.Module | None) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return m is self.leaf or super().is_leaf_module(m, name)


def _propagate(root: nn.Module, leaf: nn.Module | None, start: set[Place], nd: int) -> dict[fx.Node, object]:
    """Every traced value's grids (a set of :class:`Place`; tuples for tuple values; None: not a tensor)."""
    graph = _Tracer(leaf).trace(root)
    env: dict[fx.Node, object] = {}

    def grids(args: object) -> set[Place]:
        found: set[Place] = set()
        for a in args if isinstance(args, (tuple, list)) else [args]:
            if isinstance(a, (tuple, list)):
                found |= grids(a)
            elif isinstance(a, fx.Node) and isinstance(env.get(a), (set, frozenset)):
                found |= env[a]  # type: ignore[operator]
        return found

    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = set(start) if not env else None
        elif node.op == "get_attr":
            env[node] = None
        elif node.op == "call_module":
            m = root.get_submodule(node.target)
            env[node] = None if m is leaf else _module(m, grids(node.args[:1]), nd)
        elif node.op == "call_function":
            env[node] = _function(node, env, grids, nd)
        elif node.op == "call_method":
            if node.target == "size" or node.target == "dim":
                env[node] = None
            elif node.target in _SAME_METHODS:
                env[node] = grids(node.args)
            else:
                raise Unknown(f"tensor method .{node.target}()")
        elif node.op == "output":
            env[node] = grids(node.args)
    env[graph] = None  # type: ignore[index]
    return env


def _function(node: fx.Node, env: dict, grids, nd: int) -> object:  # type: ignore[no-untyped-def]
    fn = node.target
    if fn is getattr:
        return None
    if fn is operator.getitem:
        base = env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if isinstance(base, tuple):
            return base[node.args[1]]  # type: ignore[index]
        if base is None:
            return None
        raise Unknown("indexing a tensor")
    if fn in _SAME_FUNCTIONS:
        return grids(node.args[:1])
    if fn in (torch.cat, torch.concat):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if dim != 1:
            raise Unknown(f"concatenation along dimension {dim}")
        return grids(node.args[0])
    if fn in _COMBINE:
        return grids(node.args)
    if fn is F.interpolate:
        scale = node.kwargs.get("scale_factor", node.args[2] if len(node.args) > 2 else None)
        return _upsampled(grids(node.args[:1]), scale, node.kwargs.get("align_corners"), nd, "interpolate")
    raise Unknown(f"function {getattr(fn, '__name__', fn)}")


def layer_places(net: nn.Module, layer: nn.Module, layer_input: bool, nd: int) -> set[Place]:
    """The grids of ``layer``'s output (or first input) on ``net``'s input grid (raises :class:`Unknown`)."""
    identity = {Place((1.0,) * nd, (0.0,) * nd)}
    try:
        if layer is net:
            inside = identity
        else:
            env = _propagate(net, layer, identity, nd)
            calls = [n for n in env if isinstance(n, fx.Node) and n.op == "call_module"
                     and net.get_submodule(n.target) is layer]
            if len(calls) != 1:
                raise Unknown(f"the layer is called {len(calls)} times in one forward")
            inside = set(env[calls[0].args[0]]) if isinstance(env.get(calls[0].args[0]), set) else set()
        if layer_input:
            return inside
        if fx.Tracer().is_leaf_module(layer, ""):
            return _module(layer, inside, nd)
        env = _propagate(layer, None, inside, nd)
        out = [v for n, v in env.items() if isinstance(n, fx.Node) and n.op == "output"]
        return set(out[0]) if out and isinstance(out[0], set) else set()
    except Unknown:
        raise
    except Exception as exc:  # a network torch.fx cannot trace
        raise Unknown(f"the network could not be traced ({type(exc).__name__})") from None


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
