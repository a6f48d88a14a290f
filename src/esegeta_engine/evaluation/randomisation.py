"""Model-parameter randomisation sanity checks (Adebayo et al. 2018,
*Sanity Checks for Saliency Maps*, NeurIPS, arXiv:1810.03292).

A map that stays the same when the learned weights are replaced by random ones
cannot explain what the model learned. Layers are re-initialised in data-flow
order from the output end towards the input, cumulatively (*cascading*) or one
at a time (*independent*), on deep copies: the user's model is never touched.

Region targets are frozen from the trained model, so every stage explains the same
voxels; gradients of a *small* region stay near it whatever the weights, keeping rank
correlations high. The check is therefore calibrated (:mod:`.calibration`): the region's
footprint is regressed out of the ranks, and each stage is read against a null, the
similarity of the maps of two independently, fully randomised networks.
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
from esegeta_engine.evaluation.calibration import (
    calibrated_verdict,
    footprint_design,
    footprint_spearman,
    null_seeds,
    target_region,
)
from esegeta_engine.evaluation.similarity import compare_batch
from esegeta_engine.methods.registry import MethodContext, MethodSpec
from esegeta_engine.methods.run import attribute
from esegeta_engine.models import get_layer, is_torchscript
from esegeta_engine.forward.scoring import EvaluationMonitor, ScoreModel

__all__ = ["RandomisationResult", "execution_order", "randomised_copies", "run_randomisation"]

Mode = Literal["cascading", "independent"]
MethodEntry = tuple[MethodSpec, Mapping[str, Any], str | None]


def execution_order(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the modules owning parameters, in the order the data reaches them.

    Forward hooks on every module owning parameters directly (Conv, Linear, BatchNorm,
    ConvTranspose, custom ``nn.Parameter`` holders) record when each module's first call
    returns during one no-grad forward of ``example_input`` on a deep copy in eval mode,
    then are removed. This is the data flow, not ``named_modules`` registration order.
    Modules never called are left out (they cannot change the output).

    Parameters
    ----------
    model, example_input : nn.Module, torch.Tensor
        The user's model (unchanged) and an input it accepts (e.g. the explained batch).

    Returns
    -------
    list of str
        Module names as :func:`esegeta_engine.models.get_layer` accepts them.
        Raises :class:`MethodError` for TorchScript (no Python forward hooks).
    """
    if is_torchscript(model):
        raise MethodError("the randomisation check needs Python module hooks, which TorchScript "
                          "models do not run", "load the model as a state dict plus its class")
    clone, order, handles = copy.deepcopy(model).eval(), [], []
    for name, module in clone.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
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


def _reinitialise(module: nn.Module, seed: int) -> list[str]:
    """Re-initialise ``module`` under ``seed`` (global RNG forked); return the changed tensors.

    ``reset_parameters()`` when the module has one (normalisation layers also reset their
    running statistics: identity in eval mode), else each direct parameter gets a normal
    init (Kaiming-normal for 2+ dims, N(0, 0.1^2) for vectors).
    """
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
        else:
            for p in module.parameters(recurse=False):
                nn.init.kaiming_normal_(p) if p.dim() >= 2 else nn.init.normal_(p, 0.0, 0.1)
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


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
        ``cascading``: stage ``k`` has the last ``k`` layers randomised (one
        copy re-initialised cumulatively: deep-copy a yielded copy to keep it).
        ``independent``: stage ``k`` is a fresh copy with only ``order[-k]`` randomised.
    seed : int
        A layer's seed derives from ``seed`` and its position in ``order``
        (same random weights in both modes).
    max_stages : int, optional
        Stop after this many stages.
    changed : dict, optional
        Receives ``{layer: [its parameters/buffers that changed]}``.

    Yields
    ------
    tuple of (int, str, nn.Module)
        ``(stage, layer name, copy in eval mode)``, ``stage`` counting from 1.
    """
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    work = copy.deepcopy(model).eval() if mode == "cascading" else None
    for stage in range(1, (len(order) if max_stages is None else min(len(order), max_stages)) + 1):
        position = len(order) - stage
        current = work if work is not None else copy.deepcopy(model).eval()
        diff = _reinitialise(get_layer(current, order[position]), (seed * 1_000_003 + position) % 2**62)
        if changed is not None:
            changed[order[position]] = diff
        yield stage, order[position], current


@dataclass
class RandomisationResult:
    """Maps and similarities of every method at every randomisation stage.

    Attributes
    ----------
    mode : str
        ``cascading`` or ``independent``.
    order, stages : list of str
        Parameterised layers in data-flow order; the layer randomised at each
        stage, output end first (stage ``k`` is ``stages[k-1]``).
    original_maps, maps : dict
        ``method -> map`` of the trained model and ``method -> stage layer -> map``
        (numpy ``(N, *spatial)``, input grid, channels summed); methods that failed
        on the trained model are in neither.
    scores : dict
        ``method -> stage layer -> compare_maps(original, map)`` (batch mean), plus
        ``spearman_footprint`` (footprint removed, when a region is known), ``null`` and
        ``margin`` (the verdict measure minus its null) when calibrated.
    errors : list of dict
        ``{"method", "stage", "status": "failed", "message"}`` per failed run.
    verdicts : dict
        ``method -> {"passes", "verdict", "reason", "rule", "mean_similarity", "null", "margin",
        "measure", "mean_spearman_abs"}`` (see :func:`.calibration.calibrated_verdict`).
    null : dict
        ``method -> compare_maps`` of the two fully randomised networks' maps (and
        ``spearman_footprint``); empty when not calibrated.
    null_seeds : list of int
        Seeds of those two networks.
    footprint : bool
        Whether the target region's footprint was regressed out of the verdict measure.
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
    null: dict[str, dict[str, float]] = field(default_factory=dict)
    null_seeds: list[int] = field(default_factory=list)
    footprint: bool = False
    evaluations: int = 0  # model evaluations of the whole check (set by the caller that counts them)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of everything but the maps (``nan`` becomes ``None``)."""
        def clean(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return clean({"mode": self.mode, "order": self.order, "stages": self.stages,
                      "scores": self.scores, "errors": self.errors, "verdicts": self.verdicts,
                      "changed": self.changed, "null": self.null, "null_seeds": self.null_seeds,
                      "footprint": self.footprint, "evaluations": self.evaluations})


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
    calibrate: bool = True,
    footprint: bool | np.ndarray = True,
    cancel: threading.Event | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    order_input: torch.Tensor | None = None,
) -> RandomisationResult:
    """Run the randomisation sanity check for several methods.

    Parameters
    ----------
    model : nn.Module
        The trained model; never changed (every run uses a deep copy in eval mode).
    build_score_model : callable
        ``model_copy -> ScoreModel`` with the caller's target (frozen on the
        trained model's prediction) and output; its monitor is replaced by one
        watching ``cancel`` (keeping its progress callback).
    inputs, target : torch.Tensor, int
        Explained batch ``(N, C, *spatial)`` and score index.
    methods : sequence of (MethodSpec, params, layer name or None)
        Layers are looked up by name in each copy; layer maps are compared on
        the input grid (upsampled, channels summed).
    mode, seed, max_stages
        See :func:`randomised_copies`; ``seed`` also seeds every method run.
    threshold : float
        Pass when the mean verdict measure over the verdict stages is below it (and the
        null too, when calibrated; see :func:`.calibration.calibrated_verdict`).
    skip_stages : int, optional
        First cascading stages left out of the verdict; default a third of them.
    calibrate : bool
        Also run every method on two independently, fully randomised networks (seeded by
        :func:`.calibration.null_seeds`) and report the null and margin: two extra runs per
        method, however many stages.
    footprint : bool or np.ndarray
        Regress the target region's footprint out of the verdict measure
        (``spearman_footprint``): ``True`` takes the region from the score model's target,
        an array gives it (``(N, *spatial)`` bool on the input grid), ``False`` uses the
        raw ``spearman_abs``.
    cancel : threading.Event, optional
        Checked between runs and at every model evaluation.
    progress : callable, optional
        ``progress(done, total, message)`` after each method run.

    Returns
    -------
    RandomisationResult
        A failed run records an error for its (method, stage); the rest goes
        on. A method failing on the trained model is not run on the copies.
        Raises :class:`Cancelled` when ``cancel`` is set.
    """
    cancel = cancel or threading.Event()
    # the layer order needs one plain forward pass: on ``order_input`` (a patch) when given, not the volume
    result = RandomisationResult(mode=mode, order=execution_order(model, inputs if order_input is None else order_input))
    entries: list[tuple[str, MethodSpec, dict[str, Any], str | None]] = []
    for spec, params, layer in methods:
        label = base = f"{spec.name}@{layer}" if layer else spec.name
        label = next(f"{base}#{i}" for i in range(2, 999) if f"{base}#{i}" not in result.maps) \
            if base in result.maps else base
        entries.append((label, spec, spec.resolve_params(params), layer))
        result.maps[label], result.scores[label] = {}, {}
    n_stages = len(result.order) if max_stages is None else min(len(result.order), max_stages)
    total, done = (n_stages + 1 + (2 if calibrate else 0)) * len(entries), 0
    devices = [inputs.device.index or 0] if inputs.device.type == "cuda" else []

    designs: list[np.ndarray] | None = None

    def stop_if_cancelled() -> None:
        if cancel.is_set():
            raise Cancelled("cancelled by the user")

    def run_all(model_copy: nn.Module, stage: str, active: set[str]) -> dict[str, np.ndarray]:
        nonlocal done, designs
        score_model = build_score_model(model_copy)
        if designs is None and footprint is not False:
            region = footprint if isinstance(footprint, np.ndarray) else \
                target_region(getattr(score_model, "target", None), target, tuple(inputs.shape[2:]))
            designs = [] if region is None else [footprint_design(r, check=stop_if_cancelled) for r in region]
        if isinstance(score_model, ScoreModel) and score_model.monitor.cancel is not cancel:
            score_model.monitor = EvaluationMonitor(cancel, score_model.monitor.on_evaluation)
        maps = {}
        for label, spec, params, layer in (e for e in entries if e[0] in active):
            if cancel.is_set():
                raise Cancelled("cancelled by the user")
            try:
                ctx = MethodContext(score_model, inputs, target, seed=seed, layer_name=layer,
                                    layer=get_layer(model_copy, layer) if layer else None)
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    res = attribute(spec, ctx, params)
                if res.dim() != inputs.dim():
                    raise MethodError(f"the map has shape {tuple(res.shape)}, no spatial grid",
                                      "choose a convolutional layer")
                maps[label] = res.sum(dim=1).detach().cpu().numpy().astype(np.float32)
            except Cancelled:
                raise
            except Exception as exc:  # recorded; the run goes on
                result.errors.append({"method": label, "stage": stage, "status": "failed",
                                      "message": f"{type(exc).__name__}: {exc}"})
            done += 1
            if progress is not None:
                progress(done, total, f"{label} · {stage}")
        return maps

    result.original_maps = run_all(copy.deepcopy(model).eval(), "original", set(result.maps))
    result.maps = {k: v for k, v in result.maps.items() if k in result.original_maps}  # others failed
    active = set(result.maps)
    total -= (n_stages + (2 if calibrate else 0)) * (len(entries) - len(active))
    result.footprint = bool(designs)
    measure = "spearman_footprint" if designs else "spearman_abs"

    def similarity(a: np.ndarray, b: np.ndarray) -> tuple[dict[str, float], float]:
        scores, value = compare_batch(a, b)
        if designs:
            per = [0.0 if np.ptp(x) > 0 and np.isfinite(y).all() and np.ptp(np.abs(y)) == 0
                   else footprint_spearman(x, y, d) for x, y, d in zip(a, b, designs)]
            finite = [v for v in per if math.isfinite(v)]
            value = float(np.mean(finite)) if len(finite) == len(per) else math.nan
            scores["spearman_footprint"] = value
        return scores, value

    values: dict[str, list[tuple[int, float]]] = {e[0]: [] for e in entries}
    skip = (n_stages // 3 if skip_stages is None else skip_stages) if mode == "cascading" else 0
    for stage, name, model_copy in randomised_copies(model, result.order, mode, seed,
                                                     max_stages=max_stages, changed=result.changed):
        result.stages.append(name)
        for label, arr in run_all(model_copy, name, active).items():
            result.maps[label][name] = arr
            result.scores[label][name], value = similarity(result.original_maps[label], arr)
            if stage > skip:
                values[label].append((stage, value))
    nulls = {label: math.nan for label in values}
    if calibrate and active:
        result.null_seeds = list(null_seeds(seed))
        pair = [run_all(_fully_randomised(model, result.order, s), f"null-{i}", active)
                for i, s in enumerate(result.null_seeds, start=1)]
        for label in active:
            if label in pair[0] and label in pair[1]:
                result.null[label], nulls[label] = similarity(pair[0][label], pair[1][label])
    verdict_stages = list(range(skip + 1, n_stages + 1))
    for label in values:
        if label not in active:
            result.verdicts[label] = {"passes": None, "verdict": "no verdict", "measure": measure,
                                      "reason": "no verdict: the method failed on the trained model",
                                      "rule": "", "mean_similarity": math.nan, "null": math.nan,
                                      "margin": math.nan, "mean_spearman_abs": math.nan}
            continue
        got = dict(values[label])
        for stage_name, scores in result.scores[label].items():
            if math.isfinite(nulls[label]):
                scores["null"] = nulls[label]
                scores["margin"] = scores.get(measure, math.nan) - nulls[label]
        original = np.asarray(result.original_maps[label])
        raw = [result.scores[label][result.stages[k - 1]]["spearman_abs"] for k in got]
        verdict = calibrated_verdict(
            [got.get(k, math.nan) for k in verdict_stages], nulls[label], measure=measure,
            threshold=threshold, stages=verdict_stages,
            constant=bool(np.all(np.ptp(np.abs(original.reshape(len(original), -1)), axis=1) == 0)),
            failed=sum(not math.isfinite(got.get(k, math.nan)) for k in verdict_stages), mode=mode)
        verdict["mean_spearman_abs"] = float(np.nanmean(raw)) if any(map(math.isfinite, raw)) else math.nan
        result.verdicts[label] = verdict
    return result


def _fully_randomised(model: nn.Module, order: Sequence[str], seed: int) -> nn.Module:
    """A deep copy with every layer of ``order`` re-initialised (cascading to the end)."""
    last = model
    for _, _, last in randomised_copies(model, order, "cascading", seed):
        pass
    return last
