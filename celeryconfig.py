"""Celery settings, derived from toolswarm's typed settings (toml + env) and nothing else."""

from __future__ import annotations

import ssl
from typing import Any

from kombu.utils.url import parse_url

from shared.brokers import AMQP_MAX_PRIORITY, AMQP_PRIORITY, Lane, broker_kind
from shared.embedded import broker_url
from shared.settings import Settings


def from_settings(settings: Settings) -> dict[str, Any]:
    url = broker_url(settings)
    tls = broker_tls(url)
    broker = redis_broker(settings) if broker_kind(url) == "redis" else amqp_broker()
    return {
        "broker_url": url,
        **({"broker_use_ssl": tls} if tls is not None else {}),
        "broker_connection_retry_on_startup": True,
        **broker,
        # JSON only: a pickle from the broker is code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        # Results live in toolswarm's own records, committed exactly once; Celery's would be a copy.
        "task_ignore_result": True,
        # Ack after the chunk ran, one message at a time per slot, give it back if the worker is lost.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Task events for Flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_default_queue": f"{settings.namespace}.default",
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
    }


def broker_tls(url: str) -> dict[str, Any] | None:
    """The TLS options of a ``rediss://`` broker URL (its ``ssl_*`` query parameters), verifying the
    server by default as redis-py does: kombu alone would not verify a URL that names none, and
    Flower reads TLS only from here, not from the URL."""
    parsed = parse_url(url)
    if parsed["transport"] != "rediss":
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, **(parsed.get("ssl") or {})}


def redis_broker(settings: Settings) -> dict[str, Any]:
    return {
        "broker_transport_options": {
            # A backstop only: leases take over a dead worker's items in seconds. A message redelivered
            # after this finds its items settled or leased to a live worker and skips them.
            "visibility_timeout": settings.worker.visibility_timeout_s,
            # Look for such messages every 5 s (kombu's default scans about every 100 s).
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
            "global_keyprefix": f"{settings.namespace}:celery:",
        },
    }


def amqp_broker() -> dict[str, Any]:
    return {
        # A send returns once RabbitMQ has the message: a chunk recorded as sent is one it holds.
        "broker_transport_options": {"confirm_publish": True},
        # Every queue Celery declares (each server's, by name) takes priorities: higher runs first.
        "task_queue_max_priority": AMQP_MAX_PRIORITY,
        "task_default_priority": AMQP_PRIORITY[Lane.NEW],
    }
