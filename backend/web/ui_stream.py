"""A reply as the Vercel AI SDK's UI message stream: our frames, one reply, as its SSE chunks.

The stream is `start`, `text-start`, `text-delta`s, `text-end`, `finish`, then `data: [DONE]`.
What our frames say beyond text travels in the parts the protocol has for it: an `info` frame
is a `data-info` part, an `error` frame a `data-error` part with its code (then the SDK's own
`error` chunk with the sentence), and the `end` frame's status and usage are the message's
metadata on `finish`, with the conversation's id. A step of the chain that is a tool call is
the SDK's own tool part (`tool-input-available`, then `tool-output-available` or
`tool-output-error`; dynamic and run by the server, so `useChat` shows it without the tool
being declared), between the text before it and a new text part after it; other steps are
`data-step` parts.
"""

from __future__ import annotations

import json
from typing import Any

from backend.chat.outbox import Close, Outbox, Pending, Raw, SendText, TokenRun
from backend.web.sse import STREAM_HEADERS

HEADERS = {**STREAM_HEADERS, "x-vercel-ai-ui-message-stream": "v1"}
DONE = "data: [DONE]\n\n"
FINISH_REASONS = {"completed": "stop", "interrupted": "other", "error": "error"}


def chunk(part: dict[str, Any]) -> str:
    """One SSE event carrying one UI message chunk."""
    return f"data: {json.dumps(part, ensure_ascii=False, separators=(',', ':'))}\n\n"


def delta(text_id: str, text: str) -> str:
    """A `text-delta` chunk, written without building a dict per token."""
    escaped = json.dumps(text, ensure_ascii=False)
    return f'data: {{"type":"text-delta","id":"{text_id}","delta":{escaped}}}\n\n'


def message_id(start_seq: int) -> str:
    """The UI message id of the reply whose `start` frame has this `seq`."""
    return f"a{start_seq}"


class ReplyStream:
    """Turns the frames of one reply, read from a client's outbox, into UI message chunks.

    Frames before the reply's `start` (the question said back, the tail of a reply it
    pre-empted) are skipped; the stream ends with the reply's `end`.
    """

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.text_id: str | None = None
        # Whether the text part `text_id` is open (a tool part closes it; text reopens one).
        self.text_open = False
        self.text_base = ""
        self.text_parts = 0
        self.ended = False

    def feed(self, batch: list[Pending]) -> str:
        """The chunks for what the outbox gave, as SSE text ("" when nothing of the reply)."""
        out: list[str] = []
        for item in batch:
            if self.ended:
                break
            if isinstance(item, TokenRun):
                if self.text_id is not None:
                    out.append(self._text("".join(item.parts)))
                continue
            if isinstance(item, Close):
                out.append(chunk({"type": "error", "errorText": item.reason}))
                self.ended = True
                break
            if isinstance(item, Raw):
                self._frame(json.loads(item.text), out)
            elif item.type == "stream" and item.sender == "bot" and self.text_id is not None:
                out.append(self._text(item.message))
            else:
                self._frame(item.model_dump(exclude_none=True), out)
        return "".join(out)

    def token(self, text: str, seq: int | None) -> str:
        """A token sent on its own, straight from the reply (after `start`, as it comes)."""
        if self.text_id is None:  # before the reply's `start`: no message to put it in
            return ""
        return self._text(text)

    def _text(self, text: str) -> str:
        """A `text-delta`, after a `text-start` if a tool part closed the text part before."""
        if self.text_open:
            return delta(self.text_id or "", text)
        self.text_parts += 1
        self.text_id = f"{self.text_base}.{self.text_parts}"
        self.text_open = True
        return chunk({"type": "text-start", "id": self.text_id}) + delta(self.text_id, text)

    def _frame(self, frame: dict[str, Any], out: list[str]) -> None:
        kind = frame["type"]
        if frame["sender"] != "bot":
            return
        if self.text_id is None:
            if kind != "start":
                return
            seq = int(frame.get("seq", 0))
            self.text_id = self.text_base = f"t{seq}"
            metadata = {"conversation": self.conversation_id, "seq": seq}
            if frame.get("regenerate"):
                metadata["regenerate"] = True
            out.append(
                chunk({"type": "start", "messageId": message_id(seq), "messageMetadata": metadata})
            )
            out.append(chunk({"type": "text-start", "id": self.text_id}))
            self.text_open = True
            return
        if kind == "stream":
            out.append(self._text(frame["message"]))
        elif kind == "info" and "step" in frame:
            if frame["step"]["kind"] == "tool" and self.text_open:
                out.append(chunk({"type": "text-end", "id": self.text_id}))
                self.text_open = False
            out.append(chunk(step_part(frame)))
        elif kind in ("info", "error"):
            out.append(chunk(data_part(frame)))
            if kind == "error":
                out.append(chunk({"type": "error", "errorText": frame["message"]}))
        elif kind == "end":
            status = frame.get("status", "completed")
            metadata = {"conversation": self.conversation_id, "status": status}
            metadata.update(_fields(frame, "usage", "timings", "seq"))
            if self.text_open:
                out.append(chunk({"type": "text-end", "id": self.text_id}))
            out.append(
                chunk(
                    {
                        "type": "finish",
                        "finishReason": FINISH_REASONS.get(status, "other"),
                        "messageMetadata": metadata,
                    }
                )
            )
            out.append(DONE)
            self.ended = True


def data_part(frame: dict[str, Any]) -> dict[str, Any]:
    """The data part an `info` or `error` frame travels in, live or replayed from the store."""
    if frame["type"] == "error":
        return {"type": "data-error", "data": _fields(frame, "code", "message", "seq")}
    return {"type": "data-info", "data": _fields(frame, "message", "seq")}


def step_part(frame: dict[str, Any]) -> dict[str, Any]:
    """The chunk a step's frame travels in: a tool's as the SDK's tool chunks (run by the
    server, and dynamic: no client declares our tools), any other as a `data-step` part."""
    step = frame["step"]
    detail = step.get("detail", {})
    if step["kind"] != "tool":
        # One part per step: its end replaces its start in `useChat` (same type and id).
        data = {**step, **_fields(frame, "message", "seq")}
        return {"type": "data-step", "id": step["id"], "data": data}
    tool = {"toolCallId": step["id"], "dynamic": True, "providerExecuted": True}
    if step["status"] == "started":
        return {
            "type": "tool-input-available",
            **tool,
            "toolName": step["name"],
            "input": detail.get("arguments"),
        }
    if step["status"] in ("error", "interrupted"):
        return {"type": "tool-output-error", **tool, "errorText": detail.get("error", "")}
    return {"type": "tool-output-available", **tool, "output": detail.get("result")}


def _fields(frame: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: frame[name] for name in names if name in frame}


async def write_reply(
    outbox: Outbox, conversation_id: str, send: SendText, direct: bool = True
) -> None:
    """Write the UI message stream of the next reply to reach `outbox`, to its end.

    With `direct`, a token that finds nothing queued is sent by the reply's own task, as on a
    socket.
    """
    stream = ReplyStream(conversation_id)
    while not stream.ended:
        text = stream.feed(await outbox.take())
        if text:
            await send(text)
        # Tokens go straight out once the reply has started (and the writer waits again).
        started = direct and stream.text_id is not None and not stream.ended
        outbox.attach(send if started else None, stream.token)
