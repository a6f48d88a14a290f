"""The execution step: a loaded model + target -> attribution maps, as events.

:class:`Explainer` is what the CLI pipeline and the napari plugin call. ``iter_explain`` yields
:class:`Progress` while a method runs and :class:`MapReady` / :class:`JobFailed` as each job ends
(cancel and time limits are checked inside every model evaluation, from any thread). Jobs are planned
(:func:`~esegeta_engine.jobs.plan.plan_jobs`), then run through an executor's ``map(specs) -> outcomes``
seam (inline by default: here, on the loaded model, with :meth:`Explainer.make_score_model`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta_engine import targets as T
from esegeta_engine.advice import precision_clash, rejected_input
from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.errors import Cancelled, EsegetaError, MethodTimeout, TargetError, VolumeError
from esegeta_engine.forward.runner import ExecutionForm, execution_form
from esegeta_engine.jobs.build import _is_oom, build_target, memory_error, padding_search_input, target_support
from esegeta_engine.jobs.events import Event, Evaluator, JobFailed, MapReady, Progress, RunState, score_evaluations
from esegeta_engine.jobs.executor import JobExecutor
from esegeta_engine.jobs.executors import InlineExecutor, run_jobs
from esegeta_engine.jobs.worker import JobOutcome
from esegeta_engine.jobs.plan import (Job, array_fingerprint, count_network_evaluations, estimate_run, job_estimate,
                                      key_context, model_fingerprint, plan_jobs, volume_groups)
from esegeta_engine.io import Volume
from esegeta_engine.methods.registry import CostInfo
from esegeta_engine.models import get_layer, model_guard
from esegeta_engine.preprocess import Geometry, to_model_input
from esegeta_engine.forward.scoring import EvaluationMonitor, ScoreModel, make_score_model
from esegeta_engine.timebudget import arm_pass_budget
from esegeta_engine.watchdog import prediction_pass

__all__ = ["Event", "Evaluator", "Explainer", "Job", "JobFailed", "MapReady", "Progress", "build_target",
           "memory_error", "target_support"]

log = logging.getLogger("esegeta_engine")


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
    _pass_s: float | None = field(default=None, init=False, repr=False)  # last prediction pass, seconds

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
        bind = getattr(self.model, "bind_volume", None)  # a deployed pipeline needs the scan's spacing
        if callable(bind):
            bind(volume)
        p = self.preprocess
        return to_model_input(volume.data, spatial_dims=p.spatial_dims, in_channels=p.in_channels,
                              axis_order=p.axis_order, normalisation=p.normalisation,
                              percentiles=p.percentiles, geometry=self.geometry(volume)).to(self.device)

    def form_for(self, x: torch.Tensor, support: torch.Tensor | None = None,
                 precision: str | None = None) -> ExecutionForm:
        """The execution form for input ``x`` (sliding window when configured and larger)."""
        form = execution_form(self.execution, tuple(x.shape[2:]), self._divisible)
        if support is not None:  # sliding windows skip patches; perturbations skip what cannot reach it
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

    def raw_output(self, x: torch.Tensor, cancel: threading.Event | None = None) -> torch.Tensor:
        """Selected model output for ``x`` without gradients, with readable errors.

        A whole-volume input the network cannot take (U-Nets need sizes divisible by
        2**depth) is padded to the smallest power-of-two multiple that works (with
        ``execution.divisible_by: auto``), and the outputs are cropped back. The pass
        runs under the time limit (see :mod:`esegeta_engine.watchdog`); its duration is
        kept for refusing jobs that cannot fit (:mod:`esegeta_engine.timebudget`).
        """
        out, self._pass_s = prediction_pass(lambda monitor: self._raw_output(x, monitor), self.timeout_s, cancel)
        return out

    def _raw_output(self, x: torch.Tensor, monitor: EvaluationMonitor) -> torch.Tensor:
        with model_guard(self.model), torch.no_grad():
            try:
                return self._raw(x, monitor)
            except (EsegetaError, Cancelled, MethodTimeout):
                raise
            except Exception as exc:  # the user's model rejected the input: say why, no traceback
                if _is_oom(exc):
                    raise memory_error(tuple(x.shape), self.form_for(x)) from None
                clash = precision_clash(exc, self.form_for(x).precision)
                if clash is not None:  # not the patch size's fault: name the precision
                    raise clash from None
                out = self._padded(x, monitor)
                if out is not None:
                    return out
                raise rejected_input(exc, self.model, tuple(x.shape), self.form_for(x)) from None

    def _raw(self, x: torch.Tensor, monitor: EvaluationMonitor | None = None) -> torch.Tensor:
        sm = self.make_score_model(T.ClassificationTarget(), x, monitor)
        if monitor is not None:
            arm_pass_budget(sm, x, monitor)
        out = sm.model_output(x)
        precision = self.form_for(x).precision
        if precision != "fp32" and not bool(torch.isfinite(out).all()):
            log.warning("the model output is non-finite in %s: the prediction is redone in fp32", precision)
            out = self.make_score_model(T.ClassificationTarget(), x, monitor, precision="fp32").model_output(x)
        return out

    def _padded(self, x: torch.Tensor, monitor: EvaluationMonitor | None = None) -> torch.Tensor | None:
        """The output with the smallest 2**k padding the network accepts (``divisible_by: auto``), or None."""
        auto = self.execution is None or self.execution.divisible_by == "auto"
        if not auto or self._divisible > 1 or self.form_for(x).sliding is not None:
            return None
        for k in range(1, 6):
            self._divisible = 2 ** k
            try:
                self._raw(padding_search_input(x), monitor)  # a crop with the same remainders
                out = self._raw(x, monitor)  # then the whole input (a fixed-size network may refuse it)
            except (Cancelled, MethodTimeout):
                raise
            except Exception as exc:
                if _is_oom(exc):
                    break
                continue
            log.info("the model needs sizes divisible by %d: inputs are padded and maps cropped back",
                     self._divisible)
            return out
        self._divisible = 1
        return None

    def predict(self, volume: Volume) -> np.ndarray:
        """Predicted labels in NIfTI order (argmax, or > 0 logit for one channel)."""
        out = self.raw_output(self.prepare_input(volume))
        if out.dim() < 3:
            raise TargetError("the model output has no spatial grid (a classifier?)",
                              "use target kind 'classification'")
        labels = T.channel_argmax(out) if out.shape[1] > 1 else (out[:, 0] > 0).long()
        return self.geometry(volume).to_nifti(labels[0].cpu().numpy().astype(np.uint8))

    def expand_target(self, target: T.Target, output: torch.Tensor, volume: Volume) -> T.Target:
        """The prepared target, split into one score per structure with ``target.components``."""
        if not self.target.components:
            return target
        from esegeta_engine.regions import expand_components

        return expand_components(target, output, self.target.classes, min_voxels=self.target.min_voxels,
                                 max_components=self.target.max_components, geometry=self.geometry(volume),
                                 affine=volume.affine)

    def check_classes(self, target: T.Target, output: torch.Tensor) -> list[int]:
        """The classes to explain (configured or the target's default), checked."""
        if callable(getattr(target, "describe", None)):  # components: the columns are the structures
            return target.default_classes(output)
        classes = self.target.classes or target.default_classes(output)
        n = target.n_scores(output)
        bad = [c for c in classes if not 0 <= c < n]
        if bad:
            raise TargetError(f"target.classes {bad} do not exist: the target has {n} scores",
                              f"use classes in 0..{n - 1}")
        return list(classes)

    def job_context(self, volumes: Sequence[Volume], group: tuple[int, ...],
                    roi_mask: np.ndarray | None = None) -> dict[str, Any]:
        """What every job's key depends on besides the method (see :func:`jobs.plan.key_context`)."""
        roi = roi_mask if self.target.kind in ("roi", "outcome") else None  # the mask or labels by content
        return key_context(self.target.model_dump(mode="json"), self.preprocess.model_dump(mode="json"),
                           None if self.execution is None else self.execution.model_dump(mode="json"),
                           self.output, self.seed, self.model_key,
                           [array_fingerprint(volumes[i].data) for i in group],
                           None if roi is None else array_fingerprint(np.asarray(roi)))

    def plan(self, methods: Sequence[MethodConfig], target: T.Target, output: torch.Tensor,
             volumes: tuple[int, ...], x: torch.Tensor | None = None,
             context: dict[str, Any] | None = None) -> list[Job]:
        """Expand methods x layers x classes into keyed jobs with expected evaluations."""
        classes = self.check_classes(target, output)
        shape = tuple(x.shape) if x is not None else (len(volumes), self.preprocess.in_channels,
                                                      *tuple(output.shape[2:]))
        patchwise = x is not None and self.form_for(x).sliding is not None
        info = CostInfo(shape[0], shape[1], tuple(shape[2:]), 1, patchwise)
        jobs = plan_jobs(methods, classes, target.class_label, target.kind, volumes, info=info,
                         context=context or {}, layer_channels=self._layer_channels,
                         layer_per_member=self._layer_per_member)
        calls = getattr(self.model, "network_calls", None)  # a deployed pipeline's cost (nnU-Net, bundle)
        if callable(calls) and x is not None:
            count_network_evaluations(jobs, int(calls(x[:1])), info)
        if callable(getattr(target, "describe", None)):  # what each component job explains
            for job in jobs:
                job.details = target.describe(job.cls)
        return jobs

    def _layer_channels(self, name: str) -> int | None:
        """Output channels of layer ``name`` when its type says so (convolutions), else None."""
        channels = getattr(get_layer(self.model, name), "out_channels", None)
        return int(channels) if isinstance(channels, int) else None

    def _layer_per_member(self, name: str) -> bool:
        """Whether layer ``name`` runs once per member of a deployed pipeline (nnU-Net, bundle window)."""
        inside = getattr(self.model, "runs_layer_per_member", None)
        return bool(callable(inside) and inside(get_layer(self.model, name)))

    def estimate(self, volumes: Sequence[Volume], methods: Sequence[MethodConfig],
                 evaluation: Any = None) -> int | None:
        """Expected model evaluations of a run, before it runs (see :func:`jobs.plan.estimate_run`;
        ``evaluation``: the scores' evaluations too)."""
        return estimate_run(self, volumes, methods, evaluation)

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
        evaluation: Any = None,
        executor: Any = None,
        portable: Callable[[Job], Any] | None = None,
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
        evaluation : EvaluationConfig, optional
            The config ``evaluators`` were made from: their scores' evaluations join the
            progress totals (the randomisation phase after the run is not part of these).
        executor, portable : optional
            Who runs the jobs, through ``map(specs) -> outcomes`` (default inline: here, events
            streaming); an executor that is not ``local`` gets ``portable(job)`` (a ``JobSpec``) and
            its outcomes become events (see :func:`esegeta_engine.jobs.executors.run_jobs`).
        """
        cancel = cancel or threading.Event()
        monitor = EvaluationMonitor(cancel)
        groups = volume_groups([v.data.shape for v in volumes], methods)
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
        in_job = None if evaluation is None else evaluation.model_copy(update={"randomisation": None})
        state = RunState(self.estimate(volumes, methods, in_job))
        expected = partial(job_estimate, in_job, model=self.model)  # a job's count in that estimate

        done = 0
        jobs_here = JobExecutor(self)
        runner = executor if executor is not None else InlineExecutor(cancel)
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
                try:
                    out = self.raw_output(x, cancel)  # under the time limit, cancellable
                except Cancelled:
                    return
                target.prepare(out)
                target = self.expand_target(target, out, volumes[group[0]])
                jobs = self.plan(group_methods, target, out, group, x, self.job_context(volumes, group, roi_mask))
                per_group[id(group_methods)] = len(jobs)
                total = done + len(jobs) + sum(per_group[id(ms)] for _, ms in groups[gi + 1:])

                def skipped(job: Job) -> Progress | None:  # done by an earlier run (--resume)
                    nonlocal done
                    if skip is None or not skip(job):
                        return None
                    state.skipped(job, expected(job))
                    done += 1
                    return state.progress(done, total, f"{job.label} · {job.cls_label}: already done")

                def run_here(job: Job, x: torch.Tensor, target: T.Target, geometry: Geometry,
                             ) -> Generator[Event, None, None]:  # one job on this model and input
                    nonlocal done
                    if (event := skipped(job)) is not None:
                        yield event
                        return
                    yield state.progress(done, total, f"{job.label} · {job.cls_label}: starting")
                    yield from jobs_here.run(job, x, target, target_support(target, tuple(x.shape[2:]), job.cls),
                                             monitor, done, total, evaluators, threaded, on_progress, state, geometry)
                    state.finished(job, state.job_evaluations + state.score_evaluations, expected(job))
                    done += 1

                def finished(job: Job, outcome: JobOutcome) -> Progress:  # a job run elsewhere
                    nonlocal done
                    state.finished(job, outcome.evaluations + score_evaluations(outcome.metrics), expected(job))
                    done += 1
                    return state.progress(done, total, f"{job.label} · {job.cls_label}: {outcome.status}")

                yield from run_jobs(runner, jobs, partial(run_here, x=x, target=target, geometry=geometry),
                                    skipped, portable, finished, cancel)
                if cancel.is_set():  # (the inline executor starts no job after a cancel)
                    return
                del x, out, target
            yield state.progress(done, done, "finished")
