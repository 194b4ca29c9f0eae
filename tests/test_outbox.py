"""A client's queue: order, merging of queued tokens, a bound on what a client leaves unread."""

from __future__ import annotations

import json

import pytest

from backend.chat.outbox import OVERFLOW_CODE, Close, Outbox, TokenRun
from backend.protocol.errors import ClientGone
from schemas import ChatResponse


async def test_tokens_queued_behind_a_slow_client_merge_into_one_frame_with_the_last_seq() -> None:
    outbox = Outbox()
    outbox.send(ChatResponse.bot("start"))
    for seq, token in enumerate(["a", "b", "c"], start=10):
        outbox.token(token, seq)
    outbox.send(ChatResponse.bot("end", status="completed"))
    batch = await outbox.take()
    frames = [json.loads(item.to_json()) for item in batch if not isinstance(item, Close)]
    assert [f["type"] for f in frames] == ["start", "stream", "end"]
    assert frames[1]["message"] == "abc"
    assert frames[1]["seq"] == 12


async def test_client_that_never_reads_is_cut_off_with_a_close() -> None:
    outbox = Outbox(max_pending=10)
    for _ in range(10):
        outbox.send(ChatResponse.bot("info", "x"))
    with pytest.raises(ClientGone, match="10 frames unread"):
        outbox.send(ChatResponse.bot("info", "one too many"))
    with pytest.raises(ClientGone):
        outbox.token("later")
    # What was queued will never be read: only the close is left to send.
    assert await outbox.take() == [Close(OVERFLOW_CODE, "Too many unread frames.")]


async def test_a_replay_does_not_count_against_the_bound() -> None:
    outbox = Outbox(max_pending=10)
    outbox.preload(ChatResponse.bot("info", str(n)) for n in range(50))
    for _ in range(5):
        outbox.token("x")
        outbox.send(ChatResponse.bot("info", "live"))
    with pytest.raises(ClientGone):
        outbox.send(ChatResponse.bot("info", "one too many"))


async def test_a_close_goes_after_what_was_queued_and_ends_queueing() -> None:
    outbox = Outbox()
    outbox.token("last words", 3)
    outbox.close(1012, "restarting")
    with pytest.raises(ClientGone):
        outbox.send(ChatResponse.bot("info", "too late"))
    assert await outbox.take() == [TokenRun(["last words"], 3), Close(1012, "restarting")]


@pytest.mark.parametrize("seq", [None, 7])
def test_a_token_run_encodes_as_its_frame_would(seq: int | None) -> None:
    run = TokenRun(['He said "hi"\n', "\t→ é ✓ \u2028", "\\ \x01"], seq)
    assert json.loads(run.to_json()) == json.loads(run.frame().to_json())
