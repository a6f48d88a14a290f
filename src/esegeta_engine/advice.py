"""One-line advice for failures whose first explanation would be the wrong one.

A model that cannot run under mixed precision fails inside the network with a dtype
error; under a sliding window that used to read as "the model does not accept a patch",
sending users to change a patch size that was never the problem.
"""

from __future__ import annotations

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
