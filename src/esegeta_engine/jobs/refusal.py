"""Which methods an execution form cannot run, decided before any model evaluation.

Under sliding-window (patch-wise) execution, a method whose hooks store activations of one
whole-volume forward pass (a patch-wise mode that does not run, e.g. ``whole``: CAMs, layer methods, feature
visualisation) cannot run. The channel target runs patch-wise (each patch's channel map is
blended like a network output, :class:`~esegeta_engine.channel_target.ChannelMap`), so it
refuses the same methods as any other target. :func:`refusal` is the one rule: the job executor applies it to each
job, and front ends call :func:`refusals` with the volume's shape before a run starts, so a
method that will be refused costs no preparation and no model evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esegeta_engine.errors import MethodError
from esegeta_engine.methods.behaviour import patchwise_mode



def patchwise_methods() -> str:
    """The registered methods that run under sliding-window execution, for messages."""
    from esegeta_engine.methods import list_methods

    return ", ".join(s.name for s in list_methods() if patchwise_mode(s.patchwise).runs)


def refusal(spec: Any, target_kind: str, patchwise: bool) -> MethodError | None:
    """The error that refuses ``spec`` for this target under this execution, or ``None``."""
    if not patchwise:
        return None
    if getattr(spec, "needs_batch", False):  # not a whole-volume forward: a batch of volumes
        from esegeta_engine.methods.run import batch_refusal

        return batch_refusal(spec, patchwise=True)
    if not patchwise_mode(spec.patchwise).runs:
        return MethodError(
            f"method '{spec.name}' needs one forward pass of the whole volume (its hooks store "
            "activations) and cannot run patch by patch under sliding-window execution",
            "explain an ROI crop of the volume with a receptive-field margin (e.g. the region plus half "
            "a patch on every side) with execution.mode: whole, or use a patch-wise method "
            f"({patchwise_methods()}; `esegeta methods` and docs/execution.md list them)")
    return None


def split_refusals(methods: Sequence[Any], target_kind: str, execution: Any, model_shape: Sequence[int],
                   pipeline: Any = None) -> tuple[list[Any], list[tuple[str, MethodError]]]:
    """The methods of ``methods`` (MethodConfig) that will run, and ``(label, error)`` of what will be refused.

    As the run refuses: a whole method (the execution form's :func:`refusal`, or a deployed pipeline's
    ``method_refusal``) by its name, or one layer of a layer method that the pipeline refuses on that layer
    (``layer_method_refusal``) by the job's label ``method@layer``; the method's other layers still run (it is
    returned with those layers only). ``model_shape`` is the input's spatial shape in the model's axis order;
    ``pipeline`` the loaded model (:func:`~esegeta_engine.methods.run.pipeline_refusal`).
    """
    from esegeta_engine.forward.runner import execution_form
    from esegeta_engine.methods import get_method
    from esegeta_engine.methods.run import pipeline_refusal

    patchwise = execution_form(execution, tuple(model_shape)).sliding is not None
    runs: list[Any] = []
    refused: list[tuple[str, MethodError]] = []
    for m in methods:
        spec = get_method(m.name)
        err = refusal(spec, target_kind, patchwise) or pipeline_refusal(spec, (), pipeline)
        if err is not None:
            refused.append((m.name, err))
            continue
        layers = list(getattr(m, "layers", None) or ()) if getattr(spec, "needs_layer", False) else []
        per_layer = [(layer, pipeline_refusal(spec, [layer], pipeline)) for layer in layers]
        refused += [(f"{m.name}@{layer}", e) for layer, e in per_layer if e is not None]
        ok = [layer for layer, e in per_layer if e is None]
        if len(ok) < len(layers):
            if not ok:
                continue
            m = m.model_copy(update={"layers": ok})
        runs.append(m)
    return runs, refused


def refusals(methods: Sequence[Any], target_kind: str, execution: Any,
             model_shape: Sequence[int], pipeline: Any = None) -> list[tuple[str, MethodError]]:
    """``(label, error)`` of everything in ``methods`` (MethodConfig) that will be refused (:func:`split_refusals`).

    The label is the method's name, or ``method@layer`` for one refused layer of a layer method.
    """
    return split_refusals(methods, target_kind, execution, model_shape, pipeline)[1]
