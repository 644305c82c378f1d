"""Items with a session: real workers record every call in the session's context (in Redis), a
step reads context.summary and context.window, and the CLI shows and clears it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.harness import Cluster, make_cluster, stdio_demo
from tests.integration.test_pipelines import submit

pytestmark = pytest.mark.integration


def test_calls_land_in_the_session_and_steps_read_it(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo()}, extra="[context]\nwindow = 4\n")
    stop_workers.append(cluster)
    cluster.start_workers(1)
    session = str(uuid.uuid4())

    calls = [
        {"server": "demo", "tool": "echo", "arguments": {"text": f"t{i}"}, "session": session}
        for i in range(9)
    ]
    first = submit(cluster, calls)
    assert cluster.wait_for_job(first, timeout=60).succeeded == 9

    shown = json.loads(cluster.cli("context", "show", session, "--json").stdout)
    assert shown["appended"] == 9 and len(shown["window"]) <= 4
    assert "echo" in shown["summary_before_window"]
    assert {r["tool"] for r in shown["window"]} == {"echo"}

    # A pipeline step of the same session reads its summary and window.
    reader = {
        "session": session,
        "steps": [
            {
                "name": "recall",
                "tool": "echo",
                "server": "demo",
                "arguments": {"text": {"$from": "context.summary"}},
            },
            {
                "name": "last",
                "tool": "echo",
                "server": "demo",
                "arguments": {"text": {"$from": "context.window[-1].result_text"}},
            },
        ],
    }
    second = submit(cluster, [reader])
    assert cluster.wait_for_job(second, timeout=60).succeeded == 1
    out = cluster.cli("results", second)
    (record,) = [json.loads(line) for line in out.stdout.splitlines()]
    recall, last = record["steps"]
    assert recall["output"]["text"] == shown["summary_before_window"]
    assert last["output"]["text"] == recall["output"]["text"]  # the window's newest record is recall's call

    after = json.loads(cluster.cli("context", "show", session, "--json").stdout)
    assert after["appended"] == 11

    cleared = cluster.cli("context", "clear", session)
    assert cleared.returncode == 0 and "cleared" in cleared.stdout
    assert cluster.cli("context", "show", session, "--json").stdout.strip() == "null"

    # Session ids that are not UUIDs never reach a key.
    for bad in ("../x", "a:b", ""):
        refused = cluster.cli("context", "show", bad)
        assert refused.returncode == 1 and "invalid session id" in refused.stderr
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text(json.dumps({**calls[0], "session": "../x"}) + "\n")
    bad_item = cluster.cli("submit", str(bad_file), "--json")
    assert bad_item.returncode != 0 and "invalid session id" in bad_item.stderr
