"""The chat page on long work, in headless Chromium (Debian's): does rendering keep up?

Starts the fake model and `python -m backend` (SQLite), opens the page in Chromium, and:

- **a long reply**: asks for N tokens at R a second (prose: a blank line every 50 tokens) and,
  every half second, reads Chromium's own count of main-thread task time (the DevTools
  protocol's `Performance.getMetrics`, `TaskDuration`) and the stream frames the page has
  received. Main-thread milliseconds per frame over the first tenth of the reply and over the
  last tenth: rendering that redid the whole reply each frame would make the last several times
  the first. Long tasks (over 50 ms) are counted by a `PerformanceObserver` in the page.
- **a long conversation**: 200 turns asked over a socket, then the page opened on it: time from
  navigation until the last reply is rendered.

`python -m bench.page [--quick]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from playwright.async_api import Page, async_playwright
from websockets.asyncio.client import connect

from backend.process.server import free_port
from bench.run import fake_model, process, server_env, wait_for_port

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
LONG_TASKS = """
window.longTasks = 0;
new PerformanceObserver((list) => { window.longTasks += list.getEntries().length; })
  .observe({ type: "longtask", buffered: true });
"""
TURNS = 200


async def task_seconds(session: object) -> float:
    metrics = await session.send("Performance.getMetrics")  # type: ignore[attr-defined]
    return float(next(m["value"] for m in metrics["metrics"] if m["name"] == "TaskDuration"))


async def long_reply(page: Page, tokens: int, rate: float) -> dict[str, float]:
    """Main-thread ms per stream frame at the start and at the end of one long reply."""
    frames = 0

    def counted(payload: str | bytes) -> None:
        nonlocal frames
        if '"type":"stream"' in str(payload) and '"sender":"bot"' in str(payload):
            frames += 1

    page.on("websocket", lambda ws: ws.on("framereceived", counted))
    await page.reload()
    await page.wait_for_selector("#connection[data-state='open']")
    await page.evaluate(LONG_TASKS)
    session = await page.context.new_cdp_session(page)
    await session.send("Performance.enable")
    question = f"bench tokens={tokens} delay={1 / rate:.4f} para=50"
    await page.locator("#question").fill(question)
    await page.locator("#question").press("Enter")
    samples: list[tuple[float, int]] = []  # (task seconds, frames)
    while True:
        samples.append((await task_seconds(session), frames))
        if await page.locator(".bubble.bot[data-status]").count():
            break
        await asyncio.sleep(0.5)
    long_tasks = float(await page.evaluate("window.longTasks"))
    total = samples[-1][1]

    def per_frame(low: float, high: float) -> float:
        inside = [s for s in samples if low * total <= s[1] <= high * total]
        if len(inside) < 2 or inside[-1][1] == inside[0][1]:
            return float("nan")
        return (inside[-1][0] - inside[0][0]) * 1000 / (inside[-1][1] - inside[0][1])

    return {
        "start": per_frame(0.02, 0.12),
        "end": per_frame(0.88, 0.98),
        "frames": float(total),
        "long_tasks": long_tasks,
    }


async def long_conversation(url: str, base: str, page: Page) -> float:
    """Seconds from navigating to a conversation of `TURNS` turns to its last reply shown."""
    async with connect(url) as ws:
        conversation = json.loads(await ws.recv())["conversation"]
        for n in range(TURNS):
            await ws.send(f"bench tokens=60 para=20 turn={n}")
            while json.loads(await ws.recv())["type"] != "end":
                pass
    started = time.perf_counter()
    await page.goto(f"{base}/?conversation={conversation}")
    await page.wait_for_function(
        f"document.querySelectorAll('.bubble.bot[data-status]').length >= {TURNS}",
        timeout=120_000,
    )
    return time.perf_counter() - started


async def run(quick: bool) -> None:
    tokens, rate = (4000, 200.0) if quick else (20000, 50.0)
    with fake_model() as upstream, tempfile.TemporaryDirectory() as folder:
        port = free_port()
        env = server_env(upstream, CHAT_DATABASE_URL=f"sqlite+aiosqlite:///{folder}/chat.db")
        with process(["-m", "backend", "--port", str(port)], env=env):
            wait_for_port(port)
            base = f"http://127.0.0.1:{port}"
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(
                    executable_path=str(CHROMIUM), headless=True, args=ARGS
                )
                page = await browser.new_page(viewport={"width": 1000, "height": 800})
                await page.goto(base)
                reply = await long_reply(page, tokens, rate)
                opened = await long_conversation(f"ws://127.0.0.1:{port}/chat", base, page)
                await browser.close()
    ratio = reply["end"] / reply["start"]
    print(f"a {tokens:,}-token reply at {rate:g} tokens/s, {reply['frames']:.0f} stream frames:")
    print(
        f"  main thread per frame: first tenth {reply['start']:.2f} ms, last tenth "
        f"{reply['end']:.2f} ms, ratio {ratio:.2f} (target <= 2); "
        f"long tasks {reply['long_tasks']:.0f}"
    )
    print(f"a conversation of {TURNS} turns opened and rendered in {opened:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a shorter, faster reply")
    asyncio.run(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
