"""Servers that can never answer: a stdio command that does not exist, an HTTP server that refuses
every request with 401. Their items are held (status says so, and why) and then fail with a typed,
permanent error once the hold budget is spent; the job finishes instead of running forever."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from rich.console import Console

from cli import display
from shared.holds import with_holds
from shared.models import JobStatus
from shared.store import JobStore
from tests.harness import Cluster, make_cluster, wait_until

pytestmark = pytest.mark.integration

SECRET = "s3cr3t-token-that-must-never-show"
HOLD_S = 15  # counted from the outage's first failed probe, cluster-wide


class Refusing(BaseHTTPRequestHandler):
    """What a hosted MCP server says to a client without valid credentials."""

    tokens_seen: ClassVar[set[str]] = set()

    def refuse(self) -> None:
        self.tokens_seen.add(self.headers.get("Authorization", ""))
        body = b'{"error": "invalid_token"}'
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Bearer error="invalid_token"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = refuse

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mcp"
    finally:
        server.shutdown()
        server.server_close()


def status(cluster: Cluster, job_id: str) -> JobStatus:
    """The job's status as `status` shows it (held items included), read without a CLI start-up."""

    async def read(store: JobStore) -> JobStatus:
        return await with_holds(store, cluster.settings, await store.status(job_id))

    view: JobStatus = cluster.run(cluster.with_store(read))
    return view


@pytest.mark.slow
def test_items_of_servers_that_never_answer_are_held_then_fail_typed(
    redis_url: str, refusing_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    servers = {
        "ghost": {
            "transport": "stdio",
            "command": "toolswarm-no-such-mcp-server",
            "args": ["--token", "${HOLDS_TEST_TOKEN}"],
            "hold_timeout_s": HOLD_S,
        },
        "locked": {
            "transport": "http",
            "url": refusing_url + "?api_key=${HOLDS_TEST_TOKEN}",
            "headers": {"Authorization": "Bearer ${HOLDS_TEST_TOKEN}"},
            "hold_timeout_s": HOLD_S,
        },
    }
    cluster = make_cluster(
        tmp_path, redis_url, servers, extra="[worker]\nchunk_size = 5\n[probes]\nunhealthy_interval_s = 0.5\n"
    )
    stop_workers.append(cluster)
    cluster.env["HOLDS_TEST_TOKEN"] = SECRET
    os.environ["HOLDS_TEST_TOKEN"] = SECRET  # for this process's reads of the settings
    items = tmp_path / "items.jsonl"
    items.write_text(
        "".join(
            json.dumps({"server": server, "tool": "echo", "arguments": {"text": f"{server}-{i}"}}) + "\n"
            for server in ("ghost", "locked")
            for i in range(5)
        )
    )
    out = cluster.cli("submit", str(items), "--no-validate", "--json")
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job_id"]
    cluster.start_workers(1)  # its first probes start both outages' clocks

    held = wait_until(lambda: (view := status(cluster, job_id)).held == 10 and view, 30, "items held")
    assert held.state == "running" and held.held_reason is not None
    reason = held.held_reason
    assert "server ghost down for" in reason and "No such file or directory" in reason, reason
    assert "server locked down for" in reason and "401 Unauthorized" in reason, reason
    assert f"items fail after {HOLD_S}s" in reason, reason
    shown = Console(record=True, width=1000)
    display.print_status(shown, held)
    assert f"held      │ 10 ({reason})" in shown.export_text(), shown.export_text()
    servers_out = cluster.cli("servers")
    assert servers_out.returncode == 0, servers_out.stderr
    [ghost_line] = [line for line in servers_out.stdout.splitlines() if line.startswith("ghost: ")]
    assert "down for" in ghost_line and "(server_unavailable): FileNotFoundError" in ghost_line, ghost_line
    [locked_line] = [line for line in servers_out.stdout.splitlines() if line.startswith("locked: ")]
    assert "(auth_error): HTTPStatusError: Client error '401 Unauthorized'" in locked_line, locked_line

    final = cluster.wait_for_job(job_id, timeout=90)
    assert final.state == "finished" and final.failed == 10 and final.succeeded == 0
    out = cluster.cli("results", job_id)
    records = [json.loads(line) for line in out.stdout.splitlines()]
    by_server = {server: [r for r in records if r["server"] == server] for server in ("ghost", "locked")}
    for record in by_server["ghost"]:
        assert record["error"]["type"] == "server_unavailable", record
        assert record["error"]["retryable"] is False
        assert "toolswarm-no-such-mcp-server" in record["error"]["message"], record
    for record in by_server["locked"]:
        assert record["error"]["type"] == "auth_error", record
        assert "401" in record["error"]["message"], record
    assert status(cluster, job_id).held == 0

    # The token was sent (the refusing server saw it) and shows nowhere: not in the servers table,
    # the status, the results, the workers' logs.
    assert Refusing.tokens_seen and Refusing.tokens_seen <= {f"Bearer {SECRET}"}
    shown_everywhere = [servers_out.stdout, reason, out.stdout, cluster.worker_logs(tail=1_000_000)]
    for text in shown_everywhere:
        assert SECRET not in text
    assert "--token ***" in reason + out.stdout
