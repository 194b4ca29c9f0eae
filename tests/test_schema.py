"""The exported JSON Schema matches the code, and real frames validate against it."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import jsonschema
import pytest
from websockets.asyncio.client import connect as ws_connect

from backend.config import table as settings_table
from backend.config.settings import Settings
from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from schemas.export import SCHEMA_DIR, SCHEMA_FILES, render
from tests.harness import (
    UNIT,
    ask,
    connect,
    conversation_of,
    recv,
    until_end,
)


@pytest.mark.parametrize("name", sorted(SCHEMA_FILES))
def test_schema_file_is_current(name: str) -> None:
    on_disk = (SCHEMA_DIR / name).read_text()
    assert on_disk == render(name), f"schemas/{name} is stale: run `make schemas`"


async def test_every_frame_kind_matches_the_schema(server: Addressed, fake: FakeUpstream) -> None:
    schema = json.loads((SCHEMA_DIR / "chat_response.schema.json").read_text())
    fake.then(Behaviour(status=401))
    async with ws_connect(server.ws) as ws:
        frames = [await recv(ws)]  # the opening info, with the conversation's id
        frames += await ask(ws, "hello")  # echo, start, info, stream, end
        frames += await ask(ws, "fail")  # error, end(error)
        await ws.send(json.dumps({"type": "regenerate"}))
        frames += await until_end(ws)  # start with `regenerate`
        await ws.send(json.dumps({"type": "stop"}))
        frames.append(await recv(ws))  # info, no seq
        await ws.send(json.dumps({"type": "reset"}))
        frames.append(await recv(ws))  # info with the new conversation and a seq
    assert {f["type"] for f in frames} == {"start", "info", "stream", "end", "error"}
    assert any(f.get("regenerate") for f in frames)
    assert sum("conversation" in f for f in frames) == 2
    for frame in frames:
        jsonschema.validate(frame, schema)


async def test_rest_answers_match_their_schemas(server: Addressed, fake: FakeUpstream) -> None:
    async with connect(server.ws) as ws:
        await ask(ws, "keep me")
        conversation = conversation_of(ws)
    async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
        page = (await client.get("/api/conversations")).json()
        one = (await client.get(f"/api/conversations/{conversation}")).json()
    for name, answer in [("conversation_page", page), ("conversation", one)]:
        schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
        jsonschema.validate(answer, schema)


@pytest.mark.parametrize(
    "message",
    [
        {"type": "question", "message": "hi"},
        {"type": "stop"},
        {"type": "reset"},
        {"type": "regenerate"},
    ],
)
def test_client_messages_match_the_schema(message: dict[str, str]) -> None:
    schema = json.loads((SCHEMA_DIR / "client_message.schema.json").read_text())
    jsonschema.validate(message, schema)


def test_schema_rejects_unknown_client_type() -> None:
    schema = json.loads((SCHEMA_DIR / "client_message.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"type": "dance"}, schema)


def test_readme_settings_table_is_current() -> None:
    readme = settings_table.README.read_text()
    assert readme == settings_table.rewritten(readme), "README's settings table: `make schemas`"


def test_help_lists_every_setting() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "backend", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in Settings.model_fields:
        assert f"\n  {name.upper()} (default: " in shown
