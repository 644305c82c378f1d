"""A small job submitted behind a huge one on the same server starts within seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.harness import Cluster, make_cluster, stdio_demo

pytestmark = pytest.mark.integration


def test_small_job_is_not_stuck_behind_a_huge_one(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(max_concurrency=64)})
    stop_workers.append(cluster)
    cluster.start_workers(2)
    huge = tmp_path / "huge.jsonl"
    huge.write_text((json.dumps({"tool": "sleep", "arguments": {"ms": 200}}) + "\n") * 5000)
    small = tmp_path / "small.jsonl"
    small.write_text((json.dumps({"tool": "echo", "arguments": {"text": "hi"}}) + "\n") * 20)

    huge_id = json.loads(cluster.cli("submit", str(huge), "--server", "demo", "--json").stdout)["job_id"]
    submitted = time.monotonic()
    small_id = json.loads(cluster.cli("submit", str(small), "--server", "demo", "--json").stdout)["job_id"]
    small_status = cluster.wait_for_job(small_id, timeout=120)
    waited = time.monotonic() - submitted
    huge_status = json.loads(cluster.cli("status", huge_id, "--json").stdout)
    assert small_status.succeeded == 20
    assert huge_status["state"] == "running", "the huge job was still running when the small one finished"
    assert waited < 8, f"the small job took {waited:.1f}s behind the huge one"
    cluster.cli("cancel", huge_id)
