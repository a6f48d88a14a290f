"""The execution step: a loaded model + target -> attribution maps, as events.

:class:`Explainer` is what both the CLI pipeline and the napari plugin call.
``iter_explain`` is a generator: it yields :class:`Progress` while a method
runs and :class:`MapReady` / :class:`JobFailed` as each (method, layer,
class) job ends, so callers can stream results and stop between model
evaluations. Each job runs in a short-lived worker thread while the generator
polls it; cancellation and per-job time limits are checked by the
:class:`~esegeta_engine.scoring.EvaluationMonitor` inside every model
evaluation, which works from any thread (no signals).

Execution is planned, then run: :func:`~esegeta_engine.execution.plan.plan_jobs`
expands methods into keyed jobs with their expected number of model evaluations, and
each job runs on one device against a score model built by the one factory,
:meth:`Explainer.make_score_model` (whole volume or sliding window, precision).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta_engine.channel_target import LayerChannelTarget
from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.errors import (Cancelled, EsegetaError, MethodError, MethodTimeout, TargetError, VolumeError,
                                   error_reason)
from esegeta_engine.execution.plan import Job, array_fingerprint, model_fingerprint, plan_jobs
from esegeta_engine.execution.runner import ExecutionForm, execution_form
from esegeta_engine.io import Volume
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.methods.registry import CostInfo
from esegeta_engine.models import get_layer, is_torchscript, model_guard
from esegeta_engine.preprocess import AxisOrder, Geometry, to_model_input
from esegeta_engine.scoring import EvaluationMonitor, ScoreModel, make_score_model
from esegeta_engine import targets as T

log = logging.getLogger("esegeta_engine")


@dataclass(frozen=True)
class Progress:
    """Progress of a run: ``done`` of ``total`` jobs, with a message.

    Attributes
    ----------
    evaluations : int
        Model evaluations of the current job so far.
    run_evaluations : int
        Model evaluations of the whole run so far.
    run_expected : int or None
        Expected model evaluations of the whole run (None while some job's count is unknown).
    """

    done: int
    total: int
    message: str
    evaluations: int = 0
    run_evaluations: int = 0
    run_expected: int | None = None


@dataclass
class MapReady:
    """A finished attribution map for one volume, in NIfTI axis order.

    ``metrics`` holds what the evaluators computed for this map (NaN or an
    ``<name>_error`` entry where one could not be computed).
    """

    job: Job
    volume: int
    array: np.ndarray
    seconds: float
    evaluations: int
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs_evaluated: int = 0
    notes: list[str] = field(default_factory=list)
    execution: dict[str, Any] = field(default_factory=dict)
    patch_evaluations: int = 0


Evaluator = Callable[["Job", MethodContext, torch.Tensor], dict[str, Any]]
"""``evaluator(job, context, attribution) -> {metric: value}``, run after each job in its
worker thread; ``attribution`` is on the input grid, ``(N, C or 1, *spatial)``."""


@dataclass
class JobFailed:
    """A job that failed, timed out or was cancelled; the run goes on (unless cancelled)."""

    job: Job
    status: str  # "failed" | "timeout" | "cancelled"
    error: str
    seconds: float
    evaluations: int


Event = Progress | MapReady | JobFailed


def build_target(cfg: TargetConfig, spatial_dims: int, roi_mask: np.ndarray | None = None,
                 axis_order: str = "xyz", geometry: Geometry | None = None,
                 volume_shape: tuple[int, ...] | None = None) -> T.Target:
    """Build the target of ``cfg``; ``roi_mask`` and ``cfg.voxel`` are in NIfTI order.

    ``geometry`` (default: the axis order alone) maps them onto the model's grid;
    ``volume_shape`` (NIfTI spatial shape) is needed for a voxel under reorientation.
    """
    act = cfg.resolved_activation
    geometry = geometry or Geometry(axis_order)
    if cfg.kind == "argmax":
        return T.ArgmaxRegionTarget(act, frozen=cfg.frozen)
    if cfg.kind == "otsu":
        return T.OtsuThresholdTarget(act, channel=cfg.channel, frozen=cfg.frozen)
    if cfg.kind == "classification":
        return T.ClassificationTarget(act)
    if cfg.kind == "roi":
        if roi_mask is None:
            raise TargetError("target kind 'roi' needs a mask", "give target.roi_mask")
        return T.RegionOfInterestTarget(geometry.to_model(np.asarray(roi_mask)), act)
    if cfg.kind == "voxel":
        if len(cfg.voxel or ()) != spatial_dims:
            raise TargetError(f"target.voxel {cfg.voxel} needs {spatial_dims} indices", "give x, y[, z]")
        shape = volume_shape or tuple(1 << 30 for _ in range(spatial_dims))
        return T.VoxelTarget(geometry.index_to_model(cfg.voxel, shape), act)
    if cfg.kind == "channel" and cfg.layer:
        unit = None
        if cfg.unit:
            if len(cfg.unit) != spatial_dims:
                raise TargetError(f"target.unit {cfg.unit} needs {spatial_dims} indices", "give x, y[, z]")
            unit = [cfg.unit[i] for i in AxisOrder(geometry.axis_order).permutation]
        return LayerChannelTarget(cfg.layer, cfg.channel, unit, act)
    raise TargetError(f"unknown target kind {cfg.kind!r}",
                      "use argmax, otsu, roi, voxel, classification or channel")


def target_support(target: T.Target, spatial: tuple[int, ...]) -> torch.Tensor | None:
    """Output voxels (model grid, bool) that ``target``'s scores read; None when all of them."""
    if isinstance(target, T.RegionOfInterestTarget):
        m = target.mask
        return (m.any(0) if m.dim() == len(spatial) + 1 else m).bool()
    if isinstance(target, T.VoxelTarget):
        support = torch.zeros(spatial, dtype=torch.bool)
        if all(0 <= i < s for i, s in zip(target.index, spatial)):
            support[tuple(target.index)] = True
            return support
    return None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower()
                                           or "not enough memory" in str(exc).lower()))


def memory_error(shape: tuple[int, ...], form: ExecutionForm | None = None) -> MethodError:
    """The readable error for an out-of-memory model evaluation, with what would fit."""
    if form is not None and form.sliding is not None:
        smaller = [max(16, p // 2) for p in form.sliding.patch_size]
        fix = (f"use a smaller execution.patch_size (e.g. {smaller}), execution.sw_batch_size: 1, "
               "or execution.precision: bf16 (fp16 on a GPU)")
    else:
        side = 96 if len(shape) == 5 else 256
        fix = (f"run patch by patch: execution.patch_size: {[side] * (len(shape) - 2)} (the network's training "
               "patch size), and/or execution.precision: bf16 (fp16 on a GPU); for IG lower internal_batch_size")
    return MethodError(f"ran out of memory evaluating the model on an input of shape {tuple(shape)}", fix)


@dataclass
class Explainer:
    """Explain one model's predictions on NIfTI-ordered volumes.

    Parameters
    ----------
    model : nn.Module
        The user's model, already on its device (see :func:`models.load_model`).
    preprocess : PreprocessConfig
        Normalisation, orientation, axis order, dimensions, channels.
    target : TargetConfig
        Which scores to explain.
    output : int, str or None
        Output selection for multi-output models.
    seed : int
        Seed of every job's sampling (through generators; the global RNG is untouched).
    timeout_s : float or None
        Time limit per job, checked between model evaluations (and patch batches).
    execution : ExecutionConfig, optional
        Whole volume or sliding window, padding, precision.
    """

    model: nn.Module
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    output: int | str | None = None
    seed: int = 0
    timeout_s: float | None = None
    execution: ExecutionConfig | None = None
    _divisible: int = field(default=1, init=False, repr=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters (cpu when it has none)."""
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def model_key(self) -> str:
        """Fingerprint of the model's weights (part of every job key)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def geometry(self, volume: Volume) -> Geometry:
        """NIfTI grid <-> model grid of ``volume`` (orientation, axis order)."""
        p = self.preprocess
        return Geometry.of(volume.affine, p.spatial_dims, p.axis_order, getattr(p, "orientation", None))

    def prepare_input(self, volume: Volume) -> torch.Tensor:
        """``volume`` -> model input ``(1, C, *spatial)`` on the model's device.

        Raises
        ------
        VolumeError
            If the image has NaN or Inf voxels (e.g. an edited napari layer).
        """
        bad = int((~np.isfinite(volume.data)).sum())
        if bad:
            name = volume.path.name if volume.path else "the image"
            raise VolumeError(f"{name} has {bad} NaN or Inf voxel(s)",
                              "fill or mask them (e.g. replace with 0) before explaining the model")
        p = self.preprocess
        return to_model_input(volume.data, spatial_dims=p.spatial_dims, in_channels=p.in_channels,
                              axis_order=p.axis_order, normalisation=p.normalisation,
                              percentiles=p.percentiles, geometry=self.geometry(volume)).to(self.device)

    def form_for(self, x: torch.Tensor, support: torch.Tensor | None = None,
                 precision: str | None = None) -> ExecutionForm:
        """The execution form for input ``x`` (sliding window when configured and larger)."""
        form = execution_form(self.execution, tuple(x.shape[2:]), self._divisible)
        if support is not None and form.sliding is not None:
            form = ExecutionForm(form.sliding, form.divisible_by, form.padding, form.precision,
                                 support.to(x.device))
        return form.with_precision(precision) if precision else form

    def make_score_model(self, target: T.Target, x: torch.Tensor, monitor: EvaluationMonitor | None = None,
                         *, model: nn.Module | None = None, support: torch.Tensor | None = None,
                         precision: str | None = None) -> ScoreModel:
        """The score model for ``target`` on inputs like ``x`` — the factory every caller uses.

        ``model`` replaces the user's model (randomised copies in the sanity check).
        """
        return make_score_model(model if model is not None else self.model, target, output=self.output,
                                monitor=monitor, form=self.form_for(x, support, precision))

    def raw_output(self, x: torch.Tensor) -> torch.Tensor:
        """Selected model output for ``x`` without gradients, with readable errors.

        A whole-volume input the network cannot take (U-Nets need sizes divisible by
        2**depth) is padded to the smallest power-of-two multiple that works (with
        ``execution.divisible_by: auto``), and the outputs are cropped back.
        """
        with model_guard(self.model), torch.no_grad():
            try:
                return self._raw(x)
            except EsegetaError:
                raise
            except Exception as exc:  # the user's model rejected the input: say why, no traceback
                if _is_oom(exc):
                    raise memory_error(tuple(x.shape), self.form_for(x)) from None
                if self._try_padding(x):
                    return self._raw(x)
                form = self.form_for(x)
                if form.sliding is not None:
                    raise MethodError(
                        f"the model does not accept a patch of size {list(form.sliding.patch_size)} "
                        f"(volume {tuple(x.shape)}): {error_reason(exc)}",
                        "give execution.patch_size the network's training patch size (U-Nets need each "
                        "size divisible by 2**depth, e.g. 96 or 128), and check preprocess.in_channels") from None
                raise MethodError(
                    f"the model does not accept an input of shape {tuple(x.shape)}: {error_reason(exc)}",
                    "check preprocess.in_channels, spatial_dims and axis_order; if the network needs sizes "
                    "divisible by 2**depth, set execution.divisible_by (e.g. 16) or a patch size",
                ) from None

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        out = self.make_score_model(T.ClassificationTarget(), x).model_output(x)
        precision = self.form_for(x).precision
        if precision != "fp32" and not bool(torch.isfinite(out).all()):
            log.warning("the model output is non-finite in %s: the prediction is redone in fp32", precision)
            out = self.make_score_model(T.ClassificationTarget(), x, precision="fp32").model_output(x)
        return out

    def _try_padding(self, x: torch.Tensor) -> bool:
        """Find the smallest 2**k padding the network accepts (``divisible_by: auto``)."""
        auto = self.execution is None or self.execution.divisible_by == "auto"
        if not auto or self._divisible > 1 or self.form_for(x).sliding is not None:
            return False
        for k in range(1, 6):
            self._divisible = 2 ** k
            try:
                self._raw(x[:1])
            except Exception as exc:
                if _is_oom(exc):
                    break
                continue
            log.info("the model needs sizes divisible by %d: inputs are padded and maps cropped back",
                     self._divisible)
            return True
        self._divisible = 1
        return False

    def predict(self, volume: Volume) -> np.ndarray:
        """Predicted labels in NIfTI order (argmax, or > 0 logit for one channel)."""
        out = self.raw_output(self.prepare_input(volume))
        if out.dim() < 3:
            raise TargetError("the model output has no spatial grid (a classifier?)",
                              "use target kind 'classification'")
        labels = out.argmax(1) if out.shape[1] > 1 else (out[:, 0] > 0).long()
        return self.geometry(volume).to_nifti(labels[0].cpu().numpy().astype(np.uint8))

    def check_classes(self, target: T.Target, output: torch.Tensor) -> list[int]:
        """The classes to explain (configured or the target's default), checked."""
        classes = self.target.classes or target.default_classes(output)
        n = target.n_scores(output)
        bad = [c for c in classes if not 0 <= c < n]
        if bad:
            raise TargetError(f"target.classes {bad} do not exist: the target has {n} scores",
                              f"use classes in 0..{n - 1}")
        return list(classes)

    def job_context(self, volumes: Sequence[Volume], group: tuple[int, ...]) -> dict[str, Any]:
        """What every job's key depends on besides the method (see :mod:`execution.plan`)."""
        return {"target": self.target.model_dump(mode="json"),
                "preprocess": self.preprocess.model_dump(mode="json"),
                "execution": None if self.execution is None else self.execution.model_dump(mode="json"),
                "output": self.output, "seed": self.seed, "model": self.model_key,
                "volumes": [array_fingerprint(volumes[i].data) for i in group]}

    def plan(self, methods: Sequence[MethodConfig], target: T.Target, output: torch.Tensor,
             volumes: tuple[int, ...], x: torch.Tensor | None = None,
             context: dict[str, Any] | None = None) -> list[Job]:
        """Expand methods x layers x classes into keyed jobs with expected evaluations."""
        classes = self.check_classes(target, output)
        shape = tuple(x.shape) if x is not None else (len(volumes), self.preprocess.in_channels,
                                                      *tuple(output.shape[2:]))
        patchwise = x is not None and self.form_for(x).sliding is not None
        info = CostInfo(shape[0], shape[1], tuple(shape[2:]), 1, patchwise)
        return plan_jobs(methods, classes, target.class_label, target.kind, volumes, info=info,
                         context=context or {}, layer_channels=self._layer_channels)

    def _layer_channels(self, name: str) -> int | None:
        """Output channels of layer ``name`` when its type says so (convolutions), else None."""
        channels = getattr(get_layer(self.model, name), "out_channels", None)
        return int(channels) if isinstance(channels, int) else None

    def estimate(self, volumes: Sequence[Volume], methods: Sequence[MethodConfig]) -> int | None:
        """Expected model evaluations of a run, before it runs (no model evaluation).

        Classes not given in the config count as one per volume. ``None`` when a
        method cannot tell its cost in advance.
        """
        total = 0
        n_classes = len(self.target.classes or [0])
        for v in volumes:
            shape = self.geometry(v).to_model(np.empty(v.data.shape[:self.preprocess.spatial_dims], bool)).shape
            sliding = execution_form(self.execution, shape, self._divisible).sliding is not None
            for m in methods:
                spec = get_method(m.name)
                nt = int(m.noise_tunnel.samples) if m.noise_tunnel else 1
                from esegeta_engine.execution.plan import expected_evaluations

                for layer in m.layers or [None]:
                    info = CostInfo(1, self.preprocess.in_channels, tuple(shape), nt, sliding,
                                    layer_channels=self._layer_channels(layer) if layer else None)
                    n = expected_evaluations(spec, spec.resolve_params(m.params), info)
                    if n is None:
                        return None
                    total += n * (1 if spec.family == "visualisation" else n_classes)
        return total

    def iter_explain(
        self,
        volumes: Sequence[Volume],
        methods: Sequence[MethodConfig],
        *,
        roi_mask: np.ndarray | None = None,
        cancel: threading.Event | None = None,
        evaluators: Sequence[Evaluator] = (),
        threaded: bool = True,
        on_progress: Callable[[Progress], None] | None = None,
        skip: Callable[[Job], bool] | None = None,
    ) -> Generator[Event, None, None]:
        """Run every method on every volume, yielding events as they happen.

        Parameters
        ----------
        volumes : sequence of Volume
            Inputs in NIfTI order.
        methods : sequence of MethodConfig
            Methods with parameters, layers and noise tunnel.
        roi_mask : np.ndarray, optional
            Mask for the ``roi`` target (NIfTI order, volume grid).
        cancel : threading.Event, optional
            Set from any thread to stop at the next model evaluation (or patch batch).
        evaluators : sequence of Evaluator
            Metrics computed for each finished map (see :data:`Evaluator`).
        threaded : bool
            Run each job in a worker thread and yield :class:`Progress` while it
            runs (for GUIs). ``False`` runs jobs in the caller's thread, which is
            faster with multi-threaded torch (no second OpenMP team), and reports
            progress within a job through ``on_progress`` only.
        on_progress : callable, optional
            Called with per-evaluation :class:`Progress` when ``threaded`` is false.
        skip : callable, optional
            ``skip(job) -> bool``: jobs already done (a resumed run) are not run.
        """
        cancel = cancel or threading.Event()
        monitor = EvaluationMonitor(cancel)
        # Methods that only mean something over a batch (feature permutation) get all volumes
        # stacked; everything else runs one volume at a time, which keeps every Captum batch
        # expansion aligned with the target's frozen regions.
        batched = [m for m in methods if get_method(m.name).needs_batch]
        single = [m for m in methods if not get_method(m.name).needs_batch]
        groups: list[tuple[tuple[int, ...], Sequence[MethodConfig]]] = []
        if single:
            groups += [((i,), single) for i in range(len(volumes))]
        if batched:
            if len({v.data.shape for v in volumes}) > 1:
                raise MethodError(
                    f"{', '.join(m.name for m in batched)} needs volumes of one shape",
                    "resample or crop the volumes to a common grid")
            groups.append((tuple(range(len(volumes))), batched))
        for m in methods:  # unknown layers fail the run before any method starts
            for layer in m.layers:
                get_layer(self.model, layer)
        if self.target.kind == "channel" and self.target.layer:
            get_layer(self.model, self.target.layer)
        # Volumes are prepared one group at a time (input, unperturbed forward pass, frozen
        # target), so memory holds one volume's tensors however many volumes a run has. The
        # totals are therefore estimates until every group is planned.
        per_group = {id(ms): sum(len(m.layers or [None]) * len(self.target.classes or [0]) for m in ms)
                     for _, ms in groups}
        state = _RunState(self.estimate(volumes, methods))
        done = 0
        with model_guard(self.model):
            for gi, (group, group_methods) in enumerate(groups):
                yield state.progress(done, done + sum(per_group[id(ms)] for _, ms in groups[gi:]),
                                     "preparing the input and the target")
                if cancel.is_set():
                    return
                x = torch.cat([self.prepare_input(volumes[i]) for i in group])
                geometry = self.geometry(volumes[group[0]])
                target = build_target(self.target, self.preprocess.spatial_dims, roi_mask,
                                      self.preprocess.axis_order, geometry,
                                      tuple(volumes[group[0]].data.shape[:self.preprocess.spatial_dims]))
                target = target.to(self.device)
                out = self.raw_output(x)
                target.prepare(out)
                jobs = self.plan(group_methods, target, out, group, x, self.job_context(volumes, group))
                per_group[id(group_methods)] = len(jobs)
                total = done + len(jobs) + sum(per_group[id(ms)] for _, ms in groups[gi + 1:])
                support = target_support(target, tuple(x.shape[2:]))
                for job in jobs:
                    if skip is not None and skip(job):
                        state.skipped(job)
                        done += 1
                        yield state.progress(done, total, f"{job.label} · {job.cls_label}: already done")
                        continue
                    yield state.progress(done, total, f"{job.label} · {job.cls_label}: starting")
                    yield from self._run_job(job, x, target, support, monitor, done, total, evaluators,
                                             threaded, on_progress, state, geometry)
                    state.finished(job, state.job_evaluations)
                    done += 1
                    if cancel.is_set():
                        return
                del x, out, target
            yield state.progress(done, done, "finished")

    def _run_job(self, job: Job, x: torch.Tensor, target: T.Target, support: torch.Tensor | None,
                 monitor: EvaluationMonitor, done: int, total: int, evaluators: Sequence[Evaluator] = (),
                 threaded: bool = True, on_progress: Callable[[Progress], None] | None = None,
                 state: _RunState | None = None, geometry: Geometry | None = None,
                 ) -> Generator[Event, None, None]:
        """Execute one job on the model's device (the executor), yielding its events."""
        state = state or _RunState(None)
        holder: dict[str, Any] = {"notes": []}
        precision = self.form_for(x).precision

        def attempt(prec: str) -> tuple[torch.Tensor, MethodContext, ScoreModel]:
            score_model = self.make_score_model(target, x, monitor, support=support, precision=prec)
            ctx = MethodContext(
                score_model=score_model, inputs=x, target=job.cls, seed=self.seed,
                layer=get_layer(self.model, job.layer) if job.layer else None, layer_name=job.layer,
                torchscript=is_torchscript(self.model),
                extra={"patchwise": score_model.patchwise, "notes": holder["notes"]},
            )
            if score_model.patchwise and isinstance(target, LayerChannelTarget):
                raise MethodError(
                    "the channel target reads a layer's activation over the whole volume, which patch-wise "
                    "execution does not compute", "use execution.mode: whole (on an ROI crop for large volumes)")
            if score_model.patchwise and job.spec.patchwise == "whole":
                raise MethodError(
                    f"method '{job.spec.name}' needs one forward pass of the whole volume (its hooks store "
                    "activations) and cannot run patch by patch under sliding-window execution",
                    "explain an ROI crop of the volume with a receptive-field margin (e.g. the region plus half "
                    "a patch on every side) with execution.mode: whole, or use a patch-wise method "
                    "(saliency, integrated_gradients, input_x_gradient, guided_backprop, gradient_shap, "
                    "occlusion, feature_ablation; see docs/execution.md)")
            runner = score_model.runner
            if score_model.patchwise and job.spec.patchwise == "perturbation":
                runner.set_base(x)  # unperturbed patch outputs are reused by every perturbation
            try:
                return attribute(job.spec, ctx, job.params, job.noise_tunnel), ctx, score_model
            finally:
                if score_model.patchwise:
                    runner.set_base(None)

        def work() -> None:
            try:
                try:
                    result, ctx, sm = attempt(precision)
                except EsegetaError:
                    raise
                except (Cancelled, MethodTimeout):
                    raise
                except Exception as exc:
                    if _is_oom(exc):
                        raise memory_error(tuple(x.shape), self.form_for(x)) from None
                    raise
                if precision != "fp32" and not bool(torch.isfinite(result).all()):
                    holder["notes"].append(f"map turned non-finite in {precision}: redone in fp32")
                    log.warning("%s · %s: non-finite map in %s, redoing in fp32", job.label, job.cls_label,
                                precision)
                    monitor.start(self.timeout_s)
                    result, ctx, sm = attempt("fp32")
                    holder["precision"] = "fp32"
                holder["result"] = result
                holder["evaluations"] = monitor.count
                holder["samples"] = monitor.samples
                holder["patches"] = monitor.patches
                holder["form"] = sm.form.describe()
            except Exception as exc:  # recorded; KeyboardInterrupt propagates
                holder["error"] = exc
                return
            try:
                holder["metrics"] = self._evaluate(evaluators, job, ctx, holder["result"], monitor)
            except Exception as exc:  # cancelled while evaluating: the map itself is kept
                holder["metrics_error"] = exc

        monitor.start(self.timeout_s)
        start = time.perf_counter()
        if not threaded:  # in this thread: progress through the callback only
            def report(n: int) -> None:
                if on_progress is not None:
                    on_progress(state.progress(done, total, f"{job.label} · {job.cls_label}: {n} model "
                                               f"evaluations{_of(job)}", n))

            monitor.on_evaluation = report
            try:
                work()
            finally:
                monitor.on_evaluation = None
        else:
            yield from self._watch(work, job, holder, monitor, done, total, start, state)
        seconds = time.perf_counter() - start
        # the method's own evaluations (trust checks after it are not part of the job's count)
        state.job_evaluations = holder.get("evaluations", monitor.count)
        err = holder.get("error")
        if err is None and "result" in holder:
            try:
                maps = self._to_nifti_maps(holder["result"], job, x, geometry)
            except EsegetaError as exc:
                err = exc
            else:
                metrics = holder.get("metrics") or [{} for _ in maps]
                form = dict(holder.get("form") or {})
                if "precision" in holder:
                    form["precision_fallback"] = f"{precision} -> fp32"
                for vol, arr, met in zip(job.volumes, maps, metrics):
                    yield MapReady(job, vol, arr, seconds, holder.get("evaluations", monitor.count), met,
                                   holder.get("samples", monitor.samples), list(holder["notes"]), form,
                                   holder.get("patches", 0))
                log.info("%s · %s: done in %.2f s, %d model evaluations", job.label, job.cls_label,
                         seconds, monitor.count)
                return
        if isinstance(err, Cancelled):
            status, text = "cancelled", "cancelled by the user"
        elif isinstance(err, MethodTimeout):
            status, text = "timeout", str(err)
        elif isinstance(err, EsegetaError):
            status, text = "failed", str(err)
        else:
            # the reason first (a TorchScript error's is its last line), then the whole message
            reason, text = error_reason(err, limit=2000), f"{type(err).__name__}: {err}"
            status, text = "failed", text if text.startswith(reason) else f"{reason}\n{text}"
            log.error("%s · %s failed", job.label, job.cls_label, exc_info=err)
        log.warning("%s · %s: %s (%s)", job.label, job.cls_label, status, text)
        yield JobFailed(job, status, text, seconds, monitor.count)

    @staticmethod
    def _watch(work: Callable[[], None], job: Job, holder: dict[str, Any], monitor: EvaluationMonitor,
               done: int, total: int, start: float, state: _RunState) -> Generator[Event, None, None]:
        """Run ``work`` in a worker thread, yielding progress while it runs."""
        # the worker inherits this thread's context (the run it logs for)
        thread = threading.Thread(target=contextvars.copy_context().run, args=(work,),
                                  name=f"esegeta-{job.label}", daemon=True)
        thread.start()
        last = -1
        timeout = monitor.timeout_s
        try:
            while thread.is_alive():
                thread.join(0.05)
                if monitor.count != last:
                    last = monitor.count
                    yield state.progress(done, total, f"{job.label} · {job.cls_label}: {last} model "
                                         f"evaluations{_of(job)}", last)
                if timeout is not None and time.perf_counter() - start > timeout + 30:
                    holder["error"] = MethodTimeout(  # one model call runs far past the limit
                        f"exceeded the time limit of {timeout:g} s inside one model evaluation")
                    monitor.abort.set()  # the stuck job stops at its next evaluation; the run goes on
                    break
        finally:
            if thread.is_alive() and "error" not in holder:
                monitor.abort.set()  # generator closed (GUI cancel): stop the worker
                thread.join(5.0)

    @staticmethod
    def _evaluate(evaluators: Sequence[Evaluator], job: Job, ctx: MethodContext, result: torch.Tensor,
                  monitor: EvaluationMonitor) -> list[dict[str, Any]]:
        """Per-input metrics; a failing evaluator is recorded, never fatal (cancel still stops)."""
        rows: list[dict[str, Any]] = [{} for _ in range(result.shape[0])]
        for evaluator in evaluators:
            for i in range(result.shape[0]):
                sub = MethodContext(ctx.score_model, ctx.inputs[i:i + 1], ctx.target, ctx.layer,
                                    ctx.layer_name, ctx.seed, ctx.torchscript, {**ctx.extra, "index": i})
                try:
                    rows[i].update(evaluator(job, sub, result[i:i + 1]))
                except Cancelled:
                    raise
                except MethodTimeout:
                    rows[i][f"{getattr(evaluator, '__name__', 'metric')}_error"] = "time limit reached"
                except Exception as exc:  # one metric failing must not lose the map
                    name = getattr(evaluator, "__name__", type(evaluator).__name__)
                    rows[i][f"{name}_error"] = f"{type(exc).__name__}: {exc}"
                    log.warning("%s: evaluator %s failed: %s", job.label, name, exc)
        return rows

    def _to_nifti_maps(self, result: torch.Tensor, job: Job, x: torch.Tensor,
                       geometry: Geometry | None = None) -> list[np.ndarray]:
        if result.dim() != x.dim():
            raise MethodError(
                f"layer '{job.layer}' gives a map of shape {tuple(result.shape)} with no spatial grid",
                "choose a convolutional layer (see `esegeta layers MODEL`)",
            )
        _check_finite(result, job)
        geometry = geometry or Geometry(self.preprocess.axis_order)
        maps = []
        for i in range(result.shape[0]):
            r = result[i].cpu().numpy()
            # input-grid maps share one map over the input channels; optimised volumes keep theirs
            volume = job.spec.family == "visualisation" and r.shape[0] > 1
            arr = r.sum(0) if (r.shape[0] in (x.shape[1], 1) and not volume) else np.moveaxis(r, 0, -1)
            maps.append(geometry.to_nifti(arr).astype(np.float32))
        return maps


def _of(job: Job) -> str:
    return f" of {job.expected_evaluations}" if job.expected_evaluations else ""


class _RunState:
    """Run-wide evaluation counts for progress totals and ETAs."""

    def __init__(self, expected: int | None) -> None:
        self.expected = expected
        self.finished_evaluations = 0
        self.job_evaluations = 0

    def finished(self, job: Job, evaluations: int) -> None:
        self.finished_evaluations += evaluations
        if self.expected is not None and job.expected_evaluations is not None:
            # the estimate used the job's predicted count: replace it by what it really made
            self.expected += evaluations - job.expected_evaluations

    def skipped(self, job: Job) -> None:
        if self.expected is not None and job.expected_evaluations is not None:
            self.expected -= job.expected_evaluations

    def progress(self, done: int, total: int, message: str, evaluations: int = 0) -> Progress:
        return Progress(done, total, message, evaluations, self.finished_evaluations + evaluations,
                        self.expected)
def _check_finite(result: torch.Tensor, job: Job) -> None:
    """A map with NaN or Inf values is a failed job, never a result.

    Raises
    ------
    MethodError
        Saying how many values are not finite and the likely cause.
    """
    bad = int((~torch.isfinite(result)).sum())
    if bad:
        raise MethodError(
            f"{job.label} gave a map with {bad} of {result.numel()} values NaN or infinite",
            "the model output or its gradient overflows (NaN weights, huge logits or inputs): check the "
            "model on this input, normalise the volume, or try another method")
