"""What workers do, counted in each process and added up cluster-wide in one Redis hash.

A worker process counts its calls (by server, tool and outcome), their durations, retries, chunks
and lost leases in a :class:`Tally`: plain dict increments on its event loop, no lock and no round
trip per call. Its own ``/metrics`` shows the process's totals; every heartbeat adds what changed
since the last one to the hash ``Keys.metrics`` in one MULTI/EXEC, and the API's ``/metrics`` reads
that hash. Items a worker settles (by status) and its refused commits are counted the same way;
an API or CLI that cancels a job adds its cancelled items to the hash right after each commit.

A field of the hash is a JSON array: the counter's name, then its label values
(``["calls","demo","echo","succeeded"]``). A duration bucket there is not cumulative:
``["call_duration_bucket","demo","0.1"]`` counts calls longer than the bound before 0.1 and at
most 0.1 seconds.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from typing import Any

from shared.keys import Keys

Field = tuple[str, ...]

# Counter names in the Redis hash (and in a Tally), each with its label names.
CALLS = "calls"  # server, tool, outcome
CALL_DURATION_BUCKET = "call_duration_bucket"  # server, le
CALL_DURATION_SUM = "call_duration_sum"  # server
RETRIES = "retries"  # server
CHUNKS = "chunks"  # server
LEASES_LOST = "leases_lost"  # server
LEASES_TAKEN_BACK = "leases_taken_back"
ITEMS_SETTLED = "settled"  # status
COMMITS_REFUSED = "commits_refused"

SUCCEEDED = "succeeded"  # the outcome of a call without error; otherwise its error type
# Tool names come from the items users submit: past this many per server, calls of further tools
# are counted under OTHER_TOOL, so a typo-ridden job cannot grow the series without bound.
MAX_TOOLS_PER_SERVER = 200
OTHER_TOOL = "_other"

# A call to an MCP tool takes milliseconds to minutes: Prometheus's default bounds and three longer.
DURATION_BOUNDS: tuple[float, ...] = (
    *(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0),
    *(30.0, 60.0, 120.0, math.inf),
)
DURATION_LABELS = tuple("+Inf" if math.isinf(b) else repr(b) for b in DURATION_BOUNDS)


def encode_field(field: Field) -> str:
    return json.dumps(field, separators=(",", ":"))


def decode_field(raw: str) -> Field | None:
    """The counter name and labels of a hash field (None for a field that is not one)."""
    try:
        parts = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        return None
    return tuple(parts)


class Tally:
    """One process's counters since it started. Written only from its event loop; ``snapshot()``
    may be called from any thread (a dict copy is atomic under the GIL)."""

    def __init__(self) -> None:
        self._totals: dict[Field, float] = {}
        self._flushed: dict[Field, float] = {}
        self._tools: dict[str, set[str]] = {}

    def _add(self, field: Field, amount: float = 1) -> None:
        totals = self._totals
        totals[field] = totals.get(field, 0) + amount

    def _tool_label(self, server: str, tool: str) -> str:
        seen = self._tools.setdefault(server, set())
        if tool in seen:
            return tool
        if len(seen) >= MAX_TOOLS_PER_SERVER:
            return OTHER_TOOL
        seen.add(tool)
        return tool

    def call(self, server: str, tool: str, outcome: str, seconds: float, attempts: int) -> None:
        """One call of an item or step, retries included: ``outcome`` is SUCCEEDED or its error type."""
        self._add((CALLS, server, self._tool_label(server, tool), outcome))
        self._add((CALL_DURATION_BUCKET, server, DURATION_LABELS[bisect_left(DURATION_BOUNDS, seconds)]))
        self._add((CALL_DURATION_SUM, server), seconds)
        if attempts > 1:
            self._add((RETRIES, server), attempts - 1)

    def chunk(self, server: str, leases_lost: int) -> None:
        """A chunk ran here; ``leases_lost``: its items whose result was refused because another
        worker had taken them over (see ChunkReport.refused)."""
        self._add((CHUNKS, server))
        if leases_lost:
            self._add((LEASES_LOST, server), leases_lost)

    def taken_back(self, items: int) -> None:
        """This process's reaper took back ``items`` whose lease had expired."""
        if items:
            self._add((LEASES_TAKEN_BACK,), items)

    def commit(self, status: str | None) -> None:
        """A result committed here: its status, or None when the commit was refused."""
        self._add((ITEMS_SETTLED, status) if status is not None else (COMMITS_REFUSED,))

    def settled(self, status: str, items: int, refused: int = 0) -> None:
        """Items settled here outside a chunk's commits (the reaper's poison verdicts)."""
        if items:
            self._add((ITEMS_SETTLED, status), items)
        if refused:
            self._add((COMMITS_REFUSED,), refused)

    def snapshot(self) -> dict[Field, float]:
        return self._totals.copy()

    async def flush(self, client: Any, keys: Keys) -> None:
        """Add what changed since the last flush to the cluster's hash, in one round trip. If it
        fails, the next flush sends it again."""
        now = self.snapshot()
        changed = {f: v - self._flushed.get(f, 0) for f, v in now.items() if v != self._flushed.get(f, 0)}
        if not changed:
            return
        async with client.pipeline(transaction=True) as pipe:
            for field, delta in changed.items():
                if field[0] == CALL_DURATION_SUM:
                    pipe.hincrbyfloat(keys.metrics, encode_field(field), delta)
                else:
                    pipe.hincrby(keys.metrics, encode_field(field), int(delta))
            await pipe.execute()
        self._flushed = now


async def count_settled(client: Any, keys: Keys, status: str, items: int, refused: int) -> None:
    """Add items settled outside any worker (a cancel from the API or CLI) to the cluster's hash."""
    if not items and not refused:
        return
    async with client.pipeline(transaction=True) as pipe:
        if items:
            pipe.hincrby(keys.metrics, encode_field((ITEMS_SETTLED, status)), items)
        if refused:
            pipe.hincrby(keys.metrics, encode_field((COMMITS_REFUSED,)), refused)
        await pipe.execute()


async def cluster_counters(client: Any, keys: Keys) -> dict[Field, float]:
    """Every worker's counters added up, and commit.lua's."""
    raw: dict[str, str] = await client.hgetall(keys.metrics)
    counters: dict[Field, float] = {}
    for name, value in raw.items():
        field = decode_field(name)
        if field is not None:
            counters[field] = float(value)
    return counters
