"""Conversation context on its three stores: memory, SQLite (a file in tmp_path) and Redis (the
session's embedded Valkey, a fresh namespace per test). What the stores share is tested on all
three through one parametrized fixture; every wait polls with a deadline."""

# ruff: noqa: RUF001  (summaries count calls with the multiplication sign, U+00D7)

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest

from shared.context import (
    ContextStore,
    MemoryContextStore,
    RedisContextStore,
    SqliteContextStore,
    Summarizer,
    ToolCallRecord,
    combine_summaries,
    compact,
    compaction_size,
    open_context_store,
    summarize_records,
)
from shared.errors import InvalidSessionId
from shared.keys import Keys
from shared.settings import Settings
from shared.store import connect
from tests.harness import wait_until_async

pytestmark = pytest.mark.integration

KINDS = ("memory", "sqlite", "redis")
BAD_IDS = ("../x", "a:b", "", "x" * 40, "{0b6f2c1e-8a4d-4f3b-9c2e-7d5a1b3c4e6f}", "*", "a" * 5000)


class StoreFactory(Protocol):
    """Opens a store of the test's kind on the test's storage (the same storage every call)."""

    def __call__(self, **options: Any) -> ContextStore: ...


class Storage:
    """Where the test's stores keep their contexts, and a raw look at it."""

    def __init__(self, kind: str, redis_url: str, tmp_path: Path) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.sqlite_path = tmp_path / "context.sqlite3"
        self.keys = Keys(f"test{uuid.uuid4().hex[:10]}")
        self.memory: MemoryContextStore | None = None

    def open(self, **options: Any) -> ContextStore:
        if self.kind == "memory":
            # One process, one store: a second open is the same store.
            if self.memory is None:
                self.memory = MemoryContextStore(**options)
            return self.memory
        if self.kind == "sqlite":
            return SqliteContextStore(self.sqlite_path, **options)
        client = connect(self.redis_url, max_connections=64)
        return RedisContextStore(client, self.keys, owns_client=True, **options)

    async def redis_keys(self) -> list[str]:
        client = connect(self.redis_url)
        try:
            return [key async for key in client.scan_iter(match=f"{self.keys.prefix}*")]
        finally:
            await client.aclose()

    def sqlite_rows(self) -> int:
        if not self.sqlite_path.exists():
            return 0
        with sqlite3.connect(self.sqlite_path) as db:
            sessions = db.execute("SELECT COUNT(*) FROM context_sessions").fetchone()[0]
            records = db.execute("SELECT COUNT(*) FROM context_records").fetchone()[0]
        db.close()
        return int(sessions + records)


@pytest.fixture(params=KINDS)
def storage(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> Storage:
    return Storage(request.param, redis_url, tmp_path)


@asynccontextmanager
async def opened(storage: Storage, **options: Any) -> AsyncIterator[ContextStore]:
    store = storage.open(**options)
    try:
        yield store
    finally:
        await store.close()


def session() -> str:
    return str(uuid.uuid4())


def record(rid: str, tool: str = "fetch") -> ToolCallRecord:
    return ToolCallRecord(tool=tool, server="demo", arguments={"id": rid}, result_text=f"result of {rid}")


async def next_millisecond() -> None:
    """Past the wall clock's current millisecond: later accesses then order strictly after."""
    await asyncio.sleep(0.0011 - time.time() % 0.001)


class IdSummarizer:
    """Summarizes by listing the records' ids, so the final summary says exactly which records
    were compacted away (only applied compactions reach it); counts its calls."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0

    async def __call__(self, records: Sequence[ToolCallRecord], summary_so_far: str | None) -> str:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return " ".join(str(r.arguments["id"]) for r in records if isinstance(r.arguments, dict)) + "."


ID = re.compile(r"w\d+-\d+")


def accounted_ids(summary: str | None, window: Sequence[ToolCallRecord]) -> list[str]:
    """Every record id the context accounts for: in its summary, then in its window."""
    in_window = [str(r.arguments["id"]) for r in window if isinstance(r.arguments, dict)]
    return ID.findall(summary or "") + in_window


# --- behaviour shared by the three stores -----------------------------------------------------------


def test_window_and_summary_follow_the_rule(storage: Storage) -> None:
    """After each append, the window and summary are what the pure rule says, on every store."""
    window = 6

    async def main() -> None:
        sid = session()
        expected_window: list[ToolCallRecord] = []
        expected_summary: str | None = None
        async with opened(storage, window=window) as store:
            assert await store.get(sid) is None
            for i in range(23):
                rec = record(f"r{i}", tool="parse" if i % 3 else "fetch")
                context = await store.append(sid, rec)
                expected_window.append(rec)
                to_summarize, expected_window = compact(expected_window, window)
                if to_summarize:
                    expected_summary = combine_summaries(expected_summary, summarize_records(to_summarize))
                assert context.session_id == sid
                assert context.window == expected_window, f"after append {i}"
                assert context.summary_before_window == expected_summary, f"after append {i}"
                assert context.appended == i + 1
                assert len(context.window) <= window
            got = await store.get(sid)
            assert got is not None
            assert got.window == expected_window
            assert got.summary_before_window == expected_summary
            assert expected_summary is not None and expected_summary.count(" Then: ") == 5
            assert expected_summary.startswith("3 calls: fetch ×1, parse ×2; id=r0, r1, r2. Then: ")
            assert await store.count() == 1

    asyncio.run(main())


def test_init_from_summary_only_starts_a_new_context(storage: Storage) -> None:
    async def main() -> None:
        sid, other = session(), session()
        async with opened(storage, window=4) as store:
            assert await store.init_from_summary(sid, "Handed off: doc 4 parsed.")
            assert not await store.init_from_summary(sid, "Another summary.")
            context = await store.get(sid)
            assert context is not None
            assert context.summary_before_window == "Handed off: doc 4 parsed."
            assert context.window == [] and context.appended == 0
            for i in range(5):
                context = await store.append(sid, record(f"r{i}"))
            assert (
                context.summary_before_window
                == "Handed off: doc 4 parsed. Then: 2 calls: fetch ×2; id=r0, r1."
            )
            assert not await store.init_from_summary(sid, "Late.")

            await store.append(other, record("x"))
            assert not await store.init_from_summary(other, "Too late: it has records.")
            other_context = await store.get(other)
            assert other_context is not None and other_context.summary_before_window is None

    asyncio.run(main())


def test_clear_forgets_a_session_and_only_it(storage: Storage) -> None:
    async def main() -> None:
        sid, kept = session(), session()
        async with opened(storage, window=4) as store:
            for i in range(7):
                await store.append(sid, record(f"r{i}"))
            await store.append(kept, record("k"))
            assert await store.count() == 2
            assert await store.clear(sid)
            assert not await store.clear(sid)
            assert await store.get(sid) is None
            assert await store.count() == 1
            fresh = await store.append(sid, record("again"))
            assert fresh.appended == 1 and fresh.summary_before_window is None
            assert [r.arguments for r in fresh.window] == [{"id": "again"}]
            kept_context = await store.get(kept)
            assert kept_context is not None and kept_context.appended == 1

    asyncio.run(main())


def test_uppercase_and_lowercase_ids_name_one_session(storage: Storage) -> None:
    async def main() -> None:
        sid = session()
        async with opened(storage) as store:
            await store.append(sid.upper(), record("a"))
            context = await store.append(sid, record("b"))
            assert context.session_id == sid and context.appended == 2

    asyncio.run(main())


def test_bad_session_ids_are_refused_by_every_method_before_storage(storage: Storage) -> None:
    async def main() -> None:
        async with opened(storage) as store:
            calls: list[Callable[[str], Awaitable[object]]] = [
                lambda bad: store.append(bad, record("x")),
                store.get,
                store.clear,
                lambda bad: store.init_from_summary(bad, "summary"),
            ]
            for bad in BAD_IDS:
                for call in calls:
                    with pytest.raises(InvalidSessionId, match="invalid session id"):
                        await call(bad)
            assert await store.count() == 0
        if storage.kind == "redis":
            assert await storage.redis_keys() == [], "a bad id wrote a key"
        if storage.kind == "sqlite":
            assert storage.sqlite_rows() == 0

    asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_sessions_stay_at_the_cap_least_recently_used_out_first(
    kind: str, redis_url: str, tmp_path: Path
) -> None:
    storage = Storage(kind, redis_url, tmp_path)
    cap, total = (500, 10_000) if kind == "memory" else (50, 300)

    async def main() -> None:
        ids = [session() for _ in range(total)]
        async with opened(storage, max_sessions=cap) as store:
            for sid in ids[:cap]:
                await store.append(sid, record("r"))
            await next_millisecond()
            assert await store.get(ids[0]) is not None  # now the most recently used
            await next_millisecond()
            for sid in ids[cap:]:
                await store.append(sid, record("r"))
                assert await store.count() <= cap
            assert await store.count() == cap
            if total - cap >= cap:
                assert await store.get(ids[0]) is None, "evicted once cap newer sessions came"
            assert await store.get(ids[1]) is None
            assert await store.get(ids[-1]) is not None
        if kind == "redis":
            metas = {key for key in await storage.redis_keys() if key.endswith("}")}
            assert len(metas) == cap

    asyncio.run(main())


def test_the_cap_keeps_a_recently_used_session(storage: Storage) -> None:
    cap = 20

    async def main() -> None:
        ids = [session() for _ in range(cap + 10)]
        async with opened(storage, max_sessions=cap) as store:
            for sid in ids[:cap]:
                await store.append(sid, record("r"))
            await next_millisecond()
            assert await store.get(ids[0]) is not None
            await next_millisecond()
            for sid in ids[cap:]:
                await store.append(sid, record("r"))
            assert await store.count() == cap
            assert await store.get(ids[0]) is not None, "touched last: not least recently used"
            assert await store.get(ids[1]) is None
            for sid in ids[cap:]:
                assert await store.get(sid) is not None

    asyncio.run(main())


def test_idle_sessions_expire_and_touched_ones_stay(storage: Storage) -> None:
    ttl = 0.6

    async def main() -> None:
        idle, touched = session(), session()
        async with opened(storage, idle_ttl_s=ttl) as store:
            await store.append(idle, record("i"))
            await store.append(touched, record("t"))
            assert await store.count() == 2

            async def idle_gone() -> bool:
                assert await store.get(touched) is not None, "an accessed session expired"
                if storage.kind == "redis":  # the keys themselves expired
                    return not [k for k in await storage.redis_keys() if idle in k]
                return await store.count() == 1

            await wait_until_async(idle_gone, timeout=10, what="the idle session expired")
            assert await store.get(idle) is None
            assert await store.count() == 1

            await wait_until_async(
                lambda: _equals(store.count(), 0), timeout=10, what="the last session expired, untouched"
            )
            assert await store.get(touched) is None
            if storage.kind == "redis":
                assert await storage.redis_keys() in ([], [storage.keys.context_sessions])
            if storage.kind == "sqlite":
                await store.append(session(), record("sweeps"))
                assert storage.sqlite_rows() == 2, "the expired sessions' rows were deleted"

    asyncio.run(main())


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


def test_32_writers_on_one_session_lose_nothing(storage: Storage) -> None:
    writers, each, window = 32, 50, 10

    async def main() -> None:
        sid = session()
        summarizer = IdSummarizer(delay_s=0.001)
        # Two store instances on the same storage: two workers (Redis), two processes (SQLite).
        first = storage.open(window=window, summarizer=summarizer)
        second = storage.open(window=window, summarizer=summarizer)
        try:

            async def writer(w: int) -> None:
                store = first if w % 2 else second
                for i in range(each):
                    context = await store.append(sid, record(f"w{w}-{i}"))
                    assert context.appended >= 1

            await asyncio.gather(*(writer(w) for w in range(writers)))
            context = await first.get(sid)
        finally:
            await first.close()
            await second.close()
        assert context is not None
        assert context.appended == writers * each == 1600
        ids = accounted_ids(context.summary_before_window, context.window)
        assert len(ids) == 1600, "a record was lost or counted twice"
        assert set(ids) == {f"w{w}-{i}" for w in range(writers) for i in range(each)}
        assert compaction_size(len(context.window), window) == 0, "the window was left overflowing"
        for w in range(writers):  # each writer's records stay in its order
            mine = [rid for rid in ids if rid.startswith(f"w{w}-")]
            assert mine == [f"w{w}-{i}" for i in range(each)]
        print(f"{storage.kind}: {summarizer.calls} summarizer calls for {(1600 - len(context.window)) // 5}")

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_racing_compactors_drop_only_what_they_summarized(kind: str, redis_url: str, tmp_path: Path) -> None:
    """The compaction lock expires (1 ms) long before the summarizer answers (5 ms): compactors
    race on the same head, and only the incarnation and generation check keeps the window right."""
    storage = Storage(kind, redis_url, tmp_path)
    writers, each, window = 16, 30, 6

    async def main() -> None:
        sid = session()
        summarizer = IdSummarizer(delay_s=0.005)
        stores = [
            storage.open(window=window, summarizer=summarizer, compaction_lease_s=0.001) for _ in range(2)
        ]
        try:

            async def writer(w: int) -> None:
                for i in range(each):
                    await stores[w % 2].append(sid, record(f"w{w}-{i}"))

            await asyncio.gather(*(writer(w) for w in range(writers)))
            context = await stores[0].get(sid)
        finally:
            for store in stores:
                await store.close()
        assert context is not None and context.appended == writers * each
        ids = accounted_ids(context.summary_before_window, context.window)
        assert sorted(ids) == sorted(f"w{w}-{i}" for w in range(writers) for i in range(each))
        assert compaction_size(len(context.window), window) == 0, "the window was left overflowing"
        applied = (context.summary_before_window or "").count(" Then: ") + 1
        assert summarizer.calls > applied, "no compactor lost a race: the test raced nothing"

    asyncio.run(main())


def test_clear_while_32_writers_append_loses_no_later_append(storage: Storage) -> None:
    writers, each, window = 32, 50, 10

    async def main() -> None:
        sid = session()
        summarizer = IdSummarizer(delay_s=0.001)
        store = storage.open(window=window, summarizer=summarizer)
        done_before: set[str] = set()  # appends that returned before clear was called
        started_after: set[str] = set()  # appends that started after clear returned
        landed = 0
        clearing, cleared, reached = False, asyncio.Event(), asyncio.Event()

        async def writer(w: int) -> None:
            nonlocal landed
            for i in range(each):
                rid = f"w{w}-{i}"
                if cleared.is_set():
                    started_after.add(rid)
                await store.append(sid, record(rid))
                landed += 1
                if landed >= 800:
                    reached.set()
                if not clearing:
                    done_before.add(rid)

        async def clear_midway() -> None:
            nonlocal clearing
            # Woken by the 800th append, not by polling: the memory store's writers would finish
            # all 1600 between two polls, and the clear would race nothing.
            await asyncio.wait_for(reached.wait(), timeout=20)
            clearing = True
            assert await store.clear(sid)
            cleared.set()

        try:
            await asyncio.gather(clear_midway(), *(writer(w) for w in range(writers)))
            context = await store.get(sid)
        finally:
            await store.close()
        assert context is not None
        assert len(done_before) >= 800 and len(started_after) > 0
        ids = accounted_ids(context.summary_before_window, context.window)
        assert len(ids) == len(set(ids)) == context.appended, "the fresh context lost or doubled a record"
        assert started_after <= set(ids), "an append after the clear was lost"
        assert not done_before & set(ids), "a record appended before the clear survived it"
        assert compaction_size(len(context.window), window) == 0

    asyncio.run(main())


def test_a_failing_summarizer_keeps_the_record_and_a_later_append_compacts(storage: Storage) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.fail = True

        async def __call__(self, records: Sequence[ToolCallRecord], summary_so_far: str | None) -> str:
            if self.fail:
                raise RuntimeError("summarizer down")
            return summarize_records(records)

    async def main() -> None:
        sid = session()
        flaky = Flaky()
        summarizer: Summarizer = flaky
        async with opened(storage, window=4, summarizer=summarizer) as store:
            for i in range(4):
                await store.append(sid, record(f"r{i}"))
            with pytest.raises(RuntimeError, match="summarizer down"):
                await store.append(sid, record("r4"))
            context = await store.get(sid)
            assert context is not None and len(context.window) == 5 and context.appended == 5
            flaky.fail = False
            context = await store.append(sid, record("r5"))
            # Overflowed by two: the extra record is summarized with the oldest half.
            assert context.summary_before_window == "3 calls: fetch ×3; id=r0, r1, r2."
            assert [r.arguments for r in context.window] == [{"id": f"r{i}"} for i in range(3, 6)]

    asyncio.run(main())


# --- one store per deployment: what only some of them do --------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_context_outlives_its_store(kind: str, redis_url: str, tmp_path: Path) -> None:
    """SQLite: across a restart of the process's store; Redis: seen by another worker's store."""
    storage = Storage(kind, redis_url, tmp_path)

    async def main() -> None:
        sid = session()
        async with opened(storage, window=4) as store:
            for i in range(6):
                written = await store.append(sid, record(f"r{i}"))
        async with opened(storage, window=4) as store:
            assert await store.get(sid) == written
            assert await store.count() == 1

    asyncio.run(main())


def test_sqlite_is_in_wal_mode(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(Storage("sqlite", "", tmp_path)) as store:
            await store.append(session(), record("r"))
        with sqlite3.connect(tmp_path / "context.sqlite3") as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("kind", "store_type"),
    [("memory", MemoryContextStore), ("sqlite", SqliteContextStore), ("redis", RedisContextStore)],
)
def test_open_context_store_from_settings(
    kind: str, store_type: type, redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=redis_url,
        namespace=f"test{uuid.uuid4().hex[:10]}",
        state_dir=str(tmp_path / "state"),
        context={"store": kind, "window": 4, "max_sessions": 7, "idle_ttl_s": 60},
    )

    async def main() -> None:
        store = open_context_store(settings)
        try:
            assert isinstance(store, store_type)
            sid = session()
            for i in range(5):
                context = await store.append(sid, record(f"r{i}"))
            assert len(context.window) == 3 and context.summary_before_window is not None
        finally:
            await store.close()
        if kind == "sqlite":
            assert (tmp_path / "state" / "context.sqlite3").exists()

    asyncio.run(main())
