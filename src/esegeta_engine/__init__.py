"""esegeta_engine: interpretability and explainability for 2D and 3D imaging models.

A GUI-free engine: load a model, turn its segmentation or classification output
into per-class scalar targets, run attribution methods, and write the maps as
NIfTI with the source volume's geometry.

Examples
--------
>>> from esegeta_engine import list_methods
>>> "saliency" in {m.name for m in list_methods()}
True
"""

from __future__ import annotations

from typing import Any

from esegeta_engine.errors import EsegetaError

__version__ = "0.1.0"

__all__ = ["EsegetaError", "get_method", "list_methods", "__version__"]


def __getattr__(name: str) -> Any:
    # the registry imports torch and Captum: loaded on first use, so that `esegeta --help`
    # and `esegeta_engine.__version__` answer without them
    if name in ("get_method", "list_methods"):
        from esegeta_engine import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'esegeta_engine' has no attribute {name!r}")
