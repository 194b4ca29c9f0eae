"""Background questions and webhooks: a real server, a real receiver on a loopback port, the fake
model. Signatures are checked by the `standardwebhooks` library, as a receiver would."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter
from standardwebhooks.webhooks import WebhookVerificationError

from backend.process.server import free_port
from deploy.services import Deployment, Postgres, Redis
from fakes.openai_server import Behaviour, FakeUpstream, echo_tokens
from schemas.webhooks import WebhookEvent
from tests.conftest import deployment_env
from tests.harness import (
    UNIT,
    IsolatedSettings,
    LiveServer,
    SettingsFactory,
    backend_process,
    connect,
    healthy,
    live_server,
    python_process,
    temp_database,
    text_of,
    until_end,
)
from tests.webhook_receiver import Answer, Receiver, new_secret

SECRET = new_secret()
Json = dict[str, Any]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


def endpoint(url: str, name: str = "bot", **more: Any) -> Json:
    return {"name": name, "url": url, "secret": SECRET, **more}


@pytest.fixture
def hooked(make_settings: SettingsFactory, receiver: Receiver) -> Iterator[LiveServer]:
    """A server with the receiver registered as endpoint `bot`, retrying quickly."""
    settings = make_settings(
        chat_webhooks=[endpoint(receiver.url())],
        chat_webhook_first_retry=0.2,
    )
    with live_server(settings) as server:
        yield server


async def ask_in_background(base: str, question: str = "hello world", **more: Any) -> Json:
    """POST a new conversation's question naming endpoint `bot`; the 202's body."""
    async with httpx.AsyncClient(base_url=base, timeout=UNIT) as client:
        answer = await client.post(
            "/api/conversations", json={"question": question, "webhook": "bot", **more}
        )
    assert answer.status_code == 202, answer.text
    accepted: Json = answer.json()
    return accepted


async def deliveries(base: str, **params: Any) -> list[Json]:
    async with httpx.AsyncClient(base_url=base, timeout=UNIT) as client:
        answer = await client.get("/api/webhooks/deliveries", params=params)
    assert answer.status_code == 200, answer.text
    found: list[Json] = answer.json()["deliveries"]
    return found


async def until_delivery(base: str, status: str, within: float = UNIT * 3) -> Json:
    """The latest delivery, once it has `status`."""
    async with asyncio.timeout(within):
        while True:
            found = await deliveries(base)
            if found and found[0]["status"] == status:
                return found[0]
            await asyncio.sleep(0.05)


async def streamed(fake: FakeUpstream, index: int, tokens: int) -> None:
    """Return once the model's request `index` has sent `tokens` tokens."""
    record = (await fake.arrived(index + 1, UNIT))[index]
    async with asyncio.timeout(UNIT):
        while record.tokens_sent < tokens:  # noqa: ASYNC110 - counted in the fake's thread
            await asyncio.sleep(0.01)


async def test_a_background_reply_calls_its_webhook_signed(
    hooked: LiveServer, receiver: Receiver
) -> None:
    accepted = await ask_in_background(hooked.http)
    [call] = await receiver.until(1, UNIT)
    event = call.verified(SECRET)
    with pytest.raises(WebhookVerificationError):
        call.verified(new_secret(b"x"))
    data = event["data"]
    assert event["type"] == "reply.completed"
    assert data["conversation"] == accepted["conversation"]
    assert data["question"] == "hello world"
    assert data["text"] == "You said: hello world"
    assert data["status"] == "completed"
    assert data["error"] is None
    assert data["seq"]["first"] == accepted["seq"]
    assert data["seq"]["last"] > data["seq"]["first"]
    assert data["usage"]["completion_tokens"] == len(echo_tokens("hello world"))
    timings = data["timings"]
    assert 0 < timings["first_token_seconds"] <= timings["duration_seconds"] < UNIT
    assert call.headers["content-type"] == "application/json"
    assert call.id.startswith("msg_")
    delivered = await until_delivery(hooked.http, "delivered")
    assert (delivered["id"], delivered["attempts"], delivered["last_response"]) == (call.id, 1, 200)
    async with httpx.AsyncClient(base_url=hooked.http, timeout=UNIT) as client:
        stored = (await client.get(f"/api/conversations/{accepted['conversation']}")).json()
    assert stored["messages"][1]["text"] == data["text"]


async def test_both_secrets_sign_while_one_is_rotated(
    make_settings: SettingsFactory, receiver: Receiver
) -> None:
    old, new = new_secret(b"o"), new_secret(b"n")
    rotating = {"name": "bot", "url": receiver.url(), "secrets": [old, new]}
    with live_server(make_settings(chat_webhooks=[rotating])) as server:
        await ask_in_background(server.http)
        [call] = await receiver.until(1, UNIT)
    assert len(call.headers["webhook-signature"].split(" ")) == 2
    assert call.verified(old) == call.verified(new)


async def test_failures_are_retried_with_the_same_id_and_growing_delays(
    hooked: LiveServer, receiver: Receiver
) -> None:
    receiver.then(Answer(500), Answer(503))
    await ask_in_background(hooked.http)
    first, second, third = await receiver.until(3, UNIT * 2)
    assert first.id == second.id == third.id
    assert first.body == second.body == third.body
    assert first.headers["webhook-signature"] != ""
    wait_1, wait_2 = second.at - first.at, third.at - second.at
    assert 0.15 < wait_1 < wait_2, (wait_1, wait_2)
    delivered = await until_delivery(hooked.http, "delivered")
    assert delivered["attempts"] == 3
    await asyncio.sleep(0.5)
    assert len(receiver.calls) == 3


async def test_retry_after_is_honoured(make_settings: SettingsFactory, receiver: Receiver) -> None:
    settings = make_settings(
        chat_webhooks=[endpoint(receiver.url())], chat_webhook_first_retry=0.05
    )
    receiver.then(Answer(429, headers={"Retry-After": "1"}))
    with live_server(settings) as server:
        await ask_in_background(server.http)
        first, second = await receiver.until(2, UNIT * 2)
    assert second.at - first.at >= 0.95


async def test_a_receiver_down_past_the_retry_period_ends_failed_and_listed(
    make_settings: SettingsFactory, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    receiver.default = Answer(500)
    settings = make_settings(
        chat_webhooks=[endpoint(receiver.url())],
        chat_webhook_first_retry=0.2,
        chat_webhook_retry_for=1.0,
    )
    with live_server(settings) as server:
        await ask_in_background(server.http)
        failed = await until_delivery(server.http, "failed", UNIT * 3)
        await asyncio.sleep(0.5)
        assert await deliveries(server.http, status="pending") == []
        assert [d["id"] for d in await deliveries(server.http, status="failed")] == [failed["id"]]
    assert failed["attempts"] == len(receiver.calls) >= 2
    assert failed["last_response"] == 500
    assert failed["last_error"].startswith(f"Gave up after {failed['attempts']} attempts.")
    assert failed["next_attempt"] is None
    # Each failure is logged, with the delivery's id and why; never with the secret.
    assert f"webhook {failed['id']} to bot failed" in caplog.text
    assert "retrying in" in caplog.text
    assert SECRET.removeprefix("whsec_")[:16] not in caplog.text


async def test_a_receiver_too_slow_is_retried(
    make_settings: SettingsFactory, receiver: Receiver
) -> None:
    settings = make_settings(
        chat_webhooks=[endpoint(receiver.url())],
        chat_webhook_first_retry=0.1,
        chat_webhook_timeout=0.3,
    )
    receiver.then(Answer(delay=1.0))
    with live_server(settings) as server:
        await ask_in_background(server.http)
        delivered = await until_delivery(server.http, "delivered")
    assert delivered["attempts"] == 2
    assert receiver.calls[0].id == receiver.calls[1].id


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (Answer(302, headers={"Location": "http://127.0.0.1:1/elsewhere"}), "redirects are not"),
        (Answer(404), "only 429 and 5xx"),
    ],
    ids=["redirect", "not-found"],
)
async def test_redirects_and_refusals_are_not_retried(
    hooked: LiveServer, receiver: Receiver, answer: Answer, said: str
) -> None:
    receiver.then(answer)
    await ask_in_background(hooked.http)
    failed = await until_delivery(hooked.http, "failed")
    await asyncio.sleep(0.5)
    assert len(receiver.calls) == 1
    assert said in failed["last_error"]
    assert failed["last_response"] == answer.status


@pytest.mark.parametrize(
    "host",
    ["10.255.255.1", "169.254.169.254", "[::ffff:127.0.0.1]", "0.0.0.0", "[fe80::1]"],
    ids=["private", "metadata", "mapped-loopback", "unspecified", "link-local-v6"],
)
async def test_private_addresses_are_refused(
    make_settings: SettingsFactory, receiver: Receiver, host: str
) -> None:
    url = f"http://{host}:{receiver.port}/hook"
    settings = make_settings(chat_webhooks=[endpoint(url)], chat_webhook_allow_http=True)
    with live_server(settings) as server:
        await ask_in_background(server.http)
        failed = await until_delivery(server.http, "failed")
    assert "address" in failed["last_error"]
    assert "CHAT_WEBHOOK_ALLOW_PRIVATE" in failed["last_error"]
    assert failed["attempts"] == 1
    assert receiver.calls == []


async def test_private_addresses_can_be_allowed(
    make_settings: SettingsFactory, receiver: Receiver
) -> None:
    url = f"http://[::ffff:127.0.0.1]:{receiver.port}/hook"
    settings = make_settings(
        chat_webhooks=[endpoint(url)],
        chat_webhook_allow_http=True,
        chat_webhook_allow_private=True,
    )
    with live_server(settings) as server:
        await ask_in_background(server.http)
        await receiver.until(1, UNIT)


async def test_failed_and_interrupted_replies_say_so(
    hooked: LiveServer, receiver: Receiver, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(status=401, error_message="bad key"))
    await ask_in_background(hooked.http)
    [call] = await receiver.until(1, UNIT)
    failed = call.verified(SECRET)
    assert failed["type"] == "reply.failed"
    assert failed["data"]["status"] == "error"
    assert failed["data"]["error"]["code"] == "upstream_auth"
    assert failed["data"]["error"]["message"].endswith(".")

    fake.then(Behaviour(tokens=[" x"] * 500, delay=0.01))
    accepted = await ask_in_background(hooked.http, "a long one")
    await streamed(fake, 1, 5)
    async with httpx.AsyncClient(base_url=hooked.http, timeout=UNIT) as client:
        stopped = await client.post(f"/api/chat/{accepted['conversation']}/stop")
        assert stopped.json() == {"stopped": True}
        calls = await receiver.until(2, UNIT)
        stored = (await client.get(f"/api/conversations/{accepted['conversation']}")).json()
    interrupted = calls[1].verified(SECRET)
    assert interrupted["type"] == "reply.interrupted"
    assert interrupted["data"]["status"] == "interrupted"
    assert 5 <= interrupted["data"]["text"].count(" x") < 500
    assert interrupted["data"]["text"] == stored["messages"][1]["text"]


async def test_a_second_question_pre_empts_the_first(
    hooked: LiveServer, receiver: Receiver, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[" x"] * 500, delay=0.01))
    accepted = await ask_in_background(hooked.http, "first")
    await streamed(fake, 0, 3)
    async with httpx.AsyncClient(base_url=hooked.http, timeout=UNIT) as client:
        answer = await client.post(
            f"/api/conversations/{accepted['conversation']}/messages",
            json={"question": "second", "webhook": "bot"},
        )
    assert answer.status_code == 202, answer.text
    # Both events are delivered at once: in either order.
    calls = await receiver.until(2, UNIT)
    first, second = sorted((call.event for call in calls), key=lambda e: e["data"]["turn"])
    assert first["type"] == "reply.interrupted"
    assert first["data"]["question"] == "first"
    assert second["type"] == "reply.completed"
    assert second["data"]["text"] == "You said: second"
    assert second["data"]["turn"] == 1
    assert answer.json()["seq"] == second["data"]["seq"]["first"]


async def test_regenerate_in_the_background(hooked: LiveServer, receiver: Receiver) -> None:
    accepted = await ask_in_background(hooked.http, "again")
    await receiver.until(1, UNIT)
    async with httpx.AsyncClient(base_url=hooked.http, timeout=UNIT) as client:
        answer = await client.post(
            f"/api/conversations/{accepted['conversation']}/messages",
            json={"regenerate": True, "webhook": "bot"},
        )
    assert answer.status_code == 202, answer.text
    first, second = await receiver.until(2, UNIT)
    assert second.event["data"]["turn"] == 0
    assert second.event["data"]["text"] == "You said: again"
    assert first.id != second.id


async def test_a_background_reply_outlives_the_resume_grace_and_is_watched_live(
    make_settings: SettingsFactory, receiver: Receiver, fake: FakeUpstream
) -> None:
    tokens = [f" t{n}" for n in range(60)]
    fake.then(Behaviour(tokens=tokens, delay=0.02))
    settings = make_settings(chat_webhooks=[endpoint(receiver.url())], chat_resume_grace=0.2)
    with live_server(settings) as server:
        accepted = await ask_in_background(server.http)
        # Mid-reply, after the grace would have stopped a reply its client left.
        await streamed(fake, 0, 20)
        url = f"{server.ws}?conversation={accepted['conversation']}&after={accepted['seq'] - 1}"
        async with connect(url) as ws:
            frames = await until_end(ws)
        [call] = await receiver.until(1, UNIT)
    assert frames[0]["type"] == "start"
    assert frames[0]["seq"] == accepted["seq"]
    assert text_of(frames) == "".join(tokens)
    assert frames[-1]["status"] == "completed"
    assert call.event["data"]["text"] == "".join(tokens)


async def test_deletion_and_every_conversation_endpoints(
    make_settings: SettingsFactory, receiver: Receiver
) -> None:
    endpoints = [
        endpoint(receiver.url("/named")),
        endpoint(receiver.url("/all"), name="audit", every_conversation=True),
        endpoint(receiver.url("/failures"), name="pager", events=["reply.failed"]),
    ]
    with live_server(make_settings(chat_webhooks=endpoints)) as server:
        accepted = await ask_in_background(server.http)
        async with connect(server.ws) as ws:  # names no endpoint: only `audit` hears of it
            await ws.send("from a socket")
            await until_end(ws)
        calls = await receiver.until(3, UNIT)
        async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
            deleted = await client.delete(f"/api/conversations/{accepted['conversation']}")
        assert deleted.status_code == 204
        calls = await receiver.until(5, UNIT)
        await asyncio.sleep(0.3)
    heard = sorted(
        (call.path, call.event["type"], call.event["data"]["question"]) for call in calls[:3]
    )
    assert heard == [
        ("/all", "reply.completed", "from a socket"),
        ("/all", "reply.completed", "hello world"),
        ("/named", "reply.completed", "hello world"),
    ]
    gone = sorted((call.path, call.event["type"]) for call in calls[3:])
    assert gone == [("/all", "conversation.deleted"), ("/named", "conversation.deleted")]
    assert calls[3].event["data"]["conversation"] == accepted["conversation"]
    assert len(receiver.calls) == 5


async def test_background_questions_are_refused_with_a_sentence(
    hooked: LiveServer, fake: FakeUpstream
) -> None:
    async with httpx.AsyncClient(base_url=hooked.http, timeout=UNIT) as client:
        for body, said in [
            ({"question": "hi", "webhook": "nobody"}, "No webhook endpoint 'nobody'"),
            ({"question": "  "}, "The question is empty."),
            ({"question": "hi", "regenerate": True}, "not both"),
            ({"webhook": "bot"}, "Send a `question`"),
            ({"regenerate": True}, "nothing to regenerate"),
            ({"question": "hi", "assistant": "nobody"}, "nobody"),
            ({"question": "hi", "extra": 1}, "extra"),
            ({"question": 7}, "question"),
        ]:
            answer = await client.post("/api/conversations", json=body)
            assert answer.status_code == 422, (body, answer.text)
            assert said in answer.json()["detail"], (body, answer.text)
        for content, said in [
            ("not json", "The body is not valid JSON: send a JSON object."),
            ('"a string"', "The body must be a JSON object"),
        ]:
            answer = await client.post(
                "/api/conversations", content=content, headers={"Content-Type": "application/json"}
            )
            assert (answer.status_code, answer.json()["detail"][: len(said)]) == (422, said)
        missing = await client.post(
            "/api/conversations/0123456789abcdef0123456789abcdef/messages", json={"question": "hi"}
        )
        assert missing.status_code == 404
        assert missing.json()["detail"].startswith("No conversation")
    assert fake.requests == []


async def test_quota_and_ownership_refusals(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    settings = make_settings(
        chat_auth="token",
        chat_api_keys="alice:key-a,bob:key-b",
        chat_quota_questions="1 per 10 seconds",
    )
    alice = {"Authorization": "Bearer key-a"}
    bob = {"Authorization": "Bearer key-b"}
    with live_server(settings) as server:
        async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
            assert (
                await client.post("/api/conversations", json={"question": "hi"})
            ).status_code == 401
            first = await client.post("/api/conversations", json={"question": "hi"}, headers=alice)
            assert first.status_code == 202
            conversation = first.json()["conversation"]
            again = await client.post(
                f"/api/conversations/{conversation}/messages",
                json={"question": "more"},
                headers=alice,
            )
            assert again.status_code == 429
            assert int(again.headers["Retry-After"]) >= 1
            assert again.json()["detail"].endswith(".")
            theirs = await client.post(
                f"/api/conversations/{conversation}/messages",
                json={"question": "mine now"},
                headers=bob,
            )
            assert theirs.status_code == 404
    assert len(fake.requests) == 1


async def test_deliveries_are_for_admins_and_can_be_redelivered(
    make_settings: SettingsFactory, receiver: Receiver
) -> None:
    settings = make_settings(
        chat_auth="token",
        chat_api_keys="ops:key-ops,user:key-user",
        chat_admins="key:ops",
        chat_webhooks=[endpoint(receiver.url())],
    )
    ops = {"Authorization": "Bearer key-ops"}
    user = {"Authorization": "Bearer key-user"}
    with live_server(settings) as server:
        async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
            asked = await client.post(
                "/api/conversations", json={"question": "hi", "webhook": "bot"}, headers=user
            )
            assert asked.status_code == 202
            [call] = await receiver.until(1, UNIT)
            refused = await client.get("/api/webhooks/deliveries", headers=user)
            assert refused.status_code == 403
            assert "CHAT_ADMINS" in refused.json()["detail"]
            listed = (await client.get("/api/webhooks/deliveries", headers=ops)).json()
            [delivery] = listed["deliveries"]
            assert delivery["id"] == call.id
            again = await client.post(f"/api/webhooks/deliveries/{call.id}/redeliver", headers=ops)
            assert again.status_code == 202
            first, second = await receiver.until(2, UNIT)
            assert second.id == first.id
            assert second.verified(SECRET) == first.verified(SECRET)
            unknown = await client.post("/api/webhooks/deliveries/msg_nope/redeliver", headers=ops)
            assert unknown.status_code == 404
            metrics = (await client.get("/metrics", headers=ops)).text
    assert 'chat_webhook_attempts_total{event="reply.completed",outcome="delivered"} 2.0' in metrics
    assert 'chat_webhook_delivery_seconds_count{event="reply.completed"} 2.0' in metrics


async def test_a_slow_receiver_does_not_slow_replies(
    make_settings: SettingsFactory, receiver: Receiver
) -> None:
    receiver.default = Answer(delay=10.0)
    settings = make_settings(chat_webhooks=[endpoint(receiver.url())], chat_webhook_concurrency=4)
    with live_server(settings) as server:
        for n in range(8):
            await ask_in_background(server.http, f"question {n}")
        async with asyncio.timeout(UNIT):
            while receiver.in_flight < 4:  # noqa: ASYNC110 - the receiver is another thread
                await asyncio.sleep(0.01)
        async with connect(server.ws) as ws:
            started = asyncio.get_running_loop().time()
            await ws.send("while they wait")
            frames = await until_end(ws)
            took = asyncio.get_running_loop().time() - started
        assert text_of(frames) == "You said: while they wait"
        assert took < 0.5, took
        assert receiver.in_flight == 4  # the concurrency bound holds: the rest wait their turn
        stopping = asyncio.get_running_loop().time()
    assert asyncio.get_running_loop().time() - stopping < UNIT * 2  # attempts did not hold it


def process_env(fake: FakeUpstream, receiver: Receiver) -> dict[str, str]:
    """A `python -m backend` on the fake model, the receiver as `bot`, and a database that
    outlives the process."""
    return {
        "OPENAI_BASE_URL": fake.url,
        "CHAT_MODEL": "fake-model",
        "CHAT_WEBHOOKS": json.dumps([endpoint(receiver.url())]),
        "CHAT_WEBHOOK_FIRST_RETRY": "1",
        "CHAT_DATABASE_URL": temp_database(),
    }


async def test_a_delivery_pending_at_a_kill_is_delivered_after_restart(
    fake: FakeUpstream, receiver: Receiver
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = process_env(fake, receiver)
    receiver.then(Answer(503))
    async with backend_process(port, **env) as first:
        await healthy(base)
        await ask_in_background(base)
        [failed] = await receiver.until(1, UNIT * 2)
        pending = await until_delivery(base, "pending")
        assert pending["last_response"] == 503  # the failure is recorded: due again in ~1 s
        first.send_signal(signal.SIGKILL)
        await first.wait()
    async with backend_process(port, **env):
        await healthy(base)
        calls = await receiver.until(2, UNIT * 3)
    assert calls[1].id == failed.id
    assert calls[1].verified(SECRET)["type"] == "reply.completed"


async def test_a_delivery_whose_worker_died_mid_attempt_is_attempted_again(
    fake: FakeUpstream, receiver: Receiver
) -> None:
    """Its claim runs out (the attempt's timeout and five seconds), then it is claimed again."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**process_env(fake, receiver), "CHAT_WEBHOOK_TIMEOUT": "1"}
    receiver.then(Answer(delay=3.0))
    async with backend_process(port, **env) as first:
        await healthy(base)
        await ask_in_background(base)
        [held] = await receiver.until(1, UNIT * 2)
        first.send_signal(signal.SIGKILL)
        await first.wait()
    async with backend_process(port, **env):
        await healthy(base)
        calls = await receiver.until(2, UNIT * 5)
        delivered = await until_delivery(base, "delivered")
    assert calls[1].id == held.id
    assert 5.5 < calls[1].at - held.at < UNIT * 5
    assert delivered["attempts"] == 2


async def test_a_reply_cut_off_by_a_kill_is_told_as_interrupted_after_restart(
    fake: FakeUpstream, receiver: Receiver
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = process_env(fake, receiver)
    fake.then(Behaviour(tokens=[" x"] * 1000, delay=0.01))
    async with backend_process(port, **env) as first:
        await healthy(base)
        accepted = await ask_in_background(base)
        async with (
            httpx.AsyncClient(base_url=base, timeout=UNIT) as client,
            asyncio.timeout(UNIT * 3),
        ):
            while True:  # until the streaming turn is stored
                found = await client.get(f"/api/conversations/{accepted['conversation']}")
                if found.status_code == 200 and found.json()["messages"][1]["text"]:
                    break
                await asyncio.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        await first.wait()
    assert receiver.calls == []
    async with backend_process(port, **env):
        await healthy(base)
        [call] = await receiver.until(1, UNIT * 3)
    event = call.verified(SECRET)
    assert event["type"] == "reply.interrupted"
    assert event["data"]["conversation"] == accepted["conversation"]
    assert event["data"]["text"].startswith(" x")
    assert event["data"]["timings"] == {"first_token_seconds": None, "duration_seconds": None}


async def test_two_workers_deliver_each_event_once(
    fake: FakeUpstream, receiver: Receiver, postgres: Postgres, redis_server: Redis
) -> None:
    env = {
        **deployment_env(fake, postgres, redis_server),
        "CHAT_WEBHOOKS": json.dumps([endpoint(receiver.url())]),
    }
    deployed = Deployment(2, env).start()
    try:
        async with httpx.AsyncClient(base_url=deployed.http, timeout=UNIT * 5) as client:
            answers = await asyncio.gather(
                *(
                    client.post("/api/conversations", json={"question": f"q{n}", "webhook": "bot"})
                    for n in range(100)
                )
            )
        assert {answer.status_code for answer in answers} == {202}
        calls = await receiver.until(100, UNIT * 10)
        await asyncio.sleep(1.0)
    finally:
        deployed.remove()
    ids = [call.id for call in receiver.calls]
    assert len(ids) == len(set(ids)) == 100
    questions = {call.verified(SECRET)["data"]["question"] for call in calls}
    assert questions == {f"q{n}" for n in range(100)}


@pytest.mark.parametrize(
    ("hooks", "said"),
    [
        (json.dumps([endpoint("http://hooks.example.com/in")]), "plain http off this machine"),
        (json.dumps([endpoint("http://127.0.0.1:9/")])[:-2], "CHAT_WEBHOOKS: not valid JSON"),
        ('[{"name": "me", "url": "http://127.0.0.1:9/"}]', "[0]: each endpoint needs a `secret`"),
        (
            json.dumps([{**endpoint("http://127.0.0.1:9/"), "secrets": [SECRET]}]),
            "`secret` or `secrets` (two, while rotating), not both",
        ),
        (json.dumps([endpoint("http://127.0.0.1:9/", name="-x")]), "[0].name: '-x' is not"),
        (
            json.dumps([{**endpoint("http://127.0.0.1:9/"), "secret": "a-password-1234567890"}]),
            "[0].secrets: a webhook secret starts with 'whsec_'",
        ),
    ],
    ids=["plain-http", "not-json", "no-secret", "both", "bad-name", "not-whsec"],
)
async def test_a_bad_chat_webhooks_refuses_to_start_with_a_sentence(hooks: str, said: str) -> None:
    async with python_process(
        "-m",
        "backend",
        env={"CHAT_WEBHOOKS": hooks, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    ) as process:
        _, err = await asyncio.wait_for(process.communicate(), UNIT * 5)
    assert process.returncode == 2
    told = err.decode()
    assert told.startswith("python -m backend: the settings are not valid:\n  CHAT_WEBHOOKS")
    assert said in told
    assert "Traceback" not in told
    assert SECRET.removeprefix("whsec_")[:12] not in told


def readme_recipe() -> tuple[str, str, str]:
    """The README's webhook recipe, verbatim: the receiver's module, the `CHAT_WEBHOOKS` value
    and the body `curl` posts."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Questions in the background") :]
    section = section[: section.index("\n## ", 1)]
    [module] = re.findall(r"^```python\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    hooks = re.search(r"^CHAT_WEBHOOKS='(.*)' make run$", section, re.MULTILINE)
    body = re.search(r"^curl .* -d '(.*)'$", section, re.MULTILINE)
    assert hooks is not None
    assert body is not None
    return str(module), hooks.group(1), body.group(1)


async def test_the_readmes_receiver_and_recipe_work_as_written(
    make_settings: SettingsFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    module, hooks, body = readme_recipe()
    port = free_port()  # in place of the README's 9000, which may be taken here
    (tmp_path / "receiver.py").write_text(module.replace("9000", str(port)))
    settings = make_settings(chat_webhooks=json.loads(hooks.replace("9000", str(port))))
    async with python_process(
        str(tmp_path / "receiver.py"), stdout=asyncio.subprocess.PIPE
    ) as receiving:
        assert receiving.stdout is not None
        with live_server(settings) as server:
            async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
                answer = await client.post(
                    "/api/conversations",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
            assert answer.status_code == 202
            assert set(answer.json()) == {"conversation", "seq", "webhook"}
            printed = await asyncio.wait_for(receiving.stdout.readline(), UNIT * 2)
            delivered = await until_delivery(server.http, "delivered")
    assert printed.decode() == "reply.completed You said: Name three rivers.\n"
    assert delivered["last_response"] == 204


def test_the_protocol_docs_examples_are_what_the_server_takes_and_sends() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    section = docs[docs.index("## Webhooks") :]
    section = section[: section.index("\n## ", 1)]
    registered, event = re.findall(r"^```json\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    settings = IsolatedSettings(chat_webhooks=json.loads(registered))
    assert [endpoint.name for endpoint in settings.chat_webhooks] == ["me"]
    parsed = TypeAdapter(WebhookEvent).validate_json(event)
    assert parsed.type == "reply.completed"
