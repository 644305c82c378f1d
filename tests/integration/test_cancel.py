"""Cancelling a running job: every item ends with exactly one record, late results are refused."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shared.models import JobStatus, ResultRecord
from shared.store import JobStore
from tests.harness import Cluster, holds_for, make_cluster, stdio_demo, wait_until

pytestmark = pytest.mark.integration

ITEMS = 300
SLEEP_MS = 200
# Per worker process: at most this many calls at once, so the job takes seconds, not a blink.
MAX_CONCURRENCY = 4
SETTLED_BEFORE_CANCEL = 20
QUIET_AFTER_CANCEL_S = 4.0


def job_view(cluster: Cluster, job_id: str) -> JobStatus:
    async def read(store: JobStore) -> JobStatus:
        return await store.status(job_id)

    status: JobStatus = cluster.run(cluster.with_store(read))
    return status


def wait_for_settled(cluster: Cluster, job_id: str, count: int, timeout: float = 30) -> JobStatus:
    def enough() -> JobStatus | None:
        status = job_view(cluster, job_id)
        return status if status.settled >= count else None

    found: JobStatus = wait_until(enough, timeout, f"{count} items settled")
    return found


def snapshot(cluster: Cluster, job_id: str) -> tuple[dict[str, str], dict[str, str], int, int]:
    """The raw result records, the job's counters, its event count and its refused commits."""

    async def read(store: JobStore) -> tuple[dict[str, str], dict[str, str], int, int]:
        jk = store.keys.job(job_id)
        results = await store.client.hgetall(jk.results)
        meta = await store.client.hgetall(jk.meta)
        counters = {k: meta.get(k, "0") for k in ("succeeded", "failed", "cancelled", "state", "total")}
        events = await store.client.xlen(jk.events)
        return results, counters, events, await store.refused_commits(job_id)

    result: tuple[dict[str, str], dict[str, str], int, int] = cluster.run(cluster.with_store(read))
    return result


def job_events(cluster: Cluster, job_id: str) -> list[dict[str, str]]:
    async def read(store: JobStore) -> list[dict[str, str]]:
        return [fields for _, fields in await store.events(job_id, count=100_000)]

    events: list[dict[str, str]] = cluster.run(cluster.with_store(read))
    return events


def test_cancel_settles_every_item_once_and_refuses_late_results(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(
        tmp_path, redis_url, {"demo": stdio_demo(timeout_s=10, max_concurrency=MAX_CONCURRENCY)}
    )
    stop_workers.append(cluster)
    cluster.start_workers(2)
    items_file = tmp_path / "items.jsonl"
    items_file.write_text(
        "".join(json.dumps({"tool": "sleep", "arguments": {"ms": SLEEP_MS}}) + "\n" for _ in range(ITEMS))
    )
    submitted = cluster.cli("submit", str(items_file), "--server", "demo", "--chunk-size", "10", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]

    before = wait_for_settled(cluster, job_id, SETTLED_BEFORE_CANCEL)
    assert before.state == "running" and before.settled < ITEMS

    out = cluster.cli("cancel", job_id, "--json")
    assert out.returncode == 0, out.stderr
    view: dict[str, Any] = json.loads(out.stdout)
    assert view["state"] == "cancelled"
    assert view["total"] == ITEMS
    assert view["failed"] == 0
    assert view["succeeded"] >= SETTLED_BEFORE_CANCEL
    assert view["cancelled"] > 0, "the job was cancelled mid-way, not after it finished"
    assert view["succeeded"] + view["cancelled"] == ITEMS
    assert view["pending"] == 0 and view["running"] == 0

    # Items that were running when the job was cancelled finish on the workers; their commits
    # must be refused: nothing about the job changes after cancel returned.
    results, counters, events, refused = snapshot(cluster, job_id)
    assert len(results) == ITEMS
    refused = 0

    def unchanged() -> bool:
        nonlocal refused
        now_results, now_counters, now_events, refused = snapshot(cluster, job_id)
        return (now_counters, now_events, now_results) == (counters, events, results)

    holds_for(unchanged, QUIET_AFTER_CANCEL_S, "nothing about the job changes after cancel", interval=0.25)
    assert refused >= 0
    print(f"late commits refused after cancel: {refused}")

    listed = cluster.cli("results", job_id)
    assert listed.returncode == 0, listed.stderr
    records = [ResultRecord.model_validate_json(line) for line in listed.stdout.splitlines()]
    assert sorted(r.index for r in records) == list(range(ITEMS)), "every item has exactly one result"
    statuses = Counter(r.status for r in records)
    assert set(statuses) == {"succeeded", "cancelled"}
    assert statuses["succeeded"] == view["succeeded"] and statuses["cancelled"] == view["cancelled"]
    for record in records:
        if record.status == "succeeded":
            assert record.result is not None and record.result.text() == f"slept {SLEEP_MS}ms"
            assert record.worker
        else:
            assert record.result is None and record.error is None and record.worker is None

    stream = job_events(cluster, job_id)
    completed = [e for e in stream if e["type"] == "job.completed"]
    assert len(completed) == 1
    assert completed[0]["state"] == "cancelled"
    assert int(completed[0]["succeeded"]) + int(completed[0]["cancelled"]) == ITEMS
    assert stream[-1]["type"] == "job.completed", "no item settles after the job completed"
    settled = Counter(int(e["index"]) for e in stream if e["type"] == "item.settled")
    assert settled == Counter(range(ITEMS)), "one item.settled event per item"

    # Cancelling again changes nothing.
    again = cluster.cli("cancel", job_id, "--json")
    assert again.returncode == 0, again.stderr
    assert {k: json.loads(again.stdout)[k] for k in ("state", "succeeded", "cancelled")} == {
        k: view[k] for k in ("state", "succeeded", "cancelled")
    }
    assert len(job_events(cluster, job_id)) == len(stream)
