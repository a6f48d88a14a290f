"""Model-parameter randomisation sanity checks (Adebayo et al. 2018).

Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, *Sanity Checks for Saliency
Maps*, NeurIPS 2018, arXiv:1810.03292: a map that stays the same when the
model's learned weights are replaced by random ones cannot be explaining what
the model learned. Layers are re-initialised in data-flow order from the
output end towards the input — cumulatively (*cascading*) or one at a time
(*independent*) — always on deep copies; the user's model is never touched.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from esegeta_engine.errors import Cancelled, MethodError
from esegeta_engine.evaluation.similarity import compare_maps
from esegeta_engine.methods.registry import MethodContext, MethodSpec
from esegeta_engine.methods.run import attribute
from esegeta_engine.models import get_layer, is_torchscript
from esegeta_engine.scoring import EvaluationMonitor, ScoreModel

__all__ = ["RandomisationResult", "execution_order", "randomised_copies", "run_randomisation"]

Mode = Literal["cascading", "independent"]
MethodEntry = tuple[MethodSpec, Mapping[str, Any], str | None]


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def execution_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the modules that own parameters, in the order the data reaches them.

    One forward pass of ``example_input`` runs on a deep copy in eval mode,
    without gradients, with a forward hook on every module that owns
    parameters directly (convolutions, linear, normalisation, transposed
    convolutions, custom modules with their own ``nn.Parameter``). A module
    is listed when its first call returns; modules never called are left out
    (they cannot change the output). This is the data flow, not the
    registration order of ``named_modules``.

    Parameters
    ----------
    model : nn.Module
        The user's model; not changed (the hooks live on the copy).
    example_input : torch.Tensor
        An input the model accepts, e.g. the explained batch.

    Returns
    -------
    list of str
        Module names as :func:`esegeta_engine.models.get_layer` accepts them.

    Raises
    ------
    MethodError
        For TorchScript models, which run no Python forward hooks.
    """
    if is_torchscript(model):
        raise MethodError("the randomisation check needs Python module hooks, which TorchScript "
                          "models do not run",
                          "load the model as a state dict plus its class (model.class_path)")
    clone = copy.deepcopy(model).eval()
    order: list[str] = []
    handles = []
    for name, module in clone.named_modules():
        if name and _owns_parameters(module):
            def hook(_m: nn.Module, _i: Any, _o: Any, name: str = name) -> None:
                if name not in order:
                    order.append(name)
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            clone(example_input)
    finally:
        for h in handles:
            h.remove()
    return order


def _layer_seed(seed: int, position: int) -> int:
    return (int(seed) * 1_000_003 + position) % (2**63 - 1)


def _reinitialise(module: nn.Module, seed: int) -> list[str]:
    """Re-initialise ``module`` under ``seed``; return the names of the tensors that changed.

    ``reset_parameters()`` is used when the module has it (for normalisation
    layers this also resets the running statistics, making them the identity
    in eval mode); otherwise every direct parameter gets a normal init
    (Kaiming-normal for 2+ dims, N(0, 0.1^2) for vectors).
    """
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        else:
            for p in module.parameters(recurse=False):
                if p.dim() >= 2:
                    nn.init.kaiming_normal_(p)
                else:
                    nn.init.normal_(p, 0.0, 0.1)
    after = module.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def randomised_copies(
    model: nn.Module,
    order: Sequence[str],
    mode: Mode = "cascading",
    seed: int = 0,
    *,
    max_stages: int | None = None,
    changed: dict[str, list[str]] | None = None,
) -> Iterator[tuple[int, str, nn.Module]]:
    """Yield deep copies of ``model`` with layers re-initialised, output end first.

    Parameters
    ----------
    model : nn.Module
        The user's model; never changed.
    order : sequence of str
        Layers in data-flow order (:func:`execution_order`).
    mode : {"cascading", "independent"}
        ``cascading``: stage ``k`` has the last ``k`` layers of ``order``
        randomised (one copy re-initialised cumulatively; the yielded copy is
        changed again by the next stage, deep-copy it to keep it).
        ``independent``: stage ``k`` is a fresh copy with only layer
        ``order[-k]`` randomised.
    seed : int
        Each layer is re-initialised under a seed derived from ``seed`` and its
        position in ``order``, so it gets the same weights in both modes.
    max_stages : int, optional
        Stop after this many stages.
    changed : dict, optional
        Receives ``{layer: [names of its parameters/buffers that changed]}``.

    Yields
    ------
    tuple of (int, str, nn.Module)
        ``(stage, layer name, copy in eval mode)`` with ``stage`` counting from 1.
    """
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    n = len(order) if max_stages is None else min(len(order), max_stages)
    work = copy.deepcopy(model).eval() if mode == "cascading" else None
    for stage in range(1, n + 1):
        position = len(order) - stage
        name = order[position]
        current = work if work is not None else copy.deepcopy(model).eval()
        diff = _reinitialise(get_layer(current, name), _layer_seed(seed, position))
        if changed is not None:
            changed[name] = diff
        yield stage, name, current


@dataclass
class RandomisationResult:
    """Maps and similarities of every method at every randomisation stage.

    Attributes
    ----------
    mode : str
        ``cascading`` or ``independent``.
    order : list of str
        Parameterised layers in data-flow order.
    stages : list of str
        Layer randomised at each stage (output end first); stage ``k`` is ``stages[k-1]``.
    original_maps : dict
        ``method -> map`` of the trained model, ``(N, *spatial)`` summed over channels.
    maps : dict
        ``method -> stage layer -> map`` (numpy, input grid, summed over channels).
    scores : dict
        ``method -> stage layer -> compare_maps(original, map)`` (averaged over the batch).
    errors : list of dict
        ``{"method", "stage", "status": "failed", "message"}`` per failure.
    verdicts : dict
        ``method -> {"passes": bool or None, "rule": str, "mean_spearman_abs": float}``.
    changed : dict
        ``layer -> names of the tensors its re-initialisation changed``.
    """

    mode: str
    order: list[str]
    stages: list[str] = field(default_factory=list)
    original_maps: dict[str, np.ndarray] = field(default_factory=dict)
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    changed: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of everything but the maps (``nan`` becomes ``None``)."""
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean({"mode": self.mode, "order": self.order, "stages": self.stages,
                      "scores": self.scores, "errors": self.errors, "verdicts": self.verdicts,
                      "changed": self.changed})


def _label(spec: MethodSpec, layer: str | None, taken: dict[str, Any]) -> str:
    base = f"{spec.name}@{layer}" if layer else spec.name
    label, i = base, 2
    while label in taken:
        label, i = f"{base}#{i}", i + 1
    return label


def _to_map(result: torch.Tensor, inputs: torch.Tensor) -> np.ndarray:
    if result.dim() != inputs.dim():
        raise MethodError(f"the method gives a map of shape {tuple(result.shape)} with no spatial grid",
                          "choose a convolutional layer")
    return result.sum(dim=1).detach().cpu().numpy().astype(np.float32)


def _similarity(original: np.ndarray, other: np.ndarray) -> dict[str, float]:
    per = [compare_maps(a, b) for a, b in zip(original, other)]
    return {k: float(np.mean([p[k] for p in per])) for k in per[0]}


def _verdict(result: RandomisationResult, label: str, threshold: float, skip: int | None) -> dict[str, Any]:
    if result.mode != "cascading":
        rule = "no verdict in independent mode (the rule is defined on cascading stages)"
        vals = [s["spearman_abs"] for s in result.scores.get(label, {}).values()]
        finite = [v for v in vals if math.isfinite(v)]
        return {"passes": None, "rule": rule,
                "mean_spearman_abs": float(np.mean(finite)) if finite else float("nan")}
    n_skip = len(result.stages) // 3 if skip is None else skip
    rule = (f"passes if the mean spearman_abs (original vs randomised map) over cascading stages "
            f"{n_skip + 1}..{len(result.stages)} is < {threshold:g}; a map that became constant "
            f"counts as 0")
    original = result.original_maps.get(label)
    if original is None:
        rule += " (no verdict: the method failed on the trained model)"
    vals = []
    for name in result.stages[n_skip:]:
        s = result.scores.get(label, {}).get(name)
        if s is None:
            continue
        v = s["spearman_abs"]
        if not math.isfinite(v) and original is not None and np.ptp(original) > 0 \
                and np.ptp(np.abs(result.maps[label][name])) == 0:
            v = 0.0
        if math.isfinite(v):
            vals.append(v)
    mean = float(np.mean(vals)) if vals else float("nan")
    return {"passes": bool(mean < threshold) if vals else None, "rule": rule, "mean_spearman_abs": mean}


def run_randomisation(
    model: nn.Module,
    build_score_model: Callable[[nn.Module], ScoreModel],
    inputs: torch.Tensor,
    target: int,
    methods: Sequence[MethodEntry],
    *,
    mode: Mode = "cascading",
    seed: int = 0,
    max_stages: int | None = None,
    threshold: float = 0.5,
    skip_stages: int | None = None,
    cancel: threading.Event | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> RandomisationResult:
    """Run the randomisation sanity check for several methods.

    Parameters
    ----------
    model : nn.Module
        The trained model; never changed (everything runs on deep copies in eval mode).
    build_score_model : callable
        ``model_copy -> ScoreModel``; keeps the caller's target and output
        selection. Use a target frozen on the *trained* model's prediction so
        every stage explains the same region.
    inputs : torch.Tensor
        Explained batch ``(N, C, *spatial)``.
    target : int
        Explained score index.
    methods : sequence of (MethodSpec, params, layer name or None)
        Layer methods get the layer of that name looked up in each copy.
    mode : {"cascading", "independent"}
        See :func:`randomised_copies`.
    seed : int
        Seeds the re-initialisation and every method run (``torch.manual_seed``).
    max_stages : int, optional
        Randomise at most this many layers (output end first).
    threshold : float
        Verdict threshold on the mean ``spearman_abs``.
    skip_stages : int, optional
        Cascading stages excluded from the verdict (only the last few layers
        randomised); default: the first third of the stages, rounded down.
    cancel : threading.Event, optional
        Checked between runs and, through the score model's monitor, inside them.
    progress : callable, optional
        ``progress(done, total, message)`` after each method run.

    Returns
    -------
    RandomisationResult
        A method failing at a stage records an error for that stage and the
        run goes on. Verdict: cascading mode only, see ``verdicts[m]["rule"]``.

    Raises
    ------
    Cancelled
        When ``cancel`` is set.
    """
    cancel = cancel or threading.Event()
    result = RandomisationResult(mode=mode, order=execution_order(model, inputs))
    entries: list[tuple[str, MethodSpec, dict[str, Any], str | None]] = []
    for spec, params, layer in methods:
        label = _label(spec, layer, {e[0]: 1 for e in entries})
        entries.append((label, spec, spec.resolve_params(params), layer))
        result.maps[label], result.scores[label] = {}, {}
    n_stages = len(result.order) if max_stages is None else min(len(result.order), max_stages)
    total, done = (n_stages + 1) * len(entries), 0

    def run_all(copy_: nn.Module, stage: str, active: set[str]) -> dict[str, np.ndarray]:
        nonlocal done
        score_model = build_score_model(copy_)
        if isinstance(score_model, ScoreModel) and score_model.monitor.cancel is not cancel:
            old = score_model.monitor
            score_model.monitor = EvaluationMonitor(cancel, old.on_evaluation)
        maps = {}
        for label, spec, params, layer in entries:
            if label not in active:
                continue
            if cancel.is_set():
                raise Cancelled("cancelled by the user")
            try:
                ctx = MethodContext(score_model, inputs, target, seed=seed, layer_name=layer,
                                    layer=get_layer(copy_, layer) if layer else None)
                with torch.random.fork_rng(devices=_cuda(inputs)):
                    torch.manual_seed(seed)
                    maps[label] = _to_map(attribute(spec, ctx, params), inputs)
            except Cancelled:
                raise
            except Exception as exc:  # recorded, the run goes on
                result.errors.append({"method": label, "stage": stage, "status": "failed",
                                      "message": f"{type(exc).__name__}: {exc}"})
            done += 1
            if progress is not None:
                progress(done, total, f"{label} · {stage}")
        return maps

    result.original_maps = run_all(copy.deepcopy(model).eval(), "original", {e[0] for e in entries})
    active = set(result.original_maps)  # nothing to compare with where the original failed
    total -= n_stages * (len(entries) - len(active))
    for _, name, copy_ in randomised_copies(model, result.order, mode, seed,
                                            max_stages=max_stages, changed=result.changed):
        result.stages.append(name)
        for label, arr in run_all(copy_, name, active).items():
            result.maps[label][name] = arr
            result.scores[label][name] = _similarity(result.original_maps[label], arr)
    for label, *_ in entries:
        result.verdicts[label] = _verdict(result, label, threshold, skip_stages)
    return result


def _cuda(x: torch.Tensor) -> list[int]:
    return [x.device.index or 0] if x.device.type == "cuda" else []
