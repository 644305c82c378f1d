"""Per-session conversation context for tool calls: a sliding window of records and a summary.

Each session (a UUID) keeps its last tool calls as :class:`ToolCallRecord` s. When the window
passes ``window`` records, its oldest ``window // 2`` are summarized into
``summary_before_window`` and dropped (:func:`compact`; with concurrent appends, any further
overflow goes with them: :func:`compaction_size`). Summaries combine as ``"A. Then: B."``
(:func:`combine_summaries`).
The summarizer is pluggable (:class:`Summarizer`, any async callable); the default one is
deterministic (:func:`summarize_records`).

Three stores behind one protocol (:class:`ContextStore`), chosen by ``settings.context.store``:

- :class:`MemoryContextStore`: one process, an LRU ``OrderedDict``; lost on restart.
- :class:`SqliteContextStore`: one host, durable (WAL); processes on the host may share the file.
- :class:`RedisContextStore`: the swarm's default, shared by every worker on every host.

Design:

- **Session ids are validated first.** Every store method calls :func:`validate_session_id`
  before anything else: only a canonical UUID (lowercased) ever names a key or a row, so
  ``../x``, ``a:b`` or ``{x}`` cannot reach another session's key or a path.
- **Append is one Lua script on Redis** (``context_access.lua``): RPUSH to the window, bump the
  counters, renew the expiry, ZADD the access time and evict over the cap, all in one atomic
  step. Many workers appending to one session can then lose nothing, and no read-modify-write
  of the whole context ever races another.
- **Compaction runs outside the store and applies only if nothing moved.** The summarizer may be
  an MCP call taking seconds, so no store is locked while it runs. Appends only add at the tail;
  only a compaction moves the head. A compactor reads the head with the context's incarnation
  (new after a clear or an expiry) and generation (bumped by each compaction), summarizes it,
  and then applies atomically (Lua on Redis, ``BEGIN IMMEDIATE`` on SQLite, one synchronous
  step in memory) only if both are unchanged: it drops exactly the records it summarized, so a
  record appended meanwhile is never lost, and if another compactor won it skips or retries.
  A compaction lock (taken by the append that overflows, in the same atomic step; expiring on
  Redis and SQLite) keeps a single compactor per session so the summarizer is not called many
  times for the same head; it is an economy, not the safety, which is the incarnation and
  generation check. The lock is released in the same atomic step that finds the window fits, so
  an append that overflowed while the lock was held is always seen by its holder.
- **Eviction is lazy.** A timer per session (or a sweeper task) would wake for sessions nobody
  asks about and be one more resource to start and stop; instead eviction work follows accesses,
  and nothing runs when nothing is accessed. The memory store drops idle sessions from the
  LRU end on each access; SQLite deletes expired rows on access (and the one session being
  touched is checked exactly); Redis lets keys EXPIRE (renewed on every access) and trims the
  sorted set of last access in the access script. The cap evicts the least recently used
  sessions when a new session is created.
- ``clear`` deletes the session at once (on Redis one DEL of its keys and a ZREM in one
  transaction): an append lands either before (and is cleared) or after (in a fresh context,
  with a new incarnation, so an in-flight compaction of the old one cannot touch it).

A summarizer that raises makes ``append`` raise after the record was appended: the record is
kept, the compaction lock released, and the compaction happens on a later append.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from shared.embedded import redis_url
from shared.errors import ConfigError, InvalidSessionId
from shared.keys import Keys
from shared.lua import load_lua
from shared.settings import ContextSettings, Settings
from shared.store import connect

RECORD_CUT_BYTES = 1024  # arguments (as JSON) and result text are cut past this many bytes
CUT_HEAD_CHARS = 200  # what a cut value keeps of its JSON
COMPACTION_LEASE_S = 120.0  # a compactor that died frees the lock after this (Redis, SQLite)
MAX_SESSION_ID_CHARS = 36

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

T = TypeVar("T")


def now_ms() -> int:
    return int(time.time() * 1000)


# --- the pure rules ------------------------------------------------------------------------------


def validate_session_id(session_id: object) -> str:
    """The session id in canonical form (a lowercase UUID), or :class:`InvalidSessionId`."""
    if not isinstance(session_id, str) or len(session_id) != MAX_SESSION_ID_CHARS:
        raise InvalidSessionId(session_id)
    canonical = session_id.lower()
    if not _UUID.fullmatch(canonical):
        raise InvalidSessionId(session_id)
    return canonical


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def cut_json(value: JsonValue, limit: int = RECORD_CUT_BYTES, head_chars: int = CUT_HEAD_CHARS) -> JsonValue:
    """``value`` itself if its JSON fits in ``limit`` bytes, else ``{"$cut": true, "bytes": N,
    "head": ...}`` with the first ``head_chars`` characters of that JSON.

    (shared/pipeline.py's ``cut`` keeps a head of ``limit`` bytes, so its marker would itself
    pass 1 KB: a record's arguments must stay under it.)
    """
    text = _json_text(value)
    size = len(text.encode())
    if size <= limit:
        return value
    return {"$cut": True, "bytes": size, "head": text[:head_chars]}


def cut_text(text: str, limit: int = RECORD_CUT_BYTES) -> str:
    """``text`` itself if it fits in ``limit`` bytes (UTF-8), else its head and a note of its
    size, the whole within ``limit`` bytes."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    note = f"... [cut: {len(encoded)} bytes]"
    return encoded[: limit - len(note.encode())].decode(errors="ignore") + note


def compaction_size(length: int, max_window: int) -> int:
    """How many of a window's oldest records are to be summarized: none while it holds at most
    ``max_window``; past it, the oldest ``max_window // 2``.

    Appends one at a time overflow a window by one record, and this is exactly the rule. When
    concurrent appends overflowed it by more (they kept coming while a summarizer ran), the
    extra records are summarized with that half, so that one compaction always leaves what it
    leaves after one overflow (``max_window + 1 - max_window // 2`` records): a slow summarizer
    then needs one call to catch up, however fast records come.
    """
    if length <= max_window:
        return 0
    return length - (max_window + 1 - max_window // 2)


def compact(window: Sequence[T], max_window: int) -> tuple[list[T], list[T]]:
    """The window split into (records to summarize, records kept), by :func:`compaction_size`."""
    count = compaction_size(len(window), max_window)
    return list(window[:count]), list(window[count:])


def combine_summaries(summary: str | None, new: str) -> str | None:
    """The summary after a compaction: ``new`` if there was none, else ``"{summary} Then: {new}"``
    (with ``"A."`` and ``"B."``: ``"A. Then: B."``). An empty ``new`` leaves the summary as it was."""
    new = new.strip()
    if not new:
        return summary
    return f"{summary} Then: {new}" if summary else new


# --- the records ---------------------------------------------------------------------------------


class ToolCallRecord(BaseModel):
    """One tool call of a session, its arguments and result text cut to 1 KB each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tool: str
    server: str
    arguments: JsonValue = None
    result_text: str = ""
    is_error: bool = False
    at_ms: int = Field(default_factory=now_ms)

    @field_validator("arguments", mode="after")
    @classmethod
    def _cut_arguments(cls, value: JsonValue) -> JsonValue:
        return cut_json(value)

    @field_validator("result_text", mode="after")
    @classmethod
    def _cut_result_text(cls, value: str) -> str:
        return cut_text(value)


def load_record(stored: str | bytes) -> ToolCallRecord:
    """A record as a store wrote it (``model_dump_json`` of a validated, cut record): built
    without validating again, which would cost more than the store's round trip."""
    return ToolCallRecord.model_construct(**json.loads(stored))


class SessionContext(BaseModel):
    """A session's context: its window (oldest first), the summary of what came before it, when
    it was last written (append or init, ms) and how many records were ever appended to it."""

    model_config = ConfigDict(extra="forbid")

    session_id: str
    window: list[ToolCallRecord] = Field(default_factory=list)
    summary_before_window: str | None = None
    updated_at_ms: int
    appended: int = 0


# --- summarizers ---------------------------------------------------------------------------------


class Summarizer(Protocol):
    """Summarizes a session's oldest records, knowing the summary so far; the store combines the
    result with that summary (:func:`combine_summaries`). Any async callable of this shape fits."""

    def __call__(
        self, records: Sequence[ToolCallRecord], summary_so_far: str | None, /
    ) -> Awaitable[str]: ...


_SIMPLE_TOKEN = re.compile(r"[\w.\-/:@]+")
SUMMARY_KEYS = 3  # argument keys named in a deterministic summary
SUMMARY_VALUES = 5  # distinct values named per key
SUMMARY_VALUE_CHARS = 40  # longer values are not named
TIMES = "\u00d7"  # the multiplication sign of "fetch ×2"  # noqa: RUF003


def _shown_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and 0 < len(value) <= SUMMARY_VALUE_CHARS:
        return value if _SIMPLE_TOKEN.fullmatch(value) else json.dumps(value, ensure_ascii=False)
    return None


def summarize_records(records: Sequence[ToolCallRecord]) -> str:
    """A deterministic one-line summary: the calls by tool (in order of first call), the errors,
    and a few argument values (keys ending in ``id`` first, then the most used), e.g.
    ``"3 calls: fetch ×2, parse ×1 (1 error); doc_id=4, 7."``."""  # noqa: RUF002
    count = len(records)
    text = f"{count} call{'' if count == 1 else 's'}"
    if not records:
        return f"{text}."
    tools = Counter(record.tool for record in records)
    text += ": " + ", ".join(f"{tool} {TIMES}{n}" for tool, n in tools.items())
    errors = sum(record.is_error for record in records)
    if errors:
        text += f" ({errors} error{'' if errors == 1 else 's'})"
    values: dict[str, list[str]] = {}
    uses: Counter[str] = Counter()
    for record in records:
        arguments = record.arguments
        if not isinstance(arguments, dict) or "$cut" in arguments:
            continue
        for key, value in arguments.items():
            shown = _shown_value(value)
            if shown is None:
                continue
            uses[key] += 1
            seen = values.setdefault(key, [])
            if shown not in seen:
                seen.append(shown)
    order = list(values)
    ranked = sorted(order, key=lambda key: (not key.lower().endswith("id"), -uses[key], order.index(key)))
    named = []
    for key in ranked[:SUMMARY_KEYS]:
        first = values[key][:SUMMARY_VALUES]
        hidden = len(values[key]) - len(first)
        more = f" (+{hidden} more)" if hidden else ""
        named.append(f"{key}={', '.join(first)}{more}")
    if named:
        text += "; " + "; ".join(named)
    return f"{text}."


async def deterministic_summarizer(records: Sequence[ToolCallRecord], summary_so_far: str | None) -> str:
    """The default :class:`Summarizer`: :func:`summarize_records`, no I/O."""
    return summarize_records(records)


# --- compaction, the same for every store --------------------------------------------------------


class Applied(StrEnum):
    """What applying a compaction did (see context_compact.lua)."""

    DONE = "done"  # applied; the window fits; the lock is released
    AGAIN = "again"  # applied; the window still overflows; the lock is kept
    RETRY = "retry"  # another compactor moved the head first; the lock is ours: read again
    STOP = "stop"  # the context is gone or renewed, or another compactor holds the lock


@dataclass(frozen=True)
class WindowHead:
    """The oldest records of a window as a compactor read them (none: the window fits), and what
    must be unchanged for dropping them to be right: the context's incarnation and generation."""

    incarnation: str
    generation: int
    summary: str | None
    records: list[ToolCallRecord]
    last_position: int = 0  # SQLite: the sequence number of the last record read


async def run_compaction(
    read_head: Callable[[], Awaitable[WindowHead | None]],
    apply: Callable[[WindowHead, str | None], Awaitable[Applied]],
    release: Callable[[], Awaitable[None]],
    summarizer: Summarizer,
) -> None:
    """Compact a window until it fits, holding its compaction lock: read the head (None: the
    context is gone), summarize it, apply. Once nothing is left to summarize, ``apply`` of an
    empty head releases the lock if the window still fits, atomically (``DONE``), or says to go
    on (``AGAIN``: an append overflowed it meanwhile). Any other end releases the lock here."""
    released = False
    try:
        while True:
            head = await read_head()
            if head is None:
                return
            summary = head.summary
            if head.records:
                summary = combine_summaries(summary, await summarizer(head.records, summary))
            applied = await apply(head, summary)
            if applied is Applied.DONE:
                released = True
                return
            if applied is Applied.STOP:
                return
    finally:
        if not released:
            await release()


# --- the protocol ----------------------------------------------------------------------------------


class ContextStore(Protocol):
    async def append(self, session_id: str, record: ToolCallRecord) -> SessionContext:
        """Append a record; compact the window if it overflows. The context after both."""
        ...

    async def get(self, session_id: str) -> SessionContext | None:
        """The session's context (an access: it renews the idle TTL), None if it has none."""
        ...

    async def clear(self, session_id: str) -> bool:
        """Forget the session's context; False if it had none."""
        ...

    async def init_from_summary(self, session_id: str, summary: str) -> bool:
        """Start the session's context with ``summary`` before an empty window (a handoff), only
        if it has no context yet; False (nothing changed) if it has one."""
        ...

    async def count(self) -> int:
        """How many sessions have a live context."""
        ...

    async def close(self) -> None: ...


# --- memory ----------------------------------------------------------------------------------------


@dataclass
class _MemoryEntry:
    summary: str | None
    updated_at_ms: int
    accessed_at: float  # monotonic seconds
    window: list[ToolCallRecord] = field(default_factory=list)
    appended: int = 0
    generation: int = 0
    compacting: bool = False
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex)


class MemoryContextStore:
    """One process's contexts in an LRU ``OrderedDict`` (least recently used first).

    Every change happens in one synchronous step between awaits, so tasks on the event loop
    cannot interleave inside it and no lock is needed; only the summarizer awaits, and it runs
    under the session's ``compacting`` flag, applied as the other stores apply it. Not for use
    from several threads.
    """

    def __init__(
        self,
        max_sessions: int = 500,
        idle_ttl_s: float = 1800.0,
        window: int = 20,
        summarizer: Summarizer = deterministic_summarizer,
    ) -> None:
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self.window = window
        self.summarizer = summarizer
        self._sessions: OrderedDict[str, _MemoryEntry] = OrderedDict()

    def _evict_idle(self) -> None:
        # Least recently used first: the idle ones are all at the front.
        idle_before = time.monotonic() - self.idle_ttl_s
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.accessed_at > idle_before:
                break
            self._sessions.popitem(last=False)

    def _touch(self, session_id: str) -> _MemoryEntry | None:
        self._evict_idle()
        entry = self._sessions.get(session_id)
        if entry is not None:
            entry.accessed_at = time.monotonic()
            self._sessions.move_to_end(session_id)
        return entry

    def _create(self, session_id: str, summary: str | None) -> _MemoryEntry:
        entry = _MemoryEntry(summary=summary, updated_at_ms=now_ms(), accessed_at=time.monotonic())
        self._sessions[session_id] = entry
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return entry

    @staticmethod
    def _context(session_id: str, entry: _MemoryEntry) -> SessionContext:
        return SessionContext(
            session_id=session_id,
            window=list(entry.window),
            summary_before_window=entry.summary,
            updated_at_ms=entry.updated_at_ms,
            appended=entry.appended,
        )

    async def append(self, session_id: str, record: ToolCallRecord) -> SessionContext:
        session_id = validate_session_id(session_id)
        entry = self._touch(session_id) or self._create(session_id, None)
        entry.window.append(record)
        entry.appended += 1
        entry.updated_at_ms = now_ms()
        if compaction_size(len(entry.window), self.window) and not entry.compacting:
            entry.compacting = True
            await self._compact(session_id, entry)
        return self._context(session_id, entry)

    async def _compact(self, session_id: str, entry: _MemoryEntry) -> None:
        async def read_head() -> WindowHead | None:
            if self._sessions.get(session_id) is not entry:
                return None
            count = compaction_size(len(entry.window), self.window)
            return WindowHead(entry.incarnation, entry.generation, entry.summary, entry.window[:count])

        async def apply(head: WindowHead, summary: str | None) -> Applied:
            if self._sessions.get(session_id) is not entry:
                return Applied.STOP
            if head.records:
                if entry.generation != head.generation:
                    return Applied.RETRY
                del entry.window[: len(head.records)]
                entry.summary = summary
                entry.generation += 1
            if compaction_size(len(entry.window), self.window):
                return Applied.AGAIN
            entry.compacting = False
            return Applied.DONE

        async def release() -> None:
            entry.compacting = False

        await run_compaction(read_head, apply, release, self.summarizer)

    async def get(self, session_id: str) -> SessionContext | None:
        session_id = validate_session_id(session_id)
        entry = self._touch(session_id)
        return None if entry is None else self._context(session_id, entry)

    async def clear(self, session_id: str) -> bool:
        session_id = validate_session_id(session_id)
        self._evict_idle()
        return self._sessions.pop(session_id, None) is not None

    async def init_from_summary(self, session_id: str, summary: str) -> bool:
        session_id = validate_session_id(session_id)
        if self._touch(session_id) is not None:
            return False
        self._create(session_id, summary or None)
        return True

    async def count(self) -> int:
        self._evict_idle()
        return len(self._sessions)

    async def close(self) -> None:
        self._sessions.clear()


# --- SQLite ----------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS context_sessions (
    session_id TEXT PRIMARY KEY,
    incarnation TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    summary TEXT,
    appended INTEGER NOT NULL DEFAULT 0,
    updated_at_ms INTEGER NOT NULL,
    accessed_at_ms INTEGER NOT NULL,
    compactor TEXT,
    compactor_until_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS context_sessions_by_access ON context_sessions (accessed_at_ms);
CREATE TABLE IF NOT EXISTS context_records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS context_records_by_session ON context_records (session_id, seq);
"""
SQLITE_BUSY_TIMEOUT_S = 30.0
SWEEP_BATCH = 500


@dataclass(frozen=True)
class _Appended:
    context: SessionContext
    compactor: str | None  # the lock token when this append took the compaction lock


class SqliteContextStore:
    """One host's contexts in a SQLite file (WAL), durable across restarts.

    One connection, used from one thread of its own: tasks of this process are serialized there
    without SQLite's busy waits. Every write is a ``BEGIN IMMEDIATE`` transaction, so other
    processes sharing the file (they wait up to 30 s for the write lock) lose nothing either.
    ``synchronous=NORMAL``: a crash of the process loses nothing; a power cut may lose the last
    transactions, never corrupt the file.
    """

    def __init__(
        self,
        path: str | Path,
        max_sessions: int = 500,
        idle_ttl_s: float = 1800.0,
        window: int = 20,
        summarizer: Summarizer = deterministic_summarizer,
        compaction_lease_s: float = COMPACTION_LEASE_S,
    ) -> None:
        self.path = Path(path)
        self.max_sessions = max_sessions
        self.idle_ttl_ms = max(1, int(idle_ttl_s * 1000))
        self.window = window
        self.summarizer = summarizer
        self.compaction_lease_ms = max(1, int(compaction_lease_s * 1000))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="context-sqlite")
        self._connection: sqlite3.Connection | None = None
        self._next_sweep_ms = 0
        self._sweep_every_ms = max(100, min(self.idle_ttl_ms // 2, 60_000))

    # --- plumbing: everything below _run runs on the store's thread ----------------------------

    async def _run(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(work, *args))

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(
                self.path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            with self._transaction(connection):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        connection.execute(statement)
            self._connection = connection
        return self._connection

    @staticmethod
    @contextmanager
    def _transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def _forget(self, db: sqlite3.Connection, session_ids: Sequence[str]) -> None:
        rows = [(session_id,) for session_id in session_ids]
        db.executemany("DELETE FROM context_records WHERE session_id = ?", rows)
        db.executemany("DELETE FROM context_sessions WHERE session_id = ?", rows)

    def _sweep(self, db: sqlite3.Connection, now: int, session_id: str) -> None:
        """Forget the touched session if it went idle and, now and then, a batch of idle ones."""
        idle_before = now - self.idle_ttl_ms
        row = db.execute(
            "SELECT accessed_at_ms FROM context_sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is not None and row[0] <= idle_before:
            self._forget(db, [session_id])
        if now >= self._next_sweep_ms:
            self._next_sweep_ms = now + self._sweep_every_ms
            idle = db.execute(
                "SELECT session_id FROM context_sessions WHERE accessed_at_ms <= ? LIMIT ?",
                (idle_before, SWEEP_BATCH),
            ).fetchall()
            self._forget(db, [session for (session,) in idle])

    def _evict_over_cap(self, db: sqlite3.Connection, session_id: str) -> None:
        (sessions,) = db.execute("SELECT COUNT(*) FROM context_sessions").fetchone()
        over = sessions - self.max_sessions
        if over > 0:
            oldest = db.execute(
                "SELECT session_id FROM context_sessions WHERE session_id != ? "
                "ORDER BY accessed_at_ms LIMIT ?",
                (session_id, over),
            ).fetchall()
            self._forget(db, [session for (session,) in oldest])

    def _create(self, db: sqlite3.Connection, session_id: str, summary: str | None, now: int) -> None:
        db.execute(
            "INSERT INTO context_sessions (session_id, incarnation, summary, updated_at_ms, accessed_at_ms) "
            "VALUES (?, ?, ?, ?, ?)",
            (session_id, uuid.uuid4().hex, summary, now, now),
        )
        self._evict_over_cap(db, session_id)

    def _read_context(self, db: sqlite3.Connection, session_id: str) -> SessionContext | None:
        row = db.execute(
            "SELECT summary, updated_at_ms, appended FROM context_sessions WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        if row is None:
            return None
        records = db.execute(
            "SELECT record FROM context_records WHERE session_id = ? ORDER BY seq", (session_id,)
        ).fetchall()
        return SessionContext(
            session_id=session_id,
            window=[load_record(record) for (record,) in records],
            summary_before_window=row[0],
            updated_at_ms=row[1],
            appended=row[2],
        )

    def _window_length(self, db: sqlite3.Connection, session_id: str) -> int:
        (length,) = db.execute(
            "SELECT COUNT(*) FROM context_records WHERE session_id = ?", (session_id,)
        ).fetchone()
        return int(length)

    def _append(self, session_id: str, record_json: str) -> _Appended:
        db = self._db()
        with self._transaction(db):
            now = now_ms()
            self._sweep(db, now, session_id)
            row = db.execute(
                "SELECT compactor, compactor_until_ms FROM context_sessions WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                self._create(db, session_id, None, now)
                row = (None, 0)
            db.execute(
                "INSERT INTO context_records (session_id, record) VALUES (?, ?)", (session_id, record_json)
            )
            db.execute(
                "UPDATE context_sessions SET appended = appended + 1, updated_at_ms = ?, accessed_at_ms = ? "
                "WHERE session_id = ?",
                (now, now, session_id),
            )
            compactor = None
            overflows = compaction_size(self._window_length(db, session_id), self.window)
            if overflows and (row[0] is None or row[1] <= now):
                compactor = uuid.uuid4().hex
                db.execute(
                    "UPDATE context_sessions SET compactor = ?, compactor_until_ms = ? WHERE session_id = ?",
                    (compactor, now + self.compaction_lease_ms, session_id),
                )
            context = self._read_context(db, session_id)
        assert context is not None
        return _Appended(context, compactor)

    def _read_head(self, session_id: str) -> WindowHead | None:
        db = self._db()
        db.execute("BEGIN")  # one snapshot of the row and the records
        try:
            row = db.execute(
                "SELECT incarnation, generation, summary FROM context_sessions WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            count = compaction_size(self._window_length(db, session_id), self.window)
            records = db.execute(
                "SELECT seq, record FROM context_records WHERE session_id = ? ORDER BY seq LIMIT ?",
                (session_id, count),
            ).fetchall()
        finally:
            db.execute("COMMIT")
        return WindowHead(
            incarnation=row[0],
            generation=row[1],
            summary=row[2],
            records=[load_record(record) for _, record in records],
            last_position=records[-1][0] if records else 0,
        )

    def _apply(self, session_id: str, token: str, head: WindowHead, summary: str | None) -> Applied:
        db = self._db()
        with self._transaction(db):
            now = now_ms()
            row = db.execute(
                "SELECT incarnation, generation, compactor, compactor_until_ms FROM context_sessions "
                "WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            if row is None or row[0] != head.incarnation:
                return Applied.STOP
            holds = row[2] == token or row[2] is None or row[3] <= now
            if holds:
                db.execute(
                    "UPDATE context_sessions SET compactor = ?, compactor_until_ms = ? WHERE session_id = ?",
                    (token, now + self.compaction_lease_ms, session_id),
                )
            if head.records:
                if row[1] != head.generation:
                    return Applied.RETRY if holds else Applied.STOP
                db.execute(
                    "DELETE FROM context_records WHERE session_id = ? AND seq <= ?",
                    (session_id, head.last_position),
                )
                db.execute(
                    "UPDATE context_sessions SET summary = ?, generation = generation + 1 "
                    "WHERE session_id = ?",
                    (summary, session_id),
                )
            if not holds:
                return Applied.STOP
            if compaction_size(self._window_length(db, session_id), self.window):
                return Applied.AGAIN
            self._release(db, session_id, token)
            return Applied.DONE

    @staticmethod
    def _release(db: sqlite3.Connection, session_id: str, token: str) -> None:
        db.execute(
            "UPDATE context_sessions SET compactor = NULL, compactor_until_ms = 0 "
            "WHERE session_id = ? AND compactor = ?",
            (session_id, token),
        )

    def _release_lock(self, session_id: str, token: str) -> None:
        db = self._db()
        with self._transaction(db):
            self._release(db, session_id, token)

    def _get(self, session_id: str) -> SessionContext | None:
        db = self._db()
        with self._transaction(db):
            now = now_ms()
            self._sweep(db, now, session_id)
            db.execute(
                "UPDATE context_sessions SET accessed_at_ms = ? WHERE session_id = ?", (now, session_id)
            )
            return self._read_context(db, session_id)

    def _clear(self, session_id: str) -> bool:
        db = self._db()
        with self._transaction(db):
            self._sweep(db, now_ms(), session_id)
            db.execute("DELETE FROM context_records WHERE session_id = ?", (session_id,))
            return db.execute("DELETE FROM context_sessions WHERE session_id = ?", (session_id,)).rowcount > 0

    def _init_from_summary(self, session_id: str, summary: str | None) -> bool:
        db = self._db()
        with self._transaction(db):
            now = now_ms()
            self._sweep(db, now, session_id)
            touched = db.execute(
                "UPDATE context_sessions SET accessed_at_ms = ? WHERE session_id = ?", (now, session_id)
            ).rowcount
            if touched:
                return False
            self._create(db, session_id, summary, now)
            return True

    def _count(self) -> int:
        (sessions,) = (
            self._db()
            .execute(
                "SELECT COUNT(*) FROM context_sessions WHERE accessed_at_ms > ?",
                (now_ms() - self.idle_ttl_ms,),
            )
            .fetchone()
        )
        return int(sessions)

    # --- the protocol ------------------------------------------------------------------------------

    async def append(self, session_id: str, record: ToolCallRecord) -> SessionContext:
        session_id = validate_session_id(session_id)
        appended = await self._run(self._append, session_id, record.model_dump_json())
        token = appended.compactor
        if token is None:
            return appended.context

        async def read_head() -> WindowHead | None:
            return await self._run(self._read_head, session_id)

        async def apply(head: WindowHead, summary: str | None) -> Applied:
            return await self._run(self._apply, session_id, token, head, summary)

        async def release() -> None:
            await self._run(self._release_lock, session_id, token)

        await run_compaction(read_head, apply, release, self.summarizer)
        context = await self._run(self._get, session_id)
        return context or appended.context

    async def get(self, session_id: str) -> SessionContext | None:
        session_id = validate_session_id(session_id)
        return await self._run(self._get, session_id)

    async def clear(self, session_id: str) -> bool:
        session_id = validate_session_id(session_id)
        return await self._run(self._clear, session_id)

    async def init_from_summary(self, session_id: str, summary: str) -> bool:
        session_id = validate_session_id(session_id)
        return await self._run(self._init_from_summary, session_id, summary or None)

    async def count(self) -> int:
        return await self._run(self._count)

    async def close(self) -> None:
        def close_connection() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await self._run(close_connection)
        await asyncio.to_thread(self._executor.shutdown)


# --- Redis -----------------------------------------------------------------------------------------

_PLACEHOLDER = "\x00"  # never in a namespace nor a validated session id


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _summary(value: Any) -> str | None:
    """A stored summary; an empty one (none yet) reads as None."""
    return None if value is None else _text(value) or None


class RedisContextStore:
    """The swarm's contexts in Redis, shared by every worker on every host.

    Per session (hash tag ``{session_id}``, shared/keys.py ``Keys.context``): a hash of the
    context's fields, a list of the window's records and a compaction lock; across sessions a
    sorted set of last access, for the cap. Keys expire ``idle_ttl_s`` after the last access.
    ``client`` must decode replies to str (as ``shared.store.connect`` does); the store closes it
    only when it owns it.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        max_sessions: int = 500,
        idle_ttl_s: float = 1800.0,
        window: int = 20,
        summarizer: Summarizer = deterministic_summarizer,
        compaction_lease_s: float = COMPACTION_LEASE_S,
        owns_client: bool = False,
    ) -> None:
        # redis-py's annotations cannot express decode_responses=True (every reply is str): use Any.
        self.client: Any = client
        self.keys = keys
        self.max_sessions = max_sessions
        self.idle_ttl_ms = max(1, int(idle_ttl_s * 1000))
        self.window = window
        self.summarizer = summarizer
        self.compaction_lease_ms = max(1, int(compaction_lease_s * 1000))
        self.owns_client = owns_client
        self._access = client.register_script(load_lua("context_access"))
        self._compact = client.register_script(load_lua("context_compact"))
        self._unlock = client.register_script(load_lua("unlock"))
        template = keys.context(_PLACEHOLDER)
        self._key_parts = [part for key in template.all() for part in key.split(_PLACEHOLDER)]

    def _common_args(self, op: str, session_id: str) -> list[Any]:
        return [op, session_id, self.idle_ttl_ms, self.max_sessions, *self._key_parts]

    async def _call(self, op: str, session_id: str, *extra: Any) -> list[Any]:
        ck = self.keys.context(session_id)
        reply: list[Any] = await self._access(
            keys=[self.keys.context_sessions, *ck.all()], args=[*self._common_args(op, session_id), *extra]
        )
        return reply

    @staticmethod
    def _parse(session_id: str, reply: list[Any]) -> SessionContext:
        return SessionContext(
            session_id=session_id,
            window=[load_record(record) for record in reply[5:]],
            summary_before_window=_summary(reply[2]),
            appended=int(reply[3]),
            updated_at_ms=int(reply[4]),
        )

    async def append(self, session_id: str, record: ToolCallRecord) -> SessionContext:
        session_id = validate_session_id(session_id)
        token = uuid.uuid4().hex
        reply = await self._call(
            "append",
            session_id,
            record.model_dump_json(),
            uuid.uuid4().hex,
            self.window,
            token,
            self.compaction_lease_ms,
        )
        if not int(reply[1]):
            return self._parse(session_id, reply)
        await self._run_compaction(session_id, token)
        return await self.get(session_id) or self._parse(session_id, reply)

    async def _run_compaction(self, session_id: str, token: str) -> None:
        ck = self.keys.context(session_id)

        async def read_head() -> WindowHead | None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hmget(ck.meta, "incarnation", "generation", "summary")
                pipe.lrange(ck.window, 0, -1)
                (incarnation, generation, summary), records = await pipe.execute()
            if incarnation is None:
                return None
            count = compaction_size(len(records), self.window)
            return WindowHead(
                incarnation=_text(incarnation),
                generation=int(generation),
                summary=_summary(summary),
                records=[load_record(record) for record in records[:count]],
            )

        async def apply(head: WindowHead, summary: str | None) -> Applied:
            outcome = await self._compact(
                keys=[ck.meta, ck.window, ck.compacting],
                args=[
                    head.incarnation,
                    head.generation,
                    len(head.records),
                    summary or "",
                    token,
                    self.window,
                    self.compaction_lease_ms,
                ],
            )
            return Applied(_text(outcome))

        async def release() -> None:
            await self._unlock(keys=[ck.compacting], args=[token])

        await run_compaction(read_head, apply, release, self.summarizer)

    async def get(self, session_id: str) -> SessionContext | None:
        session_id = validate_session_id(session_id)
        reply = await self._call("get", session_id)
        return self._parse(session_id, reply) if int(reply[0]) else None

    async def clear(self, session_id: str) -> bool:
        session_id = validate_session_id(session_id)
        ck = self.keys.context(session_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(*ck.all())
            pipe.zrem(self.keys.context_sessions, session_id)
            deleted, _ = await pipe.execute()
        return int(deleted) > 0

    async def init_from_summary(self, session_id: str, summary: str) -> bool:
        session_id = validate_session_id(session_id)
        reply = await self._call("init", session_id, summary or "", uuid.uuid4().hex)
        return bool(int(reply[0]))

    async def count(self) -> int:
        reply = await self._access(
            keys=[self.keys.context_sessions], args=["count", "", self.idle_ttl_ms, self.max_sessions]
        )
        return int(reply)

    async def close(self) -> None:
        if self.owns_client:
            await self.client.aclose()


# --- the factory -----------------------------------------------------------------------------------


def open_context_store(
    settings: Settings,
    client: aioredis.Redis | None = None,
    summarizer: Summarizer | None = None,
) -> ContextStore:
    """The store ``settings.context`` names. Redis: on ``client`` if given (left open by
    ``close``), else on a client of its own to the configured (or embedded) Redis. SQLite: at
    ``sqlite_path`` under ``state_dir`` (unless absolute). ``summarizer``: the caller's (e.g. one
    calling ``settings.context.summarizer``'s MCP tool); None: the deterministic one."""
    context: ContextSettings = settings.context
    chosen = summarizer or deterministic_summarizer
    common: dict[str, Any] = {
        "max_sessions": context.max_sessions,
        "idle_ttl_s": context.idle_ttl_s,
        "window": context.window,
        "summarizer": chosen,
    }
    if context.store == "memory":
        return MemoryContextStore(**common)
    if context.store == "sqlite":
        return SqliteContextStore(Path(settings.state_dir) / context.sqlite_path, **common)
    if context.store == "redis":
        owns = client is None
        if client is None:
            client = connect(redis_url(settings))
        return RedisContextStore(client, Keys(settings.namespace), owns_client=owns, **common)
    raise ConfigError(f"context.store: unknown store {context.store!r}")
