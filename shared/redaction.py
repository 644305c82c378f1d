"""Text as it may be printed or logged: its secrets replaced by ``***``.

Two kinds of secret. Values the config read from the environment (``${VAR}``, see
shared/interpolation.py) are secrets by declaration: :func:`redacted` masks each of them wherever
it appears, in log lines, error messages and output alike. And URLs carry their own:

``redis://:pw@host:6379/0`` shows as ``redis://:***@host:6379/0``, ``redis://user:pw@...`` as
``redis://user:***@...``; a query parameter whose name says it is a secret (``password``,
``token``, ``secret``) keeps its name and loses its value. Everything else is kept as written,
so the redacted URL still says which host, port, database and CA file were meant.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from shared.settings import ServerConfig

MASK = "***"
SECRET_QUERY_WORDS = ("password", "passwd", "token", "secret")
# Shorter values are not masked: masking "1" or "yes" everywhere would garble output, not hide a secret.
MIN_SECRET_LENGTH = 4
URL = re.compile(r"\b[a-z][a-z0-9+.\-]*://[^\s'\"<>]+", re.IGNORECASE)

_secrets: set[str] = set()


def register_secrets(values: set[str]) -> None:
    """Mask these values from now on in everything :func:`redacted` sees (this process), log
    records included."""
    _secrets.update(value for value in values if len(value) >= MIN_SECRET_LENGTH)
    if _secrets:
        _redact_log_records()


def _redact_log_records() -> None:
    """Every log record of the process is made with its message redacted, whichever handler,
    formatter (text or JSON) or library writes it. Records are made only for enabled levels."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacting", False):
        return

    def make_redacted(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is reported when the record is emitted
            return record
        cleaned = redacted(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return record

    make_redacted.redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_redacted)


def redacted(text: str) -> str:
    """``text`` with the config's secrets masked and every URL in it redacted."""
    for secret in sorted(_secrets, key=len, reverse=True):  # a secret containing another goes first
        if secret in text:
            text = text.replace(secret, MASK)
    return URL.sub(lambda match: redacted_url(match.group(0)), text) if "://" in text else text


def redacted_url(url: str) -> str:
    """``url`` with its password (and secret query values) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: nothing of it can be trusted to be safe
        return f"{MASK} (a URL that does not parse)"
    # Rebuilt from the text rather than by urlunsplit, which would rewrite unix:///path as unix:/path.
    head, has_query, rest = url.partition("?")
    if "@" in parts.netloc:
        userinfo, _, hostport = parts.netloc.rpartition("@")  # a password may hold an unquoted "@"
        user, has_password, _ = userinfo.partition(":")
        # A user alone may be a token (https://TOKEN@host): only a user before a password is shown.
        shown = f"{user}:{MASK}@{hostport}" if has_password else f"{MASK}@{hostport}"
        head = head.replace(parts.netloc, shown, 1)
    if not has_query:
        return head
    query, has_fragment, fragment = rest.partition("#")
    query = "&".join(_redacted_parameter(parameter) for parameter in query.split("&"))
    return f"{head}?{query}{has_fragment}{fragment}"


def _redacted_parameter(parameter: str) -> str:
    name, has_value, _ = parameter.partition("=")
    if has_value and any(word in name.lower() for word in SECRET_QUERY_WORDS):
        return f"{name}={MASK}"
    return parameter


def endpoint_of(config: ServerConfig) -> str:
    """Where a server is, as output may show it: its command line, or its URL without secrets."""
    if config.url:
        return redacted(config.url)
    return redacted(" ".join([config.command or "", *config.args]))
