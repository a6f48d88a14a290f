"""Per-viewer state shared by the dock widgets (the loaded model and its settings).

The Model widget writes it; the Explain widget reads it when a run starts and
listens to ``model_changed`` to refresh its layer pickers. The registry holds
no reference to the viewer, so closing a viewer frees everything.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from psygnal import Signal

from esegeta_engine.config import PreprocessConfig


class _Signals:
    """Qt-free signals of a :class:`Session`."""

    model_changed = Signal(object)  # the Session
    run_finished = Signal(object)  # list of layer names added by the run


@dataclass
class Session:
    """What the plugin knows about one viewer.

    Attributes
    ----------
    model : torch.nn.Module or None
        The loaded model, on its device.
    model_name : str
        Short description shown in the widgets.
    preprocess : PreprocessConfig
        Normalisation, axis order, dimensions and channels.
    output : int, str or None
        Output selection for multi-output models.
    busy : bool
        True while a run or a prediction uses the model.
    class_names : tuple of str
        The model's class names by index (from the bundled model's metadata or
        typed in the Model widget); empty when unknown.
    seconds_per_evaluation : float or None
        Measured in the last run (for the next run's time estimate).
    """

    model: Any = None
    model_name: str = ""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    output: int | str | None = None
    busy: bool = False
    class_names: tuple[str, ...] = ()
    seconds_per_evaluation: float | None = None
    execution: Any = None  # ExecutionConfig from the Model tab (None: whole volume, fp32)
    signals: _Signals = field(default_factory=_Signals)

    def set_model(self, model: Any, name: str, preprocess: PreprocessConfig,
                  output: int | str | None, class_names: tuple[str, ...] = ()) -> None:
        """Store a freshly loaded model and tell the widgets."""
        self.model, self.model_name, self.preprocess, self.output = model, name, preprocess, output
        self.class_names = tuple(class_names)
        self.signals.model_changed.emit(self)

    def set_class_names(self, names: tuple[str, ...]) -> None:
        """Name the classes (typed by the user) and tell the widgets."""
        self.class_names = tuple(names)
        self.signals.model_changed.emit(self)


_SESSIONS: dict[int, Session] = {}


def unwrap_viewer(viewer: Any) -> Any:
    """The viewer behind napari's ``PublicOnlyProxy`` (each dock widget gets its own proxy)."""
    inner = getattr(viewer, "__wrapped__", None)
    while inner is not None and inner is not viewer:
        viewer, inner = inner, getattr(inner, "__wrapped__", None)
    return viewer


def get_session(viewer: Any) -> Session:
    """The :class:`Session` of ``viewer`` (created on first use, dropped with the viewer).

    Widgets receive different proxies of the same viewer; the session is keyed
    by the viewer itself so they all share it.
    """
    viewer = unwrap_viewer(viewer)
    key = id(viewer)
    if key not in _SESSIONS:
        _SESSIONS[key] = Session()
        try:
            weakref.finalize(viewer, _SESSIONS.pop, key, None)
        except TypeError:  # not weak-referenceable: lives as long as the process
            pass
    return _SESSIONS[key]
