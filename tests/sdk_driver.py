"""Chats made with the real Vercel AI SDK, in Node, driven from a test (`tests/sdk/driver.mjs`)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests.harness import UNIT

DRIVER = Path(__file__).parent / "sdk" / "driver.mjs"


class SdkDriver:
    """Sends the driver one command at a time and returns its answer: the chat's state."""

    def __init__(self, process: asyncio.subprocess.Process, api: str) -> None:
        self.process = process
        self.api = api

    async def do(self, op: str, chat: str = "a", within: float = UNIT * 5, **fields: Any) -> Any:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        command = {"op": op, "chat": chat, **fields}
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), within)
        assert line, f"the SDK driver exited during {command}"
        answer: dict[str, Any] = json.loads(line)
        assert answer.pop("ok"), answer["failure"]
        return answer

    async def new(self, chat_id: str, chat: str = "a", **headers: str) -> Any:
        return await self.do("new", chat, id=chat_id, api=self.api, headers=headers)

    async def mid_reply(self, chat_id: str, question: str, chars: int) -> Any:
        """A new chat (named "a") that has asked `question` and shown `chars` of the reply."""
        await self.new(chat_id)
        await self.do("send", text=question, wait=False)
        return await self.do("wait_text", chars=chars)


def reply_text(state: dict[str, Any]) -> str:
    """The text of the chat's last message, if it is the assistant's."""
    last = state["messages"][-1] if state["messages"] else None
    if last is None or last["role"] != "assistant":
        return ""
    return "".join(part["text"] for part in last["parts"] if part["type"] == "text")


@asynccontextmanager
async def sdk_driver(base: str) -> AsyncIterator[SdkDriver]:
    """A driver whose chats talk to the server at `base` (its `/api/chat`)."""
    process = await asyncio.create_subprocess_exec(
        "node", str(DRIVER), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield SdkDriver(process, f"{base}/api/chat")
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


FRONTEND = Path(__file__).parent.parent / "frontend"


@functools.cache
def browser_bundle() -> str:
    """The SDK's `Chat` for a plain page (`tests/sdk/browser_chat.mjs`), bundled by esbuild."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ai-sdk.js"
        subprocess.run(
            [
                str(FRONTEND / "node_modules" / ".bin" / "esbuild"),
                str(Path(__file__).parent / "sdk" / "browser_chat.mjs"),
                "--bundle",
                "--format=iife",
                "--platform=browser",
                "--log-level=warning",
                f"--outfile={out}",
            ],
            check=True,
            env={**os.environ, "NODE_PATH": str(FRONTEND / "node_modules")},
        )
        return out.read_text()
