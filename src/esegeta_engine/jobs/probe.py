"""How long and how much memory a run will take, from one probed patch, before the run starts.

The plan counts model evaluations (:func:`esegeta_engine.jobs.plan.estimate_run`), but an
evaluation's cost is not known until one has run: on a whole-brain scan the first map can take
minutes with no warning. :func:`probe_run` times **one patch** through the network, after one
untimed warm-up call of the same patch: one forward and backward (an evaluation's unit) and one
forward without gradients (the prediction pass's unit). The patch is the sliding window's patch;
under whole-volume execution it is a centred crop of about :data:`WHOLE_CROP` voxels per axis that
keeps the volume's remainders modulo 32 (:func:`whole_crop`), so it is padded as the volume will be,
and a second, half-edge crop is timed too (after its own warm-up: a shape's first call carries
one-time costs), because a network's time is not proportional to the voxels it sees (the bundled
U-Net: a fixed ≈ 0.4 CPU-s per call plus a per-voxel part, so a 32³ crop costs five times more per
voxel than a whole-brain scan). The two sizes, counted padded, give a line,
``seconds = fixed + per_voxel × voxels``, that the whole volume's call is read from:

* ``seconds`` ≈ prediction pass + expected evaluations × one evaluation, where a sliding-window
  evaluation is patches × (forward + backward of a patch) and a whole-volume one is the line at
  the volume's voxel count. Forward-only methods (occlusion, RISE) cost less per evaluation, so
  for them it is an upper bound;
* ``peak_bytes`` ≈ resident memory now + the patch's working memory (growth of the resident set,
  or of CUDA's allocator on a GPU, while its graph is alive) × patches per batch (whole volume:
  × the voxel ratio, activations grow with the voxels) + the volume's buffers (input, output
  and count maps). A rough figure, for "will it fit", not a measurement.

``tracemalloc`` does not see torch's allocations, so memory is read from the resident set
(``/proc/self/statm``) or ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from esegeta_engine.errors import Cancelled
from esegeta_engine.forward.runner import ExecutionForm, build_runner
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.jobs.probe_cost import CostLine, format_bytes, format_duration, padded_voxels
from esegeta_engine.models import OutputSelector, model_guard

__all__ = ["CostLine", "ProbeEstimate", "format_bytes", "format_duration", "probe_patch", "probe_run",
           "resident_bytes", "whole_crop"]

#: whole-volume execution probes a centred crop of about this many voxels per axis (48 to 79, :func:`whole_crop`)
WHOLE_CROP = 64
#: the largest padding multiple the run's padding search tries (2**5, ``Explainer._padded``)
_SEARCH = 32


@dataclass(frozen=True)
class ProbeEstimate:
    """A run's cost from one probed patch.

    Attributes
    ----------
    patch : tuple of int
        Spatial size of the probed input (model grid).
    patch_seconds : float
        One forward + backward of it.
    patch_bytes : int
        Its working memory (resident-set or CUDA-allocator growth while its graph was alive).
    patches_per_evaluation : float
        Sliding window: the number of patches of one evaluation; whole volume: voxels / probed voxels.
    batch : int
        Patches alive together (the sliding window's ``sw_batch_size``; 1 for the whole volume).
    expected_evaluations : int or None
        The plan's model evaluations (None when a method cannot tell in advance).
    seconds : float or None
        Estimated run time, prediction pass included (None without ``expected_evaluations``).
    peak_bytes : int
        Estimated peak memory of the run.
    probed : int
        Patch sizes timed (1; 2 under whole-volume execution of a volume larger than the crop).
    network_calls : int
        The probe's network calls: for each probed size an untimed warm-up forward + backward (its
        one-time costs: the allocator, the convolution library's kernels for that shape), then a timed
        forward + backward and a timed forward without gradients (3 per size).
    warmup_seconds : float or None
        The first, untimed call of the patch (what the estimate scaled until the second pass of issue 19).
    timed : tuple of tuple of int
        The sizes timed, in the order timed (the patch, then the whole volume's second crop), each after
        its own warm-up call.
    divisible_by : int
        The padding multiple the probe's crop needed (the whole volume needs the same: the crop keeps
        its remainders); sizes are counted padded, as the network sees them.
    forward_seconds : float
        One forward of the patch without gradients (the prediction pass's unit).
    prediction_seconds : float
        The estimated prediction pass over the whole input.
    evaluation_seconds : float
        The estimated forward + backward over the whole input (one model evaluation).
    evaluation_line, prediction_line : CostLine or None
        Whole volume: seconds of one call against voxels, through the probed sizes.
    checkpointing : dict or None
        Whether the timed forward + backward ran with activation checkpointing, as the run's method will
        (:func:`~esegeta_engine.forward.checkpointing.method_checkpointing`; the map record's
        ``execution.checkpointing``); None without methods.
    cpu_seconds : float or None
        The same estimate in CPU seconds of this process (all of torch's threads), from the probe's CPU
        times: what a loaded machine changes least (for benchmarks).
    cancel_wait_seconds : float
        The longest stretch of one evaluation without a cancel check (the network's slowest layer,
        forward or backward), scaled to the run's input as the whole call is: how long a Cancel can
        take (the checks come between the network's modules, :mod:`esegeta_engine.forward.cancel_points`).
    """

    patch: tuple[int, ...]
    patch_seconds: float
    patch_bytes: int
    patches_per_evaluation: float
    batch: int
    expected_evaluations: int | None
    seconds: float | None
    peak_bytes: int
    probed: int = 1
    network_calls: int = 3
    warmup_seconds: float | None = None
    timed: tuple[tuple[int, ...], ...] = ()
    divisible_by: int = 1
    forward_seconds: float = 0.0
    prediction_seconds: float = 0.0
    evaluation_seconds: float = 0.0
    evaluation_line: CostLine | None = None
    prediction_line: CostLine | None = None
    cancel_wait_seconds: float = 0.0
    cpu_seconds: float | None = None
    checkpointing: dict[str, Any] | None = None

    def text(self) -> str:
        """``≈ 7 min 40 s and ≈ 2.3 GB peak (prediction ≈ 9 s + 2 evaluations × ≈ 3 min 45 s; one …)``."""
        when = f"≈ {format_duration(self.seconds)}" if self.seconds is not None else "time unknown"
        patch = "×".join(str(p) for p in self.patch)
        n = self.expected_evaluations or "?"

        def short(s: float) -> str:
            return f"{s:.1f} s" if s < 10 else format_duration(s)

        return (f"{when} and ≈ {format_bytes(self.peak_bytes)} peak (prediction ≈ {short(self.prediction_seconds)}"
                f" + {n} evaluation{'' if n == 1 else 's'} × ≈ {short(self.evaluation_seconds)}; "
                f"one {patch} patch: {self.patch_seconds:.2f} s "
                f"forward+backward, {self.forward_seconds:.2f} s forward, {format_bytes(self.patch_bytes)}; "
                f"{self.patches_per_evaluation:.3g} patches per evaluation"
                f"{'; activation checkpointing on' if (self.checkpointing or {}).get('used') else ''})")


def resident_bytes() -> int:
    """This process's resident set size (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centred ``size`` crop of ``x`` (zero-padded where ``x`` is smaller)."""
    spatial = x.shape[2:]
    sl = tuple(slice(max((s - p) // 2, 0), max((s - p) // 2, 0) + p) for s, p in zip(spatial, size))
    out = x[(slice(None), slice(None), *sl)]
    pad: list[int] = []
    for s, p in zip(reversed(out.shape[2:]), reversed(tuple(size))):
        pad.extend([0, max(p - s, 0)])
    return torch.nn.functional.pad(out, pad) if any(pad) else out


def probe_patch(model: torch.nn.Module, x: torch.Tensor, *, output: int | str | None = None,
                divisible_by: int = 1, precision: str = "fp32",
                cancel: threading.Event | None = None) -> tuple[float, int]:
    """Time one forward + backward of ``x`` (one patch) through ``model``; returns (seconds, bytes).

    The model is left as it was (:func:`~esegeta_engine.models.model_guard`). The network is
    called exactly twice on the patch: the first call warms torch up and is not timed (on a fresh
    process it ran long and the estimate erred long), the second is timed; the memory is the larger
    growth of the two. ``cancel`` stops it between the network's modules (``Cancelled``).
    """
    timed = _calls(model, x, output=output, divisible_by=divisible_by, precision=precision, cancel=cancel,
                   warm=True, forward=False)
    return timed.backward, timed.used


@dataclass(frozen=True)
class _Timed:
    warmup: float | None
    backward: float  # forward + backward
    forward: float  # forward without gradients (0 when not timed)
    used: int
    longest_step: float = 0.0  # longest time between two cancel checks in the timed forward + backward
    cpu: tuple[float, float] = (0.0, 0.0)  # CPU seconds of the timed forward + backward and forward


class _CheckGaps:
    """The monitor's check, timing the intervals between its calls (the network's cancel points)."""

    def __init__(self, check: Any) -> None:
        self.check, self.last, self.longest = check, time.perf_counter(), 0.0

    def restart(self) -> None:
        self.last, self.longest = time.perf_counter(), 0.0

    def __call__(self) -> None:
        now = time.perf_counter()
        self.longest, self.last = max(self.longest, now - self.last), now
        self.check()


def _calls(model: torch.nn.Module, x: torch.Tensor, *, output: int | str | None, divisible_by: int,
           precision: str, cancel: threading.Event | None, warm: bool, forward: bool) -> _Timed:
    """Time ``x`` through ``model``: an untimed warm-up (``warm``), a forward + backward and (``forward``)
    a forward without gradients, as the prediction pass runs it."""
    device = x.device
    monitor = EvaluationMonitor(cancel)
    monitor.check()
    gaps = monitor.check = _CheckGaps(monitor.check)  # type: ignore[method-assign]
    runner = build_runner(OutputSelector(model, output), ExecutionForm(divisible_by=divisible_by,
                                                                       precision=precision), monitor)
    cuda = device.type == "cuda"
    inp = x.detach().clone().requires_grad_(True)
    times, used = [], 0

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    with model_guard(model), torch.enable_grad():
        for _ in range(2 if warm else 1):  # the first call warms torch up (allocator, kernels, threads): not timed
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            else:
                before = resident_bytes()
            start, cpu = time.perf_counter(), time.process_time()
            gaps.restart()
            out = runner(inp)
            grown = resident_bytes() - before if not cuda else 0  # the graph is alive here
            # the gradient of the input only, as attribution methods take it: no parameter's .grad changes
            torch.autograd.grad(out.float().sum(), inp)
            del out
            sync()
            times.append(time.perf_counter() - start)
            cpu_backward = time.process_time() - cpu
            longest = max(gaps.longest, time.perf_counter() - gaps.last)  # the backward's tail after its last check
            # memory from either call (the cold first one grows the resident set most)
            used = max(used, torch.cuda.max_memory_allocated(device) - before if cuda
                       else max(grown, resident_bytes() - before))
        plain = cpu_plain = 0.0
        if forward:
            with torch.no_grad():
                start, cpu = time.perf_counter(), time.process_time()
                runner(inp.detach())
                sync()
                plain, cpu_plain = time.perf_counter() - start, time.process_time() - cpu
    return _Timed(times[0] if warm else None, times[-1], plain, max(int(used), 0), longest, (cpu_backward, cpu_plain))


def whole_crop(spatial: Sequence[int]) -> tuple[int, ...]:
    """The whole-volume probe's crop: an axis of at most ``WHOLE_CROP + 15`` voxels whole, a longer one cut
    to 48–79 voxels keeping its size modulo 32. Padded to any 2**k ≤ 32, the crop then keeps the volume's
    remainders: it fails or works as the volume would, and is padded as the volume will be (a 64³ crop of a
    197×233×189 volume needed no padding where the volume needs 200×236×192)."""
    low = WHOLE_CROP - _SEARCH // 2
    return tuple(int(s) if s < low + _SEARCH else low + (int(s) - low) % _SEARCH for s in spatial)


def _half(patch: Sequence[int], divisible: int) -> tuple[int, ...]:
    """The smaller crop of the whole-volume probe: half the edge, kept a multiple of ``divisible``."""
    return tuple(max(p // 2 // divisible * divisible, min(p, divisible)) for p in patch)


def probe_run(explainer: Any, volume: Any, methods: Sequence[Any], x: torch.Tensor | None = None, *,
              cancel: threading.Event | None = None) -> ProbeEstimate:
    """Estimate a run of ``methods`` on ``volume`` from one probed patch (and, for a whole volume larger
    than the crop, a half-edge crop).

    Parameters
    ----------
    explainer : Explainer
        The run's explainer (model, preprocessing, target, execution).
    volume : Volume
        The input (NIfTI order).
    methods : sequence of MethodConfig
        The run's methods (for the plan's expected evaluations).
    x : torch.Tensor, optional
        The prepared model input, if already made (``explainer.prepare_input(volume)``).
    cancel : threading.Event, optional
        The run's Cancel: it stops the probe too (raises ``Cancelled``).
    """
    if x is None:
        x = explainer.prepare_input(volume)
    spatial = tuple(int(s) for s in x.shape[2:])
    form = explainer.form_for(x)
    voxels = math.prod(spatial)
    if form.sliding is not None:
        from esegeta_engine.forward.sliding import WindowGrid

        settings = form.sliding
        patch = tuple(int(p) for p in settings.patch_size)
        per_evaluation = float(len(WindowGrid(spatial, settings, torch.device("cpu"))))
        batch = int(settings.sw_batch_size)
    else:
        patch = whole_crop(spatial)
        batch = 1
    divisible = max(form.divisible_by, 1)

    def timed(size: tuple[int, ...], warm: bool) -> _Timed:
        return _calls(explainer.model, _crop(x, size), output=explainer.output, divisible_by=divisible,
                      precision=form.precision, cancel=cancel, warm=warm, forward=True)

    with _as_the_run(explainer, methods) as use:  # checkpointed where the run's method will be
        while True:  # a U-Net may need the crop padded to 2**k, as the whole-volume run finds out
            try:
                big = timed(patch, warm=True)
                break
            except Cancelled:
                raise
            except Exception:
                if form.sliding is not None or divisible >= 32:
                    raise
                divisible *= 2
        sizes, lines, cpu_lines = [patch], None, None
        if form.sliding is None:  # sizes as the network sees them: padded to the multiple the crop needed
            voxels = padded_voxels(spatial, divisible)
            per_evaluation = voxels / padded_voxels(patch, divisible)
            timed_sizes = [(padded_voxels(patch, divisible), big)]
            small = _half(patch, divisible)
            if voxels > timed_sizes[0][0] and small != patch:  # a second size: the time is not proportional
                # warmed too: a shape's first call carries one-time costs (+0.09 s of 0.27 s at 32³ on the
                # bundled U-Net), which flattened the line and put a whole brain at 0.85× its CPU time
                timed_sizes.append((padded_voxels(small, divisible), timed(small, warm=True)))
                sizes.append(small)
    calls = 3 * len(sizes)
    if form.sliding is not None:
        evaluation, prediction = per_evaluation * big.backward, per_evaluation * big.forward
        cpu_evaluation, cpu_prediction = per_evaluation * big.cpu[0], per_evaluation * big.cpu[1]
    else:
        lines = (CostLine.through([(v, t.backward) for v, t in timed_sizes]),
                 CostLine.through([(v, t.forward) for v, t in timed_sizes]))
        cpu_lines = (CostLine.through([(v, t.cpu[0]) for v, t in timed_sizes]),
                     CostLine.through([(v, t.cpu[1]) for v, t in timed_sizes]))
        evaluation, prediction = lines[0].at(voxels), lines[1].at(voxels)
        cpu_evaluation, cpu_prediction = cpu_lines[0].at(voxels), cpu_lines[1].at(voxels)
    scale = batch if form.sliding is not None else evaluation / max(big.backward, 1e-9)
    expected = explainer.estimate([volume], list(methods))
    total = None if expected is None else prediction + expected * evaluation
    cpu_total = None if expected is None else cpu_prediction + expected * cpu_evaluation
    channels = int(x.shape[1])
    buffers = voxels * 4 * (3 * channels + 6)  # input, its gradient, output and count maps (rough)
    alive = big.used * (batch if form.sliding is not None else per_evaluation)
    return ProbeEstimate(patch=patch, patch_seconds=big.backward, patch_bytes=big.used,
                         patches_per_evaluation=per_evaluation, batch=batch, expected_evaluations=expected,
                         seconds=total, peak_bytes=int(resident_bytes() + alive + buffers),
                         probed=len(sizes), network_calls=calls, warmup_seconds=big.warmup, timed=tuple(sizes),
                         divisible_by=divisible,
                         forward_seconds=big.forward, prediction_seconds=prediction, evaluation_seconds=evaluation,
                         evaluation_line=None if lines is None else lines[0],
                         prediction_line=None if lines is None else lines[1],
                         cancel_wait_seconds=min(big.longest_step, big.backward) * scale, cpu_seconds=cpu_total,
                         checkpointing=None if use is None else use.describe())


@contextlib.contextmanager
def _as_the_run(explainer: Any, methods: Sequence[Any]) -> Iterator[Any]:
    """Activation checkpointing as the run's first method will have it (``execution.checkpointing``), for the
    probe's timed calls; yields its :class:`~esegeta_engine.forward.checkpointing.CheckpointUse` (None
    without methods). The model's blocks are restored on leaving, also after an error."""
    if not methods:
        yield None
        return
    from esegeta_engine.forward.checkpointing import method_checkpointing
    from esegeta_engine.methods.registry import get_method

    setting = explainer.execution.checkpointing if explainer.execution is not None else "auto"
    with method_checkpointing(get_method(methods[0].name), explainer.model, setting) as use:
        yield use
