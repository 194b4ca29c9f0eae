"""Background questions: `POST /api/conversations` (a new conversation) and
`POST /api/conversations/{id}/messages` answer `202 Accepted` at once, and the reply runs with no
client attached. It is stored as it streams, can be watched live by any client that joins, is
stopped like any other (`/api/chat/{id}/stop`, a socket's `stop`), and, when the question names
a registered endpoint, ends with a webhook call (backend/webhooks/).

Everything else is as on a socket: the caller's own conversations only, quotas asked before
anything runs, and one reply in flight per conversation, so a second question pre-empts the
first (whose reply ends `interrupted`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, status

from backend.chat.conversation import Conversation
from backend.chat.conversations import Conversations
from backend.config.settings import Settings
from backend.protocol.errors import ChatError
from backend.protocol.inbound import check_question
from backend.users.auth import Principal
from backend.users.quotas import RateLimited, quota_key
from backend.web.access import Access
from backend.web.http_errors import described, refusal, unprocessable
from backend.webhooks.events import Webhooks
from schemas.webhooks import Accepted, BackgroundQuestion

NOTHING_TO_REGENERATE = "Nothing was asked in this conversation yet, so nothing to regenerate."
BOTH = 'Send either a `question` or `"regenerate": true`, not both.'
NEITHER = 'Send a `question` (or `"regenerate": true` to answer the last one again).'


def build_background_router(
    conversations: Conversations, settings: Settings, access: Access, webhooks: Webhooks
) -> APIRouter:
    """The two routes that take questions to be answered in the background."""
    router = APIRouter(prefix="/api/conversations", tags=["background questions"])
    refusals = described(
        {
            401: "No valid credential",
            403: "A request from another site's page",
            404: "No such conversation",
            422: "A malformed question, an unknown assistant or webhook",
            429: "A quota of the caller's is used up (see `Retry-After`)",
            503: "The server is stopping, or shared state is out of reach",
        }
    )

    def question_of(body: BackgroundQuestion) -> str | None:
        if body.question is not None and body.regenerate:
            raise unprocessable(BOTH)
        if body.question is None and not body.regenerate:
            raise unprocessable(NEITHER)
        if body.question is None:
            return None
        try:
            return check_question(body.question, settings.chat_max_question_chars, "")
        except ChatError as error:
            raise unprocessable(error.message.strip()) from error

    async def start(
        conversation: Conversation,
        body: BackgroundQuestion,
        question: str | None,
        caller: Principal,
        request: Request,
    ) -> Accepted:
        who = quota_key(caller, request.client)
        try:
            if question is not None:
                await conversation.ask(question, who, body.webhook, background=True)
            elif not await conversation.regenerate(who, body.webhook, background=True):
                raise unprocessable(NOTHING_TO_REGENERATE)
        except BaseException as failed:
            conversation.drop_if_idle()
            if isinstance(failed, ChatError) and not isinstance(failed, RateLimited):
                raise refusal(failed) from failed
            raise
        # The reply's task has not run yet: its `start` is the next frame.
        return Accepted(
            conversation=conversation.id, seq=conversation.seq + 1, webhook=body.webhook
        )

    @router.post(
        "",
        status_code=status.HTTP_202_ACCEPTED,
        summary="Ask in a new conversation; the reply runs in the background",
        responses=refusals,
    )
    async def ask_new(
        body: BackgroundQuestion,
        request: Request,
        caller: Principal = Depends(access.caller),  # noqa: B008
    ) -> Accepted:
        question = question_of(body)
        if question is None:
            raise unprocessable("A new conversation has nothing to regenerate: send a `question`.")
        webhooks.check(body.webhook)
        access.ensure_open()
        conversation = conversations.new(caller.user, body.assistant)
        return await start(conversation, body, question, caller, request)

    @router.post(
        "/{conversation_id}/messages",
        status_code=status.HTTP_202_ACCEPTED,
        summary="Ask (or regenerate) in a conversation; the reply runs in the background",
        responses=refusals,
    )
    async def ask_more(
        conversation_id: str,
        body: BackgroundQuestion,
        request: Request,
        caller: Principal = Depends(access.caller),  # noqa: B008
    ) -> Accepted:
        question = question_of(body)
        webhooks.check(body.webhook)
        access.ensure_open()
        conversation = await conversations.open(conversation_id, caller.user, 0, body.assistant)
        return await start(conversation, body, question, caller, request)

    return router
