"""Who may chat: the authorisation matrix over every route and frame, tickets, expiry, JWKS."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from backend.users.auth import anonymous_refusal, is_loopback
from deploy.services import Deployment, Postgres, Redis
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import deployment_env, fake_settings
from tests.harness import (
    UNIT,
    IsolatedSettings,
    LiveServer,
    ask,
    backend_process,
    close_of,
    connect,
    conversation_of,
    live_server,
    recv,
    text_of,
    until_end,
    until_reply_text,
)
from tests.test_cli import start_cli

SECRET = "test-secret-that-is-long-enough-for-hs256"
API_KEY = "sk-scripts-0123456789"


def token(sub: str, *, exp_in: float = 600, secret: str = SECRET, **extra: Any) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time() + exp_in), **extra}
    return jwt.encode(claims, secret, algorithm="HS256")


def unsigned(sub: str) -> str:
    """A token with `alg: none`: no signature at all."""
    claims = {"sub": sub, "exp": int(time.time() + 600)}
    return jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]


ALICE = token("alice")
BOB = token("bob")
# Every credential that must be refused, by what is wrong with it.
REFUSED: dict[str, str | None] = {
    "anonymous": None,
    "expired": token("alice", exp_in=-60),
    "wrong signature": token("alice", secret="another-secret-entirely-of-some-length"),
    "alg none": unsigned("alice"),
    "no exp": jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
    "garbage": "not-a-token",
}


def headers(credential: str | None) -> dict[str, str]:
    return {} if credential is None else {"Authorization": f"Bearer {credential}"}


@pytest.fixture(scope="module")
def guarded(upstream_server: FakeUpstream) -> Iterator[LiveServer]:
    settings = fake_settings(
        upstream_server,
        chat_auth="token",
        chat_jwt_secret=SECRET,
        chat_api_keys=f"scripts:{API_KEY}",
    )
    with live_server(settings) as server:
        yield server


async def alice_conversation(server: LiveServer) -> str:
    """A conversation of alice's, with one turn."""
    async with connect(server.ws, additional_headers=headers(ALICE)) as ws:
        frames = await ask(ws, "alice's secret question")
        assert frames[-1]["status"] == "completed"
        return conversation_of(ws)


async def refused_handshake(url: str, credential: str | None) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(url, additional_headers=headers(credential)):
            pass
    return refused.value.response.status_code


@pytest.mark.parametrize("kind", list(REFUSED))
async def test_bad_credentials_are_refused_everywhere(
    guarded: LiveServer, fake: FakeUpstream, kind: str
) -> None:
    credential = REFUSED[kind]
    conversation = await alice_conversation(guarded)
    assert await refused_handshake(guarded.ws, credential) == 401
    assert await refused_handshake(f"{guarded.ws}?conversation={conversation}", credential) == 401
    assert await refused_handshake(f"{guarded.ws}?ticket={credential}", None) == 401
    requested_before = len(fake.requests)
    async with httpx.AsyncClient(base_url=guarded.http, headers=headers(credential)) as client:
        calls = [
            client.get("/api/conversations"),
            client.get(f"/api/conversations/{conversation}"),
            client.delete(f"/api/conversations/{conversation}"),
            client.post("/api/ws-ticket"),
            client.get("/stream", params={"prompt": "hi"}),
            client.get("/sse", params={"prompt": "hi"}),
            client.get("/sse", params={"conversation": conversation}),
        ]
        for call in calls:
            response = await call
            assert response.status_code == 401, (response.request.url, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    assert len(fake.requests) == requested_before, "a refused caller reached the model"
    # Nothing was deleted.
    async with httpx.AsyncClient(base_url=guarded.http, headers=headers(ALICE)) as client:
        assert (await client.get(f"/api/conversations/{conversation}")).status_code == 200


@pytest.mark.parametrize("other", ["bob", "api key"])
async def test_another_user_cannot_see_or_touch_a_conversation(
    guarded: LiveServer, fake: FakeUpstream, other: str
) -> None:
    credential = BOB if other == "bob" else API_KEY
    conversation = await alice_conversation(guarded)
    unknown = "0" * 32
    async with httpx.AsyncClient(base_url=guarded.http, headers=headers(credential)) as client:
        listed = (await client.get("/api/conversations")).json()["conversations"]
        assert conversation not in [entry["id"] for entry in listed]
        details = []
        for target in (conversation, unknown):
            # The same 404, with the same shape, for someone else's conversation and for none.
            read = await client.get(f"/api/conversations/{target}")
            assert read.status_code == 404
            details.append(read.json()["detail"].replace(target, "ID"))
            assert (await client.delete(f"/api/conversations/{target}")).status_code == 404
            joined = await client.get("/sse", params={"conversation": target})
            assert joined.status_code == 404
            details.append(joined.json()["detail"].replace(target, "ID"))
        assert details[0] == details[2]
        assert details[1] == details[3]
    # Over the socket: closed as if the conversation did not exist; nothing of it is sent.
    for target in (conversation, unknown):
        async with ws_connect(
            f"{guarded.ws}?conversation={target}", additional_headers=headers(credential)
        ) as ws:
            code, reason = await close_of(ws)
            assert code == 1008
            assert "No conversation" in reason
    # Alice still has it, whole.
    async with httpx.AsyncClient(base_url=guarded.http, headers=headers(ALICE)) as client:
        listed = (await client.get("/api/conversations")).json()["conversations"]
        assert conversation in [entry["id"] for entry in listed]
        messages = (await client.get(f"/api/conversations/{conversation}")).json()["messages"]
        assert messages[0]["text"] == "alice's secret question"


async def test_the_owner_can_do_everything(guarded: LiveServer, fake: FakeUpstream) -> None:
    conversation = await alice_conversation(guarded)
    async with connect(
        f"{guarded.ws}?conversation={conversation}", additional_headers=headers(ALICE)
    ) as ws:
        assert (await until_end(ws))[-1]["status"] == "completed"  # the history first
        fake.then(Behaviour(tokens=["slow"] * 400, delay=0.05))  # stopped long before its end
        await ws.send(json.dumps({"type": "question", "message": "more"}))
        await until_reply_text(ws)
        await ws.send(json.dumps({"type": "stop"}))
        assert (await until_end(ws))[-1]["status"] == "interrupted"
        await ws.send(json.dumps({"type": "regenerate"}))
        await until_end(ws)
    async with httpx.AsyncClient(base_url=guarded.http, headers=headers(ALICE)) as client:
        async with client.stream("GET", "/sse", params={"conversation": conversation}) as joined:
            assert joined.status_code == 200
        streamed = await client.get("/stream", params={"prompt": "plain"})
        assert streamed.status_code == 200
        assert "plain" in streamed.text
        assert (await client.delete(f"/api/conversations/{conversation}")).status_code == 204


async def test_api_keys_are_users_of_their_own(guarded: LiveServer, fake: FakeUpstream) -> None:
    async with connect(guarded.ws, additional_headers=headers(API_KEY)) as ws:
        assert text_of(await ask(ws, "from a script")).endswith("from a script")
        conversation = conversation_of(ws)
    async with httpx.AsyncClient(base_url=guarded.http, headers=headers(API_KEY)) as client:
        listed = (await client.get("/api/conversations")).json()["conversations"]
        assert [entry["id"] for entry in listed] == [conversation]
        assert (await client.post("/api/ws-ticket")).json()["user"] == "key:scripts"
    # A signed-in user named like the key's user is someone else, and the key's own name
    # cannot be claimed by a token.
    async with httpx.AsyncClient(base_url=guarded.http, headers=headers(token("scripts"))) as same:
        assert (await same.get("/api/conversations")).json()["conversations"] == []
        assert (await same.get(f"/api/conversations/{conversation}")).status_code == 404
    claimed = headers(token("key:scripts"))
    async with httpx.AsyncClient(base_url=guarded.http, headers=claimed) as client:
        refused = await client.get("/api/conversations")
        assert refused.status_code == 401
        assert "API keys" in refused.json()["detail"]


async def test_a_ticket_opens_one_socket_once(guarded: LiveServer, fake: FakeUpstream) -> None:
    async with httpx.AsyncClient(base_url=guarded.http, headers=headers(ALICE)) as client:
        issued = (await client.post("/api/ws-ticket")).json()
    assert issued["user"] == "alice"
    assert 0 < issued["expires_in"] <= 60
    url = f"{guarded.ws}?ticket={issued['ticket']}"
    async with connect(url) as ws:
        await ask(ws, "through a ticket")
        conversation = conversation_of(ws)
    assert await refused_handshake(url, None) == 401  # used up
    async with httpx.AsyncClient(base_url=guarded.http, headers=headers(ALICE)) as client:
        listed = (await client.get("/api/conversations")).json()["conversations"]
        assert conversation in [entry["id"] for entry in listed]
        # A ticket also opens an SSE stream, which a browser cannot give headers either.
        ticket = (await client.post("/api/ws-ticket")).json()["ticket"]
    async with httpx.AsyncClient(base_url=guarded.http) as anonymous:
        joined = anonymous.stream(
            "GET", "/sse", params={"conversation": conversation, "ticket": ticket}
        )
        async with joined as response:
            assert response.status_code == 200
        # But not the REST routes: tickets stay out of ordinary URLs.
        listed = await anonymous.get("/api/conversations", params={"ticket": ticket})
        assert listed.status_code == 401


async def test_an_expired_token_closes_its_socket_and_the_reply_goes_on(
    guarded: LiveServer, fake: FakeUpstream
) -> None:
    brief = token("alice", exp_in=UNIT)
    fake.then(Behaviour(tokens=["word "] * 60, delay=0.05))
    async with connect(guarded.ws, additional_headers=headers(brief)) as ws:
        conversation = conversation_of(ws)
        await ws.send(json.dumps({"type": "question", "message": "long one"}))
        await until_reply_text(ws)
        frames = []
        async with asyncio.timeout(UNIT * 3):
            while (frame := await recv(ws, UNIT * 3))["type"] != "error":
                frames.append(frame)
        assert frame["code"] == "unauthorized"
        assert "expired" in frame["message"]
        code, _ = await close_of(ws)
        assert code == 4401
    # A fresh token rejoins the same conversation and finds the reply whole.
    async with connect(
        f"{guarded.ws}?conversation={conversation}", additional_headers=headers(ALICE)
    ) as ws:
        replayed = []
        while (frame := await recv(ws, UNIT * 3))["type"] != "end":
            replayed.append(frame)
        assert frame["status"] == "completed"
        assert text_of(replayed) == "word " * 60


def test_anonymous_service_is_refused_off_loopback() -> None:
    settings = IsolatedSettings()
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.0.0.1", "::", "example.com"]))
    assert anonymous_refusal(settings, "127.0.0.1") is None
    refusal = anonymous_refusal(settings, "0.0.0.0")
    assert refusal is not None
    assert "CHAT_AUTH=token" in refusal
    assert anonymous_refusal(IsolatedSettings(chat_allow_anonymous=True), "0.0.0.0") is None
    assert anonymous_refusal(IsolatedSettings(chat_auth="token"), "0.0.0.0") is None


async def test_the_server_will_not_start_anonymous_on_a_public_address() -> None:
    async with backend_process(0, "--host", "0.0.0.0") as process:
        async with asyncio.timeout(UNIT * 10):
            assert await process.wait() == 2


class JwksServer:
    """An identity provider's JWKS endpoint, on a loopback port."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        body = json.dumps({"keys": keys}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def public_jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


async def test_rs256_and_es256_through_jwks(upstream_server: FakeUpstream) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = JwksServer([public_jwk(rsa_key, "r1", "RS256"), public_jwk(ec_key, "e1", "ES256")])
    exp = int(time.time() + 600)
    rs = jwt.encode({"sub": "carol", "exp": exp}, rsa_key, "RS256", headers={"kid": "r1"})
    es = jwt.encode({"sub": "dave", "exp": exp}, ec_key, "ES256", headers={"kid": "e1"})
    forged = jwt.encode({"sub": "carol", "exp": exp}, impostor, "RS256", headers={"kid": "r1"})
    unknown_kid = jwt.encode({"sub": "carol", "exp": exp}, rsa_key, "RS256", headers={"kid": "x"})
    # HS256 signed with the public key: the classic algorithm confusion.
    confused = jwt.encode({"sub": "carol", "exp": exp}, "x" * 40, "HS256", headers={"kid": "r1"})
    settings = fake_settings(upstream_server, chat_auth="token", chat_jwks_url=jwks.url)
    try:
        with live_server(settings) as server:
            async with httpx.AsyncClient(base_url=server.http) as client:
                for good, user in ((rs, "carol"), (es, "dave")):
                    issued = await client.post("/api/ws-ticket", headers=headers(good))
                    assert issued.status_code == 200, issued.text
                    assert issued.json()["user"] == user
                for bad in (forged, unknown_kid, confused):
                    refused = await client.post("/api/ws-ticket", headers=headers(bad))
                    assert refused.status_code == 401
            assert await refused_handshake(server.ws, forged) == 401
            async with connect(server.ws, additional_headers=headers(es)) as ws:
                await ask(ws, "signed by the provider")
    finally:
        jwks.close()


async def cli(url: str, stdin: bytes, *args: str, **env: str) -> tuple[int, str, str]:
    """Run the terminal client on `stdin`: its exit status, output and errors."""
    environment = {key: value for key, value in os.environ.items() if key != "CHAT_TOKEN"}
    process = await start_cli(url, *args, env={**environment, **env})
    out, err = await asyncio.wait_for(process.communicate(stdin), UNIT * 5)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_terminal_client_takes_a_token(guarded: LiveServer, fake: FakeUpstream) -> None:
    code, out, _ = await cli(guarded.ws, b"by flag\n", "--token", ALICE)
    assert code == 0
    assert out == "You said: by flag\n"
    code, out, _ = await cli(guarded.ws, b"by env\n", CHAT_TOKEN=API_KEY)
    assert code == 0
    assert out == "You said: by env\n"
    code, _, err = await cli(guarded.ws, b"none\n")
    assert code == 3
    assert "--token" in err
    code, _, err = await cli(guarded.ws, b"bad\n", "--token", REFUSED["expired"] or "")
    assert code == 3
    assert "refused" in err


async def test_tickets_and_ownership_hold_across_workers(
    upstream_server: FakeUpstream, postgres: Postgres, redis_server: Redis
) -> None:
    env = {
        **deployment_env(upstream_server, postgres, redis_server),
        "CHAT_AUTH": "token",
        "CHAT_JWT_SECRET": SECRET,
    }
    deployed = Deployment(2, env).start()
    try:
        # Round-robin: the tickets are issued and taken on both workers, in every pairing.
        async with httpx.AsyncClient(base_url=deployed.http, headers=headers(ALICE)) as client:
            for _ in range(4):
                ticket = (await client.post("/api/ws-ticket")).json()["ticket"]
                async with connect(f"{deployed.ws}?ticket={ticket}") as ws:
                    await ask(ws, "through nginx")
                assert await refused_handshake(f"{deployed.ws}?ticket={ticket}", None) == 401
        # A conversation opened on one worker is alice's on both, stored or not yet stored.
        fake_slow = Behaviour(tokens=["slow "] * 40, delay=0.05)
        upstream_server.then(fake_slow)
        async with connect(deployed.ws, additional_headers=headers(ALICE)) as ws:
            await ws.send(json.dumps({"type": "question", "message": "in flight"}))
            await until_reply_text(ws)
            conversation = conversation_of(ws)
            async with httpx.AsyncClient(base_url=deployed.http, headers=headers(BOB)) as bob:
                for _ in range(4):
                    read = await bob.get(f"/api/conversations/{conversation}")
                    assert read.status_code == 404
                    async with ws_connect(
                        f"{deployed.ws}?conversation={conversation}",
                        additional_headers=headers(BOB),
                    ) as intruder:
                        assert (await close_of(intruder))[0] == 1008
                assert (await bob.delete(f"/api/conversations/{conversation}")).status_code == 404
            async with httpx.AsyncClient(base_url=deployed.http, headers=headers(ALICE)) as mine:
                for _ in range(2):
                    assert (await mine.get(f"/api/conversations/{conversation}")).status_code == 200
            while (await recv(ws, UNIT * 3))["type"] != "end":
                pass
    finally:
        deployed.remove()
