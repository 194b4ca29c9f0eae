"""A user's chain served by this server and by LangServe, side by side, in one run.

`python -m bench.chains [--quick]`: the same LCEL chain (`bench/served_chains.py`), on the same
fake model, behind `python -m backend` (`CHAT_CHAIN`) and behind LangServe's `add_routes`
under uvicorn, each in a process of its own. For each: the server's CPU time per token over
sequential replies, and its time-to-first-token overhead over the openai SDK calling the fake
directly, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx
from websockets.asyncio.client import connect

from backend.process.server import free_port
from bench.run import (
    cpu_seconds,
    fake_model,
    frame,
    process,
    server_env,
    ttft_direct,
    until_end,
    wait_for_port,
)

TOKEN = " tok"


async def ours_reply(url: str, tokens: int) -> tuple[float, int]:
    """One reply through our socket: seconds to its first token, tokens received."""
    async with connect(url, compression=None, max_size=None) as ws:
        await ws.recv()  # the opening info frame
        sent = time.perf_counter()
        await ws.send(f"bench tokens={tokens}")
        while True:
            opening = await frame(ws)
            if opening["type"] == "stream" and opening["sender"] == "bot":
                break
        first = time.perf_counter() - sent
        got = opening["message"].count(TOKEN) + await until_end(ws)
    return first, got


async def langserve_reply(client: httpx.AsyncClient, url: str, tokens: int) -> tuple[float, int]:
    """One reply through LangServe's `/stream`: seconds to its first token, tokens received."""
    body = {"input": {"messages": [{"type": "human", "content": f"bench tokens={tokens}"}]}}
    sent = time.perf_counter()
    first = 0.0
    got = 0
    async with client.stream("POST", f"{url}/lcel/stream", json=body) as response:
        response.raise_for_status()
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "data":
                chunk = json.loads(line.removeprefix("data: "))
                text = chunk.get("content") if isinstance(chunk, dict) else None
                if text:
                    if not got:
                        first = time.perf_counter() - sent
                    got += text.count(TOKEN)
            elif event == "end":
                break
    return first, got


Reply = Callable[[int], Awaitable[tuple[float, int]]]


async def measure(name: str, pid: int, reply: Reply, replies: int, tokens: int) -> dict[str, float]:
    """CPU per token and first-token p50 of `replies` sequential replies of `tokens` tokens."""
    await reply(3)  # warm: imports, connections
    firsts = []
    received = 0
    before = cpu_seconds(pid)
    for _ in range(replies):
        first, got = await reply(tokens)
        firsts.append(first)
        received += got
    spent = cpu_seconds(pid) - before
    assert received >= replies * tokens * 0.99, f"{name}: {received} tokens"
    return {"cpu_us": spent / received * 1e6, "ttft_ms": statistics.median(firsts) * 1000}


async def run(quick: bool) -> None:
    replies, tokens, trials = (5, 1000, 20) if quick else (20, 2000, 100)
    with fake_model() as upstream:
        ours_port, theirs_port = free_port(), free_port()
        env = server_env(upstream, CHAT_CHAIN="bench.served_chains:lcel")
        with (
            process(["-m", "backend", "--port", str(ours_port)], env=env) as ours,
            process(
                [
                    "-m",
                    "uvicorn",
                    "--factory",
                    "bench.served_chains:langserve_app",
                    "--port",
                    str(theirs_port),
                    "--log-level",
                    "warning",
                ],
                env={"BENCH_UPSTREAM": upstream},
            ) as theirs,
        ):
            wait_for_port(ours_port)
            wait_for_port(theirs_port)
            direct = statistics.median(await ttft_direct(upstream, trials)) * 1000
            url = f"ws://127.0.0.1:{ours_port}/chat"
            ours_result = await measure(
                "ours", ours.pid, lambda n: ours_reply(url, n), replies, tokens
            )
            async with httpx.AsyncClient(timeout=60) as client:
                base = f"http://127.0.0.1:{theirs_port}"
                theirs_result = await measure(
                    "LangServe",
                    theirs.pid,
                    lambda n: langserve_reply(client, base, n),
                    replies,
                    tokens,
                )
    print(f"the same LCEL chain, {replies} replies x {tokens} tokens, one at a time:")
    for name, result in (("ours", ours_result), ("LangServe", theirs_result)):
        print(
            f"  {name:9} server CPU per token {result['cpu_us']:.0f} µs, time to first token "
            f"p50 {result['ttft_ms']:.1f} ms (overhead {result['ttft_ms'] - direct:.1f} ms)"
        )
    ratio = theirs_result["cpu_us"] / ours_result["cpu_us"]
    print(f"  direct SDK time to first token p50 {direct:.1f} ms; LangServe / ours CPU {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter replies")
    asyncio.run(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
