"""A Dask scheduler address checked before a client is made from it.

``distributed.Client`` given a malformed address raises from its constructor and then,
when the half-built client is collected, prints an ignored-exception traceback and waits
10 s for a loop that never started. :func:`check_scheduler_address` refuses such an
address first, with one line, so the client is never built.
"""

from __future__ import annotations

from esegeta_engine.errors import ConfigError

_HOST_PORT = ("tcp", "tls", "ws", "wss", "ucx")
_FIX = "write it as tcp://HOST:PORT, e.g. tcp://10.0.0.5:8786 (the address `dask scheduler` prints)"


def check_scheduler_address(address: str) -> str:
    """Return ``address`` if it names a scheduler Dask can reach, else raise.

    Raises
    ------
    ConfigError
        Unknown scheme, missing or bad host or port; one line naming the address and the form.
    """
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, parse_host_port

    text = str(address).strip()
    try:
        scheme, location = parse_address(text, strict=False)
        if scheme not in registry.backends:
            raise ValueError(f"unknown scheme {scheme!r} (Dask knows {', '.join(sorted(registry.backends))})")
        if scheme in _HOST_PORT:
            host, port = parse_host_port(location)
            if not host:
                raise ValueError("no host")
            if not 0 < int(port) < 65536:
                raise ValueError(f"port {port} is outside 1-65535")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the Dask scheduler address {text!r} is not valid ({exc})", _FIX) from None
    return text
