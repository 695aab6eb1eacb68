"""The console in a real browser (headless chromium via Playwright), against the real
service in sandbox mode: two replicas on PostgreSQL and the simulator, as processes.

Screenshots go to the test's temp directory; with UPDATE_DOCS_SCREENSHOTS=1 the
gallery and a task page are also written to docs/ for the README.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.console.conftest import Sandbox
from tests.console.helpers import png
from tests.e2e.stack import API_TOKEN

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.e2e]

DOCS = Path(__file__).resolve().parents[2] / "docs"
TIMEOUT_MS = 30_000
PROMPTS = [
    "a lighthouse on a cliff at dusk",
    "a bowl of ramen, overhead view",
    "a red fox asleep in fresh snow",
    "an isometric city block at night",
    "a watercolour map of an island",
]


class Origin:
    """An image host the test controls: 404 until `serving` is set, then a PNG."""

    def __init__(self) -> None:
        self.serving = False
        self.body = png(900, 600, (200, 90, 40))
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if not origin.serving:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(origin.body)))
                self.end_headers()
                self.wfile.write(origin.body)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/picture.png"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Origin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    """The controllable image host."""
    with Origin() as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser: Any, sandbox: Sandbox) -> AsyncIterator[Any]:
    """A fresh browser context (no cookies) with a laptop-sized window."""
    context = await browser.new_context(
        viewport={"width": 1280, "height": 860},
        base_url=sandbox.stack.service_url,
        permissions=["clipboard-read", "clipboard-write"],
    )
    context.set_default_timeout(TIMEOUT_MS)
    opened = await context.new_page()
    yield opened
    await context.close()


async def sign_in(page: Any, token: str = API_TOKEN) -> None:
    """Open the console, get sent to the form, and sign in with the keyboard."""
    await page.goto("/console")
    await page.get_by_label("API token").fill(token)
    await page.get_by_label("API token").press("Enter")
    await page.wait_for_load_state()


async def shot(page: Any, sandbox: Sandbox, name: str, docs: str | None = None) -> None:
    """A full-page screenshot in the test's directory (and docs/ when asked)."""
    path = sandbox.shots / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    if docs and os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
        await page.screenshot(path=str(DOCS / docs), full_page=True)


async def thumb_rendered(page: Any, task_id: str) -> None:
    """Wait until the task's card shows a decoded thumbnail."""
    await page.wait_for_function(
        """id => {
            const img = document.querySelector(`[data-task-id="${id}"] img`);
            return img !== null && img.complete && img.naturalWidth > 0;
        }""",
        arg=task_id,
    )


async def test_a_wrong_token_is_refused(page: Any, sandbox: Sandbox) -> None:
    """The form says the token is wrong, and the console stays closed."""
    await sign_in(page, token="not-a-token-of-this-service")
    alert = page.get_by_role("alert")
    await alert.wait_for()
    assert "not one of this service's API tokens" in await alert.inner_text()
    assert page.url.endswith("/console/sign-in")
    await shot(page, sandbox, "wrong-token")
    await page.goto("/console")
    assert "/console/sign-in" in page.url


async def test_new_tasks_appear_live_with_their_thumbnails(page: Any, sandbox: Sandbox) -> None:
    """Signed in on the gallery, tasks submitted through the API appear without a reload
    and their thumbnails render; a failed one shows its reason."""
    await sign_in(page)
    assert page.url.endswith("/console")
    await page.get_by_text("Live updates: on").wait_for()
    stack = sandbox.stack
    submitted = [await stack.submit(prompt) for prompt in PROMPTS]
    # Faults set on the simulator, not in the prompt: the gallery shows clean prompts.
    await stack.sim.set_faults(outcome="failed", error_code="content_policy_violation")
    try:
        refused = await stack.submit("a portrait of a judge in oils")
    finally:
        await stack.sim.set_faults()
    for task in submitted:
        await thumb_rendered(page, task["id"])
    reason = page.locator(f'[data-task-id="{refused["id"]}"] .reason')
    await reason.get_by_text("content_policy_violation").wait_for()
    order = await page.eval_on_selector_all(
        "#grid [data-task-id]", "cards => cards.map(c => c.dataset.taskId)"
    )
    assert order[: len(PROMPTS) + 1] == [refused["id"], *[t["id"] for t in reversed(submitted)]]
    await shot(page, sandbox, "gallery", docs="console-gallery.png")


async def test_the_task_page_shows_the_timeline_in_order(page: Any, sandbox: Sandbox) -> None:
    """On the other replica (the session is the same), a stored task's page lists its
    story in time order: submitted, callbacks, confirmation query, download, stored."""
    stack = sandbox.stack
    await stack.sim.set_faults(dup=2)  # the callback twice: one applied, one duplicate
    try:
        task = await stack.submit("a paper boat on a pond")
    finally:
        await stack.sim.set_faults()
    await stack.wait_image(task["id"])
    await sign_in(page)
    # Cookies belong to the host, not the port: the other replica honours the session.
    await page.goto(f"{sandbox.replica_url}/console/tasks/{task['id']}")
    assert "/sign-in" not in page.url
    await page.locator("#timeline li").first.wait_for()
    times = await page.eval_on_selector_all(
        "#timeline time", "items => items.map(t => t.getAttribute('datetime'))"
    )
    assert times == sorted(times)
    titles = await page.eval_on_selector_all(
        "#timeline .what", "items => items.map(t => t.textContent.trim())"
    )
    assert titles[0] == "Submitted"
    for expected in (
        "StarMagic's answer to the submission: accepted",
        "Callback received",
        "Query to StarMagic: ok",
        "Download attempt (image 0): stored",
        "Image stored",
        "Stored object (image 0)",
    ):
        assert expected in titles, titles
    assert titles.index("Callback received") < titles.index("Download attempt (image 0): stored")
    preview = page.locator(".picture img")
    assert await preview.evaluate("img => img.complete && img.naturalWidth > 0")
    # Copy the API call with the keyboard: the clipboard holds the curl that fetches it.
    await page.get_by_role("button", name="Copy").focus()
    await page.keyboard.press("Enter")
    await page.get_by_text("Copied.").wait_for()
    copied = await page.evaluate("() => navigator.clipboard.readText()")
    assert copied.startswith('curl -H "Authorization: Bearer $IMAGETASKS_TOKEN" ')
    assert copied.endswith(f"/tasks/{task['id']}")
    await shot(page, sandbox, "task", docs="console-task.png")


async def test_a_failed_download_is_retried_from_the_console(
    page: Any, sandbox: Sandbox, origin: Origin
) -> None:
    """An image host that answers 404 fails the download for good; once it serves the
    image, Retry on the task's page queues it again and the page shows it stored."""
    stack = sandbox.stack
    task = await stack.submit(f"a kite in the wind [sim:redirect_to={origin.url}]")
    failed = await stack.wait_image(task["id"])
    assert failed["image"]["status"] == "failed"
    await sign_in(page)
    await page.goto(f"/console/tasks/{task['id']}")
    await page.get_by_text("http_404").first.wait_for()
    origin.serving = True
    await page.get_by_role("button", name="Retry the failed download").click()
    await page.get_by_text("The failed download was queued again.").wait_for()
    # The page follows the task live: no reload.
    await page.locator("#image-status", has_text="image stored").wait_for()
    await page.wait_for_function(
        "() => { const i = document.querySelector('.picture img');"
        " return i !== null && i.complete && i.naturalWidth > 0; }"
    )
    assert (await stack.task(task["id"]))["image"]["status"] == "stored"
    await shot(page, sandbox, "retried")


async def test_a_post_without_the_anti_forgery_token_is_refused(
    page: Any, sandbox: Sandbox
) -> None:
    """A signed-in browser posting a form without the token (as another site would) is
    refused with a message, and the task is left as it was."""
    stack = sandbox.stack
    task = await stack.submit("a lone tree [sim:outcome=failed]")
    await stack.wait_status(task["id"], "failed")
    await sign_in(page)
    await page.goto(f"/console/tasks/{task['id']}")
    await page.evaluate(
        """id => {
            const form = document.createElement("form");
            form.method = "post";
            form.action = `/console/tasks/${id}/retry`;
            document.body.append(form);
            form.submit();
        }""",
        task["id"],
    )
    await page.wait_for_load_state()
    alert = page.get_by_role("alert")
    assert "anti-forgery token is missing or does not match" in await alert.inner_text()
    assert await page.get_by_role("heading", name="Refused").is_visible()
    await shot(page, sandbox, "forgery-refused")
    events = await stack.client.get(f"/tasks/{task['id']}/events")
    assert "image.queued" not in [event["type"] for event in events.json()["items"]]


async def test_on_a_phone_by_keyboard_nothing_overflows(browser: Any, sandbox: Sandbox) -> None:
    """A 390 px wide window: no sideways scrolling on the gallery, a task page or the
    overview, and a task is reached from the gallery with the keyboard alone."""
    task = await sandbox.stack.submit("a narrow street in the rain")
    await sandbox.stack.wait_image(task["id"])
    context = await browser.new_context(
        viewport={"width": 390, "height": 844}, base_url=sandbox.stack.service_url
    )
    context.set_default_timeout(TIMEOUT_MS)
    phone = await context.new_page()
    try:
        await sign_in(phone)
        fits = "() => document.documentElement.scrollWidth <= window.innerWidth"
        assert await phone.evaluate(fits)
        card = phone.locator(f'[data-task-id="{task["id"]}"] a')
        await card.focus()
        await phone.keyboard.press("Enter")
        await phone.wait_for_url(f"**/console/tasks/{task['id']}")
        await phone.locator("#timeline li").first.wait_for()
        assert await phone.evaluate(fits)
        await phone.get_by_role("link", name="Overview").click()
        await phone.get_by_role("heading", name="Overview").wait_for()
        assert await phone.evaluate(fits)
        await shot(phone, sandbox, "phone-overview")
    finally:
        await context.close()
