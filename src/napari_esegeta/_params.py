"""Registry parameters <-> form values (no Qt).

The forms are generated from :class:`~esegeta_engine.methods.Param`; the
noise-tunnel form is generated from the engine's ``NoiseTunnelConfig`` schema
through :func:`params_from_model`, so no parameter is declared twice.
"""

from __future__ import annotations

import typing
from typing import Any

from esegeta_engine.methods import Param


def parse_ints(text: str) -> Any:
    """``"8"`` -> 8, ``"8, 8, 4"`` / ``"8 8 4"`` -> [8, 8, 4]; ``""`` -> None.

    Anything that is not an integer is returned as text, so the registry's
    validation reports it with the allowed range.
    """
    items = [t for t in text.replace(",", " ").split() if t]
    if not items:
        return None
    try:
        values = [int(t) for t in items]
    except ValueError:
        return text.strip()
    return values[0] if len(values) == 1 else values


def parse_floats(text: str) -> Any:
    """``"0.1"`` -> 0.1, ``"0.05, 0.1"`` / ``"0.05 0.1"`` -> [0.05, 0.1]; ``""`` -> None.

    Anything that is not a number is returned as text, so the registry's
    validation reports it with the allowed range.
    """
    items = [t for t in text.replace(",", " ").split() if t]
    if not items:
        return None
    try:
        values = [float(t) for t in items]
    except ValueError:
        return text.strip()
    return values[0] if len(values) == 1 else values


def format_value(param: Param, value: Any) -> str:
    """Text for a line-edit parameter (``ints``, ``floats`` and optional numbers)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def parse_text(param: Param, text: str) -> Any:
    """Value of a line-edit parameter; None means "use the default"."""
    text = text.strip()
    if not text:
        return None
    if param.kind == "ints":
        return parse_ints(text)
    if param.kind == "floats":
        return parse_floats(text)
    if param.kind == "int":
        try:
            return int(text)
        except ValueError:
            return text
    if param.kind == "float":
        try:
            return float(text)
        except ValueError:
            return text
    return text


def tooltip(param: Param) -> str:
    """Help text plus the allowed values and the default."""
    default = "auto (derived from the input)" if param.default is None else repr(param.default)
    return f"{param.help}\nAllowed: {param.describe_range()}. Default: {default}."


def uses_line_edit(param: Param) -> bool:
    """True for parameters edited as text (``ints``, ``floats``, free text, optional numbers)."""
    return param.kind in ("ints", "floats") or (param.kind == "str" and not param.choices) or \
        (param.kind in ("int", "float") and param.default is None)


def params_from_model(model: Any, skip: tuple[str, ...] = ()) -> tuple[Param, ...]:
    """Form parameters from a pydantic model's fields (Literal -> choices, ge/le -> bounds)."""
    out = []
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        ann = f.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        base = args[0] if typing.get_origin(ann) is typing.Union and len(args) == 1 else ann
        lo = hi = None
        for m in f.metadata:
            lo = getattr(m, "ge", lo) if getattr(m, "ge", None) is not None else lo
            hi = getattr(m, "le", hi) if getattr(m, "le", None) is not None else hi
        if typing.get_origin(base) is typing.Literal:
            choices = tuple(str(c) for c in typing.get_args(base))
            out.append(Param(name, "str", f.default, f.description or name, choices=choices))
            continue
        kind = {int: "int", float: "float", bool: "bool", str: "str"}.get(base, "str")
        if typing.get_origin(base) is list:  # ROAD's percentages: a comma-separated list
            kind = {int: "ints", float: "floats"}.get(next(iter(typing.get_args(base)), None), "str")
        out.append(Param(name, kind, f.get_default(call_default_factory=True), f.description or name.replace("_", " "),
                         minimum=lo, maximum=hi))
    return tuple(out)
