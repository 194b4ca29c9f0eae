"""The chat page's comforts in a real headless Chromium: code highlighted and copied, steps,
what a reply cost, rendering that never redoes what it did, dark theme, Esc, accessibility,
and the conversation list: searched, renamed in every tab, paged, a drawer on a phone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    Route,
    WebSocketRoute,
    expect,
)

from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import fake_settings
from tests.harness import UNIT, LiveServer, SettingsFactory, live_server, temp_database
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


async def serious_violations(page: Page) -> list[str]:
    """What axe-core finds serious or critical on the page as it is now."""
    if not await page.evaluate("typeof axe !== 'undefined'"):
        await page.add_script_tag(path=str(AXE))
    found: list[str] = await page.evaluate(
        "axe.run(document, {resultTypes: ['violations']}).then(r => r.violations"
        ".filter(v => ['serious', 'critical'].includes(v.impact))"
        ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', ')))"
    )
    return found


async def page_width(page: Page) -> int:
    """How wide the page's content is: more than the window means it scrolls sideways."""
    width: int = await page.evaluate("document.documentElement.scrollWidth")
    return width


async def chat_about(page: Page, question: str, new: bool = True) -> None:
    """Ask `question` (in a new conversation unless `new` is false) and wait for the reply."""
    if new and await page.locator(".bubble").count():
        await page.locator("#new-chat").click()
        await expect(page.locator(".bubble")).to_have_count(0)
    await ask(page, question)
    await expect(last_reply(page)).to_have_attribute("data-status", "completed")


def shown_id(page: Page) -> str:
    """The id of the conversation the page shows, from its URL."""
    return parse_qs(urlsplit(page.url).query)["conversation"][0]


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


async def test_stop_while_the_socket_reconnects_still_stops(
    context: BrowserContext, page_server: LiveServer, fake: FakeUpstream
) -> None:
    """Stop pressed while the page's socket is down (reconnecting) goes over HTTP: the reply
    on the server ends, and the model's request is closed."""
    fake.then(Behaviour(tokens=[f" t{i}" for i in range(600)], delay=0.02))
    page = await context.new_page()
    sockets: list[WebSocketRoute] = []

    async def through(route: WebSocketRoute) -> None:
        sockets.append(route)
        if len(sockets) == 1:
            route.connect_to_server()  # the first socket works; the next never connect

    await page.route_web_socket(lambda url: True, through)
    await page.goto(f"{page_server.http}/")
    await ask(page, "go on")
    await expect(last_reply(page)).to_contain_text("t5")
    conversation = shown_id(page)
    await sockets[0].close(code=1011)
    await expect(page.locator("#connection")).not_to_have_attribute("data-state", "open")
    await page.locator("#stop").click()
    record = fake.requests[-1]
    await fake.until(lambda: record.hung_up_at is not None, UNIT * 2)
    async with httpx.AsyncClient(base_url=page_server.http, timeout=UNIT) as client:
        stored = (await client.get(f"/api/conversations/{conversation}")).json()
    assert stored["messages"][-1]["status"] == "interrupted"
    await page.close()


async def test_a_question_asked_while_the_socket_opens_is_sent_once_it_is_open(
    context: BrowserContext, page_server: LiveServer
) -> None:
    page = await context.new_page()

    async def slowly(route: WebSocketRoute) -> None:
        await asyncio.sleep(1.0)
        route.connect_to_server()

    await page.route_web_socket(lambda url: True, slowly)
    await page.goto(f"{page_server.http}/")
    await ask(page, "asked early")
    await expect(page.locator("#status")).to_contain_text("Not connected yet")
    await expect(last_reply(page)).to_have_text("You said: asked early")
    await expect(page.locator("#question")).to_have_value("")
    await expect(page.locator("#status")).not_to_contain_text("Not connected yet")
    await page.close()


async def test_a_new_conversation_is_listed_as_it_is_asked(
    context: BrowserContext, page_server: LiveServer, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[f" t{i}" for i in range(300)], delay=0.02))
    page = await open_chat(context, page_server)
    question = "a conversation listed before its reply ends"
    await ask(page, question)
    await expect(page.locator("#conversations .open").first).to_have_text(question)
    await expect(last_reply(page)).to_have_attribute("aria-busy", "true")  # still streaming
    await page.keyboard.press("Escape")
    await page.close()


async def test_on_a_phone_a_long_questions_edit_button_is_on_screen(
    context: BrowserContext, page_server: LiveServer
) -> None:
    page = await open_chat(context, page_server, width=375)
    await ask(page, "a rather long question that fills the width of a phone " * 3)
    await expect(last_reply(page)).to_have_attribute("data-status", "completed")
    box = await page.locator(".edit-question").bounding_box()
    assert box is not None
    assert box["x"] >= 0
    assert box["x"] + box["width"] <= 375
    assert await page_width(page) <= 375
    await page.close()


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
        assert await serious_violations(page) == []
        # With a search typed, and a rename being typed.
        await page.get_by_role("searchbox", name="Search conversations").fill("show")
        await expect(page.locator("#conversations li")).not_to_have_count(0)
        await page.locator("#conversations li .rename").first.click()
        await expect(page.locator(".rename-input")).to_be_focused()
        assert await serious_violations(page) == []
        await page.keyboard.press("Escape")
        # On a phone, with the drawer open over the chat.
        await page.set_viewport_size({"width": 375, "height": 700})
        await page.get_by_role("button", name="Conversations").click()
        await expect(page.locator("#sidebar")).to_be_visible()
        assert await serious_violations(page) == []
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


async def test_search_finds_a_word_of_a_reply_and_clearing_shows_all(
    context: BrowserContext, page_server: LiveServer, fake: FakeUpstream
) -> None:
    page = await open_chat(context, page_server)
    fake.then(Behaviour(tokens=["Leaves make sugar ", "by photosynthesis."]))
    await chat_about(page, "How do plants eat?")
    await chat_about(page, "Name a river")
    await chat_about(page, "Name a mountain")
    titles = page.locator("#conversations li .open")
    await expect(titles.first).to_have_text("Name a mountain")
    everything = await titles.all_inner_texts()
    assert len(everything) >= 3
    search = page.get_by_role("searchbox", name="Search conversations")
    note = page.locator("#conversations-note")
    # "photo" begins a word of one reply only: not of its title, nor of anything else.
    await search.fill("photo")
    await expect(titles).to_have_text(["How do plants eat?"])
    await search.fill("photo river")
    await expect(note).to_have_text("No conversations match.")
    await expect(titles).to_have_count(0)
    await search.fill("")
    await expect(titles).to_have_text(everything)
    await expect(note).to_have_text("")
    # An answer that comes after a newer one's is dropped, not shown over it.
    asked = asyncio.Event()
    release = asyncio.Event()

    async def held(route: Route) -> None:
        asked.set()
        await release.wait()
        await route.continue_()

    await page.route(lambda url: "q=said" in url, held)
    async with page.expect_response(lambda response: "q=said" in response.url) as late:
        await search.fill("said")  # every echoed reply says "You said: ..."
        await asyncio.wait_for(asked.wait(), UNIT)
        await search.fill("photo")
        await expect(titles).to_have_text(["How do plants eat?"])
        release.set()
    await late.value
    await page.wait_for_timeout(UNIT * 100)
    await expect(titles).to_have_text(["How do plants eat?"])


async def test_a_rename_shows_in_every_tab_and_is_kept(
    context: BrowserContext, page_server: LiveServer, fake: FakeUpstream
) -> None:
    first = await open_chat(context, page_server)
    await chat_about(first, "Plan the vegetable patch")
    conversation = shown_id(first)
    second = await open_chat(context, page_server)

    def item(page: Page) -> Locator:
        return page.locator(f'#conversations li[data-id="{conversation}"]')

    await expect(item(second).locator(".open")).to_have_text("Plan the vegetable patch")
    # A blank name is refused with the server's sentence; Esc keeps the name it had.
    async with httpx.AsyncClient(base_url=page_server.http, timeout=UNIT) as client:
        refused = await client.patch(f"/api/conversations/{conversation}", json={"title": " "})
    assert refused.status_code == 422
    await item(first).get_by_role("button", name="Rename “Plan the vegetable patch”").click()
    box = item(first).get_by_role("textbox")
    await expect(box).to_be_focused()
    await expect(box).to_have_value("Plan the vegetable patch")
    await box.fill(" ")
    await box.press("Enter")
    await expect(first.locator("#status")).to_have_text(refused.json()["detail"])
    await expect(box).to_be_focused()
    await box.press("Escape")
    await expect(box).to_have_count(0)
    await expect(item(first).locator(".open")).to_have_text("Plan the vegetable patch")
    await expect(item(first).locator(".open")).to_be_focused()
    # Renamed: at once here, in the other tab without a reload, and for good.
    await item(first).locator(".rename").click()
    await box.fill("Garden notes")
    await box.press("Enter")
    await expect(item(first).locator(".open")).to_have_text("Garden notes")
    await expect(item(first).locator(".open")).to_be_focused()
    await expect(item(second).locator(".open")).to_have_text("Garden notes")
    await expect(item(second).locator(".delete")).to_have_attribute(
        "aria-label", "Delete “Garden notes”"
    )
    await chat_about(first, "And the herbs?", new=False)  # a later question keeps the name
    await expect(item(first).locator(".open")).to_have_text("Garden notes")
    await second.reload()
    await expect(item(second).locator(".open")).to_have_text("Garden notes")
    # Renamed on another device: a tab shown again shows it.
    async with httpx.AsyncClient(base_url=page_server.http, timeout=UNIT) as client:
        renamed = await client.patch(
            f"/api/conversations/{conversation}", json={"title": "  Garden plan "}
        )
    assert renamed.json()["title"] == "Garden plan"
    await first.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    await expect(item(first).locator(".open")).to_have_text("Garden plan")
    # A deletion, too, leaves the other tab's list at once.
    await item(first).locator(".delete").click()
    await expect(item(first)).to_have_count(0)
    await expect(item(second)).to_have_count(0)


async def test_the_list_loads_a_page_at_a_time_as_it_scrolls(
    context: BrowserContext, make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    with live_server(make_settings()) as server:
        async with httpx.AsyncClient(base_url=server.http, timeout=UNIT * 5) as client:

            async def start(question: str) -> str:
                accepted = await client.post("/api/conversations", json={"question": question})
                assert accepted.status_code == 202
                conversation: str = accepted.json()["conversation"]
                return conversation

            async def answered(count: int) -> None:
                async with asyncio.timeout(UNIT * 5):
                    while True:
                        listed = await client.get("/api/conversations", params={"limit": 100})
                        found = listed.json()["conversations"]
                        if len(found) == count and all(c["messages"] == 2 for c in found):
                            return
                        await asyncio.sleep(0.05)

            made = [await start(f"Topic number {n}") for n in range(40)]
            await answered(40)
            page = await open_chat(context, server)
            items = page.locator("#conversations li")
            sidebar = page.locator("#sidebar")
            await expect(items).to_have_count(30)
            # One more: each later page now begins one further down, repeating the last shown.
            late = await start("Topic number 40")
            await answered(41)
            listed = await client.get("/api/conversations", params={"limit": 100})
            order = [c["id"] for c in listed.json()["conversations"] if c["id"] != late]
            await sidebar.evaluate("nav => nav.scrollTo(0, nav.scrollHeight)")
            await expect(items).to_have_count(40)
            assert await items.evaluate_all("items => items.map(item => item.dataset.id)") == order
            assert sorted(order) == sorted(made)
            # Search results come a page at a time too.
            await page.get_by_role("searchbox", name="Search conversations").fill("topic")
            await expect(items.first).to_have_attribute("data-id", late)
            await expect(items).to_have_count(30)
            await sidebar.evaluate("nav => nav.scrollTo(0, nav.scrollHeight)")
            await expect(items).to_have_count(41)
            ids = await items.evaluate_all("items => items.map(item => item.dataset.id)")
            assert sorted(ids) == sorted([*made, late])
            # A sidebar taller than a page fills itself, with no scrolling.
            tall = await context.new_page()
            await tall.set_viewport_size({"width": 900, "height": 1600})
            await tall.goto(f"{server.http}/")
            await expect(tall.locator("#conversations li")).to_have_count(41)


async def test_on_a_phone_the_list_is_a_drawer(
    context: BrowserContext, page_server: LiveServer, fake: FakeUpstream
) -> None:
    page = await open_chat(context, page_server, width=375)
    await chat_about(page, "Drawer one")
    await chat_about(page, "Drawer two")
    toggle = page.get_by_role("button", name="Conversations")
    sidebar = page.locator("#sidebar")
    await expect(sidebar).to_be_hidden()
    await expect(toggle).to_have_attribute("aria-expanded", "false")
    assert await page_width(page) <= 375
    await toggle.click()
    await expect(sidebar).to_be_visible()
    await expect(toggle).to_have_attribute("aria-expanded", "true")
    assert await page_width(page) <= 375
    # Picking a conversation shows it and closes the drawer; the composer has the focus.
    await sidebar.get_by_role("button", name="Drawer one", exact=True).click()
    await expect(sidebar).to_be_hidden()
    await expect(toggle).to_have_attribute("aria-expanded", "false")
    await expect(page.locator(".bubble.you")).to_have_text(["Drawer one"])
    await expect(page.locator("#question")).to_be_focused()
    # Esc in a rename cancels the rename only; the button closes the drawer.
    await toggle.click()
    await expect(sidebar).to_be_visible()
    await sidebar.get_by_role("button", name="Rename “Drawer two”").click()
    await page.keyboard.press("Escape")
    await expect(sidebar.locator(".rename-input")).to_have_count(0)
    await expect(sidebar).to_be_visible()
    await toggle.click()
    await expect(sidebar).to_be_hidden()
    await expect(toggle).to_be_focused()
    # While a reply streams, Esc closes the open drawer first; the next Esc stops the reply.
    fake.then(Behaviour(tokens=[f" t{i}" for i in range(400)], delay=0.02))
    await ask(page, "go on")
    bubble = last_reply(page)
    await expect(bubble).to_contain_text("t5")
    await toggle.click()
    await expect(sidebar).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(sidebar).to_be_hidden()
    await expect(toggle).to_be_focused()
    await expect(bubble).to_contain_text("t150")  # still going
    await page.keyboard.press("Escape")
    await expect(bubble).to_have_attribute("data-status", "interrupted")
    assert await page_width(page) <= 375
    # Wide enough for both: the list is beside the chat, and the button gone.
    await page.set_viewport_size({"width": 900, "height": 700})
    await expect(sidebar).to_be_visible()
    await expect(toggle).to_be_hidden()
