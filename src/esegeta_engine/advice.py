"""One-line advice for failures whose first explanation would be the wrong one.

A model that cannot run under mixed precision fails inside the network with a dtype
error; under a sliding window that used to read as "the model does not accept a patch",
sending users to change a patch size that was never the problem.
"""

from __future__ import annotations

from typing import Any

from esegeta_engine.errors import MethodError, error_reason

_DTYPE_WORDS = ("bfloat16", "float16", "half", "scalar type", "dtype", "c10::bfloat16")


def precision_clash(exc: BaseException, precision: str) -> MethodError | None:
    """A :class:`MethodError` naming ``precision`` when ``exc`` is a dtype clash under autocast, else None."""
    if precision == "fp32":
        return None
    reason = error_reason(exc)
    if not any(word in str(exc).lower() for word in _DTYPE_WORDS):
        return None
    return MethodError(f"the model fails under {precision} autocast (execution.precision: {precision}): {reason}",
                       "use execution.precision: fp32 (--precision fp32): some of this model's operations "
                       f"do not accept the {precision} tensors autocast gives them")


def rejected_input(exc: BaseException, model: Any, shape: tuple[int, ...], form: Any) -> MethodError:
    """Why the model rejected an input of ``shape`` under execution ``form``, and what to change.

    Called once padding has been tried: a network of fixed input size gets that size, a
    sliding window the patch size, a whole volume the shape checks.
    """
    from esegeta_engine.methods.architectures import fixed_size_fix

    fixed = fixed_size_fix(model, tuple(shape[2:]) if form.sliding is None else tuple(form.sliding.patch_size))
    if fixed is not None:
        return MethodError(f"the model does not accept an input of shape {shape}: {error_reason(exc)}", fixed)
    if form.sliding is not None:
        return MethodError(
            f"the model does not accept a patch of size {list(form.sliding.patch_size)} "
            f"(volume {shape}): {error_reason(exc)}",
            "give execution.patch_size the network's training patch size (U-Nets need each "
            "size divisible by 2**depth, e.g. 96 or 128), and check preprocess.in_channels")
    return MethodError(
        f"the model does not accept an input of shape {shape}: {error_reason(exc)}",
        "check preprocess.in_channels, spatial_dims and axis_order; if the network needs sizes "
        "divisible by 2**depth, set execution.divisible_by (e.g. 16) or a patch size")
