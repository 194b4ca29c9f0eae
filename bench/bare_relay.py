"""The baseline relay: the openai SDK's stream sent straight to a WebSocket, one frame a chunk.

No LangChain, no callbacks, no coalescing: what "just relay the tokens" costs on the same
upstream, so the chat server's numbers can be read as ratios to it.
`python -m bench.bare_relay PORT UPSTREAM_URL`
"""

from __future__ import annotations

import json
import sys

import openai
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket


def create_app(upstream_url: str) -> Starlette:
    """A one-route app: every text frame is a question, answered as `stream` frames."""
    client = openai.AsyncOpenAI(base_url=upstream_url, api_key="not-needed", max_retries=0)

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        async for question in websocket.iter_text():
            stream = await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": question}],
                stream=True,
            )
            async for chunk in stream:
                text = chunk.choices[0].delta.content if chunk.choices else None
                if text:
                    frame = {"sender": "bot", "message": text, "type": "stream"}
                    await websocket.send_text(json.dumps(frame))
            end = {"sender": "bot", "message": "", "type": "end", "status": "completed"}
            await websocket.send_text(json.dumps(end))

    return Starlette(routes=[WebSocketRoute("/chat", chat)])


if __name__ == "__main__":
    port, upstream = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(
        create_app(upstream),
        host="127.0.0.1",
        port=port,
        ws="websockets-sansio",
        log_level="warning",
    )
