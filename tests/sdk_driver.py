"""The real Vercel AI SDK against the server: chats in Node (`tests/sdk/driver.mjs`) driven from a
test, and the docs' React example bundled for a browser."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests.harness import UNIT

SDK = Path(__file__).parent / "sdk"
DRIVER = SDK / "driver.mjs"
# The SDK's majors the chats are tested with, by package name in frontend/package.json.
SDK_PACKAGES = {"ai7": "ai", "ai6": "ai6"}


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
async def sdk_driver(base: str, package: str = "ai") -> AsyncIterator[SdkDriver]:
    """A driver whose chats, made with the SDK `package`, talk to the server at `base`."""
    process = await asyncio.create_subprocess_exec(
        "node",
        str(DRIVER),
        package,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        yield SdkDriver(process, f"{base}/api/chat")
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


FRONTEND = Path(__file__).parent.parent / "frontend"
DOCS = Path(__file__).parent.parent / "docs" / "protocol.md"
EXAMPLE_SECTION = "## Using the Vercel AI SDK"


def docs_example() -> str:
    """The React example of the docs' section on the AI SDK, verbatim: its one `tsx` block."""
    docs = DOCS.read_text()
    section = docs[docs.index(EXAMPLE_SECTION) :]
    section = section[: section.find("\n## ", 1)]
    blocks = re.findall(r"^```tsx\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"{EXAMPLE_SECTION!r} should have one tsx block, not {len(blocks)}"
    return str(blocks[0])


@functools.cache
def example_bundle(example: str) -> str:
    """`example` (a React module exporting `Chat`) in the page `tests/sdk/example_page.tsx`
    mounts, bundled by esbuild with React and `@ai-sdk/react` from frontend/node_modules."""
    with tempfile.TemporaryDirectory() as folder:
        # Side by side, so the page imports the example as `./example`.
        shutil.copy(SDK / "example_page.tsx", Path(folder) / "page.tsx")
        (Path(folder) / "example.tsx").write_text(example)
        out = Path(folder) / "page.js"
        subprocess.run(
            [
                str(FRONTEND / "node_modules" / ".bin" / "esbuild"),
                str(Path(folder) / "page.tsx"),
                "--bundle",
                "--format=iife",
                "--platform=browser",
                "--jsx=automatic",
                # React reads this to choose its production build, as an app's bundler sets it.
                '--define:process.env.NODE_ENV="production"',
                "--log-level=warning",
                f"--outfile={out}",
            ],
            check=True,
            # The temporary folder has no node_modules of its own to resolve packages from.
            env={**os.environ, "NODE_PATH": str(FRONTEND / "node_modules")},
        )
        return out.read_text()
