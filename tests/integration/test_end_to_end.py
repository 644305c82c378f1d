"""A real job: embedded Redis, two real worker processes, the demo MCP server over stdio and HTTP."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from shared.models import ResultRecord
from tests.harness import Cluster, http_demo, make_cluster, stdio_demo

pytestmark = pytest.mark.integration

ITEMS = 600


def mixed_items(count: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for i in range(count):
        kind = i % 10
        if kind < 5:
            items.append({"tool": "echo", "arguments": {"text": f"item-{i}"}, "key": f"k{i}"})
        elif kind < 7:
            items.append({"tool": "add", "arguments": {"a": i, "b": 0.5}})
        elif kind == 7:
            items.append({"tool": "fail", "arguments": {"message": f"boom-{i}"}})
        elif kind == 8:
            items.append({"tool": "no_such_tool", "arguments": {}})
        else:
            items.append({"tool": "flaky", "arguments": {"fail_rate": 0.2}})
    return items


def run_job(cluster: Cluster, tmp_path: Path, items: list[dict[str, Any]]) -> tuple[str, list[ResultRecord]]:
    items_file = tmp_path / "items.jsonl"
    items_file.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    # --no-validate: the unknown tool must reach the workers (validation at submit would refuse it).
    submitted = cluster.cli("submit", str(items_file), "--server", "demo", "--json", "--no-validate")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    status = cluster.wait_for_job(job_id)
    assert status.state == "finished"
    out = cluster.cli("results", job_id, "--json")
    assert out.returncode == 0, out.stderr
    return job_id, [ResultRecord.model_validate_json(line) for line in out.stdout.splitlines()]


def check_results(
    cluster: Cluster, job_id: str, items: list[dict[str, Any]], records: list[ResultRecord]
) -> None:
    assert sorted(r.index for r in records) == list(range(len(items))), "every item has exactly one result"
    for record in records:
        item = items[record.index]
        assert record.tool == item["tool"]
        if item["tool"] == "echo":
            assert record.status == "succeeded"
            assert record.result is not None and record.result.text() == item["arguments"]["text"]
            assert record.key == item["key"]
        elif item["tool"] == "add":
            assert record.status == "succeeded"
            assert record.result is not None
            assert record.result.structured_content == {"result": item["arguments"]["a"] + 0.5}
        elif item["tool"] == "fail":
            assert record.status == "failed"
            assert record.error is not None and record.error.type == "tool_error"
            assert item["arguments"]["message"] in record.error.message
            assert record.error.retryable is False
        elif item["tool"] == "no_such_tool":
            assert record.status == "failed"
            assert record.error is not None and record.error.type == "unknown_tool"
            assert "no_such_tool" in record.error.message and record.error.retryable is False
            assert record.attempts == 1
        else:  # flaky at 20%: almost always succeeds within 4 attempts; a failure must say why
            if record.status == "failed":
                assert record.error is not None and record.error.type == "retries_exhausted"
            assert 1 <= record.attempts <= 4
        assert record.worker and record.duration_ms >= 0

    status = cluster.cli("status", job_id, "--json")
    view = json.loads(status.stdout)
    assert view["total"] == len(items)
    assert view["succeeded"] + view["failed"] == len(items)
    assert view["succeeded"] == sum(r.status == "succeeded" for r in records)
    assert view["pending"] == 0 and view["running"] == 0

    async def completed_events(store: Any) -> int:
        events = await store.events(job_id, count=100_000)
        return sum(1 for _, fields in events if fields["type"] == "job.completed")

    assert cluster.run(cluster.with_store(completed_events)) == 1


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_job_runs_end_to_end(
    transport: str, redis_url: str, demo_http_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    server = stdio_demo(timeout_s=10) if transport == "stdio" else http_demo(demo_http_url, timeout_s=10)
    cluster = make_cluster(tmp_path, redis_url, {"demo": server}, extra="[worker]\nchunk_size = 20\n")
    stop_workers.append(cluster)
    cluster.start_workers(2)
    items = mixed_items(ITEMS)
    job_id, records = run_job(cluster, tmp_path, items)
    check_results(cluster, job_id, items, records)
    workers_used = {r.worker for r in records}
    assert len(workers_used) == 2, f"both worker processes took part: {workers_used}"
    check_exports(cluster, job_id, records, tmp_path)


def check_exports(cluster: Cluster, job_id: str, records: list[ResultRecord], tmp_path: Path) -> None:
    """`results --output FILE` writes what `results` prints; `--format csv` one flat row per record."""
    jsonl, flat = tmp_path / "results.jsonl", tmp_path / "results.csv"
    out = cluster.cli("results", job_id, "--output", str(jsonl))
    assert out.returncode == 0, out.stderr
    assert f"{len(records)} results written to {jsonl}" in out.stdout
    assert [ResultRecord.model_validate_json(line) for line in jsonl.read_text().splitlines()] == records
    out = cluster.cli("results", job_id, "--format", "csv", "--status", "failed", "-o", str(flat))
    assert out.returncode == 0, out.stderr
    with flat.open(newline="") as f:
        rows = list(csv.DictReader(f))
    failed = [r for r in records if r.status == "failed"]
    assert [int(row["index"]) for row in rows] == [r.index for r in failed]
    for row, record in zip(rows, failed, strict=True):
        assert record.error is not None
        assert (row["status"], row["error_type"], row["error"]) == (
            "failed",
            record.error.type,
            record.error.message,
        )
    out = cluster.cli("results", job_id, "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert list(rows[0]) == ["index", "key", "status", "error_type", "error", "output"]
    for row, record in zip(rows, records, strict=True):
        assert row["key"] == (record.key or "") and row["status"] == record.status
        assert row["output"] == (record.result.text() if record.result else "")
    bad = cluster.cli("results", job_id, "--format", "xml")
    assert bad.returncode == 1 and "--format must be jsonl or csv, not 'xml'" in bad.stderr
