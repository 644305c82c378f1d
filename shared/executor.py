"""Run one chunk of items: claim → call (with retries) → classify → commit, all on one event loop."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from shared.batching import Coalescer
from shared.errors import (
    RedisUnavailable,
    RetriesExhausted,
    RetryableToolError,
    ServerUnavailable,
    ToolFailed,
    ToolswarmError,
    TransientError,
    UnknownTool,
)
from shared.jobs import Enqueuer, feed_next
from shared.limiter import ClusterLimiter, LocalSlots
from shared.mcp_client import ToolCaller
from shared.models import CallResult, Chunk, ChunkReport, ItemError, ResultRecord, item_id
from shared.probes import Breaker
from shared.settings import RetryPolicy, Settings, StateSettings
from shared.store import Claim, CommitOutcome, JobStore, Settlement, now_ms

log = logging.getLogger(__name__)

UNKNOWN_TOOL_PREFIX = "Unknown tool:"
MAX_HELD_ATTEMPTS = 50  # calls that found the server unreachable and were not counted, per item
COMMIT_RETRY_S = 60.0
# A commit waits this long for company: under load one script call then carries a dozen results
# instead of one or two. The call slot is already free by then, so only the chunk's end waits.
BATCH_LINGER_S = 0.025
REDIS_ERRORS = (RedisUnavailable, RedisConnectionError, RedisTimeoutError)
# A chunk whose claim or feed met an unreachable Redis tries again this often, holding its message.
REDIS_RETRY_S = 2.0


def retrying(policy: RetryPolicy, stop: Callable[[RetryCallState], bool] | None = None) -> AsyncRetrying:
    return AsyncRetrying(
        stop=stop or stop_after_attempt(policy.attempts),
        wait=wait_exponential_jitter(
            multiplier=policy.initial_backoff_s, max=policy.max_backoff_s, jitter=policy.jitter_s
        ),
        retry=retry_if_exception_type(TransientError),
        reraise=True,
    )


def error_of(exc: ToolswarmError, attempts: int, policy: RetryPolicy) -> ItemError:
    if isinstance(exc, TransientError) and attempts >= policy.attempts:
        exhausted = RetriesExhausted(f"gave up after {attempts} attempts: {exc.message}")
        return ItemError(type=exhausted.error_type, message=exhausted.message, step="call", retryable=True)
    return ItemError(type=exc.error_type, message=exc.message, step="call", retryable=exc.retryable)


def tool_error_of(result: CallResult, tool: str) -> ToolswarmError:
    text = result.text()
    if text.startswith(UNKNOWN_TOOL_PREFIX):
        return UnknownTool(f"unknown tool {tool!r}")
    return ToolFailed(text or f"tool {tool!r} reported an error")


class BatchCommitter:
    """Coalesces commits from many concurrent items into one script call per job per round trip."""

    def __init__(self, store: JobStore, max_batch: int = 256, snapshots: StateSettings | None = None) -> None:
        self.store = store
        self.snapshots = snapshots or StateSettings()
        self._batches: Coalescer[tuple[str, Settlement], bool] = Coalescer(
            self._commit_batch, max_batch, linger_s=BATCH_LINGER_S
        )
        self._snapshotted_at: dict[str, float] = {}
        self._snapshotting: set[asyncio.Task[bool]] = set()

    async def commit(self, job_id: str, settlement: Settlement) -> bool:
        """Commit one result; True if it landed, False if refused (already settled or stale epoch)."""
        return await self._batches.submit((job_id, settlement))

    async def _commit_batch(self, entries: list[tuple[str, Settlement]]) -> list[bool]:
        by_job: dict[str, list[int]] = defaultdict(list)
        for position, (job_id, _) in enumerate(entries):
            by_job[job_id].append(position)
        landed = [False] * len(entries)
        for job_id, positions in by_job.items():
            outcome = await self._commit_job(job_id, [entries[p][1] for p in positions])
            for position, ok in zip(positions, outcome.landed, strict=True):
                landed[position] = ok
            if outcome.unsnapshotted and self._snapshot_due(
                job_id, outcome.unsnapshotted, outcome.job_finished
            ):
                task = asyncio.create_task(self.store.snapshot(job_id))
                self._snapshotting.add(task)
                task.add_done_callback(self._snapshotting.discard)
        return landed

    async def _commit_job(self, job_id: str, settlements: list[Settlement]) -> CommitOutcome:
        # Results already computed are worth waiting for: ride out a Redis restart.
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(COMMIT_RETRY_S),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0, jitter=0.1),
            retry=retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
            reraise=True,
        ):
            with attempt:
                return await self.store.commit(job_id, settlements)
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _snapshot_due(self, job_id: str, unsnapshotted: int, finished: bool) -> bool:
        """Log mode: snapshot every N events, every T seconds, and when the job finishes."""
        now = time.monotonic()
        last = self._snapshotted_at.setdefault(job_id, now)
        if (
            finished
            or unsnapshotted >= self.snapshots.snapshot_every_events
            or now - last >= self.snapshots.snapshot_every_s
        ):
            self._snapshotted_at[job_id] = now
            if finished:
                del self._snapshotted_at[job_id]
            return True
        return False


class Draining(Exception):
    """The worker is shutting down: an item that has not started gives its lease back instead."""


class ChunkHandedBack(Exception):
    """The worker began shutting down before this chunk claimed anything: its message goes back to
    the queue whole (and its record stays), rather than being acknowledged unrun."""


WAITING, CALLING, RELEASED = "waiting", "calling", "released"


class IsolationGate:
    """Chunks share the worker process, except an isolated one: it waits until the chunks running
    here have finished, keeps new ones from starting meanwhile, and runs with nothing beside it."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting_alone = 0

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._sharing += 1
        try:
            yield
        finally:
            async with self._changed:
                self._sharing -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting_alone += 1
            try:
                await self._changed.wait_for(lambda: not self._alone and not self._sharing)
            finally:
                self._waiting_alone -= 1
                self._changed.notify_all()  # a cancelled waiter must not leave shared() asleep
            self._alone = True
        try:
            yield
        finally:
            async with self._changed:
                self._alone = False
                self._changed.notify_all()


@dataclass
class ExecutionContext:
    """What a worker process hands the executor: its store, its MCP pool, its committer, and the
    items it holds leases on (renewed by the heartbeat, released on shutdown)."""

    settings: Settings
    store: JobStore
    caller: ToolCaller
    committer: BatchCommitter
    worker_id: str
    limits: dict[str, LocalSlots] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)  # "job_id:index" -> WAITING | CALLING | RELEASED
    item_tasks: dict[str, asyncio.Task[tuple[ResultRecord, bool] | None]] = field(default_factory=dict)
    draining: bool = False
    limiter: ClusterLimiter | None = None  # cluster-wide max_concurrency; None: per process only
    breaker: Breaker | None = None  # holds items of unhealthy servers; None: never holds
    enqueuer: Enqueuer | None = None  # feeds a job's backlog as its chunks finish
    job_retries: dict[str, RetryPolicy | None] = field(default_factory=dict)
    # Items whose call started since the last heartbeat, which records them (see expire.lua).
    started_calls: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    # Broker delivery tags of the chunk messages running here, held by the heartbeat.
    deliveries: set[str] = field(default_factory=set)
    isolation: IsolationGate = field(default_factory=IsolationGate)

    def limit(self, server: str) -> LocalSlots:
        slots = self.limits.get(server)
        if slots is None:
            config = self.settings.server(server)
            size = min(config.max_concurrency, self.settings.worker.calls_in_flight)
            slots = self.limits[server] = LocalSlots(size)
        return slots

    @asynccontextmanager
    async def call_slot(self, server: str, urgent: bool = False) -> AsyncIterator[None]:
        """A place for one call: this process's own bound (urgent items first), then the server's
        cluster-wide slot."""
        async with self.limit(server).slot(urgent):
            if self.limiter is None:
                yield
            else:
                async with self.limiter.slot(server, self.settings.server(server).max_concurrency):
                    yield

    async def job_retry(self, job_id: str) -> RetryPolicy | None:
        """The job's own retry policy, if it overrides the servers' (cached; jobs never change it)."""
        if job_id not in self.job_retries:
            if len(self.job_retries) > 1000:
                self.job_retries.clear()
            self.job_retries[job_id] = await self.store.job_retry(job_id)
        return self.job_retries[job_id]

    def take_started_calls(self) -> list[tuple[str, int, int]]:
        started = list(self.started_calls.values())
        self.started_calls.clear()
        return started

    def leased(self) -> list[str]:
        return [member for member, state in self.held.items() if state != RELEASED]


async def call_item(
    ctx: ExecutionContext,
    job_id: str,
    claim: Claim,
    policy: RetryPolicy | None = None,
    urgent: bool = False,
) -> ResultRecord:
    """Call one item's tool with retries and turn whatever happens into its result record.

    ``policy`` (the job's override) or the server's retry policy bounds the attempts. While the
    server's breaker is open the item waits; a call that could not reach the server trips the
    breaker and does not spend an attempt (up to MAX_HELD_ATTEMPTS times).
    """
    spec = claim.spec
    server = spec.server or ""
    config = ctx.settings.server(server)
    policy = policy or config.retry
    member = item_id(job_id, claim.index)
    started = time.perf_counter()
    attempts = spent = 0
    result: CallResult | None = None
    error: ItemError | None = None

    def out_of_budget(_: RetryCallState) -> bool:
        return spent >= policy.attempts

    async def attempt_once() -> CallResult:
        nonlocal attempts, spent
        if ctx.breaker is not None:
            await ctx.breaker.wait_healthy(server)
        async with ctx.call_slot(server, urgent):
            if ctx.draining:
                raise Draining(member)
            attempts += 1
            spent += 1
            if ctx.held.get(member) != CALLING:
                ctx.held[member] = CALLING
                ctx.started_calls[member] = (job_id, claim.index, claim.epoch)
            try:
                outcome = await ctx.caller.call(server, spec.tool, spec.arguments, config.timeout_s)
            except ServerUnavailable as exc:
                if ctx.breaker is not None and attempts - spent < MAX_HELD_ATTEMPTS:
                    spent -= 1
                    await ctx.breaker.trip(server, exc.message)
                raise
        if outcome.is_error and config.tool_errors_retryable:
            raise RetryableToolError(outcome.text() or f"tool {spec.tool!r} reported an error")
        return outcome

    try:
        try:
            result = await attempt_once()  # most calls succeed at once: no retry machinery for them
        except TransientError:
            if spent >= policy.attempts:
                raise
            await asyncio.sleep(policy.initial_backoff_s + random.uniform(0, policy.jitter_s))
            async for attempt in retrying(policy, stop=out_of_budget):
                with attempt:
                    result = await attempt_once()
        assert result is not None
        if result.is_error:
            failure = tool_error_of(result, spec.tool)
            error = ItemError(type=failure.error_type, message=failure.message, step="call", retryable=False)
    except ToolswarmError as exc:
        error = error_of(exc, spent, policy)
    return ResultRecord(
        item_id=member,
        job_id=job_id,
        index=claim.index,
        tool=spec.tool,
        server=server,
        key=spec.key,
        status="failed" if error else "succeeded",
        attempts=attempts,
        result=result,
        error=error,
        worker=ctx.worker_id,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        finished_at_ms=now_ms(),
    )


async def run_item(
    ctx: ExecutionContext,
    job_id: str,
    claim: Claim,
    policy: RetryPolicy | None = None,
    urgent: bool = False,
) -> tuple[ResultRecord, bool] | None:
    """Call and commit one item; None when shutdown took it back before it finished."""
    member = item_id(job_id, claim.index)
    try:
        record = await call_item(ctx, job_id, claim, policy, urgent)
        landed = await ctx.committer.commit(job_id, Settlement(record=record, epoch=claim.epoch))
        return record, landed
    except Draining:
        if ctx.held.get(member) != RELEASED:
            await ctx.store.release([member])
        return None
    finally:
        ctx.held.pop(member, None)
        ctx.item_tasks.pop(member, None)


async def execute_chunk(ctx: ExecutionContext, chunk: Chunk) -> ChunkReport:
    """Lease the chunk's unsettled items and run them concurrently; return what happened. An
    isolated chunk runs alone in this process (see IsolationGate)."""
    if chunk.isolated and ctx.breaker is not None:
        # Not while holding the whole process: an isolated item would wait out the outage alone.
        await ctx.breaker.wait_healthy(chunk.server)
    async with ctx.isolation.alone() if chunk.isolated else ctx.isolation.shared():
        if ctx.draining:
            raise ChunkHandedBack(chunk.id)
        claims = await ctx.store.claim(
            chunk.job_id, chunk.items, ctx.worker_id, ctx.settings.worker.lease_s, chunk.isolated
        )
        policy = await ctx.job_retry(chunk.job_id) if claims else None
        tasks = []
        for claim in claims:
            member = item_id(chunk.job_id, claim.index)
            ctx.held[member] = WAITING
            task = asyncio.create_task(run_item(ctx, chunk.job_id, claim, policy, chunk.urgent))
            ctx.item_tasks[member] = task
            tasks.append(task)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    if ctx.enqueuer is not None:
        # Every claimed item is settled or leased now: the chunk's record is no longer needed.
        await feed_next(ctx.store, ctx.enqueuer, chunk.job_id, finished_chunk=chunk.id)
    finished = [o for o in outcomes if isinstance(o, tuple)]
    committed = [record for record, landed in finished if landed]
    return ChunkReport(
        job_id=chunk.job_id,
        server=chunk.server,
        claimed=len(claims),
        skipped=len(chunk.items) - len(claims),
        committed=len(committed),
        refused=len(finished) - len(committed),
        released=len(outcomes) - len(finished),
        succeeded=sum(1 for r in committed if r.status == "succeeded"),
        failed=sum(1 for r in committed if r.status == "failed"),
    )


async def execute_chunk_through_outages(ctx: ExecutionContext, chunk: Chunk) -> ChunkReport:
    """Run the chunk, and while Redis cannot be reached, wait and run it again: its message stays
    unacknowledged here meanwhile. Handing it back to the broker instead (Celery's retry) needs the
    broker too: when it is down or refuses writes the republish fails, Celery rejects the failed
    task's message without requeueing it, and its items were covered by nothing. Running again is
    safe: claims skip items that are settled or leased."""
    while True:
        try:
            return await execute_chunk(ctx, chunk)
        except REDIS_ERRORS as exc:
            if ctx.draining:
                raise
            log.warning(
                "chunk %s of job %s: Redis unavailable (%s); holding it and trying again in %.0f s",
                chunk.id,
                chunk.job_id,
                exc,
                REDIS_RETRY_S,
            )
            await asyncio.sleep(REDIS_RETRY_S)


async def drain(ctx: ExecutionContext, grace_s: float) -> None:
    """Graceful shutdown: start nothing new, give back what has not started, let calls in flight
    finish within ``grace_s``, then give back the rest and stop them."""
    ctx.draining = True
    waiting = [m for m, state in ctx.held.items() if state == WAITING]
    await _release(ctx, waiting)
    calling = [task for m, task in ctx.item_tasks.items() if ctx.held.get(m) == CALLING]
    if calling:
        await asyncio.wait(calling, timeout=grace_s)
    late = [m for m, state in ctx.held.items() if state == CALLING]
    await _release(ctx, late)
    for member in late:
        task = ctx.item_tasks.get(member)
        if task is not None:
            task.cancel()


async def _release(ctx: ExecutionContext, members: list[str]) -> None:
    for member in members:
        ctx.held[member] = RELEASED
    await ctx.store.release(members)
