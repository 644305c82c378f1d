"""Completion events: a job's stream, the global stream, consumer groups, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import Cluster, make_cluster, stdio_demo, wait_until_async

pytestmark = pytest.mark.integration


def test_events_of_a_job_and_a_consumer_group(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo()})
    stop_workers.append(cluster)
    cluster.start_workers(1)

    # A consumer group created before the job sees all of its events, each once.
    group = subprocess.Popen(
        [sys.executable, "-m", "cli", "events", "--group", "audit", "--consumer", "c1", "--json"],
        env=cluster.env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:

        async def group_ready(store: object) -> None:
            client = store.client  # type: ignore[attr-defined]

            async def created() -> bool:
                if not await client.exists(store.keys.events):  # type: ignore[attr-defined]
                    return False
                groups = await client.xinfo_groups(store.keys.events)  # type: ignore[attr-defined]
                return any(g["name"] == "audit" for g in groups)

            await wait_until_async(created, 30, "consumer group created")

        cluster.run(cluster.with_store(group_ready))
        # `events --follow --job` started before completion ends by itself at job.completed.
        items = tmp_path / "items.jsonl"
        items.write_text(
            "".join(json.dumps({"tool": "echo", "arguments": {"text": str(i)}}) + "\n" for i in range(30))
        )
        out = cluster.cli("submit", str(items), "--server", "demo", "--json")
        job_id = json.loads(out.stdout)["job_id"]
        followed = cluster.cli("events", "--job", job_id, "--follow", "--json", timeout=60)
        assert followed.returncode == 0, followed.stderr
        job_events = [json.loads(line) for line in followed.stdout.splitlines()]
        kinds = [e["type"] for e in job_events]
        assert kinds[0] == "job.submitted" and kinds[-1] == "job.completed"
        assert kinds.count("item.settled") == 30 and kinds.count("job.completed") == 1
        assert sorted(int(e["index"]) for e in job_events if e["type"] == "item.settled") == list(range(30))

        assert group.stdout is not None
        seen = []
        while len(seen) < 33:  # submitted + started + 30 settled + completed
            seen.append(json.loads(group.stdout.readline()))
        assert [e["type"] for e in seen].count("item.settled") == 30
        assert seen[-1]["type"] == "job.completed" and seen[-1]["job_id"] == job_id
        assert len({e["id"] for e in seen}) == len(seen)
    finally:
        group.terminate()
        group.wait(timeout=10)

    # Everything the group received was acknowledged.
    async def pending(store: object) -> int:
        info = await store.client.xpending(store.keys.events, "audit")  # type: ignore[attr-defined]
        return int(info["pending"])

    assert cluster.run(cluster.with_store(pending)) == 0

    plain = cluster.cli("events", "--job", job_id)
    assert plain.returncode == 0 and "job.completed" in plain.stdout
    unknown = cluster.cli("events", "--job", "nope")
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr
