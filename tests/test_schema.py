"""The exported JSON Schema matches the code, and real frames validate against it."""

from __future__ import annotations

import json

import jsonschema
import pytest

from fakes.openai_server import Behaviour, FakeUpstream
from schemas.export import SCHEMA_DIR, SCHEMA_FILES, render
from tests.harness import LiveServer, ask, connect, recv


@pytest.mark.parametrize("name", sorted(SCHEMA_FILES))
def test_schema_file_is_current(name: str) -> None:
    on_disk = (SCHEMA_DIR / name).read_text()
    assert on_disk == render(name), f"schemas/{name} is stale: run `make schemas`"


async def test_every_frame_kind_matches_the_schema(server: LiveServer, fake: FakeUpstream) -> None:
    schema = json.loads((SCHEMA_DIR / "chat_response.schema.json").read_text())
    fake.then(Behaviour(status=401))
    async with connect(server.ws) as ws:
        frames = await ask(ws, "hello")  # echo, start, info, stream, end
        frames += await ask(ws, "fail")  # error, end(error)
        await ws.send(json.dumps({"type": "stop"}))
        frames.append(await recv(ws))  # info
    assert {f["type"] for f in frames} == {"start", "info", "stream", "end", "error"}
    for frame in frames:
        jsonschema.validate(frame, schema)


@pytest.mark.parametrize(
    "message",
    [
        {"type": "question", "message": "hi"},
        {"type": "stop"},
        {"type": "reset"},
    ],
)
def test_client_messages_match_the_schema(message: dict[str, str]) -> None:
    schema = json.loads((SCHEMA_DIR / "client_message.schema.json").read_text())
    jsonschema.validate(message, schema)


def test_schema_rejects_unknown_client_type() -> None:
    schema = json.loads((SCHEMA_DIR / "client_message.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"type": "dance"}, schema)
