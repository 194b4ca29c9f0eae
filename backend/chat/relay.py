"""How a conversation's frames reach its clients, and who runs its turn: the relay.

A `Conversation` keeps its turns, its clients and its one reply; its relay carries the rest,
and there are two of them, siblings behind one interface, chosen once for the whole app:

- `LocalRelay` (this module): one process holds every client of the conversation and runs its
  every reply, so a frame goes straight to the clients, and the turn is always this process's.
- `RedisRelay` (`backend/cluster/relay.py`): clients and replies may be on any worker. A frame
  goes to the conversation's Redis stream and reaches every client, on every worker, from
  there; a turn is run under a lease that one worker at a time holds.

The conversation calls its relay to send frames, follow clients and hold or give back the
turn; the relay calls the conversation back only to stop its reply (another worker asked, or
took it over).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from backend.chat.outbox import Outbox
from backend.config.redis_clients import SharedRedis
from backend.protocol.errors import ClientGone
from backend.store.records import TurnRecord
from schemas import ChatResponse

if TYPE_CHECKING:
    from backend.chat.conversation import Conversation


class Relay(Protocol):
    """One conversation's link to its clients and to whoever else may run its turns."""

    # Seconds between checks whether clients elsewhere still watch a reply nobody here
    # watches; None when there is no elsewhere.
    recheck_every: float | None
    # Whether a turn in flight is kept whole outside this process (a Redis stream) until it
    # ends: then the store gets it when it ends, not every second as it grows.
    keeps_live_turn: bool

    async def recover(self) -> None:
        """Store the turn a worker that died ran here, as far as it got (shared relays)."""

    # Frames.

    def send(self, frame: ChatResponse) -> None:
        """Deliver a numbered frame to every client of the conversation."""

    def token(self, text: str, seq: int) -> None:
        """Deliver a piece of reply text, numbered `seq`, to every client."""

    # Clients.

    def announce(self) -> None:
        """A new conversation's id is handed out: make it known wherever a client may use it."""

    async def join(self, client: Outbox, after: int) -> None:
        """Send `client`, just added to the conversation's clients, what it missed after
        `after`, then every frame as it comes."""

    def leave(self, client: Outbox, last: bool) -> None:
        """`client` is gone (`last`: the conversation has no client here any more)."""

    def close_all(self) -> None:
        """Every client is being closed: stop feeding them."""

    async def watched_elsewhere(self) -> bool:
        """Whether a client elsewhere still watches the conversation."""

    async def reply_elsewhere(self) -> int | None:
        """The `seq` just before the first frame of a reply in flight elsewhere; None if none."""

    async def last_seq(self) -> int:
        """The last `seq` the conversation used elsewhere (0 if nowhere else)."""

    async def turns_elsewhere(self) -> int:
        """How many turns the conversation has as far as the worker that ran its latest one
        knows (0 if none ran elsewhere), which the store may not have yet."""

    # The turn.

    async def hold(self, admitted: Awaitable[None]) -> None:
        """Make the conversation's turn this process's to run, once `admitted` (the asker's
        quotas) has said yes if another reply must be stopped for it."""

    def load(self) -> Awaitable[None] | None:
        """With the turn held: what brings the conversation up to date with what others did
        (awaited while the reply's quota slot is taken); None when nothing can be behind."""

    def begin(self, record: TurnRecord, regenerate: bool) -> None:
        """The turn `record` starts here; its frames follow through `send` and `token`."""

    async def release(self) -> None:
        """The turn is over here (or never began): let whoever runs the next one have it."""

    async def stop_elsewhere(self) -> bool:
        """Stop the reply in flight elsewhere and wait for its end; False if there is none."""


class LocalRelay:
    """Every client and every reply of the conversation is in this process."""

    recheck_every: float | None = None
    keeps_live_turn = False

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation

    async def recover(self) -> None:
        pass  # no other worker: a turn cut off by a crash is closed as the store starts

    def send(self, frame: ChatResponse) -> None:
        conversation = self.conversation
        for client in tuple(conversation.clients):
            try:
                client.send(frame)
            except ClientGone:
                conversation.leave(client)

    def token(self, text: str, seq: int) -> None:
        conversation = self.conversation
        lost: list[Outbox] = []
        for client in conversation.clients:
            try:
                client.token(text, seq)
            except ClientGone:
                lost.append(client)
        for client in lost:
            conversation.leave(client)

    def announce(self) -> None:
        pass

    async def join(self, client: Outbox, after: int) -> None:
        client.preload(self.conversation.frames_after(after))

    def leave(self, client: Outbox, last: bool) -> None:
        pass

    def close_all(self) -> None:
        pass

    async def watched_elsewhere(self) -> bool:
        return False

    async def reply_elsewhere(self) -> int | None:
        return None

    async def last_seq(self) -> int:
        return 0

    async def turns_elsewhere(self) -> int:
        return 0

    async def hold(self, admitted: Awaitable[None]) -> None:
        await admitted

    def load(self) -> Awaitable[None] | None:
        return None

    def begin(self, record: TurnRecord, regenerate: bool) -> None:
        pass

    async def release(self) -> None:
        pass

    async def stop_elsewhere(self) -> bool:
        return False


# What makes each conversation's relay.
RelayFactory = Callable[["Conversation"], Relay]


class Directory(Protocol):
    """The conversations a worker keeps in memory, as the relays need to see them."""

    def live(self, conversation_id: str) -> Conversation | None:
        """The conversation if it is in memory here."""

    def watched(self) -> list[str]:
        """The ids of the conversations with clients here."""

    def deleted_elsewhere(self, conversation_id: str) -> None:
        """Another worker deleted the conversation."""

    async def recover(self, conversation_id: str) -> None:
        """A worker that died ran a turn of the conversation and may not have stored it."""


class Relays(Protocol):
    """What the app's conversations share beyond this process, if anything: chosen once, by
    the app, and making each conversation's relay."""

    # Whether other workers serve the same conversations (then a conversation in memory may
    # be behind what they did, and the store and Redis must both answer before one is opened).
    shared: bool

    @property
    def redis(self) -> SharedRedis | None:
        """The client for the rest of the shared state (quotas, tickets); None in-process."""

    async def running(self, conversation_id: str) -> bool:
        """Whether another worker runs the conversation's turn, or will end it."""

    def relay(self, conversation: Conversation) -> Relay:
        """The relay of a conversation being brought into memory."""

    async def start(self, directory: Directory) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return once whatever is shared answers; raise if it cannot be reached."""

    async def begun_elsewhere(self, conversation_id: str) -> tuple[str, str | None] | None:
        """The owner and assistant of a conversation begun elsewhere that the store may not
        have yet; None if none was."""

    async def latest_turn(self, conversation_id: str) -> TurnRecord | None:
        """The turn being streamed elsewhere (or just ended there), not stored yet."""

    async def forget(self, conversation_id: str) -> None:
        """The conversation is deleted: drop it everywhere, stopping its reply elsewhere."""

    async def give_back_all(self) -> None:
        """The process is draining, everything stored: give back every turn it holds."""


class LocalRelays:
    """One process serves every conversation: nothing is shared."""

    shared = False
    redis = None

    def relay(self, conversation: Conversation) -> LocalRelay:
        return LocalRelay(conversation)

    async def running(self, conversation_id: str) -> bool:
        return False  # no other worker

    async def start(self, directory: Directory) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def begun_elsewhere(self, conversation_id: str) -> tuple[str, str | None] | None:
        return None

    async def latest_turn(self, conversation_id: str) -> TurnRecord | None:
        return None

    async def forget(self, conversation_id: str) -> None:
        pass

    async def give_back_all(self) -> None:
        pass
