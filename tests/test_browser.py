"""The chat page in a real browser: headless Chromium (Debian's ``chromium`` package, driven by
Playwright without its own browser download) against a real server and the real SmolLM2 model.

Screenshots are saved under ``build/test-artifacts/`` (or ``$LOCALBOT_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from serving import ServerProcess  # noqa: E402

from localbot.session_settings import load_settings  # noqa: E402
from localbot.sessions import SessionStore  # noqa: E402

ARTIFACTS = Path(
    os.environ.get(
        "LOCALBOT_TEST_ARTIFACTS", Path(__file__).parents[1] / "build" / "test-artifacts"
    )
)
LONG_REPLY = "Write a long story about a dragon who learns to cook."
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


pytestmark = pytest.mark.skipif(
    _browser() is None,
    reason="no Chromium found (Debian: apt-get install -y chromium; .ci/run installs it as root)",
)


@pytest.fixture(scope="module")
def server(smol_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("browser")
    # Long replies (the story runs to the limit, ~10 s here): time to watch it and press Stop.
    args = ["--ctx", "2048", "--max-tokens", "1000", "--temperature", "0"]
    with ServerProcess(smol_model_path, home, *args) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_browser(), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    yield page
    context.close()


def _reload(page) -> None:
    page.reload()
    page.wait_for_selector("body[data-ready='1']")


def _wait_reply_done(page) -> None:
    page.wait_for_selector("#send:not([hidden])")
    page.wait_for_selector(".msg.assistant.streaming", state="detached")


def test_chat_stream_stop_reload_sessions_and_the_cli_resumes(page, server, smol_model_path):
    # Send with Enter; the reply streams in.
    page.fill("#input", LONG_REPLY)
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant.streaming")
    page.wait_for_function(
        "() => (document.querySelector('.msg.assistant.streaming')?.textContent || '').length > 300"
    )
    seen = reply.text_content()
    page.wait_for_function(
        "n => document.querySelector('.msg.assistant.streaming').textContent.length > n",
        arg=len(seen),
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-mid-reply.png"))

    # Stop mid-reply: the partial reply stays, marked.
    page.click("#stop")
    _wait_reply_done(page)
    stopped = page.locator(".msg.assistant").last
    saved = SessionStore(server.sessions).get("default").messages
    problem = (
        page.text_content("#error"),
        [(m.type, m.response_metadata, len(m.content)) for m in saved],
        page.text_content("#stats-text"),
    )
    assert stopped.locator(".mark").count() == 1, problem
    assert stopped.locator(".mark").text_content() == "interrupted"
    saved = SessionStore(server.sessions).get("default").messages
    assert [m.type for m in saved] == ["human", "ai"]
    assert saved[1].response_metadata["interrupted"] is True
    assert saved[1].response_metadata["finish_reason"] == "interrupted"
    assert "interrupted" in page.text_content("#stats-text")

    # Reload: the history comes back from the session file, with the mark.
    _reload(page)
    assert page.locator(".msg.user").first.text_content() == LONG_REPLY
    assert page.locator(".msg.assistant .mark").count() == 1
    shown = page.locator(".msg.assistant").first.text_content()
    # (paragraphs rendered from Markdown lose the blank lines between them in textContent)
    assert "".join(shown.removesuffix("interrupted").split()) == "".join(saved[1].content.split())
    page.screenshot(path=str(ARTIFACTS / "browser-after-reload.png"))
    meter = page.text_content("#meter-text")
    assert "2 messages" in meter
    assert "prompt tokens" in meter

    # A second session: created from the sidebar, chatted in, then back to the first.
    page.once("dialog", lambda dialog: dialog.accept("second"))
    page.click("#new-session")
    page.wait_for_selector("body[data-session='second']")
    assert page.locator(".msg").count() == 0
    page.fill("#input", "Say hello.")
    page.press("#input", "Shift+Enter")
    page.type("#input", "Just one word.")
    assert page.locator(".msg.user").count() == 0  # Shift-Enter only added a line
    page.press("#input", "Enter")
    _wait_reply_done(page)
    assert page.locator(".msg.user").text_content() == "Say hello.\nJust one word."
    second = SessionStore(server.sessions).get("second").messages
    assert second[0].content == "Say hello.\nJust one word."
    assert page.locator("#sessions li").count() == 2
    page.click("#sessions li[data-id='default']")
    page.wait_for_selector("body[data-session='default']")
    assert page.locator(".msg.assistant .mark").count() == 1

    # The terminal chat resumes the same session, while the server runs.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "localbot",
            "--model",
            str(smol_model_path),
            "--session",
            "default",
            "--ctx",
            "2048",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "-p",
            "Go on.",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LOCALBOT_HOME": str(server.home)},
    )
    assert result.returncode == 0, result.stderr
    _reload(page)
    assert page.locator(".msg.user").nth(1).text_content() == "Go on."
    assert page.locator(".msg.assistant").nth(1).text_content().strip() == result.stdout.strip()


def test_system_prompt_and_variables_are_saved_per_session(page, server) -> None:
    page.click("#toggle-settings")
    page.fill("#system-prompt", "Answer in {language}.")
    page.fill("#variables", "language=French")
    page.click("#save-settings")
    page.wait_for_function("() => document.querySelector('#settings-status').textContent")
    assert page.text_content("#settings-status") == "saved"
    store = SessionStore(server.sessions)
    session = page.text_content("#session-title")
    saved = load_settings(store, session)
    assert saved == {"system": "Answer in {language}.", "vars": {"language": "French"}}
    # A prompt whose variable has no value is refused, as the REPL's /system refuses it.
    page.fill("#system-prompt", "Answer in {tongue}.")
    page.click("#save-settings")
    page.wait_for_function(
        "() => document.querySelector('#settings-status').textContent !== 'saved'"
    )
    assert "{tongue}" in page.text_content("#settings-status")
    assert load_settings(store, session)["system"] == "Answer in {language}."


def test_markdown_is_rendered_and_never_runs_html(page) -> None:
    html = page.evaluate(
        "() => renderMarkdown('# Title\\n\\nSome **bold** and `<b>code</b>`.\\n\\n"
        '```python\\nprint("<script>")\\n```\\n\\n- one\\n- two\\n\\n'
        "[ok](https://example.org) [bad](javascript:alert(1)) <img src=x onerror=alert(1)>')"
    )
    assert "<h1>Title</h1>" in html
    assert "<strong>bold</strong>" in html
    assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    assert (
        '<pre><code class="language-python">print(&quot;&lt;script&gt;&quot;)</code></pre>' in html
    )
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert '<a href="https://example.org"' in html
    assert "javascript:" not in html.replace("[bad](javascript:", "")
    assert "<img" not in html


def test_the_page_fits_a_phone(browser, server) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 780}, is_mobile=True)
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 390  # nothing wider than the screen
    assert page.is_visible("#toggle-sidebar")
    box = page.locator("#sidebar").bounding_box()
    assert box["x"] + box["width"] <= 0  # the sessions are a drawer, closed
    page.click("#toggle-sidebar")
    # The drawer slides in (a 0.2 s transition): wait for it to arrive, however slow the page.
    page.wait_for_function(
        "() => document.querySelector('#sidebar').getBoundingClientRect().x >= 0",
        timeout=10_000,
    )
    assert page.locator("#sidebar").bounding_box()["x"] >= 0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-phone.png"))
    context.close()
