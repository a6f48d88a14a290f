"""The executor: one planned job on the model's device -> its events.

:class:`JobExecutor` runs the jobs of one :class:`~esegeta_engine.explain.Explainer` (the model,
its preprocessing and execution form, reached through the explainer's public methods): it builds
the job's score model with the one factory, refuses methods that cannot run in the execution
form (hook-based methods under sliding windows), runs the method (in a worker thread for GUIs
or in the caller's thread), redoes a non-finite reduced-precision map in fp32, computes the
per-map metrics and brings maps back to the scan's voxel grid.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from esegeta_engine import targets as T
from esegeta_engine.advice import precision_clash
from esegeta_engine.channel_target import LayerChannelTarget
from esegeta_engine.errors import Cancelled, EsegetaError, MethodError, MethodTimeout, error_reason
from esegeta_engine.jobs.build import _is_oom, memory_error
from esegeta_engine.jobs.events import Event, Evaluator, JobFailed, MapReady, Progress, RunState, _of, score_evaluations
from esegeta_engine.jobs.plan import Job
from esegeta_engine.jobs.refusal import refusal
from esegeta_engine.methods import MethodContext, attribute
from esegeta_engine.methods.behaviour import patchwise_mode
from esegeta_engine.models import get_layer, is_torchscript
from esegeta_engine.preprocess import Geometry
from esegeta_engine.forward.checkpointing import method_checkpointing
from esegeta_engine.forward.scoring import EvaluationMonitor, ScoreModel
from esegeta_engine.shared_gradients import shared_component_map
from esegeta_engine.timebudget import job_refusal
from esegeta_engine.watchdog import Abandoned, watch

if TYPE_CHECKING:  # pragma: no cover
    from esegeta_engine.explain import Explainer

log = logging.getLogger("esegeta_engine")


class JobExecutor:
    """Runs planned jobs of one explainer, one at a time, each on its own copy of the input.

    Parameters
    ----------
    explainer : Explainer
        The model session: model, seed, time limit, preprocessing, score-model factory.
    """

    def __init__(self, explainer: Explainer) -> None:
        self.explainer = explainer

    def run(self, job: Job, x: torch.Tensor, target: T.Target, support: torch.Tensor | None,
                 monitor: EvaluationMonitor, done: int, total: int, evaluators: Sequence[Evaluator] = (),
                 threaded: bool = True, on_progress: Callable[[Progress], None] | None = None,
                 state: RunState | None = None, geometry: Geometry | None = None,
                 ) -> Generator[Event, None, None]:
        """Execute one job on the model's device, yielding its events.

        The job works on its own copy of ``x`` (no gradient flag, no graph): whatever a
        failing method did to its input (``requires_grad_``, in-place edits) cannot reach
        the next job.
        """
        ex = self.explainer
        x = x.detach().clone()
        state = state or RunState(None)
        monitor = monitor.for_job()  # an abandoned job keeps its own (aborted) monitor
        refused = job_refusal(ex, job, x, target, support)
        if refused is not None:  # its expected cost cannot fit in the time limit
            log.warning("%s · %s: %s", job.label, job.cls_label, refused)
            yield JobFailed(job, "timeout", refused, 0.0, 0)
            return
        holder: dict[str, Any] = {"notes": []}
        precision = ex.form_for(x).precision

        def attempt(prec: str) -> tuple[torch.Tensor, MethodContext, ScoreModel]:
            score_model = ex.make_score_model(target, x, monitor, support=support, precision=prec)
            ctx = MethodContext(
                score_model=score_model, inputs=x, target=job.cls, seed=ex.seed,
                layer=get_layer(ex.model, job.layer) if job.layer else None, layer_name=job.layer,
                torchscript=is_torchscript(ex.model),
                extra={"patchwise": score_model.patchwise, "notes": holder["notes"]},
            )
            refused = refusal(job.spec, "channel" if isinstance(target, LayerChannelTarget) else "",
                              score_model.patchwise)  # front ends check the same rule before a run
            if refused is not None:
                raise refused
            setting = ex.execution.checkpointing if ex.execution is not None else "auto"
            with method_checkpointing(job.spec, ex.model, setting) as holder["checkpointing"]:
                shared = shared_component_map(job, target, score_model, x, holder["notes"])
                if shared is not None:  # k components: one forward pass, k backward passes
                    return shared, ctx, score_model
                mode = patchwise_mode(job.spec.patchwise)
                around = mode.around(score_model.runner, x) if score_model.patchwise else contextlib.nullcontext()
                with around:
                    return attribute(job.spec, ctx, job.params, job.noise_tunnel), ctx, score_model

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
                        raise memory_error(tuple(x.shape), ex.form_for(x)) from None
                    clash = precision_clash(exc, precision)  # a dtype clash names the precision
                    if clash is not None:
                        raise clash from None
                    raise
                if precision != "fp32" and not bool(torch.isfinite(result).all()):
                    holder["notes"].append(f"map turned non-finite in {precision}: redone in fp32")
                    log.warning("%s · %s: non-finite map in %s, redoing in fp32", job.label, job.cls_label,
                                precision)
                    monitor.start(ex.timeout_s)
                    result, ctx, sm = attempt("fp32")
                    holder["precision"] = "fp32"
                holder["result"] = result
                holder["notes"].extend(n for n in sm.notes if n not in holder["notes"])
                holder["evaluations"] = monitor.count
                holder["samples"] = monitor.samples
                holder["patches"] = monitor.patches
                holder["form"] = sm.form.describe()
                pipe = getattr(ex.model, "describe_execution", None)  # a deployed pipeline's window and calls
                if callable(pipe):  # read now: the method's own network calls, before any trust check runs
                    holder["form"].update(pipe())
                holder["form"]["checkpointing"] = holder["checkpointing"].describe()  # forward.checkpointing
                if ctx.extra.get("receptive_field"):  # what receptive-field skipping saved (methods/reach.py)
                    holder["form"]["receptive_field"] = ctx.extra["receptive_field"]
            except Exception as exc:  # recorded; KeyboardInterrupt propagates
                holder["error"] = exc
                return
            try:
                holder["metrics"] = self._evaluate(evaluators, job, ctx, holder["result"], monitor)
            except Exception as exc:  # cancelled while evaluating: the map itself is kept
                holder["metrics_error"] = exc

        monitor.start(ex.timeout_s)
        start = time.perf_counter()
        if not threaded:  # progress through the callback only (called from the model thread)
            def report(n: int) -> None:
                if on_progress is not None:
                    on_progress(state.progress(done, total, f"{job.label} · {job.cls_label}: {n} model "
                                               f"evaluations{_of(job)}", n))

            monitor.on_evaluation = report
        # the job runs on the model thread under a watchdog: the time limit holds even for a
        # forward pass that never returns (the job is then abandoned; see esegeta_engine.watchdog)
        last = -1
        try:
            for _ in watch(work, abort=monitor.abort, timeout_s=ex.timeout_s,
                           what=f"{job.label} · {job.cls_label}"):
                if threaded and monitor.count != last:
                    last = monitor.count
                    yield state.progress(done, total, f"{job.label} · {job.cls_label}: {last} model "
                                         f"evaluations{_of(job)}", last)
        except Abandoned as exc:
            holder["error"] = exc
        finally:
            monitor.on_evaluation = None
        seconds = time.perf_counter() - start
        # the method's own evaluations (trust checks after it are not part of the job's count)
        state.job_evaluations = holder.get("evaluations", monitor.count)
        state.score_evaluations = score_evaluations(holder.get("metrics") or [])
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
                own = holder.get("evaluations", monitor.count)  # the count the record and the tables show
                checks = monitor.count - own  # the trust checks' own forward passes, said apart
                log.info("%s · %s: done in %.2f s, %d model evaluations%s", job.label, job.cls_label,
                         seconds, own, f" (+{checks} for its checks)" if checks > 0 else "")
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
        geometry = geometry or Geometry(self.explainer.preprocess.axis_order)
        maps = []
        for i in range(result.shape[0]):
            r = result[i].cpu().numpy()
            # input-grid maps share one map over the input channels; optimised volumes keep theirs
            volume = job.spec.output_grid == "volume" and r.shape[0] > 1
            arr = r.sum(0) if (r.shape[0] in (x.shape[1], 1) and not volume) else np.moveaxis(r, 0, -1)
            maps.append(geometry.to_nifti(arr).astype(np.float32))
        return maps


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
