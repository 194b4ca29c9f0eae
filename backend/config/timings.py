"""The server's timing constants, in one place: what each times, and why it has its value.

Seconds unless the name says otherwise. A leaf module: it imports nothing from `backend`, so
any module can import it.
"""

from __future__ import annotations

# Leases and watchers (backend/cluster/shared.py).

# Milliseconds a conversation's lease (which worker runs its reply) outlives its last renewal:
# a worker that dies mid-reply loses it within this long, and another worker can take the
# conversation over (the README promises 3 s). It spans three renewals (`RENEW_EVERY`), so a
# lease survives a renewal or two arriving late.
LEASE_MS = 3000
# Seconds between two renewals of every lease a worker holds, all in one round trip: a third of
# `LEASE_MS`, so a late renewal does not lose a lease. A reply also checks this often, during
# the resume grace, whether a client on any worker still watches it.
RENEW_EVERY = 1.0
# Seconds a worker's mark that it has clients of a conversation stands (the resume grace counts
# clients on every worker). Marks are renewed every third of it, so one survives a late
# renewal, and a worker that died stops counting as a watcher within this long.
WATCH_TTL = 6.0
# The stream of a turn nobody touches is dropped after this long; the turn is stored by then.
STREAM_TTL_S = 3600

# Conversations (backend/chat/conversations.py).

# Seconds an idle, stored conversation stays in memory after its last client or reply: the
# next question of a client that asks over HTTP (each a request of its own) finds it without
# reading the store.
LINGER = 30.0
# Seconds the clients' writers get to send their close frames when draining. A client that
# reads gets its close at once; this only bounds how long one that does not holds up the
# shutdown, before uvicorn closes what is left.
CLOSE_WAIT = 1.0
# Seconds a deletion waits for the worker running the conversation's reply to stop it. Longer
# than `LEASE_MS`, so a holder that died meanwhile is waited out too, its lease expiring.
RELEASE_WITHIN = 5.0

# A conversation shared across workers (backend/cluster/relay.py).

# Seconds between checks, while a turn is open, that a worker still runs it. With `LEASE_MS`,
# a turn whose worker died is ended within 5 s, as the README promises.
CHECK_RUNNER_EVERY = 1.0
# How long a worker waits for another to give up a conversation it was asked to stop. Well
# over `LEASE_MS`, so a holder that died lets go by its lease expiring, and one that is busy
# has time to stop and store its reply; past it the question is answered `unavailable`.
TAKE_OVER_WITHIN = 10.0

# Replies (backend/chat/conversation.py).

# Seconds a cancelled reply gets to wind down before it is cancelled again. A reply that
# honours its cancellation ends well within it; one that swallowed it is cancelled again
# after a pause too short for a user who pressed stop to notice.
RECANCEL_AFTER = 0.25

# Quotas (backend/users/quotas.py, backend/users/slots.py).

# Seconds a slot (a reply or a connection at once, across workers) outlives the last renewal
# of the worker holding it: a worker that dies frees its slots within this long (promised in
# docs/protocol.md). Slots are only counted, so freeing them late costs little.
SLOT_TTL = 30.0
# Seconds between two renewals of the slots a worker holds: a third of `SLOT_TTL`, so a slot
# survives a renewal or two arriving late.
SLOT_RENEW_EVERY = SLOT_TTL / 3
# Seconds a client refused a connection or a reply slot is told to wait before trying again:
# a slot frees when something else of theirs ends, which no clock can say.
SLOT_RETRY_AFTER = 5
# Seconds a "tokens left" read from Redis stands: tokens are charged as replies end, so the
# count may trail by a reply anyway, and the round trip is saved for most questions.
TOKENS_RECHECK = 1.0
# Seconds between two sweeps of expired entries from the memory storage of rates
# (backend/speedups/memory_rates.py). Entries are compared with the clock when they are read,
# so the sweep only frees memory: once a second frees it soon enough.
RATES_SWEEP_EVERY = 1.0

# Serving (backend/process/server.py).

# Seconds uvicorn waits, once the app has drained (replies finished or stored, clients sent
# their 1012 close), for the connections and tasks still open to end before it cancels them.
# What is left by then ends in well under a second; this only bounds one that would not.
GRACEFUL_SHUTDOWN_TIMEOUT = 5

# A worker not heard from for this many seconds is dead: the turns it ran and had not stored
# are stored from their streams by whichever worker claims them first, looking every
# `SWEEP_EVERY` s (or so: each worker at its own pace).
DEAD_AFTER = 10.0
SWEEP_EVERY = 5.0
