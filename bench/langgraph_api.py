"""The benchmark's two objects behind LangGraph's own server, `langgraph-api` in memory.

That is what `langgraph dev --no-reload` runs: `python -m langgraph_api.cli`, whose `run_server`
is what `langgraph dev` (langgraph-cli, not installed) calls, on the in-memory runtime
(`langgraph-runtime-inmem`): uvicorn without reload, one process, runs on its event loop.
It lives in a virtualenv of its own, `.venv-langgraph` at the repository root, made from
`bench/langgraph-requirements.txt` (`ensure_venv`), since its pins would fight ours; this
module is imported by our virtualenv too, so it imports only the standard library and httpx at
module level: what needs LangGraph runs inside the server.

Served as `lcel` (the LCEL chain of `bench/served_chains.py` as a one-node
`StateGraph(MessagesState)`, since a chain is not a graph) and `agent` (`create_agent`'s graph
as it is), both on `model_for(BENCH_UPSTREAM)`, built once when the server loads them. Replies
are stateless runs, `POST /runs/stream` with `stream_mode` "messages-tuple".

Its in-memory runtime hands runs to its workers by polling, every 0.5 s, for runs made before
the poll's wait began: a run waits 0.5 to 1 s before it starts, and its time to first token
shows it (about 1 s for replies one after another).

Nothing leaves the machine: LangSmith tracing off, no API or license key (so no metadata
beacon), no PyPI version check, no browser, no tunnel.

`python -m bench.langgraph_api`: a smoke check against the fake model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.cpu import cpu_seconds_tree

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-langgraph"
REQUIREMENTS = Path(__file__).with_name("langgraph-requirements.txt")
STAMP = VENV / "requirements.sha256"
TOKEN = " tok"
AI_TYPES = ("AIMessageChunk", "ai")  # message types of the model's text in the stream
# Questions for `reply`, formatted with the number of tokens asked for.
LCEL_QUESTION = "bench tokens={tokens}"
AGENT_QUESTION = "bench tokens={tokens} tool=lookup"

# The module langgraph-api loads the graphs from (written to a temporary folder, named in its
# langgraph.json): module-level graphs, so they are built once, not once a run as a factory
# function would be.
GRAPHS_MODULE = """\
from bench.langgraph_api import agent_graph, lcel_graph

lcel = lcel_graph()
agent = agent_graph()
"""

# Environment variables that would make the server talk to LangSmith (tracing, the metadata
# beacon, license checks) when inherited; removed from its environment.
LANGSMITH_KEYS = (
    "LANGSMITH_API_KEY",
    "LANGCHAIN_API_KEY",
    "LANGSMITH_CONTROL_PLANE_API_KEY",
    "LANGGRAPH_CLOUD_LICENSE_KEY",
    "LANGSMITH_ENDPOINT",
    "LANGCHAIN_ENDPOINT",
    "LSD_DD_API_KEY",
    "CUSTOM_LSD_DD_API_KEY",
)


def ensure_venv() -> Path | None:
    """The python of `.venv-langgraph`, made or brought up to date from the requirements file.

    pip runs only when the requirements file changed since the last successful install (a
    stamp in the virtualenv holds its hash). None, after a sentence saying why, if it failed.
    """
    python = VENV / "bin" / "python"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return python
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)  # python3, not our venv's
        if not run_step([base, "-m", "venv", str(VENV)], "creating it"):
            return None
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if not run_step([*pip, "-r", str(REQUIREMENTS)], f"pip install -r {REQUIREMENTS.name}"):
        return None
    STAMP.write_text(wanted + "\n")
    return python


def run_step(command: list[str], what: str) -> bool:
    """Run one step of making the virtualenv; False, after a sentence saying so, if it failed."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return True
    lines = done.stderr.strip().splitlines() or ["no output"]
    last = ([line for line in lines if line.startswith("ERROR")] or lines)[-1]
    print(f"LangGraph's server left out: {what} for {VENV.name} failed ({last}).")
    return False


def lcel_graph() -> Any:
    """The LCEL chain as a one-node graph: the node invokes the chain, adds its reply."""
    from langchain_core.messages import BaseMessage
    from langgraph.graph import START, MessagesState, StateGraph

    from bench.served_chains import lcel, model_for

    chain = lcel(model_for(os.environ["BENCH_UPSTREAM"]))

    async def respond(state: MessagesState) -> dict[str, list[BaseMessage]]:
        answer: BaseMessage = await chain.ainvoke({"messages": state["messages"]})
        return {"messages": [answer]}

    graph = StateGraph(MessagesState)
    graph.add_node("respond", respond)
    graph.add_edge(START, "respond")
    return graph.compile()


def agent_graph() -> Any:
    """The two-step agent: `create_agent` returns a compiled graph, served as it is."""
    from bench.served_chains import agent, model_for

    return agent(model_for(os.environ["BENCH_UPSTREAM"]))


def server_env(upstream: str) -> dict[str, str]:
    """The server's environment: offline, quiet, the repository importable."""
    env = {key: value for key, value in os.environ.items() if key not in LANGSMITH_KEYS}
    path = [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    return {
        **env,
        "BENCH_UPSTREAM": upstream,
        "PYTHONPATH": os.pathsep.join(path),
        "LANGSMITH_TRACING": "false",
        "LANGSMITH_TRACING_V2": "false",
        "LANGCHAIN_TRACING_V2": "false",
        "LANGCHAIN_TRACING": "false",
        "LANGGRAPH_NO_VERSION_CHECK": "true",  # else a PyPI request at start
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


@contextmanager
def serve(
    python: Path, upstream: str, port: int, *, jobs: int = 10
) -> Iterator[subprocess.Popen[str]]:
    """LangGraph's server on 127.0.0.1:`port`, graphs "lcel" and "agent", until the block ends.

    `jobs` runs at a time (`--n-jobs-per-worker`; `langgraph dev` defaults to 1, the server
    itself to 10). It runs in a temporary folder, which holds its langgraph.json, the module
    it loads the graphs from, the files its dev persistence flushes the in-memory state to every
    10 s, and its log (shown if it does not come up); the repository is on its PYTHONPATH.
    """
    with tempfile.TemporaryDirectory(prefix="langgraph-api-") as folder:
        config = Path(folder) / "langgraph.json"
        (Path(folder) / "served_graphs.py").write_text(GRAPHS_MODULE)
        graphs = {name: f"{folder}/served_graphs.py:{name}" for name in ("lcel", "agent")}
        config.write_text(json.dumps({"graphs": graphs}))
        log_path = Path(folder) / "server.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [
                    *(str(python), "-m", "langgraph_api.cli", "--config", str(config)),
                    *("--host", "127.0.0.1", "--port", str(port), "--no-reload"),
                    *("--n-jobs-per-worker", str(jobs)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env=server_env(upstream),
                cwd=folder,  # where its dev persistence writes (.langgraph_api/)
            )
            try:
                wait_until_ready(proc, port, log_path)
                yield proc
            finally:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_until_ready(proc: subprocess.Popen[str], port: int, log: Path) -> None:
    """Until `/ok` answers on `port` (the graphs are loaded by then); else the log's tail."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ok", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"LangGraph's server did not come up on port {port}:\n{tail}")


async def reply(
    client: httpx.AsyncClient, base: str, graph: str, tokens: int, question: str
) -> tuple[float, int]:
    """One stateless run of `graph`, its model tokens streamed: seconds to the first token,
    tokens received.

    `question` is formatted with `tokens` (`LCEL_QUESTION`, `AGENT_QUESTION`). Only the
    model's text counts: the agent's tool call and the tool's result carry none.
    """
    body = {
        "assistant_id": graph,
        "input": {"messages": [{"role": "human", "content": question.format(tokens=tokens)}]},
        "stream_mode": "messages-tuple",
    }
    sent = time.perf_counter()
    first = 0.0
    got = 0
    async with client.stream("POST", f"{base}/runs/stream", json=body) as response:
        response.raise_for_status()
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:") and event == "error":
                raise RuntimeError(f"{graph} run failed: {line.removeprefix('data:').strip()}")
            elif line.startswith("data:") and event == "messages":
                message, _metadata = json.loads(line.removeprefix("data:"))
                text = message.get("content") if message.get("type") in AI_TYPES else None
                if isinstance(text, str) and TOKEN in text:
                    if not got:
                        first = time.perf_counter() - sent
                    got += text.count(TOKEN)
    return first, got


async def smoke(base: str, pid: int) -> None:
    """Three replies of 50 tokens from each graph; CPU in clock ticks (10 ms), so coarse."""
    async with httpx.AsyncClient(timeout=60) as client:
        for graph, question in (("lcel", LCEL_QUESTION), ("agent", AGENT_QUESTION)):
            await reply(client, base, graph, 3, question)  # warm
            for _ in range(3):
                before = cpu_seconds_tree(pid)
                first, got = await reply(client, base, graph, 50, question)
                spent = cpu_seconds_tree(pid) - before
                per_token = spent / got * 1e6 if got else float("nan")
                print(
                    f"{graph:5} first token {first * 1000:6.1f} ms, {got} tokens, "
                    f"server CPU {per_token:5.0f} µs per token"
                )
                assert got == 50, f"{graph}: {got} tokens, not 50"


def main() -> None:
    from backend.process.server import free_port
    from bench.run import fake_model

    started = time.monotonic()
    python = ensure_venv()
    if python is None:
        return
    print(f"{VENV.name} ready in {time.monotonic() - started:.1f} s")
    port = free_port()
    with fake_model() as upstream, serve(python, upstream, port) as server:
        asyncio.run(smoke(f"http://127.0.0.1:{port}", server.pid))


if __name__ == "__main__":
    main()
