"""How many chunk messages wait in each server's broker queue, on either broker.

Redis: kombu keeps a queue as one list per priority step (``QUEUE``, ``QUEUE\\x06\\x163``, ...) under
toolswarm's key prefix. AMQP: a passive declare answers with the queue's count of ready messages
(delivered and unacknowledged ones are not counted; a queue never declared holds none).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kombu.connection import Connection
from kombu.exceptions import OperationalError

from shared.brokers import broker_kind
from shared.embedded import broker_url
from shared.settings import Settings
from shared.store import JobStore

log = logging.getLogger(__name__)

AMQP_CONNECT_TIMEOUT_S = 3.0
# Keys a SCAN step looks at: the default (10) took about 0.5 s per read with 10,000 jobs in Redis.
SCAN_COUNT = 1000


async def queue_depths(store: JobStore, settings: Settings, servers: Iterable[str]) -> dict[str, int] | None:
    """Messages waiting per server (not yet delivered to a worker); None when the broker cannot be
    reached."""
    url = broker_url(settings)
    names = {server: store.keys.queue(server) for server in servers}
    if broker_kind(url) == "amqp":
        return await asyncio.to_thread(amqp_queue_depths, url, names)
    return {server: await redis_queue_depth(store, settings, queue) for server, queue in names.items()}


async def redis_queue_depth(store: JobStore, settings: Settings, queue: str) -> int:
    waiting = 0
    pattern = f"{settings.namespace}:celery:{queue}*"  # kombu keeps one list per priority step
    async for key in store.client.scan_iter(match=pattern, _type="list", count=SCAN_COUNT):
        waiting += await store.client.llen(key)
    return int(waiting)


def amqp_queue_depths(url: str, queues: Mapping[str, str]) -> dict[str, int] | None:
    """Ready messages of each queue (``queues``: server -> queue name) by passive declares."""
    depths: dict[str, int] = {}
    connection: Any = Connection(url, connect_timeout=AMQP_CONNECT_TIMEOUT_S)  # type: ignore[no-untyped-call]
    try:
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=AMQP_CONNECT_TIMEOUT_S)
        for server, queue in queues.items():
            # A passive declare of a missing queue closes its channel: one channel per queue.
            channel = connection.channel()
            try:
                depths[server] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except connection.channel_errors:
                depths[server] = 0
            finally:
                if channel.is_open:
                    channel.close()
    except (OperationalError, *connection.connection_errors, OSError) as exc:  # kombu wraps some
        log.debug("cannot read the queues of the broker: %s", exc)
        return None
    finally:
        connection.release()
    return depths
