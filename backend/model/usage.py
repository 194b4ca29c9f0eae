"""How many model tokens a reply took: as the model server reports it, else as we count it."""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import AIMessage, BaseMessage

from backend.model.history import TokenCounter
from schemas import Usage


def reported(reply: BaseMessage | None) -> Usage | None:
    """The usage the model server sent with `reply` (`stream_options.include_usage`), if any."""
    metadata = getattr(reply, "usage_metadata", None)
    if not metadata:
        return None
    return Usage(
        prompt_tokens=metadata.get("input_tokens", 0),
        completion_tokens=metadata.get("output_tokens", 0),
    )


def counted(sent: Sequence[BaseMessage], reply: str, count: TokenCounter) -> Usage:
    """Our own count, for a reply the model server did not report (stopped, or a server that
    never reports): the messages sent, and the reply's text without a message's overhead."""
    completion = max(0, count([AIMessage(reply)]) - count([AIMessage("")])) if reply else 0
    return Usage(prompt_tokens=count(sent), completion_tokens=completion, estimated=True)
