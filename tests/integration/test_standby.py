"""Standby servers: the primary stops mid-job, its breaker opens, and its calls go to the standby
instead of waiting; each record says which server answered."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cli.processes import free_port, stop_processes
from shared.store import JobStore
from tests.harness import Cluster, http_demo, make_cluster, wait_until
from tests.harness import start_demo_http as start_server
from tests.integration.test_failover import settled_exactly_once
from tests.integration.test_pipelines import submit

pytestmark = pytest.mark.integration


def call_times(record: Path) -> list[float]:
    if not record.exists():
        return []
    return [json.loads(line)["at"] for line in record.read_text().splitlines()]


def test_a_stopped_primary_hands_its_calls_to_the_standby(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    primary_record, standby_record = tmp_path / "primary.jsonl", tmp_path / "standby.jsonl"
    primary_port, standby_port = free_port(), free_port()
    primary = start_server(primary_port, "--record", str(primary_record))
    standby = start_server(standby_port, "--record", str(standby_record))
    try:
        cluster = make_cluster(
            tmp_path,
            redis_url,
            {
                "primary": http_demo(
                    f"http://127.0.0.1:{primary_port}/mcp", standby=["backup"], max_concurrency=16
                ),
                "backup": http_demo(f"http://127.0.0.1:{standby_port}/mcp", max_concurrency=16),
            },
            extra="[probes]\nunhealthy_interval_s = 0.5\n",
        )
        stop_workers.append(cluster)
        cluster.start_workers(2)

        async def backup_listed(store: JobStore) -> bool:
            return bool(await store.client.exists(store.keys.tools("backup")))

        wait_until(lambda: cluster.run(cluster.with_store(backup_listed)), 30, "the standby probed")
        total = 400
        job_id = submit(cluster, [{"server": "primary", "tool": "sleep", "arguments": {"ms": 100}}] * total)
        wait_until(lambda: len(call_times(primary_record)) >= 80, 60, "the primary serving")
        stop_processes([primary], grace_s=0)
        stopped_at = time.time()

        status = cluster.wait_for_job(job_id, timeout=90)
        assert status.succeeded == total, status
        records = settled_exactly_once(cluster, job_id, total)
        answered = [r for r in records if r.answered_by == "backup"]
        assert answered and all(r.server == "primary" for r in records)
        # The standby took over within seconds, and nothing waited for the primary to come back.
        first_standby_call = min(call_times(standby_record))
        assert first_standby_call - stopped_at < 10
        assert len(call_times(standby_record)) >= len(answered)
    finally:
        stop_processes([primary, standby], grace_s=2)
