"""The model-file source: TorchScript, state dict + class, pickled module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esegeta_engine.models.devices import resolve_device
from esegeta_engine.models.files import file_format, load_model
from esegeta_engine.models.sources import LoadedModel, ModelSource, Trust, register_source


def _detect(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in (".pt", ".pth", ".ts", ".pkl", ".bin")


def _load(cfg: Any, trust: Trust) -> LoadedModel:
    resolve_device(cfg.device)
    fmt = cfg.format
    if fmt == "auto" and Path(cfg.path).is_file():
        fmt = file_format(Path(cfg.path), cfg.class_path, trust.pickled)
    module = load_model(cfg.path, format=cfg.format, class_path=cfg.class_path, kwargs=cfg.kwargs,
                        trust_pickled=trust.pickled, device=cfg.device)
    desc: dict[str, Any] = {"source": fmt, "path": str(cfg.path)}
    if cfg.class_path:
        desc["class_path"] = cfg.class_path
    return LoadedModel(module, fmt, desc)


FILE = register_source(ModelSource("file", _detect, _load))
