"""Embedded default sample: procedural TOF-MRA-like phantoms and small models.

The package ships two trained models in :data:`DATA_DIR` (see
``python -m esegeta_engine.sample.train`` for how they were made):

* ``unet3d_vessels``: a 3D :class:`UNet` segmenting vessels (2-class logits)
  in :func:`make_phantom` volumes;
* ``classifier2d``: a :class:`TinyClassifier2D` telling whether a 2D
  :func:`make_phantom_2d` slice contains an in-plane vessel segment.

Both consume arrays in NIfTI (x, y, z) voxel order, min-max normalised to
[0, 1] over the whole image (:func:`minmax_normalise`), with batch and
channel dimensions added; ``sample_info()["preprocess"]`` records this.

Examples
--------
>>> from esegeta_engine.sample import load_sample_unet, make_phantom, predict_mask
>>> ph = make_phantom(seed=12345)
>>> pred = predict_mask(load_sample_unet(), ph.volume)
>>> pred.shape == ph.volume.shape
True
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from esegeta_engine.sample.nets import TinyClassifier2D, UNet
from esegeta_engine.sample.phantom import (
    Phantom,
    Phantom2D,
    make_phantom,
    make_phantom_2d,
    minmax_normalise,
    save_phantom_nifti,
)

__all__ = [
    "DATA_DIR",
    "Phantom",
    "Phantom2D",
    "TinyClassifier2D",
    "UNet",
    "classifier_paths",
    "load_sample_classifier",
    "load_sample_unet",
    "make_phantom",
    "make_phantom_2d",
    "minmax_normalise",
    "predict_mask",
    "sample_info",
    "save_phantom_nifti",
    "unet_paths",
]

#: Folder holding the shipped weights and ``sample_info.json``.
DATA_DIR: Path = Path(__file__).resolve().parent / "data"

_UNET = "unet3d_vessels"
_CLASSIFIER = "classifier2d"
ModelKind = Literal["state", "torchscript"]


def sample_info() -> dict[str, Any]:
    """Return the parsed ``sample_info.json`` (models, preprocessing, metrics).

    Returns
    -------
    dict
        Keys ``preprocess`` and ``models`` (per model: ``class_path``,
        ``kwargs``, ``input_shape``, ``files``, ``training``, ``evaluation``).
    """
    return json.loads((DATA_DIR / "sample_info.json").read_text())


def _paths(name: str) -> dict[str, Path]:
    files = sample_info()["models"][name]["files"]
    return {kind: DATA_DIR / fname for kind, fname in files.items()}


def unet_paths() -> dict[str, Path]:
    """Paths of the shipped 3D U-Net weights.

    Returns
    -------
    dict
        ``{"state": Path, "torchscript": Path}``.
    """
    return _paths(_UNET)


def classifier_paths() -> dict[str, Path]:
    """Paths of the shipped 2D classifier weights.

    Returns
    -------
    dict
        ``{"state": Path, "torchscript": Path}``.
    """
    return _paths(_CLASSIFIER)


def _load(name: str, cls: type[nn.Module], kind: ModelKind) -> nn.Module:
    entry = sample_info()["models"][name]
    path = DATA_DIR / entry["files"][kind]
    if kind == "torchscript":
        with warnings.catch_warnings():  # the sample ships TorchScript on purpose
            warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)
            model: nn.Module = torch.jit.load(str(path), map_location="cpu")
    elif kind == "state":
        kwargs = dict(entry["kwargs"])
        if "features" in kwargs:
            kwargs["features"] = tuple(kwargs["features"])
        model = cls(**kwargs)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        raise ValueError(f"kind must be 'state' or 'torchscript', got {kind!r}")
    return model.eval()


def load_sample_unet(kind: ModelKind = "state") -> nn.Module:
    """Load the shipped 3D vessel U-Net in eval mode on the CPU.

    Parameters
    ----------
    kind : {"state", "torchscript"}
        Rebuild :class:`UNet` from the state dict, or load the TorchScript file.

    Returns
    -------
    torch.nn.Module
        Model mapping (N, 1, X, Y, Z) in [0, 1] to (N, 2, X, Y, Z) logits.
    """
    return _load(_UNET, UNet, kind)


def load_sample_classifier(kind: ModelKind = "state") -> nn.Module:
    """Load the shipped 2D vessel classifier in eval mode on the CPU.

    Parameters
    ----------
    kind : {"state", "torchscript"}
        Rebuild :class:`TinyClassifier2D` from the state dict, or load TorchScript.

    Returns
    -------
    torch.nn.Module
        Model mapping (N, 1, X, Y) in [0, 1] to (N, 2) logits.
    """
    return _load(_CLASSIFIER, TinyClassifier2D, kind)


def predict_mask(model: nn.Module, volume: np.ndarray, normalise: bool = True) -> np.ndarray:
    """Segment one image with a segmentation model (argmax over classes).

    Parameters
    ----------
    model : torch.nn.Module
        Model returning logits (N, K, *spatial); used as is (call ``.eval()``).
    volume : numpy.ndarray
        Image in NIfTI (x, y, z) order, without batch or channel dims.
    normalise : bool
        Apply :func:`minmax_normalise` first (the sample models expect it).

    Returns
    -------
    numpy.ndarray
        uint8 label map with the shape of ``volume``.
    """
    arr = minmax_normalise(volume) if normalise else np.asarray(volume, dtype=np.float32)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(arr))[None, None].to(device))
    return logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
