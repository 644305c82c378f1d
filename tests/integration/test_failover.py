"""A worker, an MCP server or Redis dies mid-job: nothing is lost, nothing is committed twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cli.processes import free_port, stop_processes
from shared.embedded import EmbeddedRedis
from shared.models import JobStatus, ResultRecord
from shared.probes import last_probe
from shared.settings import Settings
from shared.store import JobStore
from tests.harness import Cluster, http_demo, make_cluster, start_demo_http, stdio_demo, wait_until

pytestmark = pytest.mark.integration

FAST_LEASES = """
[worker]
chunk_size = 10
lease_s = 2.0
heartbeat_s = 0.5
reaper_interval_s = 0.5
max_lease_losses = 3
shutdown_grace_s = 5
"""


def submit(cluster: Cluster, items: list[dict[str, Any]]) -> str:
    path = cluster.config_file.parent / "items.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = cluster.cli("submit", str(path), "--server", "demo", "--json")
    assert out.returncode == 0, out.stderr
    job_id: str = json.loads(out.stdout)["job_id"]
    return job_id


def sleeps(count: int, ms: int) -> list[dict[str, Any]]:
    return [{"tool": "sleep", "arguments": {"ms": ms}} for _ in range(count)]


def holders(cluster: Cluster, job_id: str) -> Counter[str]:
    """How many items each worker (hostname:pid) holds right now."""

    async def read(store: JobStore) -> Counter[str]:
        running = await store.client.hgetall(store.keys.job(job_id).running)
        return Counter(value.split()[0] for value in running.values())

    result: Counter[str] = cluster.run(cluster.with_store(read))
    return result


def worker_pid(worker_id: str) -> int:
    return int(worker_id.rsplit(":", 1)[1])


def settled_exactly_once(cluster: Cluster, job_id: str, total: int) -> list[ResultRecord]:
    out = cluster.cli("results", job_id)
    records = [ResultRecord.model_validate_json(line) for line in out.stdout.splitlines()]
    assert sorted(r.index for r in records) == list(range(total))

    async def events(store: JobStore) -> list[dict[str, str]]:
        entries = await store.client.xrange(store.keys.events)
        return [fields for _, fields in entries if fields.get("job_id") == job_id]

    stream = cluster.run(cluster.with_store(events))
    settled = Counter(int(e["index"]) for e in stream if e["type"] == "item.settled")
    assert set(settled) == set(range(total)) and set(settled.values()) == {1}, "one commit per item"
    assert sum(1 for e in stream if e["type"] == "job.completed") == 1
    return records


def call_recorded(cluster: Cluster, job_id: str, index: int) -> bool:
    """The heartbeat has recorded that the item's call started under its current epoch."""

    async def read(store: JobStore) -> bool:
        jk = store.keys.job(job_id)
        epoch = await store.client.hget(jk.epochs, str(index))
        return epoch is not None and await store.client.hget(jk.calling, str(index)) == epoch

    recorded: bool = cluster.run(cluster.with_store(read))
    return recorded


def refused(cluster: Cluster, job_id: str) -> int:
    count: int = cluster.run(cluster.with_store(lambda store: store.refused_commits(job_id)))
    return count


@pytest.mark.slow
def test_kill_9_one_of_three_workers_loses_and_duplicates_nothing(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(pool_size=1)}, extra=FAST_LEASES)
    stop_workers.append(cluster)
    cluster.start_workers(3)
    total = 600
    job_id = submit(cluster, sleeps(total, 300))
    victim = wait_until(
        lambda: next(iter(holders(cluster, job_id).most_common(1)), None), 30, "items in flight"
    )
    victim_id, in_flight = victim
    os.kill(worker_pid(victim_id), signal.SIGKILL)
    status = cluster.wait_for_job(job_id, timeout=120)
    assert status.state == "finished" and status.succeeded == total
    records = settled_exactly_once(cluster, job_id, total)
    assert victim_id not in {r.worker for r in records[-50:]}
    assert in_flight > 0


# A consumer that takes one chunk message off the demo queue, unacknowledged, and then waits to be
# killed: a worker that died between the broker's delivery and the claim of the chunk's items.
TAKE_ONE_CHUNK = """
import signal
import time
from shared.keys import Keys
from shared.settings import load_settings
from workers.app import create_app
settings = load_settings()
app = create_app(settings)
with app.connection_for_write() as connection:
    channel = connection.default_channel
    message = None
    while message is None:
        message = channel.basic_get(Keys(settings.namespace).queue("demo"), no_ack=False)
        time.sleep(0.05)
    print("taken", flush=True)
    signal.pause()  # until the test kills it
"""


def test_chunk_taken_by_a_worker_that_died_before_claiming_runs_again_within_seconds(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    """No lease exists to expire: the reaper puts back the unacked message no live worker holds,
    long before the broker's visibility timeout (60 s) would."""
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(pool_size=1)}, extra=FAST_LEASES)
    stop_workers.append(cluster)
    total = 20
    job_id = submit(cluster, sleeps(total, 10))  # two chunks, no worker yet
    taker = subprocess.Popen(
        [sys.executable, "-c", TAKE_ONE_CHUNK], env=cluster.env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert taker.stdout is not None and taker.stdout.readline().strip() == "taken"
    finally:
        os.kill(taker.pid, signal.SIGKILL)
        taker.wait()
    cluster.start_workers(1)
    status = cluster.wait_for_job(job_id, timeout=30)
    assert status.state == "finished" and status.succeeded == total
    settled_exactly_once(cluster, job_id, total)


@pytest.mark.slow
def test_stalled_worker_resumes_and_its_late_commits_are_refused(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(pool_size=1)}, extra=FAST_LEASES)
    stop_workers.append(cluster)
    cluster.start_workers(2)
    total = 200
    job_id = submit(cluster, sleeps(total, 400))
    stalled_id, _ = wait_until(
        lambda: next(iter(holders(cluster, job_id).most_common(1)), None), 30, "in flight"
    )
    pid = worker_pid(stalled_id)
    os.kill(pid, signal.SIGSTOP)
    try:
        # Past its lease: the other worker takes its items over and finishes the job.
        status = cluster.wait_for_job(job_id, timeout=120)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status.succeeded == total
    # Once resumed, the stalled worker finishes the calls it had and tries to commit them.
    wait_until(lambda: refused(cluster, job_id) > 0, 30, "late commits refused")
    records = settled_exactly_once(cluster, job_id, total)
    assert all(r.worker != stalled_id or r.finished_at_ms > 0 for r in records)


@pytest.mark.slow
def test_poison_item_fails_after_its_lease_budget(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(
        tmp_path, redis_url, {"demo": stdio_demo(pool_size=1)}, extra=FAST_LEASES.replace("= 3", "= 2")
    )
    stop_workers.append(cluster)
    cluster.start_workers(2)
    job_id = submit(cluster, [{"tool": "sleep", "arguments": {"ms": 60_000}}, *sleeps(5, 10)])
    killed: set[str] = set()

    def running_only_the_poison() -> str | None:
        held = holders(cluster, job_id)
        alive = [w for w in held if w not in killed]
        if len(alive) == 1 and held[alive[0]] == 1 and call_recorded(cluster, job_id, 0):
            return alive[0]
        return None

    # The long item "kills" whichever worker runs it, once the others are done: twice within its
    # budget, then once more when it runs isolated (alone on its worker), which makes it poison.
    for _ in range(3):
        killer = wait_until(running_only_the_poison, 60, "poison item running alone")
        killed.add(killer)
        os.kill(worker_pid(killer), signal.SIGKILL)
        cluster.workers = [w for w in cluster.workers if w.pid != worker_pid(killer)]
        cluster.start_workers(1)
    status = cluster.wait_for_job(job_id, timeout=60)
    assert status.failed == 1 and status.succeeded == 5, "innocent items are not blamed"
    poison = json.loads(cluster.cli("results", job_id, "--status", "failed").stdout)
    assert poison["index"] == 0 and poison["error"]["type"] == "poison"
    assert "lease was lost 3 times, the last time while it ran alone" in poison["error"]["message"]


@pytest.mark.slow
def test_bystanders_of_workers_killed_from_outside_are_isolated_not_poisoned(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    """Five items are in flight together on a worker that is killed, three times over: each has
    lost its lease max_lease_losses times with its call started. None is guilty, so each runs once
    more alone on a worker, succeeds, and none ends as poison."""
    extra = FAST_LEASES.replace("chunk_size = 10", "chunk_size = 5")
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(pool_size=1)}, extra=extra)
    stop_workers.append(cluster)
    cluster.start_workers(2)
    total = 5
    job_id = submit(cluster, sleeps(total, 3000))
    killed: set[str] = set()

    def holding_all_with_calls_started() -> str | None:
        held = holders(cluster, job_id)
        for worker, count in held.items():
            started = all(call_recorded(cluster, job_id, i) for i in range(total))
            if worker not in killed and count == total and started:
                return worker
        return None

    for _ in range(3):
        victim = wait_until(holding_all_with_calls_started, 60, "all five items in flight on one worker")
        killed.add(victim)
        os.kill(worker_pid(victim), signal.SIGKILL)
        cluster.workers = [w for w in cluster.workers if w.pid != worker_pid(victim)]
        cluster.start_workers(1)
    status = cluster.wait_for_job(job_id, timeout=90)
    assert status.succeeded == total and status.failed == 0, status
    records = settled_exactly_once(cluster, job_id, total)
    assert all(r.worker not in killed for r in records)

    async def isolated_runs(store: JobStore) -> dict[str, str]:
        lost: dict[str, str] = await store.client.hgetall(store.keys.job(job_id).lost)
        return lost

    lost = cluster.run(cluster.with_store(isolated_runs))
    assert all(lost.get(str(i)) == "3" and f"{i}:isolated" in lost for i in range(total)), lost


def test_graceful_shutdown_finishes_or_gives_back_every_item(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(pool_size=1)}, extra=FAST_LEASES)
    stop_workers.append(cluster)
    leaving, staying = cluster.start_workers(2)
    total = 300
    job_id = submit(cluster, sleeps(total, 200))
    wait_until(lambda: sum(holders(cluster, job_id).values()) > 20, 30, "items in flight")
    started = time.monotonic()
    leaving.send_signal(signal.SIGTERM)
    leaving.wait(timeout=30)
    assert time.monotonic() - started < 15, "in-flight calls finish within the grace period"
    assert leaving.returncode == 0
    status = cluster.wait_for_job(job_id, timeout=120)
    assert status.succeeded == total
    settled_exactly_once(cluster, job_id, total)
    _ = staying


def test_mcp_server_restart_mid_job(redis_url: str, tmp_path: Path, stop_workers: list[Cluster]) -> None:
    port = free_port()

    server = start_demo_http(port)
    retry = {"attempts": 12, "initial_backoff_s": 0.2, "max_backoff_s": 1.0, "jitter_s": 0.1}
    cluster = make_cluster(
        tmp_path, redis_url, {"demo": http_demo(f"http://127.0.0.1:{port}/mcp", timeout_s=5, retry=retry)}
    )
    stop_workers.append(cluster)
    try:
        cluster.start_workers(2)
        total = 400
        job_id = submit(cluster, sleeps(total, 200))  # about 5 s of calls at 16 in flight
        wait_until(lambda: status_of(cluster, job_id).settled > 50, 60, "job under way")
        stop_processes([server], grace_s=5)
        # Items were still to run while the server was gone: their calls failed and were retried,
        # or waited on the breaker (which spends no attempt), so attempts alone cannot tell.
        assert status_of(cluster, job_id).settled < total, "the job ended before the server stopped"

        async def seen_down(store: JobStore) -> bool:
            probed = await last_probe(store.client, store.keys, "demo")
            return probed is not None and not probed.ok

        # Back once the workers have seen it gone (a failed call tripped its breaker).
        wait_until(lambda: cluster.run(cluster.with_store(seen_down)), 30, "the workers saw the server down")
        server = start_demo_http(port)
        status = cluster.wait_for_job(job_id, timeout=120)
        assert status.succeeded == total, status
        settled_exactly_once(cluster, job_id, total)
    finally:
        stop_processes([server], grace_s=5)


def status_of(cluster: Cluster, job_id: str) -> JobStatus:
    status: JobStatus = cluster.run(cluster.with_store(lambda store: store.status(job_id)))
    return status


def test_redis_restart_mid_job_loses_nothing(
    demo_http_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    redis = EmbeddedRedis(
        Settings(state_dir=str(tmp_path / "state")), appendonly=True, data_dir=tmp_path / "data"
    )
    url = redis.start(publish=False)
    port = redis.port
    try:
        cluster = make_cluster(tmp_path, url, {"demo": http_demo(demo_http_url)}, extra=FAST_LEASES)
        stop_workers.append(cluster)
        cluster.start_workers(2)
        total = 400
        job_id = submit(cluster, sleeps(total, 50))
        wait_until(lambda: status_of(cluster, job_id).settled > 50, 60, "job under way")
        redis.stop()
        time.sleep(1.0)  # the outage itself (not a wait for anything): commands fail and are retried
        restarted = EmbeddedRedis(redis.settings, port=port, appendonly=True, data_dir=tmp_path / "data")
        restarted.start(publish=False)
        redis = restarted
        status = cluster.wait_for_job(job_id, timeout=120)
        assert status.succeeded == total, status
        settled_exactly_once(cluster, job_id, total)
    finally:
        for cluster in stop_workers:
            cluster.stop_workers()
        redis.stop()
