"""The HTTP API end to end: a real uvicorn server, real workers, real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from cli.processes import free_port, stop_processes, wait_for_port
from shared.context import RedisContextStore, ToolCallRecord
from shared.store import JobStore
from tests.harness import Cluster, make_cluster, stdio_demo, wait_until

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"


@pytest.fixture
def api(
    redis_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> Iterator[tuple[Cluster, httpx2.Client]]:
    cluster = make_cluster(tmp_path, redis_url, {"demo": stdio_demo()})
    cluster.env["TOOLSWARM_API_TOKEN"] = TOKEN
    stop_workers.append(cluster)
    cluster.start_workers(2)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--port", str(port), "--max-body-mb", "1"],
        env=cluster.env,
        cwd=tmp_path,
    )
    try:
        wait_for_port(port, 30, server)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
            yield cluster, client
    finally:
        stop_processes([server], grace_s=5)


def wait_done(client: httpx2.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return status if status["state"] in ("finished", "cancelled") else None

    found: dict[str, Any] = wait_until(done, timeout, f"job {job_id} done")
    return found


def echo_job(count: int) -> dict[str, Any]:
    items: list[dict[str, Any]] = [{"arguments": {"text": f"t{i}"}} for i in range(count)]
    items[3] = {"tool": "fail", "arguments": {"message": "nope"}}
    return {"server": "demo", "tool": "echo", "items": items}


def test_submit_follow_page_and_resume(api: tuple[Cluster, httpx2.Client]) -> None:
    _, client = api
    created = client.post("/v1/jobs", json=echo_job(50), headers={"Idempotency-Key": "k-1"})
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    again = client.post("/v1/jobs", json=echo_job(50), headers={"Idempotency-Key": "k-1"})
    assert again.json() == {"job_id": job_id, "total": 50, "existing": True}

    # Server-sent events until job.completed.
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        messages = parse_sse(stream.iter_lines())
    kinds = [m["event"] for m in messages]
    assert kinds[-1] == "job.completed" and kinds.count("item.settled") == 50
    status = wait_done(client, job_id)
    assert status["succeeded"] == 49 and status["failed"] == 1

    # Resumable: after the 10th event, only what follows it.
    resumed_from = messages[9]["id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": resumed_from}) as stream:
        resumed = parse_sse(stream.iter_lines())
    assert [m["id"] for m in resumed] == [m["id"] for m in messages[10:]]

    # Cursor pagination over every result, then a status filter.
    seen, cursor, pages = [], None, 0
    while True:
        page = client.get(
            f"/v1/jobs/{job_id}/results", params={"limit": 20, **({"cursor": cursor} if cursor else {})}
        )
        body = page.json()
        seen += [r["index"] for r in body["results"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(50)) and pages == 3
    failed = client.get(f"/v1/jobs/{job_id}/results", params={"status": "failed"}).json()["results"]
    assert [r["index"] for r in failed] == [3] and failed[0]["error"]["type"] == "tool_error"


def parse_sse(lines: Iterator[str]) -> list[dict[str, Any]]:
    messages, current = [], {}
    for line in lines:
        if not line:
            if current:
                messages.append(current)
                current = {}
            continue
        field, _, value = line.partition(": ")
        current[field] = json.loads(value) if field == "data" else value
    if current:
        messages.append(current)
    return messages


def test_cancel_servers_health_and_openapi(api: tuple[Cluster, httpx2.Client]) -> None:
    _, client = api
    job = {"server": "demo", "items": [{"tool": "sleep", "arguments": {"ms": 300}} for _ in range(300)]}
    job_id = client.post("/v1/jobs", json=job).json()["job_id"]
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert client.post("/v1/jobs/nope/cancel").status_code == 404
    assert client.get("/v1/jobs/nope").status_code == 404
    assert [s["name"] for s in client.get("/v1/servers").json()] == ["demo"]
    assert client.get("/healthz").json() == {"ok": True}
    assert client.get("/readyz").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/results", "/v1/jobs/{job_id}/events"} <= set(
        paths
    )


def test_auth(api: tuple[Cluster, httpx2.Client]) -> None:
    _, client = api
    url = str(client.base_url)
    with httpx2.Client(base_url=url, timeout=10) as anonymous:
        assert anonymous.get("/v1/servers").status_code == 401
        assert anonymous.get("/v1/servers", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anonymous.get("/v1/servers", headers={"Authorization": TOKEN}).status_code == 401
        assert anonymous.post("/v1/jobs", json=echo_job(5)).status_code == 401
        assert anonymous.get("/healthz").status_code == 200
    assert client.get("/v1/servers").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "where"),
    [
        (b"{not json", 422, None),
        (b'{"items": "x", "server": "demo"}', 422, ["body", "items"]),
        (b'{"items": [], "server": "demo"}', 422, ["body", "items"]),
        (
            b'{"items": [{"tool": "echo", "arguments": [1]}], "server": "demo"}',
            422,
            ["body", "items", 0, "arguments"],
        ),
        (b'{"items": [{"arguments": {}}], "server": "demo"}', 422, ["body", "items", 0, "tool"]),
        (b'{"items": [{"tool": "echo"}], "server": "demo", "colour": 1}', 422, ["body", "colour"]),
        (b'{"items": [{"tool": "echo"}], "server": "mystery"}', 422, None),
        (b'{"items": [{"tool": "echo"}], "server": "demo", "chunk_size": 0}', 422, ["body", "chunk_size"]),
        (b"[]", 422, None),
    ],
)
def test_bad_bodies_get_422_with_field_paths(
    api: tuple[Cluster, httpx2.Client], body: bytes, status: int, where: list[Any] | None
) -> None:
    cluster, client = api
    response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    detail = response.json()
    if where is not None:
        locations = [e["loc"] for e in detail.get("errors", detail.get("detail", []))]
        assert any(loc[: len(where)] == where for loc in locations), detail

    async def jobs(store: Any) -> int:
        return int(await store.client.zcard(store.keys.jobs))

    assert cluster.run(cluster.with_store(jobs)) == 0, "nothing was submitted"


def test_oversized_body_is_413(api: tuple[Cluster, httpx2.Client]) -> None:
    _, client = api
    big = {
        "server": "demo",
        "items": [{"tool": "echo", "arguments": {"text": "x" * 1000}} for _ in range(2000)],
    }
    assert client.post("/v1/jobs", json=big).status_code == 413

    def chunks() -> Iterator[bytes]:
        yield b'{"server": "demo", "items": ['
        for _ in range(3000):
            yield b'{"tool": "echo", "arguments": {"text": "' + b"y" * 500 + b'"}},'
        yield b'{"tool": "echo"}]}'

    assert (
        client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}).status_code
        == 413
    )


def test_pipelines_through_the_api(api: tuple[Cluster, httpx2.Client]) -> None:
    _, client = api
    pipeline = {
        "steps": [
            {"name": "say", "tool": "echo", "arguments": {"text": {"$from": "input.word"}}},
            {"name": "shout", "tool": "fail", "arguments": {"message": {"$from": "steps.say.text"}}},
        ]
    }
    body = {"server": "demo", "pipeline": pipeline, "items": [{"input": {"word": w}} for w in ("a", "b")]}
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    status = wait_done(client, job_id)
    assert status["failed"] == 2
    assert status["failures"] == [{"step": "shout", "error_type": "tool_error", "count": 2}]
    page = client.get(f"/v1/jobs/{job_id}/results", params={"step": "shout"}).json()
    assert [r["error"]["message"] for r in page["results"]] == [
        f"Error executing tool fail: {w}" for w in "ab"
    ]
    assert [r["error"]["context"]["completed_steps"] for r in page["results"]] == [["say"], ["say"]]
    assert client.get(f"/v1/jobs/{job_id}/results", params={"step": "say"}).json()["results"] == []

    own_steps = {
        "server": "demo",
        "items": [{"steps": [{"name": "x", "tool": "echo", "arguments": {"text": "hi"}}]}],
    }
    created = client.post("/v1/jobs", json=own_steps)
    assert created.status_code == 201, created.text
    assert wait_done(client, created.json()["job_id"])["succeeded"] == 1

    bad = {**body, "pipeline": {"steps": [*pipeline["steps"], pipeline["steps"][0]]}}
    refused = client.post("/v1/jobs", json=bad)
    assert refused.status_code == 422 and "duplicate step name" in refused.text
    twice = {"name": "x", "tool": "echo", "arguments": {"text": "hi"}}
    refused = client.post(
        "/v1/jobs", json={"server": "demo", "items": [{"tool": "echo"}, {"steps": [twice, twice]}]}
    )
    assert refused.status_code == 422
    [error] = refused.json()["errors"]
    assert error["loc"] == ["body", "items", 1] and "step 'x': duplicate step name" in error["msg"]
    unknown = {**body, "pipeline": {"steps": [{"name": "x", "tool": "nope"}]}}
    refused = client.post("/v1/jobs", json=unknown)
    assert refused.status_code == 422 and "pipeline: step 'x': unknown tool 'nope'" in refused.text

    first = {"key": "first", "tool": "echo", "arguments": {"text": "one"}}
    then = {
        "key": "then",
        "needs": ["first"],
        "steps": [{"name": "again", "tool": "echo", "arguments": {"text": {"$from": 'needs."first".text'}}}],
    }
    created = client.post("/v1/jobs", json={"server": "demo", "items": [then, first]})
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    assert wait_done(client, job_id)["succeeded"] == 2
    results = client.get(f"/v1/jobs/{job_id}/results").json()["results"]
    assert results[0]["steps"][0]["output"]["text"] == "one"
    lonely = {"key": "lonely", "tool": "echo", "arguments": {"text": "x"}, "needs": ["nobody"]}
    refused = client.post("/v1/jobs", json={"server": "demo", "items": [lonely]})
    assert (
        refused.status_code == 422
        and "needs 'nobody', which no item of the job has as its key" in refused.text
    )


def test_reduce_and_retry_through_the_api(api: tuple[Cluster, httpx2.Client]) -> None:
    _, client = api
    reduce = {"tool": "echo", "arguments": {"text": {"$from": "to_string(length(failed))"}}}
    body = {**echo_job(10), "reduce": reduce}
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    status = wait_done(client, job_id)
    assert status["reduce"]["status"] == "succeeded" and status["failed"] == 1
    record = client.get(f"/v1/jobs/{job_id}/reduce").json()
    assert record["result"]["content"][0]["text"] == "1"

    again = client.post(f"/v1/jobs/{job_id}/retry", params={"error_type": "tool_error"})
    assert again.status_code == 201, again.text
    assert again.json()["total"] == 1
    retried = wait_done(client, again.json()["job_id"])
    assert retried["retry_of"] == job_id and retried["reduce"]["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{job_id}").json()["retried_by"] == again.json()["job_id"]
    assert client.post(f"/v1/jobs/{job_id}/retry", params={"step": "nope"}).status_code == 422

    bad = client.post(
        "/v1/jobs",
        json={**echo_job(4), "reduce": {"tool": "echo", "arguments": {"text": {"$from": "steps.x"}}}},
    )
    assert bad.status_code == 422 and "not in scope (use total, successful or failed)" in bad.text


def test_list_jobs_newest_first_with_a_cursor_and_a_state_filter(api: tuple[Cluster, httpx2.Client]) -> None:
    _, client = api
    finished = []
    for _ in range(3):
        created = client.post("/v1/jobs", json=echo_job(4))
        assert created.status_code == 201, created.text
        finished.append(wait_done(client, created.json()["job_id"]))
    slow = {"server": "demo", "items": [{"tool": "sleep", "arguments": {"ms": 300}} for _ in range(50)]}
    cancelled_id = client.post("/v1/jobs", json=slow).json()["job_id"]
    cancelled = client.post(f"/v1/jobs/{cancelled_id}/cancel").json()
    # Newest first: by creation time, then (within one millisecond) by id, as the jobs index sorts.
    by_creation = sorted([*finished, cancelled], key=lambda j: (j["created_at_ms"], j["job_id"]))
    newest_first = [job["job_id"] for job in reversed(by_creation)]

    whole = client.get("/v1/jobs").json()
    assert [j["job_id"] for j in whole["jobs"]] == newest_first and whole["next_cursor"] is None
    assert whole["jobs"][newest_first.index(cancelled_id)]["state"] == "cancelled"

    for limit in (1, 3):
        seen, cursor, pages = [], None, 0
        while True:
            params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
            body = client.get("/v1/jobs", params=params).json()
            assert len(body["jobs"]) <= limit
            seen += [j["job_id"] for j in body["jobs"]]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == newest_first and pages == -(-4 // limit)

    only = client.get("/v1/jobs", params={"state": "cancelled"}).json()
    assert [j["job_id"] for j in only["jobs"]] == [cancelled_id]
    finished_ids = [j for j in newest_first if j != cancelled_id]
    page = client.get("/v1/jobs", params={"state": "finished", "limit": 2}).json()
    assert [j["job_id"] for j in page["jobs"]] == finished_ids[:2]
    rest = client.get("/v1/jobs", params={"state": "finished", "cursor": page["next_cursor"]}).json()
    assert [j["job_id"] for j in rest["jobs"]] == finished_ids[2:] and rest["next_cursor"] is None
    assert client.get("/v1/jobs", params={"state": "running"}).json()["jobs"] == []

    for bad in ({"cursor": "nope"}, {"cursor": "12:"}, {"state": "done"}, {"limit": 0}):
        assert client.get("/v1/jobs", params=bad).status_code == 422, bad


def test_context_routes(api: tuple[Cluster, httpx2.Client]) -> None:
    cluster, client = api
    session = str(uuid.uuid4())

    async def append(store: JobStore) -> None:
        contexts = RedisContextStore(store.client, store.keys)
        await contexts.append(session, ToolCallRecord(tool="echo", server="demo", arguments={"text": "hi"}))

    cluster.run(cluster.with_store(append))
    found = client.get(f"/v1/context/{session}")
    assert found.status_code == 200 and found.json()["window"][0]["tool"] == "echo"
    assert client.delete(f"/v1/context/{session}").json() == {"cleared": True}
    assert client.get(f"/v1/context/{session}").status_code == 404
    assert client.delete(f"/v1/context/{session}").json() == {"cleared": False}
    refused = client.get("/v1/context/a:b")
    assert refused.status_code == 422 and "invalid session id" in refused.json()["detail"]
