"""Input from someone trying to break the server: every answer is a prompt 4xx with a sentence.

Handshakes are written on raw sockets, as an attacker would, not through a client library
that keeps to the rules; every route the OpenAPI document lists is swept with hostile values.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from fakes.openai_server import FakeUpstream
from tests.conftest import fake_settings
from tests.harness import (
    UNIT,
    LiveServer,
    ask,
    close_of,
    connect,
    conversation_of,
    handshake,
    live_server,
    raw_exchange,
    status_of,
)


@pytest.fixture(scope="module")
def target(upstream_server: FakeUpstream) -> Iterator[LiveServer]:
    with live_server(fake_settings(upstream_server)) as server:
        yield server


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (handshake("/chat?conversation=" + "a" * 9_000), 414),
        (handshake("/chat?conversation=" + "a" * 100_000), 414),
        (handshake("/chat", "X-Padding: " + "b" * 9_000 + "\r\n"), 431),
        (handshake("/chat", "".join(f"X-H{n}: v\r\n" for n in range(200))), 431),
    ],
    ids=["url-9k", "url-100k", "header-9k", "200-headers"],
)
async def test_an_over_long_handshake_is_answered_and_closed(
    target: LiveServer, request_bytes: bytes, status: int
) -> None:
    answer = await raw_exchange(target.port, request_bytes)
    assert status_of(answer) == status
    assert answer.split(b"\r\n\r\n", 1)[1].endswith(b".\n"), answer


async def test_a_handshake_just_under_the_limits_still_opens(target: LiveServer) -> None:
    answer = b""
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    try:
        writer.write(handshake("/chat?pad=" + "a" * 7_000))
        async with asyncio.timeout(UNIT):
            answer = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert status_of(answer) == 101


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/conversations?x=" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /api/conversations?x=" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 200_000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # TLS to a plain port
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["url-200k", "url-70k", "header-200k", "tls-hello", "garbage"],
)
async def test_hostile_http_is_refused_promptly(target: LiveServer, request_bytes: bytes) -> None:
    answer = await raw_exchange(target.port, request_bytes)
    assert 400 <= status_of(answer) < 500


def chunked_post(path: str, megabytes: int) -> bytes:
    """A POST to `path` whose body comes in chunks of a megabyte, `megabytes` of them."""
    piece = b"x" * 1_000_000
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head.encode() + chunk * megabytes


def sentence_of(status: int, content_type: str, raw: bytes) -> str:
    """The sentence of a 4xx: `{"detail": ...}` in JSON, or the whole of a plain-text body."""
    assert 400 <= status < 500, (status, raw[:300])
    if content_type.startswith("text/plain"):
        text = raw.decode().strip()
    else:
        assert content_type == "application/json", (content_type, raw[:300])
        text = json.loads(raw)["detail"]
    assert isinstance(text, str), raw[:300]
    assert text.endswith((".", ")")), text
    return text


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [5_000, 100_000])
async def test_deeply_nested_json_is_a_422_that_says_so(target: LiveServer, depth: int) -> None:
    part = '{"type": "text", "text": "hi", "providerMetadata": ' + nested(depth) + "}"
    bodies = [
        nested(depth),
        '{"id": "deep-json", "messages": [' + nested(depth) + "]}",
        '{"id": "deep-json", "messages": [{"role": "user", "parts": [' + part + "]}]}",
    ]
    async with httpx.AsyncClient(base_url=target.http, timeout=UNIT * 2) as client:
        for body in bodies:
            response = await client.post(
                "/api/chat", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 422, response.text[:300]
            sentence = sentence_of(422, response.headers["content-type"], response.content)
            assert "nest" in sentence


# Values for a query or path parameter that a careless server chokes on.
HOSTILE_VALUES = [
    "99999999999999999999999999",
    "-99999999999999999999999999",
    "1e309",
    "NaN",
    "-1",
    "0x10",
    "",
    "x" * 5_000,
    "%00",
    "[]",
    "{}",
    "\u202e\U0001f600",
]


def operations(target: LiveServer) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Every (method, path, parameters) the app's OpenAPI document lists."""
    found = []
    for path, methods in target.app.openapi()["paths"].items():
        for method, operation in methods.items():
            found.append((method.upper(), path, operation.get("parameters", [])))
    return found


async def test_every_route_answers_hostile_parameters_with_a_sentence(
    target: LiveServer, fake: FakeUpstream
) -> None:
    async with connect(target.ws) as ws:
        await ask(ws, "a conversation to aim at")
        real_id = conversation_of(ws)
    swept = 0
    async with httpx.AsyncClient(base_url=target.http, timeout=UNIT * 5) as client:
        for method, path, parameters in operations(target):
            # One parameter at a time, hostile, the others absent or real: a check on one
            # must not hide a crash on another.
            names = [(p["in"], p["name"]) for p in parameters] or [
                ("query", name) for name in ("offset", "after", "conversation")
            ]
            for place, name in names:
                for value in HOSTILE_VALUES:
                    url = path
                    for parameter in parameters:
                        if parameter["in"] == "path":
                            given = value or "x" if parameter["name"] == name else real_id
                            url = url.replace("{" + parameter["name"] + "}", given)
                    params = {name: value} if place == "query" else {}
                    async with client.stream(method, url, params=params) as response:
                        swept += 1
                        if response.status_code >= 400:
                            raw = await response.aread()
                            kind = response.headers.get("content-type", "")
                            sentence_of(response.status_code, kind, raw)
            # A body of the wrong shape, far too deep or with huge numbers, where one is read.
            if method == "POST":
                for body in ("[1, 2]", "1" * 5_000, '{"id": ' + "9" * 5_000 + "}", nested(3_000)):
                    response = await client.post(
                        path.replace("{conversation_id}", real_id).replace("{chat_id}", real_id),
                        content=body,
                        headers={"content-type": "application/json"},
                    )
                    swept += 1
                    if response.status_code >= 400:
                        kind = response.headers.get("content-type", "")
                        sentence_of(response.status_code, kind, response.content)
    assert swept > 100
    # The conversation survived the sweep.
    async with httpx.AsyncClient(base_url=target.http, timeout=UNIT) as client:
        assert (await client.get(f"/api/conversations/{real_id}")).status_code == 200


async def test_a_huge_offset_is_refused_with_a_sentence(target: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=target.http, timeout=UNIT) as client:
        for offset in ("99999999999999999999999999", "9223372036854775808", "1000000001"):
            response = await client.get("/api/conversations", params={"offset": offset})
            assert response.status_code == 422
            assert response.json()["detail"].startswith("Bad query parameter 'offset'")
        ok = await client.get("/api/conversations", params={"offset": "1000000000"})
        assert ok.status_code == 200
        assert ok.json()["conversations"] == []


async def test_refused_handshakes_write_no_errors_and_few_lines(
    upstream_server: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    guarded = fake_settings(upstream_server, chat_auth="token", chat_jwt_secret="s" * 32)
    uvicorn_log = logging.getLogger("uvicorn")
    with live_server(guarded) as server, caplog.at_level(logging.INFO):
        # uvicorn's loggers, set up as the server starts, keep their lines from the root's.
        uvicorn_log.addHandler(caplog.handler)
        for _ in range(20):
            for headers in ("Origin: http://evil.example\r\n", "Authorization: Bearer forged\r\n"):
                answer = await raw_exchange(server.port, handshake("/chat", headers))
                assert status_of(answer) in {401, 403}
    uvicorn_log.removeHandler(caplog.handler)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    refusals = [r.getMessage() for r in caplog.records if "refused a socket" in r.getMessage()]
    assert 2 <= len(refusals) <= 4, refusals


@pytest.mark.parametrize(
    "query",
    [
        "after=99999999999999999999999999",
        "after=-1",
        "after=1e3",
        "after=%D9%A3",  # an Arabic-Indic digit three
        "conversation=" + "a" * 7_000,
        "conversation=%00",
        "conversation=%E2%80%AE",
    ],
)
async def test_a_socket_with_hostile_parameters_is_closed_with_a_reason(
    target: LiveServer, query: str
) -> None:
    async with ws_connect(f"{target.ws}?{query}") as ws:
        code, reason = await close_of(ws)
    assert code == 1008
    assert reason.endswith(".")


@pytest.mark.parametrize(
    "unfinished",
    [
        b"",
        b"GET /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ",
        handshake("/chat")[:-2],
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"id": ',
    ],
    ids=["nothing", "half-a-head", "handshake-without-its-end", "half-a-body"],
)
async def test_a_request_left_unfinished_is_closed_after_the_timeout(
    upstream_server: FakeUpstream, unfinished: bytes
) -> None:
    with live_server(fake_settings(upstream_server, chat_request_timeout=0.5)) as server:
        started = asyncio.get_running_loop().time()
        answer = await raw_exchange(server.port, unfinished, within=UNIT * 2)
        waited = asyncio.get_running_loop().time() - started
    assert status_of(answer) == 408
    assert b"stalled for 0.5 s" in answer
    assert 0.4 < waited < UNIT * 2


async def test_a_body_too_large_for_a_route_that_answered_gets_no_second_answer(
    target: LiveServer,
) -> None:
    # /api/ws-ticket answers without reading its body; the body then goes over the limit.
    answer = await raw_exchange(target.port, chunked_post("/api/ws-ticket", 17), within=UNIT * 5)
    assert status_of(answer) == 200
    assert answer.count(b"HTTP/1.1 ") == 1, answer[:500]


async def test_a_question_no_text_can_carry_is_a_422(target: LiveServer) -> None:
    for text in ("hi \ud800 there", "nul \u0000 byte"):
        message = {"role": "user", "parts": [{"type": "text", "text": text}]}
        body = {"id": "lone-surrogate", "messages": [message]}
        async with httpx.AsyncClient(base_url=target.http, timeout=UNIT) as client:
            response = await client.post("/api/chat", content=json.dumps(body))
        assert response.status_code == 422
        assert "no text can carry" in response.text


async def test_a_body_refused_mid_read_leaves_no_error_in_the_log(
    target: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            answer = await raw_exchange(target.port, chunked_post("/api/chat", 17), within=UNIT * 5)
            await asyncio.sleep(0.2)  # the app's side of the request ends after the answer
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert status_of(answer) == 413
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
