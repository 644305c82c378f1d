"""`toolswarm flower`: Flower sees the chunk tasks of a job, with the job id and item indexes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli.processes import free_port, stop_processes, wait_for_port
from tests.harness import Cluster, make_cluster, stdio_demo, wait_until

pytestmark = pytest.mark.integration

ITEMS = 50
CHUNK_SIZE = 10
RUN_CHUNK = "toolswarm.run_chunk"


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


def poll(fetch: Callable[[], Any], timeout: float, what: str, log: Path) -> Any:
    """Call ``fetch`` until it returns something truthy (connection errors count as not yet)."""
    last: object = None

    def fetched() -> Any:
        nonlocal last
        try:
            return fetch()
        except (urllib.error.URLError, ConnectionError) as exc:
            last = exc
            return None

    try:
        return wait_until(fetched, timeout, what, interval=0.25)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc} (last: {last})\n{log.read_text(errors='replace')[-3000:]}") from None


def online_workers(base: str) -> set[str]:
    """Workers whose heartbeats Flower's event receiver has seen (Prometheus metrics, no auth)."""
    online = set()
    for line in get(f"{base}/metrics").splitlines():
        if line.startswith("flower_worker_online{") and line.rstrip().endswith(" 1.0"):
            online.add(line.split('worker="', 1)[1].split('"', 1)[0])
    return online


def two_or_more(workers: set[str]) -> set[str] | None:
    return workers if len(workers) >= 2 else None


def chunk_tasks(base: str, job_id: str) -> list[dict[str, Any]]:
    tasks: dict[str, dict[str, Any]] = json.loads(get(f"{base}/api/tasks?taskname={RUN_CHUNK}"))
    return [t for t in tasks.values() if t.get("name") == RUN_CHUNK and job_id in str(t.get("kwargs"))]


def test_flower_shows_the_chunks_of_a_job(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo(timeout_s=10)})
    stop_workers.append(cluster)
    cluster.start_workers(2)

    port = free_port()
    log_path = tmp_path / "flower.log"
    with open(log_path, "wb") as log:
        flower = subprocess.Popen(
            [sys.executable, "-m", "cli", "flower", "--port", str(port)],
            env={**cluster.env, "FLOWER_UNAUTHENTICATED_API": "true"},
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, 30, flower)
        base = f"http://127.0.0.1:{port}"
        # Flower keeps only the events it received: wait until it hears both workers' heartbeats.
        workers = poll(
            lambda: two_or_more(online_workers(base)), 30, "Flower did not see two workers", log_path
        )

        items_file = tmp_path / "items.jsonl"
        items_file.write_text(
            "".join(json.dumps({"tool": "echo", "arguments": {"text": f"f{i}"}}) + "\n" for i in range(ITEMS))
        )
        submitted = cluster.cli(
            "submit", str(items_file), "--server", "demo", "--chunk-size", str(CHUNK_SIZE), "--json"
        )
        assert submitted.returncode == 0, submitted.stderr
        job_id = json.loads(submitted.stdout)["job_id"]
        assert cluster.wait_for_job(job_id).succeeded == ITEMS

        chunks = ITEMS // CHUNK_SIZE

        def all_chunks_succeeded() -> list[dict[str, Any]] | None:
            tasks = chunk_tasks(base, job_id)
            done = [t for t in tasks if t.get("state") == "SUCCESS"]
            return tasks if len(done) == chunks else None

        tasks = poll(all_chunks_succeeded, 30, f"Flower did not show {chunks} finished chunks", log_path)
        assert len(tasks) == chunks
        indexes: list[int] = []
        for task in tasks:
            kwargs = ast.literal_eval(task["kwargs"])  # Flower shows the kwargs' repr
            assert kwargs["job_id"] == job_id and kwargs["server"] == "demo"
            assert len(kwargs["items"]) == CHUNK_SIZE
            indexes += kwargs["items"]
            assert task["worker"] in workers, task
        assert sorted(indexes) == list(range(ITEMS)), "the chunks cover every item once"
    finally:
        stop_processes([flower], grace_s=10)
    assert flower.returncode == 0, f"Flower did not stop on SIGTERM: {flower.returncode}"
