"""The pure cores, without a server: a turn replayed after any `seq`, a conversation's stream
replayed to a client catching up, and a reply's frames as the AI SDK's UI message stream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backend.chat.outbox import Close, Raw, TokenRun
from backend.cluster.relay import replayed as stream_replayed
from backend.cluster.relay import turn_from
from backend.cluster.shared import TEXT, TEXT_SO_FAR, Entry
from backend.store.records import TurnRecord
from backend.web.ui_stream import DONE, ReplyStream
from schemas import ChatResponse
from schemas.frames import FrameType


def bot(kind: FrameType, seq: int, **fields: Any) -> ChatResponse:
    frame = ChatResponse.bot(kind, **fields)
    frame.seq = seq
    return frame


def streamed_turn() -> TurnRecord:
    """Echo at 1, start at 2, text 'Hello world' over seqs 3..13, info at 14, end at 15."""
    turn = TurnRecord(0, "hi", echo_seq=1)
    turn.events = [bot("start", 2)]
    turn.text_base = 2
    turn.parts = ["Hello", " world"]
    turn.events += [bot("info", 14, message="done thinking"), bot("end", 15, status="completed")]
    turn.status = "completed"
    return turn


def replayed(turn: TurnRecord, after: int) -> list[tuple[str, str, int | None]]:
    return [(frame.type, frame.message, frame.seq) for frame in turn.frames_after(after)]


def test_a_turn_replayed_from_its_start() -> None:
    assert replayed(streamed_turn(), 0) == [
        ("stream", "hi", 1),
        ("start", "", 2),
        ("stream", "Hello world", 13),
        ("info", "done thinking", 14),
        ("end", "", 15),
    ]


@pytest.mark.parametrize(
    ("after", "text"),
    [(2, "Hello world"), (3, "ello world"), (7, " world"), (12, "d"), (13, None)],
)
def test_a_turn_replayed_after_a_seq_inside_its_text_resumes_at_that_character(
    after: int, text: str | None
) -> None:
    frames = replayed(streamed_turn(), after)
    texts = [message for kind, message, _ in frames if kind == "stream"]
    assert texts == ([] if text is None else [text])
    assert frames[-1] == ("end", "", 15)
    assert all(seq is not None and seq > after for _, _, seq in frames)


def test_a_turn_still_streaming_replays_its_text_so_far() -> None:
    turn = TurnRecord(0, "hi", echo_seq=1)
    turn.events = [bot("start", 2)]
    turn.text_base = 2
    turn.parts = ["so far"]
    assert replayed(turn, 1) == [("start", "", 2), ("stream", "so far", 8)]
    assert replayed(turn, 8) == []


def test_a_turn_without_a_reply_is_its_question_alone() -> None:
    assert replayed(TurnRecord(0, "q", echo_seq=5), 0) == [("stream", "q", 5)]
    assert replayed(TurnRecord(0, "q", echo_seq=5), 5) == []


def parts(sse: str) -> list[Any]:
    return [
        json.loads(line[6:]) if line != DONE.strip() else "[DONE]"
        for line in sse.split("\n\n")
        if line.startswith("data: ")
    ]


def test_a_reply_as_a_ui_message_stream() -> None:
    stream = ReplyStream("c" * 32)
    before = stream.feed([ChatResponse.echo("hi", seq=1), TokenRun(["stale"], 0)])
    assert before == ""  # nothing before the reply's start
    out = stream.feed(
        [
            bot("start", 2),
            TokenRun(["Hel", "lo"], 7),
            bot("info", 8, message="searching"),
            Raw(9, json.dumps({"sender": "bot", "type": "stream", "message": "!", "seq": 9})),
            bot("error", 10, message="It broke.", code="upstream_dropped"),
            bot("end", 11, status="error"),
            bot("info", 12, message="after the end"),
        ]
    )
    assert stream.ended
    assert [p["type"] if isinstance(p, dict) else p for p in parts(out)] == [
        "start",
        "text-start",
        "text-delta",
        "data-info",
        "text-delta",
        "data-error",
        "error",
        "text-end",
        "finish",
        "[DONE]",
    ]
    chunks = [p for p in parts(out) if isinstance(p, dict)]
    assert chunks[0]["messageId"] == "a2"
    assert chunks[0]["messageMetadata"] == {"conversation": "c" * 32, "seq": 2}
    assert "".join(p["delta"] for p in chunks if p["type"] == "text-delta") == "Hello!"
    assert chunks[5]["data"] == {"code": "upstream_dropped", "message": "It broke.", "seq": 10}
    assert chunks[6]["errorText"] == "It broke."
    assert chunks[8]["finishReason"] == "error"
    assert chunks[8]["messageMetadata"]["status"] == "error"


def test_a_reply_cut_off_by_a_close_ends_with_the_reason() -> None:
    stream = ReplyStream("c" * 32)
    out = stream.feed([bot("start", 2), TokenRun(["par"], 5), Close(1012, "restarting")])
    assert stream.ended
    assert [p["type"] for p in parts(out)] == ["start", "text-start", "text-delta", "error"]
    assert parts(out)[-1]["errorText"] == "restarting"


def test_a_token_sent_on_its_own_is_a_delta_once_the_reply_started() -> None:
    stream = ReplyStream("c" * 32)
    assert stream.token("early", None) == ""
    stream.feed([bot("start", 2)])
    sent = json.loads(stream.token("now", 3).removeprefix("data: "))
    assert sent == {"type": "text-delta", "id": "t2", "delta": "now"}


def entry(seq: int, kind: str, message: str = "") -> Entry:
    frame = ChatResponse.tokens(message, seq=seq) if kind in (TEXT, TEXT_SO_FAR) else None
    if frame is None:
        frame = bot("end", seq, status="completed") if kind == "end" else bot("start", seq)
    return Entry(seq, frame.to_json(), kind, 0)


def merged(entries: list[Entry], after: int = 0) -> list[tuple[str, str, int | None]]:
    frames = [
        frame if isinstance(frame, ChatResponse) else ChatResponse.model_validate_json(frame.text)
        for frame in stream_replayed(entries, after)
    ]
    return [(frame.type, frame.message, frame.seq) for frame in frames]


def test_a_stream_replayed_sends_each_run_of_text_as_one_frame() -> None:
    entries = [
        entry(2, "start"),
        entry(7, TEXT, "Hello"),
        entry(13, TEXT, " world"),
        entry(14, "end"),
    ]
    assert merged(entries) == [
        ("start", "", 2),
        ("stream", "Hello world", 13),
        ("end", "", 14),
    ]


def test_a_single_text_entry_is_replayed_as_published() -> None:
    only = entry(7, TEXT, "Hello")
    assert list(stream_replayed([only])) == [Raw(7, only.frame)]


def test_text_written_anew_is_replayed_from_after_what_the_client_has() -> None:
    """A stream written anew holds the text so far as one entry, from its first character: a
    client that has part of it gets the rest, and one that has none gets it all."""
    whole = entry(13, TEXT_SO_FAR, "Hello world")  # characters at seqs 3..13
    assert merged([whole], after=7) == [("stream", " world", 13)]
    assert merged([whole], after=2) == [("stream", "Hello world", 13)]
    assert merged([whole, entry(15, TEXT, "!")], after=10) == [
        ("stream", "rld", 13),
        ("stream", "!", 15),
    ]


def test_a_turn_is_rebuilt_from_its_stream() -> None:
    echo = ChatResponse.echo("hi", seq=1)
    entries = [
        Entry(1, echo.to_json(), "stream", 4),
        entry(2, "start"),
        entry(7, TEXT, "Hello"),
        entry(13, TEXT_SO_FAR, " world"),
    ]
    record = turn_from(entries)
    assert record is not None
    assert (record.position, record.question, record.text, record.status) == (
        4,
        "hi",
        "Hello world",
        None,
    )
    assert record.text_base == 2
    ended = turn_from([*entries, entry(14, "end")])
    assert ended is not None
    assert ended.status == "completed"
