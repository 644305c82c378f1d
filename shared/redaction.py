"""URLs as they may be printed or logged: their secrets replaced by ``***``.

``redis://:pw@host:6379/0`` shows as ``redis://:***@host:6379/0``, ``redis://user:pw@...`` as
``redis://user:***@...``; a query parameter whose name says it is a secret (``password``,
``token``, ``secret``) keeps its name and loses its value. Everything else is kept as written,
so the redacted URL still says which host, port, database and CA file were meant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from shared.settings import ServerConfig

MASK = "***"
SECRET_QUERY_WORDS = ("password", "passwd", "token", "secret")


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
        return redacted_url(config.url)
    return " ".join([config.command or "", *config.args])
