"""Dependencies between items: an item starts only after its needs succeeded, and sees their outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.models import ResultRecord
from shared.store import JobStore
from tests.harness import Cluster, make_cluster, stdio_demo
from tests.integration.test_pipelines import step_starts

pytestmark = pytest.mark.integration


def diamond(n: int, failing: bool = False) -> list[dict[str, Any]]:
    """A → B, A → C, B + C → D; D's text joins B's and C's outputs."""
    a: dict[str, Any] = {
        "key": f"a{n}",
        "tool": "fail" if failing else "echo",
        "arguments": {"message": "a failed"} if failing else {"text": f"A{n}"},
    }
    b = {
        "key": f"b{n}",
        "needs": [f"a{n}"],
        "tool": "echo",
        "arguments": {"text": {"$from": f"join('-', [needs.\"a{n}\".text, 'B'])"}},
    }
    c = {
        "key": f"c{n}",
        "needs": [f"a{n}"],
        "tool": "echo",
        "arguments": {"text": {"$from": f"join('-', [needs.\"a{n}\".text, 'C'])"}},
    }
    d = {
        "key": f"d{n}",
        "needs": [f"b{n}", f"c{n}"],
        "tool": "echo",
        "arguments": {"text": {"$from": f'join(\'+\', [needs."b{n}".text, needs."c{n}".text])'}},
    }
    return [d, c, b, a]  # dependents first: order in the file does not matter


def test_a_hundred_diamonds_run_in_order_and_see_their_needs(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    record_file = tmp_path / "calls.jsonl"
    cluster = make_cluster(
        tmp_path,
        redis_url,
        {
            "demo": stdio_demo(
                args=["-m", "workers.demo_server", "--record", str(record_file)], max_concurrency=64
            )
        },
        extra="[worker]\nchunk_size = 10\n",
    )
    stop_workers.append(cluster)
    cluster.start_workers(2)
    items = [item for n in range(100) for item in diamond(n, failing=n % 10 == 9)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    out = cluster.cli("submit", "items.jsonl", "--server", "demo", "--json")
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job_id"]
    status = cluster.wait_for_job(job_id, timeout=120)
    assert (status.succeeded, status.failed) == (360, 40)
    records = {
        r.key: r
        for r in (
            ResultRecord.model_validate_json(line)
            for line in cluster.cli("results", job_id).stdout.splitlines()
        )
    }

    calls = step_starts(record_file, job_id)

    async def commits(store: JobStore) -> dict[int, int]:
        entries = await store.client.xrange(store.keys.job(job_id).events)
        return {int(f["index"]): int(i.split("-")[0]) for i, f in entries if f["type"] == "item.settled"}

    settled_ms: dict[int, int] = cluster.run(cluster.with_store(commits))
    index_of = {item["key"]: position for position, item in enumerate(items)}
    for n in range(100):
        d = records[f"d{n}"]
        if n % 10 == 9:
            assert records[f"a{n}"].error is not None and records[f"a{n}"].error.type == "tool_error"
            for key in (f"b{n}", f"c{n}", f"d{n}"):
                assert records[key].error is not None and records[key].error.type == "dependency_failed"
                assert index_of[key] not in calls, f"{key} was called"
            assert d.error is not None and f"need 'b{n}'" in d.error.message
            continue
        assert d.result is not None and d.result.text() == f"A{n}-B+A{n}-C"
        # The server's own record of call starts against the commits of the needs (their
        # item.settled events): no item was called before its needs had settled.
        start = {
            key: min(calls[index_of[key]]["call"]) * 1000 for key in (f"a{n}", f"b{n}", f"c{n}", f"d{n}")
        }
        done = {key: settled_ms[index_of[key]] for key in start}
        assert start[f"b{n}"] >= done[f"a{n}"] - 1 and start[f"c{n}"] >= done[f"a{n}"] - 1
        assert start[f"d{n}"] >= max(done[f"b{n}"], done[f"c{n}"]) - 1


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        pytest.param(
            [
                {"key": "a", "needs": ["b"], "tool": "echo", "arguments": {"text": "x"}},
                {"key": "b", "needs": ["a"], "tool": "echo", "arguments": {"text": "x"}},
            ],
            "a cycle of needs: line",
            id="cycle",
        ),
        pytest.param(
            [{"key": "a", "needs": ["zz"], "tool": "echo", "arguments": {"text": "x"}}],
            "line 1: needs 'zz', which no item of the job has as its key",
            id="unknown",
        ),
        pytest.param(
            [
                {"key": "a", "tool": "echo", "arguments": {"text": "x"}},
                {"key": "a", "tool": "echo", "arguments": {"text": "y"}},
                {"needs": ["a"], "tool": "echo", "arguments": {"text": "z"}},
            ],
            "line 3: needs 'a', which several items have as their key (line 1, line 2)",
            id="duplicate",
        ),
        pytest.param(
            [
                {"key": "a", "tool": "echo", "arguments": {"text": "x"}},
                {"needs": ["a"], "tool": "echo", "arguments": {"text": {"$from": "needs.b.text"}}},
            ],
            "refers to 'b', which the item does not need",
            id="ref-to-a-non-need",
        ),
    ],
)
def test_bad_needs_are_refused_at_submit(
    redis_url: str, tmp_path: Path, lines: list[dict[str, Any]], fragment: str
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo()})
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in lines))
    out = cluster.cli("submit", "items.jsonl", "--server", "demo")
    assert out.returncode == 1 and fragment in out.stderr, out.stderr


def test_retry_takes_items_with_needs_only_with_their_needs(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo()})
    stop_workers.append(cluster)
    cluster.start_workers(1)
    items = [
        {"key": "a", "tool": "fail", "arguments": {"message": "a failed"}},
        {"key": "b", "needs": ["a"], "tool": "echo", "arguments": {"text": {"$from": "needs.a.text"}}},
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    job_id = json.loads(cluster.cli("submit", "items.jsonl", "--server", "demo", "--json").stdout)["job_id"]
    assert cluster.wait_for_job(job_id, timeout=60).failed == 2

    alone = cluster.cli("retry", job_id, "--error-type", "dependency_failed")
    assert alone.returncode == 1 and "'b' needs 'a'" in alone.stderr, alone.stderr
    both = cluster.cli("retry", job_id, "--json")
    assert both.returncode == 0, both.stderr
    again = json.loads(both.stdout)["job_id"]
    status = cluster.wait_for_job(again, timeout=60)
    assert (status.total, status.failed) == (2, 2)
    assert {(f.step, f.error_type) for f in status.failures} == {
        ("call", "tool_error"),
        ("call", "dependency_failed"),
    }
