"""Exactly once under races: four workers run the same items at once; both state modes agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.jobs import plan_chunks
from shared.keys import Keys
from shared.models import ItemSpec
from shared.store import JobStore
from tests.harness import Cluster, make_cluster, stdio_demo
from workers.app import CeleryEnqueuer, create_app

pytestmark = pytest.mark.integration


def job_events(cluster: Cluster, job_id: str) -> list[dict[str, str]]:
    """The job's events from the global stream (the job's own stream is trimmed in log mode)."""

    async def read(store: JobStore) -> list[dict[str, str]]:
        entries = await store.client.xrange(store.keys.events)
        return [fields for _, fields in entries if fields.get("job_id") == job_id]

    events: list[dict[str, str]] = cluster.run(cluster.with_store(read))
    return events


def submit(cluster: Cluster, items: list[dict[str, Any]], *extra: str) -> str:
    items_file = cluster.config_file.parent / "items.jsonl"
    items_file.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    out = cluster.cli("submit", str(items_file), "--server", "demo", "--json", *extra)
    assert out.returncode == 0, out.stderr
    job_id: str = json.loads(out.stdout)["job_id"]
    return job_id


@pytest.mark.parametrize("state_mode", ["cas", "log"])
def test_four_workers_racing_on_the_same_items_commit_each_once(
    state_mode: str, redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(
        tmp_path, redis_url, {"demo": stdio_demo(pool_size=1)}, extra="[worker]\nchunk_size = 10\n"
    )
    stop_workers.append(cluster)
    cluster.start_workers(4)
    items = [{"tool": "sleep", "arguments": {"ms": 20}} for _ in range(120)]
    job_id = submit(cluster, items, "--state-mode", state_mode)

    # Every chunk again, three more times: four deliveries of each item race to claim and commit.
    settings = cluster.settings
    specs = [ItemSpec(server="demo", **i) for i in items]
    duplicates = plan_chunks(job_id, specs, 10) * 3
    CeleryEnqueuer(create_app(settings), Keys(cluster.namespace)).enqueue(duplicates)

    status = cluster.wait_for_job(job_id)
    assert status.state == "finished" and status.state_mode == state_mode
    assert status.succeeded == len(items) and status.failed == 0

    out = cluster.cli("results", job_id)
    indexes = [json.loads(line)["index"] for line in out.stdout.splitlines()]
    assert sorted(indexes) == list(range(len(items))), "every item exactly once"

    events = job_events(cluster, job_id)
    completed = [e for e in events if e["type"] == "job.completed"]
    assert len(completed) == 1, completed
    settled = [int(e["index"]) for e in events if e["type"] == "item.settled"]
    assert sorted(settled) == list(range(len(items))), "one item.settled event per item"


def test_cas_and_log_modes_give_the_same_final_view(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(
        tmp_path, redis_url, {"demo": stdio_demo()}, extra="[state]\nsnapshot_every_events = 50\n"
    )
    stop_workers.append(cluster)
    cluster.start_workers(2)
    items: list[dict[str, Any]] = []
    for i in range(400):
        if i % 7 == 0:
            items.append({"tool": "fail", "arguments": {"message": f"no {i}"}})
        else:
            items.append({"tool": "add", "arguments": {"a": i, "b": 1}})
    views = {}
    for mode in ("cas", "log"):
        job_id = submit(cluster, items, "--state-mode", mode)
        status = cluster.wait_for_job(job_id)
        views[mode] = status.model_dump(
            include={"state", "total", "succeeded", "failed", "cancelled", "pending"}
        )
        assert status.state_mode == mode
    assert views["cas"] == views["log"]
    assert views["log"]["failed"] == len([i for i in items if i["tool"] == "fail"])

    async def snapshot_taken(store: JobStore) -> int:
        log_jobs = [j for j in await store.list_jobs() if (await store.status(j)).state_mode == "log"]
        snap = await store.client.hgetall(store.keys.job(log_jobs[0]).snapshot)
        return int(snap.get("count", 0))

    assert cluster.run(cluster.with_store(snapshot_taken)) > 0, "log mode snapshotted its events"
