"""RabbitMQ as Celery's broker: chunks travel through a real RabbitMQ node, state stays in Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.fleet import server_views
from shared.keys import Keys
from shared.models import Chunk, ResultRecord
from shared.store import JobStore
from tests.harness import Cluster, http_demo, make_cluster, wait_until
from tests.integration.test_failover import TAKE_ONE_CHUNK
from tests.rabbit import RabbitNode, rabbitmq_missing, rabbitmq_node
from workers.app import CeleryEnqueuer, create_app

# One xdist worker runs them all (make test distributes by group), so one RabbitMQ node starts.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("rabbitmq")]

FAST_LEASES = """
[worker]
chunk_size = 10
lease_s = 2.0
heartbeat_s = 0.5
reaper_interval_s = 0.5
shutdown_grace_s = 5
"""
CHUNKS_IN_FLIGHT = 2


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitNode]:
    missing = rabbitmq_missing()
    if missing:
        pytest.skip(missing)
    with rabbitmq_node() as node:
        yield node


def amqp_cluster(
    tmp_path: Path, redis_url: str, rabbit: RabbitNode, demo_url: str, extra: str = FAST_LEASES
) -> Cluster:
    cluster = make_cluster(
        tmp_path, redis_url, {"demo": http_demo(demo_url, max_concurrency=64)}, extra=extra
    )
    cluster.env["TOOLSWARM_BROKER_URL"] = rabbit.url
    return cluster


def submit(cluster: Cluster, items: list[dict[str, Any]], name: str = "items") -> str:
    path = cluster.config_file.parent / f"{name}.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = cluster.cli("submit", str(path), "--server", "demo", "--json")
    assert out.returncode == 0, out.stderr
    job_id: str = json.loads(out.stdout)["job_id"]
    return job_id


def echoes(count: int, prefix: str = "item") -> list[dict[str, Any]]:
    return [{"tool": "echo", "arguments": {"text": f"{prefix}-{i}"}} for i in range(count)]


def sleeps(count: int, ms: int) -> list[dict[str, Any]]:
    return [{"tool": "sleep", "arguments": {"ms": ms}} for _ in range(count)]


def job_events(cluster: Cluster) -> list[dict[str, str]]:
    """The global event stream of the cluster's namespace, oldest first."""

    async def read(store: JobStore) -> list[dict[str, str]]:
        return [fields for _, fields in await store.client.xrange(store.keys.events)]

    events: list[dict[str, str]] = cluster.run(cluster.with_store(read))
    return events


def results(cluster: Cluster, job_id: str) -> list[ResultRecord]:
    async def read(store: JobStore) -> list[ResultRecord]:
        return [record async for record in store.results(job_id)]

    records: list[ResultRecord] = cluster.run(cluster.with_store(read))
    return records


def settled_exactly_once(cluster: Cluster, job_id: str, total: int) -> list[ResultRecord]:
    records = results(cluster, job_id)
    assert sorted(r.index for r in records) == list(range(total)), "every item has exactly one result"
    stream = [e for e in job_events(cluster) if e.get("job_id") == job_id]
    settled = Counter(int(e["index"]) for e in stream if e["type"] == "item.settled")
    assert set(settled) == set(range(total)) and set(settled.values()) == {1}, "one commit per item"
    assert sum(1 for e in stream if e["type"] == "job.completed") == 1
    return records


def reaper_ran_clean(cluster: Cluster) -> bool:
    """No pass of the reaper (takeover, orphan restore, sweep) failed in any worker."""
    return "reaper failed" not in cluster.worker_logs(tail=10**7)


def job_meta(cluster: Cluster, job_id: str, field: str) -> str | None:
    async def read(store: JobStore) -> str | None:
        value: str | None = await store.client.hget(store.keys.job(job_id).meta, field)
        return value

    value: str | None = cluster.run(cluster.with_store(read))
    return value


def queued_chunks(cluster: Cluster) -> int | None:
    """The demo server's queue depth as ``toolswarm servers`` reads it (over AMQP here)."""
    settings = cluster.settings

    async def read(store: JobStore) -> int | None:
        return {view.name: view for view in await server_views(store, settings)}["demo"].queued_chunks

    depth: int | None = cluster.run(cluster.with_store(read))
    return depth


def test_a_job_runs_over_rabbitmq_and_a_small_one_is_not_stuck_behind_a_huge_one(
    redis_url: str, demo_http_url: str, rabbit: RabbitNode, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    extra = f"[worker]\nchunk_size = 10\njob_window_chunks = 4\nchunks_in_flight = {CHUNKS_IN_FLIGHT}\n"
    cluster = amqp_cluster(tmp_path, redis_url, rabbit, demo_http_url, extra=extra)
    stop_workers.append(cluster)
    huge_id = submit(cluster, sleeps(800, 200), "huge")  # 80 chunks
    total = 60
    small_id = submit(cluster, echoes(total), "small")  # 6 chunks
    # A window of each job's chunks waits in the server's queue (declared with priorities, its
    # depth read over AMQP), the small job's behind the huge one's, the rest in their backlogs.
    assert queued_chunks(cluster) == 8
    queue = Keys(cluster.namespace).queue("demo")
    assert rabbit.declared_with(queue, {"x-max-priority": 9}) and not rabbit.declared_with(queue, {})
    cluster.start_workers(1)
    status = cluster.wait_for_job(small_id)
    assert status.state == "finished" and status.succeeded == total
    assert job_meta(cluster, huge_id, "state") == "running", (
        "the huge job still ran when the small one finished"
    )
    # acks_late with a prefetch of one message per worker thread: the worker holds what it runs.
    channels = rabbit.ctl(
        "list_channels", "--quiet", "--no-table-headers", "global_prefetch_count", "messages_unacknowledged"
    )
    held = [tuple(int(n) for n in line.split()) for line in channels.splitlines() if line.strip()]
    assert (CHUNKS_IN_FLIGHT, CHUNKS_IN_FLIGHT) in held, held
    assert all(unacked <= CHUNKS_IN_FLIGHT for _, unacked in held), held
    records = settled_exactly_once(cluster, small_id, total)
    assert {r.result.text() for r in records if r.result} == {f"item-{i}" for i in range(total)}
    assert job_meta(cluster, small_id, "restored_items") is None, "the sweep took no chunk for lost"
    assert reaper_ran_clean(cluster)
    assert cluster.cli("cancel", huge_id).returncode == 0


def test_kill_9_gives_unacked_chunks_back_and_commits_each_item_once(
    redis_url: str, demo_http_url: str, rabbit: RabbitNode, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    """A consumer killed before claiming its chunk: RabbitMQ hands the message back on connection
    loss, with no lease to expire and no sweep. A worker killed mid-chunk: its leases are taken
    back, the redelivered message finds its items leased or settled."""
    cluster = amqp_cluster(tmp_path, redis_url, rabbit, demo_http_url)
    stop_workers.append(cluster)
    total = 120
    job_id = submit(cluster, sleeps(total, 150))
    taker = subprocess.Popen(
        [sys.executable, "-c", TAKE_ONE_CHUNK], env=cluster.env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert taker.stdout is not None and taker.stdout.readline().strip() == "taken"
        cluster.start_workers(2)
        victim_id = wait_until(lambda: holder_with_items(cluster, job_id), 60, "items in flight")
    finally:
        taker.kill()  # SIGKILL: no basic.reject, only the lost connection
        taker.wait(timeout=10)
    os.kill(int(victim_id.rsplit(":", 1)[1]), signal.SIGKILL)
    status = cluster.wait_for_job(job_id, timeout=120)
    assert status.state == "finished" and status.succeeded == total
    records = settled_exactly_once(cluster, job_id, total)
    assert job_meta(cluster, job_id, "restored_items") is None, "redelivery, not the sweep, brought it back"
    assert victim_id not in {r.worker for r in records[-20:]}
    assert reaper_ran_clean(cluster)


def holder_with_items(cluster: Cluster, job_id: str) -> str | None:
    """A worker (hostname:pid) holding items of the job right now."""

    async def read(store: JobStore) -> str | None:
        running = await store.client.hgetall(store.keys.job(job_id).running)
        holders = Counter(value.split()[0] for value in running.values())
        return next(iter(holders.most_common(1)), (None, 0))[0]

    holder: str | None = cluster.run(cluster.with_store(read))
    return holder


def test_urgent_chunks_run_before_a_queued_backlog(
    redis_url: str, demo_http_url: str, rabbit: RabbitNode, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    """With a backlog of new work queued and no worker, a chunk sent as urgent (as the reaper sends
    taken-back items) is the first to run once a worker starts."""
    extra = "[worker]\nchunk_size = 5\nchunks_in_flight = 1\n"
    cluster = amqp_cluster(tmp_path, redis_url, rabbit, demo_http_url, extra=extra)
    stop_workers.append(cluster)
    backlog_id = submit(cluster, echoes(80, "backlog"), "backlog")  # 16 chunks queued, new work
    urgent_id = submit(cluster, echoes(5, "urgent"), "urgent")  # one more, behind them
    urgent = Chunk(job_id=urgent_id, server="demo", items=list(range(5)), urgent=True)
    app = create_app(cluster.settings)
    try:
        CeleryEnqueuer(app, Keys(cluster.namespace)).enqueue([urgent])
    finally:
        app.close()
    cluster.start_workers(1)
    cluster.wait_for_job(urgent_id)
    cluster.wait_for_job(backlog_id)
    order = [e["job_id"] for e in job_events(cluster) if e["type"] == "item.settled"]
    assert order[:5] == [urgent_id] * 5, "the urgent chunk ran before the queued new work"
    assert reaper_ran_clean(cluster)
    settled_exactly_once(cluster, urgent_id, 5)


def test_chunks_purged_from_the_queue_are_enqueued_again_by_the_sweep(
    redis_url: str, demo_http_url: str, rabbit: RabbitNode, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    """AMQP shows no message ids: a job with outstanding chunks, nothing running and nothing
    waiting in its queue has lost them (here an operator purged the queue), and the sweep sends
    its items again."""
    extra = "[worker]\nchunk_size = 10\nstranded_after_s = 1.0\nreaper_interval_s = 0.5\n"
    cluster = amqp_cluster(tmp_path, redis_url, rabbit, demo_http_url, extra=extra)
    stop_workers.append(cluster)
    total = 30
    job_id = submit(cluster, echoes(total))
    assert rabbit.purge(Keys(cluster.namespace).queue("demo")) == 3
    assert queued_chunks(cluster) == 0
    doctor = cluster.cli("doctor", job_id, "--json")
    assert doctor.returncode == 0, doctor.stderr
    (seen,) = json.loads(doctor.stdout)["jobs"]
    assert not seen["broker_readable"] and seen["queued"]["chunks"] == 0
    assert (seen["uncovered"]["chunks"], seen["uncovered"]["items"]) == (3, total)
    cluster.start_workers(1)
    status = cluster.wait_for_job(job_id)
    assert status.state == "finished" and status.succeeded == total
    settled_exactly_once(cluster, job_id, total)
    assert job_meta(cluster, job_id, "restored_items") == str(total)
    assert reaper_ran_clean(cluster)
