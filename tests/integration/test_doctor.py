"""`toolswarm doctor` on a running job and on one stuck behind a server that is down: what it
says is checked against Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cli.processes import free_port
from shared.probes import last_probe
from shared.store import JobStore
from tests.harness import Cluster, http_demo, make_cluster, wait_until
from tests.integration.test_failover import FAST_LEASES, sleeps, submit

pytestmark = pytest.mark.integration


def doctor(cluster: Cluster, *args: str) -> dict[str, Any]:
    out = cluster.cli("doctor", *args, "--json")
    assert out.returncode == 0, out.stderr
    diagnosis: dict[str, Any] = json.loads(out.stdout)
    return diagnosis


def running_by_worker(cluster: Cluster, job_id: str) -> dict[str, int]:
    async def read(store: JobStore) -> dict[str, int]:
        held: dict[str, int] = {}
        for value in (await store.client.hgetall(store.keys.job(job_id).running)).values():
            worker = value.split()[0]
            held[worker] = held.get(worker, 0) + 1
        return held

    result: dict[str, int] = cluster.run(cluster.with_store(read))
    return result


def test_doctor_on_a_running_job(
    redis_url: str, demo_http_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": http_demo(demo_http_url)}, extra=FAST_LEASES)
    stop_workers.append(cluster)
    cluster.start_workers(1)
    total = 60
    # 16 calls at a time, 20 items claimed: stable for 10 s, however slow the machine makes doctor.
    job_id = submit(cluster, sleeps(total, 10_000))
    before = wait_until(lambda: running_by_worker(cluster, job_id), 30, "items claimed")
    diagnosis = doctor(cluster, job_id)
    after = running_by_worker(cluster, job_id)
    job = diagnosis["jobs"][0]
    assert job["state"] == "running" and job["total"] == total
    assert job["leases"] in (before, after), (job["leases"], before, after)
    assert job["why"].startswith(f"running: {sum(job['leases'].values())} items in flight on 1 workers")
    assert job["uncovered"]["items"] == 0 and job["expired_leases"] == 0
    in_flight = sum(job["leases"].values())
    assert job["settled"] + in_flight + job["queued"]["items"] + job["backlog"]["items"] >= total
    (worker,) = diagnosis["workers"]
    assert worker["worker"] in job["leases"] and worker["last_heartbeat_s"] < 5
    everything = doctor(cluster)  # no job named: every running job of the namespace
    assert [j["job_id"] for j in everything["jobs"]] == [job_id]


def test_doctor_on_a_job_stuck_behind_a_server_that_is_down(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    down = f"http://127.0.0.1:{free_port()}/mcp"  # nothing listens here
    cluster = make_cluster(tmp_path, redis_url, {"demo": http_demo(down, timeout_s=2)}, extra=FAST_LEASES)
    stop_workers.append(cluster)
    cluster.start_workers(1)
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in sleeps(20, 10)))
    out = cluster.cli("submit", str(path), "--server", "demo", "--no-validate", "--json")
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job_id"]

    def held_by_breaker() -> dict[str, Any] | None:
        job: dict[str, Any] = doctor(cluster, job_id)["jobs"][0]
        return job if job["why"].startswith("held by the breaker") else None

    job = wait_until(held_by_breaker, 60, "the doctor to see the breaker open")
    probe = cluster.run(cluster.with_store(lambda s: last_probe(s.client, s.keys, "demo")))
    assert probe is not None and not probe.ok
    (server,) = job["servers"]
    assert server["server"] == "demo" and server["healthy"] is False and server["error"] == probe.error
    assert job["settled"] == 0 and job["unsettled"] == 20
    assert "server demo" in job["why"] and "is unhealthy" in job["why"]
    human = cluster.cli("doctor", job_id)
    assert human.returncode == 0 and "why:" in human.stdout and "held by the breaker" in human.stdout
