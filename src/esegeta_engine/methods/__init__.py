"""Attribution methods: one registry entry per method, one module per family."""

from __future__ import annotations

from esegeta_engine.methods.registry import (
    Call,
    MethodContext,
    MethodSpec,
    Param,
    get_method,
    list_methods,
    register,
)
from esegeta_engine.methods.run import attribute

__all__ = [
    "Call",
    "MethodContext",
    "MethodSpec",
    "Param",
    "attribute",
    "get_method",
    "list_methods",
    "register",
]
