"""receive_handoff over the gateway, driven by the SDK's client: once per idempotency token
(counted by the target server itself), "processing" for a concurrent duplicate, refusals, and a
large context that travels by reference."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from cli.processes import free_port, stop_processes
from shared.handoff import token_digest
from shared.store import JobStore
from tests.harness import Cluster, http_demo, make_cluster, start_demo_http

pytestmark = pytest.mark.integration


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A demo server of its own that logs every call it serves."""
    record = tmp_path / "calls.jsonl"
    port = free_port()
    process = start_demo_http(port, "--record", str(record))
    try:
        yield f"http://127.0.0.1:{port}/mcp", record
    finally:
        stop_processes([process], grace_s=5)


def calls_of(record: Path, tool: str) -> int:
    if not record.exists():
        return 0
    return sum(1 for line in record.read_text().splitlines() if json.loads(line)["tool"] == tool)


def envelope(tool: str, context: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {
        "session_id": str(uuid.uuid4()),
        "handoff_id": str(uuid.uuid4()),
        "idempotency_token": f"token-{uuid.uuid4()}",
        "source_server": "extract",
        "target_server": "demo",
        "next_tool_hint": tool,
        "accumulated_context": context,
        "created_at": datetime.now(UTC).isoformat(),
        **changes,
    }


def test_receive_handoff(
    redis_url: str, tmp_path: Path, recorded: tuple[str, Path], stop_workers: list[Cluster]
) -> None:
    url, record = recorded
    cluster = make_cluster(tmp_path, redis_url, {"demo": http_demo(url)})
    stop_workers.append(cluster)
    cluster.start_workers(1)
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "cli", "gateway"], env=cluster.env, cwd=str(tmp_path)
    )

    async def receive(client: Client, sent: dict[str, Any]) -> dict[str, Any]:
        result = await client.call_tool("receive_handoff", {"envelope": sent})
        assert not result.is_error, result.content
        assert result.structured_content is not None
        return result.structured_content

    async def refusal(client: Client, sent: dict[str, Any]) -> str:
        result = await client.call_tool("receive_handoff", {"envelope": sent})
        assert result.is_error
        return str(result.content[0].text)  # type: ignore[union-attr]

    async def scenario() -> None:
        async with Client(params, read_timeout_seconds=60) as client:
            # The same envelope twice: the tool runs once, both answers carry its result.
            once = envelope("echo", {"text": "resolved customer 42"})
            first = await receive(client, once)
            second = await receive(client, once)
            assert first["status"] == second["status"] == "completed"
            assert first["result"]["output"] == {"result": "resolved customer 42"}
            assert second["result"] == first["result"] and second["replayed"] is True
            assert calls_of(record, "echo") == 1

            # A duplicate while the first is still running: "processing", then the one result.
            slow = envelope("sleep", {"ms": 1500})
            answers: list[dict[str, Any]] = []

            async def send(delay: float) -> None:
                await anyio.sleep(delay)
                answers.append(await receive(client, slow))

            async with anyio.create_task_group() as group:
                group.start_soon(send, 0)
                group.start_soon(send, 0.5)
            processing = next(a for a in answers if a["status"] == "processing")
            assert 1 <= processing["retry_after_seconds"] <= 30
            done = next(a for a in answers if a["status"] == "completed")
            assert done["result"]["output"] == {"result": "slept 1500ms"}
            assert (await receive(client, slow))["result"] == done["result"]
            assert calls_of(record, "sleep") == 1

            # Refusals, naming what is wrong; the gateway goes on serving.
            old = (datetime.now(UTC) - timedelta(seconds=400)).isoformat()
            expired = await refusal(client, envelope("echo", {"text": "x"}, created_at=old))
            assert "handoff_expired" in expired and "TTL was 300s" in expired
            elsewhere = await refusal(client, envelope("echo", {"text": "x"}, target_server="billing"))
            assert "handoff_misdelivered" in elsewhere and "'billing'" in elsewhere and "'demo'" in elsewhere
            assert "envelope" in await refusal(client, {**envelope("echo", {}), "ttl_seconds": 0})

            # A 200 KB context is stored apart and loaded back for the call.
            big_text = "y" * 200_000
            big = envelope("echo", {"text": big_text})
            answer = await receive(client, big)
            assert answer["result"]["output"] == {"result": big_text}

            async def stored(store: JobStore) -> dict[str, Any]:
                raw = await store.client.hget(
                    store.keys.handoff(token_digest(big["idempotency_token"])), "envelope"
                )
                kept: dict[str, Any] = json.loads(raw)
                return kept

            kept = await stored_envelope(cluster, stored)
            assert (
                kept["context_ref"] == f"handoff-context:{big['handoff_id']}"
                and kept["accumulated_context"] == {}
            )
            assert calls_of(record, "echo") == 2

    anyio.run(scenario)


async def stored_envelope(cluster: Cluster, read: Any) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(lambda: cluster.run(cluster.with_store(read)))  # type: ignore[no-any-return]
