"""What a worker process writes: Celery's lines and toolswarm's, as text or as JSON, and none of
the library warnings an operator cannot act on."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any

from celery.exceptions import SecurityWarning
from celery.signals import setup_logging, worker_ready, worker_shutting_down

from shared.log_format import use_json_logs
from shared.settings import Settings

log = logging.getLogger(__name__)

# The loggers of Celery's lines about one task: received (the consumer), succeeded, failed, retried.
CELERY_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")
# Celery's repr of a chunk task's kwargs, as the sender wrote them (Chunk.task_kwargs: job_id first).
CHUNK_KWARGS = re.compile(r"'job_id': '(?P<job_id>[^']*)', 'server': '(?P<server>[^']*)'")


def prepare_worker_output(settings: Settings, *, loglevel: str = "INFO", quiet: bool = False) -> None:
    """Call before ``worker_main``: quiet Celery's root warning; in JSON mode make every line the
    worker writes (Celery's included) a JSON object; when ``quiet`` (no banner: JSON mode, or a
    worker that ``up`` or ``demo`` supervises) say nothing on stdout at shutdown either."""
    # Celery warns on every start as root. toolswarm accepts JSON messages only, so a message
    # cannot run code (with pickle accepted Celery would refuse to start as root at all); in a
    # container root is the usual user, and compose/ runs workers as a non-root user anyway.
    warnings.filterwarnings(
        "ignore", message="You're running the worker with superuser privileges", category=SecurityWarning
    )
    if settings.log_format == "json":
        # At once, so that whatever is written before Celery sets up logging (a warning while the
        # worker starts) is JSON too; and as Celery's set-up: receivers of setup_logging replace
        # Celery's own (and its redirection of stdout, which would turn stdio MCP servers' stderr
        # into a proxy without a file number).
        _configure_json_logs(loglevel.upper())
        setup_logging.connect(_configure_json_logs, weak=False, dispatch_uid="toolswarm-json-logs")
    if quiet:
        worker_ready.connect(_quiet_shutdown_notice, weak=False, dispatch_uid="toolswarm-quiet")
        worker_shutting_down.connect(_log_shutdown, weak=False, dispatch_uid="toolswarm-quiet")


def _configure_json_logs(loglevel: int | str | None = None, **_: Any) -> None:
    use_json_logs(loglevel or logging.INFO)
    for name in CELERY_TASK_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, CeleryTaskLines) for f in logger.filters):
            logger.addFilter(CeleryTaskLines())


def _quiet_shutdown_notice(sender: Any = None, **_: Any) -> None:
    """Celery writes "worker: Warm shutdown (MainProcess)" to stdout, past logging, when SIGTERM
    arrives; its handler without that line (``_log_shutdown`` logs it instead)."""
    from celery.apps.worker import install_worker_term_handler

    controller = getattr(sender, "controller", None)
    if controller is not None:
        install_worker_term_handler(controller, verbose=False)


def _log_shutdown(sig: str = "", how: str = "", **_: Any) -> None:
    log.info("%s shutdown on %s", how.lower() or "warm", sig or "a signal")


class CeleryTaskLines(logging.Filter):
    """Celery's lines about a task name it only in their text: give them the chunk (the task id is
    the chunk id), and the job and server its kwargs carry."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, Mapping) and "id" in args:
            fields = record.__dict__
            fields.setdefault("chunk", args["id"])
            found = CHUNK_KWARGS.search(str(args.get("kwargs", "")))
            if found is not None:
                fields.setdefault("job_id", found["job_id"])
                fields.setdefault("server", found["server"])
        return True
