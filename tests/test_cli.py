"""The terminal client against a real server: streaming, piped input, Ctrl-C, no server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time

from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.harness import UNIT, wait_hung_up

Process = asyncio.subprocess.Process


class Cli:
    """The client as a child process, with its three pipes."""

    def __init__(self, process: Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        self.process = process
        self.stdin: asyncio.StreamWriter = process.stdin
        self.stdout: asyncio.StreamReader = process.stdout
        self.stderr: asyncio.StreamReader = process.stderr


async def start_cli(url: str, *args: str, env: dict[str, str] | None = None) -> Process:
    """`python -m frontend.cli URL ARGS...`, with `env` in place of ours (without CHAT_TOKEN)."""
    environment = env or {key: value for key, value in os.environ.items() if key != "CHAT_TOKEN"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "frontend.cli",
        url,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )


async def read_until(stream: asyncio.StreamReader, text: str, within: float = UNIT * 5) -> str:
    """Read `stream` until `text` has appeared; everything read."""
    seen = ""
    async with asyncio.timeout(within):
        while text not in seen:
            chunk = await stream.read(256)
            assert chunk, f"stream ended before {text!r}; got {seen!r}"
            seen += chunk.decode()
    return seen


async def test_reply_streams_to_stdout_as_it_arrives(server: Addressed, fake: FakeUpstream) -> None:
    fake.then(Behaviour(tokens=[f"w{i} " for i in range(10)], delay=0.1))
    cli = Cli(await start_cli(server.ws))
    cli.stdin.write(b"count\n")
    await cli.stdin.drain()
    arrivals: list[tuple[float, str]] = []
    async with asyncio.timeout(UNIT * 5):
        while "w9" not in "".join(text for _, text in arrivals):
            chunk = await cli.stdout.read(64)
            arrivals.append((time.monotonic(), chunk.decode()))
    assert arrivals[-1][0] - arrivals[0][0] > 0.6  # the first words came long before the last
    cli.stdin.close()
    rest, _ = await asyncio.wait_for(cli.process.communicate(), UNIT * 5)
    assert cli.process.returncode == 0
    assert (
        "".join(text for _, text in arrivals) + rest.decode()
        == "".join(f"w{i} " for i in range(10)) + "\n"
    )


async def test_piped_questions_are_asked_in_turn(server: Addressed, fake: FakeUpstream) -> None:
    cli = await start_cli(server.ws)
    out, err = await asyncio.wait_for(cli.communicate(b"first\nsecond\n/reset\nthird\n"), UNIT * 5)
    assert cli.returncode == 0, err
    assert out.decode() == "You said: first\nYou said: second\nYou said: third\n"
    assert "Conversation cleared." in err.decode()
    assert [m["content"] for m in fake.requests[1].messages[1:]] == [
        "first",
        "You said: first",
        "second",
    ]
    assert [m["role"] for m in fake.requests[2].messages] == ["system", "user"]


async def test_a_conversation_is_rejoined_with_the_url_the_client_gives(
    server: Addressed, fake: FakeUpstream
) -> None:
    """The client says how to come back to its conversation. Come back that way, it replays
    the conversation, then waits for the reply to its own question, not for the replayed
    turn's end."""
    cli = await start_cli(server.ws)
    out, err = await asyncio.wait_for(cli.communicate(b"hello\n"), UNIT * 5)
    assert out.decode() == "You said: hello\n"
    shown = re.search(r"\[to come back to it: (\S+)\]", err.decode())
    assert shown is not None, err
    again = await start_cli(shown.group(1))
    out, err = await asyncio.wait_for(again.communicate(b"again\n"), UNIT * 5)
    assert again.returncode == 0, err
    assert out.decode() == "You said: hello\nYou said: again\n"
    assert "[Joined a conversation of 1 turn.]" in err.decode()


async def test_ctrl_c_stops_the_reply_and_the_client_stays(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[" more"] * 500, delay=0.02), Behaviour(tokens=["after"]))
    cli = Cli(await start_cli(server.ws))
    cli.stdin.write(b"go on\n")
    await cli.stdin.drain()
    await read_until(cli.stdout, "more more more")
    cli.process.send_signal(signal.SIGINT)
    await read_until(cli.stderr, "[stopped]")
    await wait_hung_up(fake, 0)
    assert cli.process.returncode is None
    cli.stdin.write(b"and now?\n")
    cli.stdin.close()
    out, _ = await asyncio.wait_for(cli.process.communicate(), UNIT * 5)
    assert out.decode().endswith("after\n")
    assert cli.process.returncode == 0


async def test_unreachable_server_is_a_clear_error() -> None:
    cli = await start_cli("ws://127.0.0.1:9/chat")
    out, err = await asyncio.wait_for(cli.communicate(b"hello\n"), UNIT * 5)
    assert cli.returncode == 2
    assert "Cannot reach the chat server at ws://127.0.0.1:9/chat" in err.decode()
    assert out == b""


async def test_ctrl_c_at_the_prompt_quits(server: Addressed, fake: FakeUpstream) -> None:
    cli = Cli(await start_cli(server.ws))
    cli.stdin.write(b"one\n")
    await cli.stdin.drain()
    await read_until(cli.stdout, "You said: one\n")
    cli.process.send_signal(signal.SIGINT)
    await asyncio.wait_for(cli.process.wait(), UNIT * 5)
    assert cli.process.returncode == 0
