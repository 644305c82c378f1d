"""Conversation context: what an append and a read cost on each store, and the memory store's cap.

- Memory, SQLite (a file in a temp dir) and Redis (an embedded Valkey) at 1 and 32 concurrent
  writers, each writer on its own session, then 32 writers on one session: appends/s, reads/s
  (``get``), p50/p99 of one append. The window is the default (20), so every ~10 appends one
  compaction with the deterministic summarizer runs inside the append that overflowed.
- 10,000 sessions through a memory store capped at 500: how many it holds after.
Last line: ``context: redis_append_p50_ms=X memory_sessions_at_cap=Y`` (X: one writer on Redis;
Y must be the cap, 500).

    python bench/context.py [--ops 3200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.context import (
    ContextStore,
    MemoryContextStore,
    RedisContextStore,
    SqliteContextStore,
    ToolCallRecord,
)
from shared.embedded import EmbeddedRedis
from shared.keys import Keys
from shared.settings import Settings
from shared.store import connect

WRITERS = (1, 32)
CAP, CAP_SESSIONS = 500, 10_000


@dataclass
class Run:
    store: str
    writers: int
    sessions: str
    appends_per_s: float
    reads_per_s: float
    append_ms: list[float]

    def p(self, q: float) -> float:
        ordered = sorted(self.append_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]

    def line(self) -> str:
        return (
            f"{self.store:>6} @{self.writers:>2} writers ({self.sessions:>7}): "
            f"{self.appends_per_s:8.0f} appends/s {self.reads_per_s:8.0f} reads/s  "
            f"append p50 {statistics.median(self.append_ms):6.3f} ms  p99 {self.p(0.99):7.3f} ms"
        )


def record(writer: int, index: int) -> ToolCallRecord:
    return ToolCallRecord(
        tool="fetch" if index % 3 else "parse",
        server="demo",
        arguments={"doc_id": index, "writer": writer, "query": "quarterly report"},
        result_text=f"document {index}: " + "lorem ipsum " * 20,
    )


async def measure(name: str, store: ContextStore, writers: int, ops: int, one_session: bool) -> Run:
    per_writer = ops // writers
    shared_session = str(uuid.uuid4())
    sessions = [shared_session if one_session else str(uuid.uuid4()) for _ in range(writers)]
    latencies: list[float] = []

    async def appender(writer: int) -> None:
        for index in range(per_writer):
            appended = record(writer, index)
            started = time.perf_counter()
            await store.append(sessions[writer], appended)
            latencies.append((time.perf_counter() - started) * 1000)

    async def reader(writer: int) -> None:
        for _ in range(per_writer):
            assert await store.get(sessions[writer]) is not None

    started = time.perf_counter()
    await asyncio.gather(*(appender(w) for w in range(writers)))
    append_s = time.perf_counter() - started
    started = time.perf_counter()
    await asyncio.gather(*(reader(w) for w in range(writers)))
    read_s = time.perf_counter() - started
    total = per_writer * writers
    if one_session:
        context = await store.get(shared_session)
        assert context is not None and context.appended == total, "an append was lost"
    return Run(name, writers, "one" if one_session else "own", total / append_s, total / read_s, latencies)


def open_store(name: str, url: str, tmp: str) -> ContextStore:
    if name == "memory":
        return MemoryContextStore(max_sessions=10_000)
    if name == "sqlite":
        return SqliteContextStore(Path(tmp) / f"context-{uuid.uuid4().hex[:8]}.sqlite3", max_sessions=10_000)
    client = connect(url, max_connections=64)
    return RedisContextStore(
        client, Keys(f"bench{uuid.uuid4().hex[:6]}"), max_sessions=10_000, owns_client=True
    )


async def sessions_at_cap() -> int:
    store = MemoryContextStore(max_sessions=CAP)
    for index in range(CAP_SESSIONS):
        await store.append(str(uuid.uuid4()), record(0, index))
    held = await store.count()
    await store.close()
    return held


async def main(args: argparse.Namespace, url: str, tmp: str) -> None:
    runs: dict[tuple[str, int, bool], Run] = {}
    for name in ("memory", "sqlite", "redis"):
        for writers, one_session in [(w, False) for w in WRITERS] + [(32, True)]:
            store = open_store(name, url, tmp)
            try:
                run = await measure(name, store, writers, args.ops, one_session)
            finally:
                await store.close()
            runs[(name, writers, one_session)] = run
            print(run.line(), flush=True)
    held = await sessions_at_cap()
    print(f"memory store, max_sessions={CAP}: {held} sessions held after {CAP_SESSIONS:,} sessions")
    redis_p50 = statistics.median(runs[("redis", 1, False)].append_ms)
    print(f"context: redis_append_p50_ms={redis_p50:.2f} memory_sessions_at_cap={held}")


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=3200, help="appends (and reads) per configuration")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="toolswarm-bench-") as tmp:
        redis = EmbeddedRedis(Settings(state_dir=tmp))
        url = redis.start(publish=False)
        try:
            asyncio.run(main(args, url, tmp))
        finally:
            redis.stop()


if __name__ == "__main__":
    cli()
