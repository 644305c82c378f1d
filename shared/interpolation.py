"""``${VAR}`` in the config file's strings, read from the environment when the config loads.

A value may be a reference (``client_secret = "${GITHUB_SECRET}"``) or contain one
(``Authorization = "Bearer ${GITHUB_TOKEN}"``); ``$${`` stands for a literal ``${``. A reference to
a variable that is not set is an error naming the key and the variable, so a token missing from
the environment stops the command at start instead of reaching a server as an empty header. The
values read are secrets by declaration: the caller registers them for redaction
(shared/redaction.py), so they never show in logs, output or error messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from shared.errors import ConfigError

REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def interpolate(data: Any, environ: Mapping[str, str], key: str = "", read: set[str] | None = None) -> Any:
    """``data`` (parsed TOML) with every ``${VAR}`` in its strings replaced by the variable's value;
    each value read is added to ``read``."""
    if isinstance(data, str):
        return _interpolated(data, environ, key, read)
    if isinstance(data, dict):
        return {
            name: interpolate(value, environ, f"{key}.{name}" if key else name, read)
            for name, value in data.items()
        }
    if isinstance(data, list):
        return [interpolate(value, environ, f"{key}[{i}]", read) for i, value in enumerate(data)]
    return data


def _interpolated(text: str, environ: Mapping[str, str], key: str, read: set[str] | None) -> str:
    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "${"
        try:
            value = environ[name]
        except KeyError:
            raise ConfigError(f"{key}: environment variable {name} is not set") from None
        if read is not None:
            read.add(value)
        return value

    return REFERENCE.sub(value_of, text)
