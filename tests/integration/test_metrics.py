"""Prometheus metrics: a worker's /metrics (its process) and the API's (the cluster, from Redis)
scraped before and after real jobs, one with failing and retried calls, one cancelled."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.processes import free_port, stop_processes, wait_for_port
from tests.harness import Cluster, http_demo, make_cluster, wait_until

pytestmark = pytest.mark.integration

TOKEN = "metrics-token"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: httpx2.Client, url: str) -> Samples:
    response = client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def scrape_until(client: httpx2.Client, done: Callable[[Samples], bool], what: str) -> Samples:
    def check() -> Samples | None:
        samples = scrape(client, "/metrics")
        return samples if done(samples) else None

    found: Samples = wait_until(check, 30, what)
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def by_label(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """The samples of ``name`` keyed by those labels' values (zeros left out)."""
    found = {}
    for (sample, labels), count in samples.items():
        if sample == name and count:
            named = dict(labels)
            found[tuple(named[k] for k in keys)] = count
    return found


@pytest.fixture
def api_cluster(
    redis_url: str, demo_http_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> Iterator[tuple[Cluster, httpx2.Client]]:
    retry = {"attempts": 3, "initial_backoff_s": 0.01, "max_backoff_s": 0.05, "jitter_s": 0.01}
    cluster = make_cluster(
        tmp_path,
        redis_url,
        {"demo": http_demo(demo_http_url, retry=retry)},
        extra="[worker]\nchunk_size = 10\n",
    )
    cluster.env["TOOLSWARM_API_TOKEN"] = TOKEN
    stop_workers.append(cluster)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--port", str(port)], env=cluster.env, cwd=tmp_path
    )
    try:
        wait_for_port(port, 30, server)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
            yield cluster, client
    finally:
        stop_processes([server], grace_s=5)


def submit(client: httpx2.Client, items: list[dict[str, Any]]) -> str:
    created = client.post("/v1/jobs", json={"server": "demo", "items": items})
    assert created.status_code == 201, created.text
    job_id: str = created.json()["job_id"]
    return job_id


def test_worker_and_api_metrics_move_with_real_jobs(api_cluster: tuple[Cluster, httpx2.Client]) -> None:
    cluster, api = api_cluster
    assert api.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    before = scrape(api, "/metrics")
    assert by_label(before, "toolswarm_jobs", "state") == {}
    assert by_label(before, "toolswarm_calls_total", "tool", "outcome") == {}
    assert value(before, "toolswarm_max_concurrency", server="demo") == 16

    # Cancelled before any worker runs: all five of its items settle as cancelled, by the API.
    cancelled_job = submit(api, [{"tool": "sleep", "arguments": {"ms": 10}} for _ in range(5)])
    assert api.post(f"/v1/jobs/{cancelled_job}/cancel").json()["state"] == "cancelled"

    metrics_port = free_port()
    cluster.start_workers(1, TOOLSWARM_WORKER__METRICS_PORT=str(metrics_port))
    worker = httpx2.Client(base_url=f"http://127.0.0.1:{metrics_port}", timeout=30)
    assert by_label(scrape(worker, "/metrics"), "toolswarm_calls_total", "tool") == {}

    items: list[dict[str, Any]] = [{"tool": "echo", "arguments": {"text": f"t{i}"}} for i in range(20)]
    items += [{"tool": "fail", "arguments": {"message": "nope"}}] * 5
    items += [{"tool": "flaky", "arguments": {"fail_rate": 0.5}}] * 10
    job_id = submit(api, items)
    wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["state"] == "finished", 60, f"job {job_id}")
    results = api.get(f"/v1/jobs/{job_id}/results", params={"limit": 1000}).json()["results"]
    assert len(results) == len(items)
    outcomes = Counter(
        ("demo", r["tool"], "succeeded" if r["status"] == "succeeded" else r["error"]["type"])
        for r in results
    )
    assert ("demo", "fail", "tool_error") in outcomes
    retries = sum(r["attempts"] - 1 for r in results)
    statuses = Counter(r["status"] for r in results)

    # The worker's own counters: exactly its calls, retries and commits. A commit and a chunk are
    # counted just after they land, so the job may be seen finished a moment before the last are.
    settled_here = {(s,): n for s, n in statuses.items()}
    chunks = -(-len(items) // 10)

    def counted_here(samples: Samples) -> bool:
        return (
            by_label(samples, "toolswarm_items_settled_total", "status") == settled_here
            and value(samples, "toolswarm_chunks_total", server="demo") >= chunks
        )

    mine = scrape_until(worker, counted_here, "the worker's commits and chunks")
    assert by_label(mine, "toolswarm_calls_total", "server", "tool", "outcome") == outcomes
    assert value(mine, "toolswarm_retries_total", server="demo") == retries
    assert value(mine, "toolswarm_call_duration_seconds_count", server="demo") == len(items)
    assert value(mine, "toolswarm_call_duration_seconds_bucket", server="demo", le="+Inf") == len(items)
    assert value(mine, "toolswarm_call_duration_seconds_sum", server="demo") > 0
    assert value(mine, "toolswarm_commits_refused_total") == 0
    assert value(mine, "toolswarm_calls_in_flight", server="demo") == 0

    # The cluster's, once a heartbeat of the worker has flushed its last counts to Redis (an
    # earlier one may have flushed part of them while the job ran).
    settled = {(s,): n for s, n in (statuses + Counter(cancelled=5)).items()}

    def flushed(samples: Samples) -> bool:
        return (
            by_label(samples, "toolswarm_calls_total", "server", "tool", "outcome") == outcomes
            and by_label(samples, "toolswarm_items_settled_total", "status") == settled
            and value(samples, "toolswarm_chunks_total", server="demo") >= chunks
        )

    cluster_view = scrape_until(api, flushed, "the worker's counts in the API's /metrics")
    assert value(cluster_view, "toolswarm_retries_total", server="demo") == retries
    assert value(cluster_view, "toolswarm_call_duration_seconds_count", server="demo") == len(items)
    assert by_label(cluster_view, "toolswarm_jobs", "state") == {("finished",): 1, ("cancelled",): 1}
    assert value(cluster_view, "toolswarm_commits_refused_total") == 0
    assert value(cluster_view, "toolswarm_leases_taken_back_total") == 0
    assert value(cluster_view, "toolswarm_calls_in_flight", server="demo") == 0
    assert value(cluster_view, "toolswarm_max_concurrency", server="demo") == 16
    assert value(cluster_view, "toolswarm_queued_chunks", server="demo") == 0
    assert value(cluster_view, "toolswarm_workers") == 1
    worker.close()


def test_a_taken_metrics_port_is_a_one_line_error(redis_url: str, tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, redis_url, {})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cluster.cli("worker", "--metrics-port", str(port), timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "worker.metrics_port" in lines[0], (
        out.stderr
    )
