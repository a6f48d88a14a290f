"""The execution step: a loaded model + target -> attribution maps, as events.

:class:`Explainer` is what both the CLI pipeline and the napari plugin call.
``iter_explain`` is a generator: it yields :class:`Progress` while a method
runs and :class:`MapReady` / :class:`JobFailed` as each (method, layer,
class) job ends, so callers can stream results and stop between model
evaluations. Each job runs in a short-lived worker thread while the generator
polls it; cancellation and per-job time limits are checked by the
:class:`~esegeta_engine.scoring.EvaluationMonitor` inside every model
evaluation, which works from any thread (no signals).

This is the one place to grow patch-based, multi-GPU or resumable execution.
"""

from __future__ import annotations

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
from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.errors import Cancelled, EsegetaError, MethodError, MethodTimeout, TargetError, VolumeError
from esegeta_engine.io import Volume
from esegeta_engine.methods import MethodContext, MethodSpec, attribute, get_method
from esegeta_engine.models import get_layer, is_torchscript, model_guard
from esegeta_engine.preprocess import AxisOrder, to_model_input
from esegeta_engine.scoring import EvaluationMonitor, ScoreModel
from esegeta_engine import targets as T

log = logging.getLogger("esegeta_engine")


@dataclass(frozen=True)
class Progress:
    """Progress of a run: ``done`` of ``total`` jobs, with a message."""

    done: int
    total: int
    message: str
    evaluations: int = 0


@dataclass
class Job:
    """One attribution to compute: a method (and layer) for one class."""

    spec: MethodSpec
    params: dict[str, Any]
    cls: int
    cls_label: str
    volumes: tuple[int, ...]
    layer: str | None = None
    noise_tunnel: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """``method[@layer][+smoothgrad]`` for names and messages."""
        text = self.spec.name + (f"@{self.layer}" if self.layer else "")
        return text + (f"+{self.noise_tunnel['type']}" if self.noise_tunnel else "")


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
                 axis_order: str = "xyz") -> T.Target:
    """Build the target of ``cfg``; ``roi_mask`` and ``cfg.voxel`` are in NIfTI order."""
    act = cfg.resolved_activation
    if cfg.kind == "argmax":
        return T.ArgmaxRegionTarget(act, frozen=cfg.frozen)
    if cfg.kind == "otsu":
        return T.OtsuThresholdTarget(act, channel=cfg.channel, frozen=cfg.frozen)
    if cfg.kind == "classification":
        return T.ClassificationTarget(act)
    order = AxisOrder(axis_order)
    if cfg.kind == "roi":
        if roi_mask is None:
            raise TargetError("target kind 'roi' needs a mask", "give target.roi_mask")
        return T.RegionOfInterestTarget(order.to_model(np.asarray(roi_mask)), act)
    if cfg.kind == "voxel":
        if len(cfg.voxel or ()) != spatial_dims:
            raise TargetError(f"target.voxel {cfg.voxel} needs {spatial_dims} indices", "give x, y[, z]")
        return T.VoxelTarget([cfg.voxel[i] for i in order.permutation], act)
    if cfg.kind == "channel" and cfg.layer:
        unit = None
        if cfg.unit:
            if len(cfg.unit) != spatial_dims:
                raise TargetError(f"target.unit {cfg.unit} needs {spatial_dims} indices", "give x, y[, z]")
            unit = [cfg.unit[i] for i in order.permutation]
        return LayerChannelTarget(cfg.layer, cfg.channel, unit, act)
    raise TargetError(f"unknown target kind {cfg.kind!r}",
                      "use argmax, otsu, roi, voxel, classification or channel")


@dataclass
class Explainer:
    """Explain one model's predictions on NIfTI-ordered volumes.

    Parameters
    ----------
    model : nn.Module
        The user's model, already on its device (see :func:`models.load_model`).
    preprocess : PreprocessConfig
        Normalisation, axis order, dimensions, channels.
    target : TargetConfig
        Which scores to explain.
    output : int, str or None
        Output selection for multi-output models.
    seed : int
        Seeded before every job.
    timeout_s : float or None
        Time limit per job, checked between model evaluations.
    """

    model: nn.Module
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    output: int | str | None = None
    seed: int = 0
    timeout_s: float | None = None

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters (cpu when it has none)."""
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

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
                              percentiles=p.percentiles).to(self.device)

    def raw_output(self, x: torch.Tensor) -> torch.Tensor:
        """Selected model output for ``x`` without gradients, with readable errors."""
        sm = ScoreModel(self.model, T.ClassificationTarget(), self.output)
        with model_guard(self.model), torch.no_grad():
            try:
                return sm.model_output(x)
            except EsegetaError:
                raise
            except Exception as exc:  # the user's model rejected the input: say why, no traceback
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise MethodError(
                    f"the model does not accept an input of shape {tuple(x.shape)}: {first}",
                    "check preprocess.in_channels, spatial_dims and axis_order; U-Nets often need each "
                    "axis divisible by 2**depth (crop or pad the volume)",
                ) from None

    def predict(self, volume: Volume) -> np.ndarray:
        """Predicted labels in NIfTI order (argmax, or > 0 logit for one channel)."""
        out = self.raw_output(self.prepare_input(volume))
        if out.dim() < 3:
            raise TargetError("the model output has no spatial grid (a classifier?)",
                              "use target kind 'classification'")
        labels = out.argmax(1) if out.shape[1] > 1 else (out[:, 0] > 0).long()
        return AxisOrder(self.preprocess.axis_order).to_nifti(labels[0].cpu().numpy().astype(np.uint8))

    def plan(self, methods: Sequence[MethodConfig], target: T.Target, output: torch.Tensor,
             volumes: tuple[int, ...]) -> list[Job]:
        """Expand methods x layers x classes into jobs."""
        classes = self.target.classes or target.default_classes(output)
        n = target.n_scores(output)
        bad = [c for c in classes if not 0 <= c < n]
        if bad:
            raise TargetError(f"target.classes {bad} do not exist: the target has {n} scores",
                              f"use classes in 0..{n - 1}")
        jobs = []
        for m in methods:
            spec = get_method(m.name)
            params = spec.resolve_params(m.params)
            nt = m.noise_tunnel.model_dump() if m.noise_tunnel else None
            # feature visualisation explains no class: one volume per layer, not per class
            chosen = classes[:1] if spec.family == "visualisation" else classes
            for layer in m.layers or [None]:
                for c in chosen:
                    label = f"{target.kind}-{target.class_label(c)}"
                    if spec.family == "visualisation":  # named by what it shows, not by a target
                        label = "volume" + (f"-ch{params['channel']}" if "channel" in params else "")
                    jobs.append(Job(spec, params, c, label, volumes, layer, nt))
        return jobs

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
            Set from any thread to stop at the next model evaluation.
        evaluators : sequence of Evaluator
            Metrics computed for each finished map (see :data:`Evaluator`).
        threaded : bool
            Run each job in a worker thread and yield :class:`Progress` while it
            runs (for GUIs). ``False`` runs jobs in the caller's thread, which is
            faster with multi-threaded torch (no second OpenMP team), and reports
            progress within a job through ``on_progress`` only.
        on_progress : callable, optional
            Called with per-evaluation :class:`Progress` when ``threaded`` is false.
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
        # total is therefore an estimate until every group is planned.
        per_group = {id(ms): sum(len(m.layers or [None]) * len(self.target.classes or [0]) for m in ms)
                     for _, ms in groups}
        done = 0
        with model_guard(self.model):
            for gi, (group, group_methods) in enumerate(groups):
                yield Progress(done, done + sum(per_group[id(ms)] for _, ms in groups[gi:]),
                               "preparing the input and the target")
                if cancel.is_set():
                    return
                x = torch.cat([self.prepare_input(volumes[i]) for i in group])
                target = build_target(self.target, self.preprocess.spatial_dims, roi_mask,
                                      self.preprocess.axis_order).to(self.device)
                out = self.raw_output(x)
                target.prepare(out)
                jobs = self.plan(group_methods, target, out, group)
                per_group[id(group_methods)] = len(jobs)
                total = done + len(jobs) + sum(per_group[id(ms)] for _, ms in groups[gi + 1:])
                score_model = ScoreModel(self.model, target, self.output, monitor)
                for job in jobs:
                    yield Progress(done, total, f"{job.label} · {job.cls_label}: starting")
                    yield from self._run_job(job, x, score_model, monitor, done, total, evaluators,
                                             threaded, on_progress)
                    done += 1
                    if cancel.is_set():
                        return
                del x, out, target, score_model
            yield Progress(done, done, "finished")

    def _run_job(self, job: Job, x: torch.Tensor, score_model: ScoreModel, monitor: EvaluationMonitor,
                 done: int, total: int, evaluators: Sequence[Evaluator] = (), threaded: bool = True,
                 on_progress: Callable[[Progress], None] | None = None) -> Generator[Event, None, None]:
        ctx = MethodContext(
            score_model=score_model, inputs=x, target=job.cls, seed=self.seed,
            layer=get_layer(self.model, job.layer) if job.layer else None, layer_name=job.layer,
            torchscript=is_torchscript(self.model),
        )
        holder: dict[str, Any] = {}

        def work() -> None:
            try:
                torch.manual_seed(self.seed)
                holder["result"] = attribute(job.spec, ctx, job.params, job.noise_tunnel)
                evaluations = monitor.count
                holder["samples"] = monitor.samples
            except Exception as exc:  # recorded; KeyboardInterrupt propagates
                holder["error"] = exc
                return
            holder["evaluations"] = evaluations
            try:
                holder["metrics"] = self._evaluate(evaluators, job, ctx, holder["result"], monitor)
            except Exception as exc:  # cancelled while evaluating: the map itself is kept
                holder["metrics_error"] = exc

        monitor.start(self.timeout_s)
        start = time.perf_counter()
        if not threaded:  # in this thread: progress through the callback only
            def report(n: int) -> None:
                if on_progress is not None:
                    on_progress(Progress(done, total, f"{job.label} · {job.cls_label}: {n} model evaluations", n))

            monitor.on_evaluation = report
            try:
                work()
            finally:
                monitor.on_evaluation = None
        else:
            yield from self._watch(work, job, holder, monitor, done, total, start)
        seconds = time.perf_counter() - start
        err = holder.get("error")
        if err is None and "result" in holder:
            try:
                maps = self._to_nifti_maps(holder["result"], job, x)
            except EsegetaError as exc:
                err = exc
            else:
                metrics = holder.get("metrics") or [{} for _ in maps]
                for vol, arr, met in zip(job.volumes, maps, metrics):
                    yield MapReady(job, vol, arr, seconds, holder.get("evaluations", monitor.count), met,
                                   holder.get("samples", monitor.samples))
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
            status, text = "failed", f"{type(err).__name__}: {err}"
            log.error("%s · %s failed", job.label, job.cls_label, exc_info=err)
        log.warning("%s · %s: %s (%s)", job.label, job.cls_label, status, text)
        yield JobFailed(job, status, text, seconds, monitor.count)

    @staticmethod
    def _watch(work: Callable[[], None], job: Job, holder: dict[str, Any], monitor: EvaluationMonitor,
               done: int, total: int, start: float) -> Generator[Event, None, None]:
        """Run ``work`` in a worker thread, yielding progress while it runs."""
        thread = threading.Thread(target=work, name=f"esegeta-{job.label}", daemon=True)
        thread.start()
        last = -1
        timeout = monitor.timeout_s
        try:
            while thread.is_alive():
                thread.join(0.05)
                if monitor.count != last:
                    last = monitor.count
                    yield Progress(done, total, f"{job.label} · {job.cls_label}: {last} model evaluations", last)
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

    def _to_nifti_maps(self, result: torch.Tensor, job: Job, x: torch.Tensor) -> list[np.ndarray]:
        if result.dim() != x.dim():
            raise MethodError(
                f"layer '{job.layer}' gives a map of shape {tuple(result.shape)} with no spatial grid",
                "choose a convolutional layer (see `esegeta layers MODEL`)",
            )
        order = AxisOrder(self.preprocess.axis_order)
        maps = []
        for i in range(result.shape[0]):
            r = result[i].cpu().numpy()
            # input-grid maps share one map over the input channels; optimised volumes keep theirs
            volume = job.spec.family == "visualisation" and r.shape[0] > 1
            arr = r.sum(0) if (r.shape[0] in (x.shape[1], 1) and not volume) else np.moveaxis(r, 0, -1)
            maps.append(order.to_nifti(arr).astype(np.float32))
        return maps
