"""A MONAI bundle's own transforms, run with gradients: preprocessing, activation, ``Invertd``.

The bundle's ``preprocessing`` Compose is run transform by transform on the scan as the
engine reads it (a ``MetaTensor`` with the NIfTI's affine, channels first): the loading
transforms (``LoadImaged``, ``EnsureChannelFirstd``) are the engine's own reading and are
skipped; every other transform is MONAI's own object, run on torch tensors, so autograd
passes through it. ``Invertd`` is run as MONAI runs it (the inverse of its ``transform``
with the original image's applied operations, ``nearest_interp`` honoured) without the
``detach`` MONAI adds, so the gradient passes back to the scan's grid too. Tests compare
the numbers with MONAI's own ``Invertd``.

Transforms that cannot be run this way are refused by name: random transforms (an
explanation of a random function is not reproducible), and any transform after which the
gradient no longer reaches the scan (found on a probe volume when the bundle is loaded).
Label post-processing after the probabilities (``AsDiscreted``, ``SaveImaged``, connected
components) is not part of the explained function and is skipped (recorded).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from esegeta_engine.errors import ModelLoadError
from esegeta_engine.forward.sliding import WindowSettings

LOADING = ("LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "AsChannelFirstd")
LABELS = ("AsDiscreted", "AsDiscrete", "SaveImaged", "SaveImage", "KeepLargestConnectedComponentd",
          "FillHolesd", "RemoveSmallObjectsd", "LabelFilterd", "CopyItemsd", "DeleteItemsd", "SplitDimd")
PRED = "pred"


def _flat(compose: Any, what: str) -> list[Any]:
    """The transforms of a bundle's Compose (nested ones flattened); None -> []."""
    from monai.transforms import Compose

    if compose is None:
        return []
    if isinstance(compose, Compose):
        return list(compose.flatten().transforms)
    if isinstance(compose, Sequence):
        return list(compose)
    if callable(compose):
        return [compose]
    raise ModelLoadError(f"the bundle's {what} is a {type(compose).__name__}, not a list of transforms",
                         f"give {what} as a MONAI Compose")


@dataclass
class BundleSteps:
    """The bundle's transforms around the network (see the module docstring)."""

    key: str
    pre: list[Any]
    post: list[Any]
    skipped: list[str] = field(default_factory=list)
    activation: str | None = None
    inverted: bool = False

    @classmethod
    def of(cls, preprocessing: Any, postprocessing: Any) -> BundleSteps:
        """Sort the bundle's transforms; refuse the ones that cannot run with gradients."""
        from monai.transforms import Activationsd, Invertd, MapTransform, Randomizable

        key, pre, post, skipped = "image", [], [], []
        for t in _flat(preprocessing, "preprocessing"):
            name = type(t).__name__
            if isinstance(t, Randomizable):
                raise ModelLoadError(f"the bundle's preprocessing holds the random transform {name}: a random "
                                     "function cannot be explained reproducibly",
                                     f"remove {name} from the inference config's preprocessing (a copy of the "
                                     "bundle)")
            if name in LOADING:
                if name.startswith("Load") and isinstance(t, MapTransform):
                    key = str(t.keys[0])
                skipped.append(f"{name} (the engine reads the scan, channels first)")
                continue
            pre.append(t)
        activation = None
        for t in _flat(postprocessing, "postprocessing"):
            name = type(t).__name__
            if name in LABELS:
                skipped.append(f"{name} (label post-processing after the probabilities)")
                continue
            if isinstance(t, Randomizable):
                raise ModelLoadError(f"the bundle's postprocessing holds the random transform {name}",
                                     f"remove {name} from the inference config's postprocessing (a copy)")
            if isinstance(t, Activationsd):
                on = [i for i, k in enumerate(t.keys) if k == PRED]
                if on:
                    i = on[0]
                    activation = "softmax" if t.softmax[i] else ("sigmoid" if t.sigmoid[i] else activation)
            elif not isinstance(t, Invertd) and not getattr(t, "keys", None):
                raise ModelLoadError(f"the bundle's postprocessing holds {name}, which is not a dictionary "
                                     "transform we can run on the prediction",
                                     f"remove {name} from the inference config's postprocessing (a copy)")
            post.append(t)
        inverted = any(isinstance(t, Invertd) for t in post)
        return cls(key, pre, post, skipped, activation, inverted)

    # -- running --------------------------------------------------------------------------
    def preprocess(self, scan: torch.Tensor, affine: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
        """The scan ``(C, *spatial)`` through the preprocessing: a dict whose ``key`` is on the network's grid."""
        from monai.data import MetaTensor

        aff = torch.as_tensor(np.asarray(affine, dtype=np.float64))
        info = {"original_affine": aff.clone(), "spatial_shape": np.asarray(scan.shape[1:]),
                "original_channel_dim": -1 if scan.shape[0] > 1 else float("nan"), **meta}
        # a copy: MONAI's intensity transforms write in place, which autograd refuses on a view of a leaf
        d: dict[str, Any] = {self.key: MetaTensor(scan.clone(), affine=aff, meta=info)}
        for t in self.pre:
            d = t(d)
        return d

    def postprocess(self, pred: torch.Tensor, item: dict[str, Any]) -> torch.Tensor:
        """The network's output ``(K, *grid)`` through activation and inversion to the scan's grid."""
        d = dict(item)
        d[PRED] = pred
        d = self._run_post(d, self.post)
        if not self.inverted:  # no Invertd: back to the scan's grid with the preprocessing's inverse
            d[PRED] = self.invert_map(d[PRED], item)
        return _plain(d[PRED])

    def invert_map(self, m: torch.Tensor, item: dict[str, Any]) -> torch.Tensor:
        """A ``(K, *grid)`` tensor on the network's grid -> the scan's grid, as the probabilities go back."""
        from monai.transforms import Compose, Invertd

        inv = next((t for t in self.post if isinstance(t, Invertd)), None)
        if inv is None:
            return _plain(_invert(Compose(self.pre), self.key, False, m, item))
        i = list(inv.keys).index(PRED) if PRED in inv.keys else 0
        return _plain(_invert(inv.transform, inv.orig_keys[i], bool(inv.nearest_interp[i]), m, item))

    def _run_post(self, d: dict[str, Any], transforms: list[Any]) -> dict[str, Any]:
        from monai.transforms import Invertd

        for t in transforms:
            if isinstance(t, Invertd):
                for i, k in enumerate(t.keys):
                    if k in d:
                        out = _invert(t.transform, t.orig_keys[i], bool(t.nearest_interp[i]), d[k], d)
                        post_func = t.post_func[i]
                        d[k] = post_func(out) if callable(post_func) else out
            else:
                if any(k in d for k in t.keys):
                    d = _present(t)(d)
        return d

    # -- checks ---------------------------------------------------------------------------
    def probe(self, channels: int, spatial_dims: int) -> None:
        """Run the transforms on a small volume with gradients; refuse the one that cuts them.

        Raises
        ------
        ModelLoadError
            Naming the transform after which the gradient no longer reaches the scan, or a
            bundle whose output does not come back to the scan's grid.
        """
        from monai.data import MetaTensor

        shape = (10, 9, 8)[:spatial_dims]
        scan = (torch.rand((channels, *shape)) * 100).requires_grad_(True)
        aff = np.diag([1.3, 0.9, 1.7, 1.0][:spatial_dims] + [1.0])
        d: dict[str, Any] = {self.key: MetaTensor(scan.clone(), affine=torch.as_tensor(aff),
                                                  meta={"original_channel_dim": float("nan")})}
        for t in self.pre:
            try:
                d = t(d)
            except Exception as exc:  # noqa: BLE001 - a transform that cannot take a torch tensor
                raise _cut(type(t).__name__, "preprocessing", f"it fails on a torch tensor: {exc}") from None
            if not _connected(d.get(self.key), scan):
                raise _cut(type(t).__name__, "preprocessing", "the gradient no longer reaches the scan after it")
        net_out = _plain(d[self.key]).clone()
        out = self.postprocess(net_out, d)
        if tuple(out.shape[1:]) != shape:
            raise ModelLoadError(f"the bundle's prediction does not come back to the scan's grid (a probe of shape "
                                 f"{shape} comes back as {tuple(out.shape[1:])})",
                                 "add Invertd(keys='pred', transform='@preprocessing', orig_keys=...) to the "
                                 "postprocessing of a copy of the bundle")
        if not _connected(out, scan):
            raise _cut("Invertd", "postprocessing", "the gradient no longer reaches the scan after it")


def window_settings(inferer: Any) -> tuple[WindowSettings | None, dict[str, Any]]:
    """The bundle's inferer as our sliding-window settings (None: whole volume) and its record.

    Raises
    ------
    ModelLoadError
        For an inferer, or a setting of one, that we do not run exactly.
    """
    name = type(inferer).__name__ if inferer is not None else "SimpleInferer"
    if name == "SimpleInferer":
        return None, {"inferer": name}
    if name != "SlidingWindowInferer":
        raise ModelLoadError(f"the bundle's inferer {name} is not one we run with gradients",
                             "use a SimpleInferer or SlidingWindowInferer in a copy of the bundle's inference "
                             "config")
    roi = tuple(int(r) for r in np.atleast_1d(inferer.roi_size))
    overlap = np.atleast_1d(np.asarray(inferer.overlap, dtype=float))
    if any(r <= 0 for r in roi) or len(set(overlap.tolist())) > 1 or float(inferer.cval) != 0.0 \
            or getattr(inferer, "with_coord", False):
        raise ModelLoadError(f"the bundle's SlidingWindowInferer uses settings we do not reproduce (roi_size {roi}, "
                             f"overlap {overlap.tolist()}, cval {inferer.cval})",
                             "give a positive roi_size per axis, one overlap and cval 0 in a copy of the config")
    mode = getattr(inferer.mode, "value", inferer.mode)
    padding = getattr(inferer.padding_mode, "value", inferer.padding_mode)
    sigma = inferer.sigma_scale
    settings = WindowSettings(roi, float(overlap[0]), str(mode), int(inferer.sw_batch_size), str(padding),
                              sigma if isinstance(sigma, float) else tuple(sigma))
    return settings, {"inferer": name, "patch_size": list(roi), "overlap": float(overlap[0]), "blend": str(mode),
                      "sw_batch_size": int(inferer.sw_batch_size), "padding": str(padding)}


# -- helpers ------------------------------------------------------------------------------

def _plain(t: Any) -> torch.Tensor:
    from monai.data import MetaTensor

    return t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)


def _invert(transform: Any, orig_key: str, nearest: bool, m: torch.Tensor, item: dict[str, Any]) -> torch.Tensor:
    """``Invertd``'s inversion of ``m`` with ``item[orig_key]``'s operations, without its detach."""
    from monai.data import MetaTensor
    from monai.transforms import allow_missing_keys_mode, convert_applied_interp_mode

    orig = item[orig_key]
    ops = orig.applied_operations
    if nearest:
        ops = convert_applied_interp_mode(trans_info=ops, mode="nearest", align_corners=None)
    x = MetaTensor(_plain(m), meta=copy.deepcopy(orig.meta), applied_operations=copy.deepcopy(ops))
    with allow_missing_keys_mode(transform):
        return transform.inverse({orig_key: x})[orig_key]


def _present(t: Any) -> Callable[[dict], dict]:
    """``t`` on the keys present (a transform over pred and label runs on pred; the bundle's object unchanged)."""
    if getattr(t, "allow_missing_keys", True):
        return t
    t = copy.copy(t)
    t.allow_missing_keys = True
    return t


def _connected(value: Any, scan: torch.Tensor) -> bool:
    if not isinstance(value, torch.Tensor) or not value.requires_grad:
        return False
    (g,) = torch.autograd.grad(_plain(value).float().sum(), scan, allow_unused=True, retain_graph=True)
    return g is not None


def _cut(name: str, where: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"the transform {name} of the bundle's {where} cannot be explained through: {why}",
                          f"remove {name} from a copy of the bundle's inference config, or export the network and "
                          "explain it with model.path and a matching preprocess section")
