"""JSON logs: one object per line on stderr, for every logger of the process.

Each line has ``timestamp`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``, the log
context's ``job_id``, ``chunk``, ``item``, ``server`` and ``step`` where they are bound (see
log_context.py), any ``extra`` a library passes, and ``exception`` (the traceback as one string)
when there is one.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from shared.log_context import LogContextFilter

# Extras that libraries attach for their own text formatters: uvicorn's coloured copy of the
# message, and Celery's arguments of its task lines (the message already has them).
IGNORED_EXTRAS = ("color_message", "data", "taskName")


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
        reserved_attrs=[*RESERVED_ATTRS, *IGNORED_EXTRAS],
        timestamp=True,
    )


def json_handler(stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter())
    handler.addFilter(LogContextFilter())
    return handler


def use_json_logs(level: int | str = logging.INFO, stream: TextIO | None = None) -> None:
    """Send every record of the process, and Python's warnings, to one JSON handler at ``level``.
    Loggers that had handlers of their own (uvicorn's, Celery's task logger) lose them and
    propagate here, so nothing is written twice or as text."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.addHandler(json_handler(stream))
    root.setLevel(level)
    for logger in logging.Logger.manager.loggerDict.values():
        if isinstance(logger, logging.Logger) and logger.handlers:
            for handler in logger.handlers[:]:
                logger.removeHandler(handler)
            logger.propagate = True
    logging.captureWarnings(True)
