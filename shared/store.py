"""The job store: every read and write of job state in Redis, with Lua where writes must be atomic."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.dag import Needs
from shared.errors import ConfigError, JobNotFound, RedisAuthFailed, RedisUnavailable
from shared.eventlog import EventLog
from shared.jobview import JobView, apply_job_event
from shared.keys import JobKeys, Keys
from shared.lua import load_lua
from shared.models import (
    Chunk,
    FailureCount,
    ItemSpec,
    JobState,
    JobStatus,
    PipelineSpec,
    ReduceSpec,
    ReduceStatus,
    ResultRecord,
    StateMode,
    StepRecord,
)
from shared.redaction import redacted_url
from shared.settings import RetryPolicy

WRITE_BATCH = 1000
JOBS_SCAN = 500
HANDOFF_FIELD = "@handoff"  # an item's envelope, beside its checkpoints ("INDEX:@handoff")
ISOLATED_CALL_LOST, ISOLATED_LOST_EARLY = 1, 2


def now_ms() -> int:
    return int(time.time() * 1000)


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """An async Redis client with replies decoded to str. Connects lazily, and retries a command
    on a lost connection for ~15 s (a Redis restart) before raising."""
    kwargs.setdefault("retry", Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries=12))
    kwargs.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError])
    return aioredis.Redis.from_url(url, decode_responses=True, **kwargs)


async def ping(url: str) -> None:
    """Raise :class:`RedisUnavailable` naming the URL when Redis cannot be reached, at once: the
    check does not wait out the client's retries (someone at a prompt, a readiness probe)."""
    try:
        probe = aioredis.Redis.from_url(
            url, retry=Retry(NoBackoff(), 0), retry_on_error=[], socket_connect_timeout=5, socket_timeout=5
        )
    except ValueError as exc:  # redis-py's word for a malformed URL
        raise ConfigError(f"invalid Redis URL {redacted_url(url)!r}: {exc}") from None
    try:
        await probe.ping()
    except AuthenticationError as exc:  # before ConnectionError, of which it is a subclass
        raise RedisAuthFailed.at("Redis", url, exc) from None
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise RedisUnavailable(f"cannot reach Redis at {redacted_url(url)}: {exc}") from None
    finally:
        await probe.aclose()


@dataclass(frozen=True)
class Claim:
    """An item a worker now holds, under a fencing epoch."""

    index: int
    epoch: int
    spec: ItemSpec


@dataclass(frozen=True)
class Settlement:
    """A result to commit for an item claimed under ``epoch``; ``steps`` names a pipeline item's
    steps, whose checkpoints the commit drops."""

    record: ResultRecord
    epoch: int
    steps: Sequence[str] = ()

    def args(self) -> list[Any]:
        """The item's arguments to commit.lua."""
        record = self.record
        degraded = "1" if record.status == "succeeded" and record.degraded else ""
        failure = ""
        if record.status == "failed" and record.error is not None:
            failure = json.dumps([record.error.step or "call", record.error.type])
        return [
            record.index,
            self.epoch,
            record.status,
            record.model_dump_json(exclude_none=True),
            degraded,
            failure,
            " ".join(self.steps),
        ]


@dataclass(frozen=True)
class Handing:
    """A pipeline item claimed under ``epoch``, going to another pool with its envelope (JSON)."""

    index: int
    epoch: int
    envelope: str


@dataclass(frozen=True)
class Checkpoint:
    """A finished step of a pipeline item claimed under ``epoch``."""

    job_id: str
    index: int
    epoch: int
    record: StepRecord


@dataclass(frozen=True)
class JobPlan:
    """What a job fixes for all its items at submit: a retry policy overriding the servers', and a
    pipeline for items that bring only their input."""

    retry: RetryPolicy | None = None
    pipeline: PipelineSpec | None = None
    reduce: ReduceSpec | None = None
    total: int = 0


@dataclass(frozen=True)
class LostLease:
    """An item the reaper took back: its losses with the call started, all its losses, and whether
    the lost run was its isolated one (``ISOLATED_CALL_LOST``: after its call started;
    ``ISOLATED_LOST_EARLY``: before the heartbeat recorded the call)."""

    index: int
    losses: int
    any_losses: int
    isolated: int
    suspect: bool = False  # already sent to run isolated: only an isolated claim may take it


@dataclass(frozen=True)
class CommitOutcome:
    committed: int
    refused: int
    job_finished: bool
    landed: list[bool]
    unsnapshotted: int = 0  # log mode: events appended since the last snapshot
    reduce_chunk: Chunk | None = None  # this batch settled the last item: the reduce is ready
    ready: list[Chunk] = field(default_factory=list)  # items whose last need this batch settled


def failure_counts(counts: dict[str, Any]) -> list[FailureCount]:
    """Failures by '["STEP","ERROR_TYPE"]', most frequent first."""
    listed = []
    for pair, count in counts.items():
        step, error_type = json.loads(pair)
        listed.append(FailureCount(step=step, error_type=error_type, count=int(count)))
    return sorted(listed, key=lambda f: (-f.count, f.step, f.error_type))


class JobStore:
    def __init__(self, client: aioredis.Redis, keys: Keys, global_events_maxlen: int = 100_000) -> None:
        # redis-py's annotations cannot express decode_responses=True (every reply is str): use Any.
        self.client: Any = client
        self.keys = keys
        self.global_events_maxlen = global_events_maxlen
        self._claim = client.register_script(load_lua("claim"))
        self._commit = client.register_script(load_lua("commit"))
        self._expire = client.register_script(load_lua("expire"))
        self._unlock = client.register_script(load_lua("unlock"))
        self._feed = client.register_script(load_lua("feed"))
        self._checkpoint = client.register_script(load_lua("checkpoint"))
        self._hand_off = client.register_script(load_lua("handoff"))
        self._job_write = client.register_script(load_lua("job_write"))

    # --- submit side -------------------------------------------------------------------------

    async def reserve_idempotency_key(self, key: str, job_id: str) -> str:
        """Bind ``key`` to ``job_id`` unless it is bound already; return the job it is bound to."""
        idem = self.keys.idempotency(key)
        if await self.client.set(idem, job_id, nx=True):
            return job_id
        existing = await self.client.get(idem)
        return existing or job_id

    async def create_job(
        self,
        job_id: str,
        items: Sequence[ItemSpec],
        servers: Iterable[str],
        state_mode: StateMode = "cas",
        retry: RetryPolicy | None = None,
        pipeline: PipelineSpec | None = None,
        reduce: ReduceSpec | None = None,
        needs: Needs | None = None,
        chunk_size: int = 50,
        *,
        ttl_s: int = 0,
        idempotency_key: str | None = None,
    ) -> None:
        """Write the job record and its items in pipelined batches, then make it visible. A reduce
        is kept as one more unit after the items (index = total), claimed once they have settled.
        ``ttl_s``: how long the job's keys (and its idempotency key) outlive its end (0: forever)."""
        jk = self.keys.job(job_id)
        if reduce is not None:
            # Its arguments stay in the job's plan: they refer to the summary, not to an item's scope.
            unit = ItemSpec(tool=reduce.tool, server=reduce.server)
            await self.client.hset(jk.items, str(len(items)), unit.model_dump_json(exclude_none=True))
        for start in range(0, len(items), WRITE_BATCH):
            batch = items[start : start + WRITE_BATCH]
            mapping = {
                str(start + offset): item.model_dump_json(exclude_none=True)
                for offset, item in enumerate(batch)
            }
            await self.client.hset(jk.items, mapping=mapping)
        if needs is not None and needs.of:
            await self.client.hset(jk.waiting, mapping={str(i): n for i, n in needs.waiting.items()})
            await self.client.hset(jk.needs, mapping={str(i): json.dumps(p) for i, p in needs.of.items()})
            await self.client.hset(
                jk.dependents,
                mapping={str(i): " ".join(map(str, deps)) for i, deps in needs.dependents.items()},
            )
        created = now_ms()
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(
                jk.meta,
                mapping={
                    "job_id": job_id,
                    "total": len(items),
                    "succeeded": 0,
                    "failed": 0,
                    "cancelled": 0,
                    "state": "pending",
                    "created_at_ms": created,
                    "servers": ",".join(sorted(set(servers))),
                    "state_mode": state_mode,
                    "version": 0,
                    "chunk_size": chunk_size,
                    "ttl_s": ttl_s,
                    **(
                        {"idempotency_key": self.keys.idempotency(idempotency_key)} if idempotency_key else {}
                    ),
                    **({"retry": retry.model_dump_json()} if retry else {}),
                    **({"pipeline": pipeline.model_dump_json(exclude_defaults=True)} if pipeline else {}),
                    **(
                        {
                            "reduce": reduce.model_dump_json(exclude_none=True),
                            "reduce_server": reduce.server or "",
                        }
                        if reduce
                        else {}
                    ),
                },
            )
            submitted = {"type": "job.submitted", "job_id": job_id, "total": len(items), "at_ms": created}
            pipe.xadd(jk.events, submitted)
            pipe.xadd(self.keys.events, submitted, maxlen=self.global_events_maxlen, approximate=True)
            pipe.zadd(self.keys.jobs, {job_id: created})
            await pipe.execute()

    async def activate(self, job_id: str) -> None:
        """The job's chunks are recorded and on their way: from now on the coverage sweep watches it."""
        await self.client.sadd(self.keys.active, job_id)

    # --- worker side -------------------------------------------------------------------------

    async def claim(
        self, job_id: str, indexes: Sequence[int], worker: str, lease_s: float = 5.0, isolated: bool = False
    ) -> list[Claim]:
        """Lease the unsettled, unleased items among ``indexes`` to ``worker`` under new epochs
        (``isolated``: the run that decides whether a suspect item is poison)."""
        jk = self.keys.job(job_id)
        reply = await self._claim(
            keys=[
                jk.meta,
                jk.items,
                jk.results,
                jk.epochs,
                jk.running,
                jk.events,
                self.keys.events,
                self.keys.leases,
                jk.lost,
                jk.waiting,
            ],
            args=[worker, self.global_events_maxlen, int(lease_s * 1000), "1" if isolated else "0", *indexes],
        )
        if reply == [-1]:
            raise JobNotFound(f"job {job_id} does not exist")
        return [
            Claim(
                index=int(reply[i]), epoch=int(reply[i + 1]), spec=ItemSpec.model_validate_json(reply[i + 2])
            )
            for i in range(0, len(reply), 3)
        ]

    async def commit(
        self, job_id: str, settlements: Sequence[Settlement], *, force: bool = False
    ) -> CommitOutcome:
        """Commit results of one job in one script call (see commit.lua for the rules)."""
        jk = self.keys.job(job_id)
        args: list[Any] = [job_id, self.global_events_maxlen, "1" if force else "0"]
        for settlement in settlements:
            args += settlement.args()
        committed, refused, finished, landed, unsnapshotted, reduce_chunk, ready = await self._commit(
            keys=self._commit_keys(jk), args=args
        )
        return CommitOutcome(
            committed=int(committed),
            refused=int(refused),
            job_finished=bool(finished),
            landed=[flag == "1" for flag in landed],
            unsnapshotted=int(unsnapshotted),
            reduce_chunk=Chunk.model_validate_json(reduce_chunk) if reduce_chunk else None,
            ready=[Chunk.model_validate_json(raw) for raw in ready],
        )

    async def needed(self, job_id: str, indexes: Sequence[int]) -> dict[int, dict[str, ResultRecord | None]]:
        """For those of ``indexes`` that have needs: each need's key and its result record (None
        while it has not settled)."""
        jk = self.keys.job(job_id)
        raws = await self.client.hmget(jk.needs, [str(i) for i in indexes])
        pairs = {index: json.loads(raw) for index, raw in zip(indexes, raws, strict=True) if raw}
        if not pairs:
            return {}
        wanted = sorted({need for found in pairs.values() for _, need in found})
        results = await self.client.hmget(jk.results, [str(i) for i in wanted])
        records = {i: ResultRecord.model_validate_json(r) for i, r in zip(wanted, results, strict=True) if r}
        return {index: {key: records.get(need) for key, need in found} for index, found in pairs.items()}

    def _commit_keys(self, jk: JobKeys) -> list[str]:
        return [
            jk.meta,
            jk.results,
            jk.epochs,
            jk.running,
            jk.events,
            self.keys.events,
            jk.notify,
            self.keys.leases,
            self.keys.active,
            jk.failures,
            jk.steps,
            jk.chunks,
            jk.items,
            jk.waiting,
            jk.dependents,
            self.keys.backlogged,
            self.keys.expiring,
            *jk.all(),
        ]

    async def checkpoint(self, job_id: str, entries: Sequence[Checkpoint]) -> list[bool]:
        """Commit finished steps of one job's items (see checkpoint.lua); True where one landed."""
        jk = self.keys.job(job_id)
        args: list[Any] = []
        for entry in entries:
            record = entry.record.model_dump_json(exclude_none=True)
            args += [entry.index, entry.epoch, entry.record.name, record]
        landed = await self._checkpoint(keys=[jk.epochs, jk.results, jk.steps], args=args)
        return [flag == "1" for flag in landed]

    async def checkpoints(
        self, job_id: str, wanted: dict[int, list[str]]
    ) -> dict[int, dict[str, StepRecord]]:
        """The checkpointed steps of these items (index -> their step names), by index and name."""
        fields = [(index, name) for index, names in wanted.items() for name in names]
        if not fields:
            return {}
        raws = await self.client.hmget(self.keys.job(job_id).steps, [f"{i}:{n}" for i, n in fields])
        found: dict[int, dict[str, StepRecord]] = {}
        for (index, name), raw in zip(fields, raws, strict=True):
            if raw is not None:
                found.setdefault(index, {})[name] = StepRecord.model_validate_json(raw)
        return found

    async def hand_off(self, chunk: Chunk, entries: Sequence[Handing]) -> list[bool]:
        """Give pipeline items of ``chunk`` to its server's pool (see handoff.lua); True where one
        was handed off, False where its lease had been taken over."""
        jk = self.keys.job(chunk.job_id)
        args: list[Any] = [chunk.id, chunk.model_dump_json(exclude_defaults=True)]
        for entry in entries:
            args += [entry.index, entry.epoch, f"{chunk.job_id}:{entry.index}", entry.envelope]
        landed = await self._hand_off(
            keys=[jk.epochs, jk.results, jk.steps, jk.running, self.keys.leases, jk.chunks], args=args
        )
        return [flag == "1" for flag in landed]

    async def handoff_envelopes(self, job_id: str, indexes: Sequence[int]) -> dict[int, str]:
        """The envelopes (JSON) the items were last handed off with, by index."""
        if not indexes:
            return {}
        raws = await self.client.hmget(self.keys.job(job_id).steps, [f"{i}:{HANDOFF_FIELD}" for i in indexes])
        return {index: raw for index, raw in zip(indexes, raws, strict=True) if raw is not None}

    # --- leases ------------------------------------------------------------------------------

    async def renew(self, members: Sequence[str], lease_s: float) -> None:
        """Extend the leases of in-flight items ("job_id:index") in one round trip.

        XX: a lease the reaper already took back stays gone; the holder's commit will be refused.
        """
        if members:
            expiry = int(time.time() * 1000 + lease_s * 1000)
            await self.client.zadd(self.keys.leases, dict.fromkeys(members, expiry), xx=True)

    async def hold_deliveries(self, tags: Sequence[str], lease_s: float) -> None:
        """Say these chunk messages (broker delivery tags) are running here, for ``lease_s``."""
        if tags:
            expiry = int(time.time() * 1000 + lease_s * 1000)
            await self.client.zadd(self.keys.deliveries, dict.fromkeys(tags, expiry))

    async def live_deliveries(self) -> set[str]:
        """Delivery tags some live worker holds (expired holds are dropped on the way)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(self.keys.deliveries, "-inf", int(time.time() * 1000))
            pipe.zrange(self.keys.deliveries, 0, -1)
            _, tags = await pipe.execute()
        return set(tags)

    async def mark_calling(self, entries: Sequence[tuple[str, int, int]]) -> None:
        """Record that these items (job_id, index, epoch) have started their call: a lost lease
        counts fully against an item only if its call had started (see expire.lua)."""
        if not entries:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for job_id, index, epoch in entries:
                jk = self.keys.job(job_id)
                await self.write_live(jk.meta, jk.calling, "HSET", str(index), epoch, client=pipe)
            await pipe.execute()

    async def release(self, members: Sequence[str]) -> None:
        """Give leases back at once (graceful shutdown): the reaper reassigns them without a loss."""
        if members:
            await self.client.zadd(self.keys.leases, dict.fromkeys(members, 0), xx=True)

    async def expired_leases(self, limit: int = 1000) -> dict[str, list[int]]:
        """Items whose lease has expired, by job."""
        members = await self.client.zrangebyscore(self.keys.leases, "-inf", now_ms(), start=0, num=limit)
        by_job: dict[str, list[int]] = {}
        for member in members:
            job_id, _, index = member.rpartition(":")
            by_job.setdefault(job_id, []).append(int(index))
        return by_job

    async def take_back(self, job_id: str, indexes: Sequence[int]) -> list[LostLease]:
        """Fence and free expired items of one job; returns the items to run again."""
        jk = self.keys.job(job_id)
        reply = await self._expire(
            keys=[jk.meta, jk.results, jk.epochs, jk.running, self.keys.leases, jk.lost, jk.calling],
            args=[job_id, now_ms(), *indexes],
        )
        return [
            LostLease(
                index=int(reply[i]),
                losses=int(reply[i + 1]),
                any_losses=int(reply[i + 2]),
                isolated=int(reply[i + 3]),
                suspect=reply[i + 4] == 1,
            )
            for i in range(0, len(reply), 5)
        ]

    async def mark_suspects(self, job_id: str, indexes: Sequence[int]) -> None:
        """From now on these items run only isolated (see claim.lua)."""
        if indexes:
            await self.client.hset(
                self.keys.job(job_id).lost, mapping={f"{index}:suspect": 1 for index in indexes}
            )

    async def suspects(self, job_id: str, indexes: Sequence[int]) -> set[int]:
        flags = await self.client.hmget(self.keys.job(job_id).lost, [f"{i}:suspect" for i in indexes])
        return {index for index, flag in zip(indexes, flags, strict=True) if flag}

    async def requeued(self) -> None:
        """Drop the lease entries of items taken back (score 1) once they are requeued."""
        await self.client.zremrangebyscore(self.keys.leases, 1, 1)

    async def write_live(
        self,
        meta: str,
        key: str,
        command: Literal["HSET", "HINCRBY", "RPUSH"],
        *args: Any,
        client: Any = None,
    ) -> bool:
        """Write to a key of the job whose record is ``meta`` only while the job exists, the key
        expiring with an ended job (see job_write.lua); False when the job is gone. ``client``: a
        pipeline to queue the write on (the reply then comes with the pipeline's)."""
        return bool(await self._job_write(keys=[meta, key], args=[command, *args], client=client))

    async def try_lock(self, key: str, token: str, ttl_s: float) -> bool:
        return bool(await self.client.set(key, token, nx=True, px=int(ttl_s * 1000)))

    async def unlock(self, key: str, token: str) -> None:
        await self._unlock(keys=[key], args=[token])

    # --- read side ---------------------------------------------------------------------------

    def job_log(self, job_id: str) -> EventLog[JobView]:
        """The job's event log, whose fold is the job view (authoritative in log mode)."""
        jk = self.keys.job(job_id)
        return EventLog(self.client, jk.events, jk.snapshot, apply_job_event, JobView, counter=jk.meta)

    async def snapshot(self, job_id: str) -> bool:
        return await self.job_log(job_id).snapshot()

    async def status(self, job_id: str) -> JobStatus:
        jk = self.keys.job(job_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(jk.meta)
            pipe.hlen(jk.running)
            pipe.hgetall(jk.failures)
            meta, running, failures = await pipe.execute()
        reduce = await self.reduce_status(job_id, meta)
        if not meta:
            raise JobNotFound(f"job {job_id} does not exist")
        total = int(meta["total"])
        mode: StateMode = meta.get("state_mode", "cas")
        if mode == "log":
            view = (await self.job_log(job_id).read()).state
            counts = (view.succeeded, view.failed, view.cancelled)
            state: JobState = view.state
            finished_at = view.finished_at_ms
            degraded, failures = view.degraded, view.failures
        else:
            counts = (
                int(meta.get("succeeded", 0)),
                int(meta.get("failed", 0)),
                int(meta.get("cancelled", 0)),
            )
            state = meta["state"]
            finished_at = int(meta["finished_at_ms"]) if "finished_at_ms" in meta else None
            degraded = int(meta.get("degraded", 0))
        succeeded, failed, cancelled = counts
        settled = succeeded + failed + cancelled
        if reduce is not None and reduce.status == "running":
            running = int(running) - 1
        running = 0 if state in ("finished", "cancelled") else min(int(running), total - settled)
        return JobStatus(
            job_id=job_id,
            state=state,
            total=total,
            succeeded=succeeded,
            failed=failed,
            cancelled=cancelled,
            running=running,
            pending=total - settled - running,
            created_at_ms=int(meta["created_at_ms"]),
            finished_at_ms=finished_at,
            expires_at_ms=int(meta["expires_at_ms"]) if "expires_at_ms" in meta else None,
            servers=[s for s in meta.get("servers", "").split(",") if s],
            state_mode=mode,
            restored_items=int(meta.get("restored_items", 0)),
            degraded=degraded,
            failures=failure_counts(failures),
            reduce=reduce,
            retry_of=meta.get("retry_of"),
            retried_by=meta.get("retried_by"),
        )

    async def reduce_status(self, job_id: str, meta: dict[str, str]) -> ReduceStatus | None:
        """Where the job's reduce is, given its meta (None for a job without one)."""
        if "reduce" not in meta:
            return None
        jk = self.keys.job(job_id)
        index = meta["total"]
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(jk.results, index)
            pipe.hexists(jk.running, index)
            raw, running = await pipe.execute()
        if raw is None:
            return ReduceStatus(status="running" if running else "pending")
        record = ResultRecord.model_validate_json(raw)
        return ReduceStatus(
            status=record.status, attempts=record.attempts, result=record.result, error=record.error
        )

    async def results(self, job_id: str, batch: int = WRITE_BATCH) -> AsyncIterator[ResultRecord]:
        """Settled result records in item order."""
        status = await self.status(job_id)
        jk = self.keys.job(job_id)
        for start in range(0, status.total, batch):
            fields = [str(i) for i in range(start, min(start + batch, status.total))]
            for raw in await self.client.hmget(jk.results, fields):
                if raw is not None:
                    yield ResultRecord.model_validate_json(raw)

    async def results_page(
        self, job_id: str, start: int, limit: int, status: str | None = None, step: str | None = None
    ) -> tuple[list[ResultRecord], int | None]:
        """Up to ``limit`` settled results from item ``start`` on (optionally of one status, or
        failed at one step), and the index to continue from (None at the end)."""
        total = (await self.status(job_id)).total
        page: list[ResultRecord] = []
        index = start
        results_key = self.keys.job(job_id).results
        while index < total and len(page) < limit:
            window = range(index, min(index + WRITE_BATCH, total))
            raws = await self.client.hmget(results_key, [str(i) for i in window])
            for i, raw in zip(window, raws, strict=True):
                index = i + 1
                if raw is None:
                    continue
                record = ResultRecord.model_validate_json(raw)
                if record.matches(status, step):
                    page.append(record)
                    if len(page) == limit:
                        break
        return page, (index if index < total else None)

    async def item_specs(self, job_id: str, indexes: Sequence[int]) -> dict[int, ItemSpec]:
        jk = self.keys.job(job_id)
        raws = await self.client.hmget(jk.items, [str(i) for i in indexes])
        return {i: ItemSpec.model_validate_json(raw) for i, raw in zip(indexes, raws, strict=True) if raw}

    async def unsettled(self, job_id: str, indexes: Sequence[int]) -> list[int]:
        jk = self.keys.job(job_id)
        flags = await self.client.hmget(jk.results, [str(i) for i in indexes])
        return [i for i, raw in zip(indexes, flags, strict=True) if raw is None]

    async def request_cancel(self, job_id: str, cancel_reduce: bool = False) -> bool:
        """Mark the job cancelled (and, with ``cancel_reduce``, its reduce too: claim.lua then never
        runs it). Returns whether its reduce may still run."""
        jk = self.keys.job(job_id)
        if not await self.client.exists(jk.meta):
            raise JobNotFound(f"job {job_id} does not exist")
        await self.client.hset(
            jk.meta, mapping={"cancel_requested": "1", **({"cancel_reduce": "1"} if cancel_reduce else {})}
        )
        return not await self.client.hexists(jk.meta, "cancel_reduce")

    async def push_backlog(self, job_id: str, chunks: Sequence[Chunk]) -> None:
        if not chunks:
            return
        await self.client.sadd(self.keys.backlogged, job_id)
        jk = self.keys.job(job_id)
        for start in range(0, len(chunks), WRITE_BATCH):
            batch = [c.model_dump_json() for c in chunks[start : start + WRITE_BATCH]]
            await self.write_live(jk.meta, jk.backlog, "RPUSH", *batch)

    async def record_chunks(self, chunks: Sequence[Chunk]) -> None:
        """Note chunks as outstanding before they reach the broker (what the coverage sweep checks)."""
        by_job: dict[str, dict[str, str]] = {}
        for chunk in chunks:
            by_job.setdefault(chunk.job_id, {})[chunk.id] = chunk.model_dump_json(exclude_defaults=True)
        async with self.client.pipeline(transaction=False) as pipe:
            for job_id, records in by_job.items():
                jk = self.keys.job(job_id)
                fields = [part for pair in records.items() for part in pair]
                await self.write_live(jk.meta, jk.chunks, "HSET", *fields, client=pipe)
            await pipe.execute()

    async def backlog_head(self, job_id: str, finished_chunk: str | None = None) -> str | None:
        """The next chunk of the job's backlog; in the same round trip, drop the record of the chunk
        that just finished (its items are settled or leased now)."""
        jk = self.keys.job(job_id)
        if finished_chunk is None:
            head: str | None = await self.client.lindex(jk.backlog, 0)
            return head
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hdel(jk.chunks, finished_chunk)
            pipe.hdel(jk.uncovered, finished_chunk)
            pipe.lindex(jk.backlog, 0)
            *_, head = await pipe.execute()
        return head

    async def pop_backlog_head(self, job_id: str, head: str) -> bool:
        return bool(await self._feed(keys=[self.keys.job(job_id).backlog], args=[head]))

    async def stalled_backlogs(self, idle_ms: int) -> list[str]:
        """Jobs with chunks in their backlog and no event for ``idle_ms``: feeds were lost (a
        worker died between finishing a chunk and feeding the next) and the window ran dry."""
        stalled = []
        for job_id in await self.client.smembers(self.keys.backlogged):
            jk = self.keys.job(job_id)
            if not await self.client.llen(jk.backlog):
                await self.client.srem(self.keys.backlogged, job_id)
                continue
            last = await self.client.xrevrange(jk.events, count=1)
            last_ms = int(last[0][0].split("-")[0]) if last else 0
            if now_ms() - last_ms > idle_ms:
                stalled.append(job_id)
        return stalled

    async def live_worker_count(self) -> int:
        return len([key async for key in self.client.scan_iter(match=self.keys.workers_pattern)])

    async def job_plan(self, job_id: str) -> JobPlan:
        fields = ["retry", "pipeline", "reduce", "total"]
        retry, pipeline, reduce, total = await self.client.hmget(self.keys.job(job_id).meta, fields)
        return JobPlan(
            retry=RetryPolicy.model_validate_json(retry) if retry else None,
            pipeline=PipelineSpec.model_validate_json(pipeline) if pipeline else None,
            reduce=ReduceSpec.model_validate_json(reduce) if reduce else None,
            total=int(total or 0),
        )

    async def reduce_record(self, job_id: str) -> ResultRecord | None:
        """The job's reduce record once it has settled (None before, or for a job without one)."""
        jk = self.keys.job(job_id)
        total, has_reduce = await self.client.hmget(jk.meta, ["total", "reduce"])
        if total is None:
            raise JobNotFound(f"job {job_id} does not exist")
        if not has_reduce:
            return None
        raw = await self.client.hget(jk.results, total)
        return ResultRecord.model_validate_json(raw) if raw else None

    async def refused_commits(self, job_id: str) -> int:
        return int(await self.client.hget(self.keys.job(job_id).meta, "refused_commits") or 0)

    async def events(
        self, job_id: str, after: str = "0", count: int = 1000
    ) -> list[tuple[str, dict[str, str]]]:
        reply = await self.client.xrange(
            self.keys.job(job_id).events, min=f"({after}" if after != "0" else "-", count=count
        )
        return [(entry_id, fields) for entry_id, fields in reply]

    async def follow(
        self, job_id: str, every_s: float = 0.1, block_ms: int = 1000
    ) -> AsyncIterator[JobStatus]:
        """The job's status now, then each time its events move (at most once per ``every_s``, so a
        fast job costs a read per interval, not one per commit), until it is done. The cursor only
        needs to show that something happened since the last look, so it reads one entry at a time."""
        events = self.keys.job(job_id).events
        newest = await self.client.xrevrange(events, count=1)
        cursor = newest[0][0] if newest else "0-0"
        while True:
            status = await self.status(job_id)
            shown = time.monotonic()
            yield status
            if status.done:
                return
            reply = await self.client.xread({events: cursor}, block=block_ms, count=1)
            if reply:
                cursor = reply[0][1][-1][0]
                await asyncio.sleep(max(0.0, shown + every_s - time.monotonic()))

    async def wait_until_done(self, job_id: str, timeout_s: float | None = None) -> JobStatus:
        """Block until the job is finished or cancelled; TimeoutError after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            async for status in self.follow(job_id, every_s=0.05):
                if status.done:
                    return status
        raise AssertionError("unreachable: follow ends with a done status")

    async def list_jobs(self, limit: int = 20) -> list[str]:
        return list(await self.client.zrevrange(self.keys.jobs, 0, limit - 1))

    async def jobs_page(
        self, cursor: str | None, limit: int, state: JobState | None = None
    ) -> tuple[list[JobStatus], str | None]:
        """Jobs newest first after ``cursor`` (``CREATED_MS:JOB_ID`` of the last one shown), of one
        state if asked, and the cursor to continue from (None at the end). A page looks at no more
        than ``JOBS_SCAN`` jobs, so a rare state cannot make one request read every job: the page
        may then come back short, with a cursor."""
        start = 0
        if cursor is not None:
            created, _, last = cursor.partition(":")
            rank = await self.client.zrevrank(self.keys.jobs, last)
            # the last job shown has gone (deleted): continue after its creation time instead
            start = (
                rank + 1 if rank is not None else await self.client.zcount(self.keys.jobs, created, "+inf")
            )
        page: list[JobStatus] = []
        scanned = 0
        next_cursor: str | None = None
        gone: list[str] = []  # expired or deleted: a sorted set member cannot expire with its job
        while len(page) < limit and scanned < JOBS_SCAN:
            window = await self.client.zrevrange(
                self.keys.jobs, start + scanned, start + scanned + limit - 1, withscores=True
            )
            if not window:
                next_cursor = None
                break
            for job_id, created_ms in window:
                scanned += 1
                next_cursor = f"{int(created_ms)}:{job_id}"
                try:
                    status = await self.status(job_id)
                except JobNotFound:
                    gone.append(job_id)
                    continue
                if state is None or status.state == state:
                    page.append(status)
                    if len(page) == limit:
                        break
        else:
            if await self.client.zcard(self.keys.jobs) <= start + scanned:
                next_cursor = None
        if gone:
            await self.client.zrem(self.keys.jobs, *gone)
        return page, next_cursor

    async def discard_job(self, job_id: str, idempotency_key: str | None = None) -> None:
        """Remove every trace of a job (used when its submit fails half-way)."""
        keys = self.keys.job(job_id).all()
        if idempotency_key:
            keys.append(self.keys.idempotency(idempotency_key))
        await self.client.delete(*keys)
        await self.client.zrem(self.keys.jobs, job_id)
