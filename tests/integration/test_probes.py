"""Probes, the tools cache, validation at submit, and the breaker holding items of a dead server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cli.processes import free_port, stop_processes
from tests.harness import Cluster, holds_for, http_demo, make_cluster, start_demo_http, stdio_demo, wait_until

pytestmark = pytest.mark.integration


def write_items(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def test_invalid_arguments_are_refused_per_item_and_nothing_is_enqueued(
    redis_url: str, tmp_path: Path
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo()})
    items = [
        {"tool": "add", "arguments": {"a": 1, "b": 2}},
        {"tool": "add", "arguments": {"a": "one", "b": 2}},
        {"tool": "echo", "arguments": {}},
        {"tool": "nope", "arguments": {}},
    ]
    out = cluster.cli("submit", str(write_items(tmp_path / "i.jsonl", items)), "--server", "demo")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    error = " ".join(out.stderr.split())
    assert "line 2: arguments.a: 'one' is not of type 'number'" in error
    assert "line 3: arguments: 'text' is a required property" in error
    assert "line 4: unknown tool 'nope'" in error
    assert "line 1" not in error

    async def nothing(store: Any) -> tuple[int, int]:
        queued = [k async for k in store.client.scan_iter(match=f"{cluster.namespace}:celery:*")]
        return await store.client.zcard(store.keys.jobs), len(queued)

    assert cluster.run(cluster.with_store(nothing)) == (0, 0)

    # The schemas came from a probe, cached for the next submit and for `servers`.
    servers = json.loads(cluster.cli("servers", "--json").stdout)["servers"]["demo"]
    assert servers["probe"]["ok"] is True and servers["probe"]["tool_count"] >= 5


@pytest.mark.slow
def test_breaker_holds_items_while_the_server_is_down(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    port = free_port()

    server = start_demo_http(port)
    retry = {"attempts": 2, "initial_backoff_s": 0.05, "max_backoff_s": 0.2, "jitter_s": 0}
    cluster = make_cluster(
        tmp_path,
        redis_url,
        {"demo": http_demo(f"http://127.0.0.1:{port}/mcp", timeout_s=5, connect_timeout_s=2, retry=retry)},
        extra="[probes]\nunhealthy_interval_s = 0.5\n",
    )
    stop_workers.append(cluster)
    try:
        cluster.start_workers(2)
        items = write_items(tmp_path / "i.jsonl", [{"tool": "sleep", "arguments": {"ms": 200}}] * 600)
        job_id = json.loads(cluster.cli("submit", str(items), "--server", "demo", "--json").stdout)["job_id"]
        wait_until(
            lambda: json.loads(cluster.cli("status", job_id, "--json").stdout)["succeeded"] >= 30,
            60,
            "30 items succeeded",
        )
        server.kill()  # down at once: a graceful stop would let calls in flight finish the job
        server.wait()

        # Down for longer than two attempts' backoff: without the breaker items would fail.
        def breaker_open() -> bool:
            probe = json.loads(cluster.cli("servers", "--json").stdout)["servers"]["demo"]["probe"]
            return bool(probe and not probe["ok"])

        wait_until(breaker_open, 30, "the breaker opened")
        holds_for(  # several backoffs' worth of the server being down
            lambda: json.loads(cluster.cli("status", job_id, "--json").stdout)["failed"] == 0,
            3,
            "held, not failed",
        )
        server = start_demo_http(port)
        status = cluster.wait_for_job(job_id, timeout=120)
        assert status.succeeded == 600 and status.failed == 0
    finally:
        stop_processes([server], grace_s=5)


def test_a_job_overrides_the_retry_policy(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo()})
    stop_workers.append(cluster)
    cluster.start_workers(1)
    items = write_items(tmp_path / "i.jsonl", [{"tool": "flaky", "arguments": {"fail_rate": 1.0}}] * 5)
    out = cluster.cli("submit", str(items), "--server", "demo", "--json", "--retry-attempts", "2")
    job_id = json.loads(out.stdout)["job_id"]
    cluster.wait_for_job(job_id)
    records = [json.loads(line) for line in cluster.cli("results", job_id).stdout.splitlines()]
    assert [r["attempts"] for r in records] == [2] * 5
    assert {r["error"]["type"] for r in records} == {"retries_exhausted"}
