"""How soon a job's reduce starts after its last item commits, and that it runs exactly once.

5,000 ``echo`` items of which 10% fail (the ``fail`` tool), with a reduce over the job summary,
on the demo server over HTTP with two workers; repeated ``--runs`` times. For each run: the time
from the last item's commit (its ``item.settled`` event) to the reduce's start (its record's
finish minus its duration), and whether the reduce settled once and ``job.completed`` was
appended once. The last line is ``fanin: reduce_delay_ms=X exactly_once=1`` (p50 over the runs;
exactly_once is 1 only if every run had one of each).

    python bench/fanin.py [--items 5000] [--runs 5] [--workers 2]
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

from cli.commands import open_store, submit  # noqa: E402
from cli.processes import free_port, stop_processes  # noqa: E402
from shared.embedded import EmbeddedRedis  # noqa: E402
from shared.settings import Settings, load_settings  # noqa: E402
from tests.harness import http_demo, make_cluster, start_demo_http  # noqa: E402

REDUCE = {
    "tool": "echo",
    "arguments": {
        "text": {
            "$from": "join(' ', [to_string(total), to_string(length(successful)), to_string(length(failed))])"
        }
    },
}


def item_line(i: int) -> dict[str, object]:
    """Every tenth item fails with a tool error."""
    if i % 10 == 9:
        return {"tool": "fail", "arguments": {"message": f"no {i}"}}
    return {"tool": "echo", "arguments": {"text": f"item {i}"}}


def one_run(settings: Settings, items_file: Path, reduce_file: Path, items: int) -> tuple[float, bool]:
    submitted = submit(settings, items_file, reduce_file=reduce_file, server="demo")

    async def measure() -> tuple[float, bool]:
        async with open_store(settings) as store:
            status = await store.wait_until_done(submitted.job_id)
            record = await store.reduce_record(submitted.job_id)
            assert record is not None and record.result is not None, status
            assert record.result.text() == f"{items} {items - items // 10} {items // 10}", record.result
            events = await store.client.xrange(store.keys.job(submitted.job_id).events)
            last_item_ms = max(
                int(entry_id.split("-")[0]) for entry_id, f in events if f["type"] == "item.settled"
            )
            kinds = [f["type"] for _, f in events]
            once = kinds.count("reduce.settled") == 1 and kinds.count("job.completed") == 1
            reduce_started_ms = record.finished_at_ms - record.duration_ms
            return reduce_started_ms - last_item_ms, once

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="toolswarm-bench-") as tmp:
        workdir = Path(tmp)
        redis = EmbeddedRedis(Settings(state_dir=tmp))
        redis_url = redis.start(publish=False)
        port = free_port()
        server = start_demo_http(port)
        cluster = make_cluster(
            workdir, redis_url, {"demo": {**http_demo(f"http://127.0.0.1:{port}/mcp"), "max_concurrency": 32}}
        )
        os.environ.update(cluster.env)
        settings = load_settings(cluster.config_file)
        items_file = workdir / "items.jsonl"
        items_file.write_text("".join(json.dumps(item_line(i)) + "\n" for i in range(args.items)))
        reduce_file = workdir / "reduce.json"
        reduce_file.write_text(json.dumps(REDUCE))
        delays: list[float] = []
        exactly_once = True
        try:
            cluster.start_workers(args.workers)
            for run in range(args.runs):
                started = time.perf_counter()
                delay, once = one_run(settings, items_file, reduce_file, args.items)
                delays.append(delay)
                exactly_once = exactly_once and once
                took = time.perf_counter() - started
                print(f"run {run + 1}: {took:.1f} s; reduce after last commit: {delay:.0f} ms; once={once}")
        finally:
            cluster.stop_workers()
            stop_processes([server], grace_s=5)
            redis.stop()
    print(
        f"reduce delay: p50 {statistics.median(delays):.0f} ms, max {max(delays):.0f} ms, {len(delays)} runs"
    )
    print(f"fanin: reduce_delay_ms={statistics.median(delays):.0f} exactly_once={int(exactly_once)}")


if __name__ == "__main__":
    main()
