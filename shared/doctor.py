"""``toolswarm doctor``: what covers a job's unsettled items, what does not, and why it is not done.

Everything here is read, nothing written: the same bookkeeping the coverage sweep and the reaper
act on (chunk records, the broker's messages, the backlog, leases, probes, heartbeats), put side
by side for someone whose job looks stuck. :func:`explain` turns it into one line, as a pure
function of the diagnosis.
"""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, Field

from shared.coverage import WHOLE_JOB, BrokerReading, active_jobs, read_broker, read_coverage
from shared.errors import JobNotFound
from shared.fleet import WorkerLife, live_workers
from shared.jobs import Enqueuer
from shared.models import Chunk, ItemSpec, ReduceStatus
from shared.probes import last_probe
from shared.settings import Settings
from shared.store import JobStore, now_ms


class ChunkCount(BaseModel):
    chunks: int = 0
    items: int = 0


class ServerHealth(BaseModel):
    server: str
    healthy: bool
    error: str | None = None
    since_ms: int | None = None
    leased_items: int = 0  # of this job's items, leased and waiting on (or calling) this server


class Uncovered(ChunkCount):
    whole_job: bool = False  # no chunk, backlog entry or lease at all, with items unsettled
    for_s: float = 0.0  # the longest any of it has been uncovered


class JobDiagnosis(BaseModel):
    job_id: str
    state: str
    total: int
    settled: int
    unsettled: int
    restored_items: int = 0
    queued: ChunkCount = Field(default_factory=ChunkCount)  # messages waiting in the broker
    delivered: ChunkCount = Field(default_factory=ChunkCount)  # delivered to a worker, not acked
    backlog: ChunkCount = Field(default_factory=ChunkCount)
    leases: dict[str, int] = Field(default_factory=dict)  # live leases by worker
    expired_leases: int = 0  # the reaper's to take back
    servers: list[ServerHealth] = Field(default_factory=list)
    waiting_on_needs: int = 0  # items whose needs have not all settled
    reduce: ReduceStatus | None = None  # the job's reduce, if it has one
    uncovered: Uncovered = Field(default_factory=Uncovered)
    broker_readable: bool = True
    why: str = ""


class Diagnosis(BaseModel):
    jobs: list[JobDiagnosis]
    workers: list[WorkerLife]
    stranded_after_s: float


async def diagnose(
    store: JobStore, enqueuer: Enqueuer, settings: Settings, job_id: str | None = None
) -> Diagnosis:
    """One job, or every job that is not finished."""
    workers = await live_workers(store)
    broker = await read_broker(store, enqueuer, settings)
    job_ids = [job_id] if job_id else await active_jobs(store)
    jobs = []
    for one in job_ids:
        try:
            diagnosis = await diagnose_job(store, one, broker)
        except JobNotFound:
            if job_id:
                raise
            continue  # finished and removed while we looked
        diagnosis.why = explain(diagnosis, workers, settings.worker.stranded_after_s)
        jobs.append(diagnosis)
    return Diagnosis(jobs=jobs, workers=workers, stranded_after_s=settings.worker.stranded_after_s)


async def diagnose_job(store: JobStore, job_id: str, broker: BrokerReading) -> JobDiagnosis:
    coverage = await read_coverage(store, job_id)
    if coverage is None:
        raise JobNotFound(f"job {job_id} does not exist")
    jk = store.keys.job(job_id)
    meta = await store.client.hgetall(jk.meta)
    diagnosis = JobDiagnosis(
        job_id=job_id,
        state=coverage.state,
        total=coverage.total,
        settled=coverage.settled,
        unsettled=coverage.unsettled,
        restored_items=int(meta.get("restored_items", 0)),
        broker_readable=broker.in_broker is not None,
        reduce=await store.reduce_status(job_id, meta),
    )
    if coverage.state in ("finished", "cancelled"):
        return diagnosis
    diagnosis.waiting_on_needs = sum(1 for left in await store.client.hvals(jk.waiting) if int(left) > 0)
    settled = await _settled_among(store, job_id, [i for c in coverage.records.values() for i in c.items])
    stranded = await broker.stranded(coverage)
    in_broker = broker.in_broker
    for chunk in coverage.records.values():
        open_items = len([i for i in chunk.items if i not in settled])
        if in_broker is None and chunk in stranded:
            continue
        if in_broker is None or chunk.id in in_broker.queued:
            bucket = diagnosis.queued
        elif chunk.id in in_broker.delivered:
            bucket = diagnosis.delivered
        else:
            continue
        bucket.chunks += 1
        bucket.items += open_items
    for raw in await store.client.lrange(jk.backlog, 0, -1):
        diagnosis.backlog.chunks += 1
        diagnosis.backlog.items += len(Chunk.model_validate_json(raw).items)
    await _leases(store, job_id, diagnosis)
    now = now_ms()
    for chunk in stranded:
        open_items = len([i for i in chunk.items if i not in settled])
        diagnosis.uncovered.chunks += 1
        diagnosis.uncovered.items += open_items
    if coverage.nothing_outstanding:
        diagnosis.uncovered.whole_job = True
        diagnosis.uncovered.items = coverage.unsettled
    since = [
        ms for name, ms in coverage.uncovered_since.items() if name == WHOLE_JOB or name in coverage.records
    ]
    if since and (diagnosis.uncovered.items or diagnosis.uncovered.chunks):
        diagnosis.uncovered.for_s = round((now - min(since)) / 1000, 1)
    return diagnosis


async def _settled_among(store: JobStore, job_id: str, indexes: list[int]) -> set[int]:
    if not indexes:
        return set()
    raws = await store.client.hmget(store.keys.job(job_id).results, [str(i) for i in indexes])
    return {index for index, raw in zip(indexes, raws, strict=True) if raw is not None}


async def _leases(store: JobStore, job_id: str, diagnosis: JobDiagnosis) -> None:
    """Leases by worker, expired ones, and the health of the servers the leased items wait on."""
    jk = store.keys.job(job_id)
    running = await store.client.hgetall(jk.running)
    indexes = sorted(running, key=int)
    scores = (
        await store.client.zmscore(store.keys.leases, [f"{job_id}:{i}" for i in indexes]) if indexes else []
    )
    live: Counter[str] = Counter()
    now = now_ms()
    for index, score in zip(indexes, scores, strict=True):
        if score is not None and score > now:
            live[running[index].split()[0]] += 1
        else:
            diagnosis.expired_leases += 1
    diagnosis.leases = dict(sorted(live.items()))
    by_server: Counter[str] = Counter()
    if indexes:
        for raw in await store.client.hmget(jk.items, indexes):
            if raw:
                by_server[ItemSpec.model_validate_json(raw).server or ""] += 1
    servers = [s for s in (await store.client.hget(jk.meta, "servers") or "").split(",") if s]
    for server in servers:
        probe = await last_probe(store.client, store.keys, server)
        healthy = probe is None or probe.ok
        diagnosis.servers.append(
            ServerHealth(
                server=server,
                healthy=healthy,
                error=None if healthy or probe is None else probe.error,
                since_ms=None if probe is None else probe.at_ms,
                leased_items=by_server[server],
            )
        )


def explain(job: JobDiagnosis, workers: list[WorkerLife], stranded_after_s: float) -> str:
    """One line: why the job is not finished yet (or that it is)."""
    if job.state in ("finished", "cancelled"):
        return f"{job.state}: all {job.total} items settled"
    unhealthy = [s for s in job.servers if not s.healthy]
    if not workers:
        return f"no live worker: {job.unsettled} items wait for one (start `toolswarm worker`)"
    if job.uncovered.items:
        what = (
            "nothing covers the job's unsettled items"
            if job.uncovered.whole_job
            else (f"{job.uncovered.items} items in {job.uncovered.chunks} chunks are covered by nothing")
        )
        return (
            f"{what} (for {job.uncovered.for_s:.0f} s): the coverage sweep enqueues them again once "
            f"uncovered for {stranded_after_s:.0f} s"
        )
    if unhealthy:
        names = "; ".join(f"{s.server} ({s.error or 'probe failed'})" for s in unhealthy)
        return f"held by the breaker: server {names} is unhealthy; its items wait until a probe finds it back"
    if job.expired_leases:
        return (
            f"{job.expired_leases} items' leases expired (worker died or stalled): the reaper takes them back"
        )
    in_flight = sum(job.leases.values())
    if job.unsettled <= 0 and job.reduce is not None:
        return f"every item settled; its reduce is {job.reduce.status}"
    if job.waiting_on_needs and not in_flight:
        return f"{job.waiting_on_needs} items wait on items they need"
    if in_flight:
        return (
            f"running: {in_flight} items in flight on {len(job.leases)} workers, {job.queued.items} queued, "
            f"{job.backlog.items} in the backlog"
        )
    if job.queued.chunks or job.delivered.chunks or job.backlog.chunks:
        return f"waiting for a worker to take its chunks: {job.queued.items + job.backlog.items} items queued"
    return f"{job.unsettled} items unsettled and nothing in flight: look again in a few seconds"
