"""Nothing stranded: chunk messages lost behind toolswarm's back are found and run again, and a
chunk whose claim meets a Redis outage while the broker refuses writes is never given up."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.embedded import EmbeddedRedis
from shared.settings import Settings
from shared.store import JobStore
from tests.harness import Cluster, http_demo, make_cluster
from tests.integration.test_doctor import doctor as diagnose
from tests.integration.test_failover import (
    FAST_LEASES,
    settled_exactly_once,
    sleeps,
    status_of,
    submit,
    wait_until,
)

pytestmark = pytest.mark.integration


def broker_queues(cluster: Cluster) -> list[str]:
    """The kombu Redis lists holding the demo server's queued chunk messages (one per priority)."""
    client = redis.Redis.from_url(cluster.env.get("TOOLSWARM_BROKER_URL", cluster.redis_url))
    try:
        pattern = f"{cluster.namespace}:celery:{cluster.namespace}.demo*"
        return [key.decode() for key in client.scan_iter(match=pattern, _type="list")]
    finally:
        client.close()


def delete_queued_messages(cluster: Cluster) -> int:
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        queues = broker_queues(cluster)
        deleted = sum(int(client.llen(q)) for q in queues)
        if queues:
            client.delete(*queues)
        return deleted
    finally:
        client.close()


def doctor(cluster: Cluster, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = diagnose(cluster, job_id)["jobs"][0]
    return job


def outstanding_chunks(cluster: Cluster, job_id: str) -> int:
    async def read(store: JobStore) -> int:
        return int(await store.client.hlen(store.keys.job(job_id).chunks))

    count: int = cluster.run(cluster.with_store(read))
    return count


def test_chunk_messages_deleted_from_the_broker_are_found_and_run_once(
    redis_url: str, demo_http_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    stranded_after_s = 3.0
    extra = FAST_LEASES + f"stranded_after_s = {stranded_after_s}\n"
    cluster = make_cluster(tmp_path, redis_url, {"demo": http_demo(demo_http_url)}, extra=extra)
    stop_workers.append(cluster)
    total = 120
    job_id = submit(cluster, sleeps(total, 20))  # twelve chunks of ten, queued, no worker yet
    deleted = delete_queued_messages(cluster)
    assert deleted == 12

    stuck = doctor(cluster, job_id)  # no worker, no message: nothing covers the job's items
    assert stuck["uncovered"]["chunks"] == 12 and stuck["uncovered"]["items"] == total
    assert stuck["queued"]["chunks"] == 0 and stuck["leases"] == {}
    assert stuck["why"].startswith("no live worker")

    cluster.start_workers(1)
    # How soon the sweep finds them is bench/ business; here: found, all of them, each run once.
    status = cluster.wait_for_job(job_id, timeout=90)
    assert status.succeeded == total and status.restored_items == total, status
    settled_exactly_once(cluster, job_id, total)
    assert outstanding_chunks(cluster, job_id) == 0, "every chunk's record is dropped once it has run"
    finished = doctor(cluster, job_id)
    assert finished["state"] == "finished" and finished["why"] == f"finished: all {total} items settled"


def test_messages_deleted_mid_job_strand_nothing(
    redis_url: str, demo_http_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    extra = FAST_LEASES + "stranded_after_s = 3.0\n"
    cluster = make_cluster(tmp_path, redis_url, {"demo": http_demo(demo_http_url)}, extra=extra)
    stop_workers.append(cluster)
    cluster.start_workers(2)
    total = 400
    job_id = submit(cluster, sleeps(total, 100))
    wait_until(lambda: status_of(cluster, job_id).settled > 20, 60, "job under way")
    deleted = delete_queued_messages(cluster)
    assert deleted > 0
    status = cluster.wait_for_job(job_id, timeout=120)
    # Only what was deleted comes back: chunks still queued or running are seen as covered.
    assert status.succeeded == total and 0 < status.restored_items <= deleted * 10, (status, deleted)
    settled_exactly_once(cluster, job_id, total)


class BrokerRefusingWrites:
    """A broker that answers reads and deletes but refuses every write that needs memory
    (``maxmemory 1``): a republished message fails while an acknowledgement still goes through."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def __enter__(self) -> BrokerRefusingWrites:
        self.client.config_set("maxmemory", "1")
        self.client.config_set("maxmemory-policy", "noeviction")
        return self

    def __exit__(self, *_: object) -> None:
        self.client.config_set("maxmemory", "0")
        self.client.close()


@pytest.mark.slow
def test_claim_failing_while_the_broker_refuses_writes_keeps_the_chunk(
    demo_http_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    """The path that stranded a chunk: its claim fails (Redis down), and handing the message back
    (Celery's retry: a republish) fails too, while the acknowledgement of the failed task would
    succeed. The worker must hold the message and run it once Redis is back. The sweep is kept out
    of it (an hour), so the job finishing shows the chunk was never given up."""
    state = EmbeddedRedis(
        Settings(state_dir=str(tmp_path / "state")), appendonly=True, data_dir=tmp_path / "state-data"
    )
    broker = EmbeddedRedis(Settings(state_dir=str(tmp_path / "broker")))
    state_url, broker_url = state.start(publish=False), broker.start(publish=False)
    state_port = state.port
    try:
        extra = FAST_LEASES + "stranded_after_s = 3600\n"
        cluster = make_cluster(tmp_path, state_url, {"demo": http_demo(demo_http_url)}, extra=extra)
        cluster.env["TOOLSWARM_BROKER_URL"] = broker_url
        stop_workers.append(cluster)
        (worker,) = cluster.start_workers(1)
        os.kill(worker.pid, signal.SIGSTOP)  # the chunk waits in the broker while Redis goes down
        try:
            total = 10
            job_id = submit(cluster, sleeps(total, 10))
            state.stop()
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        unacked = f"{cluster.namespace}:celery:unacked"
        broker_client = redis.Redis.from_url(broker_url)
        wait_until(lambda: broker_client.hlen(unacked) == 1, 30, "the chunk delivered to the worker")
        with BrokerRefusingWrites(broker_url):
            # Past the Redis client's ~15 s of retries: the claim fails, and the worker either holds
            # the chunk or (the old path) hands it to Celery's retry, which the broker refuses.
            wait_until(
                lambda: any(
                    sign in cluster.worker_logs(tail=1_000_000)
                    for sign in ("Redis unavailable", "reject requeue")
                ),
                60,
                "the chunk's claim to fail",
            )
        state = EmbeddedRedis(
            state.settings, port=state_port, appendonly=True, data_dir=tmp_path / "state-data"
        )
        state.start(publish=False)
        status = cluster.wait_for_job(job_id, timeout=60)
        assert status.succeeded == total and status.restored_items == 0, status
        settled_exactly_once(cluster, job_id, total)
        broker_client.close()
    finally:
        for one in stop_workers:
            one.stop_workers()
        state.stop()
        broker.stop()
