"""Many sockets at once: each gets exactly its own reply, and conversations never mix."""

from __future__ import annotations

import asyncio

from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.harness import ask, connect, text_of


async def test_fifty_concurrent_sockets_each_get_their_own_reply(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.default = Behaviour(delay=0.01)

    async def converse(n: int) -> tuple[int, str, str]:
        async with connect(server.ws) as ws:
            first = await ask(ws, f"question number {n}")
            second = await ask(ws, f"follow-up {n}")
        assert first[-1]["status"] == second[-1]["status"] == "completed"
        return n, text_of(first), text_of(second)

    results = await asyncio.gather(*(converse(n) for n in range(50)))
    for n, first, second in results:
        assert first == f"You said: question number {n}"
        assert second == f"You said: follow-up {n}"
    # Each follow-up carried its own socket's history and nobody else's.
    follow_ups = [r for r in fake.requests if r.messages[-1]["content"].startswith("follow-up")]
    assert len(follow_ups) == 50
    for record in follow_ups:
        n = record.messages[-1]["content"].removeprefix("follow-up ")
        assert [m["content"] for m in record.messages[1:]] == [
            f"question number {n}",
            f"You said: question number {n}",
            f"follow-up {n}",
        ]
