"""Readable configuration errors: pydantic's validation errors as one line per bad key."""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from esegeta_engine.errors import ConfigError

__all__ = ["format_validation_error"]


def format_validation_error(exc: ValidationError, source: str = "config", root: Any = None,
                            fix: str = "fix the keys above; `esegeta methods` lists methods and their parameters"
                            ) -> ConfigError:
    """Turn pydantic's error into one readable :class:`ConfigError`.

    ``root`` is the model validated (default: the run :class:`~esegeta_engine.config.Config`);
    an unknown key's message lists the keys allowed where it stands. ``fix``: what to do (a command
    without methods says its own help).
    """
    lines = []
    errors = exc.errors()
    meant = set()  # keys an unknown key was a misspelling of: their "missing" line would say it twice
    for err in errors:
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), _fields_at(err["loc"][:-1], root), n=1, cutoff=0.6)
            meant.update((*err["loc"][:-1], c) for c in close)
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = _clip(err["msg"].removeprefix("Value error, "))
        if err["type"] == "missing":
            if tuple(err["loc"]) in meant:
                continue
            msg = "missing (required)"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = _fields_at(err["loc"][:-1], root)
            close = difflib.get_close_matches(str(err["loc"][-1]), parent, n=1, cutoff=0.6)
            if close:
                msg += f"; did you mean '{close[0]}'?"
            if parent:
                msg += f" (allowed here: {', '.join(parent)})"
        elif err["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be")
            allowed = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
            close = difflib.get_close_matches(str(err.get("input")), allowed, n=1, cutoff=0.6)
            if close:
                msg = f"{err.get('input')!r} is not allowed; did you mean '{close[0]}'? ({msg})"
        named = loc and msg.startswith(f"{loc}.")  # a rule over several keys of a section names them itself
        lines.append(f"{loc}: {msg}" if loc and not named else msg)
    return ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines), fix)


def _clip(text: str, limit: int = 400) -> str:
    """At most ``limit`` characters of ``text`` (a hostile value must not flood a message)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _fields_at(loc: tuple[Any, ...], root: Any = None) -> list[str]:
    if root is None:
        from esegeta_engine.config import Config as root
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(getattr(model, "model_fields", {}))
