"""napari-esegeta: explain 3D segmentation models in napari.

The plugin is a thin GUI over :mod:`esegeta_engine`: a NIfTI reader and
writer that keep the scanner geometry, phantom sample data, and three dock
widgets (Model, Explain, Compare). Widgets are imported lazily by napari
through ``napari.yaml``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["ModelWidget", "ExplainWidget", "CompareWidget", "__version__"]


def __getattr__(name: str):  # lazy: importing the package must not import Qt
    if name == "ModelWidget":
        from napari_esegeta._qt.model_widget import ModelWidget
        return ModelWidget
    if name == "ExplainWidget":
        from napari_esegeta._qt.explain_widget import ExplainWidget
        return ExplainWidget
    if name == "CompareWidget":
        from napari_esegeta._qt.compare_widget import CompareWidget
        return CompareWidget
    raise AttributeError(name)
