"""A worker process's own ``/metrics``: prometheus_client's HTTP server in a daemon thread.

One ``toolswarm worker`` is one process (Celery's thread pool), so one port serves all of it and
prometheus_client's multiprocess mode is not needed. Samples are read at each scrape from the
process's Tally and its per-server call slots; nothing is recorded through prometheus_client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from celery import Celery
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric

from shared.errors import ConfigError
from shared.execution import ExecutionContext
from shared.metric_families import counter_families, per_server_gauge
from workers.app import RuntimeHolder


class WorkerCollector:
    """This process's counters and calls in flight, as they are at the scrape."""

    def __init__(self, context: Callable[[], ExecutionContext | None]) -> None:
        self._context = context

    def collect(self) -> Iterable[Metric]:
        ctx = self._context()
        counters = ctx.metrics.snapshot() if ctx is not None else {}
        yield from counter_families(counters)
        slots = sorted(ctx.limits.items()) if ctx is not None else []
        yield per_server_gauge(
            "calls_in_flight",
            "Calls of this worker process holding a call slot of the server now.",
            ((server, places.in_use) for server, places in slots),
        )


def running_context(holder: RuntimeHolder) -> Callable[[], ExecutionContext | None]:
    def current() -> ExecutionContext | None:
        runtime = holder.runtime
        try:
            return runtime.context if runtime is not None else None
        except RuntimeError:  # not started yet
            return None

    return current


def serve_worker_metrics(app: Celery, address: str, port: int) -> WSGIServer:
    """Serve ``/metrics`` of this worker process on ``address:port`` until the process exits."""
    holder: RuntimeHolder = app.toolswarm_runtime
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(running_context(holder)))
    try:
        server, _ = start_http_server(port, address, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"worker.metrics_port: cannot serve metrics on {address}:{port}: {exc.strerror or exc}"
        ) from None
    return server
