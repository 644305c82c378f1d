"""Fan-out under control: max_concurrency holds across every worker process."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from tests.harness import Cluster, demo_http_server, http_demo, make_cluster

pytestmark = pytest.mark.integration


async def server_stats(url: str, reset: bool = False) -> dict[str, Any]:
    async with Client(url, read_timeout_seconds=10) as client:
        result = await client.call_tool("stats", {"reset": reset})
        assert result.structured_content is not None
        stats: dict[str, Any] = result.structured_content
        return stats.get("result", stats)


def test_max_concurrency_holds_across_three_workers(
    tmp_path: Path, redis_url: str, stop_workers: list[Cluster]
) -> None:
    with demo_http_server() as url:
        cluster = make_cluster(tmp_path, redis_url, {"demo": http_demo(url, max_concurrency=4)},
                               extra="[worker]\nchunk_size = 5\ncalls_in_flight = 32\n")  # fmt: skip
        stop_workers.append(cluster)
        cluster.start_workers(3)
        asyncio.run(server_stats(url, reset=True))
        items = tmp_path / "items.jsonl"
        items.write_text(
            "".join(json.dumps({"tool": "sleep", "arguments": {"ms": 100}}) + "\n" for _ in range(80))
        )

        # Meanwhile, `toolswarm servers` shows the in-flight calls (never above the limit).
        seen_in_flight: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                out = cluster.cli("servers", "--json")
                if out.returncode == 0:
                    seen_in_flight.append(json.loads(out.stdout)["servers"]["demo"]["in_flight"])

        watcher = threading.Thread(target=watch)
        started = time.monotonic()
        job_id = json.loads(cluster.cli("submit", str(items), "--server", "demo", "--json").stdout)["job_id"]
        watcher.start()
        try:
            status = cluster.wait_for_job(job_id)
        finally:
            stop.set()
            watcher.join()
        elapsed = time.monotonic() - started
        assert status.succeeded == 80
        stats = asyncio.run(server_stats(url))
        assert stats["peak"] == 4, f"the server saw {stats['peak']} calls at once; the limit is 4"
        assert elapsed >= 80 * 0.1 / 4 * 0.9
        assert seen_in_flight and max(seen_in_flight) <= 4
        records = [json.loads(line) for line in cluster.cli("results", job_id).stdout.splitlines()]
        assert len({r["worker"] for r in records}) == 3, "all three workers took part"
