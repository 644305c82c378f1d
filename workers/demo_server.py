"""The demo MCP server: a handful of tools for demos, tests and benchmarks.

Run it over stdio (``python -m workers.demo_server``) or streamable HTTP
(``python -m workers.demo_server --transport http --port 8765``).
"""

from __future__ import annotations

import argparse
import random
from functools import partial

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError

from workers.tuning import new_event_loop, tune_gc

# JSON-RPC "internal error": toolswarm classifies it as transient and retries.
TRANSIENT_ERROR_CODE = -32603


def build_server() -> MCPServer:
    server = MCPServer("toolswarm-demo", log_level="WARNING")
    sleeping = {"in_flight": 0, "peak": 0}  # what the server itself sees of concurrency

    @server.tool()
    async def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    async def add(a: float, b: float) -> float:
        """Return a + b."""
        return a + b

    @server.tool()
    async def sleep(ms: int) -> str:
        """Sleep for ms milliseconds, then say so."""
        sleeping["in_flight"] += 1
        sleeping["peak"] = max(sleeping["peak"], sleeping["in_flight"])
        try:
            await anyio.sleep(ms / 1000)
        finally:
            sleeping["in_flight"] -= 1
        return f"slept {ms}ms"

    @server.tool()
    async def stats(reset: bool = False) -> dict[str, int]:
        """Concurrent sleep calls: in flight now and the peak seen (since start or the last reset)."""
        seen = dict(sleeping)
        if reset:
            sleeping["peak"] = sleeping["in_flight"]
        return seen

    @server.tool()
    async def fail(message: str) -> str:
        """Always fail with a tool error carrying the message."""
        raise ToolError(message)

    @server.tool()
    async def flaky(fail_rate: float) -> str:
        """Fail transiently (a JSON-RPC internal error) with probability fail_rate."""
        if random.random() < fail_rate:
            raise MCPError(TRANSIENT_ERROR_CODE, f"transient failure (fail_rate={fail_rate})")
        return "ok"

    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="toolswarm-demo-server", description=__doc__)
    parser.add_argument("--transport", choices=["stdio", "http", "sse"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    server = build_server()
    # Its collector stopped this server for 1.6 s of a 34 s bench/fanout.py run (all 32 calls in
    # flight on hold); tuned like the workers', 0.2 s.
    tune_gc()
    if args.transport == "stdio":
        server.run("stdio")
        return
    # MCPServer.run() starts uvicorn inside anyio.run() on the stdlib loop, so uvicorn never gets
    # to pick uvloop itself: hand anyio the workers' loop (bench/fanout.py gained 0.01-0.02 in paired runs).
    if args.transport == "http":
        serve = partial(server.run_streamable_http_async, host=args.host, port=args.port)
    else:
        serve = partial(server.run_sse_async, host=args.host, port=args.port)
    anyio.run(serve, backend_options={"loop_factory": new_event_loop})


if __name__ == "__main__":
    main()
