"""Append-only event logs whose fold is the state, with periodic snapshots.

A log is a Redis stream plus a snapshot hash ``{state, last_id, count, at_ms}``. Appends never
conflict. A read is the snapshot plus a fold of the tail after ``last_id``. A snapshot is
written by whoever folds (every N events or T seconds); it moves forward only (compare-and-swap
on ``last_id``) and trims the stream below the snapshot before it, so one snapshot's worth
of history stays readable. A writer that dies between append and
snapshot leaves nothing wrong: its events are in the tail, and the next read folds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel

from shared.lua import load_lua

S = TypeVar("S", bound=BaseModel)
Event = Mapping[str, str]
Reducer = Callable[[S, Event], S]


def fold(reducer: Callable[[S, Event], S], state: S, events: list[Event]) -> S:
    for event in events:
        state = reducer(state, event)
    return state


def next_stream_id(entry_id: str) -> str:
    """The smallest stream id greater than ``entry_id`` (for an exclusive trim)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


@dataclass(frozen=True)
class LogView(Generic[S]):
    state: S
    last_id: str  # the last event folded into state ('' when none)
    tail: int  # events folded on top of the snapshot


class EventLog(Generic[S]):
    def __init__(
        self,
        client: aioredis.Redis,
        stream: str,
        snapshot: str,
        reducer: Callable[[S, Event], S],
        initial: Callable[[], S],
        *,
        counter: str | None = None,
    ) -> None:
        self.client: Any = client
        self.stream = stream
        self.snapshot_key = snapshot
        self.reducer = reducer
        self.initial = initial
        self.counter = counter  # optional hash whose 'unsnapshotted' field counts events since the snapshot
        self._snapshot = client.register_script(load_lua("snapshot"))
        self._state_type = type(initial())

    async def append(self, event: Event, maxlen: int | None = None) -> str:
        entry_id: str = await self.client.xadd(self.stream, dict(event), maxlen=maxlen, approximate=True)
        return entry_id

    async def read(self) -> LogView[S]:
        """Snapshot plus the fold of the tail. Consistent even while others append and snapshot."""
        while True:
            snap = await self.client.hgetall(self.snapshot_key)
            last_id = snap.get("last_id", "")
            state = self._state_type.model_validate_json(snap["state"]) if snap else self.initial()
            tail = await self.client.xrange(self.stream, min=f"({last_id}" if last_id else "-")
            # A snapshot written between our two reads may have trimmed part of the tail we
            # needed; detect it by the snapshot having moved, and read again.
            if (await self.client.hget(self.snapshot_key, "last_id") or "") != last_id:
                continue
            events = [fields for _, fields in tail]
            state = fold(self.reducer, state, events)
            return LogView(state=state, last_id=tail[-1][0] if tail else last_id, tail=len(tail))

    async def snapshot(self, min_tail: int = 1) -> bool:
        """Fold and write a snapshot if at least ``min_tail`` events are unsnapshotted."""
        previous = await self.client.hget(self.snapshot_key, "last_id") or ""
        view = await self.read()
        if view.tail < min_tail or view.last_id == previous:
            return False
        keys = [self.snapshot_key, self.stream] + ([self.counter] if self.counter else [])
        written = await self._snapshot(
            keys=keys,
            args=[
                previous,
                view.state.model_dump_json(),
                view.last_id,
                view.tail,
                next_stream_id(previous) if previous else "",
                int(time.time() * 1000),
            ],
        )
        return bool(written)
