"""The floor to measure against: a minimal relay, with none of the chat server's layers.

httpx streams the model's Server-Sent Events, each `data:` line is parsed with `json` and its
text sent on as a `stream` frame built with `json`; uvicorn on uvloop and httptools. No openai
SDK objects, no LangChain, no conversation. `python -m bench.minimal_relay PORT UPSTREAM_URL`
"""

from __future__ import annotations

import json
import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

END = json.dumps({"sender": "bot", "message": "", "type": "end", "status": "completed"})


def create_app(upstream_url: str) -> Starlette:
    """A one-route app: every text frame is a question, answered as `stream` frames."""
    client = httpx.AsyncClient(base_url=upstream_url, timeout=60)

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        async for question in websocket.iter_text():
            body = {
                "model": "fake-model",
                "messages": [{"role": "user", "content": question}],
                "stream": True,
            }
            async with client.stream("POST", "/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choices = json.loads(line[6:]).get("choices")
                    text = choices[0]["delta"].get("content") if choices else None
                    if text:
                        frame = {"sender": "bot", "message": text, "type": "stream"}
                        await websocket.send_text(json.dumps(frame))
            await websocket.send_text(END)

    return Starlette(routes=[WebSocketRoute("/chat", chat)])


if __name__ == "__main__":
    port, upstream = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(
        create_app(upstream),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        log_level="warning",
    )
