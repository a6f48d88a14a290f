"""One forward pass, k backward passes: gradient maps of every component at once.

Explaining k components (:class:`~esegeta_engine.regions.ComponentsTarget`) with a pure
gradient method as k separate jobs runs the network forward k times. The gradients of all
k component scores share one forward pass: whole-volume, one graph and k backward passes;
sliding-window, one stitched forward without a graph, then per patch batch one recomputation
with a graph and k backward passes through it (the upstream gradient of each component is
blended into the patch exactly as :class:`~esegeta_engine.forward.sliding._PatchwiseFunction`
does, so each map equals its separate job's map).

:func:`shared_component_map` is called by the executor for each component job: the first job
of a (method, parameters) group computes every component's map, the others read theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from esegeta_engine.forward.sliding import SlidingWindow
from esegeta_engine.forward.scoring import ScoreModel

# pure gradient methods whose map is a function of (input, gradient) only
SHARED = {"saliency": lambda x, g, p: g.abs() if p.get("abs", True) else g,
          "input_x_gradient": lambda x, g, p: x * g}

__all__ = ["SHARED", "column_gradients", "shared_component_map"]


def column_gradients(score_model: ScoreModel, x: torch.Tensor, columns: Sequence[int]) -> list[torch.Tensor]:
    """Gradients of the target's ``columns`` (each summed over the batch) w.r.t. ``x``, one forward."""
    runner = score_model.runner
    target = score_model.target
    if isinstance(runner, SlidingWindow):
        return _patchwise(score_model, runner, x, columns)
    xr = x.detach().requires_grad_(True)
    score_model.monitor.check()
    out = runner(xr)
    score_model.monitor.evaluated(x.shape[0])
    scores = target(out)
    grads = []
    for i, j in enumerate(columns):
        (g,) = torch.autograd.grad(scores[:, j].sum(), xr, retain_graph=i < len(columns) - 1)
        grads.append(g)
    return grads


def _patchwise(score_model: ScoreModel, sw: SlidingWindow, x: torch.Tensor,
               columns: Sequence[int]) -> list[torch.Tensor]:
    grid = sw.grid(x.shape[2:], x.device)
    score_model.monitor.check()
    with torch.no_grad():
        y0 = sw._stitch(x.detach(), grid)  # one stitched forward, no graph
    score_model.monitor.evaluated(x.shape[0])
    yr = y0.detach().requires_grad_(True)
    scores = score_model.target(yr)
    ups = []
    for i, j in enumerate(columns):  # upstream gradient of each column: the target only, no network
        (u,) = torch.autograd.grad(scores[:, j].sum(), yr, retain_graph=i < len(columns) - 1)
        full = torch.zeros((x.shape[0], u.shape[1], *grid.padded), device=x.device)
        full[(slice(None), slice(None), *(slice(o, o + s) for o, s in zip(grid.offset, grid.spatial)))] = u
        ups.append(full / grid.count)
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        xp = grid.pad_input(xr)
        xp_d = xp.detach()
        gpads = [torch.zeros_like(xp_d) for _ in columns]
        items = [(b, p) for b in range(x.shape[0]) for p in sw.active_patches(grid)]
        bs = sw.settings.sw_batch_size
        for i in range(0, len(items), bs):
            chunk = items[i:i + bs]
            patch = torch.cat([xp_d[(slice(b, b + 1), slice(None), *grid.slices[p])] for b, p in chunk])
            patch.requires_grad_(True)
            y = sw._run_chunk(patch, True)  # one recomputation per patch batch ...
            shares = [torch.cat([up[(slice(b, b + 1), slice(None), *grid.slices[p])] for b, p in chunk])
                      for up in ups]
            touched = [k for k, share in enumerate(shares) if bool(share.any())]
            for n, k in enumerate(touched):  # ... and one backward per component whose scores it reaches
                (g,) = torch.autograd.grad(y, patch, shares[k] * grid.weight, retain_graph=n < len(touched) - 1)
                for (b, p), gi in zip(chunk, g):
                    gpads[k][(b, slice(None), *grid.slices[p])] += gi
            del y, patch
        out = []
        for gpad in gpads:
            (gx,) = torch.autograd.grad(xp, xr, gpad, retain_graph=True) if xp is not xr else (gpad,)
            out.append(gx.detach().to(x.dtype))
    return out


def shared_component_map(job: Any, target: Any, score_model: ScoreModel, x: torch.Tensor,
                         notes: list[str]) -> torch.Tensor | None:
    """The map of ``job`` from one shared forward over all component columns, or ``None``.

    ``None`` unless ``target`` is a components target with more than one column and the job is
    a pure gradient method without a layer or noise tunnel. Maps are cached on the target per
    (method, parameters), so later component jobs make no model evaluation.
    """
    if (job.spec.name not in SHARED or job.layer or job.noise_tunnel or not hasattr(target, "components")
            or len(target.components) < 2):
        return None
    cache: dict[str, Any] = target.__dict__.setdefault("_shared_maps", {})
    key = (job.spec.name, tuple(sorted((k, repr(v)) for k, v in job.params.items())), tuple(x.shape))
    # each job works on its own copy of the input: the cache holds the input it was made for
    if cache.get("key") != key or not torch.equal(cache["x"], x):
        columns = list(range(len(target.components)))
        runner = score_model.runner
        saved = getattr(runner, "support", None)
        if isinstance(runner, SlidingWindow):  # every component's patches, not only this job's
            runner.support = target.support(None).to(x.device)
        try:
            grads = column_gradients(score_model, x, columns)
        finally:
            if isinstance(runner, SlidingWindow):
                runner.support = saved
        fn = SHARED[job.spec.name]
        cache.clear()  # one group's maps at a time
        cache.update(key=key, x=x.detach().clone(),
                     maps={j: fn(x.detach(), g, job.params).detach() for j, g in zip(columns, grads)})
        notes.append(f"one shared forward pass for {len(columns)} components")
    else:
        notes.append("map from the shared forward pass of the first component")
    return cache["maps"][job.cls]
