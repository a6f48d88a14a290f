"""Model sources (registered loaders), output selection, layers, devices, and the
guard that leaves a user's model exactly as it was after any run."""

from esegeta_engine.models.devices import import_class, resolve_device
from esegeta_engine.models.files import ModelFormat, load_model
from esegeta_engine.models.layers import (OutputSelector, get_layer, is_torchscript, list_layers, model_guard,
                                          select_output)
from esegeta_engine.models.sources import (LoadedModel, ModelSource, Trust, detect_source, load_source,
                                           register_source, source_path, sources)

__all__ = ["LoadedModel", "ModelFormat", "ModelSource", "OutputSelector", "Trust", "detect_source", "get_layer",
           "import_class", "is_torchscript", "list_layers", "load_model", "load_source", "model_guard",
           "register_source", "resolve_device", "select_output", "source_path", "sources"]
