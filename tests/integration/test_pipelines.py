"""Pipeline items end to end: real workers run chains of steps across stdio and HTTP servers."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from shared.models import JobStatus, ResultRecord
from shared.store import JobStore
from tests.harness import Cluster, demo_http_server, http_demo, make_cluster, stdio_demo, wait_until
from tests.integration.test_failover import (
    FAST_LEASES,
    holders,
    settled_exactly_once,
    worker_pid,
)
from workers.demo_server import document

pytestmark = pytest.mark.integration

# fetch a document on one server, parse it on another, then add its word count to its id.
DOCUMENTS = {
    "steps": [
        {"name": "fetch", "tool": "fetch", "server": "a", "arguments": {"doc_id": {"$from": "input.doc"}}},
        {
            "name": "parse",
            "tool": "parse",
            "server": "b",
            "arguments": {"text": {"$from": "steps.fetch.text"}},
        },
        {
            "name": "total",
            "tool": "add",
            "server": "a",
            "arguments": {"a": {"$from": "steps.parse.structured.words"}, "b": {"$from": "input.doc"}},
        },
    ]
}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def submit(
    cluster: Cluster, items: list[dict[str, Any]], *args: str, pipeline: dict[str, Any] | None = None
) -> str:
    workdir = cluster.config_file.parent
    options = list(args)
    if pipeline is not None:
        options += ["--pipeline", str(write_jsonl(workdir / "pipeline.json", [pipeline]))]
    out = cluster.cli("submit", str(write_jsonl(workdir / "items.jsonl", items)), *options, "--json")
    assert out.returncode == 0, out.stderr
    job_id: str = json.loads(out.stdout)["job_id"]
    return job_id


def results(cluster: Cluster, job_id: str, *args: str) -> list[ResultRecord]:
    out = cluster.cli("results", job_id, *args)
    assert out.returncode == 0, out.stderr
    return [ResultRecord.model_validate_json(line) for line in out.stdout.splitlines()]


def status_json(cluster: Cluster, job_id: str) -> JobStatus:
    out = cluster.cli("status", job_id, "--json")
    assert out.returncode == 0, out.stderr
    return JobStatus.model_validate_json(out.stdout)


def test_three_steps_across_a_stdio_and_an_http_server_over_1000_items(
    redis_url: str, demo_http_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(
        tmp_path,
        redis_url,
        {"a": stdio_demo(max_concurrency=64), "b": http_demo(demo_http_url, max_concurrency=64)},
    )
    stop_workers.append(cluster)
    cluster.start_workers(2)
    total = 1000
    job_id = submit(cluster, [{"input": {"doc": i}} for i in range(total)], pipeline=DOCUMENTS)
    status = cluster.wait_for_job(job_id, timeout=180)
    assert (status.succeeded, status.failed, status.degraded, status.failures) == (total, 0, 0, [])
    records = settled_exactly_once(cluster, job_id, total)
    for record in records:
        text = document(record.index)
        fetch, parse, add = record.steps or []
        assert [s.name for s in (fetch, parse, add)] == ["fetch", "parse", "total"]
        assert [s.server for s in (fetch, parse, add)] == ["a", "b", "a"]
        assert all(s.status == "succeeded" and s.attempts == 1 for s in (fetch, parse, add))
        assert fetch.output and fetch.output["text"] == text
        assert parse.output and parse.output["structured"]["words"] == len(text.split())
        assert record.result is not None and record.result.text() == str(
            float(len(text.split()) + record.index)
        )
        assert (record.tool, record.server, record.attempts) == ("add", "a", 3)
        assert (
            fetch.checkpoint_ms is not None and parse.checkpoint_ms is not None and add.checkpoint_ms is None
        )


FAILING = {
    "key": "critical",
    "steps": [
        {"name": "first", "tool": "echo", "arguments": {"text": "one"}},
        {"name": "boom", "tool": "fail", "arguments": {"message": {"$from": "input.long"}}},
        {"name": "after", "tool": "echo", "arguments": {"text": "never"}},
    ],
    "input": {"long": "x" * 3000},
}
DEGRADING = {
    "key": "degraded",
    "steps": [
        {"name": "first", "tool": "echo", "arguments": {"text": "one"}},
        {
            "name": "maybe",
            "tool": "fail",
            "arguments": {"message": "down"},
            "critical": False,
            "fallback": {"text": "from the fallback"},
        },
        {"name": "after", "tool": "echo", "arguments": {"text": {"$from": "steps.maybe.structured.text"}}},
    ],
}
PLAIN = {"key": "plain", "tool": "fail", "arguments": {"message": "single call"}}


@pytest.mark.parametrize("state_mode", ["cas", "log"])
def test_a_critical_step_fails_the_item_and_a_non_critical_one_degrades_it(
    state_mode: str, redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo()})
    stop_workers.append(cluster)
    cluster.start_workers(1)
    job_id = submit(cluster, [FAILING, DEGRADING, PLAIN], "--server", "demo", "--state-mode", state_mode)
    cluster.wait_for_job(job_id, timeout=60)
    failed, degraded, plain = results(cluster, job_id)

    assert failed.status == "failed" and failed.error is not None
    assert (failed.error.step, failed.error.type, failed.error.retryable) == ("boom", "tool_error", False)
    assert failed.error.context is not None and failed.error.context["completed_steps"] == ["first"]
    cut = failed.error.context["arguments"]["message"]
    assert cut["$cut"] is True and cut["bytes"] == 3002 and len(cut["head"]) == 1024
    assert [s.status for s in failed.steps or []] == ["succeeded", "failed", "not_run"]
    assert failed.result is None

    assert degraded.status == "succeeded" and degraded.degraded == ["maybe"] and degraded.error is None
    maybe = (degraded.steps or [])[1]
    assert maybe.status == "degraded" and maybe.error is not None and maybe.error.type == "tool_error"
    assert maybe.output == {
        "text": '{"text": "from the fallback"}',
        "structured": {"text": "from the fallback"},
        "content": [],
        "degraded": True,
    }
    assert degraded.result is not None and degraded.result.text() == "from the fallback"

    assert plain.steps is None and plain.error is not None and plain.error.step == "call"

    status = status_json(cluster, job_id)
    assert (status.succeeded, status.failed, status.degraded) == (1, 2, 1)
    assert {(f.step, f.error_type, f.count) for f in status.failures} == {
        ("boom", "tool_error", 1),
        ("call", "tool_error", 1),
    }
    assert [r.key for r in results(cluster, job_id, "--step", "boom")] == ["critical"]
    assert [r.key for r in results(cluster, job_id, "--step", "call")] == ["plain"]
    assert results(cluster, job_id, "--step", "maybe") == []

    async def checkpoints_left(store: JobStore) -> int:
        return int(await store.client.exists(store.keys.job(job_id).steps))

    assert cluster.run(cluster.with_store(checkpoints_left)) == 0, "a finished job keeps no checkpoints"


def step_starts(record_file: Path, job_id: str) -> dict[int, dict[str, list[float]]]:
    """When each step of each item was called, from the servers' own record: index -> step -> starts."""
    starts: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in record_file.read_text().splitlines():
        call = json.loads(line)
        job, index, step = call["key"].split(":")
        if job == job_id:
            starts[int(index)][step].append(call["at"])
    return starts


@pytest.mark.slow
def test_killed_workers_never_rerun_a_checkpointed_step(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    record_file = tmp_path / "calls.jsonl"
    order = ["one", "two", "three"]
    with demo_http_server("--record", str(record_file)) as url:
        cluster = make_cluster(
            tmp_path,
            redis_url,
            {
                "a": stdio_demo(
                    args=["-m", "workers.demo_server", "--record", str(record_file)], max_concurrency=64
                ),
                "b": http_demo(url, max_concurrency=64),
            },
            extra=FAST_LEASES,
        )
        stop_workers.append(cluster)
        cluster.start_workers(3)
        pipeline = {
            "steps": [
                {"name": "one", "tool": "sleep", "server": "a", "arguments": {"ms": 300}},
                {"name": "two", "tool": "sleep", "server": "b", "arguments": {"ms": 300}},
                {"name": "three", "tool": "sleep", "server": "a", "arguments": {"ms": 300}},
            ]
        }
        total = 400
        job_id = submit(cluster, [{"input": {}} for _ in range(total)], pipeline=pipeline)

        def checkpointed() -> int:
            count: int = cluster.run(cluster.with_store(lambda s: s.client.hlen(s.keys.job(job_id).steps)))
            return count

        for kills in range(2):
            wait_until(lambda k=kills: checkpointed() >= 30 * (k + 1), 60, "steps checkpointed")
            victim, _ = holders(cluster, job_id).most_common(1)[0]
            os.kill(worker_pid(victim), signal.SIGKILL)
            cluster.start_workers(1)
        status = cluster.wait_for_job(job_id, timeout=180)
        assert status.succeeded == total
        settled_exactly_once(cluster, job_id, total)

    starts = step_starts(record_file, job_id)
    assert set(starts) == set(range(total))
    resumed = 0
    for index, calls in starts.items():
        for earlier, later in itertools.pairwise(order):
            assert max(calls[earlier]) < min(calls[later]), f"item {index}: {earlier} ran after {later} began"
        if len(calls["two"]) > 1 or len(calls["three"]) > 1:
            resumed += len(calls["one"]) == 1
    assert resumed > 0, "some item was taken over after its first step and resumed without repeating it"


def test_demo_runs_a_pipeline_and_reports_by_step(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLSWARM_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--pipeline", "-n", "120", "-w", "1", "--transport", "stdio"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "117 succeeded, 3 failed" in text, out.stdout
    assert "of the succeeded degraded" in text
    cells = " ".join(out.stdout.replace("│", " ").split())
    for row in ("fetch 117 0 3 0", "parse 117 0 0 3", "fetch tool_error 3"):
        assert row in cells, out.stdout
    # Where each part runs, and no warning or notice from the libraries beneath.
    assert "toolswarm demo: Redis redis://127.0.0.1:" in text, out.stdout
    assert "demo MCP server over stdio" in text and f"workers 1 ready: demo0@{socket.gethostname()}" in text
    said = out.stdout + out.stderr
    assert not [notice for notice in ("superuser", "Warning", "Warm shutdown") if notice in said], said
