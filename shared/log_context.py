"""What a log line is about: the job, chunk, item and server of the work running when it is emitted.

The executor binds these where it runs a chunk, an item or a call; every log record emitted
inside (by toolswarm, the MCP SDK, httpx, Celery) then carries them as attributes, set by
:class:`LogContextFilter`, without ids being passed down. They live in a context variable, so
each asyncio task (an item) and each thread (a Celery task) has its own, and binding costs one
small dict per item.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from types import MappingProxyType

LogValue = str | int

_NOTHING: Mapping[str, LogValue] = MappingProxyType({})
_bound: contextvars.ContextVar[Mapping[str, LogValue]] = contextvars.ContextVar(
    "toolswarm_log_context", default=_NOTHING
)


def bind(**fields: LogValue) -> contextvars.Token[Mapping[str, LogValue]]:
    """Add ``fields`` (job_id, chunk, item, server, step) to the log context of this task or
    thread, until the token is reset."""
    return _bound.set({**_bound.get(), **fields})


class BoundFields:
    """``fields`` bound for the length of a ``with`` block (a class: a generator-based context
    manager costs four times as much, and one is entered per call)."""

    __slots__ = ("_fields", "_token")

    def __init__(self, fields: Mapping[str, LogValue]) -> None:
        self._fields = fields

    def __enter__(self) -> None:
        self._token = bind(**self._fields)

    def __exit__(self, *_: object) -> None:
        _bound.reset(self._token)


def log_context(**fields: LogValue) -> BoundFields:
    """Log lines emitted inside carry ``fields`` (and those already bound outside)."""
    return BoundFields(fields)


def context_with(**fields: LogValue) -> contextvars.Context:
    """A copy of the current context with ``fields`` bound: for a task that runs one item."""
    context = contextvars.copy_context()
    context.run(bind, **fields)
    return context


def detached_context() -> contextvars.Context:
    """A copy of the current context without toolswarm's log fields: for a background task that
    outlives the item or chunk that happened to start it (a session owner, a flusher), so its log
    lines do not name that item."""
    context = contextvars.copy_context()
    context.run(_bound.set, _NOTHING)
    return context


class LogContextFilter(logging.Filter):
    """Copies the bound log context onto each record (attributes a record already has win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _bound.get().items():
            if name not in record.__dict__:
                record.__dict__[name] = value
        return True
