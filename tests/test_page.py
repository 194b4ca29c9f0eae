"""The chat page's comforts in a real headless Chromium: code highlighted and copied, steps,
what a reply cost, rendering that never redoes what it did, dark theme, Esc, accessibility."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, expect

from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import fake_settings
from tests.harness import UNIT, LiveServer, live_server, temp_database
from tests.test_browser import PAGE_ERRORS, ask, chromium, last_reply, open_chat

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]
__all__ = ["chromium"]  # the module's Chromium fixture, shared

AXE = Path(__file__).parent.parent / "frontend" / "node_modules" / "axe-core" / "axe.min.js"
CODE = 'def greet(name):\n    return f"hello {name}"\n'


@pytest.fixture(scope="module")
def page_server(upstream_server: FakeUpstream) -> Iterator[LiveServer]:
    """One server for the module, answering with the agent chain when asked for it."""
    settings = fake_settings(
        upstream_server,
        chat_database_url=temp_database(),
        chat_chains=["agent=tests.chains:agent"],
    )
    with live_server(settings) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def context(chromium: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh profile that may use the clipboard."""
    PAGE_ERRORS.clear()
    made = await chromium.new_context(permissions=["clipboard-read", "clipboard-write"])
    yield made
    await made.close()
    assert PAGE_ERRORS == []


async def clipboard(page: Page) -> str:
    text: str = await page.evaluate("navigator.clipboard.readText()")
    return text


async def test_code_is_highlighted_and_copied_exactly(
    context: BrowserContext, page_server: LiveServer, fake: FakeUpstream
) -> None:
    reply = f"Here:\n\n```python\n{CODE}```\n\nDone."
    fake.then(Behaviour(tokens=[reply[i : i + 7] for i in range(0, len(reply), 7)], delay=0.01))
    page = await open_chat(context, page_server)
    await ask(page, "code please")
    bubble = last_reply(page)
    await expect(bubble).to_have_attribute("data-status", "completed")
    code = bubble.locator("pre code")
    await expect(code).to_have_attribute("class", "language-python")
    await expect(code.locator(".hljs-keyword").first).to_have_text("def")
    await bubble.locator(".copy-code").click()
    assert await clipboard(page) == CODE
    await page.locator(".reply-meta .copy-reply").last.click()
    assert await clipboard(page) == reply


async def test_a_finished_reply_says_what_it_cost(
    context: BrowserContext, page_server: LiveServer, fake: FakeUpstream
) -> None:
    frames: list[dict[str, object]] = []
    page = await open_chat(context, page_server)
    page.on(
        "websocket",
        lambda ws: ws.on("framereceived", lambda payload: frames.append(json.loads(payload))),
    )
    await page.reload()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    fake.then(Behaviour(tokens=[" one", " two", " three", " four"], delay=0.05))
    await ask(page, "four words")
    await expect(last_reply(page)).to_have_attribute("data-status", "completed")
    end = next(frame for frame in frames if frame.get("type") == "end")
    usage, timings = end["usage"], end["timings"]
    assert isinstance(usage, dict)
    assert isinstance(timings, dict)
    first = f"first token {timings['first_token_seconds']:.2f} s"
    writing = timings["duration_seconds"] - timings["first_token_seconds"]
    rate = usage["completion_tokens"] / writing
    facts = page.locator(".reply-meta .facts").last
    await expect(facts).to_have_text(
        f"{usage['prompt_tokens']} + {usage['completion_tokens']} tokens · {first} · "
        f"{rate:.1f} tokens/s"
    )


async def test_steps_show_collapsed_and_open(
    context: BrowserContext, page_server: LiveServer, fake: FakeUpstream
) -> None:
    fake.then(
        Behaviour(tool_calls=[("add", {"a": 2, "b": 3})]),
        Behaviour(tokens=["It", " is", " 5."]),
    )
    page = await open_chat(context, page_server)
    await page.locator("#assistant").select_option("agent")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    await ask(page, "2+3?")
    bubble = last_reply(page)
    await expect(bubble).to_have_attribute("data-status", "completed")
    steps = bubble.locator("details.steps")
    await expect(steps).not_to_have_attribute("open", "")
    await expect(steps.locator("summary")).to_contain_text("add returned 5")
    line = steps.locator("li[data-kind='tool']")
    await expect(line).to_be_hidden()
    await steps.locator("summary").click()
    await expect(line).to_be_visible()
    await expect(line).to_have_attribute("data-status", "completed")
    await expect(bubble.locator(".content")).to_have_text("It is 5.")


async def test_streaming_renders_each_finished_block_once(
    context: BrowserContext, page_server: LiveServer, fake: FakeUpstream
) -> None:
    """A block, once a blank line closes it, stays the same element however long the reply
    grows: only the block still being written is rendered again."""
    paragraphs = [f"Paragraph {n} says something.\n\n" for n in range(60)]
    fake.then(Behaviour(tokens=paragraphs, delay=0.03))
    page = await open_chat(context, page_server)
    await ask(page, "write a lot")
    bubble = last_reply(page)
    await expect(bubble.locator("p", has_text="Paragraph 3 says")).to_have_count(1)
    await bubble.locator("p", has_text="Paragraph 3 says").evaluate("p => { p.id = 'kept'; }")
    await expect(bubble.locator("p", has_text="Paragraph 40 says")).to_have_count(1)
    assert await bubble.locator("#kept").count() == 1  # never rendered again while streaming
    await expect(bubble).to_have_attribute("data-status", "completed", timeout=UNIT * 5000)
    await expect(bubble.locator("p")).to_have_count(60)


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_the_theme_follows_the_system_and_the_toggle_is_kept(
    chromium: Browser, page_server: LiveServer, scheme: str
) -> None:
    made = await chromium.new_context(color_scheme=scheme)  # type: ignore[arg-type]
    try:
        page = await open_chat(made, page_server)
        html = page.locator("html")
        await expect(html).to_have_attribute("data-theme", scheme)
        other = "light" if scheme == "dark" else "dark"
        await page.locator("#theme").click()
        await expect(html).to_have_attribute("data-theme", other)
        await page.reload()
        await expect(html).to_have_attribute("data-theme", other)
        background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == ("rgb(21, 23, 28)" if other == "dark" else "rgb(255, 255, 255)")
    finally:
        await made.close()


async def test_escape_stops_the_reply(
    context: BrowserContext, page_server: LiveServer, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[f" t{i}" for i in range(400)], delay=0.02))
    page = await open_chat(context, page_server)
    await ask(page, "go on")
    bubble = last_reply(page)
    await expect(bubble).to_contain_text("t5")
    await page.keyboard.press("Escape")
    await expect(bubble).to_have_attribute("data-status", "interrupted")


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_no_serious_accessibility_violations(
    chromium: Browser, page_server: LiveServer, fake: FakeUpstream, scheme: str
) -> None:
    made = await chromium.new_context(color_scheme=scheme)  # type: ignore[arg-type]
    try:
        page = await open_chat(made, page_server)
        fake.then(Behaviour(tokens=["Some ", "`code` ", "and\n\n```python\nx = 1\n```\n"]))
        await ask(page, "show me")
        await expect(last_reply(page)).to_have_attribute("data-status", "completed")
        await page.add_script_tag(path=str(AXE))
        found = await page.evaluate(
            "axe.run(document, {resultTypes: ['violations']}).then(r => r.violations"
            ".filter(v => ['serious', 'critical'].includes(v.impact))"
            ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', ')))"
        )
        assert found == []
    finally:
        await made.close()


async def test_the_last_question_is_edited_and_asked_again(
    context: BrowserContext, page_server: LiveServer, fake: FakeUpstream
) -> None:
    page = await open_chat(context, page_server)
    await ask(page, "first")
    await expect(last_reply(page)).to_have_text("You said: first")
    await ask(page, "secnod")
    await expect(last_reply(page)).to_have_text("You said: secnod")
    questions = page.locator(".bubble.you")
    await expect(questions.first.locator(".edit-question")).to_have_count(0)  # the last only
    await questions.last.locator(".edit-question").click()
    await expect(page.locator("#question")).to_have_value("secnod")
    await page.locator("#question").fill("second")
    await page.locator("#question").press("Enter")
    await expect(last_reply(page)).to_have_text("You said: second")
    await expect(questions).to_have_text(["first", "second"])
    await expect(page.locator(".bubble.bot")).to_have_count(2)
    sent = [(m["role"], m["content"]) for m in fake.requests[-1].messages[1:]]
    assert sent == [("user", "first"), ("assistant", "You said: first"), ("user", "second")]
    await page.reload()  # as stored
    await expect(page.locator(".bubble.you")).to_have_text(["first", "second"])
