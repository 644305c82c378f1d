"""Submitting with an idempotency key: the same key returns the same job, which runs once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cli.processes import free_port, stop_processes
from shared.store import JobStore
from tests.harness import Cluster, make_cluster, stdio_demo

pytestmark = pytest.mark.integration

ITEMS = 60


def write_items(path: Path) -> Path:
    path.write_text(
        "".join(json.dumps({"tool": "echo", "arguments": {"text": f"i{i}"}}) + "\n" for i in range(ITEMS))
    )
    return path


def submit(cluster: Cluster, items_file: Path, key: str) -> dict[str, object]:
    out = cluster.cli("submit", str(items_file), "--server", "demo", "--idempotency-key", key, "--json")
    assert out.returncode == 0, out.stderr
    reply: dict[str, object] = json.loads(out.stdout)
    return reply


def settled_events(cluster: Cluster, job_id: str) -> Counter[int]:
    async def read(store: JobStore) -> Counter[int]:
        events = await store.events(job_id, count=100_000)
        return Counter(int(f["index"]) for _, f in events if f["type"] == "item.settled")

    counted: Counter[int] = cluster.run(cluster.with_store(read))
    return counted


def test_same_key_returns_the_same_job(redis_url: str, tmp_path: Path, stop_workers: list[Cluster]) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(timeout_s=10)})
    stop_workers.append(cluster)
    cluster.start_workers(2)
    items_file = write_items(tmp_path / "items.jsonl")

    first = submit(cluster, items_file, "nightly-2024-06-01")
    assert first["existing"] is False and first["total"] == ITEMS
    second = submit(cluster, items_file, "nightly-2024-06-01")
    assert second == {"job_id": first["job_id"], "total": ITEMS, "existing": True}
    job_id = str(first["job_id"])

    status = cluster.wait_for_job(job_id)
    assert status.state == "finished"
    assert (status.total, status.succeeded, status.failed) == (ITEMS, ITEMS, 0)
    results = cluster.cli("results", job_id)
    assert results.returncode == 0, results.stderr
    assert sorted(json.loads(line)["index"] for line in results.stdout.splitlines()) == list(range(ITEMS))
    assert settled_events(cluster, job_id) == Counter(range(ITEMS)), "each item ran and settled once"

    # After the job finished, the key still names it; another key makes another job.
    assert submit(cluster, items_file, "nightly-2024-06-01")["job_id"] == job_id
    other = submit(cluster, items_file, "nightly-2024-06-02")
    assert other["existing"] is False and other["job_id"] != job_id
    assert cluster.wait_for_job(str(other["job_id"])).succeeded == ITEMS


def test_a_failed_submit_does_not_burn_the_key(redis_url: str, tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(timeout_s=10)})
    items_file = write_items(tmp_path / "items.jsonl")
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    cluster.env["TOOLSWARM_BROKER_URL"] = dead_broker
    failed = cluster.cli("submit", str(items_file), "--server", "demo", "--idempotency-key", "k", "--json")
    assert failed.returncode == 1 and "broker" in failed.stderr
    del cluster.env["TOOLSWARM_BROKER_URL"]

    retried = cluster.cli("submit", str(items_file), "--server", "demo", "--idempotency-key", "k", "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["total"] == ITEMS


def test_concurrent_submits_with_one_key_make_one_job(redis_url: str, tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(timeout_s=10)})
    items_file = tmp_path / "items.jsonl"
    # Big enough that writing the job takes a while: the window the other submitters land in.
    items_file.write_text("".join(json.dumps({"tool": "echo", "arguments": {"text": "x"}}) + "\n") * 20_000)
    command = [sys.executable, "-m", "cli", "submit", str(items_file), "--server", "demo"]
    submitters = [
        subprocess.Popen(
            [*command, "--idempotency-key", "together", "--json"],
            env=cluster.env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(4)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in submitters]
    finally:
        stop_processes(submitters, grace_s=5)
    assert [p.returncode for p in submitters] == [0] * 4, [err for _, err in outputs]
    replies = [json.loads(out) for out, _ in outputs]
    assert len({r["job_id"] for r in replies}) == 1
    assert sorted(r["existing"] for r in replies) == [False, True, True, True]

    async def jobs(store: JobStore) -> list[str]:
        return await store.list_jobs(limit=10)

    assert cluster.run(cluster.with_store(jobs)) == [replies[0]["job_id"]]
