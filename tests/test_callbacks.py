"""The streaming handler stops the model when it can no longer deliver."""

from __future__ import annotations

import openai
import pytest

from backend.model.assistants import Assistants
from backend.model.chain import build_chain
from backend.model.history import History
from backend.model.reply import Replier
from backend.model.turn import Turn
from backend.model.upstream import remote_upstream
from backend.observe.metrics import Metrics
from backend.protocol.errors import ClientGone
from fakes.openai_server import Behaviour, FakeUpstream
from schemas import ChatResponse
from tests.harness import SettingsFactory


class VanishingSink:
    """A client that leaves after `tokens` tokens: every later send raises `ClientGone`."""

    def __init__(self, tokens: int) -> None:
        self.left = tokens
        self.frames: list[ChatResponse] = []

    def send(self, frame: ChatResponse) -> None:
        if self.left <= 0:
            raise ClientGone("gone")
        self.frames.append(frame)

    def token(self, text: str) -> None:
        if self.left <= 0:
            raise ClientGone("gone")
        self.left -= 1


async def test_handler_that_cannot_send_stops_generation(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[" y"] * 400, delay=0.005))
    settings = make_settings()
    async with openai.DefaultAsyncHttpxClient(timeout=5) as client:
        upstream = remote_upstream(settings)
        replier = Replier(
            settings, Assistants.only(build_chain(settings, upstream, client)), upstream, Metrics()
        )
        turn = Turn("talk", VanishingSink(tokens=5))
        with pytest.raises(ClientGone):
            await replier.answer(turn, History(1000))
    record = (await fake.arrived(1))[0]
    await fake.until(record.done.is_set, within=2)
    assert record.hung_up
    assert record.tokens_sent < 50
    # The five tokens the client did get are what the turn keeps.
    assert turn.text == " y" * 5
