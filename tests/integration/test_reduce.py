"""A job's reduce: the fan-in that fires exactly once, whatever failed and whichever workers died."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shared.models import JobStatus, ResultRecord
from shared.store import JobStore
from tests.harness import Cluster, make_cluster, stdio_demo, wait_until
from tests.integration.test_failover import FAST_LEASES, refused, worker_pid

pytestmark = pytest.mark.integration

WHOLE_SUMMARY = {"tool": "echo", "arguments": {"text": {"$from": "to_string(@)"}}}
COUNTS = "join(' ', [to_string(total), to_string(length(successful)), to_string(length(failed))])"


def submit(cluster: Cluster, items: list[dict[str, Any]], reduce: dict[str, Any], *args: str) -> str:
    workdir = cluster.config_file.parent
    (workdir / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (workdir / "reduce.json").write_text(json.dumps(reduce))
    out = cluster.cli("submit", "items.jsonl", "--reduce", "reduce.json", "--server", "demo", "--json", *args)
    assert out.returncode == 0, out.stderr
    job_id: str = json.loads(out.stdout)["job_id"]
    return job_id


def reduce_record(cluster: Cluster, job_id: str) -> ResultRecord:
    out = cluster.cli("results", job_id, "--reduce")
    assert out.returncode == 0, out.stderr
    return ResultRecord.model_validate_json(out.stdout)


def job_events(cluster: Cluster, job_id: str) -> list[dict[str, str]]:
    async def read(store: JobStore) -> list[dict[str, str]]:
        return [fields for _, fields in await store.client.xrange(store.keys.job(job_id).events)]

    events: list[dict[str, str]] = cluster.run(cluster.with_store(read))
    return events


def test_the_reduce_sees_every_success_and_failure_once(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    retry = {"attempts": 2, "initial_backoff_s": 0, "max_backoff_s": 0, "jitter_s": 0}
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(retry=retry)})
    stop_workers.append(cluster)
    cluster.start_workers(2)
    items: list[dict[str, Any]] = []
    for i in range(500):
        if i % 10 == 3:
            items.append({"tool": "fail", "arguments": {"message": f"no {i}"}, "key": f"k{i}"})
        elif i % 10 == 7:
            items.append({"tool": "flaky", "arguments": {"fail_rate": 1.0}, "key": f"k{i}"})
        else:
            items.append({"tool": "echo", "arguments": {"text": f"t{i}"}, "key": f"k{i}"})
    job_id = submit(cluster, items, WHOLE_SUMMARY)
    status = cluster.wait_for_job(job_id, timeout=120)
    assert (status.state, status.succeeded, status.failed) == ("finished", 400, 100)
    assert status.reduce is not None and status.reduce.status == "succeeded"

    record = reduce_record(cluster, job_id)
    assert record.status == "succeeded" and record.result is not None and record.index == 500
    summary = json.loads(record.result.text())
    assert summary["total"] == 500
    assert [e["index"] for e in summary["successful"]] == [i for i in range(500) if i % 10 not in (3, 7)]
    for entry in summary["successful"]:
        assert entry["key"] == f"k{entry['index']}" and entry["output"]["text"] == f"t{entry['index']}"
    assert [e["index"] for e in summary["failed"]] == [i for i in range(500) if i % 10 in (3, 7)]
    for entry in summary["failed"]:
        expected = "tool_error" if entry["index"] % 10 == 3 else "retries_exhausted"
        assert entry["error"]["type"] == expected and entry["key"] == f"k{entry['index']}"

    events = job_events(cluster, job_id)
    kinds = Counter(e["type"] for e in events)
    assert (kinds["item.settled"], kinds["reduce.settled"], kinds["job.completed"]) == (500, 1, 1)
    assert [e["type"] for e in events][-2:] == ["reduce.settled", "job.completed"]
    assert status.finished_at_ms is not None and status.finished_at_ms >= record.finished_at_ms


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stalled"])
def test_a_reduce_whose_worker_dies_or_stalls_runs_again_elsewhere_once(
    how: signal.Signals, redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo()}, extra=FAST_LEASES)
    stop_workers.append(cluster)
    cluster.start_workers(2)
    items = [{"tool": "echo", "arguments": {"text": str(i)}} for i in range(20)]
    job_id = submit(cluster, items, {"tool": "sleep", "arguments": {"ms": 4000}})

    def reduce_holder() -> str | None:
        async def read(store: JobStore) -> str | None:
            held: str | None = await store.client.hget(store.keys.job(job_id).running, "20")
            return held

        holder: str | None = cluster.run(cluster.with_store(read))
        return holder.split()[0] if holder else None

    first = wait_until(reduce_holder, 60, "a worker runs the reduce")
    os.kill(worker_pid(first), how)
    try:
        status = cluster.wait_for_job(job_id, timeout=60)
    finally:
        if how == signal.SIGSTOP:
            os.kill(worker_pid(first), signal.SIGCONT)
    assert status.state == "finished" and status.reduce is not None and status.reduce.status == "succeeded"
    assert reduce_record(cluster, job_id).worker != first
    if how == signal.SIGSTOP:
        # The resumed worker may commit its late result (refused) or drop the run when its lease
        # renewal fails; either way nothing of it may land. Give it time to do either.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: refused(cluster, job_id) >= 1, 10, "the stalled worker's late commit")
    kinds = Counter(e["type"] for e in job_events(cluster, job_id))
    assert (kinds["reduce.settled"], kinds["job.completed"]) == (1, 1)


@pytest.mark.parametrize("run_reduce", [True, False], ids=["reduce", "no-reduce"])
def test_a_cancelled_job_reduces_over_what_settled(
    run_reduce: bool, redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(
        tmp_path, redis_url, {"demo": stdio_demo()}, extra="[worker]\nchunk_size = 2\ncalls_in_flight = 2\n"
    )
    stop_workers.append(cluster)
    cluster.start_workers(1)
    # 2 calls of 1 s at a time: 20 s of work, so the cancel lands mid-job however slow the CLI starts.
    items = [{"tool": "sleep", "arguments": {"ms": 1000}} for _ in range(40)]
    job_id = submit(cluster, items, WHOLE_SUMMARY)

    def settled() -> int:
        status: JobStatus = cluster.run(cluster.with_store(lambda s: s.status(job_id)))
        return status.settled

    wait_until(lambda: settled() >= 2, 60, "some items settled")
    out = cluster.cli("cancel", job_id, *([] if run_reduce else ["--no-reduce"]), "--json")
    assert out.returncode == 0, out.stderr
    status = cluster.wait_for_job(job_id, timeout=60)
    assert status.state == "cancelled" and status.cancelled > 0 and status.reduce is not None
    record = reduce_record(cluster, job_id)
    if run_reduce:
        assert record.status == "succeeded" and record.result is not None
        summary = json.loads(record.result.text())
        assert (summary["total"], len(summary["successful"])) == (40, status.succeeded)
        assert len(summary["failed"]) == status.cancelled and status.failed == 0
        assert {e["error"]["type"] for e in summary["failed"]} == {"cancelled"}
    else:
        assert record.status == "cancelled" and record.attempts == 0 and record.result is None
    kinds = Counter(e["type"] for e in job_events(cluster, job_id))
    assert (kinds["reduce.settled"], kinds["job.completed"]) == (1, 1)


def test_a_summary_over_the_limit_fails_the_reduce_naming_its_size(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(
        tmp_path, redis_url, {"demo": stdio_demo()}, extra="[worker]\nreduce_max_summary_bytes = 2048\n"
    )
    stop_workers.append(cluster)
    cluster.start_workers(1)
    items = [{"tool": "echo", "arguments": {"text": "x" * 100}} for _ in range(30)]
    job_id = submit(cluster, items, {"tool": "echo", "arguments": {"text": {"$from": COUNTS}}})
    status = cluster.wait_for_job(job_id, timeout=60)
    assert status.state == "finished" and status.succeeded == 30
    assert status.reduce is not None and status.reduce.status == "failed" and status.reduce.error is not None
    assert status.reduce.error.type == "summary_too_large"
    assert "over reduce_max_summary_bytes (2048)" in status.reduce.error.message
    size = int(status.reduce.error.message.split(" bytes")[0].rsplit(" ", 1)[1])
    assert size > 2048


def test_retry_runs_only_the_chosen_items_in_a_new_job(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    retry = {"attempts": 2, "initial_backoff_s": 0, "max_backoff_s": 0, "jitter_s": 0}
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(retry=retry)})
    stop_workers.append(cluster)
    cluster.start_workers(1)
    items: list[dict[str, Any]] = []
    for i in range(30):
        call = {0: ("fail", {"message": "no"}), 1: ("flaky", {"fail_rate": 1.0})}.get(
            i % 3, ("echo", {"text": "y"})
        )
        items.append({"tool": call[0], "arguments": call[1], "key": f"k{i}"})
    job_id = submit(cluster, items, WHOLE_SUMMARY)
    cluster.wait_for_job(job_id, timeout=60)
    before = job_events(cluster, job_id)

    out = cluster.cli("retry", job_id, "--error-type", "tool_error", "--json")
    assert out.returncode == 0, out.stderr
    again = json.loads(out.stdout)
    assert again["total"] == 10
    status = cluster.wait_for_job(again["job_id"], timeout=60)
    assert (status.total, status.failed, status.retry_of) == (10, 10, job_id)
    retried = [
        ResultRecord.model_validate_json(line)
        for line in cluster.cli("results", again["job_id"]).stdout.splitlines()
    ]
    assert [r.key for r in retried] == [f"k{i}" for i in range(0, 30, 3)]
    summary = json.loads((reduce_record(cluster, again["job_id"]).result or pytest.fail("no result")).text())
    assert summary["total"] == 10 and [e["key"] for e in summary["failed"]] == [r.key for r in retried]

    old = JobStatus.model_validate_json(cluster.cli("status", job_id, "--json").stdout)
    assert old.retried_by == again["job_id"] and (old.succeeded, old.failed) == (10, 20)
    assert job_events(cluster, job_id) == before, "nothing ran again in the old job"

    nothing = cluster.cli("retry", again["job_id"], "--error-type", "timeout")
    assert nothing.returncode == 1 and "has no failed items with error type 'timeout'" in nothing.stderr
