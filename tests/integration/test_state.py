"""The state layer on a real Redis: CAS under contention, event logs with snapshots, kills."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import ConflictError
from shared.eventlog import EventLog, fold
from shared.jobview import JobView, apply_job_event
from shared.state import CasPolicy, VersionedRecords
from shared.store import connect
from tests.harness import ROOT

pytestmark = pytest.mark.integration


def key() -> str:
    return f"test:{uuid.uuid4().hex}"


def test_64_writers_200_updates_each_lose_nothing(redis_url: str) -> None:
    writers, updates = 64, 200

    async def main() -> tuple[int, int, int]:
        client = connect(redis_url, max_connections=writers)
        records = VersionedRecords(client)
        record = key()

        async def writer() -> None:
            for _ in range(updates):
                await records.update(record, lambda value: (value or 0) + 1)

        try:
            await asyncio.gather(*(writer() for _ in range(writers)))
            final = await records.get(record)
            return final.value, final.version, records.conflicts
        finally:
            await client.aclose()

    value, version, conflicts = asyncio.run(main())
    assert value == writers * updates == 12_800
    assert version == 12_800
    print(f"conflicts: {conflicts} over {writers * updates} updates")
    assert conflicts > 0, "64 concurrent writers on one record must have raced"


def test_conflict_budget_raises_typed_error_naming_key_attempts_and_version(redis_url: str) -> None:
    record = key()
    other_writer = redis.Redis.from_url(redis_url)

    def transform(value: Any) -> Any:
        other_writer.hincrby(record, "version", 1)  # another writer lands between our read and write
        return (value or 0) + 1

    async def main() -> tuple[ConflictError, int]:
        client = connect(redis_url)
        records = VersionedRecords(client, CasPolicy(attempts=3, initial_backoff_s=0, max_backoff_s=0))
        try:
            with pytest.raises(ConflictError) as caught:
                await records.update(record, transform)
            return caught.value, records.conflicts
        finally:
            await client.aclose()

    try:
        error, conflicts = asyncio.run(main())
    finally:
        other_writer.close()
    assert error.key == record and error.attempts == 3 and conflicts == 3
    assert error.last_version == 3
    assert error.retryable is True
    assert record in str(error) and "3 times" in str(error)


def job_log(client: Any, name: str) -> EventLog[JobView]:
    return EventLog(client, f"{name}:events", f"{name}:snapshot", apply_job_event, JobView)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    statuses=st.lists(st.sampled_from(["succeeded", "failed", "cancelled"]), min_size=0, max_size=80),
    snapshot_points=st.sets(st.integers(min_value=0, max_value=80), max_size=6),
)
def test_log_read_equals_fold_of_every_appended_event(
    redis_url: str, statuses: list[str], snapshot_points: set[int]
) -> None:
    events = [{"type": "job.submitted", "total": str(len(statuses))}] + [
        {"type": "item.settled", "index": str(i), "status": s} for i, s in enumerate(statuses)
    ]

    async def main() -> tuple[JobView, JobView, int]:
        client = connect(redis_url)
        log = job_log(client, key())
        try:
            for i, event in enumerate(events):
                await log.append(event)
                if i in snapshot_points:
                    await log.snapshot()
            view = (await log.read()).state
            stream_len = await client.xlen(log.stream)
            return view, fold(apply_job_event, JobView(), events), stream_len
        finally:
            await client.aclose()

    view, expected, stream_len = asyncio.run(main())
    assert view == expected
    # Trimmed below the snapshot before the last one (one snapshot of history stays).
    taken = sorted(p for p in snapshot_points if p < len(events))
    kept_from = taken[-2] + 1 if len(taken) >= 2 else 0
    assert stream_len == len(events) - kept_from, "the stream is trimmed below the previous snapshot"


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from shared.eventlog import EventLog
    from shared.jobview import JobView, apply_job_event
    from shared.store import connect

    async def main(url, name, count):
        client = connect(url)
        log = EventLog(client, name + ":events", name + ":snapshot", apply_job_event, JobView)
        for i in range(count):
            await log.append({"type": "item.settled", "index": str(i), "status": "succeeded"})
        print("appended", flush=True)
        await asyncio.Event().wait()  # killed here: after the appends, before any snapshot
        await log.snapshot()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


def test_writer_killed_between_append_and_snapshot_leaves_reads_correct(redis_url: str) -> None:
    name = key()

    async def prepare() -> None:
        client = connect(redis_url)
        log = job_log(client, name)
        try:
            await log.append({"type": "job.submitted", "total": "150"})
            for i in range(100, 150):
                await log.append({"type": "item.settled", "index": str(i), "status": "failed"})
            assert await log.snapshot()
        finally:
            await client.aclose()

    asyncio.run(prepare())
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, redis_url, name, "100"], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "appended"
    finally:
        writer.kill()
        writer.wait(timeout=10)
    assert writer.returncode == -9

    async def check() -> tuple[JobView, JobView]:
        client = connect(redis_url)
        log = job_log(client, name)
        try:
            before = (await log.read()).state
            assert await log.snapshot()  # the next folder snapshots what the dead writer appended
            after = (await log.read()).state
            assert await client.xlen(log.stream) == 100, "trimmed below the previous snapshot"
            return before, after
        finally:
            await client.aclose()

    before, after = asyncio.run(check())
    assert before.succeeded == 100 and before.failed == 50 and before.total == 150
    assert after == before
