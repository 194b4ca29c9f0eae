"""The embedded model through the whole stack, against calling its llama_cpp.server directly.

Starts `python -m backend` with no model configured (so it runs the bundled SmolLM2), times
start-up until the first answer, then alternates the same greedy (temperature 0) question
through a WebSocket and straight to the child's OpenAI-compatible endpoint with the openai SDK.
`python -m bench.local [--rounds N]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

import httpx
import openai
from websockets.asyncio.client import connect

from backend.config.settings import DEFAULT_SYSTEM_PROMPT
from backend.model.embedded import bundled_model_path, gguf_token_counter
from backend.process.server import free_port
from bench.run import process
from bench.sdk import HttpClient, sdk_text

QUESTION = "Explain in a few sentences how a lighthouse works."
REPLY_TOKENS = 128


@dataclass
class Timing:
    """One reply: seconds to the first token, seconds from first token to last, its text."""

    first: float
    rest: float
    text: str


async def through_socket(url: str) -> Timing:
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "reset"}))
        await ws.recv()
        sent = time.perf_counter()
        await ws.send(QUESTION)
        first = 0.0
        parts: list[str] = []
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "stream" and frame["sender"] == "bot":
                first = first or time.perf_counter() - sent
                parts.append(frame["message"])
            elif frame["type"] == "end":
                return Timing(first, time.perf_counter() - sent - first, "".join(parts))


async def through_sdk_route(client: HttpClient) -> Timing:
    """The same question as a new chat on `POST /api/chat` (the Vercel AI SDK's route)."""
    first, total, text = await sdk_text(client, uuid.uuid4().hex[:16], QUESTION)
    return Timing(first, total - first, text)


async def direct(client: openai.AsyncOpenAI, model: str) -> Timing:
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": QUESTION},
        ],
        temperature=0.0,
        max_tokens=REPLY_TOKENS,
        stream=True,
    )
    first = 0.0
    parts: list[str] = []
    async for chunk in stream:
        text = chunk.choices[0].delta.content if chunk.choices else None
        if text:
            first = first or time.perf_counter() - sent
            parts.append(text)
    return Timing(first, time.perf_counter() - sent - first, "".join(parts))


async def first_answer(url: str) -> None:
    while True:
        try:
            async with connect(url) as ws:
                await ws.send("Hello")
                while json.loads(await ws.recv())["type"] != "end":
                    pass
                return
        except OSError:
            await asyncio.sleep(0.05)


async def measure(port: int, rounds: int, started: float) -> None:
    url = f"ws://127.0.0.1:{port}/chat"
    await first_answer(url)
    print(f"start-up until the first answer: {time.perf_counter() - started:.2f} s")
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"http://127.0.0.1:{port}/healthz")).json()
    model_path = health["local"]["model_path"]
    count = gguf_token_counter(model_path)
    client = openai.AsyncOpenAI(base_url=health["upstream"], api_key="none", max_retries=0)
    ours: list[Timing] = []
    theirs: list[Timing] = []
    sdk: list[Timing] = []
    async with HttpClient(port) as http_client:
        for _ in range(rounds):
            ours.append(await through_socket(url))
            theirs.append(await direct(client, health["model"]))
            sdk.append(await through_sdk_route(http_client))
    await client.close()

    def rate(timing: Timing) -> float:
        from langchain_core.messages import AIMessage

        tokens = count([AIMessage(timing.text)]) - 6
        return tokens / timing.rest if timing.rest > 0 else 0.0

    same = sum(a.text == b.text for a, b in zip(ours, theirs, strict=True))
    ttft_ours = statistics.median(t.first for t in ours)
    ttft_direct = statistics.median(t.first for t in theirs)
    tps_ours = statistics.median(rate(t) for t in ours)
    tps_direct = statistics.median(rate(t) for t in theirs)
    print(f"same text both ways in {same} of {rounds} rounds")
    print(
        f"time to first token p50: direct {ttft_direct * 1000:.0f} ms, through the server "
        f"{ttft_ours * 1000:.0f} ms"
    )
    print(
        f"tokens/s p50: direct {tps_direct:.1f}, through the server {tps_ours:.1f}, "
        f"ratio {tps_ours / tps_direct:.2f}  (target >= 0.9)"
    )
    ttft_sdk = statistics.median(t.first for t in sdk)
    same_sdk = sum(a.text == b.text for a, b in zip(ours, sdk, strict=True))
    tps_sdk = statistics.median(rate(t) for t in sdk)
    print(
        f"the AI SDK route against the WebSocket: time to first token p50 {ttft_sdk * 1000:.0f} "
        f"ms ({ttft_sdk / ttft_ours:.2f}x), tokens/s p50 {tps_sdk:.1f} ({tps_sdk / tps_ours:.2f}x)"
        f"  (target within 10%); same text in {same_sdk} of {rounds}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if bundled_model_path() is None:
        sys.exit("the bundled model is not installed: run `make install`")
    port = free_port()
    env = {k: "" for k in os.environ if k.startswith("OPENAI_")}
    env.update({"CHAT_TEMPERATURE": "0", "CHAT_MAX_REPLY_TOKENS": str(REPLY_TOKENS)})
    started = time.perf_counter()
    with process(["-m", "backend", "--port", str(port)], env):
        asyncio.run(measure(port, args.rounds, started))


if __name__ == "__main__":
    main()
