"""The coverage sweep: no unsettled item waits on nothing.

An unsettled item of a running job is covered by one of three things: a chunk message the broker
holds (queued, or delivered and unacknowledged), the job's backlog, or a lease (live, or expired
and about to be taken back by the reaper). Anything else strands it: a message acknowledged
without its items having run, a message deleted from the broker, a consumer that popped a message
and died before recording it as unacknowledged.

Checking that item by item would read a million items on every pass. Instead each job keeps a
record of every chunk sent to the broker and not yet finished (``JobKeys.chunks``, written before
the send, dropped when a worker has run the chunk: its items are then settled or leased). The sweep
compares those records with the chunk ids the broker holds; a record the broker has not held for
``stranded_after_s`` is stranded, and its items that are neither settled nor leased are enqueued
again as an urgent chunk. A job that has unsettled items and no record, backlog or running item at
all (records lost with Redis data, say) is checked item by item, the only time the sweep reads
every item.

That comparison needs a broker that lists the ids it holds: kombu's Redis transport does (queue
lists and an unacknowledged hash). RabbitMQ shows only how many messages wait in a queue, and
needs less: it hands a delivered, unacknowledged message back to its queue the moment its
consumer's connection is lost (a worker killed mid-chunk), publishes are confirmed before a send
returns, and queues and messages are durable. What is left to catch there is a record whose
message never was or no longer is (a failed send, a purged queue): on AMQP a job with outstanding
chunks and no item running, whose servers' queues hold nothing waiting, has its chunks counted
uncovered, on the same ``stranded_after_s`` clock, and the whole-job check stands as on Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shared.broker_queues import queue_depths
from shared.jobs import BrokerView, Enqueuer, cancel_job, cut_chunks, job_window, send_chunks
from shared.models import Chunk
from shared.settings import Settings
from shared.store import WRITE_BATCH, JobStore, now_ms

log = logging.getLogger(__name__)

WHOLE_JOB = "*"  # the uncovered-since field of a job with nothing at all covering it


@dataclass(frozen=True)
class JobCoverage:
    """What one read of Redis and the broker says covers a running job's items."""

    job_id: str
    state: str
    total: int
    cancel_requested: bool
    settled: int
    running: int  # items leased to a worker right now
    backlog_chunks: int
    records: dict[str, Chunk]  # outstanding chunks, by id
    uncovered_since: dict[str, int]  # chunk id (or WHOLE_JOB) -> ms first seen uncovered
    cancel_reduce: bool = False  # cancelled with its reduce (cancel --no-reduce)

    @property
    def unsettled(self) -> int:
        return self.total - self.settled

    def stranded(self, in_broker: BrokerView | None) -> list[Chunk]:
        """Outstanding chunks the broker does not hold (none, when the broker cannot be read)."""
        if in_broker is None:
            return []
        return [chunk for chunk_id, chunk in self.records.items() if not in_broker.holds(chunk_id)]

    @property
    def idle(self) -> bool:
        """Chunks outstanding and none of its items running: on a broker that shows only queue
        depths, the one state in which a lost chunk can be told apart (every chunk claims all its
        items when it starts, so a chunk being run leaves the job not idle)."""
        return bool(self.records) and self.running == 0

    def stranded_by_depth(self, waiting: Mapping[str, int] | None) -> list[Chunk]:
        """On a broker that shows only how many messages wait (AMQP): an idle job's outstanding
        chunks whose server's queue holds none (none, when the depths cannot be read)."""
        if waiting is None or not self.idle:
            return []
        return [chunk for chunk in self.records.values() if waiting.get(chunk.server, 1) == 0]

    @property
    def nothing_outstanding(self) -> bool:
        """Unsettled items, and no chunk, backlog entry or running item that could account for them.
        (A job is swept only once submit has recorded its chunks: see JobStore.activate.)"""
        return self.unsettled > 0 and not (self.records or self.backlog_chunks or self.running)


async def read_coverage(store: JobStore, job_id: str) -> JobCoverage | None:
    """The job's coverage bookkeeping in one round trip; None when the job no longer exists."""
    jk = store.keys.job(job_id)
    async with store.client.pipeline(transaction=False) as pipe:
        pipe.hmget(jk.meta, "state", "total", "cancel_requested", "cancel_reduce")
        pipe.hlen(jk.results)
        pipe.hlen(jk.running)
        pipe.llen(jk.backlog)
        pipe.hgetall(jk.chunks)
        pipe.hgetall(jk.uncovered)
        (
            (state, total, cancel, cancel_reduce),
            settled,
            running,
            backlog,
            records,
            uncovered,
        ) = await pipe.execute()
    if state is None:
        return None
    return JobCoverage(
        job_id=job_id,
        state=state,
        total=int(total or 0),
        cancel_requested=bool(cancel),
        cancel_reduce=bool(cancel_reduce),
        settled=int(settled),
        running=int(running),
        backlog_chunks=int(backlog),
        records={chunk_id: Chunk.model_validate_json(raw) for chunk_id, raw in records.items()},
        uncovered_since={name: int(ms) for name, ms in uncovered.items()},
    )


class BrokerReading:
    """What the broker shows in one pass: the ids of the chunks it holds (Redis), or where it
    cannot list them (AMQP) its queues' depths, read at most once and only if an idle job asks."""

    def __init__(self, store: JobStore, settings: Settings, in_broker: BrokerView | None) -> None:
        self.store = store
        self.settings = settings
        self.in_broker = in_broker
        self._waiting: Mapping[str, int] | None = None
        self._waiting_read = False

    async def stranded(self, coverage: JobCoverage) -> list[Chunk]:
        """The job's outstanding chunks that nothing in the broker covers."""
        if self.in_broker is not None:
            return coverage.stranded(self.in_broker)
        if not coverage.idle:
            return []
        if not self._waiting_read:
            self._waiting = await queue_depths(self.store, self.settings, self.settings.servers)
            self._waiting_read = True
        return coverage.stranded_by_depth(self._waiting)


async def read_broker(store: JobStore, enqueuer: Enqueuer, settings: Settings) -> BrokerReading:
    return BrokerReading(store, settings, await broker_view(enqueuer, settings.servers))


async def active_jobs(store: JobStore) -> list[str]:
    return sorted(await store.client.smembers(store.keys.active))


async def broker_view(enqueuer: Enqueuer, servers: Iterable[str]) -> BrokerView | None:
    return await asyncio.to_thread(enqueuer.chunks_in_broker, list(servers))


async def free_items(store: JobStore, job_id: str, indexes: Sequence[int]) -> list[int]:
    """Those of ``indexes`` that are neither settled, leased (live or expired: an expired lease is
    the reaper's to take back) nor waiting for needs (the commit of their last need sends them)."""
    unsettled = await store.unsettled(job_id, indexes)
    if not unsettled:
        return []
    scores = await store.client.zmscore(store.keys.leases, [f"{job_id}:{i}" for i in unsettled])
    waiting = await store.client.hmget(store.keys.job(job_id).waiting, [str(i) for i in unsettled])
    return [
        index
        for index, score, left in zip(unsettled, scores, waiting, strict=True)
        if score is None and int(left or 0) <= 0
    ]


async def restorable(store: JobStore, settings: Settings, job_id: str, indexes: Sequence[int]) -> list[Chunk]:
    """Urgent chunks of the items of ``indexes`` that nothing covers (suspects of poison as isolated
    chunks of one: the only way they may run)."""
    free = await free_items(store, job_id, indexes)
    if not free:
        return []
    specs = await store.item_specs(job_id, free)
    suspects = await store.suspects(job_id, free)
    by_server: dict[str, list[int]] = defaultdict(list)
    chunks = []
    for index in free:
        spec = specs.get(index)
        if spec is None:  # the job was deleted meanwhile
            continue
        server = spec.server or ""
        if index in suspects:
            chunks.append(Chunk(job_id=job_id, server=server, items=[index], urgent=True, isolated=True))
        else:
            by_server[server].append(index)
    return chunks + cut_chunks(job_id, by_server, settings.worker.chunk_size, urgent=True)


async def restore(
    store: JobStore, enqueuer: Enqueuer, settings: Settings, job_id: str, chunks: Sequence[Chunk]
) -> int:
    """Put restored chunks back: a job window's worth on the queues, the rest in the job's backlog
    (a whole job restored at urgent priority would go ahead of every other job). Returns the items."""
    if not chunks:
        return 0
    window = await job_window(store, settings)
    await store.push_backlog(job_id, chunks[window:])
    await send_chunks(store, enqueuer, chunks[:window])
    count = sum(len(c.items) for c in chunks)
    meta = store.keys.job(job_id).meta
    await store.write_live(meta, meta, "HINCRBY", "restored_items", count)
    return count


async def sweep(store: JobStore, enqueuer: Enqueuer, settings: Settings) -> int:
    """One pass over the running jobs (see the module's text); returns how many items it restored.
    Runs under the reaper's lock, so one process at a time."""
    stranded_ms = int(settings.worker.stranded_after_s * 1000)
    broker = await read_broker(store, enqueuer, settings)
    restored = 0
    for job_id in await active_jobs(store):
        coverage = await read_coverage(store, job_id)
        jk = store.keys.job(job_id)
        if coverage is None or coverage.state in ("finished", "cancelled"):
            await store.client.srem(store.keys.active, job_id)
            continue
        if coverage.cancel_requested and (coverage.unsettled > 0 or coverage.cancel_reduce):
            # A cancel that died half-way: finish it rather than rerun items (or the reduce).
            await cancel_job(store, job_id, enqueuer)
            continue
        now = now_ms()
        stranded = await broker.stranded(coverage)
        uncovered: dict[str, list[int]] = {c.id: c.items for c in stranded}
        if coverage.nothing_outstanding:
            uncovered[WHOLE_JOB] = []
        seen_covered = [name for name in coverage.uncovered_since if name not in uncovered]
        if seen_covered:
            await store.client.hdel(jk.uncovered, *seen_covered)
        first_seen = {name: now for name in uncovered if name not in coverage.uncovered_since}
        if first_seen:
            fields = [part for pair in first_seen.items() for part in pair]
            await store.write_live(jk.meta, jk.uncovered, "HSET", *fields)
        for name, items in uncovered.items():
            since = coverage.uncovered_since.get(name)
            if since is None or now - since < stranded_ms:
                continue
            # Forget the mark first: a sweep that overlaps this one (the reaper's lock expired during
            # a long whole-job scan) starts its own clock instead of restoring the same items.
            await store.client.hdel(jk.uncovered, name)
            if name == WHOLE_JOB:
                chunks = []
                for start in range(0, coverage.total, WRITE_BATCH):
                    batch = range(start, min(start + WRITE_BATCH, coverage.total))
                    chunks += await restorable(store, settings, job_id, batch)
            else:
                chunks = await restorable(store, settings, job_id, items)
            count = await restore(store, enqueuer, settings, job_id, chunks)
            if name != WHOLE_JOB:
                await store.client.hdel(jk.chunks, name)
            if count:
                what = "the job" if name == WHOLE_JOB else f"chunk {name}"
                log.warning(
                    "sweep: job %s: %d items of %s covered by nothing for %.0f s; enqueued again",
                    job_id,
                    count,
                    what,
                    (now - since) / 1000,
                )
            restored += count
    return restored
