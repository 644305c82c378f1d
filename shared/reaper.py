"""Takeover of a dead or stalled worker's items: expired leases are fenced and run again.

Every worker runs :func:`reap_once` on a timer; a lock with expiry lets one of them at a time
do the work. An expired item gets a new epoch (so its old holder's late commit is refused) and
goes back on its server's queue ahead of new work.

Poison is decided by isolation, not by counting alone. A worker killed from outside takes every
item in flight with it, so an item that has lost its lease ``max_lease_losses`` times (with its
call started; or three times that many in all) may only have been near the guilty one. It is run
once more *isolated*: alone in a worker process (see ``IsolationGate``). Only when that run's lease
is lost too, after its call started, is it settled as ``poison``.

The same pass runs the coverage sweep (coverage.py) every quarter of ``stranded_after_s``, and
drops expired jobs from the global sets (retention.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from dataclasses import dataclass

from shared.coverage import sweep
from shared.jobs import Enqueuer, cut_chunks, feed_next, send_chunks, send_ready
from shared.models import Chunk, ItemError, ResultRecord, item_id
from shared.retention import drop_expired
from shared.settings import Settings
from shared.store import ISOLATED_CALL_LOST, ISOLATED_LOST_EARLY, JobStore, LostLease, Settlement, now_ms

POISON, ISOLATE, REQUEUE = "poison", "isolate", "requeue"
SWEEPS_PER_STRANDED_AFTER = 4
STALLED_BACKLOG_MS = 3_000
UNMARKED_LOSS_FACTOR = 3


@dataclass(frozen=True)
class ReapReport:
    locked: bool
    requeued: int = 0
    poisoned: int = 0
    restored: int = 0  # chunk messages a dead worker took and never claimed, put back on the queue
    isolated: int = 0  # suspect items sent to run alone
    swept: int = 0  # items the coverage sweep found covered by nothing and enqueued again
    taken_back: int = 0  # items whose expired lease was fenced and freed (requeued, isolated or poisoned)


def poison_record(
    job_id: str, index: int, tool: str, server: str, key: str | None, losses: int
) -> ResultRecord:
    message = (
        f"gave up after its lease was lost {losses} times, the last time while it ran alone on its "
        "worker: each worker running it died or stalled (a call that crashes or hangs workers)"
    )
    return ResultRecord(
        item_id=item_id(job_id, index),
        job_id=job_id,
        index=index,
        tool=tool,
        server=server,
        key=key,
        status="failed",
        attempts=losses,
        error=ItemError(type=POISON, message=message, step="lease", retryable=False),
        finished_at_ms=now_ms(),
    )


def verdict(lost: LostLease, budget: int) -> str:
    """What to do with an item taken back: "poison", "isolate" or "requeue" (see the module's text).
    A call that kills its worker before the next heartbeat records it as started is counted only
    among all losses: a wider budget, so bystanders are rarely suspected."""
    unmarked_over = lost.any_losses >= UNMARKED_LOSS_FACTOR * budget
    if lost.isolated == ISOLATED_CALL_LOST or (lost.isolated == ISOLATED_LOST_EARLY and unmarked_over):
        return POISON
    if lost.suspect or lost.losses >= budget or unmarked_over:
        return ISOLATE
    return REQUEUE


async def reap_once(store: JobStore, enqueuer: Enqueuer, settings: Settings, worker_id: str) -> ReapReport:
    token = f"{worker_id}:{uuid.uuid4().hex[:8]}"
    lock = store.keys.reaper_lock
    if not await store.try_lock(lock, token, ttl_s=max(5.0, settings.worker.reaper_interval_s * 5)):
        return ReapReport(locked=False)
    requeued = poisoned = isolated = swept = taken_back = 0
    try:
        for job_id, indexes in (await store.expired_leases()).items():
            taken = await store.take_back(job_id, indexes)
            if not taken:
                continue
            taken_back += len(taken)
            specs = await store.item_specs(job_id, [lost.index for lost in taken])
            poison: list[Settlement] = []
            again: dict[str, list[int]] = defaultdict(list)
            alone: list[Chunk] = []
            for lost in taken:
                spec = specs[lost.index]
                server = spec.server or ""
                match verdict(lost, settings.worker.max_lease_losses):
                    case "poison":
                        losses = max(lost.losses, lost.any_losses)
                        record = poison_record(
                            job_id, lost.index, spec.tool or "pipeline", server, spec.key, losses
                        )
                        poison.append(Settlement(record=record, epoch=0))
                    case "isolate":
                        alone.append(
                            Chunk(
                                job_id=job_id, server=server, items=[lost.index], urgent=True, isolated=True
                            )
                        )
                    case _:
                        again[server].append(lost.index)
            if poison:
                outcome = await store.commit(job_id, poison, force=True)
                poisoned += outcome.committed
                # Settling an item can make its dependents or the job's reduce ready.
                await send_ready(enqueuer, [*outcome.ready, *filter(None, [outcome.reduce_chunk])])
            chunks = cut_chunks(job_id, again, settings.worker.chunk_size, urgent=True)
            await store.mark_suspects(job_id, [c.items[0] for c in alone])
            await send_chunks(store, enqueuer, [*chunks, *alone])
            requeued += sum(len(c.items) for c in chunks) + len(alone)
            isolated += len(alone)
        await store.requeued()  # only now: a reaper that dies before this point is redone next pass
        for job_id in await store.stalled_backlogs(idle_ms=STALLED_BACKLOG_MS):
            await feed_next(store, enqueuer, job_id)
        await drop_expired(store, settings.state.job_ttl_s)
        # A worker killed between taking a chunk message and claiming its items leaves no lease to
        # expire: without this the message waits for the broker's visibility timeout.
        live = await store.live_deliveries()
        restored = await asyncio.to_thread(enqueuer.restore_orphans, settings.worker.lease_s, live)
        every_s = settings.worker.stranded_after_s / SWEEPS_PER_STRANDED_AFTER
        if await store.try_lock(store.keys.sweep_due, token, ttl_s=every_s):
            swept = await sweep(store, enqueuer, settings)
    finally:
        await store.unlock(lock, token)
    return ReapReport(
        locked=True,
        requeued=requeued,
        poisoned=poisoned,
        restored=restored,
        isolated=isolated,
        swept=swept,
        taken_back=taken_back,
    )
