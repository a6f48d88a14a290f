"""How long and how much memory a run will take, from one probed patch, before the run starts.

The plan counts model evaluations (:func:`esegeta_engine.jobs.plan.estimate_run`), but an
evaluation's cost is not known until one has run: on a whole-brain scan the first map can take
minutes with no warning. :func:`probe_run` times **one forward and one backward pass of one
patch** through the network, after one untimed warm-up call of the same patch (the sliding
window's patch; under whole-volume execution a crop of at most :data:`WHOLE_CROP` voxels per
axis, scaled by the voxel ratio) and scales it by the plan:

* ``seconds`` ≈ expected evaluations × patches per evaluation × (forward + backward of a patch).
  Forward-only methods (occlusion, RISE) cost less per patch, so for them it is an upper bound;
* ``peak_bytes`` ≈ resident memory now + the patch's working memory (growth of the resident set,
  or of CUDA's allocator on a GPU, while its graph is alive) × patches per batch + the volume's
  buffers (input, output and count maps). A rough figure, for "will it fit", not a measurement.

``tracemalloc`` does not see torch's allocations, so memory is read from the resident set
(``/proc/self/statm``) or ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from esegeta_engine.errors import Cancelled
from esegeta_engine.forward.runner import ExecutionForm, build_runner
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.models import OutputSelector, model_guard

#: whole-volume execution probes a centred crop of at most this many voxels per axis
WHOLE_CROP = 64


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
        Estimated run time (None without ``expected_evaluations``).
    peak_bytes : int
        Estimated peak memory of the run.
    probed : int
        Patches evaluated by the probe (always 1).
    network_calls : int
        The probe's network calls (2: one warm-up, not timed, and the timed one).
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
    network_calls: int = 2

    def text(self) -> str:
        """``≈ 7 min 40 s and ≈ 2.3 GB (one 96×96×96 patch: 0.41 s forward+backward, 180 MB)``."""
        when = f"≈ {format_duration(self.seconds)}" if self.seconds is not None else "time unknown"
        patch = "×".join(str(p) for p in self.patch)
        return (f"{when} and ≈ {format_bytes(self.peak_bytes)} peak (one {patch} patch: "
                f"{self.patch_seconds:.2f} s forward+backward, {format_bytes(self.patch_bytes)}; "
                f"{self.patches_per_evaluation:.3g} patches per evaluation × {self.expected_evaluations or '?'} evaluations)")


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def format_bytes(n: float) -> str:
    """``512 MB``, ``2.3 GB``."""
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{max(n, 0) / 2**20:.0f} MB"


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
    device = x.device
    monitor = EvaluationMonitor(cancel)
    monitor.check()
    runner = build_runner(OutputSelector(model, output), ExecutionForm(divisible_by=divisible_by,
                                                                       precision=precision), monitor)
    cuda = device.type == "cuda"
    inp = x.detach().clone().requires_grad_(True)
    times, used = [], 0
    with model_guard(model), torch.enable_grad():
        for _ in range(2):  # the first call warms torch up (allocator, kernel choice, thread pool): not timed
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            else:
                before = resident_bytes()
            start = time.perf_counter()
            out = runner(inp)
            grown = resident_bytes() - before if not cuda else 0  # the graph is alive here
            # the gradient of the input only, as attribution methods take it: no parameter's .grad changes
            torch.autograd.grad(out.float().sum(), inp)
            del out
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            # memory from either call (the cold first one grows the resident set most)
            used = max(used, torch.cuda.max_memory_allocated(device) - before if cuda
                       else max(grown, resident_bytes() - before))
    probe_patch.warmup_seconds = times[0]  # type: ignore[attr-defined]  # for benchmarks/bench_probe_estimate.py
    return times[1], max(int(used), 0)


def probe_run(explainer: Any, volume: Any, methods: Sequence[Any], x: torch.Tensor | None = None, *,
              cancel: threading.Event | None = None) -> ProbeEstimate:
    """Estimate a run of ``methods`` on ``volume`` from one probed patch (two network calls, the second timed).

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
        patch = tuple(min(s, WHOLE_CROP) for s in spatial)
        per_evaluation = voxels / math.prod(patch)
        batch = 1
    crop = _crop(x, patch)
    divisible = max(form.divisible_by, 1)
    while True:  # a U-Net may need the crop padded to 2**k, as the whole-volume run finds out
        try:
            seconds, used = probe_patch(explainer.model, crop, output=explainer.output,
                                        divisible_by=divisible, precision=form.precision, cancel=cancel)
            break
        except Cancelled:
            raise
        except Exception:
            if form.sliding is not None or divisible >= 32:
                raise
            divisible *= 2
    expected = explainer.estimate([volume], list(methods))
    total = None if expected is None else expected * per_evaluation * seconds
    channels = int(x.shape[1])
    buffers = voxels * 4 * (3 * channels + 6)  # input, its gradient, output and count maps (rough)
    alive = used * (batch if form.sliding is not None else per_evaluation)
    return ProbeEstimate(patch=patch, patch_seconds=seconds, patch_bytes=used, patches_per_evaluation=per_evaluation,
                         batch=batch, expected_evaluations=expected, seconds=total,
                         peak_bytes=int(resident_bytes() + alive + buffers))
