"""Commits from many concurrent items, coalesced: results (the item's last word) and step
checkpoints (a pipeline's progress), each batch one script call per job."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from shared.batching import Coalescer
from shared.jobs import Enqueuer, send_ready
from shared.settings import StateSettings
from shared.store import Checkpoint, CommitOutcome, JobStore, Settlement

COMMIT_RETRY_S = 60.0
# A commit waits this long for company: under load one script call then carries a dozen results
# instead of one or two. The call slot is already free by then, so only the chunk's end waits.
BATCH_LINGER_S = 0.025

T = TypeVar("T")


async def riding_out_restarts(attempt_commit: Callable[[], Awaitable[T]]) -> T:
    """Results already computed are worth waiting for: ride out a Redis restart."""
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(COMMIT_RETRY_S),
        wait=wait_exponential_jitter(multiplier=0.1, max=2.0, jitter=0.1),
        retry=retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
        reraise=True,
    ):
        with attempt:
            return await attempt_commit()
    raise AssertionError("unreachable: tenacity either returns or raises")


class BatchCommitter:
    """Coalesces commits from many concurrent items into one script call per job per round trip."""

    def __init__(
        self,
        store: JobStore,
        max_batch: int = 256,
        snapshots: StateSettings | None = None,
        enqueuer: Enqueuer | None = None,
    ) -> None:
        self.store = store
        self.snapshots = snapshots or StateSettings()
        self.enqueuer = enqueuer  # sends a job's reduce when a batch settles its last item
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
            ready = [*outcome.ready, *([outcome.reduce_chunk] if outcome.reduce_chunk else [])]
            if ready:
                await send_ready(self.enqueuer, ready)
            if outcome.unsnapshotted and self._snapshot_due(
                job_id, outcome.unsnapshotted, outcome.job_finished
            ):
                task = asyncio.create_task(self.store.snapshot(job_id))
                self._snapshotting.add(task)
                task.add_done_callback(self._snapshotting.discard)
        return landed

    async def _commit_job(self, job_id: str, settlements: list[Settlement]) -> CommitOutcome:
        return await riding_out_restarts(partial(self.store.commit, job_id, settlements))

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


class Checkpointer:
    """Commits finished steps of pipeline items under their epochs (see checkpoint.lua). No linger:
    the next step waits on it, so a batch is only what arrives while one is in flight."""

    def __init__(self, store: JobStore, max_batch: int = 256) -> None:
        self.store = store
        self._batches: Coalescer[Checkpoint, bool] = Coalescer(self._write_batch, max_batch)

    async def checkpoint(self, entry: Checkpoint) -> bool:
        """True if it landed; False if the item's lease was taken over (its epoch is stale)."""
        return await self._batches.submit(entry)

    async def _write_batch(self, entries: list[Checkpoint]) -> list[bool]:
        by_job: dict[str, list[int]] = defaultdict(list)
        for position, entry in enumerate(entries):
            by_job[entry.job_id].append(position)
        landed = [False] * len(entries)
        for job_id, positions in by_job.items():
            batch = [entries[p] for p in positions]
            outcome = await riding_out_restarts(partial(self.store.checkpoint, job_id, batch))
            for position, ok in zip(positions, outcome, strict=True):
                landed[position] = ok
        return landed
