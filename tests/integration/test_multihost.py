"""Workers on two hosts, Redis on a third (network namespaces joined by veth pairs to a switch):
a job runs across both hosts; one host is partitioned mid-job; the other takes its items over and
finishes the job; once the link is back the cut-off worker's late commits are refused and it
takes new work. Nothing lost, nothing committed twice, job.completed once."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.models import ResultRecord
from shared.store import JobStore
from tests.harness import Cluster, stdio_demo, wait_until
from tests.multihost import REDIS_PORT, MultiHostCluster, listening, multihost_cluster
from tests.netns import unavailable_reason

pytestmark = pytest.mark.integration

# Short leases keep the takeover quick; the stranded-chunk sweep is short too, because a chunk
# message the partitioned worker's consumer popped as the link went down is lost with it.
FAST_LEASES = """
[worker]
chunk_size = 5
lease_s = 2.0
heartbeat_s = 0.5
reaper_interval_s = 0.5
stranded_after_s = 3.0
shutdown_grace_s = 2
"""


@pytest.fixture(scope="module")
def netns_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")


@pytest.fixture
def hosts(netns_available: None, tmp_path: Path) -> Iterator[MultiHostCluster]:
    with multihost_cluster(tmp_path, {"demo": stdio_demo(pool_size=1)}, extra=FAST_LEASES) as built:
        yield built


def submit(cluster: Cluster, items: list[dict[str, Any]], name: str) -> str:
    path = cluster.config_file.parent / f"{name}.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    out = cluster.cli("submit", str(path), "--server", "demo", "--json")
    assert out.returncode == 0, out.stderr
    job_id: str = json.loads(out.stdout)["job_id"]
    return job_id


def sleeps(count: int, ms: int) -> list[dict[str, Any]]:
    return [{"tool": "sleep", "arguments": {"ms": ms}} for _ in range(count)]


def held(cluster: Cluster, job_id: str) -> dict[str, list[int]]:
    """The items each worker (hostname:pid) holds a lease on right now."""

    async def read(store: JobStore) -> dict[str, list[int]]:
        running = await store.client.hgetall(store.keys.job(job_id).running)
        by_worker: dict[str, list[int]] = {}
        for index, value in running.items():
            by_worker.setdefault(value.split()[0], []).append(int(index))
        return by_worker

    result: dict[str, list[int]] = cluster.run(cluster.with_store(read))
    return result


def settled_exactly_once(cluster: Cluster, job_id: str, total: int) -> list[ResultRecord]:
    """Every item has one result and one item.settled event; job.completed is in the stream once."""

    async def read(store: JobStore) -> tuple[list[ResultRecord], list[dict[str, str]]]:
        records = [record async for record in store.results(job_id)]
        return records, [fields for _, fields in await store.client.xrange(store.keys.job(job_id).events)]

    read_back: tuple[list[ResultRecord], list[dict[str, str]]] = cluster.run(cluster.with_store(read))
    records, stream = read_back
    assert sorted(r.index for r in records) == list(range(total)), "no item lost"
    settled = Counter(int(e["index"]) for e in stream if e["type"] == "item.settled")
    assert set(settled) == set(range(total)) and set(settled.values()) == {1}, "one commit per item"
    assert [e["type"] for e in stream].count("job.completed") == 1
    return records


def refused(cluster: Cluster, job_id: str) -> int:
    count: int = cluster.run(cluster.with_store(lambda store: store.refused_commits(job_id)))
    return count


def test_partitioned_host_is_fenced_out_and_rejoins(hosts: MultiHostCluster) -> None:
    cluster, network = hosts.cluster, hosts.network
    host_a, host_b = hosts.worker_hosts
    worker_a, worker_b = hosts.start_workers([host_a, host_b])
    id_a, id_b = hosts.worker_id(worker_a), hosts.worker_id(worker_b)

    # Everything binds inside the namespaces: Redis to its host's address, the workers to nothing.
    assert listening(hosts.redis_host) == [f"{hosts.redis_host.address}:{REDIS_PORT}"]
    assert listening(host_a) == [] and listening(host_b) == []

    total = 30
    job_id = submit(cluster, sleeps(total, 1000), "job")
    wait_until(lambda: {id_a, id_b} <= set(held(cluster, job_id)), 60, "items in flight on both hosts")
    network.cut(host_a)
    cut_ms = time.time() * 1000
    try:
        # Nothing from host a lands now, so what it holds is what it had in flight at the cut.
        stranded = held(cluster, job_id).get(id_a, [])
        assert stranded, "host a had items in flight when it was cut off"
        status = cluster.wait_for_job(job_id, timeout=120)  # host a is still cut off
        assert status.state == "finished" and status.succeeded == total, status
        records = {r.index: r for r in settled_exactly_once(cluster, job_id, total)}
        assert all(records[i].worker == id_b for i in stranded), "host b finished what host a held"
        assert all(r.finished_at_ms <= cut_ms for r in records.values() if r.worker == id_a)
    finally:
        network.heal(host_a)
    healed = time.time()

    # Back on the network, host a tries to commit the calls it finished while cut off: refused.
    wait_until(lambda: refused(cluster, job_id) > 0, 120, "host a's late commits refused")
    settled_exactly_once(cluster, job_id, total)

    # It rejoins, the same process: heartbeats again and runs part of a new job.
    assert worker_a.poll() is None, "the cut-off worker lives on"
    wait_until(lambda: hosts.last_beat(id_a) > healed, 120, "host a heartbeats again")
    second = 30
    second_id = submit(cluster, sleeps(second, 300), "second")
    status = cluster.wait_for_job(second_id, timeout=120)
    assert status.succeeded == second, status
    workers = Counter(r.worker for r in settled_exactly_once(cluster, second_id, second))
    assert workers[id_a] > 0, f"host a ran none of the new job: {workers}"
