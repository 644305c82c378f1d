"""The MCP gateway end to end, driven by the SDK's own client over stdio and streamable HTTP:
a real gateway process, real workers, real Redis, the demo MCP server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from cli.processes import free_port, stop_processes, wait_for_port
from tests.harness import Cluster, http_demo, make_cluster, stdio_demo
from workers.demo_server import document

pytestmark = pytest.mark.integration

TOKEN = "gateway-s3cret"


@pytest.fixture
def cluster(redis_url: str, tmp_path: Path, demo_http_url: str, stop_workers: list[Cluster]) -> Cluster:
    cluster = make_cluster(
        tmp_path, redis_url, {"demo": http_demo(demo_http_url, max_concurrency=32), "local": stdio_demo()}
    )
    stop_workers.append(cluster)
    cluster.start_workers(2)
    return cluster


@pytest.fixture
def http_gateway(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**cluster.env, "TOOLSWARM_GATEWAY_TOKEN": TOKEN}
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "gateway", "--transport", "http", "--port", str(port)],
        env=env,
        cwd=tmp_path,
    )
    try:
        wait_for_port(port, 30, process)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop_processes([process], grace_s=5)


@asynccontextmanager
async def http_client(url: str, token: str = TOKEN) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http), read_timeout_seconds=120) as client,
    ):
        yield client


async def call(client: Client, tool: str, arguments: dict[str, Any], **options: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments, **options)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def refused(client: Client, tool: str, arguments: dict[str, Any]) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    text: str = result.content[0].text  # type: ignore[union-attr]
    return text


def test_stdio_submit_status_results_and_bad_input(cluster: Cluster, tmp_path: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "cli", "gateway"], env=cluster.env, cwd=str(tmp_path)
    )

    async def scenario() -> None:
        async with Client(params, read_timeout_seconds=60) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            expected = {"submit_job", "job_status", "job_results", "cancel_job", "retry_job"}
            assert expected | {"list_servers", "list_tools", "map_tool"} <= set(tools)
            assert all(tools[name].output_schema for name in tools)

            items = [{"arguments": {"text": f"t{i}"}, "key": f"k{i}"} for i in range(25)]
            items[7] = {"tool": "fail", "arguments": {"message": "nope"}}
            job = {
                "items": items,
                "server": "local",
                "tool": "echo",
                "idempotency_key": f"gw-{cluster.namespace}",
            }
            submitted = await call(client, "submit_job", job)
            assert submitted["total"] == 25 and submitted["existing"] is False
            assert (await call(client, "submit_job", job))["job_id"] == submitted["job_id"]  # idempotent
            job_id = submitted["job_id"]

            for _ in range(600):
                status = await call(client, "job_status", {"job_id": job_id})
                if status["state"] == "finished":
                    break
                await anyio.sleep(0.1)
            assert (status["succeeded"], status["failed"]) == (24, 1)

            seen, cursor, pages = [], None, 0
            while True:
                page = await call(
                    client,
                    "job_results",
                    {"job_id": job_id, "limit": 10, **({"cursor": cursor} if cursor else {})},
                )
                seen += [(r["index"], r["key"]) for r in page["results"]]
                pages += 1
                if (cursor := page["next_cursor"]) is None:
                    break
            assert pages == 3 and [i for i, _ in seen] == list(range(25)) and seen[3] == (3, "k3")
            failed = await call(client, "job_results", {"job_id": job_id, "status": "failed"})
            assert [r["index"] for r in failed["results"]] == [7]

            retried = await call(client, "retry_job", {"job_id": job_id})
            assert retried["total"] == 1
            assert (await call(client, "job_status", {"job_id": job_id}))["retried_by"] == retried["job_id"]

            described = await call(client, "list_tools", {"server": "local"})
            echo = next(t for t in described["tools"] if t["name"] == "echo")
            assert (
                echo["description"] == "Return the text unchanged."
                and "text" in echo["input_schema"]["properties"]
            )
            servers = await call(client, "list_servers", {})
            assert [s["name"] for s in servers["servers"]] == ["demo", "local"] and len(
                servers["workers"]
            ) == 2

            # Bad input: tool errors naming the field, and the gateway goes on serving.
            bad_arguments = await refused(
                client,
                "submit_job",
                {"items": [{"arguments": {"text": 5}}], "server": "local", "tool": "echo"},
            )
            assert "arguments.text" in bad_arguments and "not of type 'string'" in bad_arguments
            assert "server" in await refused(
                client, "map_tool", {"server": "nowhere", "tool": "echo", "arguments": [{}]}
            )
            assert "unknown tool 'nope'" in await refused(
                client, "map_tool", {"server": "local", "tool": "nope", "arguments": [{}]}
            )
            assert "job_id" in await refused(client, "job_status", {"job_id": "no-such-job"})
            assert "items" in await refused(client, "submit_job", {"items": [{"argumentz": {}}]})
            assert "keys" in await refused(
                client, "map_tool", {"server": "local", "tool": "echo", "arguments": [{}], "keys": ["a", "b"]}
            )
            assert (await call(client, "job_status", {"job_id": job_id}))["state"] == "finished"

    anyio.run(scenario)


def test_http_map_tool_progress_and_timeout(cluster: Cluster, http_gateway: str) -> None:
    missing = {i for i in range(300) if i % 23 == 5}  # negative ids: documents that do not exist
    arguments = [{"doc_id": -i if i in missing else i} for i in range(300)]
    keys = [f"doc-{i}" for i in range(300)]
    progress: list[tuple[float, float | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total))

    async def scenario() -> str:
        async with http_client(http_gateway) as client:
            mapped = await call(
                client,
                "map_tool",
                {"server": "demo", "tool": "fetch", "arguments": arguments, "keys": keys},
                progress_callback=on_progress,
            )
            assert mapped["state"] == "finished" and mapped["total"] == 300
            assert mapped["counts"]["succeeded"] == 300 - len(missing)
            assert [s["index"] for s in mapped["successful"]] == [i for i in range(300) if i not in missing]
            assert [f["index"] for f in mapped["failed"]] == sorted(missing)
            first = mapped["successful"][0]
            assert first["key"] == "doc-0" and document(0) in str(first["output"])
            failure = mapped["failed"][0]
            assert failure["key"] == f"doc-{min(missing)}" and failure["error"]["type"] == "tool_error"

            # A short wait on slow calls returns "running" with the counts so far; the job goes on.
            slow = await call(
                client,
                "map_tool",
                {"server": "demo", "tool": "sleep", "arguments": [{"ms": 400}] * 64, "timeout_s": 0.3},
            )
            assert slow["state"] in ("pending", "running") and slow["successful"] is None
            assert slow["counts"]["succeeded"] < 64
            return str(slow["job_id"])

    slow_job = anyio.run(scenario)
    assert progress, "no progress notifications arrived"
    done = [p for p, _ in progress]
    assert done == sorted(done) and len(set(done)) == len(done) and done[-1] == 300
    assert all(total == 300 for _, total in progress)
    assert cluster.wait_for_job(slow_job, timeout=60).succeeded == 64


def test_http_auth_and_host_checks(http_gateway: str) -> None:
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with httpx2.Client(timeout=10) as http:
        anonymous = http.post(http_gateway, json=initialize, headers=headers)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
        wrong = http.post(http_gateway, json=initialize, headers={**headers, "Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        authorized = {**headers, "Authorization": f"Bearer {TOKEN}"}
        assert http.post(http_gateway, json=initialize, headers=authorized).status_code == 200
        foreign_host = http.post(
            http_gateway, json=initialize, headers={**authorized, "Host": "evil.example:80"}
        )
        assert foreign_host.status_code == 421
        foreign_origin = http.post(
            http_gateway, json=initialize, headers={**authorized, "Origin": "http://evil.example"}
        )
        assert foreign_origin.status_code == 403

    async def wrong_token() -> None:
        with pytest.raises(BaseException):  # noqa: B017 - the SDK wraps the 401 in an ExceptionGroup
            async with http_client(http_gateway, token="wrong") as client:
                await client.list_tools()

    anyio.run(wrong_token)
