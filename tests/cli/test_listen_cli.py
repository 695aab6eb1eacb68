"""`imagetasks listen --forward-to`: the live stream forwarded as signed webhooks."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from queue import Empty, Queue

import httpx
from standardwebhooks.webhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from tests.ports import free_port

from .helpers import IMAGETASKS, Sandbox, clean_env

ROOT = Path(__file__).resolve().parents[2]


def _receiver() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.webhooks.receiver", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/_received", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("the receiver did not start")


def test_listen_forwards_new_events_signed_with_the_default_secret(sandbox: Sandbox) -> None:
    """A task submitted while listening reaches the local URL as a signed image.stored that
    both verifiers accept, and listen prints a status line with the receiver's 200."""
    receiver, receiver_url = _receiver()
    listener = subprocess.Popen(
        [IMAGETASKS, "listen", "--forward-to", f"{receiver_url}/local", "--types", "image.stored"],
        env=clean_env(IMAGETASKS_URL=sandbox.url, IMAGETASKS_TOKEN=sandbox.token),
        cwd=sandbox.directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: Queue[str] = Queue()
    assert listener.stdout is not None
    assert listener.stderr is not None
    stdout, stderr = listener.stdout, listener.stderr
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    try:
        assert "Ready: forwarding events to" in stderr.readline()
        secret_line = stderr.readline().strip()
        task = httpx.post(
            sandbox.url + "/tasks",
            json={"prompt": "a kite"},
            headers={"Authorization": f"Bearer {sandbox.token}"},
            timeout=30,
        ).json()
        try:
            line = lines.get(timeout=60)
        except Empty:
            raise AssertionError("listen printed nothing") from None
        assert "image.stored" in line
        assert "<-- 200" in line
        [request] = [
            r for r in httpx.get(f"{receiver_url}/_received").json() if r["path"] == "/local"
        ]
        secret = sandbox.api("/webhook-endpoints/default/secret").json()["secret"]
        assert secret_line == secret
        body = request["body"].encode()
        event = StandardWebhook(secret).verify(body, request["headers"])
        SvixWebhook(secret).verify(body, request["headers"])
        assert event["type"] == "image.stored"
        assert event["data"]["id"] == task["id"]
        assert request["headers"]["webhook-id"] in line
    finally:
        listener.terminate()
        listener.wait(timeout=15)
        receiver.terminate()
        receiver.wait(timeout=15)
