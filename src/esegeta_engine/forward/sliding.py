"""Sliding-window execution: explain the function the user deploys on real volumes.

A real TOF-MRA volume (~448×448×128) is segmented by sliding-window inference:
overlapping patches of the training size, each output weighted by an importance
map (Gaussian or constant) and the sum divided by the summed weights, exactly as
MONAI's ``sliding_window_inference``. :class:`SlidingWindow` is that function, with
three properties the attribution methods need:

- **Same numbers as MONAI.** Patches come from MONAI's ``dense_patch_slices`` and
  weights from ``compute_importance_map`` with MONAI's padding and scan interval
  (a test compares the outputs).
- **Memory-bounded gradients.** Under autograd the stitched output is produced by
  :class:`_PatchwiseFunction`: the forward runs without a graph, and the backward
  recomputes one patch batch at a time with gradients, back-propagating that batch's
  blended share of the upstream gradient. Only one patch batch's graph is alive at a
  time; the result equals autograd through the whole function. Module hooks fire again
  during the recomputation, so rule-based methods (guided, DeepLIFT, LRP, excitation,
  layer methods via ``on_backward_chunk``: :mod:`.patch_layer`) run patch-wise exactly.
- **Perturbations recompute only what they touch.** Without gradients, inputs that
  differ from the unperturbed input in a few patches reuse the cached unperturbed
  patch outputs and recompute only the changed patches, batched across perturbed
  copies (``patchwise="perturbation"`` methods: occlusion, ablation, sampling).

Patches whose output the target never reads (outside an ROI or voxel target's
support) are skipped altogether (``support``).

**The prediction's output is reused.** The last full stitched output computed without
gradients (the prediction every run starts with) is remembered with a digest of its input
(BLAKE2b of its bytes, not a copy of the scan) and a fingerprint of the network's parameters
and buffers (identity and version of each tensor: an in-place change such as a randomisation
or a BatchNorm fold invalidates it). A patch-wise
backward whose hooks act only in the recomputation (``plain_forward``: LRP, excitation
backprop) returns that output for an equal input instead of running every patch once more.

**Whole-scan buffers.** Besides the input and the remembered output, the patch-wise backward holds
the stitched output's gradient (read per patch and divided by the count map there, no second
copy) and the input's gradient.

**Paired batches.** DeepLIFT's rules compare each module's input and output with the
reference's, run in the same batch (inputs first, references second): with ``paired``
each patch batch holds the same patches of both halves in that order.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.forward.cancel_points import cancel_points
from esegeta_engine.forward.patchwise_backward import patchwise_backward
from esegeta_engine.forward.window_grid import Slices, WindowGrid, WindowSettings

__all__ = ["PatchRunner", "SlidingWindow", "Slices", "WindowGrid", "WindowSettings"]


PatchRunner = Callable[[torch.Tensor], torch.Tensor]
"""``run(patch_batch) -> output batch``: the network on a batch of patches (counted, cancellable)."""


class SlidingWindow(nn.Module):
    """The stitched sliding-window function of a network, with patch-wise gradients.

    Parameters
    ----------
    net : nn.Module
        Maps a patch batch ``(B, C, *patch)`` to a segmentation output ``(B, K, *patch)``.
    settings : WindowSettings
        Patch size, overlap, blending, batch.
    before_batch : callable, optional
        Called with the number of patches before every patch batch (cancellation,
        counting); it may raise to stop.

    Attributes
    ----------
    check : callable or None
        Also run between the network's modules within a patch batch, forward and backward
        (:func:`~esegeta_engine.forward.cancel_points.cancel_points`): Cancel does not wait for
        a large patch batch to end.
    autocast : callable, optional
        Context-manager factory for mixed precision around each patch batch.
    """

    def __init__(self, net: nn.Module, settings: WindowSettings,
                 before_batch: Callable[[int], None] | None = None,
                 autocast: Callable[[], object] | None = None) -> None:
        super().__init__()
        self.net = net
        self.settings = settings
        self.before_batch = before_batch
        self.autocast = autocast
        self.check: Callable[[], None] | None = None
        self.support: torch.Tensor | None = None  # output voxels the target reads
        self.patch_evaluations = 0
        self.paired = False  # batch halves are (inputs, references): pair their patches in each batch
        # called after each patch batch of the patch-wise backward with its (example, patch) items
        self.on_backward_chunk: Callable[[list[tuple[int, int]], WindowGrid], None] | None = None
        # called before the recomputation of each patch batch of the patch-wise backward with its
        # (example, patch) items (DeepLIFT runs the reference's same patches there)
        self.before_recompute: Callable[[list[tuple[int, int]], WindowGrid], None] | None = None
        self.recomputing = False  # True during the forward recomputation of a patch batch in backward
        # True: the hooks on the network act only during the recomputation (LRP's rules), so the
        # stitched forward under autograd runs without a graph even when hooks are present
        self.plain_forward = False
        self._grids: dict[tuple[int, ...], WindowGrid] = {}
        self._base: _BaseCache | None = None
        self._handed: tuple[torch.Tensor, torch.Tensor] | None = None  # see :meth:`handing_over`

    # -- set-up ----------------------------------------------------------------------------
    def grid(self, spatial: Sequence[int], device: torch.device) -> WindowGrid:
        """The (cached) window grid for inputs of this spatial size."""
        key = tuple(int(s) for s in spatial)
        if key not in self._grids:
            self._grids[key] = WindowGrid(key, self.settings, device)
        return self._grids[key]

    def set_base(self, x: torch.Tensor | None) -> None:
        """Remember the unperturbed input: later no-grad calls reuse its patch outputs."""
        self._base = None if x is None else _BaseCache(x.detach())

    def active_patches(self, grid: WindowGrid) -> list[int]:
        """Patches the target can see (all, unless a support restricts them)."""
        return grid.patches_overlapping(self.support)

    def chunks(self, n: int, grid: WindowGrid) -> list[list[tuple[int, int]]]:
        """``(example, patch)`` items of each patch batch (``paired``: first half's, then the same of the second)."""
        active, bs = self.active_patches(grid), self.settings.sw_batch_size
        half = n // 2 if self.paired and n % 2 == 0 else n
        items = [(b, p) for b in range(half) for p in active]
        return [items[i:i + bs] + ([(b + half, p) for b, p in items[i:i + bs]] if half < n else [])
                for i in range(0, len(items), bs)]

    # -- evaluation ------------------------------------------------------------------------
    def run_patches(self, patches: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """The network on a stack of patches, as float32, in ``sw_batch_size`` chunks."""
        outs = []
        bs = self.settings.sw_batch_size
        for i in range(0, patches.shape[0], bs):
            chunk = patches[i:i + bs]
            outs.append(self._run_chunk(chunk, grad))
        return torch.cat(outs)

    def _run_chunk(self, chunk: torch.Tensor, grad: bool) -> torch.Tensor:
        if self.before_batch is not None:
            self.before_batch(chunk.shape[0])
        self.patch_evaluations += chunk.shape[0]
        with torch.set_grad_enabled(grad), cancel_points(self.check):
            if self.autocast is not None:
                with self.autocast():  # type: ignore[attr-defined]
                    y = self.net(chunk)
            else:
                y = self.net(chunk)
        if y.dim() != chunk.dim() or tuple(y.shape[2:]) != tuple(chunk.shape[2:]):
            raise MethodError(
                f"sliding-window execution needs a segmentation output on the patch grid; the model maps a "
                f"patch {tuple(chunk.shape)} to {tuple(y.shape)}",
                "turn execution off (execution: {mode: whole}) for classifiers or models that change the grid",
            )
        return y.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid(x.shape[2:], x.device)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PatchwiseFunction.apply(x, self, grid)
        with torch.no_grad():
            base = self._base
            if base is not None and base.matches(x):
                return self._reuse(x, grid, base)
            out = self._stitch(x, grid)
            if self._cacheable():
                _LAST_OUTPUT[:] = [(self._output_key(x), _digest(x), out)]
            return out

    # -- the prediction's output, reused by the patch-wise backward ----------------------------
    def _cacheable(self) -> bool:
        return self.support is None and not self.paired and self.autocast is None

    def _output_key(self, x: torch.Tensor) -> tuple:
        model = getattr(self.net, "model", self.net)
        tensors = [*self.net.parameters(), *self.net.buffers()]
        return (id(model), repr(getattr(self.net, "output", None)), self.settings, tuple(x.shape), x.dtype,
                x.device, tuple((id(t), t.data_ptr(), t._version) for t in tensors))

    def remember(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Record ``out`` as the stitched output of ``x`` (computed patch by patch elsewhere, in the
        same patch order and arithmetic as :meth:`forward`), for :meth:`remembered_output`."""
        if self._cacheable():
            _LAST_OUTPUT[:] = [(self._output_key(x), _digest(x), out)]

    @contextlib.contextmanager
    def handing_over(self, x: torch.Tensor, out: torch.Tensor) -> Iterator[None]:
        """Within the block, ``out`` is the stitched output of an input equal to ``x`` for
        :meth:`remembered_output`, also where the cache cannot hold it (a support, mixed precision):
        a method that stitched it from its own patches, through this window, hands it over."""
        before, self._handed = self._handed, (x.detach(), out)
        try:
            yield
        finally:
            self._handed = before

    def remembered_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The stitched output of an equal input computed earlier without gradients, if any."""
        handed = self._handed
        if handed is not None and handed[0].shape == x.shape and torch.equal(handed[0], x.detach()):
            return handed[1].clone()
        if not _LAST_OUTPUT or not self._cacheable():
            return None
        key, digest, out = _LAST_OUTPUT[0]
        if key != self._output_key(x) or digest != _digest(x):
            return None
        return out.clone()

    def _stitch(self, x: torch.Tensor, grid: WindowGrid, keep: list | None = None,
                graph: bool = False) -> torch.Tensor:
        """Plain sliding-window output (optionally keeping each patch output).

        ``graph``: run each patch with a (short-lived) graph, so that hooks which attach to
        tensors during the forward pass (Captum's guided rules) find tensors requiring grad.
        """
        xp = grid.pad_input(x)
        n = x.shape[0]
        acc: torch.Tensor | None = None
        for chunk in self.chunks(n, grid):
            patch = torch.cat([xp[(slice(b, b + 1), slice(None), *grid.slices[p])] for b, p in chunk])
            ys = self._run_chunk(patch.requires_grad_(True) if graph else patch, graph).detach()
            if acc is None:
                acc = torch.zeros((n, ys.shape[1], *grid.padded), device=x.device)
            for (b, p), y in zip(chunk, ys):
                acc[(b, slice(None), *grid.slices[p])] += y * grid.weight[0]
                if keep is not None:
                    keep.append((b, p, y))
        if acc is None:  # no active patch: the target reads nothing
            acc = torch.zeros((n, 1, *grid.padded), device=x.device)
        return grid.crop(acc.div_(grid.count))  # in place: one whole-volume buffer, not two

    def _reuse(self, x: torch.Tensor, grid: WindowGrid, base: _BaseCache) -> torch.Tensor:
        """Perturbed copies of the base input: recompute only the patches they change."""
        if base.numerator is None:
            keep: list = []
            self._stitch(base.x, grid, keep)
            base.outputs = {(b, p): y for b, p, y in keep}
            k = keep[0][2].shape[0] if keep else 1
            num = torch.zeros((base.x.shape[0], k, *grid.padded), device=x.device)
            for b, p, y in keep:
                num[(b, slice(None), *grid.slices[p])] += y * grid.weight[0]
            base.numerator = num
            base.padded = grid.pad_input(base.x)
            base.count = grid.count  # kept while perturbations reuse the base (built once)
        nb = base.x.shape[0]
        xp = grid.pad_input(x)
        active = self.active_patches(grid)
        todo: list[tuple[int, int]] = []
        for m in range(x.shape[0]):
            changed = (xp[m] != base.padded[m % nb]).any(dim=0)
            if not bool(changed.any()):
                continue
            lo = [int(v) for v in (torch.nonzero(changed).amin(0))]
            hi = [int(v) for v in (torch.nonzero(changed).amax(0))]
            for p in active:
                sl = grid.slices[p]
                if all(s.start <= h and s.stop > l for s, l, h in zip(sl, lo, hi)) and bool(changed[sl].any()):
                    todo.append((m, p))
        num = base.numerator.repeat(x.shape[0] // nb, *([1] * (base.numerator.dim() - 1)))
        bs = self.settings.sw_batch_size
        fresh: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(0, len(todo), bs):
            chunk = todo[i:i + bs]
            ys = self._run_chunk(torch.cat([xp[(slice(m, m + 1), slice(None), *grid.slices[p])]
                                            for m, p in chunk]), False)
            fresh.update(zip(chunk, ys))
        by_copy: dict[int, list[int]] = {}
        for m, p in todo:
            by_copy.setdefault(m, []).append(p)
        for m, changed in by_copy.items():
            self._restitch_region(num, m, changed, fresh, base, grid, active, nb)
        return grid.crop(num.div_(base.count))  # ``num`` is this call's own copy

    @staticmethod
    def _restitch_region(num: torch.Tensor, m: int, changed: list[int], fresh: dict, base: _BaseCache,
                         grid: WindowGrid, active: list[int], nb: int) -> None:
        """Re-accumulate copy ``m`` over the box its changed patches cover, in the full function's
        patch order (changed patches' new outputs, the others' cached ones), so the sum rounds as
        the full sliding window's does: no cancellation error from adding differences."""
        lo = [min(grid.slices[p][a].start for p in changed) for a in range(len(grid.padded))]
        hi = [max(grid.slices[p][a].stop for p in changed) for a in range(len(grid.padded))]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        acc = torch.zeros((num.shape[1], *(b - a for a, b in zip(lo, hi))), device=num.device)
        weight = grid.weight[0]
        for p in active:
            sl = grid.slices[p]
            inter = [(max(s.start, a), min(s.stop, b)) for s, a, b in zip(sl, lo, hi)]
            if any(a >= b for a, b in inter):
                continue
            y = fresh.get((m, p))
            if y is None:
                y = base.outputs[(m % nb, p)]
            part = (y * weight)[(slice(None), *(slice(a - s.start, b - s.start) for (a, b), s in zip(inter, sl)))]
            acc[(slice(None), *(slice(a - l, b - l) for (a, b), l in zip(inter, lo)))] += part
        num[(m, slice(None), *box)] = acc


_LAST_OUTPUT: list[tuple[tuple, bytes, torch.Tensor]] = []
"""The last full stitched output computed without gradients: ``[(key, input digest, output)]`` or empty."""


def _digest(x: torch.Tensor) -> bytes:
    """BLAKE2b of ``x``'s bytes: the cache recognises an equal input by it instead of keeping a copy
    of the scan (0.2 s for a 448x448x128 volume, against 100 MB held)."""
    data = x.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(memoryview(data), digest_size=32).digest()


class _BaseCache:
    """Unperturbed input and its patch outputs, computed on first use."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.padded: torch.Tensor | None = None
        self.numerator: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}

    def matches(self, x: torch.Tensor) -> bool:
        n = self.x.shape[0]
        return (x.shape[1:] == self.x.shape[1:] and x.shape[0] % n == 0 and x.dtype == self.x.dtype
                and x.device == self.x.device)


class _PatchwiseFunction(torch.autograd.Function):
    """Stitched output forward; patch-by-patch recomputation in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sw: SlidingWindow, grid: WindowGrid) -> torch.Tensor:  # type: ignore[override]
        ctx.sw = sw
        ctx.grid = grid
        ctx.save_for_backward(x)
        # module hooks (guided rules) may attach to tensors in the forward pass: give them tensors
        # that require grad; without hooks the forward needs no graph at all
        if sw.plain_forward:
            known = sw.remembered_output(x)
            if known is not None:  # the prediction's output: no patch runs twice
                return known
        hooked = not sw.plain_forward and any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                     or getattr(m, "_backward_pre_hooks", None) for m in sw.net.modules())
        return sw._stitch(x.detach(), grid, graph=bool(hooked))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        grid: WindowGrid = ctx.grid
        up = _padded_upstream(grad_out, grid)  # divided by the count per patch: no whole-volume copy
        gx = patchwise_backward(ctx.sw, grid, x, lambda b, p: up[(slice(b, b + 1), slice(None), *grid.slices[p])])
        return gx.to(x.dtype), None, None


def _padded_upstream(grad_out: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """The stitched output's gradient on the padded grid, as float32: ``grad_out`` itself where
    nothing is padded (the usual whole scan), so the backward holds no second whole-volume copy."""
    grad_out = grad_out.float()
    if not any(grid.pad):
        return grad_out
    up = torch.zeros((grad_out.shape[0], grad_out.shape[1], *grid.padded), device=grad_out.device)
    up[(slice(None), slice(None), *(slice(o, o + s) for o, s in zip(grid.offset, grid.spatial)))] = grad_out
    return up
