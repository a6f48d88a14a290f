"""A MONAI bundle's deployed function as one differentiable module: scan -> probabilities.

``BundlePipeline(x)`` takes the scan as the engine reads it (``(N, C, *spatial)`` in the
NIfTI file's voxel order, channels first) and returns what the bundle's own pipeline
predicts, on the same grid:

1. the bundle's ``preprocessing`` transforms (``Orientationd``, ``Spacingd``,
   ``ScaleIntensityRanged``, ...) on a ``MetaTensor`` carrying the scan's affine, as
   ``LoadImaged`` + ``EnsureChannelFirstd`` would hand it (:mod:`.bundle_steps`);
2. the network through the bundle's inferer: a ``SlidingWindowInferer``'s roi size, overlap,
   blending, batch and padding run as the engine's sliding window
   (:class:`~esegeta_engine.forward.sliding.SlidingWindow`, equal to MONAI's, with
   patch-by-patch recomputation in the backward); a ``SimpleInferer`` calls it once;
3. the bundle's postprocessing up to the probabilities: ``Activationsd`` and ``Invertd``
   (back to the scan's grid through the inverse of the preprocessing), label steps skipped.

Gradients pass through every step, so every method explains the bundle's class score on
the scan's grid. The layer ``network_input`` is the preprocessed tensor on the network's
grid: layer maps there are brought back with the same inversion as the probabilities. A layer
inside the network runs once per patch: layer methods combine its copies on the network grid
and bring the map back the same way (:mod:`.member_bundle`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esegeta_engine.errors import ModelLoadError
from esegeta_engine.forward.sliding import SlidingWindow, WindowSettings
from esegeta_engine.models.bundle_steps import BundleSteps
from esegeta_engine.models.member_bundle import bundle_layer_forward, bundle_layer_map
from esegeta_engine.models.member_layer import NNUNET_MEMBER_METHODS, find_in, method_refusal, two_pass_refusal

NETWORK_INPUT = "network_input"


class BundlePipeline(nn.Module):
    """A MONAI bundle's preprocessing, inferer, activation and inversion around its network.

    Parameters
    ----------
    network : nn.Module
        The bundle's ``network_def`` with its trained weights, in eval mode.
    steps : BundleSteps
        The bundle's transforms around the network.
    window : WindowSettings or None
        The inferer's sliding-window settings (None: the network sees the whole grid).
    inferer : dict
        The inferer's record (name and settings).
    """

    def __init__(self, network: nn.Module, steps: BundleSteps, window: WindowSettings | None,
                 inferer: dict[str, Any]) -> None:
        super().__init__()
        self.network = network
        self.network_input = nn.Identity()
        self.steps = steps
        self.inferer = dict(inferer)
        # the sliding window holds the same network: kept out of the module tree so hook-based
        # methods meet each of the network's modules once
        self.__dict__["window"] = SlidingWindow(network, window) if window is not None else None
        self.affine: np.ndarray | None = None
        self.meta: dict[str, Any] = {}
        self.before_call: Callable[[int], None] | None = None
        self._last: list[dict[str, Any]] = []
        self.calls: dict[str, int] | None = None

    # -- what the engine asks -------------------------------------------------------------
    def bind_volume(self, volume: Any) -> None:
        """The scan's affine (and file name) from a volume, or an affine array."""
        if isinstance(volume, (np.ndarray, torch.Tensor)):
            self.affine = np.asarray(volume, dtype=np.float64)
            return
        self.affine = np.asarray(volume.affine, dtype=np.float64)
        path = getattr(volume, "path", None)
        self.meta = {"filename_or_obj": str(path)} if path is not None else {}

    def bind_monitor(self, before_call: Callable[[int], None] | None) -> None:
        """Called with the number of patches before every network evaluation (counting, cancellation).

        Patches are also counted here, the forward's apart from the backward's recomputation.
        """
        calls = self.calls = {"forward": 0, "backward": 0}
        window = self.window

        def counted(n: int) -> None:
            calls["backward" if window is not None and window.recomputing else "forward"] += n
            if before_call is not None:
                before_call(n)

        self.before_call = counted
        if window is not None:
            window.before_batch = counted

    members_note = ("a MONAI bundle runs its one network_def with no test-time augmentation (random transforms, "
                    "inferers other than Simple/SlidingWindow and ensembles are refused when it loads)")

    def members(self, kind: str | None = None) -> list[nn.Module]:
        """No members of any kind (:attr:`members_note`): ``folds`` / ``mirrors`` are empty, and
        ``evaluation.stability`` falls back to input noise (``auto``) or says so in one line."""
        if kind not in (None, "folds", "mirrors"):
            raise ValueError(f"members(kind={kind!r}): give 'folds' or 'mirrors'")
        return []

    def runs_layer_per_member(self, layer: nn.Module) -> bool:
        """True for a layer inside the network under a sliding window: it runs once per patch."""
        return self.window is not None and find_in([self.network], layer) is not None

    def method_refusal(self, method: str) -> tuple[str, str] | None:
        """Why a method cannot run through the pipeline at all (DeepLIFT's family under a sliding window)."""
        if self.window is None:  # SimpleInferer: one graph of the whole pipeline, the input and baseline as a batch
            return None
        return two_pass_refusal(method, f"the bundle's {self.inferer['inferer']}",
                                "but the sliding window's backward recomputes each patch with the rules already "
                                "applying, so no patch has a reference pass of its own")

    def layer_method_refusal(self, method: str, layer: str) -> tuple[str, str] | None:
        """Why a layer method does not run on a layer inside the windowed network (None: it runs)."""
        if self.window is None or not (layer == "network" or layer.startswith("network.")):
            return None
        return method_refusal(method, layer, f"the bundle's network ({self.inferer['inferer']})",
                              NNUNET_MEMBER_METHODS)

    def member_layer_map(self, score_model: nn.Module, layer: nn.Module, inputs: torch.Tensor, target: int,
                         layer_input: bool, per_copy: Any, combine: str, method: str,
                         name: str, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer method over every patch copy of ``layer``, on the scan's grid (:mod:`.member_bundle`)."""
        return bundle_layer_map(self, score_model, layer, inputs, target, layer_input, per_copy, combine, method,
                                name, scale)

    def member_layer_forward(self, score_model: nn.Module, layer: nn.Module, inputs: torch.Tensor,
                             layer_input: bool, per_copy: Any, combine: str, method: str, name: str) -> torch.Tensor:
        """An activation-only layer map over every patch copy of ``layer`` (:mod:`.member_bundle`)."""
        return bundle_layer_forward(self, score_model, layer, inputs, layer_input, per_copy, combine, method, name)

    def layer_map_to_input(self, name: str | None, result: torch.Tensor) -> torch.Tensor | None:
        """A map on the network's grid -> the scan's grid: layer ``network_input``, or a layer inside the
        network when it sees the whole grid at once (no sliding window; the map is upsampled to that grid)."""
        inner = self.window is None and name is not None and (name == "network" or name.startswith("network."))
        if not (name == NETWORK_INPUT or inner) or not self._last:
            return None
        if inner:
            grid = tuple(self._last[0][self.steps.key].shape[1:])
            if tuple(result.shape[2:]) != grid:
                result = F.interpolate(result, size=grid, mode="bilinear" if len(grid) == 2 else "trilinear",
                                       align_corners=False)
        maps = [self.steps.invert_map(result[i], self._last[min(i, len(self._last) - 1)])
                for i in range(result.shape[0])]
        return torch.stack(maps)

    def describe_execution(self, spatial: Sequence[int] | None = None) -> dict[str, Any]:
        """How one evaluation of the pipeline runs (for each map's record)."""
        d: dict[str, Any] = {
            "pipeline": "bundle", **self.inferer, "activation": self.steps.activation,
            "preprocessing": [type(t).__name__ for t in self.steps.pre],
            "inversion": "Invertd" if self.steps.inverted else "the preprocessing's inverse (no Invertd)",
            "attribution_grid": "scan (gradients through the bundle's preprocessing, inferer, activation and "
                                "inversion)",
            "layer_grid": f"{NETWORK_INPUT} and layers inside the network: the bundle's network grid (a layer's "
                          "patch copies combined there), brought back with its inversion",
        }
        if self.calls is not None:
            d["forward_network_calls"] = self.calls["forward"]
            d["backward_network_calls"] = self.calls["backward"]
        if self._last:
            grid = tuple(self._last[0][self.steps.key].shape[1:])
            d["network_grid_shape"] = list(grid)
            d["patches_per_evaluation"] = len(self.window.grid(grid, torch.device("cpu"))) if self.window else 1
            d["network_calls_per_input"] = d["patches_per_evaluation"]
        return d

    def network_calls(self, x: torch.Tensor) -> int:
        """The source's cost: network evaluations (patches) of one forward on ``x``, before the network runs."""
        if self.affine is None:
            raise ModelLoadError("the bundle pipeline needs the scan's affine", "bind a volume first")
        total = 0
        for i in range(x.shape[0]):
            if self.window is None:
                total += 1
                continue
            with torch.no_grad():
                item = self.steps.preprocess(x[i].detach(), self.affine, self.meta)
            total += len(self.window.grid(tuple(item[self.steps.key].shape[1:]), torch.device("cpu")))
        return total

    def network_in_channels(self) -> int:
        """Input channels of the network (its first convolution), 1 when unknown."""
        for m in self.network.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return int(m.in_channels)
        return 1

    # -- the function ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.affine is None:
            raise ModelLoadError("the bundle pipeline needs the scan's affine",
                                 "load the volume from a NIfTI file (the engine binds its affine)")
        items = [self.steps.preprocess(x[i], self.affine, self.meta) for i in range(x.shape[0])]
        self._last = items
        data = [_as_plain(item[self.steps.key]) for item in items]
        if len({tuple(d.shape) for d in data}) == 1:
            outs = list(self._infer(self.network_input(torch.stack(data))))
        else:
            outs = [self._infer(self.network_input(d[None]))[0] for d in data]
        return torch.stack([self.steps.postprocess(o, item) for o, item in zip(outs, items)])

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.float()
        if self.window is not None:
            return self.window(batch)
        if self.before_call is not None:
            self.before_call(batch.shape[0])
        return self.network(batch)


def _as_plain(t: Any) -> torch.Tensor:
    from monai.data import MetaTensor

    return t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)
