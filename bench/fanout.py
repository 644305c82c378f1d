"""Fan-out at a cluster-wide limit: a sleep(200 ms) tool with max_concurrency = 32 should run
near 32 / 0.2 s = 160 items/s however many workers want more.

The demo MCP server over streamable HTTP reports the peak concurrency it saw itself, which must
not exceed the limit. For scale, a direct client (one process, ``--limit`` calls in flight on
persistent sessions, no toolswarm; as in bench/throughput.py) runs the same items first: the
machine's own ceiling at the time. Last line: ``fanout: efficiency=X.XX`` (toolswarm's
measured / ideal items/s).

    python bench/fanout.py [--items 4800] [--workers 3] [--limit 32] [--sleep-ms 200] [--no-direct]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcp import Client

from bench.throughput import direct, run_like_a_worker
from cli.commands import submit
from shared.embedded import EmbeddedRedis
from shared.settings import ServerConfig, Settings
from tests.harness import demo_http_server, http_demo, make_cluster
from workers.tuning import tune_gc


async def peak(url: str, reset: bool) -> int:
    async with Client(url, read_timeout_seconds=10) as client:
        result = await client.call_tool("stats", {"reset": reset})
        stats: dict[str, Any] = result.structured_content or {}
        return int(stats.get("result", stats)["peak"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=4800)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--sleep-ms", type=int, default=200)
    parser.add_argument("--no-direct", action="store_true", help="skip the direct client's run")
    args = parser.parse_args()
    ideal = args.limit / (args.sleep_ms / 1000)
    arguments = {"ms": args.sleep_ms}
    direct_rate: float | None = None
    tune_gc()  # the direct client runs in this process: like a worker

    with tempfile.TemporaryDirectory(prefix="toolswarm-fanout-") as tmp:
        workdir = Path(tmp)
        redis = EmbeddedRedis(Settings(state_dir=tmp))
        redis_url = redis.start(publish=False)
        try:
            with demo_http_server() as url:
                if not args.no_direct:
                    direct_rate = run_like_a_worker(
                        direct(
                            ServerConfig(transport="http", url=url),
                            args.items,
                            args.limit,
                            1,
                            lambda i: ("sleep", arguments),
                        )
                    )
                cluster = make_cluster(
                    workdir,
                    redis_url,
                    {"demo": http_demo(url, max_concurrency=args.limit, timeout_s=30)},
                    # Every worker could run twice the limit by itself; chunking stays at its defaults.
                    extra="[worker]\ncalls_in_flight = 64\n",
                )
                try:
                    cluster.start_workers(args.workers)
                    items = workdir / "items.jsonl"
                    line = json.dumps({"tool": "sleep", "arguments": arguments}) + "\n"
                    items.write_text(line * args.items)
                    asyncio.run(peak(url, reset=True))
                    settings = cluster.settings
                    started = time.perf_counter()
                    job_id = submit(settings, items, server="demo").job_id
                    status = cluster.wait_for_job(job_id, timeout=600)
                    elapsed = time.perf_counter() - started
                    server_peak = asyncio.run(peak(url, reset=False))
                finally:
                    cluster.stop_workers()
        finally:
            redis.stop()

    rate = status.succeeded / elapsed
    if direct_rate is not None:
        print(
            f"direct client ({args.limit} calls in flight, one session, no toolswarm): "
            f"{direct_rate:.1f} items/s, efficiency {direct_rate / ideal:.2f}"
        )
    print(f"{args.workers} workers able to run {args.workers * 64} calls; max_concurrency = {args.limit}")
    print(f"{status.succeeded}/{status.total} succeeded in {elapsed:.1f} s (submit → last commit)")
    print(
        f"measured {rate:.1f} items/s; ideal {ideal:.1f} items/s; server's own peak concurrency {server_peak}"
    )
    print(f"fanout: efficiency={rate / ideal:.2f}")


if __name__ == "__main__":
    main()
