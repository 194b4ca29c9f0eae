"""Conversations that outlive a socket: join by id, resume `after` a seq, several sockets, grace."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import fake_settings
from tests.harness import (
    UNIT,
    Frame,
    LiveServer,
    ask,
    close_of,
    connect,
    conversation_of,
    kinds,
    live_server,
    recv,
    text_of,
    until_end,
    wait_hung_up,
)

LONG = Behaviour(tokens=[f" w{n}" for n in range(300)], delay=0.004)


def join_url(server: Addressed, conversation: str, after: int | None = None) -> str:
    url = f"{server.ws}?conversation={conversation}"
    return url if after is None else f"{url}&after={after}"


def last_seq(frames: list[Frame]) -> int:
    seqs = [f["seq"] for f in frames if "seq" in f]
    return seqs[-1] if seqs else 0


async def read_until(ws: ClientConnection, chars: int) -> list[Frame]:
    """Frames until at least `chars` characters of bot text arrived (or the reply ended)."""
    frames: list[Frame] = []
    while len(text_of(frames)) < chars:
        frames.append(await recv(ws))
        if frames[-1]["type"] == "end":
            break
    return frames


async def test_seq_strictly_increases_and_joining_replays_the_history(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=["Par", "is", "."]), Behaviour(tokens=["Yes", "!"]))
    async with connect(server.ws) as ws:
        conversation = conversation_of(ws)
        live = await ask(ws, "capital of France?") + await ask(ws, "sure?")
    seqs = [f["seq"] for f in live]
    assert seqs == sorted(set(seqs))
    async with ws_connect(join_url(server, conversation)) as ws:
        hello = await recv(ws)
        assert hello["conversation"] == conversation
        assert "seq" not in hello
        replayed = await until_end(ws) + await until_end(ws)
    assert kinds(replayed) == kinds(live)
    assert text_of(replayed) == text_of(live) == "Paris.Yes!"
    # The same frames carry the same seq; merged text carries its last token's.
    assert [f["seq"] for f in replayed if f["type"] != "stream"] == [
        f["seq"] for f in live if f["type"] != "stream"
    ]
    assert last_seq(replayed) == last_seq(live)


async def test_rejoin_after_any_seq_gives_exactly_the_missing_text(
    server: Addressed, fake: FakeUpstream
) -> None:
    """Drop the socket at random points of a long reply; each rejoin `after` loses nothing."""
    fake.then(Behaviour(tokens=[f" w{n}" for n in range(400)], delay=0.006))
    rng = random.Random(8)
    async with connect(server.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("a long story")
        received = await read_until(ws, rng.randint(1, 40))
    expected = "".join(f" w{n}" for n in range(400))
    drops = 0
    while received[-1]["type"] != "end":
        after = last_seq(received)
        async with ws_connect(join_url(server, conversation, after)) as ws:
            await recv(ws)  # the opening info
            more = await read_until(ws, rng.randint(1, 120))
            assert all(f["seq"] > after for f in more)
        received += more
        drops += 1
    assert drops >= 20
    assert text_of(received) == expected
    assert received[-1]["status"] == "completed"
    assert [f["seq"] for f in received] == sorted({f["seq"] for f in received})


async def test_two_sockets_see_one_reply_and_either_can_stop_it(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(LONG)
    async with connect(server.ws) as first:
        conversation = conversation_of(first)
        async with connect(join_url(server, conversation)) as second:
            assert conversation_of(second) == conversation
            await first.send("tell me")
            seen_first = await read_until(first, 10)
            seen_second = await read_until(second, 10)
            await second.send(json.dumps({"type": "stop"}))
            rest_first = await until_end(first)
            rest_second = await until_end(second)
    assert rest_first[-1]["status"] == rest_second[-1]["status"] == "interrupted"
    both = [seen_first + rest_first, seen_second + rest_second]
    assert text_of(both[0]) == text_of(both[1])
    assert [f["seq"] for f in both[0] if f["type"] != "stream"] == [
        f["seq"] for f in both[1] if f["type"] != "stream"
    ]
    await wait_hung_up(fake, 0)


async def test_a_question_from_the_other_socket_preempts_the_reply(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(LONG, Behaviour(tokens=["two"]))
    async with connect(server.ws) as first:
        second_url = join_url(server, conversation_of(first))
        async with connect(second_url) as second:
            await first.send("one")
            await read_until(second, 5)
            await second.send("two")
            assert (await until_end(first))[-1]["status"] == "interrupted"
            following = await until_end(first)
            assert text_of(following) == "two"
            assert (await until_end(second))[-1]["status"] == "interrupted"
            assert text_of(await until_end(second)) == "two"


@pytest.fixture(scope="module")
def short_grace(upstream_server: FakeUpstream) -> Iterator[LiveServer]:
    with live_server(fake_settings(upstream_server, chat_resume_grace=UNIT / 2)) as live:
        yield live


async def test_a_reply_goes_on_while_its_client_is_away(
    short_grace: LiveServer, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[f" w{n}" for n in range(100)], delay=0.01))
    async with connect(short_grace.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("go")
        seen = await read_until(ws, 10)
    await asyncio.sleep(0.2)
    async with ws_connect(join_url(short_grace, conversation, last_seq(seen))) as ws:
        await recv(ws)
        rest = await until_end(ws)
    assert rest[-1]["status"] == "completed"
    assert text_of(seen + rest) == "".join(f" w{n}" for n in range(100))
    assert fake.requests[0].completed


async def test_grace_expiry_stops_the_reply_and_keeps_its_text(
    short_grace: LiveServer, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[" x"] * 2000, delay=0.005))
    async with connect(short_grace.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("go on forever")
        await read_until(ws, 6)
    hung_up_after = await wait_hung_up(fake, 0, within=UNIT * 2)
    assert hung_up_after >= UNIT / 2
    assert not fake.requests[0].completed
    async with ws_connect(join_url(short_grace, conversation)) as ws:
        await recv(ws)
        replayed = await until_end(ws)
    assert replayed[-1]["status"] == "interrupted"
    assert text_of(replayed).startswith(" x x x")


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("conversation=nope", "Malformed"),
        ("conversation=" + "0" * 32, "No conversation"),
        ("conversation=" + "0" * 32 + "&after=-1", "after"),
    ],
)
async def test_unknown_or_malformed_ids_are_refused(
    server: Addressed, query: str, reason: str
) -> None:
    async with ws_connect(f"{server.ws}?{query}") as ws:
        code, text = await close_of(ws)
    assert code == 1008
    assert reason in text


async def test_an_id_that_never_asked_anything_is_not_kept(server: Addressed) -> None:
    async with connect(server.ws) as ws:
        conversation = conversation_of(ws)
    await asyncio.sleep(0.1)
    async with ws_connect(join_url(server, conversation)) as ws:
        assert (await close_of(ws))[0] == 1008


async def test_reset_moves_to_a_new_conversation_and_keeps_the_old(
    server: Addressed, fake: FakeUpstream
) -> None:
    async with connect(server.ws) as ws:
        old = conversation_of(ws)
        await ask(ws, "remember me")
        await ws.send(json.dumps({"type": "reset"}))
        ack = await recv(ws)
        assert ack["type"] == "info"
        assert ack["conversation"] != old
        assert "seq" in ack
        await ask(ws, "fresh")
    assert [m["role"] for m in fake.requests[1].messages] == ["system", "user"]
    async with ws_connect(join_url(server, old)) as ws:
        await recv(ws)
        assert text_of(await until_end(ws)) == "You said: remember me"


async def test_regenerate_replaces_the_last_reply(server: Addressed, fake: FakeUpstream) -> None:
    fake.then(
        Behaviour(tokens=["first"]),
        Behaviour(tokens=["old answer"]),
        Behaviour(tokens=["new answer"]),
        Behaviour(tokens=["ok"]),
    )
    async with connect(server.ws) as ws:
        conversation = conversation_of(ws)
        await ask(ws, "one")
        await ask(ws, "two")
        await ws.send(json.dumps({"type": "regenerate"}))
        again = await until_end(ws)
        assert again[0]["type"] == "start"
        assert again[0]["regenerate"] is True
        assert text_of(again) == "new answer"
        await ask(ws, "three")
    # The model was asked the same question again, then saw only the new answer.
    assert fake.requests[2].messages == fake.requests[1].messages
    assert [m["content"] for m in fake.requests[3].messages[1:]] == [
        "one",
        "first",
        "two",
        "new answer",
        "three",
    ]
    async with ws_connect(join_url(server, conversation)) as ws:
        await recv(ws)
        history = [await until_end(ws) for _ in range(3)]
    assert [text_of(turn) for turn in history] == ["first", "new answer", "ok"]


async def test_regenerate_with_nothing_asked_is_a_bad_request(server: Addressed) -> None:
    async with connect(server.ws) as ws:
        await ws.send(json.dumps({"type": "regenerate"}))
        error = await recv(ws)
    assert error["type"] == "error"
    assert error["code"] == "bad_request"
    assert "seq" not in error


async def test_the_conversation_continues_after_a_restart(fake: FakeUpstream) -> None:
    settings = fake_settings(fake)
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            conversation = conversation_of(ws)
            first = await ask(ws, "my name is Ada")
    with live_server(settings) as server:
        async with ws_connect(join_url(server, conversation, last_seq(first))) as ws:
            hello = await recv(ws)
            assert hello["conversation"] == conversation
            second = await ask(ws, "what is my name?")
    assert second[0]["seq"] > last_seq(first)
    assert [m["content"] for m in fake.requests[1].messages[1:]] == [
        "my name is Ada",
        "You said: my name is Ada",
        "what is my name?",
    ]


async def test_resuming_after_a_seq_the_conversation_never_reached_is_refused(
    server: Addressed,
) -> None:
    """An `after` beyond the conversation's last `seq` (another conversation's, a client's own
    bug) would leave the client waiting for frames above it while it misses every one before:
    it is refused with a sentence, on a socket and on SSE, and `after` at the last `seq` is
    not."""
    async with connect(server.ws) as ws:
        conversation = conversation_of(ws)
        last = last_seq(await ask(ws, "hello"))
    async with ws_connect(join_url(server, conversation, last + 1)) as ws:
        code, text = await close_of(ws)
    assert code == 1008
    assert f"past this conversation's last seq, {last}" in text
    async with httpx.AsyncClient() as client:
        sse = f"{server.http}/sse?conversation={conversation}&after={last + 1}"
        refused = await client.get(sse)
    assert refused.status_code == 422
    assert f"at most {last}" in refused.json()["detail"]
    async with ws_connect(join_url(server, conversation, last)) as ws:
        assert (await recv(ws))["conversation"] == conversation
        again = await ask(ws, "and again")
    assert again[0]["seq"] == last + 1
