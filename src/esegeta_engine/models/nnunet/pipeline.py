"""The deployed nnU-Net function as one differentiable module: scan -> probabilities.

``NnUNetPipeline(x)`` takes the scan as the engine reads it (``(N, C, x, y, z)`` in the
NIfTI file's voxel order, channels in dataset.json's order) and returns the class
probabilities on the same grid, computed as ``nnUNetv2_predict`` computes them:

1. the reader's axis order (SimpleITK's ``z, y, x`` and reversed spacing), then the plans'
   ``transpose_forward``;
2. crop to the non-zero box (nnU-Net's ``create_nonzero_mask`` / ``get_bbox_from_mask``,
   recomputed for every input, perturbed ones included);
3. the configured normalisation scheme per channel with the fingerprint's intensity
   properties (before resampling, as nnU-Net does);
4. resampling to the plans' spacing with nnU-Net's own function (as exact matrices, see
   :mod:`.resample`);
5. the Gaussian sliding window, mirroring and fold ensemble (:mod:`.window`);
6. the logits resampled back with nnU-Net's probability resampling (rounded to float16 as
   nnU-Net stores them), softmax or sigmoid (region-based), the crop reverted (background
   outside the box) and the transposes undone.

Every step is differentiable (gradients pass straight through nnU-Net's float16
roundings), so gradient methods explain the whole pipeline's class score on the scan's
grid. The layer ``network_input`` is the preprocessed tensor on the network's grid: layer
maps there are brought back with the same resampling as the probabilities. A layer inside
the fold networks runs once per fold, mirrored copy and patch: layer methods combine its
copies on the network grid and bring the map back the same way (:mod:`..member_layer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esegeta_engine.errors import ModelLoadError
from esegeta_engine.models.member_layer import (NNUNET_MEMBER_METHODS, NNUNET_TWO_PASS, find_in, method_refusal,
                                                nnunet_layer_map, two_pass_refusal)
from esegeta_engine.models.nnunet.gradient_steps import GradientSteps
from esegeta_engine.models.nnunet.gradient_steps import exact as _exact
from esegeta_engine.models.nnunet.resample import Resampling, resampler
from esegeta_engine.models.nnunet.window import Ensemble, EnsembleFunction, WindowPlan

NORMALISATIONS = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
                  "RGBTo01Normalization")
NETWORK_INPUT = "network_input"


class NnUNetPipeline(nn.Module):
    """nnU-Net v2's deployed prediction, differentiable end to end (see the module docstring).

    Parameters
    ----------
    networks : nn.ModuleList
        One network per fold, built from the plans, in eval mode.
    plans_manager, configuration_manager, label_manager
        nnU-Net's managers for the plans, the configuration and dataset.json's labels.
    mirror_axes : tuple of int or None
        Axes mirrored at test time (None: no mirroring).
    step_size : float
        Sliding-window step as a fraction of the patch (nnU-Net's default 0.5).
    """

    def __init__(self, networks: nn.ModuleList, plans_manager: Any, configuration_manager: Any, label_manager: Any,
                 mirror_axes: tuple[int, ...] | None, step_size: float = 0.5) -> None:
        super().__init__()
        self.folds = networks
        self.network_input = nn.Identity()
        object.__setattr__(self, "_steps", GradientSteps())  # not a submodule: no layer of the model
        self.pm, self.cm, self.lm = plans_manager, configuration_manager, label_manager
        self.ensemble = Ensemble(list(networks), mirror_axes, label_manager.num_segmentation_heads)
        self.step_size = float(step_size)
        self.spacing: tuple[float, ...] | None = None  # the scan's voxel spacing, NIfTI axis order
        self._matrices: dict[tuple, Resampling] = {}
        self._last: list[dict[str, Any]] = []
        self.fold_names: list[str] = []
        self.calls: dict[str, int] | None = None
        self.member_name = "ensemble"
        for scheme in configuration_manager.normalization_schemes:
            if scheme not in NORMALISATIONS:
                raise ModelLoadError(f"normalisation scheme {scheme!r} of the plans is not one of nnU-Net's "
                                     f"built-in schemes ({', '.join(NORMALISATIONS)})",
                                     "explain a configuration that uses a built-in scheme")

    # -- what the engine asks -------------------------------------------------------------
    def bind_volume(self, volume: Any) -> None:
        """The scan's voxel spacing (NIfTI axis order, mm) from a volume or a sequence of sizes.

        A volume's header zooms are used as nnU-Net's readers use them (SimpleITK reads pixdim).
        """
        if isinstance(volume, Sequence):
            spacing = volume
        else:
            header = getattr(volume, "header", None)
            zooms = header.get_zooms() if header is not None and hasattr(header, "get_zooms") else None
            spacing = zooms if zooms is not None else volume.spacing
        self.spacing = tuple(float(s) for s in tuple(spacing)[:3])

    def bind_monitor(self, before_call: Callable[[int], None] | None) -> None:
        """Called before every network evaluation (counting and cancellation).

        Network calls are also counted here, the forward's apart from the backward's recomputation
        (``forward_network_calls`` / ``backward_network_calls`` in :meth:`describe_execution`).
        """
        calls = self.calls = {"forward": 0, "backward": 0, "reused": 0}
        ens = self.ensemble

        def counted(n: int) -> None:
            calls["backward" if ens.recomputing else "forward"] += n
            if before_call is not None:
                before_call(n)

        def reused(n: int) -> None:
            calls["reused"] += n

        ens.before_call, ens.on_reuse = counted, reused

    def network_calls(self, x: torch.Tensor) -> int:
        """The source's cost: network evaluations (patches x mirrored copies x folds) of one forward on ``x``.

        Computed before any network runs, from nnU-Net's own crop box, target shape and window steps.
        """
        from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
        from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        total = 0
        for i in range(x.shape[0]):
            nd = x.dim() - 2
            spacing_reader = tuple(self.spacing[::-1])  # type: ignore[index]
            order = [tuple(range(nd))[::-1][t] for t in self.pm.transpose_forward]
            array = x[i].detach().permute(0, *[o + 1 for o in order]).float().cpu().numpy()
            bbox = get_bbox_from_mask(create_nonzero_mask(array))
            cropped = tuple(b - a for a, b in bbox)
            original = [spacing_reader[t] for t in self.pm.transpose_forward]
            target = list(self.cm.spacing)
            if len(target) < nd:
                target = [original[0], *target]
            shape = compute_new_shape(cropped, original, target)
            total += len(WindowPlan.of(shape, self.cm.patch_size, self.step_size).slicers)
        return total * self.ensemble.calls_per_patch

    def members(self, kind: str | None = None) -> list[NnUNetPipeline]:
        """Each fold alone (``kind="folds"``) or each mirrored copy alone (``"mirrors"``), as pipelines.

        A member is the same deployed function with one fold (all its mirrored copies) or one
        mirrored copy (of every fold): callable on the same scan, probabilities on its grid.
        nnU-Net averages the members' logits before the softmax, so the mean of the members'
        logits is the ensemble's. Without ``kind``: the folds when there are several, else the
        mirrored copies (``evaluation.stability`` takes this list). Each member's
        ``member_name`` says which it is (``fold 0``, ``mirror axes (0, 2)``).
        """
        kind = kind or ("folds" if len(self.folds) > 1 else "mirrors")
        if kind not in ("folds", "mirrors"):
            raise ValueError(f"members(kind={kind!r}): give 'folds' or 'mirrors'")
        out = []
        if kind == "folds":
            for net, fold in zip(self.folds, self.fold_names or range(len(self.folds))):
                m = NnUNetPipeline(nn.ModuleList([net]), self.pm, self.cm, self.lm, self.ensemble.mirror_axes,
                                   self.step_size)
                m.member_name = f"fold {fold}"
                out.append(m)
        else:
            for axes in self.ensemble.copy_axes:
                m = NnUNetPipeline(self.folds, self.pm, self.cm, self.lm, self.ensemble.mirror_axes, self.step_size)
                m.ensemble.copies = [axes]
                # nnU-Net's axes of the flipped copy (the network input's spatial axes)
                m.member_name = f"mirror axes {tuple(a - 2 for a in axes)}" if axes else "no mirroring"
                out.append(m)
        for m in out:
            m.eval()
            m.spacing, m._matrices = self.spacing, self._matrices
            m.ensemble.before_call = self.ensemble.before_call
        return out

    def checkpoint_segments(self) -> list[nn.Module]:
        """The fold networks' stages and large blocks, checkpointed for plain-gradient methods.

        Only the backward's patch recomputation builds a graph (:mod:`.window`): there each block keeps
        its input only (:mod:`esegeta_engine.forward.checkpointing`), so one patch's graph is small. Also
        the preprocessing's gradient steps (:class:`.gradient_steps.GradientSteps`): while the patches are
        recomputed they hold the scan only, not their scan-size graph.
        """
        from esegeta_engine.forward.checkpointing import unet_segments

        return [*(m for net in self.ensemble.networks for m in unet_segments(net)), self._steps]

    def layer_refusal(self, name: str) -> tuple[str, str] | None:
        """``folds`` is a list the pipeline never calls as one module: refused (its fold networks are not)."""
        if name == "folds":
            return ("layer 'folds' is the list of fold networks, never called as one module",
                    "pick a layer inside a fold, e.g. 'folds.0.encoder.stages.1' (every fold's copy is used), or "
                    f"'{NETWORK_INPUT}'")
        return None

    def runs_layer_per_member(self, layer: nn.Module) -> bool:
        """True for a layer inside the fold networks: it runs once per fold, mirrored copy and patch."""
        return find_in(list(self.ensemble.networks), layer) is not None

    def method_refusal(self, method: str) -> tuple[str, str] | None:
        """Why a method cannot run through the pipeline at all (DeepLIFT's family; None: it runs)."""
        return two_pass_refusal(method, "nnU-Net's pipeline", NNUNET_TWO_PASS)

    def layer_method_refusal(self, method: str, layer: str) -> tuple[str, str] | None:
        """Why a layer method does not run on a layer inside the fold networks (None: it runs)."""
        if not layer.startswith("folds."):
            return None
        return method_refusal(method, layer, "nnU-Net's fold networks", NNUNET_MEMBER_METHODS)

    def member_layer_map(self, score_model: nn.Module, layer: nn.Module, inputs: torch.Tensor, target: int,
                         layer_input: bool, per_copy: Any, combine: str, method: str,
                         name: str, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer method over every member's copy of ``layer``, on the scan's grid (:mod:`..member_layer`)."""
        return nnunet_layer_map(self, score_model, layer, inputs, target, layer_input, per_copy, combine, method,
                                name, scale)

    def member_layer_forward(self, score_model: nn.Module, layer: nn.Module, inputs: torch.Tensor,
                             layer_input: bool, per_copy: Any, combine: str, method: str, name: str) -> torch.Tensor:
        """An activation-only layer map over every member's copy of ``layer`` (:mod:`..member_paths`)."""
        from esegeta_engine.models.member_paths import nnunet_layer_forward

        return nnunet_layer_forward(self, score_model, layer, inputs, layer_input, per_copy, combine, method, name)

    def layer_map_to_input(self, name: str | None, result: torch.Tensor) -> torch.Tensor | None:
        """A map on the network's grid (layer ``network_input``) -> the scan's grid."""
        if name != NETWORK_INPUT or not self._last:
            return None
        maps = [self._to_scan(result[i], self._last[min(i, len(self._last) - 1)], logits=False)
                for i in range(result.shape[0])]
        return torch.stack(maps)

    def describe_execution(self, spatial: Sequence[int] | None = None) -> dict[str, Any]:
        """How one evaluation of the pipeline runs (for each map's record)."""
        d: dict[str, Any] = {
            "pipeline": "nnunet", "folds": len(self.folds), "mirror_axes": list(self.ensemble.mirror_axes or []),
            "network_calls_per_patch": self.ensemble.calls_per_patch, "step_size": self.step_size,
            "patch_size": list(self.cm.patch_size), "network_spacing": list(self.cm.spacing),
            "attribution_grid": "scan (gradients through nnU-Net's preprocessing, sliding window, mirroring, "
                                "fold ensemble and resampling back)",
            "layer_grid": f"{NETWORK_INPUT} and layers inside the folds: nnU-Net's network grid (a fold layer's "
                          "copies combined over folds, mirrored copies and patches), brought back with nnU-Net's "
                          "probability resampling",
        }
        if getattr(self, "calls", None) is not None:
            d["forward_network_calls"] = self.calls["forward"]
            d["backward_network_calls"] = self.calls["backward"]
            d["reused_network_calls"] = self.calls["reused"]  # a forward the last one already computed
        if self._last:
            d["patches_per_evaluation"] = len(self._last[0]["plan"].slicers)
            d["network_calls_per_input"] = d["patches_per_evaluation"] * self.ensemble.calls_per_patch
            d["network_grid_shape"] = list(self._last[0]["plan"].shape)
        return d

    # -- the function ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spacing is None:
            raise ModelLoadError("the nnU-Net pipeline needs the scan's voxel spacing",
                                 "load the volume from a NIfTI file (the engine binds its spacing)")
        infos = [self._prepare(x[i]) for i in range(x.shape[0])]
        self._last = infos
        data = [info.pop("data") for info in infos]
        if len({tuple(d.shape) for d in data}) == 1:
            data = list(self.network_input(torch.stack(data)))
        else:
            data = [self.network_input(d[None])[0] for d in data]
        outs = []
        for d, info in zip(data, infos):
            logits = EnsembleFunction.apply(d, self.ensemble, info["plan"])
            outs.append(self._to_scan(logits, info, logits=True))
        return torch.stack(outs)

    def _prepare(self, scan: torch.Tensor) -> dict[str, Any]:
        """One scan ``(C, x, y, z)`` -> preprocessed data on the network's grid, and the geometry.

        The values are nnU-Net's own (its normalisation classes and resampling function on the
        numpy array); under autograd the torch version of each step adds its gradient.
        """
        from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
        from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        nd = scan.dim() - 1
        reader = tuple(range(nd))[::-1]  # SimpleITK order: z, y, x
        spacing_reader = tuple(self.spacing[::-1])  # type: ignore[index]
        tf = list(self.pm.transpose_forward)
        order = [reader[t] for t in tf]  # scan axis of each nnU-Net axis
        data = scan.permute(0, *[o + 1 for o in order]).float()
        grad = torch.is_grad_enabled() and data.requires_grad
        original_spacing = [spacing_reader[t] for t in tf]
        shape_before = tuple(data.shape[1:])
        array = data.detach().cpu().numpy().astype(np.float32)
        mask = create_nonzero_mask(array)
        bbox = get_bbox_from_mask(mask)
        box = tuple(slice(a, b) for a, b in bbox)
        data, array = data[(slice(None), *box)], np.ascontiguousarray(array[(slice(None), *box)])
        seg = np.where(mask[box], np.int8(0), np.int8(-1))
        nonzero = torch.from_numpy(np.ascontiguousarray(mask[box])).to(data.device)
        for c in range(array.shape[0]):
            array[c] = self._normaliser(c).run(array[c].copy(), seg)
        target = list(self.cm.spacing)
        if len(target) < nd:
            target = [original_spacing[0], *target]
        cropped = tuple(data.shape[1:])
        new_shape = tuple(int(s) for s in compute_new_shape(cropped, original_spacing, target))
        resampled = self.cm.resampling_fn_data(array, np.array(new_shape), original_spacing, target)
        rs = self._axes("data", self.cm.resampling_fn_data, cropped, new_shape, original_spacing, target)

        def steps(d: torch.Tensor, normalised: np.ndarray = array) -> torch.Tensor:  # normalisation, resampling
            normal = _exact(normalised, lambda: torch.stack([self._normalise(d[c], c, nonzero)
                                                             for c in range(d.shape[0])]), d)
            return rs.apply(normal).float()

        s = self._steps(steps, data) if grad else None  # one block: checkpointing keeps the scan, not its graph
        data = _exact(resampled, (lambda: s) if grad else None, data)
        plan = WindowPlan.of(new_shape, self.cm.patch_size, self.step_size)
        return {"data": data, "plan": plan, "order": order, "bbox": box, "shape_before": shape_before,
                "cropped": cropped, "network_spacing": target, "original_spacing": original_spacing}

    def _normaliser(self, c: int) -> Any:
        """nnU-Net's normalisation class of channel ``c`` with the fingerprint's intensity properties."""
        from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes

        cls = getattr(schemes, self.cm.normalization_schemes[c])
        return cls(use_mask_for_norm=self.cm.use_mask_for_norm[c],
                   intensityproperties=self.pm.foreground_intensity_properties_per_channel.get(str(c), {}))

    def _axes(self, kind: str, fn: Callable[..., Any], shape: tuple, new_shape: tuple, cur: Sequence[float],
              new: Sequence[float]) -> Resampling:
        key = (kind, shape, new_shape, tuple(cur), tuple(new))
        if key not in self._matrices:
            self._matrices[key] = resampler(fn, shape, new_shape, cur, new)
        return self._matrices[key]

    def _normalise(self, img: torch.Tensor, c: int, nonzero: torch.Tensor) -> torch.Tensor:
        """nnU-Net's normalisation scheme of channel ``c`` (torch, differentiable)."""
        scheme = self.cm.normalization_schemes[c]
        props = self.pm.foreground_intensity_properties_per_channel.get(str(c), {})
        eps = 1e-8
        if scheme == "ZScoreNormalization":
            if self.cm.use_mask_for_norm[c]:
                vals = img[nonzero]
                mean, std = vals.mean(), vals.std(unbiased=False)
                return torch.where(nonzero, (img - mean) / torch.clamp(std, min=eps), img)
            return (img - img.mean()) / torch.clamp(img.std(unbiased=False), min=eps)
        if scheme == "CTNormalization":
            img = torch.clamp(img, float(props["percentile_00_5"]), float(props["percentile_99_5"]))
            return (img - float(props["mean"])) / max(float(props["std"]), eps)
        if scheme == "RescaleTo01Normalization":
            img = img - img.min()
            return img / torch.clamp(img.max(), min=eps)
        if scheme == "RGBTo01Normalization":
            return img / 255.0
        return img

    def _to_scan(self, y: torch.Tensor, info: dict[str, Any], logits: bool) -> torch.Tensor:
        """Network-grid ``(K, *grid)`` -> scan grid ``(K, x, y, z)`` as nnU-Net exports probabilities."""
        rs = self._axes("probabilities", self.cm.resampling_fn_probabilities, tuple(y.shape[1:]),
                        info["cropped"], info["network_spacing"], info["original_spacing"])
        if logits:  # nnU-Net resamples the float16 logits with its own function, then the nonlinearity
            grad = torch.is_grad_enabled() and y.requires_grad
            back = self.cm.resampling_fn_probabilities(y.detach().half().cpu().numpy(), info["cropped"],
                                                       info["network_spacing"], info["original_spacing"])
            y = _exact(np.asarray(back), (lambda t=y: rs.apply(t).float()) if grad else None, y).float()
            y = self.lm.inference_nonlin(y)
        else:
            y = rs.apply(y).float()
        pad: list[int] = []
        for sl, n in zip(reversed(info["bbox"]), reversed(info["shape_before"])):
            pad.extend([sl.start, n - sl.stop])
        y = F.pad(y, pad)
        if logits and not self.lm.has_regions:  # background outside the non-zero box
            outside = F.pad(torch.zeros(tuple(b.stop - b.start for b in info["bbox"]), device=y.device), pad, value=1.0)
            y = torch.cat([y[:1] + outside, y[1:]])
        inverse = [0] * len(info["order"])
        for k, o in enumerate(info["order"]):
            inverse[o] = k
        return y.permute(0, *[i + 1 for i in inverse])

