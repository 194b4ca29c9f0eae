"""Render the JSON Schema files that describe the wire frames and the REST answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from schemas.conversations import AssistantList, Conversation, ConversationPage
from schemas.frames import CHAT_RESPONSE, CLIENT_MESSAGE
from schemas.webhooks import DeliveryList, WebhookEvent

SCHEMA_DIR = Path(__file__).parent
SCHEMA_FILES: dict[str, Any] = {
    "chat_response.schema.json": CHAT_RESPONSE,
    "client_message.schema.json": CLIENT_MESSAGE,
    "conversation.schema.json": TypeAdapter(Conversation),
    "conversation_page.schema.json": TypeAdapter(ConversationPage),
    "assistant_list.schema.json": TypeAdapter(AssistantList),
    "webhook_event.schema.json": TypeAdapter(WebhookEvent),
    "webhook_deliveries.schema.json": TypeAdapter(DeliveryList),
}


def render(name: str) -> str:
    """The JSON text that `name` must hold."""
    schema = SCHEMA_FILES[name].json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    """Write every schema file next to this module."""
    for name in SCHEMA_FILES:
        (SCHEMA_DIR / name).write_text(render(name))
        print(f"wrote schemas/{name}")


if __name__ == "__main__":
    main()
