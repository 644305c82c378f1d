"""The swarm as its faces show it: each server's health, load and queue, and the live workers.

One read for ``toolswarm servers``, ``GET /v1/servers``, the gateway's ``list_servers`` and the
dashboard's servers page, so they cannot disagree.
"""

from __future__ import annotations

import json
import time

from pydantic import BaseModel

from shared.broker_queues import queue_depths
from shared.limiter import in_flight
from shared.probes import ProbeResult, last_probe
from shared.settings import Settings
from shared.store import JobStore

# Keys a SCAN step looks at: the default (10) makes a read of the live workers one round trip per
# ten keys of the whole database (560 ms with 10 000 jobs in Redis; 20 ms at 1000).
SCAN_COUNT = 1000


class WorkerLife(BaseModel):
    worker: str
    pid: int | None = None
    last_heartbeat_s: float | None = None  # seconds ago; None from a worker too old to say
    started_at: float | None = None  # unix seconds
    held: dict[str, dict[str, int]] = {}  # items waiting on a down server: job id -> server -> count


class ServerView(BaseModel):
    name: str
    transport: str
    max_concurrency: int
    timeout_s: float
    in_flight: int  # calls holding one of the server's cluster-wide slots now
    queued_chunks: int | None  # chunk messages waiting in the server's broker queue; None: unreadable
    healthy: bool | None  # the circuit breaker's state from the last probe; None before any probe
    probe: ProbeResult | None = None


class Fleet(BaseModel):
    servers: list[ServerView]
    workers: list[WorkerLife]


async def server_views(store: JobStore, settings: Settings) -> list[ServerView]:
    depths = await queue_depths(store, settings, settings.servers) or {}
    views = []
    for name, server in sorted(settings.servers.items()):
        probed = await last_probe(store.client, store.keys, name)
        views.append(
            ServerView(
                name=name,
                transport=server.transport,
                max_concurrency=server.max_concurrency,
                timeout_s=server.timeout_s,
                in_flight=await in_flight(store.client, store.keys, name),
                queued_chunks=depths.get(name),
                healthy=None if probed is None else probed.ok,
                probe=probed,
            )
        )
    return views


async def live_workers(store: JobStore) -> list[WorkerLife]:
    keys = [key async for key in store.client.scan_iter(match=store.keys.workers_pattern, count=SCAN_COUNT)]
    raws = await store.client.mget(keys) if keys else []
    now = time.time()
    workers = []
    for raw in raws:
        if not raw:
            continue
        record = json.loads(raw)
        beat = record.get("beat_at")
        workers.append(
            WorkerLife(
                worker=record["worker"],
                pid=record.get("pid"),
                last_heartbeat_s=None if beat is None else round(max(0.0, now - beat), 1),
                started_at=record.get("started_at"),
                held=record.get("held") or {},
            )
        )
    return sorted(workers, key=lambda w: w.worker)


async def fleet(store: JobStore, settings: Settings) -> Fleet:
    return Fleet(servers=await server_views(store, settings), workers=await live_workers(store))
