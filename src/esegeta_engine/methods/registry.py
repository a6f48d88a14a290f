"""The method registry: one entry per attribution method.

A :class:`MethodSpec` holds everything the CLI, the config schema and the GUI
need to know about a method (name, family, typed parameters with defaults and
one-line help) and a ``build`` function that turns a :class:`MethodContext`
and validated parameters into a Captum-shaped call: an object with
``attribute(inputs, target=..., **kwargs)`` plus its keyword arguments.
Methods Captum lacks are added in the same shape, so the pipeline's execution
step never special-cases a method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods.behaviour import CostFn, CostInfo, OutputGrid, patchwise_mode

__all__ = ["Call", "CostFn", "CostInfo", "MethodContext", "MethodSpec", "Param", "get_method", "list_methods",
           "register"]

Family = Literal["gradient", "perturbation", "layer", "visualisation"]
ParamKind = Literal["int", "float", "bool", "str", "ints", "floats"]
Patchwise = str
Axiom = Literal["completeness", "expected_completeness", "conservation"]
"""An identity a method's maps satisfy, checked on every map (:mod:`esegeta_engine.evaluation.axioms`):

``completeness``
    the attributions sum to ``F(x) - F(baseline)`` (Integrated Gradients up to its path
    integral's error, DeepLIFT where every module has a rule, layer conductance);
``expected_completeness``
    the same in expectation over a baseline distribution and random path points (Gradient
    SHAP): a finite-sample run misses it by sampling error, so its warning threshold is looser.
``conservation``
    the map sums to the score ``F(x)`` itself (LRP's relevance conservation, FullGrad's
    signed terms with the bias terms): no baseline; biases and stabilisers that absorb
    relevance show up as the error.
"""
"""How a method runs under sliding-window execution: the name of a registered
:class:`~esegeta_engine.methods.behaviour.PatchwiseMode`:

``gradient``
    gradients or rules propagated back from the output (saliency, IG, guided, DeepLIFT, LRP, CAMs on each
    patch copy of a layer): hooks fire again as each patch is recomputed in the patch-wise backward.
``perturbation``
    evaluates perturbed copies of the input: unperturbed patch outputs are reused and only the
    patches a perturbation touches are recomputed.
``whole``
    needs one forward pass of the whole input (Eigen/Score/Ablation-CAM, FullGrad, feature visualisation,
    some layer methods): refused under sliding-window execution with a message naming the alternative.

or one that a patch-wise rule module registers.
"""


class Attributor(Protocol):
    """Anything with Captum's ``attribute`` signature."""

    def attribute(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        ...


@dataclass(frozen=True)
class Param:
    """A typed method parameter.

    Parameters
    ----------
    name : str
        Keyword used in configs, on the command line and in the GUI.
    kind : {"int", "float", "bool", "str", "ints", "floats"}
        Value type; ``"ints"`` is one int or one int per spatial axis; ``"floats"`` is one
        number or a list of numbers.
    default : Any
        Default value (``None`` means "derived from the input", see ``help``).
    help : str
        One line shown by ``esegeta methods`` and as a GUI tooltip.
    minimum, maximum : float, optional
        Inclusive bounds for numbers (each entry of ``ints``).
    choices : tuple of str, optional
        Allowed values of a ``str`` parameter.
    """

    name: str
    kind: ParamKind
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None

    def describe_range(self) -> str:
        """Return the allowed values as text for help and error messages."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
        hi = "inf" if self.maximum is None else f"{self.maximum:g}"
        if self.kind == "bool":
            return "true or false"
        if self.kind == "ints":
            return f"an integer in [{lo}, {hi}] or one per spatial axis"
        if self.kind == "floats":
            return f"a number in [{lo}, {hi}] or a list of them"
        if self.kind in ("int", "float"):
            return f"a{'n integer' if self.kind == 'int' else ' number'} in [{lo}, {hi}]"
        return "text"

    def validate(self, value: Any, method: str) -> Any:
        """Return ``value`` converted to this parameter's type, or raise.

        Raises
        ------
        MethodError
            If the value has the wrong type or lies outside the allowed range.
        """
        if value is None and self.default is None:
            return None

        def bad() -> MethodError:
            return MethodError(
                f"parameter '{self.name}' of method '{method}' is {value!r}",
                f"use {self.describe_range()} ({self.help})",
            )

        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise bad()
        if self.kind == "str":
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise bad()
            return value
        if self.kind == "ints":
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
                raise bad()
            for v in items:
                self._check_bounds(v, bad)
            return tuple(items) if len(items) > 1 else items[0]
        if self.kind == "floats":
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                raise bad()
            numbers = [float(v) for v in items]
            for v in numbers:
                self._check_bounds(v, bad)
            return tuple(numbers) if len(numbers) > 1 else numbers[0]
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise bad()
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad()
            value = float(value)
        self._check_bounds(value, bad)
        return value

    def _check_bounds(self, v: float, bad: Callable[[], MethodError]) -> None:
        if self.minimum is not None and v < self.minimum:
            raise bad()
        if self.maximum is not None and v > self.maximum:
            raise bad()


@dataclass
class MethodContext:
    """What a method needs to build its call for one (input, target class).

    Attributes
    ----------
    score_model : nn.Module
        Maps an input batch ``(N, C_in, *spatial)`` to class scores ``(N, K)``;
        it wraps the user's model, its output selection and the target.
    inputs : torch.Tensor
        The preprocessed input batch ``(N, C_in, *spatial)``.
    target : int
        Index of the explained class in the score vector.
    layer : nn.Module or None
        The chosen module for layer methods (inside ``score_model``).
    layer_name : str or None
        Its name as listed by :func:`esegeta_engine.models.list_layers`.
    seed : int
        Seed for methods that sample.
    torchscript : bool
        True when the user's model is TorchScript (no Python module hooks).
    """

    score_model: nn.Module
    inputs: torch.Tensor
    target: int
    layer: nn.Module | None = None
    layer_name: str | None = None
    seed: int = 0
    torchscript: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes of the input (2 or 3)."""
        return self.inputs.dim() - 2


@dataclass
class Call:
    """A Captum-shaped call: ``algorithm.attribute(inputs, target=t, **kwargs)``."""

    algorithm: Attributor
    kwargs: dict[str, Any] = field(default_factory=dict)
    passes_target: bool = True


Builder = Callable[[MethodContext, Mapping[str, Any]], Call]


@dataclass(frozen=True)
class MethodSpec:
    """One attribution method as the registry knows it.

    Attributes
    ----------
    name : str
        Identifier used in configs and on the command line (``snake_case``).
    family : {"gradient", "perturbation", "layer", "visualisation"}
        Group shown in ``esegeta methods`` and in the GUI.
    title : str
        Human-readable name.
    summary : str
        One-line description.
    params : tuple of Param
        Typed parameters with defaults.
    build : callable
        ``build(context, params) -> Call``.
    needs_layer : bool
        The user picks a module by name (layer methods, Guided GradCAM).
    needs_hooks : bool
        Registers Python module hooks, so TorchScript models cannot run it.
    needs_batch : bool
        Only meaningful over a batch of several inputs (Feature Permutation).
    noise_tunnel : bool
        Can be wrapped in SmoothGrad / NoiseTunnel.
    reference : str
        Paper or library the method follows.
    patchwise : str
        How it runs under sliding-window execution: a registered patch-wise mode (see
        :mod:`~esegeta_engine.methods.behaviour`).
    cost : callable, optional
        ``cost(CostInfo, params) -> int``: model evaluations it will make, known before it
        runs (progress totals, ETA); ``None`` when it cannot be known in advance.
    output_grid : {"input", "layer", "volume"}
        Where its output lives (see :data:`~esegeta_engine.methods.behaviour.OutputGrid`).
    explains_class : bool
        Its output depends on the target class (false: one job per layer, named ``volume``).
    evaluable : bool
        Its output is an attribution that trust metrics and localisation apply to.
    axiom : {"completeness", "expected_completeness"}, optional
        The identity its maps satisfy (see :data:`Axiom`), checked on every map; ``None``
        when the method has none.
    """

    name: str
    family: Family
    title: str
    summary: str
    params: tuple[Param, ...]
    build: Builder
    needs_layer: bool = False
    needs_hooks: bool = False
    needs_batch: bool = False
    noise_tunnel: bool = False
    reference: str = ""
    patchwise: Patchwise = "whole"
    cost: CostFn | None = None
    axiom: Axiom | None = None
    output_grid: OutputGrid = "input"
    explains_class: bool = True
    evaluable: bool = True

    def __post_init__(self) -> None:
        try:
            patchwise_mode(self.patchwise)
        except KeyError:
            raise ValueError(f"method {self.name!r}: unknown patch-wise mode {self.patchwise!r} "
                             "(register it with methods.behaviour.register_patchwise_mode)") from None

    @property
    def recomputable(self) -> bool:
        """Its result cannot change when a block's forward runs again: plain autograd, no module hooks.

        Only such methods run with activation checkpointing (:mod:`esegeta_engine.forward.checkpointing`);
        a hook would fire again during the recomputation.
        """
        return not self.needs_hooks

    def param(self, name: str) -> Param:
        """Return the parameter called ``name``."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve_params(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Fill in defaults and validate ``given``.

        Raises
        ------
        MethodError
            On an unknown parameter name (listing the known ones) or a bad value.
        """
        given = dict(given or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(given) - known)
        if unknown:
            raise MethodError(
                f"method '{self.name}' has no parameter {', '.join(map(repr, unknown))}",
                "its parameters are: " + (", ".join(sorted(known)) or "(none)")
                + f"; see `esegeta methods {self.name}`",
            )
        return {p.name: p.validate(given.get(p.name, p.default), self.name) for p in self.params}


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (names must be unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """Return the registered method ``name``.

    Raises
    ------
    MethodError
        If no method has that name; the message lists the known names.
    """
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise MethodError(
            f"unknown method '{name}'",
            hint + "run `esegeta methods` for the list: " + ", ".join(sorted(_REGISTRY)),
        ) from None


def list_methods(family: str | None = None) -> list[MethodSpec]:
    """Return all registered methods, optionally only one family, by family then name."""
    _ensure_loaded()
    order = {"gradient": 0, "perturbation": 1, "layer": 2, "visualisation": 3}
    specs = [s for s in _REGISTRY.values() if family is None or s.family == family]
    return sorted(specs, key=lambda s: (order.get(s.family, 9), s.name))


_LOADED = False


def _ensure_loaded() -> None:
    # Every public module of this package is imported once: a method family registers its
    # entries on import, so a new family is one new module and nothing else to list.
    global _LOADED
    if _LOADED:
        return
    import importlib
    import pkgutil

    import esegeta_engine.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    _LOADED = True


def names(specs: Sequence[MethodSpec]) -> list[str]:
    """Return the names of ``specs``."""
    return [s.name for s in specs]
