"""The demo MCP server: a handful of tools for demos, tests and benchmarks.

Run it over stdio (``python -m workers.demo_server``) or streamable HTTP
(``python -m workers.demo_server --transport http --port 8765``). With ``--record FILE`` it
appends a line per call of its recorded tools (``{"tool", "key", "at"}``, ``key`` being the
toolswarm idempotency key from the request's ``_meta``): an outside record of what was called.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from functools import partial
from typing import Any

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError

from workers.tuning import new_event_loop, tune_gc

# JSON-RPC "internal error": toolswarm classifies it as transient and retries.
TRANSIENT_ERROR_CODE = -32603


IDEMPOTENCY_META_KEY = "io.toolswarm/idempotency-key"
WORDS = [
    "swarm",
    "tool",
    "call",
    "lease",
    "epoch",
    "fence",
    "commit",
    "queue",
    "worker",
    "server",
    "chunk",
    "step",
    "pipeline",
]
SCORE_FAILS_EVERY = 7  # score refuses documents whose word count is a multiple of this


def document(doc_id: int) -> str:
    """A generated document: the same text for the same id, a few sentences of a few words."""
    seed = int(hashlib.sha256(str(doc_id).encode()).hexdigest()[:8], 16)
    picker = random.Random(seed)
    sentences = [
        " ".join(picker.choice(WORDS) for _ in range(picker.randint(3, 9))).capitalize() + "."
        for _ in range(picker.randint(1, 5))
    ]
    return f"Document {doc_id}. " + " ".join(sentences)


class CallRecord:
    """Appends one JSON line per recorded call to a file (O_APPEND: many servers can share it)."""

    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None

    def __call__(self, ctx: Context, tool: str) -> None:
        if self.fd is None:
            return
        meta: Any = ctx.request_context.meta or {}
        line = json.dumps({"tool": tool, "key": meta.get(IDEMPOTENCY_META_KEY), "at": time.time()})
        os.write(self.fd, (line + "\n").encode())


def build_server(record_path: str | None = None) -> MCPServer:
    server = MCPServer("toolswarm-demo", log_level="WARNING")
    sleeping = {"in_flight": 0, "peak": 0}  # what the server itself sees of concurrency
    record = CallRecord(record_path)

    @server.tool()
    async def echo(text: str, ctx: Context) -> str:
        """Return the text unchanged."""
        record(ctx, "echo")
        return text

    @server.tool()
    async def add(a: float, b: float, ctx: Context) -> float:
        """Return a + b."""
        record(ctx, "add")
        return a + b

    @server.tool()
    async def fetch(doc_id: int, ctx: Context) -> str:
        """The text of a (generated) document; ids below 0 do not exist."""
        record(ctx, "fetch")
        if doc_id < 0:
            raise ToolError(f"no document {doc_id}")
        return document(doc_id)

    @server.tool()
    async def parse(text: str, ctx: Context) -> dict[str, Any]:
        """Split a document into its title and counts of words and sentences."""
        record(ctx, "parse")
        title, _, body = text.partition(". ")
        return {"title": title, "words": len(text.split()), "sentences": max(1, body.count("."))}

    @server.tool()
    async def score(words: int, sentences: int, ctx: Context) -> dict[str, float]:
        """A readability score (words per sentence); fails for word counts that are a multiple of 7."""
        record(ctx, "score")
        if words % SCORE_FAILS_EVERY == 0:
            raise ToolError(f"scoring model refused a document of {words} words")
        return {"score": round(words / sentences, 2)}

    @server.tool()
    async def sleep(ms: int, ctx: Context) -> str:
        """Sleep for ms milliseconds, then say so."""
        record(ctx, "sleep")
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


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolswarm-demo-server", description=__doc__)
    parser.add_argument("--transport", choices=["stdio", "http", "sse"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--record", metavar="FILE", help="Append a line per call to FILE.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    server = build_server(args.record)
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
