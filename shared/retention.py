"""Retention: ended jobs expire, and a job can be deleted now.

A finished or cancelled job's keys expire ``ttl_s`` after it ends (the job keeps the
``[state] job_ttl_s`` it was submitted with; 0 keeps it forever). The commit that ends the job sets
the expiry of every key at once (commit.lua), and writes that come later either refuse (the job is
gone) or give what they create the same expiry (job_write.lua, snapshot.lua). What cannot expire
with the job is dropped here: its members of the global sorted sets and sets, when
:func:`drop_expired` (the reaper's pass) finds them due, and its events in the global stream, which
keeps ``job_ttl_s`` of history. Readers of the jobs index drop members whose job has gone too.

:func:`delete_job` removes a job now: an ended one at once, a running one only when forced (it is
cancelled first). A worker still running items of a deleted job finds its commits refused and
writes nothing back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from shared.errors import JobRunning
from shared.jobs import cancel_job
from shared.lua import load_lua
from shared.models import JobState, JobStatus
from shared.store import JobStore, now_ms

EXPIRED_BATCH = 1000
STREAM_PAGE = 1000
# The job's creation time is the submitter's clock, stream ids are Redis's: allow them to disagree.
CLOCK_SKEW_MS = 60_000

DeleteAction = Literal["delete", "cancel_then_delete", "refuse"]


def delete_action(state: JobState, force: bool) -> DeleteAction:
    """What deleting a job in ``state`` does: an ended job goes now; a pending or running one only
    with ``force``, cancelled first (so a worker holding its items stops writing)."""
    if state in ("finished", "cancelled"):
        return "delete"
    return "cancel_then_delete" if force else "refuse"


def global_events_horizon(now: int, ttl_s: int) -> str | None:
    """The oldest global stream id kept with a retention of ``ttl_s`` (None: keep everything). An
    ended job's events all precede its end, so they are older than this once the job has expired."""
    if ttl_s <= 0:
        return None
    return f"{max(0, now - ttl_s * 1000)}-0"


def events_of(entries: Sequence[tuple[str, dict[str, str]]], job_id: str) -> list[str]:
    """The ids of the stream entries that belong to ``job_id``."""
    return [entry_id for entry_id, fields in entries if fields.get("job_id") == job_id]


async def delete_job(store: JobStore, job_id: str, *, force: bool = False) -> JobStatus:
    """Delete a job now (see :func:`delete_action`); returns its status just before it went.
    JobNotFound when it does not exist, JobRunning when it has not ended and ``force`` is false."""
    status = await store.status(job_id)
    match delete_action(status.state, force):
        case "refuse":
            raise JobRunning(
                f"job {job_id} is {status.state}: cancel it first, or force the delete "
                "(--force, or ?force=true over HTTP), which cancels it"
            )
        case "cancel_then_delete":
            # Its reduce is cancelled with it: nothing is left for a queue to carry.
            status = await cancel_job(store, job_id, run_reduce=False)
        case "delete":
            pass
    await purge(store, job_id, since_ms=status.created_at_ms)
    return status


async def purge(store: JobStore, job_id: str, since_ms: int = 0) -> None:
    """Remove every trace of the job: its keys, its idempotency key, its leases, its members of the
    global sets, and its events in the global stream (none older than ``since_ms``, its creation)."""
    jk = store.keys.job(job_id)
    keys = store.keys
    script = store.client.register_script(load_lua("delete"))
    await script(
        keys=[
            jk.meta,
            jk.running,
            keys.jobs,
            keys.active,
            keys.backlogged,
            keys.expiring,
            keys.leases,
            *jk.all(),
        ],
        args=[job_id],
    )
    await drop_global_events(store, job_id, since_ms)


async def drop_global_events(store: JobStore, job_id: str, since_ms: int = 0) -> int:
    """Delete the job's entries from the global stream, read a page at a time from ``since_ms`` on
    (stream ids are times: a job has no event before its creation); returns how many."""
    dropped = 0
    after = f"{max(0, since_ms - CLOCK_SKEW_MS)}-0"
    while True:
        page = await store.client.xrange(store.keys.events, min=after, count=STREAM_PAGE)
        if not page:
            return dropped
        mine = events_of(page, job_id)
        if mine:
            dropped += await store.client.xdel(store.keys.events, *mine)
        if len(page) < STREAM_PAGE:
            return dropped
        after = f"({page[-1][0]}"


async def drop_expired(store: JobStore, ttl_s: int) -> int:
    """The reaper's pass: drop the jobs whose keys have expired from the global sets, and trim the
    global stream to ``ttl_s`` of history. Returns how many jobs it dropped."""
    keys = store.keys
    due = await store.client.zrangebyscore(keys.expiring, "-inf", now_ms(), start=0, num=EXPIRED_BATCH)
    gone: list[str] = []
    if due:
        async with store.client.pipeline(transaction=False) as pipe:
            for job_id in due:
                pipe.exists(keys.job(job_id).meta)
            alive = await pipe.execute()
        # A job whose meta still exists had its expiry lifted by hand (PERSIST): it stays listed.
        gone = [job_id for job_id, exists in zip(due, alive, strict=True) if not exists]
        async with store.client.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.expiring, *due)
            if gone:
                pipe.zrem(keys.jobs, *gone)
                pipe.srem(keys.active, *gone)
                pipe.srem(keys.backlogged, *gone)
            await pipe.execute()
    horizon = global_events_horizon(now_ms(), ttl_s)
    if horizon is not None:
        await store.client.xtrim(keys.events, minid=horizon, approximate=False)
    return len(gone)
