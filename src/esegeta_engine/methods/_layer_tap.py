"""Reading and changing one layer's activation during a forward pass (CAM methods).

Every forward pass here goes through the score model, so each counts as one
model evaluation and honours cancellation and the time limit. Hooks are
removed on exit, whatever happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods.registry import MethodContext, Param

Edit = Callable[[torch.Tensor], torch.Tensor]

CAM_LAYER_PARAMS = (
    Param("upsample", "bool", True, "interpolate the layer map to the input grid"),
    Param("attribute_to_layer_input", "bool", False, "use the layer's input instead of its output"),
)
RELU_PARAM = Param("relu_attributions", "bool", True,
                   "keep only positive evidence (ReLU of the map), as the papers do")


@contextlib.contextmanager
def tap(layer: nn.Module, layer_input: bool, edit: Edit) -> Iterator[list[int]]:
    """Replace the layer's output (or first input) ``a`` by ``edit(a)`` while active.

    Yields a one-element list counting the layer's calls, so callers can refuse
    modules that run several times per forward pass.
    """
    calls = [0]

    def on_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return edit(out)

    def on_input(module: nn.Module, args: tuple) -> tuple:
        calls[0] += 1
        return (edit(args[0]), *args[1:])

    handle = (layer.register_forward_pre_hook(on_input) if layer_input
              else layer.register_forward_hook(on_output))
    try:
        yield calls
    finally:
        handle.remove()


def check_grid(a: object, ctx: MethodContext, method: str) -> torch.Tensor:
    """Return ``a`` if it is a ``(N, C, *spatial)`` tensor on the input's number of axes, else refuse."""
    name = ctx.layer_name or type(ctx.layer).__name__
    if not isinstance(a, torch.Tensor) or a.dim() != ctx.inputs.dim():
        shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        raise MethodError(
            f"method '{method}' needs a layer with a {ctx.spatial_dims}D spatial grid (N, C, *spatial), "
            f"but layer '{name}' gives {shape}",
            "choose a convolutional layer (or its activation) of the encoder or decoder; "
            "`esegeta layers MODEL` lists the module names",
        )
    return a


def _check_calls(calls: list[int], ctx: MethodContext, method: str) -> None:
    name = ctx.layer_name or type(ctx.layer).__name__
    if calls[0] == 0:
        raise MethodError(f"layer '{name}' did not run in the model's forward pass",
                          "choose a module that the model uses (`esegeta layers MODEL`)")
    if calls[0] > 1:
        raise MethodError(
            f"layer '{name}' runs {calls[0]} times in one forward pass (a module reused at several "
            f"places), so its activation for method '{method}' is ambiguous",
            "choose a module that runs once, e.g. the convolution before a shared activation",
        )


def activations(ctx: MethodContext, inputs: torch.Tensor, layer_input: bool,
                method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One evaluation without gradients: ``(layer activation, scores (N, K))``."""
    store: dict[str, torch.Tensor] = {}

    def keep(a: torch.Tensor) -> torch.Tensor:
        store["a"] = check_grid(a, ctx, method).detach().clone()
        return a

    assert ctx.layer is not None
    with torch.no_grad(), tap(ctx.layer, layer_input, keep) as calls:
        scores = ctx.score_model(inputs)
    _check_calls(calls, ctx, method)
    return store["a"], scores


def activations_and_gradients(ctx: MethodContext, inputs: torch.Tensor, target: int, layer_input: bool,
                              method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One evaluation of ``inputs`` with a backward pass to the layer.

    Returns
    -------
    tuple of torch.Tensor
        The activation ``A`` (N, C, *grid), the gradient of each input's target
        score with respect to it, and the scores ``(N,)``.

    The activation is replaced by a fresh leaf during the pass, so in-place
    operations after the layer cannot change it and the backward pass stops at
    the layer instead of running down to the input.
    """
    store: dict[str, torch.Tensor] = {}

    def leaf(a: torch.Tensor) -> torch.Tensor:
        store["a"] = check_grid(a, ctx, method).detach().requires_grad_(True)
        return store["a"].clone()  # later in-place operations change the clone only

    assert ctx.layer is not None
    with torch.enable_grad(), tap(ctx.layer, layer_input, leaf) as calls:
        scores = ctx.score_model(inputs.detach())[:, target]
        _check_calls(calls, ctx, method)
        if not scores.requires_grad:
            raise MethodError(f"the target score does not depend on layer "
                              f"'{ctx.layer_name or type(ctx.layer).__name__}'",
                              "choose a layer on the path from the input to the explained output")
        (grad,) = torch.autograd.grad(scores.sum(), store["a"], allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(store["a"])
    return store["a"].detach(), grad.detach(), scores.detach()


def spatial_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the spatial axes of ``(N, C, *grid)``, keeping them as size-1 axes."""
    return t.sum(dim=tuple(range(2, t.dim())), keepdim=True)


def weighted_map(weights: torch.Tensor, a: torch.Tensor, relu: bool) -> torch.Tensor:
    """``sum_k weights_k * A_k`` as ``(N, 1, *grid)``, ReLU'd if ``relu``."""
    cam = (weights * a).sum(dim=1, keepdim=True)
    return cam.clamp(min=0) if relu else cam
