"""Model loading, output selection, layer listing, devices, and the guard that
leaves a user's model exactly as it was after any run."""

from __future__ import annotations

import contextlib
import importlib
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from esegeta_engine.errors import ModelLoadError, PickledModuleError

ModelFormat = Literal["auto", "torchscript", "state_dict", "pickled_module"]


def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    ModelLoadError
        If the device does not exist on this machine.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"unknown device {name!r}", "use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {name!r} was asked for but this machine has no usable CUDA GPU",
                "use device 'cpu', or install a CUDA build of torch",
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s) visible",
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}",
            )
    elif device.type != "cpu":
        raise ModelLoadError(f"device {name!r} is not supported", "use 'cpu' or 'cuda:N'")
    return device


def import_class(path: str) -> type:
    """Import ``package.module:Class`` (or ``package.module.Class``) without eval.

    Importing a module runs its import-time code: a class path is as trusted
    as the package it names, so take it only from configs you trust.

    Raises
    ------
    ModelLoadError
        If the module or the class cannot be found.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr or not all(p.isidentifier() for p in [*module_name.split("."), *attr.split(".")]):
        raise ModelLoadError(
            f"model class path {path!r} is not of the form package.module:Class",
            "give the import path of your model class, e.g. mypackage.nets:UNet",
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import module {module_name!r} for the model class: {exc}",
            "install the package that defines your model, or add its folder to PYTHONPATH",
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"module {module_name!r} has no attribute {attr!r}",
                                 "check the class name in model.class_path")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelLoadError(f"{path!r} is not an nn.Module subclass", "point model.class_path at your model class")
    return obj


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
    """Load a model in eval mode on ``device``.

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
    if format == "auto":
        format = "torchscript" if _is_torchscript_file(path) else "state_dict"
        if format == "state_dict" and class_path is None and trust_pickled:
            format = "pickled_module"
    if format == "torchscript":
        try:
            model = torch.jit.load(str(path), map_location=dev)
        except Exception as exc:  # torch raises several types for bad archives
            raise ModelLoadError(f"{path.name} is not a loadable TorchScript file ({exc.__class__.__name__})",
                                 "export it with torch.jit.script(model).save(path)") from None
        return model.eval()
    if format == "pickled_module":
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
    # state dict
    try:
        obj = torch.load(str(path), map_location=dev, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # junk bytes, not a pickled module
            raise ModelLoadError(f"{path.name} is not a PyTorch model file (it cannot be unpickled)",
                                 "give a TorchScript file or a state dict saved with torch.save") from None
        raise PickledModuleError(
            f"{path.name} is not a plain state dict (it holds pickled Python objects, "
            "probably a whole nn.Module)",
            "save torch.save(model.state_dict(), path) or TorchScript; or, if you trust the file, "
            "pass --trust-pickled (in napari, confirm loading it)",
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a PyTorch model file ({exc.__class__.__name__})",
                             "give a TorchScript file or a state dict saved with torch.save") from None
    state_dict = _unwrap_state_dict(obj)
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
                             f"{_mismatch(model.state_dict(), state_dict)}",
                             "check model.class_path and model.kwargs (e.g. channel counts) match "
                             "the model that was saved") from None
    return model.to(dev).eval()


def _mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
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


class OutputSelector(nn.Module):
    """Wrap a model whose output is a tuple, list or dict, returning one tensor.

    Parameters
    ----------
    model : nn.Module
        The user's model (not copied, not changed).
    output : int, str or None
        Index or key of the output to explain; ``None`` requires a tensor output.
    """

    def __init__(self, model: nn.Module, output: int | str | None = None) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_output(self.model(x), self.output)


def select_output(out: Any, output: int | str | None) -> torch.Tensor:
    """Pick one tensor from a model's output (see :class:`OutputSelector`)."""
    if isinstance(out, torch.Tensor):
        if output not in (None, 0):
            raise ModelLoadError(f"model.output is {output!r} but the model returns a single tensor",
                                 "remove model.output")
        return out
    if isinstance(out, Mapping):
        keys = list(out)
        if output is None or output not in out:
            raise ModelLoadError(f"the model returns a dict with keys {keys}; model.output is {output!r}",
                                 f"set model.output to one of {keys}")
        return out[output]
    if isinstance(out, (tuple, list)):
        if output is None or not isinstance(output, int) or not -len(out) <= output < len(out):
            raise ModelLoadError(
                f"the model returns {len(out)} outputs (deep supervision?); model.output is {output!r}",
                f"set model.output to an index 0..{len(out) - 1} (usually 0, the full-resolution output)",
            )
        return out[output]
    raise ModelLoadError(f"the model returned {type(out).__name__}, not a tensor", "wrap it to return a tensor")


def list_layers(model: nn.Module) -> list[tuple[str, str]]:
    """Return ``(name, type)`` of every named submodule, in registration order.

    These names are what layer methods accept in ``layers: [...]``.
    """
    return [(name, type(m).__name__) for name, m in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return submodule ``name`` (dotted path) without eval.

    Raises
    ------
    ModelLoadError
        If no module has that name; the message lists a few that exist.
    """
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    import difflib

    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
    raise ModelLoadError(
        f"the model has no layer named {name!r}",
        ("closest names: " + ", ".join(close) + "; " if close else "")
        + "run `esegeta layers MODEL` for the full list",
    )


def is_torchscript(model: nn.Module) -> bool:
    """True if ``model`` (or what it wraps) is a TorchScript module."""
    return any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for a run, and restore it afterwards.

    On exit — normal, error or cancellation — the training flag and
    ``requires_grad`` of every module/parameter are restored and any hook that
    was added during the run and not removed is removed. Parameters and
    buffers are not touched by the engine; tests check they stay equal.
    """
    modules = list(model.modules())
    training = [m.training for m in modules]
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    hooks: list[tuple[nn.Module, str, set[Any]]] = []
    for m in modules:
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if isinstance(d, dict):
                hooks.append((m, attr, set(d.keys())))
    model.eval()
    try:
        yield model
    finally:
        for m, flag in zip(modules, training):
            m.training = flag
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        for m, attr, before in hooks:
            d = getattr(m, attr)
            for key in [k for k in d if k not in before]:
                del d[key]
