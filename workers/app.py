"""The Celery app: built once by ``create_app()``, never at import time."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from celery import Celery
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
    worker_shutting_down,
)
from redis.exceptions import AuthenticationError

import celeryconfig
from shared.brokers import broker_kind, priority_of
from shared.errors import RedisAuthFailed, RedisUnavailable
from shared.jobs import BrokerView
from shared.keys import Keys
from shared.models import Chunk
from shared.redaction import redacted_url
from shared.settings import Settings, load_settings
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)

RUN_CHUNK = "toolswarm.run_chunk"


class RuntimeHolder:
    """The worker runtime of this process, started by Celery's lifecycle signals."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self.app = app
        self.runtime: WorkerRuntime | None = None

    def start(self) -> WorkerRuntime:
        if self.runtime is None or self.runtime.pid != os.getpid():
            enqueuer = CeleryEnqueuer(self.app, Keys(self.settings.namespace))
            self.runtime = WorkerRuntime(self.settings, enqueuer)
            self.runtime.start()
        return self.runtime

    def drain(self) -> None:
        if self.runtime is not None and self.runtime.pid == os.getpid():
            self.runtime.begin_drain()

    def stop(self) -> None:
        if self.runtime is not None and self.runtime.pid == os.getpid():
            self.runtime.stop()
            self.runtime = None


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app = Celery("toolswarm", set_as_current=True)
    app.conf.update(celeryconfig.from_settings(settings))
    app.conf.include = ["tasks.chunks"]
    holder = RuntimeHolder(settings, app)
    app.toolswarm_runtime = holder  # type: ignore[attr-defined]

    def _start_in_main_process(sender: Any = None, **_: Any) -> None:
        pool = getattr(sender, "pool_cls", None)
        if "prefork" not in str(getattr(pool, "__module__", pool)):
            holder.start()

    def _start_in_child(**_: Any) -> None:
        holder.start()

    def _stop(**_: Any) -> None:
        holder.stop()

    def _drain(**_: Any) -> None:
        holder.drain()

    # weak=False: the receivers are closures that must live as long as the app.
    worker_init.connect(_start_in_main_process, weak=False)
    worker_process_init.connect(_start_in_child, weak=False)
    worker_shutting_down.connect(_drain, weak=False)
    worker_shutdown.connect(_stop, weak=False)
    worker_process_shutdown.connect(_stop, weak=False)
    return app


def runtime_of(app: Celery) -> WorkerRuntime:
    holder: RuntimeHolder = app.toolswarm_runtime  # type: ignore[attr-defined]
    return holder.start()


class CeleryEnqueuer:
    """Sends chunks to their server's queue over one producer connection."""

    def __init__(self, app: Celery, keys: Keys) -> None:
        self.app = app
        self.keys = keys
        self.broker = broker_kind(str(app.conf.broker_url))

    def check(self) -> None:
        """Raise :class:`RedisUnavailable` unless the broker answers (before anything is written)."""
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:  # kombu wraps transport errors in many types
            url = str(self.app.conf.broker_url)
            if isinstance(exc, AuthenticationError) or isinstance(exc.__cause__, AuthenticationError):
                raise RedisAuthFailed.at("the broker", url, exc) from None
            raise RedisUnavailable(f"cannot reach the broker at {redacted_url(url)}: {exc}") from None

    def restore_orphans(self, older_than_s: float, live: set[str]) -> int:
        """Requeue unacked chunk messages older than ``older_than_s`` that no live worker holds, with
        kombu's own restore (the message goes back whole; its claims then skip settled items)."""
        if self.broker != "redis":  # RabbitMQ gives a lost consumer's messages back by itself
            return 0
        restored = 0
        with self.app.pool.acquire(block=True) as connection:  # the reaper asks every second: reuse one
            channel = connection.default_channel
            client, qos = channel.client, channel.qos
            delivered_before = time.time() - older_than_s
            for tag in client.zrange(qos.unacked_index_key, delivered_before, 0, desc=True, byscore=True):
                tag = tag.decode() if isinstance(tag, bytes) else str(tag)
                if tag not in live:
                    qos.restore_by_tag(tag, client)
                    restored += 1
        return restored

    def chunks_in_broker(self, servers: Iterable[str]) -> BrokerView | None:
        """Task ids (chunk ids) of the messages queued for these servers or delivered and unacked,
        read from kombu's Redis transport: its queue lists (one per priority step) and its unacked
        hash. A message between a consumer's pop and its unacked record is briefly in neither,
        which is why the sweep waits ``stranded_after_s`` before it believes a chunk is gone."""
        if self.broker != "redis":  # AMQP shows a queue's depth, never the ids in it
            return None
        with self.app.pool.acquire(block=True) as connection:
            channel = connection.default_channel
            client, qos = channel.client, channel.qos
            # kombu prefixes the keys of the commands it uses itself, and LRANGE and HVALS are not
            # among them: name the keys whole.
            prefix = getattr(channel, "global_keyprefix", "") or ""
            with client.pipeline(transaction=False) as pipe:
                for server in servers:
                    for priority in channel.priority_steps:
                        queue = channel._q_for_pri(self.keys.queue(server), priority)
                        pipe.lrange(prefix + queue, 0, -1)
                pipe.hvals(prefix + qos.unacked_key)
                *queued, unacked = pipe.execute()
        return BrokerView(
            queued=frozenset(_task_id(json.loads(raw)) for messages in queued for raw in messages),
            delivered=frozenset(_task_id(json.loads(raw)[0]) for raw in unacked),
        )

    def enqueue(self, chunks: Sequence[Chunk]) -> None:
        with self.app.producer_or_acquire() as producer:
            for chunk in chunks:
                self.app.send_task(
                    RUN_CHUNK,
                    kwargs=chunk.task_kwargs(),
                    task_id=chunk.id,
                    queue=self.keys.queue(chunk.server),
                    producer=producer,
                    priority=priority_of(chunk, self.broker),
                )


def _task_id(message: dict[str, Any]) -> str:
    """The Celery task id of a raw kombu message ("" for a message that is not a task)."""
    return str((message.get("headers") or {}).get("id", ""))


def worker_argv(
    settings: Settings, *, hostname: str | None = None, loglevel: str = "INFO", quiet: bool = False
) -> list[str]:
    """The ``celery worker`` arguments of a toolswarm worker process."""
    keys = Keys(settings.namespace)
    queues = (
        ",".join(keys.queue(name) for name in sorted(settings.served())) or f"{settings.namespace}.default"
    )
    argv = [
        *(["--quiet"] if quiet else []),  # no start-up banner
        "worker",
        "--pool=threads",
        f"--concurrency={settings.worker.chunks_in_flight}",
        f"--queues={queues}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--task-events",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    return argv
