"""What a method declares about its behaviour at registration, besides how to build its call.

The engine asks the method, never its family's name: which grid its output lives on
(:data:`OutputGrid`), whether it explains a class, whether its output is an attribution
to evaluate, what it costs (:data:`CostFn` over :class:`CostInfo`) and how it runs under
sliding-window execution (a registered :class:`PatchwiseMode`). ``family`` only groups the
methods listing.

Patch-wise modes are open: a module that teaches hook methods to run patch by patch
registers its mode here (:func:`register_patchwise_mode`) and sets ``patchwise=`` on the
methods that use it; the job executor asks the mode whether it runs and what to prepare.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ContextManager, Literal

OutputGrid = Literal["input", "layer", "volume"]
"""Where a method's output lives:

``input``
    one map on the input grid (summed over input channels when written);
``layer``
    a map on the chosen layer's grid, resampled to the input grid (its sum is the layer's,
    not the input map's);
``volume``
    an optimised input-like volume (feature visualisation): channels kept, nothing to localise.
"""


@dataclass(frozen=True)
class CostInfo:
    """What a cost estimate may look at before a job runs (no model evaluation needed).

    Attributes
    ----------
    batch : int
        Inputs explained together (1 except for batch-only methods).
    channels : int
        Input channels.
    spatial : tuple of int
        Spatial size of the model input.
    noise_tunnel_samples : int
        Noisy copies when wrapped in a noise tunnel (1 otherwise).
    patchwise : bool
        The model runs as a sliding window (methods may batch differently).
    n_features : int, optional
        Supervoxels of the feature mask once it exists (``None``: estimate from params).
    layer_channels : int or None
        Channels of the chosen layer's activation (layer methods whose cost grows with
        them: Score-CAM, Ablation-CAM); ``None`` when not known.
    layer_per_member : bool
        The chosen layer runs once per member of a deployed pipeline (nnU-Net's folds, a
        bundle's sliding window): a layer-space path makes one whole pipeline pass per point.
    """

    batch: int
    channels: int
    spatial: tuple[int, ...]
    noise_tunnel_samples: int = 1
    patchwise: bool = False
    n_features: int | None = None
    layer_channels: int | None = None
    layer_per_member: bool = False


CostFn = Callable[[CostInfo, Mapping[str, Any]], int]
"""``cost(info, params) -> model evaluations`` the method makes (calls of the score model)."""

Prepare = Callable[[Any, Any], ContextManager[None]]
"""``prepare(runner, inputs)``: a context manager set up around one patch-wise attribution."""


@dataclass(frozen=True)
class PatchwiseMode:
    """How methods of this mode run under sliding-window (patch-based) execution.

    Attributes
    ----------
    name : str
        The value of ``MethodSpec.patchwise``.
    runs : bool
        Whether the method can run patch by patch at all (``False``: refused with a message
        naming the alternatives).
    prepare : callable, optional
        ``prepare(runner, inputs) -> context manager`` around the attribution (e.g. caching
        the unperturbed patch outputs).
    summary : str
        One line for the documentation.
    """

    name: str
    runs: bool
    prepare: Prepare | None = None
    summary: str = ""

    def around(self, runner: Any, inputs: Any) -> ContextManager[None]:
        """The context to run the attribution in (nothing when the mode prepares nothing)."""
        return self.prepare(runner, inputs) if self.prepare is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _reuse_unperturbed(runner: Any, inputs: Any) -> Iterator[None]:
    runner.set_base(inputs)  # unperturbed patch outputs are reused by every perturbation
    try:
        yield
    finally:
        runner.set_base(None)


_MODES: dict[str, PatchwiseMode] = {}


def register_patchwise_mode(mode: PatchwiseMode) -> PatchwiseMode:
    """Add a patch-wise mode (names are unique); methods name it in ``patchwise=``."""
    if mode.name in _MODES:
        raise ValueError(f"patch-wise mode {mode.name!r} registered twice")
    _MODES[mode.name] = mode
    return mode


def patchwise_mode(name: str) -> PatchwiseMode:
    """The registered patch-wise mode ``name`` (KeyError when unknown)."""
    return _MODES[name]


def patchwise_modes() -> dict[str, PatchwiseMode]:
    """All registered modes by name."""
    return dict(_MODES)


register_patchwise_mode(PatchwiseMode(
    "gradient", True, summary="gradients or rules propagated back from the output (saliency, IG, guided, "
    "DeepLIFT, LRP, CAMs on each patch copy of a layer): hooks fire again as each patch is recomputed in the "
    "patch-wise backward"))
register_patchwise_mode(PatchwiseMode(
    "perturbation", True, _reuse_unperturbed, summary="evaluates perturbed copies of the input: unperturbed "
    "patch outputs are reused and only the patches a perturbation touches are recomputed"))
register_patchwise_mode(PatchwiseMode(
    "whole", False, summary="needs one forward pass of the whole input (Eigen/Score/Ablation-CAM, FullGrad, "
    "feature visualisation, some layer methods): refused under sliding-window execution with a message "
    "naming the alternative"))
