"""The chat page at / of `serve`, in headless Chromium (Debian's `chromium`, driven by Playwright
through executable_path; .ci/run installs it): type a message, see the answer stream in, stop it
mid-stream (the server frees the row), go on with the conversation, save a screenshot."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from tests.test_serve import stretch_context
from tests.test_serve_load import LiveServer, wait_for
from tests.tiny import make_tiny

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def chromium_path() -> str:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("no chromium: install it with `apt-get install -y chromium` (.ci/run does)")
        pytest.skip("no chromium here (.ci/run installs it with apt-get)")
    return CHROMIUM


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A one-row server whose engine takes 30 ms a step and never stops at EOS: replies stream for as long as asked."""
    from llmcli.engine import Engine
    from llmcli.engine.service import EngineService
    from llmcli.server import make_app

    path = stretch_context(make_tiny("llama", tmp_path_factory.mktemp("chat-page") / "llama"), 4096)
    service = EngineService(Engine(path, batch_size=1), max_queue=4)
    step, submit = service._batcher.step, service.submit

    def slow_step():
        time.sleep(0.03)
        return step()

    def submit_past_eos(requests):
        for r in requests:
            r.ignore_eos = True  # a random tiny model may end at once; the page must be seen streaming
        return submit(requests)

    service._batcher.step = slow_step
    service.submit = submit_past_eos
    server = LiveServer(make_app(service, model_name="tiny-chat"))
    yield server
    server.stop()


def test_chat_page_streams_stops_and_keeps_the_conversation(slow_server, chromium_path, tmp_path):
    from playwright.sync_api import sync_playwright

    service = slow_server.state.service
    bodies: list[dict] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)  # a busy CI machine: the tiny model's steps may crawl
            page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
            page.goto(slow_server.base + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'model: tiny-chat'")
            page.fill("#system", "You are terse.")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "3000")
            page.fill("#input", "Hello there")
            page.press("#input", "Enter")
            # the reply streams in: text grows while the request is still running
            page.wait_for_function("document.querySelector('.msg.assistant .text').textContent.length > 0")
            first = page.text_content(".msg.assistant .text")
            page.wait_for_function(f"document.querySelector('.msg.assistant .text').textContent.length > {len(first)}")
            assert page.is_enabled("#stop") and not page.is_enabled("#send")
            assert service.running == 1
            cancelled = service.metrics.finished.get("cancelled", 0)
            page.click("#stop")
            page.wait_for_selector(".msg.assistant .note")
            assert page.text_content(".msg.assistant .note").strip() == "(stopped)"
            # server side: the aborted request leaves its row, long before its 3000 tokens
            wait_for(lambda: service.running == 0 and service.queue_depth == 0, timeout=30)
            assert service.metrics.finished.get("cancelled", 0) == cancelled + 1
            stopped_reply = page.text_content(".msg.assistant .text")
            assert 0 < len(stopped_reply)

            # the conversation goes on: the next request carries the system prompt and both turns
            page.fill("#max_tokens", "3")
            page.fill("#input", "And now?")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 && !document.getElementById('send').disabled")
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        finally:
            browser.close()
    first_body, second_body = bodies
    assert first_body["stream"] is True and first_body["model"] == "tiny-chat"
    assert first_body["temperature"] == 0 and first_body["top_p"] == 0.95 and first_body["max_tokens"] == 3000
    assert second_body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": stopped_reply},
        {"role": "user", "content": "And now?"},
    ]
    assert second_body["max_tokens"] == 3
    assert (tmp_path / "chat.png").stat().st_size > 1000
