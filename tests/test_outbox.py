"""The socket writer: order, merging of queued tokens, a bound on what a client leaves unread."""

from __future__ import annotations

import asyncio
import json

import pytest

from backend.errors import ClientGone
from backend.outbox import Outbox
from schemas import ChatResponse


async def test_tokens_queued_behind_a_slow_socket_merge_into_one_frame() -> None:
    sent: list[str] = []
    gate = asyncio.Event()
    all_sent = asyncio.Event()

    async def send_text(text: str) -> None:
        await gate.wait()
        sent.append(text)
        if len(sent) == 3:
            all_sent.set()

    outbox = Outbox(send_text)
    writer = asyncio.create_task(outbox.run())
    outbox.send(ChatResponse.bot("start"))
    await asyncio.sleep(0)  # the writer takes `start` and blocks on the socket
    for token in ["a", "b", "c"]:
        outbox.token(token)
    outbox.send(ChatResponse.bot("end", status="completed"))
    gate.set()
    async with asyncio.timeout(1):
        await all_sent.wait()
    writer.cancel()
    frames = [json.loads(text) for text in sent]
    assert [f["type"] for f in frames] == ["start", "stream", "end"]
    assert frames[1]["message"] == "abc"


async def test_client_that_never_reads_is_cut_off() -> None:
    async def stuck(text: str) -> None:
        await asyncio.Event().wait()

    outbox = Outbox(stuck, max_pending=10)
    writer = asyncio.create_task(outbox.run())
    outbox.send(ChatResponse.bot("info", "first"))
    await asyncio.sleep(0)
    for _ in range(10):
        outbox.send(ChatResponse.bot("info", "x"))
    with pytest.raises(ClientGone, match="10 frames unread"):
        outbox.send(ChatResponse.bot("info", "one too many"))
    with pytest.raises(ClientGone):
        outbox.token("later")
    writer.cancel()
