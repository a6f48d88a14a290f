"""Devices and model classes named by import path (never by eval)."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from esegeta_engine.errors import ModelLoadError


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
