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

**Paired batches.** DeepLIFT's rules compare each module's input and output with the
reference's, run in the same batch (inputs first, references second): with ``paired``
each patch batch holds the same patches of both halves in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from torch import nn

from esegeta_engine.errors import MethodError

Slices = tuple[slice, ...]


@dataclass(frozen=True)
class WindowSettings:
    """Sliding-window settings (the ``execution`` section of a config).

    Attributes
    ----------
    patch_size : tuple of int
        Patch (window) size per spatial axis, the network's training size.
    overlap : float
        Fraction of a patch shared with its neighbour, in [0, 1).
    blend : {"gaussian", "constant"}
        Importance weighting of each patch's output (nnU-Net and MONAI use Gaussian).
    sw_batch_size : int
        Patches per model evaluation.
    padding : {"constant", "reflect", "replicate"}
        How a volume smaller than the patch is padded (MONAI's ``padding_mode``).
    sigma_scale : float
        Gaussian sigma as a fraction of the patch size (MONAI's default 0.125).
    """

    patch_size: tuple[int, ...]
    overlap: float = 0.25
    blend: str = "gaussian"
    sw_batch_size: int = 1
    padding: str = "constant"
    sigma_scale: float = 0.125

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise MethodError(f"execution.overlap {self.overlap} is outside [0, 1)",
                              "use e.g. 0.25 or 0.5 (the fraction of a patch shared with its neighbour)")
        if any(int(p) < 1 for p in self.patch_size):
            raise MethodError(f"execution.patch_size {list(self.patch_size)} has a size below 1",
                              "give the network's training patch size, e.g. [96, 96, 96]")


class WindowGrid:
    """The patches of one input size: padding, slices, importance map and count map.

    Parameters
    ----------
    spatial : sequence of int
        Spatial size of the input.
    settings : WindowSettings
        Patch size, overlap, blending.
    device : torch.device
        Where the weights live.
    """

    def __init__(self, spatial: Sequence[int], settings: WindowSettings, device: torch.device) -> None:
        nd = len(spatial)
        if len(settings.patch_size) != nd:
            raise MethodError(f"execution.patch_size {list(settings.patch_size)} has "
                              f"{len(settings.patch_size)} axes for a {nd}D input",
                              f"give {nd} sizes (or one size for every axis)")
        self.spatial = tuple(int(s) for s in spatial)
        roi = tuple(int(p) for p in settings.patch_size)
        self.roi = roi
        self.padded = tuple(max(s, r) for s, r in zip(self.spatial, roi))
        pad: list[int] = []  # F.pad order: last axis first, (before, after)
        for k in range(nd - 1, -1, -1):
            diff = max(roi[k] - self.spatial[k], 0)
            pad.extend([diff // 2, diff - diff // 2])
        self.pad = pad
        self.offset = tuple(pad[2 * (nd - 1 - k)] for k in range(nd))  # padding before each axis
        interval = tuple(r if r == s else max(int(r * (1 - settings.overlap)), 1)
                         for r, s in zip(roi, self.padded))
        self.slices: list[Slices] = [tuple(sl) for sl in dense_patch_slices(self.padded, roi, interval)]
        self.weight = compute_importance_map(roi, mode=settings.blend, sigma_scale=settings.sigma_scale,
                                             device=device, dtype=torch.float32)[None, None]
        count = torch.zeros((1, 1, *self.padded), device=device)
        for sl in self.slices:
            count[(slice(None), slice(None), *sl)] += self.weight
        self.count = count
        self.padding_mode = settings.padding

    def __len__(self) -> int:
        return len(self.slices)

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pad ``x`` to the padded grid (MONAI's padding of volumes smaller than a patch)."""
        if not any(self.pad):
            return x
        return F.pad(x, self.pad, mode=self.padding_mode)

    def crop(self, y: torch.Tensor) -> torch.Tensor:
        """Crop a padded-grid tensor back to the input grid."""
        if not any(self.pad):
            return y
        sl = tuple(slice(o, o + s) for o, s in zip(self.offset, self.spatial))
        return y[(slice(None), slice(None), *sl)]

    def patches_overlapping(self, support: torch.Tensor | None) -> list[int]:
        """Indices of patches whose output window touches ``support`` (input grid, bool)."""
        if support is None:
            return list(range(len(self.slices)))
        padded = torch.zeros(self.padded, dtype=torch.bool, device=support.device)
        padded[tuple(slice(o, o + s) for o, s in zip(self.offset, self.spatial))] = support
        return [i for i, sl in enumerate(self.slices) if bool(padded[sl].any())]


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
        self.support: torch.Tensor | None = None  # output voxels the target reads
        self.patch_evaluations = 0
        self.paired = False  # batch halves are (inputs, references): pair their patches in each batch
        # called after each patch batch of the patch-wise backward with its (example, patch) items
        self.on_backward_chunk: Callable[[list[tuple[int, int]], WindowGrid], None] | None = None
        self.recomputing = False  # True during the forward recomputation of a patch batch in backward
        self._grids: dict[tuple[int, ...], WindowGrid] = {}
        self._base: _BaseCache | None = None

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
        with torch.set_grad_enabled(grad):
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
            return self._stitch(x, grid)

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
        return grid.crop(acc / grid.count)

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
        return grid.crop(num / grid.count)

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


class _BaseCache:
    """Unperturbed input and its patch outputs, computed on first use."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.padded: torch.Tensor | None = None
        self.numerator: torch.Tensor | None = None
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
        hooked = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                     or getattr(m, "_backward_pre_hooks", None) for m in sw.net.modules())
        return sw._stitch(x.detach(), grid, graph=bool(hooked))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        sw: SlidingWindow = ctx.sw
        grid: WindowGrid = ctx.grid
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            xp = grid.pad_input(xr)
            up = torch.zeros((x.shape[0], grad_out.shape[1], *grid.padded), device=x.device)
            sl_in = tuple(slice(o, o + s) for o, s in zip(grid.offset, grid.spatial))
            up[(slice(None), slice(None), *sl_in)] = grad_out.float()
            up = up / grid.count
            gpad = torch.zeros_like(xp)
            xp_d = xp.detach()
            for chunk in sw.chunks(x.shape[0], grid):
                patch = torch.cat([xp_d[(slice(b, b + 1), slice(None), *grid.slices[p])] for b, p in chunk])
                patch.requires_grad_(True)
                sw.recomputing = True
                try:
                    y = sw._run_chunk(patch, True)
                finally:
                    sw.recomputing = False
                share = torch.cat([up[(slice(b, b + 1), slice(None), *grid.slices[p])] for b, p in chunk])
                (g,) = torch.autograd.grad(y, patch, share * grid.weight)
                for (b, p), gi in zip(chunk, g):
                    gpad[(b, slice(None), *grid.slices[p])] += gi
                del y, g, patch
                if sw.on_backward_chunk is not None:
                    sw.on_backward_chunk(chunk, grid)
            (gx,) = torch.autograd.grad(xp, xr, gpad) if xp is not xr else (gpad,)
        return gx.to(x.dtype), None, None
