"""JSON logs of a real worker and a real API: every line an object, and lines about a chunk, an item
or a call naming them; no superuser warning at a worker's start."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cli.processes import free_port, stop_processes, wait_for_port
from tests.harness import http_demo, make_cluster

pytestmark = pytest.mark.integration

REQUIRED = {"timestamp", "level", "logger", "message"}
CELERY_TASK_LINE = re.compile(r"^Task toolswarm\.run_chunk\[(?P<chunk>[0-9a-f]+)\]")
CALL_KEY = re.compile(r"'io\.toolswarm/idempotency-key': '(?P<job>[0-9a-f]+):(?P<item>\d+):call'")
ITEMS = 20


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line of ``output`` as a JSON object, failing on the first that is not one."""
    records = []
    for number, line in enumerate(output.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(record, dict) and record.keys() >= REQUIRED, f"line {number}: {line!r}"
        records.append(record)
    assert records, "no log lines at all"
    return records


def test_worker_json_logs_name_job_chunk_item_and_server(
    tmp_path: Path, redis_url: str, demo_http_url: str
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": http_demo(demo_http_url)})
    try:
        # The setting from the environment (TOOLSWARM_LOG_FORMAT) rather than the flag; DEBUG so that
        # lines about single items and calls (the executor's, the MCP SDK's) are written too.
        cluster.start_workers(1, loglevel="DEBUG", TOOLSWARM_LOG_FORMAT="json")
        lines = [
            {"tool": "echo", "arguments": {"text": f"log-{i}"}}
            if i % 4
            else {"tool": "fail", "arguments": {"message": f"bad-{i}"}}
            for i in range(ITEMS)
        ]
        (tmp_path / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        out = cluster.cli("submit", "items.jsonl", "--server", "demo", "--chunk-size", "5", "--json")
        assert out.returncode == 0, out.stderr
        job_id = json.loads(out.stdout)["job_id"]
        job = cluster.wait_for_job(job_id, timeout=90)
        assert (job.succeeded, job.failed) == (ITEMS - ITEMS // 4, ITEMS // 4)
    finally:
        cluster.stop_workers()  # SIGTERM: the shutdown is logged too, as JSON
    output = (tmp_path / "worker-0.log").read_text(encoding="utf-8")
    assert "superuser" not in output
    records = json_lines(output)

    chunks = set()
    for record in records:
        found = CELERY_TASK_LINE.match(record["message"])
        if found is not None:  # Celery's own "received" and "succeeded" lines
            assert record["chunk"] == found["chunk"], record
            assert (record["job_id"], record["server"]) == (job_id, "demo"), record
            chunks.add(found["chunk"])
    assert len(chunks) == ITEMS // 5, chunks

    settled = [r for r in records if r["logger"] == "shared.executor" and " after " in r["message"]]
    assert sorted(r["item"] for r in settled) == list(range(ITEMS)), settled
    for record in settled:
        assert record["message"].startswith(f"item {record['item']} "), record
        assert (record["job_id"], record["server"]) == (job_id, "demo") and record["chunk"] in chunks, record

    # The MCP SDK's line sending each tools/call: its context names the item whose call it is.
    calls = [(r, CALL_KEY.search(r["message"])) for r in records if r["logger"].startswith("mcp.")]
    named = [(record, key) for record, key in calls if key is not None]
    assert len({int(key["item"]) for _, key in named}) == ITEMS
    for record, key in named:
        assert (record["job_id"], record["item"], record["step"]) == (key["job"], int(key["item"]), "call")

    assert any(r["message"] == "warm shutdown on SIGTERM" for r in records), records[-3:]


def test_api_json_logs_include_uvicorn_and_access_lines(tmp_path: Path, redis_url: str) -> None:
    cluster = make_cluster(tmp_path, redis_url, {})
    port = free_port()
    log_file = tmp_path / "api.log"
    with log_file.open("wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "cli", "api", f"--port={port}", "--log-format=json", "--log-level=info"],
            env=cluster.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, 60, api)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as response:
            assert response.status == 200
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)
    finally:
        stop_processes([api], grace_s=10)
    records = json_lines(log_file.read_text(encoding="utf-8"))
    loggers = {record["logger"] for record in records}
    assert {"uvicorn.error", "uvicorn.access"} <= loggers, records
    assert any(f"http://127.0.0.1:{port}" in r["message"] for r in records if r["logger"] == "uvicorn.error")
    assert any("GET /healthz" in r["message"] for r in records if r["logger"] == "uvicorn.access")
    assert "color_message" not in json.dumps(records)
