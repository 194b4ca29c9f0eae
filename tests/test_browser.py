"""The web client in a real headless Chromium (Debian's), against the real server and fake model."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest
import pytest_asyncio
from playwright.async_api import (
    Browser,
    BrowserContext,
    Dialog,
    Locator,
    Page,
    Response,
    async_playwright,
    expect,
)

from backend.process.server import free_port
from backend.web.ai_sdk import EMPTY_QUESTION
from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import fake_settings
from tests.harness import (
    UNIT,
    LiveServer,
    SettingsFactory,
    backend_process,
    live_server,
    temp_database,
    wait_hung_up,
)
from tests.sdk_driver import docs_example, example_bundle

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_INSTALLED = CHROMIUM.exists()
# `make screenshot` sets this to refresh the README's picture; otherwise it goes to a temp dir.
SCREENSHOT_TO = os.environ.get("SCREENSHOT_TO")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # A page a test serves itself through `page.route` counts as public to Chromium, whose
    # Local Network Access checks would then block its sockets to 127.0.0.1.
    "--disable-features=LocalNetworkAccessChecks",
]


# Script errors and dialogs of every page a test opened; both must stay empty.
PAGE_ERRORS: list[str] = []


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium() -> AsyncIterator[Browser]:
    """One Chromium for the module; each test gets a fresh context of its own."""
    if not CHROMIUM_INSTALLED:
        pytest.fail("Chromium is missing: `make test` installs it (apt-get install chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def browser(chromium: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile (no storage, no open pages) for one test."""
    PAGE_ERRORS.clear()
    context = await chromium.new_context()
    yield context
    await context.close()
    assert PAGE_ERRORS == []


async def open_chat(browser: BrowserContext, server: Addressed, width: int = 900) -> Page:
    page = await browser.new_page()
    await page.set_viewport_size({"width": width, "height": 700})
    page.on("dialog", lambda dialog: PAGE_ERRORS.append(f"dialog: {dialog.message}"))
    page.on("pageerror", lambda error: PAGE_ERRORS.append(f"script error: {error}"))
    await page.goto(f"{server.http}/")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    return page


async def ask(page: Page, question: str) -> None:
    await page.locator("#question").fill(question)
    await page.locator("#question").press("Enter")


def last_reply(page: Page) -> Locator:
    return page.locator(".bubble.bot").last


async def test_tokens_appear_progressively(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[f"word{i} " for i in range(12)], delay=0.1))
    page = await open_chat(browser, server)
    await ask(page, "count slowly")
    await expect(page.locator(".bubble.you")).to_have_text("count slowly")
    reply = page.locator(".bubble.bot").last
    await expect(page.locator("#stop")).to_be_enabled()
    lengths: list[int] = []
    deadline = time.monotonic() + UNIT * 5
    while await reply.get_attribute("data-status") is None and time.monotonic() < deadline:
        lengths.append(len(await reply.inner_text()))
        await asyncio.sleep(0.05)
    growth = sorted(set(lengths))
    assert len(growth) >= 4, lengths  # the bubble grew step by step, not all at once
    await expect(reply).to_have_attribute("data-status", "completed")
    await expect(reply).to_contain_text("word11")
    await expect(page.locator("#stop")).to_be_disabled()


async def test_stop_button_ends_reply_and_text_stops_growing(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[f" t{i}" for i in range(400)], delay=0.02))
    page = await open_chat(browser, server)
    await ask(page, "go on and on")
    reply = page.locator(".bubble.bot").last
    await expect(reply).to_contain_text("t5")
    await page.locator("#stop").click()
    await expect(reply).to_have_attribute("data-status", "interrupted")
    await expect(reply).to_contain_text("Stopped")
    stopped_at = await reply.inner_text()
    await asyncio.sleep(0.5)
    assert await reply.inner_text() == stopped_at
    await expect(page.locator("#stop")).to_be_disabled()
    await wait_hung_up(fake, 0)


async def test_sending_during_a_reply_preempts_it(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[" slow"] * 300, delay=0.02), Behaviour(tokens=["second reply"]))
    page = await open_chat(browser, server)
    await ask(page, "first")
    first = page.locator(".bubble.bot").first
    await expect(first).to_contain_text("slow")
    await ask(page, "second")
    await expect(first).to_have_attribute("data-status", "interrupted")
    second = page.locator(".bubble.bot").nth(1)
    await expect(second).to_have_text("second reply")
    await expect(second).to_have_attribute("data-status", "completed")
    await expect(page.locator(".bubble.you")).to_have_text(["first", "second"])


async def test_new_chat_resets_view_and_conversation(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    page = await open_chat(browser, server)
    await ask(page, "remember this")
    await expect(last_reply(page)).to_have_attribute("data-status", "completed")
    await page.locator("#new-chat").click()
    await expect(page.locator(".bubble")).to_have_count(0)
    await ask(page, "fresh")
    await expect(last_reply(page)).to_have_attribute("data-status", "completed")
    assert [m["role"] for m in fake.requests[-1].messages] == ["system", "user"]


async def test_upstream_error_is_shown(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(status=401))
    page = await open_chat(browser, server)
    await ask(page, "hello")
    error = page.locator(".bubble.error")
    await expect(error).to_contain_text("rejected the API key")
    await expect(error).to_have_attribute("role", "alert")
    await expect(page.locator("#stop")).to_be_disabled()


async def test_reconnects_after_server_restart_in_the_same_conversation(
    browser: BrowserContext, make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    settings = make_settings(chat_shutdown_grace=0.2)
    first = LiveServer(settings).start()
    port = first.port
    fake.then(Behaviour(tokens=[" cut"] * 400, delay=0.02))
    page = await open_chat(browser, first)
    await ask(page, "before the restart")
    await expect(last_reply(page)).to_contain_text("cut cut")
    first.stop()  # mid-reply: the server stores it as interrupted and closes with 1012
    await expect(page.locator("#connection")).to_have_attribute("data-state", "closed")
    await expect(last_reply(page)).to_have_attribute("data-status", "interrupted")
    assert await last_reply(page).get_attribute("aria-busy") is None
    await expect(page.locator("#connection")).to_contain_text("retrying")
    shown = await last_reply(page).inner_text()
    with live_server(settings, port=port):
        await expect(page.locator("#connection")).to_have_attribute(
            "data-state", "open", timeout=UNIT * 8 * 1000
        )
        await ask(page, "back again")
        await expect(last_reply(page)).to_have_text("You said: back again")
    # Same conversation: nothing was repeated, and the model saw the earlier turn.
    await expect(page.locator(".bubble.you")).to_have_text(["before the restart", "back again"])
    history = fake.requests[-1].messages
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert history[2]["content"].strip() == shown.removesuffix("Stopped").strip()


async def test_reload_mid_reply_resumes_the_reply(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    words = [f" w{n}" for n in range(150)]
    fake.then(Behaviour(tokens=words, delay=0.02))
    page = await open_chat(browser, server)
    await ask(page, "a long story")
    await expect(last_reply(page)).to_contain_text("w10")
    assert "conversation=" in page.url
    await page.reload()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    await expect(page.locator(".bubble.you")).to_have_text(["a long story"])
    reply = last_reply(page)
    await expect(reply).to_have_attribute("data-status", "completed", timeout=UNIT * 5 * 1000)
    assert await page.locator(".bubble.bot").count() == 1
    assert (await reply.inner_text()).strip() == "".join(words).strip()
    assert len(fake.requests) == 1


async def test_conversation_list_opens_and_deletes(
    browser: BrowserContext, make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    with live_server(make_settings()) as server:  # an empty list to start with
        await conversation_list_opens_and_deletes(browser, server, fake)


async def conversation_list_opens_and_deletes(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    page = await open_chat(browser, server)
    await ask(page, "first topic")
    await expect(last_reply(page)).to_have_attribute("data-status", "completed")
    await page.locator("#new-chat").click()
    await expect(page.locator(".bubble")).to_have_count(0)
    await ask(page, "second topic")
    await expect(last_reply(page)).to_have_attribute("data-status", "completed")
    items = page.locator("#conversations li")
    await expect(items.locator(".open")).to_have_text(["second topic", "first topic"])
    await expect(items.first).to_have_class("current")
    await items.nth(1).locator(".open").click()
    await expect(page.locator(".bubble.you")).to_have_text(["first topic"])
    await expect(last_reply(page)).to_contain_text("You said: first topic")
    await ask(page, "more on it")
    await expect(page.locator(".bubble.you")).to_have_text(["first topic", "more on it"])
    await expect(last_reply(page)).to_have_attribute("data-status", "completed")
    assert [m["content"] for m in fake.requests[-1].messages[1:]] == [
        "first topic",
        "You said: first topic",
        "more on it",
    ]
    # Deleting the open conversation leaves an empty new one.
    await expect(items.locator(".open")).to_have_text(["first topic", "second topic"])
    await items.first.locator(".delete").click()
    await expect(items.locator(".open")).to_have_text(["second topic"])
    await expect(page.locator(".bubble")).to_have_count(0)
    assert "conversation=" not in page.url


async def test_regenerate_button_replaces_the_last_reply(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=["first try"]), Behaviour(tokens=["second try"]))
    page = await open_chat(browser, server)
    await ask(page, "answer twice")
    await expect(last_reply(page)).to_contain_text("first try")
    await page.locator(".regenerate").click()
    await expect(last_reply(page)).to_contain_text("second try")
    await expect(page.locator(".bubble.bot")).to_have_count(1)
    await expect(page.locator(".regenerate")).to_have_count(1)
    await page.reload()
    await expect(last_reply(page)).to_contain_text("second try")
    await expect(page.locator(".bubble.bot")).to_have_count(1)


async def test_model_html_renders_inert_and_markdown_renders(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    hostile = [
        "**bold** text\n\n",
        "- one\n- two\n\n",
        "```\nprint('hi')\n```\n\n",
        "<img src=x onerror=alert(1)>",
        "<script>window.pwned = 1; alert(2)</script>",
        '[link](javascript:alert(3)) <a href="javascript:alert(4)">x</a>',
    ]
    fake.then(Behaviour(tokens=hostile))
    page = await open_chat(browser, server)
    await ask(page, "show me")
    reply = page.locator(".bubble.bot").last
    await expect(reply).to_have_attribute("data-status", "completed")
    assert await reply.locator("strong").inner_text() == "bold"
    assert await reply.locator("li").count() == 2
    assert "print('hi')" in await reply.locator("pre code").inner_text()
    # Model HTML shows as text, creates no element, runs nothing.
    await expect(reply).to_contain_text("<img src=x onerror=alert(1)>")
    assert await page.locator("#messages img, #messages script").count() == 0
    hrefs = await reply.locator("a").evaluate_all("links => links.map(a => a.href)")
    assert not [href for href in hrefs if href.startswith("javascript:")]
    await asyncio.sleep(0.3)
    assert await page.evaluate("window.pwned") is None
    assert PAGE_ERRORS == []


async def test_keyboard_only_use(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    page = await open_chat(browser, server)
    question = page.locator("#question")
    await expect(question).to_be_focused()
    await page.keyboard.type("line one")
    await page.keyboard.press("Shift+Enter")
    await page.keyboard.type("line two")
    assert await question.input_value() == "line one\nline two"
    await expect(page.locator(".bubble")).to_have_count(0)
    await page.keyboard.press("Enter")
    await expect(page.locator(".bubble.you")).to_have_text("line one\nline two")
    await expect(last_reply(page)).to_have_attribute("data-status", "completed")
    assert await page.locator("#messages").get_attribute("aria-live") == "polite"


async def test_auto_scroll_stops_when_reader_scrolls_up(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[f"line {i}\n\n" for i in range(200)], delay=0.01))
    page = await open_chat(browser, server, width=600)
    await ask(page, "long")
    messages = page.locator("#messages")
    await expect(last_reply(page)).to_contain_text("line 40")
    at_bottom = await messages.evaluate("m => m.scrollHeight - m.scrollTop - m.clientHeight")
    assert at_bottom < 60  # following the reply
    await messages.evaluate("m => m.scrollTo(0, 0)")
    await expect(last_reply(page)).to_have_attribute("data-status", "completed")
    assert await messages.evaluate("m => m.scrollTop") < 60  # left where the reader put it


async def test_narrow_screen_and_screenshot(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.then(
        Behaviour(
            tokens=[
                "Streams can be **stopped** at any time.\n\n",
                "- stop\n- ask again\n\n",
                "```python\nasync for token in chain.astream(question):\n    print(token)\n```\n",
            ]
        ),
        Behaviour(tokens=[" A long answer"] * 300, delay=0.02),
    )
    page = await open_chat(browser, server, width=375)
    await ask(page, "What can this chat do?")
    await expect(last_reply(page)).to_have_attribute("data-status", "completed")
    await ask(page, "Tell me a long story")
    await expect(last_reply(page)).to_contain_text("answer A long")
    await page.locator("#stop").click()
    await expect(last_reply(page)).to_have_attribute("data-status", "interrupted")
    overflow = await page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= 375
    await page.set_viewport_size({"width": 900, "height": 640})
    screenshot = Path(SCREENSHOT_TO) if SCREENSHOT_TO else tmp_path / "screenshot.png"
    await page.screenshot(path=str(screenshot))
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    # The same page in the dark theme, as a system set to dark shows it.
    await page.emulate_media(color_scheme="dark")
    await expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    dark = screenshot.with_name(f"{screenshot.stem}-dark.png")
    await page.screenshot(path=str(dark))
    assert dark.read_bytes().startswith(b"\x89PNG")


@pytest.mark.model
async def test_with_the_real_model_reload_and_restart_lose_nothing(browser: BrowserContext) -> None:
    """`make run`, ask for a story, reload mid-reply, stop the server with Ctrl-C, start it
    again: the story finished, the conversation is listed and goes on."""
    port = free_port()
    database = temp_database()
    settings = {"CHAT_DATABASE_URL": database, "CHAT_MAX_REPLY_TOKENS": "160"}
    async with backend_process(port, **settings) as first:
        server = await healthy(port)
        page = await open_chat(browser, server)
        await ask(page, "Tell me a long story about a lighthouse keeper.")
        reply = last_reply(page)
        await expect(reply).to_have_attribute("aria-busy", "true")
        await expect(reply).not_to_be_empty(timeout=MODEL_WAIT_MS)
        await page.reload()
        reply = last_reply(page)
        await expect(reply).to_have_attribute("data-status", "completed", timeout=MODEL_WAIT_MS)
        story = await reply.inner_text()
        assert len(story) > 100
        first.send_signal(signal.SIGINT)
        async with asyncio.timeout(UNIT * 10):
            # uvicorn exits through the signal it caught, once it has shut down.
            assert await first.wait() in (0, -signal.SIGINT)
    await expect(page.locator("#connection")).not_to_have_attribute("data-state", "open")
    async with backend_process(port, **settings):
        await healthy(port)
        await expect(page.locator("#connection")).to_have_attribute(
            "data-state", "open", timeout=UNIT * 8 * 1000
        )
        await page.reload()
        await expect(page.locator("#conversations .open")).to_have_text(
            ["Tell me a long story about a lighthouse keeper."]
        )
        await expect(last_reply(page)).to_have_text(story)
        await ask(page, "Give it a title.")
        await expect(page.locator(".bubble.bot")).to_have_count(2)
        await expect(last_reply(page)).to_have_attribute(
            "data-status", "completed", timeout=MODEL_WAIT_MS
        )


MODEL_WAIT_MS = UNIT * 30 * 1000


async def healthy(port: int) -> Addressed:
    """The server on `port` once `/healthz` says it can answer."""
    server = Addressed()
    server.port = port
    async with httpx.AsyncClient(timeout=UNIT) as client, asyncio.timeout(MODEL_WAIT_MS / 1000):
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{server.http}/healthz")).status_code == 200:
                    return server
            await asyncio.sleep(0.1)


async def test_a_2023_style_client_works_unchanged(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=["Paris", " is", " the", " capital."]), Behaviour(tokens=["Yes."]))
    page = await browser.new_page()
    page.on("pageerror", lambda error: PAGE_ERRORS.append(f"script error: {error}"))
    legacy = (Path(__file__).parent / "fixtures" / "legacy_chat.html").read_text()
    # Served from the server's own origin, as the old page was.
    await page.route(
        f"{server.http}/legacy.html",
        lambda route: route.fulfill(body=legacy, content_type="text/html"),
    )
    await page.goto(f"{server.http}/legacy.html")
    for question in ["What is the capital of France?", "Sure?"]:
        await page.locator("#messageText").fill(question)
        await page.locator("#messageText").press("Enter")
        await expect(page.locator("#send")).to_be_enabled()
    await expect(page.locator(".client-message")).to_have_text(
        ["You: What is the capital of France?", "You: Sure?"]
    )
    await expect(page.locator(".server-message")).to_have_text(
        ["Chatbot: Paris is the capital.", "Chatbot: Yes."]
    )
    await expect(page.locator("#header")).to_have_text("Ask a question")
    assert fake.requests[1].messages[2]["content"] == "Paris is the capital."


# A page with nothing but the docs' React example in it, as `tests/sdk/example_page.tsx` mounts it.
EXAMPLE_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>The docs' AI SDK example</title></head>
<body><div id="root"></div><script src="/example.js"></script></body>
</html>
"""


async def serve_example(browser: BrowserContext, server: Addressed, example: str) -> None:
    """Serve `example`, bundled into its page, at `/example.html` of the server's origin."""
    bundle = example_bundle(example)
    await browser.route(
        f"{server.http}/example.html*",
        lambda route: route.fulfill(body=EXAMPLE_PAGE, content_type="text/html"),
    )
    await browser.route(
        f"{server.http}/example.js",
        lambda route: route.fulfill(body=bundle, content_type="text/javascript"),
    )


async def test_the_docs_react_example_chats_resumes_and_stops(
    browser: BrowserContext, server: Addressed, fake: FakeUpstream
) -> None:
    """The docs' React example, as written there, with `useChat` and React from npm."""
    counting = [f"w{i} " for i in range(150)]
    full = "".join(counting).strip()
    fake.then(
        Behaviour(tokens=["Hi", " there."]),
        Behaviour(tokens=counting, delay=0.02),
        Behaviour(tokens=counting, delay=0.02),
    )
    await serve_example(browser, server, docs_example())
    page = await browser.new_page()
    page.on("pageerror", lambda error: PAGE_ERRORS.append(f"script error: {error}"))
    # The status of every question the page sent: a refused one would show here.
    asked: list[int] = []
    page.on(
        "response",
        lambda got: (
            asked.append(got.status)
            if got.request.method == "POST" and got.url == f"{server.http}/api/chat"
            else None
        ),
    )
    chat = f"page-{uuid.uuid4().hex[:8]}"
    bubbles = page.locator("form p")
    question = page.locator("input[name=q]")
    send = page.get_by_role("button", name="Send")

    async def ask(text: str) -> None:
        await expect(send).to_be_visible()
        await question.fill(text)
        await question.press("Enter")

    def resumed(response: Response) -> bool:
        return response.url.endswith(f"/api/chat/{chat}/stream")

    # useChat asks for the reply in flight as it mounts: there is none yet.
    async with page.expect_response(resumed) as first_look:
        await page.goto(f"{server.http}/example.html?chat={chat}")
    assert (await first_look.value).status == 204
    await ask("hello")
    await expect(bubbles).to_have_text(["hello", "Hi there."])
    # A reload mid-reply: the page loads the chat and resumes the reply, to its last word.
    await ask("count")
    await expect(bubbles.nth(3)).to_contain_text("w5 ")
    async with page.expect_response(resumed) as second_look:
        await page.reload()
    assert (await second_look.value).status == 200
    await expect(bubbles).to_have_text(
        ["hello", "Hi there.", "count", full], timeout=UNIT * 5 * 1000
    )
    assert fake.requests[1].completed
    # Stop: the model request is closed at once, the text so far stays, and the click sends
    # nothing else (a Send button in the Stop button's place would submit an empty question).
    await ask("count again")
    await expect(bubbles.nth(5)).to_contain_text("w5 ")
    async with page.expect_response(lambda got: got.url.endswith("/stop")) as stopped:
        await page.get_by_role("button", name="Stop").click()
    assert await (await stopped.value).json() == {"stopped": True}
    await wait_hung_up(fake, 2, within=UNIT)
    shown = await bubbles.nth(5).text_content()
    assert shown is not None
    assert "w5" in shown
    assert "w149" not in shown
    # The next question is answered, and nothing came between the two.
    await ask("next?")
    await expect(bubbles).to_have_text(
        ["hello", "Hi there.", "count", full, "count again", shown, "next?", "You said: next?"]
    )
    await expect(page.get_by_role("alert")).to_have_count(0)
    assert asked == [200] * 4
    assert [r.messages[-1]["content"] for r in fake.requests] == [
        "hello",
        "count",
        "count again",
        "next?",
    ]
    async with httpx.AsyncClient(timeout=UNIT) as client:
        stored = (await client.get(f"{server.http}/api/chat/{chat}")).json()["messages"]
    assert stored[5]["metadata"]["status"] == "interrupted"
    assert stored[5]["parts"][0]["text"].startswith(shown)
    # A refused question: the example shows the server's sentence as it is.
    await ask(" ")
    await expect(page.get_by_role("alert")).to_have_text(EMPTY_QUESTION)
    assert len(fake.requests) == 4


async def test_signing_in_with_a_token(
    browser: BrowserContext, upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    """With CHAT_AUTH=token the page asks for a token once, keeps it for the tab, says when it
    is refused, and shows only the user's own conversations."""
    secret = "browser-test-secret-long-enough-for-hs256"
    alice = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, secret, "HS256")
    settings = fake_settings(upstream_server, chat_auth="token", chat_jwt_secret=secret)
    with live_server(settings) as server:
        page = await browser.new_page()
        page.on("pageerror", lambda error: PAGE_ERRORS.append(f"script error: {error}"))
        asked: list[str] = []

        async def answer(dialog: Dialog) -> None:
            asked.append(dialog.message)
            await dialog.accept(alice)

        page.on("dialog", answer)
        # A wrong token in the link: refused with a clear message, then asked for.
        await page.goto(f"{server.http}/#token=not-a-token")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
        assert len(asked) == 1
        assert "refused" in asked[0]
        assert "#token" not in page.url
        await ask(page, "Signed in?")
        await expect(last_reply(page)).to_have_attribute("data-status", "completed")
        await expect(last_reply(page)).to_contain_text("Signed in?")
        # A reload keeps the token for the tab: no second question, the list is alice's.
        await page.reload()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
        await expect(page.locator("#conversations li .open")).to_have_text(["Signed in?"])
        assert len(asked) == 1


async def test_picking_an_assistant_begins_a_chat_with_it(
    browser: BrowserContext, upstream_server: FakeUpstream
) -> None:
    settings = fake_settings(
        upstream_server,
        chat_database_url=temp_database(),
        chat_chains=["shout=tests.chains:shouting"],
    )
    with live_server(settings) as server:
        page = await open_chat(browser, server)
        picker = page.locator("#assistant")
        await expect(picker).to_be_visible()
        await expect(picker).to_have_value("chat")
        await ask(page, "hello")
        await expect(last_reply(page)).to_have_text("You said: hello")
        await picker.select_option("shout")
        await expect(page.locator(".bubble")).to_have_count(0)
        await ask(page, "hello")
        await expect(last_reply(page)).to_have_text("HELLO (1 messages)")
        # New chat keeps the assistant picked; the list reopens each chat with its own.
        await page.locator("#new-chat").click()
        await expect(page.locator(".bubble")).to_have_count(0)
        await ask(page, "again")
        await expect(last_reply(page)).to_have_text("AGAIN (1 messages)")
        await page.reload()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
        await expect(picker).to_have_value("shout")
        first = page.locator("#conversations li").last
        await first.locator(".open").click()
        await expect(picker).to_have_value("chat")
        await ask(page, "once more")
        await expect(last_reply(page)).to_contain_text("You said: once more")


async def test_the_picker_stays_hidden_with_one_assistant(
    browser: BrowserContext, upstream_server: FakeUpstream
) -> None:
    settings = fake_settings(upstream_server, chat_database_url=temp_database())
    with live_server(settings) as server:
        page = await open_chat(browser, server)
        await expect(page.locator("#assistant option")).to_have_count(1)  # the list came
        await expect(page.locator(".assistant-picker")).to_be_hidden()


async def test_an_assistant_no_longer_offered_gives_way_to_one_that_is(
    browser: BrowserContext, upstream_server: FakeUpstream
) -> None:
    database = temp_database()
    chains = ["shout=tests.chains:shouting"]
    with live_server(
        fake_settings(upstream_server, chat_database_url=database, chat_chains=chains)
    ) as server:
        page = await open_chat(browser, server)
        await page.locator("#assistant").select_option("shout")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
        port = server.port
    # Restarted without it: the page's next socket asks for an assistant that is gone.
    with live_server(fake_settings(upstream_server, chat_database_url=database), port=port):
        await expect(page.locator(".bubble.error")).to_contain_text("No assistant 'shout'")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
        await expect(page.locator("#assistant")).to_have_value("chat")
        await ask(page, "still here?")
        await expect(last_reply(page)).to_have_text("You said: still here?")
