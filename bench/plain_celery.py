"""What a user would build with Celery alone: the fourth contender of bench/throughput.py.

One Celery task per item; each worker process keeps one persistent MCP session (the same client
toolswarm uses, on the workers' event loop in a thread of its own) that its pool threads share;
every result is written to Redis with one HSET. No leases, no limits, no exactly-once commit, no
events: the floor of what running MCP calls through Celery costs.

    celery -A bench.plain_celery worker --pool threads --concurrency 16
with PLAIN_CELERY_BROKER (a Redis URL) and PLAIN_CELERY_SERVER (a ServerConfig as JSON) set.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_process_init, worker_ready

from shared.mcp_client import build_client, http_client_for
from shared.settings import ServerConfig
from workers.tuning import new_event_loop

BROKER_ENV = "PLAIN_CELERY_BROKER"
SERVER_ENV = "PLAIN_CELERY_SERVER"
READY_KEY = "plain-celery:ready"

app = Celery("plain_celery", broker=os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


class Session:
    """One MCP session per process, on an event loop thread; pool threads call through it."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="mcp-session").start()
        self.client: Any = asyncio.run_coroutine_threadsafe(self._open(config), self.loop).result(60)

    async def _open(self, config: ServerConfig) -> Any:
        http = http_client_for(config) if config.transport == "http" else None
        return await build_client(config, http).__aenter__()

    def call(self, tool: str, arguments: dict[str, Any], timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(self.client.call_tool(tool, arguments), self.loop).result(
            timeout_s
        )


_session: Session | None = None
_lock = threading.Lock()
_results: redis.Redis | None = None


def session() -> Session:
    global _session
    with _lock:
        if _session is None:
            _session = Session(ServerConfig.model_validate_json(os.environ[SERVER_ENV]))
        return _session


def results() -> redis.Redis:
    global _results
    if _results is None:
        _results = redis.Redis.from_url(os.environ[BROKER_ENV])
    return _results


@worker_process_init.connect
def _open_session(**_: Any) -> None:
    session()


@worker_ready.connect
def _say_ready(**_: Any) -> None:
    session()
    results().incr(READY_KEY)


@app.task(name="plain_celery.call")
def call(job: str, key: str, tool: str, arguments: dict[str, Any]) -> None:
    outcome = session().call(tool, arguments, 30)
    text = "".join(getattr(block, "text", "") for block in outcome.content)
    results().hset(f"plain-celery:{job}", key, json.dumps({"ok": not outcome.is_error, "text": text}))
