"""Reading item and job events: a job's stream, the global stream, and consumer groups.

Every committed item appends ``item.settled`` to its job's stream and to the global stream
(capped at ``global_events_maxlen``); jobs add ``job.submitted``, ``job.started`` and, exactly
once, ``job.completed``. Downstream consumers read the global stream with a consumer group so
each event is handled once across their replicas and redelivered if a consumer dies unacked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import ResponseError

Entry = tuple[str, dict[str, str]]


async def history(client: Any, stream: str, after: str = "", count: int = 10_000) -> list[Entry]:
    """Events after ``after`` (exclusive; '' for the start), oldest first."""
    entries: list[Entry] = await client.xrange(stream, min=f"({after}" if after else "-", count=count)
    return entries


async def follow(client: Any, stream: str, after: str = "$", block_ms: int = 1000) -> AsyncIterator[Entry]:
    """New events as they arrive, forever (the caller stops iterating)."""
    last = after
    while True:
        reply = await client.xread({stream: last}, block=block_ms, count=1000)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                yield entry_id, fields


async def ensure_group(client: Any, stream: str, group: str, start: str = "$") -> None:
    try:
        await client.xgroup_create(stream, group, id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def consume(
    client: Any, stream: str, group: str, consumer: str, *, block_ms: int = 1000, start: str = "$"
) -> AsyncIterator[Entry]:
    """Events for this consumer of ``group``, each acknowledged once the caller has taken it.

    Entries this consumer received but never acknowledged (it died) are delivered first.
    """
    await ensure_group(client, stream, group, start)
    pending = await client.xreadgroup(group, consumer, {stream: "0"}, count=1000)
    for _, entries in pending or []:
        for entry_id, fields in entries:
            yield entry_id, fields
            await client.xack(stream, group, entry_id)
    while True:
        reply = await client.xreadgroup(group, consumer, {stream: ">"}, block=block_ms, count=100)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                yield entry_id, fields
                await client.xack(stream, group, entry_id)
