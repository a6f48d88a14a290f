"""Model files: TorchScript, state dict + class, and (trusted) pickled modules.

Three registered sources (see :mod:`esegeta_engine.models.sources`) and
:func:`load_model`, which loads any of them from a path.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from esegeta_engine.errors import ModelLoadError, PickledModuleError
from esegeta_engine.models.devices import import_class, resolve_device

ModelFormat = Literal["auto", "torchscript", "state_dict", "pickled_module"]


def _is_torchscript_file(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist())


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            "the file holds a checkpoint that is not a state dict of tensors",
            "save the model with torch.save(model.state_dict(), path) or as TorchScript",
        )
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_model(
    path: str | Path,
    *,
    format: ModelFormat = "auto",
    class_path: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    trust_pickled: bool = False,
    device: str = "cpu",
) -> nn.Module:
    """Load a model file in eval mode on ``device``.

    Parameters
    ----------
    path : str or Path
        TorchScript file, state dict file or (with ``trust_pickled``) a fully
        pickled ``nn.Module``.
    format : {"auto", "torchscript", "state_dict", "pickled_module"}
        ``auto`` recognises TorchScript archives and otherwise reads a state
        dict with ``weights_only=True``.
    class_path : str, optional
        ``package.module:Class`` to build before loading a state dict. The
        module is imported, so its import-time code runs.
    kwargs : mapping, optional
        Constructor keyword arguments for ``class_path``.
    trust_pickled : bool
        Allow unpickling a whole module (runs arbitrary code from the file).
        Only ever from the person running the command (``--trust-pickled``,
        a confirmation in napari), never from a config file.
    device : str
        ``"cpu"`` or ``"cuda:N"``.

    Raises
    ------
    ModelLoadError
        With a message naming the problem and the fix.
    """
    path = Path(path)
    dev = resolve_device(device)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist", "check model.path")
    if not _is_torchscript_file(path):  # a whole TorchScript model (a bundle's model.ts) loads as it is
        _refuse_part_of_a_folder(path, class_path)
    if format == "auto":
        format = file_format(path, class_path, trust_pickled)
    if format == "torchscript":
        return load_torchscript(path, dev)
    if format == "pickled_module":
        return load_pickled_module(path, dev, trust_pickled)
    return load_state_dict_model(path, dev, class_path, kwargs)


def _refuse_part_of_a_folder(path: Path, class_path: str | None) -> None:
    """One fold's nnU-Net checkpoint or a bundle's ``models/model.pt`` given as a model file: name the folder."""
    folder = path.resolve().parent.parent
    if path.parent.name.startswith("fold_") and (folder / "plans.json").is_file():
        raise ModelLoadError(f"{path.name} is one fold's checkpoint of the nnU-Net model in {folder}",
                             f"give the folder: --nnunet {folder} (model: {{nnunet: DIR}}), with --folds "
                             f"{path.parent.name.removeprefix('fold_')} for this fold alone")
    if class_path is None and path.parent.name == "models" and (folder / "configs").is_dir():
        raise ModelLoadError(f"{path.name} holds the weights of the MONAI bundle in {folder}",
                             f"give the folder: --bundle {folder} (model: {{bundle: DIR}})")


def file_format(path: Path, class_path: str | None = None, trust_pickled: bool = False) -> ModelFormat:
    """What a model file holds: ``torchscript``, ``state_dict`` or (trusted, no class) ``pickled_module``."""
    if _is_torchscript_file(path):
        return "torchscript"
    return "pickled_module" if class_path is None and trust_pickled else "state_dict"


def load_torchscript(path: Path, dev: torch.device) -> nn.Module:
    """A TorchScript archive, in eval mode on ``dev``."""
    try:
        model = torch.jit.load(str(path), map_location=dev)
    except Exception as exc:  # torch raises several types for bad archives
        raise ModelLoadError(f"{path.name} is not a loadable TorchScript file ({exc.__class__.__name__})",
                             "export it with torch.jit.script(model).save(path)") from None
    return model.eval()


def load_pickled_module(path: Path, dev: torch.device, trust_pickled: bool) -> nn.Module:
    """A whole pickled ``nn.Module`` (only with ``trust_pickled``: unpickling runs code)."""
    if not trust_pickled:
        raise PickledModuleError(
            f"{path.name} is a pickled nn.Module; unpickling runs code from the file",
            "save a state dict or TorchScript instead, or, if you trust where the file came from, "
            "pass --trust-pickled (in napari, confirm loading it)",
        )
    try:
        obj = torch.load(str(path), map_location=dev, weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"{path.name} cannot be unpickled: {exc}",
                             "check the file and that the model's package is importable") from None
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{path.name} does not hold an nn.Module but {type(obj).__name__}",
                             "use model.format: state_dict with model.class_path")
    return obj.eval()


def read_weights(path: Path, dev: torch.device, trust_pickled: bool = False, name: str | None = None) -> Any:
    """``torch.load`` with ``weights_only=True`` (or, trusted, without), with readable errors.

    Raises
    ------
    PickledModuleError
        Naming the Python object the file needs and the ``--trust-pickled`` choice.
    """
    try:
        return torch.load(str(path), map_location=dev, weights_only=not trust_pickled)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # junk bytes, not pickled objects
            raise ModelLoadError(f"{path.name} is not a PyTorch model file (it cannot be unpickled)",
                                 "give a TorchScript file or a state dict saved with torch.save") from None
        needs = _unsupported_global(str(exc))
        raise PickledModuleError(
            f"{name or path.name} holds pickled Python objects{needs} that loading with weights_only=True refuses",
            "save torch.save(model.state_dict(), path) or TorchScript; or, if you trust the file, "
            "pass --trust-pickled (in napari, confirm loading it)",
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a PyTorch model file ({exc.__class__.__name__})",
                             "give a TorchScript file or a state dict saved with torch.save") from None


def _unsupported_global(message: str) -> str:
    """`` (e.g. numpy.dtype)``: the object torch named in its refusal, if it did."""
    import re

    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return f" ({m.group(1)})" if m else " (probably a whole nn.Module)"


def load_state_dict_model(path: Path, dev: torch.device, class_path: str | None,
                          kwargs: Mapping[str, Any] | None) -> nn.Module:
    """``class_path(**kwargs)`` with the state dict in ``path`` (read with ``weights_only=True``)."""
    state_dict = _unwrap_state_dict(read_weights(path, dev))
    if class_path is None:
        raise ModelLoadError(
            f"{path.name} is a state dict; the model class is needed to use it",
            "give model.class_path (e.g. mypackage.nets:UNet) and model.kwargs",
        )
    cls = import_class(class_path)
    try:
        model = cls(**dict(kwargs or {}))
    except TypeError as exc:
        raise ModelLoadError(f"cannot build {class_path} with kwargs {dict(kwargs or {})}: {exc}",
                             "fix model.kwargs to match the class's constructor") from None
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        raise ModelLoadError(f"the state dict in {path.name} does not fit {class_path}: "
                             f"{mismatch(model.state_dict(), state_dict)}",
                             "check model.class_path and model.kwargs (e.g. channel counts) match "
                             "the model that was saved") from None
    return model.to(dev).eval()


def mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """A short account of why a state dict does not fit a model."""
    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in given and given[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} parameter(s) missing from the file ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected in the file ({few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (file vs class: {few(shapes)})")
    return "; ".join(parts) or "incompatible tensors"
