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

from esegeta_engine.errors import EsegetaError
from esegeta_engine.methods import get_method, list_methods

__version__ = "0.1.0"

__all__ = ["EsegetaError", "get_method", "list_methods", "__version__"]
