"""A user's chains served by this server and by LangServe, side by side, in one run.

`python -m bench.chains [--quick]`: the same objects (`bench/served_chains.py`: an LCEL chain
and a two-step `create_agent` agent that calls a tool, then answers), on the same fake model,
behind `python -m backend` (`CHAT_CHAINS`) and behind LangServe's `add_routes` under uvicorn,
each in a process of its own. For each server and chain: the server's CPU time per token over
sequential replies, and its time-to-first-token overhead over the openai SDK calling the fake
directly, measured in the same run. LangServe streams the chain's own `/stream` and the agent's
`/stream_events` (its `/stream` gives graph updates, not tokens). LangGraph's own server
(`langgraph-api` in memory, as `langgraph dev` runs it; see bench/langgraph_api.py) serves the
same two, the chain as a one-node graph, measured after the others, alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial

import httpx
from websockets.asyncio.client import connect

from backend.process.server import free_port
from bench import langgraph_api
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


# Each chain's question options, and the model calls before its first token.
CHAINS = {"lcel": ("", 1), "agent": (" tool=lookup", 2)}


async def ours_reply(url: str, options: str, tokens: int) -> tuple[float, int]:
    """One reply through our socket: seconds to its first token, tokens received."""
    async with connect(url, compression=None, max_size=None) as ws:
        await ws.recv()  # the opening info frame
        sent = time.perf_counter()
        await ws.send(f"bench tokens={tokens}{options}")
        while True:
            opening = await frame(ws)
            if opening["type"] == "stream" and opening["sender"] == "bot":
                break
        first = time.perf_counter() - sent
        got = opening["message"].count(TOKEN) + await until_end(ws)
    return first, got


def streamed_text(chain: str, data: object) -> str | None:
    """The reply text in one of LangServe's `data` events: a message chunk from `/stream`, a
    chat model's chunk among the `/stream_events` events."""
    if not isinstance(data, dict):
        return None
    if chain == "lcel":
        content = data.get("content")
    elif data.get("event") == "on_chat_model_stream":
        content = data["data"]["chunk"].get("content")
    else:
        return None
    return content if isinstance(content, str) else None


async def langserve_reply(
    client: httpx.AsyncClient, url: str, chain: str, tokens: int
) -> tuple[float, int]:
    """One reply through LangServe: seconds to its first token, tokens received."""
    question = f"bench tokens={tokens}{CHAINS[chain][0]}"
    body = {"input": {"messages": [{"type": "human", "content": question}]}}
    route = "stream" if chain == "lcel" else "stream_events"
    sent = time.perf_counter()
    first = 0.0
    got = 0
    async with client.stream("POST", f"{url}/{chain}/{route}", json=body) as response:
        response.raise_for_status()
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "data":
                text = streamed_text(chain, json.loads(line.removeprefix("data: ")))
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


async def run(quick: bool, langgraph: bool) -> None:
    replies, tokens, trials = (5, 1000, 20) if quick else (20, 2000, 100)
    results: dict[str, dict[str, dict[str, float]]] = {chain: {} for chain in CHAINS}
    # Made before anything is measured: its first install takes a while.
    python = langgraph_api.ensure_venv() if langgraph else None
    with fake_model() as upstream:
        ours_port, theirs_port = free_port(), free_port()
        chains = ",".join(f"{chain}=bench.served_chains:{chain}" for chain in CHAINS)
        env = server_env(upstream, CHAT_CHAINS=chains, CHAT_CHAIN="lcel")
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
            async with httpx.AsyncClient(timeout=60) as client:
                base = f"http://127.0.0.1:{theirs_port}"
                for chain, (options, _) in CHAINS.items():
                    url = f"ws://127.0.0.1:{ours_port}/chat?assistant={chain}"
                    results[chain]["ours"] = await measure(
                        "ours", ours.pid, partial(ours_reply, url, options), replies, tokens
                    )
                    results[chain]["LangServe"] = await measure(
                        "LangServe",
                        theirs.pid,
                        partial(langserve_reply, client, base, chain),
                        replies,
                        tokens,
                    )
        if python is not None:
            # Alone, after the others: its run queue polls twice a second even when idle.
            graph_port = free_port()
            with langgraph_api.serve(python, upstream, graph_port) as graphs:
                async with httpx.AsyncClient(timeout=60) as client:
                    base = f"http://127.0.0.1:{graph_port}"
                    for chain, (options, _) in CHAINS.items():
                        question = f"bench tokens={{tokens}}{options}"
                        results[chain]["LangGraph"] = await measure(
                            "LangGraph",
                            graphs.pid,
                            partial(langgraph_api.reply, client, base, chain, question=question),
                            replies,
                            tokens,
                        )
    print(
        f"{replies} replies x {tokens} tokens, one at a time; "
        f"direct SDK first token p50 {direct:.1f} ms"
    )
    for chain, by_server in results.items():
        calls = CHAINS[chain][1]
        what = "LCEL chain" if chain == "lcel" else "two-step agent (a tool call, then the answer)"
        print(f"the same {what}; overhead over {calls} direct model call(s):")
        for name, result in by_server.items():
            overhead = result["ttft_ms"] - calls * direct
            ratio = result["cpu_us"] / by_server["ours"]["cpu_us"]
            print(
                f"  {name:9} server CPU per token {result['cpu_us']:.0f} µs ({ratio:.2f}x ours), "
                f"time to first token p50 {result['ttft_ms']:.1f} ms (overhead {overhead:.1f} ms)"
            )
    if langgraph and python is None:
        print("LangGraph's server was not measured: its virtualenv could not be made.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter replies")
    parser.add_argument(
        "--no-langgraph",
        action="store_true",
        help="leave out LangGraph's server (its virtualenv, .venv-langgraph, takes a while)",
    )
    args = parser.parse_args()
    asyncio.run(run(args.quick, not args.no_langgraph))


if __name__ == "__main__":
    main()
