"""The dashboard at /ui/ in a real browser (Debian's Chromium, driven by Playwright) over a real API,
real workers and real Redis.

``TOOLSWARM_DASHBOARD_SCREENSHOT=PATH`` saves the finished job's page there (docs/dashboard-job.png).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from cli.processes import free_port, stop_processes, wait_for_port
from tests.harness import Cluster, make_cluster, stdio_demo, wait_until

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dash-token"
MARKUP = "<img src=x data-injected=1>"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


@dataclass
class Swarm:
    cluster: Cluster
    port: int
    client: httpx2.Client
    api: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_api(self) -> None:
        self.api = subprocess.Popen(
            [sys.executable, "-m", "cli", "api", "--port", str(self.port)],
            env=self.cluster.env,
            cwd=self.cluster.config_file.parent,
        )
        wait_for_port(self.port, 30, self.api)

    def kill_api(self) -> None:
        if self.api is not None:
            self.api.kill()
            self.api.wait(10)


@pytest.fixture(scope="module")
def swarm(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """One cluster for the module (2 workers, the API with a token): each test makes its own jobs."""
    cluster = make_cluster(tmp_path_factory.mktemp("dashboard"), redis_url, {"demo": stdio_demo()})
    cluster.env["TOOLSWARM_API_TOKEN"] = TOKEN
    port = free_port()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
        swarm = Swarm(cluster, port, client)
        try:
            cluster.start_workers(2)
            swarm.start_api()
            yield swarm
        finally:
            if swarm.api is not None:
                stop_processes([swarm.api], grace_s=5)
            cluster.stop_workers()


@pytest.fixture(scope="module")
def browser(swarm: Swarm) -> Iterator[Browser]:
    # After the swarm: Playwright's sync API keeps an event loop running on this thread, where the
    # harness's asyncio.run() would then refuse to start.
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser, swarm: Swarm) -> Iterator[Page]:
    """A fresh tab (its own sessionStorage, so no token yet)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=swarm.url)
    context.set_default_timeout(15_000)
    errors: list[str] = []
    try:
        tab = context.new_page()
        tab.on("pageerror", lambda error: errors.append(str(error)))
        yield tab
    finally:
        context.close()
    assert errors == [], "the page threw"


def sign_in(page: Page, token: str = TOKEN) -> None:
    page.get_by_test_id("token-input").fill(token)
    page.get_by_test_id("token-submit").click()


def echo_job(count: int, fails: tuple[int, ...]) -> dict[str, Any]:
    items: list[dict[str, Any]] = [{"arguments": {"text": f"t{i}"}, "key": f"k{i}"} for i in range(count)]
    for i in fails:
        items[i] = {"tool": "fail", "arguments": {"message": f"nope {i}"}, "key": f"k{i}"}
    items[-1]["arguments"]["text"] = MARKUP  # shown as text, never parsed
    return {"server": "demo", "tool": "echo", "items": items}


def test_token_is_asked_once_and_a_wrong_one_is_refused(page: Page, swarm: Swarm) -> None:
    page.goto("/ui")  # redirected to /ui/
    assert page.url.endswith("/ui/#/jobs")
    expect(page.get_by_test_id("token-form")).to_be_visible()
    expect(page.get_by_test_id("token-error")).to_have_count(0)

    sign_in(page, "wrong")
    expect(page.get_by_test_id("token-error")).to_be_visible()
    expect(page.get_by_test_id("token-form")).to_be_visible()
    expect(page.get_by_test_id("jobs-table")).to_have_count(0)

    sign_in(page)
    expect(page.get_by_test_id("jobs-table")).to_be_visible()
    # Kept for the tab: other pages and a reload do not ask again.
    page.get_by_test_id("nav-servers").click()
    expect(page.get_by_test_id("servers-table")).to_be_visible()
    page.reload()
    expect(page.get_by_test_id("servers-table")).to_be_visible()
    expect(page.get_by_test_id("token-form")).to_have_count(0)


def test_servers_page_shows_the_server_and_the_workers(page: Page, swarm: Swarm) -> None:
    page.goto("/ui/#/servers")
    sign_in(page)
    row = page.locator('[data-testid="server-row"][data-server="demo"]')
    expect(row).to_be_visible()
    expect(row.get_by_test_id("in-flight")).to_contain_text("/ 16")
    expect(row).to_have_attribute("data-health", "healthy")
    expect(page.get_by_test_id("worker-count")).to_have_text("2")
    expect(page.get_by_test_id("worker-row")).to_have_count(2)


def test_job_progress_failures_and_retry(page: Page, swarm: Swarm) -> None:
    client = swarm.client
    created = client.post("/v1/jobs", json=echo_job(60, fails=(3, 17, 42)))
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]

    page.goto("/ui/")
    sign_in(page)
    row = page.locator(f'[data-testid="job-row"][data-job-id="{job_id}"]')
    expect(row).to_be_visible()
    assert page.get_by_test_id("job-row").first.get_attribute("data-job-id") == job_id, "newest first"

    row.get_by_test_id("job-link").click()
    expect(page.get_by_test_id("job-id")).to_have_text(job_id)
    progress = page.get_by_test_id("progress")
    expect(progress).to_have_text("100%", timeout=30_000)
    expect(progress).to_have_attribute("aria-valuenow", "100")
    expect(page.get_by_test_id("job-state")).to_have_text("finished")
    expect(page.get_by_test_id("count-succeeded")).to_contain_text("57")
    expect(page.get_by_test_id("count-failed")).to_contain_text("3")

    group = page.locator('[data-testid="failure-group"][data-error-type="tool_error"][data-step="call"]')
    expect(group).to_have_attribute("data-count", "3")
    expect(group.get_by_test_id("failure-samples")).to_contain_text("nope 3")

    expect(page.get_by_test_id("result-row")).to_have_count(50)
    page.get_by_test_id("results-next").click()
    expect(page.get_by_test_id("result-row")).to_have_count(10)
    expect(page.locator('[data-testid="result-row"][data-index="59"]')).to_contain_text(MARKUP)
    expect(page.locator("[data-injected]")).to_have_count(0)
    page.get_by_test_id("results-status").select_option("failed")
    failed_rows = page.get_by_test_id("result-row")
    expect(failed_rows).to_have_count(3)
    expect(failed_rows.first).to_contain_text("tool_error")
    assert [r.get_attribute("data-index") for r in failed_rows.all()] == ["3", "17", "42"]
    page.get_by_test_id("results-status").select_option("")

    shot = os.environ.get("TOOLSWARM_DASHBOARD_SCREENSHOT")
    if shot:
        expect(page.get_by_test_id("result-row")).to_have_count(50)
        page.screenshot(path=shot)

    page.get_by_test_id("retry-failed").click()
    page.wait_for_url(lambda url: job_id not in url)
    new_id = page.url.rsplit("/", 1)[-1]
    expect(page.get_by_test_id("job-id")).to_have_text(new_id)
    expect(page.get_by_test_id("retry-of")).to_have_text(job_id)
    expect(page.get_by_test_id("progress")).to_have_text("100%", timeout=30_000)
    expect(page.get_by_test_id("count-failed")).to_contain_text("3")
    assert client.get(f"/v1/jobs/{job_id}").json()["retried_by"] == new_id
    assert client.get(f"/v1/jobs/{new_id}").json()["total"] == 3

    # The jobs page: both jobs, newest first, and the state filter.
    page.get_by_test_id("nav-jobs").click()
    rows = page.get_by_test_id("job-row")
    expect(rows.first).to_have_attribute("data-job-id", new_id)
    page.get_by_test_id("state-filter").select_option("cancelled")
    expect(page).to_have_url(f"{swarm.url}/ui/#/jobs?state=cancelled")
    expect(page.locator(f'[data-testid="job-row"][data-job-id="{job_id}"]')).to_have_count(0)
    page.get_by_test_id("state-filter").select_option("finished")
    expect(page.locator(f'[data-testid="job-row"][data-job-id="{job_id}"]')).to_be_visible()


def test_job_page_follows_a_running_job_across_an_api_restart(page: Page, swarm: Swarm) -> None:
    """The page is open while the job runs: progress comes from the event stream, which the page
    takes up again (after its last event) when the API comes back."""
    page.goto("/ui/")
    sign_in(page)
    expect(page.get_by_test_id("jobs-table")).to_be_visible()
    # 96 calls of 500 ms, 16 at a time: about 3 s of progress
    body = {"server": "demo", "items": [{"tool": "sleep", "arguments": {"ms": 500}} for _ in range(96)]}
    job_id = swarm.client.post("/v1/jobs", json=body).json()["job_id"]
    page.goto(f"/ui/#/jobs/{job_id}")
    stream = page.get_by_test_id("stream-state")
    expect(stream).to_have_text("live")
    progress = page.get_by_test_id("progress")

    def partial() -> bool:
        now = int(progress.get_attribute("aria-valuenow") or 0)
        return 0 < now < 100

    wait_until(partial, 30, "the bar between 0% and 100%")
    swarm.kill_api()
    expect(stream).to_have_text("reconnecting…")
    swarm.start_api()
    expect(progress).to_have_text("100%", timeout=30_000)
    expect(stream).to_have_text("complete")
    expect(page.get_by_test_id("count-succeeded")).to_contain_text("96")
    expect(page.get_by_test_id("error")).to_be_hidden()
    expect(page.get_by_test_id("retry-failed")).to_have_count(0)
