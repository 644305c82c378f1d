"""Pipelines in the swarm against an agent chaining the same calls itself, in one run.

Each item is three steps on the demo MCP server over streamable HTTP: ``echo`` its text, ``echo``
the first step's text (a ``$from`` reference), then ``add`` two numbers from its input.
- direct: one asyncio process on persistent sessions makes the three calls of each item in
  sequence, ``concurrency`` items at once (what an agent doing its own chaining would do at best);
- swarm: toolswarm end to end, submit → workers → committed results, with every step but the last
  checkpointed to Redis under the item's epoch before the next starts.
Rounds alternate and medians are reported. ``checkpoint_ms_p50`` is the median time a step's
checkpoint took (from the step records). The last line is
``pipeline: swarm/direct=X.XX checkpoint_ms_p50=Y.YY``.

    python bench/pipeline.py [--items 1500] [--rounds 3] [--workers 2] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import fmt, run_like_a_worker  # noqa: E402
from cli.commands import open_store, submit  # noqa: E402
from cli.processes import free_port, stop_processes  # noqa: E402
from shared.committer import Checkpointer  # noqa: E402
from shared.embedded import EmbeddedRedis  # noqa: E402
from shared.mcp_client import build_client, http_client_for  # noqa: E402
from shared.models import StepRecord  # noqa: E402
from shared.settings import ServerConfig, Settings, WorkerSettings, load_settings  # noqa: E402
from shared.store import Checkpoint  # noqa: E402
from tests.harness import Cluster, http_demo, make_cluster, start_demo_http  # noqa: E402
from workers.tuning import tune_gc  # noqa: E402

PIPELINE = {
    "steps": [
        {"name": "first", "tool": "echo", "arguments": {"text": {"$from": "input.text"}}},
        {"name": "again", "tool": "echo", "arguments": {"text": {"$from": "steps.first.text"}}},
        {"name": "sum", "tool": "add", "arguments": {"a": {"$from": "input.n"}, "b": 1}},
    ]
}


async def direct(config: ServerConfig, items: int, concurrency: int, sessions: int) -> float:
    """The same three calls per item, chained by the caller on persistent sessions."""
    http = [http_client_for(config) for _ in range(sessions)]
    clients = [build_client(config, h) for h in http]
    entered = [await c.__aenter__() for c in clients]
    try:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            session = entered[i % sessions]
            async with semaphore:
                first = await session.call_tool("echo", {"text": f"item {i}"})
                text = first.content[0].text  # type: ignore[union-attr]
                again = await session.call_tool("echo", {"text": text})
                total = await session.call_tool("add", {"a": i, "b": 1})
                assert not (first.is_error or again.is_error or total.is_error)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(items)))
        return items / (time.perf_counter() - started)
    finally:
        for c in reversed(entered):
            await c.__aexit__(None, None, None)
        for h in http:
            await h.aclose()


def swarm(cluster: Cluster, settings: Settings, items: int, workdir: Path, checkpoints: list[float]) -> float:
    """Submit → workers → every item's three steps committed; timed from submit to job.completed."""
    items_file = workdir / f"items-{items}.jsonl"
    pipeline_file = workdir / "pipeline.json"
    pipeline_file.write_text(json.dumps(PIPELINE))
    if not items_file.exists():
        items_file.write_text(
            "".join(json.dumps({"input": {"text": f"item {i}", "n": i}}) + "\n" for i in range(items))
        )
    started = time.perf_counter()
    submitted = submit(settings, items_file, pipeline_file=pipeline_file, server="demo")

    async def wait() -> None:
        async with open_store(settings) as store:
            await store.wait_until_done(submitted.job_id)

    asyncio.run(wait())
    elapsed = time.perf_counter() - started

    async def read() -> None:
        async with open_store(settings) as store:
            status = await store.status(submitted.job_id)
            assert status.succeeded == items, status
            async for record in store.results(submitted.job_id):
                assert record.result is not None and record.result.text() == str(float(record.index + 1))
                checkpoints.extend(s.checkpoint_ms for s in record.steps or [] if s.checkpoint_ms is not None)

    asyncio.run(read())
    return items / elapsed


async def idle_checkpoint_ms(settings: Settings, samples: int = 500) -> float:
    """p50 of a checkpoint with nothing else running: the script call alone, for scale."""
    async with open_store(settings) as store:
        checkpointer = Checkpointer(store)
        job_id = "bench-idle-checkpoints"
        await store.client.hset(store.keys.job(job_id).epochs, mapping={str(i): 1 for i in range(samples)})
        record = StepRecord(
            name="first", server="demo", tool="echo", status="succeeded", output={"text": "x"}
        )
        timings = []
        for i in range(samples):
            began = time.perf_counter()
            assert await checkpointer.checkpoint(Checkpoint(job_id, i, 1, record))
            timings.append((time.perf_counter() - began) * 1000)
        await store.client.delete(*store.keys.job(job_id).all())
        return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=WorkerSettings().chunk_size)
    args = parser.parse_args()

    tune_gc()
    with tempfile.TemporaryDirectory(prefix="toolswarm-bench-") as tmp:
        workdir = Path(tmp)
        redis = EmbeddedRedis(Settings(state_dir=tmp))
        redis_url = redis.start(publish=False)
        port = free_port()
        server = start_demo_http(port)
        per_worker = max(1, args.concurrency // args.workers)
        cluster = make_cluster(
            workdir,
            redis_url,
            {
                "demo": {
                    **http_demo(f"http://127.0.0.1:{port}/mcp"),
                    "max_concurrency": args.concurrency,
                    "pool_size": 1,
                }
            },
            extra=f"[worker]\ncalls_in_flight = {per_worker}\nchunk_size = {args.chunk_size}\n",
        )
        os.environ.update(cluster.env)
        settings = load_settings(cluster.config_file)
        config = settings.servers["demo"]
        checkpoints: list[float] = []
        try:
            cluster.start_workers(args.workers)
            swarm(cluster, settings, 200, workdir, [])  # warm-up: open every worker's sessions
            run_like_a_worker(direct(config, 200, args.concurrency, args.workers))
            direct_rates, swarm_rates = [], []
            for _ in range(args.rounds):
                direct_rates.append(
                    run_like_a_worker(direct(config, args.items, args.concurrency, args.workers))
                )
                swarm_rates.append(swarm(cluster, settings, args.items, workdir, checkpoints))
            idle = run_like_a_worker(idle_checkpoint_ms(settings))
        finally:
            cluster.stop_workers()
            stop_processes([server], grace_s=5)
            redis.stop()
    d, s = statistics.median(direct_rates), statistics.median(swarm_rates)
    p50 = statistics.median(checkpoints)
    p99 = statistics.quantiles(checkpoints, n=100)[98]
    print(f"direct (3 chained calls per item, c={args.concurrency}): {d:8.1f} items/s  {fmt(direct_rates)}")
    print(f"swarm  ({args.workers} workers, submit→committed):    {s:8.1f} items/s  {fmt(swarm_rates)}")
    print(
        f"checkpoints: {len(checkpoints)} timed, p50 {p50:.2f} ms, p99 {p99:.2f} ms; "
        f"one at a time on an idle loop, p50 {idle:.2f} ms"
    )
    print(f"pipeline: swarm/direct={s / d:.2f} checkpoint_ms_p50={p50:.2f}")


if __name__ == "__main__":
    main()
