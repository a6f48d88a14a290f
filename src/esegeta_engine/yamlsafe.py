"""YAML and JSON text read with bounds, so a tiny hostile file cannot become a huge object.

YAML anchors and aliases let a few hundred bytes describe a structure with
billions of entries (the "billion laughs"); a deeply nested one exhausts the
stack. :func:`load_bounded` composes the node graph first, measures what it
would expand to (aliases counted as many times as they are used) and builds
Python objects only when that stays within :data:`MAX_NODES` entries and
:data:`MAX_CHARS` characters of text.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from esegeta_engine.errors import ConfigError

MAX_BYTES = 1_000_000
"""Largest config text read (a real config is a few kB)."""
MAX_NODES = 100_000
"""Most values (scalars, lists, mappings) a config may expand to."""
MAX_CHARS = 10_000_000
"""Most characters of scalar text a config may expand to."""


def _expanded_size(root: yaml.Node) -> tuple[int, int]:
    """``(nodes, characters)`` of ``root`` with every alias expanded, without expanding it.

    Shared nodes are measured once and counted at each use (memoised), so the
    cost is linear in the file. A node that contains itself has no finite size.
    """
    sizes: dict[int, tuple[int, int]] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = (1, len(node.value))
            continue
        kids = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else list(node.value))
        if children_done:
            nodes, chars = 1, 0
            for kid in kids:
                n, c = sizes[id(kid)]
                nodes, chars = nodes + n, chars + c
            sizes[key] = (min(nodes, 2 * MAX_NODES), min(chars, 2 * MAX_CHARS))
            active.discard(key)
            continue
        if key in active:
            raise ConfigError("the config contains a structure that contains itself (a recursive YAML alias)",
                              "write the values out instead of using an anchor inside itself")
        active.add(key)
        stack.append((node, True))
        for kid in kids:
            if id(kid) in active:
                raise ConfigError("the config contains a structure that contains itself "
                                  "(a recursive YAML alias)",
                                  "write the values out instead of using an anchor inside itself")
            stack.append((kid, False))
    return sizes[id(root)]


def _too_big(what: str) -> ConfigError:
    return ConfigError(f"{what} is too large for a config: its values expand (through YAML anchors and "
                       f"aliases) to more than {MAX_NODES} entries or {MAX_CHARS // 1_000_000} MB of text",
                       "write the config without alias chains; a real config is a few kB")


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
            return json.loads(text)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            nodes, chars = _expanded_size(node)
            if nodes > MAX_NODES or chars > MAX_CHARS:
                raise _too_big(source)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply", "flatten the config") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if json_syntax else "YAML"
        raise ConfigError(f"{source} is not valid {kind}: {str(exc)[:500]}", "fix the syntax") from None
