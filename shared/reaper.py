"""Takeover of a dead or stalled worker's items: expired leases are fenced and run again.

Every worker runs :func:`reap_once` on a timer; a lock with expiry lets one of them at a time
do the work. An expired item gets a new epoch (so its old holder's late commit is refused) and
goes back on its server's queue ahead of new work. An item that has lost its lease
``max_lease_losses`` times (it keeps killing or stalling workers) is settled as failed instead.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from dataclasses import dataclass

from shared.jobs import Enqueuer, feed_next
from shared.models import Chunk, ItemError, ResultRecord, item_id
from shared.settings import Settings
from shared.store import JobStore, Settlement, now_ms

POISON = "poison"
STALLED_BACKLOG_MS = 3_000
UNMARKED_LOSS_FACTOR = 3


@dataclass(frozen=True)
class ReapReport:
    locked: bool
    requeued: int = 0
    poisoned: int = 0
    restored: int = 0  # chunk messages a dead worker took and never claimed, put back on the queue


def poison_record(
    job_id: str, index: int, tool: str, server: str, key: str | None, losses: int
) -> ResultRecord:
    message = (
        f"gave up after its lease was lost {losses} times: each worker running it died or stalled "
        "(a call that crashes or hangs workers)"
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


async def reap_once(store: JobStore, enqueuer: Enqueuer, settings: Settings, worker_id: str) -> ReapReport:
    token = f"{worker_id}:{uuid.uuid4().hex[:8]}"
    lock = store.keys.reaper_lock
    if not await store.try_lock(lock, token, ttl_s=max(5.0, settings.worker.reaper_interval_s * 5)):
        return ReapReport(locked=False)
    requeued = poisoned = 0
    try:
        for job_id, indexes in (await store.expired_leases()).items():
            taken = await store.take_back(job_id, indexes)
            if not taken:
                continue
            specs = await store.item_specs(job_id, [index for index, _, _ in taken])
            poison: list[Settlement] = []
            again: dict[str, list[int]] = defaultdict(list)
            budget = settings.worker.max_lease_losses
            for index, losses, any_losses in taken:
                spec = specs[index]
                server = spec.server or ""
                # A call that kills its worker before the next heartbeat marks it as started is
                # only counted among all losses: a wider budget, so bystanders are rarely blamed.
                if losses >= budget or any_losses >= UNMARKED_LOSS_FACTOR * budget:
                    losses = max(losses, any_losses)
                    record = poison_record(job_id, index, spec.tool, server, spec.key, losses)
                    poison.append(Settlement(record=record, epoch=0))
                else:
                    again[server].append(index)
            if poison:
                poisoned += (await store.commit(job_id, poison, force=True)).committed
            size = settings.worker.chunk_size
            chunks = [
                Chunk(job_id=job_id, server=server, items=items[start : start + size], urgent=True)
                for server, items in again.items()
                for start in range(0, len(items), size)
            ]
            if chunks:
                await asyncio.to_thread(enqueuer.enqueue, chunks)
                requeued += sum(len(c.items) for c in chunks)
        await store.requeued()  # only now: a reaper that dies before this point is redone next pass
        for job_id in await store.stalled_backlogs(idle_ms=STALLED_BACKLOG_MS):
            await feed_next(store, enqueuer, job_id)
        # A worker killed between taking a chunk message and claiming its items leaves no lease to
        # expire: without this the message waits for the broker's visibility timeout.
        live = await store.live_deliveries()
        restored = await asyncio.to_thread(enqueuer.restore_orphans, settings.worker.lease_s, live)
    finally:
        await store.unlock(lock, token)
    return ReapReport(locked=True, requeued=requeued, poisoned=poisoned, restored=restored)
