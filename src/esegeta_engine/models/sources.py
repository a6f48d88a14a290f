"""Where a model comes from: registered sources that detect, load and describe.

A source is one small module with a :class:`ModelSource` registration: the model
files (TorchScript, state dict + class, pickled module; :mod:`.files`), an nnU-Net v2
results folder (:mod:`.nnunet`) and a MONAI bundle (:mod:`.bundle`). Every caller
(pipeline, CLI, plugin, cohorts) goes through :func:`load_source`; a new format is one
module and one :func:`register_source` line.

What the person running the command trusts (``--trust-pickled``, ``--trust-bundle``,
a confirmation in napari) travels in :class:`Trust`, never in a config.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from esegeta_engine.errors import ModelLoadError, TargetError, VolumeShapeError

log = logging.getLogger("esegeta_engine")

if TYPE_CHECKING:  # pragma: no cover
    from esegeta_engine.config import ModelConfig


@dataclass(frozen=True)
class Trust:
    """Decisions of the person running the command (never read from a config)."""

    pickled: bool = False
    bundle: bool = False


@dataclass
class LoadedModel:
    """A loaded model and what the engine needs to know about its source.

    Attributes
    ----------
    module : nn.Module
        The function to explain, in eval mode on its device.
    source : str
        Registered source name (``torchscript``, ``state_dict``, ``pickled_module``,
        ``nnunet``, ``bundle``).
    description : dict
        JSON-able account of what was loaded (files, folds, settings) for the manifest.
    class_names : list of str, optional
        Output channel names when the source states them (dataset.json, metadata.json).
    preprocess : dict
        Keys of the ``preprocess`` section the source decides (a deployed pipeline does
        its own preprocessing; the engine then hands it the scan as it is).
    grid : str
        Which grid maps of input attributions are computed on (for each map's record).
    """

    module: nn.Module
    source: str
    description: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    grid: str = "model input"
    execution: dict[str, Any] = field(default_factory=dict)
    outputs: str = "logits"
    input_note: str | None = None

    def class_error(self, kind: str, classes: list[int] | None, components: bool = False) -> Exception | None:
        """Configured ``classes`` a source that names its output channels (nnU-Net's ``dataset.json``)
        cannot have, known before any model evaluation; ``None`` when they fit or the count is unknown.

        Only targets whose scores are the output channels (``argmax``, ``roi``, ``voxel``,
        ``classification``) are checked; the run checks every target again on the prediction.
        """
        if self.source != "nnunet" or not self.class_names or not classes or components \
                or kind not in ("argmax", "roi", "voxel", "classification"):
            return None
        n = len(self.class_names)
        bad = [c for c in classes if not 0 <= c < n]
        if not bad:
            return None
        names = ", ".join(f"{i} {name}" for i, name in enumerate(self.class_names))
        return TargetError(f"target.classes {bad} do not exist: the model has {n} output channels ({names})",
                           f"use classes in 0..{n - 1}")

    def volume_error(self, exc: Exception) -> Exception:
        """A volume the source cannot take, said in the source's terms (e.g. dataset.json's channels)."""
        if self.input_note is None or not isinstance(exc, VolumeShapeError):  # a missing or corrupt file: as is
            return exc
        if not getattr(exc, "channel_axis", True):  # too few axes (a 2D image): the source's dimension, not channels
            n = self.preprocess.get("spatial_dims", 3)
            return type(exc)(exc.problem,  # type: ignore[attr-defined]
                             f"give a {n}D scan: this model takes {n}D scans only (its dimension is fixed by the model)")
        return type(exc)(f"{exc.problem}: {self.input_note}",  # type: ignore[attr-defined]
                         "give a volume with those channels (a 4D NIfTI, channels last, for several)")

    def configure(self, cfg: Any) -> Any:
        """``cfg`` with the preprocess and execution keys this source decides (a copy when any)."""
        if not self.preprocess and not self.execution:
            return cfg
        _say_overridden(self.source, cfg.preprocess, self.preprocess, "preprocess")
        _say_overridden(self.source, cfg.execution, self.execution, "execution")
        cfg = cfg.model_copy(deep=True)
        pre = dict(self.preprocess)
        n, order = pre.get("spatial_dims"), cfg.preprocess.axis_order
        if n is not None and "axis_order" not in pre and len(order) != n and order == "xyz"[:len(order)]:
            pre["axis_order"] = "xyz"[:n]  # the default order follows the source's dimension (a 2D bundle)
        if pre:  # validated together: spatial_dims and axis_order must agree
            cfg.preprocess = type(cfg.preprocess).model_validate({**cfg.preprocess.model_dump(), **pre})
        for key, value in self.execution.items():
            setattr(cfg.execution, key, value)
        return cfg


def _say_overridden(source: str, section: Any, decided: dict[str, Any], name: str) -> None:
    """Warn of each key the user set (not its default) that the source's own pipeline decides otherwise."""
    fields = type(section).model_fields
    for key, value in decided.items():
        given = getattr(section, key, None)
        if key in fields and given != fields[key].get_default(call_default_factory=True) and given != value:
            log.warning("%s.%s %r is not used: the %s model's own pipeline decides it (%r)", name, key, given,
                        source, value)
    if decided.get("mode") == "whole" and getattr(section, "patch_size", None) is not None:
        log.warning("%s.patch_size %r is not used: the %s model runs its own sliding window", name,
                    section.patch_size, source)


@dataclass(frozen=True)
class ModelSource:
    """One registered model source.

    Attributes
    ----------
    name : str
        Source name (also the config key that selects it, for folder sources).
    detect : callable
        ``detect(path) -> bool``: does this file or folder hold this kind of model?
    load : callable
        ``load(cfg: ModelConfig, trust: Trust) -> LoadedModel``.
    module : str
        Module that registers it (imported on first use, so optional dependencies such as
        nnunetv2 or MONAI's bundle parser are only imported when a model needs them).
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., LoadedModel]


_SOURCES: dict[str, ModelSource] = {}
_MODULES = ("esegeta_engine.models.files_source", "esegeta_engine.models.nnunet.source",
            "esegeta_engine.models.bundle")


def register_source(source: ModelSource) -> ModelSource:
    """Add a model source to the registry (one line in the source's module)."""
    _SOURCES[source.name] = source
    return source


def sources() -> dict[str, ModelSource]:
    """Every registered source by name."""
    for name in _MODULES:
        importlib.import_module(name)
    return dict(_SOURCES)


def detect_source(path: str | Path) -> str | None:
    """The source kind of a file or folder (``nnunet``, ``bundle``, a file format), or None."""
    p = Path(path)
    for name, src in sources().items():
        try:
            if src.detect(p):
                return name
        except OSError:
            continue
    return None


def selected_source(cfg: ModelConfig) -> str:
    """The source a model config names: ``nnunet``, ``bundle`` or ``file``."""
    if getattr(cfg, "nnunet", None) is not None:
        return "nnunet"
    if getattr(cfg, "bundle", None) is not None:
        return "bundle"
    return "file"


def load_source(cfg: ModelConfig, trust: Trust | None = None) -> LoadedModel:
    """Load the model a config's ``model`` section names, through its registered source.

    Raises
    ------
    ModelLoadError
        One line naming the file and the fix.
    """
    trust = trust or Trust()
    kind = selected_source(cfg)
    if kind == "file" and cfg.path is None:
        raise ModelLoadError("the model section names no model",
                             "give model.path (a file), model.nnunet (a results folder) or model.bundle")
    return sources()[kind].load(cfg, trust)


def source_files(cfg: ModelConfig) -> list[Path]:
    """The files that define the model (what its fingerprint hashes): the file, or a folder's model files.

    nnU-Net: ``plans.json``, ``dataset.json`` and each ``fold_*/<checkpoint>``; a bundle: its ``configs/``
    files and ``models/model.pt``/``model.ts`` (never the outputs or logs a folder also holds).

    Raises
    ------
    ModelLoadError
        If the file or folder does not exist.
    """
    path = source_path(cfg)
    if path is None or not Path(path).exists():
        raise ModelLoadError(f"model {str(path)!r} does not exist", "check the model's path / nnunet / bundle entry")
    path = Path(path)
    kind = selected_source(cfg)
    if kind == "file":
        return [path]
    if kind == "nnunet":
        files = [path / "plans.json", path / "dataset.json", *sorted(path.glob(f"fold_*/{cfg.checkpoint}"))]
    else:
        files = [*sorted(p for p in (path / "configs").glob("*") if p.is_file()),
                 *[path / "models" / n for n in ("model.pt", "model.ts")]]
    return [f for f in files if f.is_file()]


def source_path(cfg: ModelConfig) -> Path | None:
    """The file or folder the model comes from (for the manifest and input protection)."""
    return getattr(cfg, "nnunet", None) or getattr(cfg, "bundle", None) or cfg.path
