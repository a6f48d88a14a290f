"""The one bounded reader of config text: size, nesting depth and alias expansion checked first.

YAML anchors and aliases let a few hundred bytes describe a structure with
billions of entries (the "billion laughs"); a deeply nested one exhausts the
stack of every recursive parser and validator after it. Every config the engine
reads — single runs, cohorts, command-line values, model kwargs — goes through
:func:`read_config_file` (a file) or :func:`load_bounded` (text), which refuse,
before any Python object is built:

- text longer than :data:`MAX_BYTES`;
- nesting deeper than :data:`MAX_DEPTH` (YAML and JSON);
- a document that would expand to more than :data:`MAX_NODES` values or
  :data:`MAX_CHARS` characters of text once every alias is expanded, and an
  alias used inside its own anchor.

YAML is checked on its event stream (a streaming parse that builds nothing and
stops at the first bound passed), JSON by a scan of its brackets; only a
document within every bound is then parsed for real.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from esegeta_engine.errors import ConfigError

MAX_BYTES = 1_000_000
"""Largest config text read (a real config is a few kB)."""
MAX_NODES = 100_000
"""Most values (scalars, lists, mappings) a config may expand to."""
MAX_CHARS = 10_000_000
"""Most characters of scalar text a config may expand to."""
MAX_DEPTH = 64
"""Deepest nesting of lists and mappings (a real config nests about 5 levels)."""

_FIX = "write the config without alias chains or deep nesting; a real config is a few kB"


def _too_deep(source: str) -> ConfigError:
    return ConfigError(f"{source} nests lists/mappings more than {MAX_DEPTH} levels deep (the limit for a config)",
                       "flatten the config; a real config nests about 5 levels")


def _too_big(source: str) -> ConfigError:
    return ConfigError(f"{source} is too large for a config: its values expand (through YAML anchors and "
                       f"aliases) to more than {MAX_NODES} entries or {MAX_CHARS // 1_000_000} MB of text",
                       _FIX)


def _self_alias(source: str) -> ConfigError:
    return ConfigError(f"{source} contains a structure that contains itself (a recursive YAML alias)",
                       "write the values out instead of using an anchor inside itself")


def check_yaml_events(text: str, source: str = "config") -> int:
    """Stream the YAML events of ``text`` and return the expanded number of values.

    Nothing is composed or constructed: each alias adds the size its anchor was
    measured at, so a chain of aliases is measured in time linear in the text,
    and the first value past a bound stops the scan.

    Raises
    ------
    ConfigError
        Too deep, too large once expanded, or an alias inside its own anchor.
    yaml.YAMLError
        Bad syntax.
    """
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (values, characters) it expands to
    frames: list[list[Any]] = []  # open collections: [values, characters, anchor]
    open_anchors: set[str] = set()
    total_nodes = total_chars = 0

    def add(nodes: int, chars: int) -> None:
        nonlocal total_nodes, total_chars
        total_nodes += nodes
        total_chars += chars
        if total_nodes > MAX_NODES or total_chars > MAX_CHARS:
            raise _too_big(source)
        if frames:
            frames[-1][0] += nodes
            frames[-1][1] += chars

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.ScalarEvent):
            add(1, len(event.value))
            if event.anchor:
                sizes[event.anchor] = (1, len(event.value))
        elif isinstance(event, yaml.CollectionStartEvent):
            add(1, 0)
            frames.append([1, 0, event.anchor])
            if len(frames) > MAX_DEPTH:
                raise _too_deep(source)
            if event.anchor:
                open_anchors.add(event.anchor)
        elif isinstance(event, yaml.CollectionEndEvent):
            nodes, chars, anchor = frames.pop()
            if anchor:
                sizes[anchor] = (nodes, chars)
                open_anchors.discard(anchor)
            if frames:  # the parent was credited one value when this opened; now the rest of it
                frames[-1][0] += nodes - 1
                frames[-1][1] += chars
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                raise _self_alias(source)
            add(*sizes.get(event.anchor, (1, 0)))  # an undefined alias fails in the real parse
    return total_nodes


_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]')
_FLOW_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\n]|\'\')*\'|(?:^|(?<=\s))#[^\n]*|[\[\]{}]', re.M)


def check_flow_depth(text: str, source: str = "config") -> None:
    """Refuse YAML whose flow brackets (``[``/``{`` outside quotes and comments) nest too deep.

    A cheap scan before the event stream, whose scanner slows down with every open flow
    level; brackets inside plain scalars are counted too, so a scalar with more than
    :data:`MAX_DEPTH` unclosed brackets is refused as well.

    Raises
    ------
    ConfigError
        More than :data:`MAX_DEPTH` brackets open at once.
    """
    depth = 0
    for match in _FLOW_TOKENS.finditer(text):
        tok = match.group()
        if tok in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise _too_deep(source)
        elif tok in "]}":
            depth = max(0, depth - 1)


def check_json_text(text: str, source: str = "config", max_values: int = MAX_NODES) -> int:
    """Scan JSON ``text`` for its nesting depth and number of values, building nothing.

    Raises
    ------
    ConfigError
        Nested deeper than :data:`MAX_DEPTH` or more than ``max_values`` values.
    """
    depth = values = 0
    for match in _JSON_TOKENS.finditer(text):
        tok = match.group()
        if tok in "[{":
            depth += 1
            values += 1
            if depth > MAX_DEPTH:
                raise _too_deep(source)
        elif tok in "]}":
            depth -= 1
        elif tok == ",":
            values += 1
        if values > max_values:
            raise _too_big(source)
    return values


def load_bounded(text: str, *, source: str = "config", json_syntax: bool = False) -> Any:
    """Parse YAML (or JSON) ``text`` into Python objects within the bounds of this module.

    Parameters
    ----------
    text : str
        The document.
    source : str
        Name used in messages (file name, "--method value").
    json_syntax : bool
        Parse as JSON (no aliases; size and nesting bounded).

    Raises
    ------
    ConfigError
        Bad syntax, too large, too deeply nested or self-containing.
    """
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{source} is {len(text)} characters long, more than a config can be "
                          f"({MAX_BYTES})", "give the config file, not data")
    try:
        if json_syntax:
            check_json_text(text, source)
            return json.loads(text)
        check_flow_depth(text, source)
        check_yaml_events(text, source)
        return yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 - SafeLoader, within the bounds above
    except RecursionError:  # a bound above should have stopped it first
        raise ConfigError(f"{source} is nested too deeply", "flatten the config") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if json_syntax else "YAML"
        raise ConfigError(f"{source} is not valid {kind}: {_syntax_error(exc)[:500]}", "fix the syntax") from None


def _syntax_error(exc: Exception) -> str:
    """A parser's complaint on one line, with where (YAML's own text spans several lines and quotes the text)."""
    mark = getattr(exc, "problem_mark", None)
    if not isinstance(exc, yaml.MarkedYAMLError) or mark is None:
        return " ".join(str(exc).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    start = exc.context_mark
    if exc.context and start is not None and (start.line, start.column) != (mark.line, mark.column):
        where += f" ({exc.context} that starts at line {start.line + 1}, column {start.column + 1})"
    return where


def read_config_file(path: str | Path) -> Any:
    """Read a YAML or JSON config file (``.json``: JSON) within the bounds of this module.

    At most :data:`MAX_BYTES` + 1 bytes are read, whatever the file's size.

    Raises
    ------
    ConfigError
        Missing, unreadable, not UTF-8, too large, too deep, alias-expanding or bad syntax.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist", "check the path")
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size  # 0 for a pipe: then read up to the bound
            raw = fh.read(min(size, MAX_BYTES) + 1 if size else MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path.name} cannot be read: {exc.strerror or exc}", "check the file's permissions") \
            from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{path.name} is larger than {MAX_BYTES} bytes, the limit for a config",
                          "give the config file, not data")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name} is not UTF-8 text", "give a YAML or JSON config") from None
    return load_bounded(text, source=path.name, json_syntax=path.suffix.lower() == ".json")


MAX_RECORD_BYTES = 256_000_000
"""Largest engine-written JSON record read back (a run manifest with its config and results)."""


def read_json_record(path: str | Path) -> Any:
    """Read a JSON file the engine wrote (a run's manifest, which embeds its config), bounded.

    A run folder may come from someone else, so its manifest is read like a config — depth
    bounded by :data:`MAX_DEPTH` before parsing — with room for many records.

    Raises
    ------
    ConfigError
        Too large or too deep.
    OSError, ValueError
        Unreadable or not JSON (callers say which run folder is broken).
    """
    path = Path(path)
    with path.open("rb") as fh:
        raw = fh.read(MAX_RECORD_BYTES + 1)
    if len(raw) > MAX_RECORD_BYTES:
        raise ConfigError(f"{path.name} is larger than {MAX_RECORD_BYTES} bytes", "give the folder of a run")
    text = raw.decode("utf-8")
    check_json_text(text, path.name, max_values=len(text))
    return json.loads(text)
