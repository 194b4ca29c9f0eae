"""Fill in deploy/nginx.conf: `python -m deploy.render LISTEN STATE WORKER [WORKER ...]`.

`python -m deploy.render 127.0.0.1:8080 /tmp/chat-nginx 127.0.0.1:8001 127.0.0.1:8002`
prints a configuration for `nginx -c FILE`.
"""

from __future__ import annotations

import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("nginx.conf")


def render(listen: str, state: str, workers: list[str]) -> str:
    """The nginx configuration for `workers` behind `listen`, writing under `state`."""
    values = {
        "LISTEN": listen,
        "STATE": state,
        "WORKERS": "\n        ".join(f"server {worker} max_fails=0;" for worker in workers),
    }
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return text


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    listen, state, *workers = sys.argv[1:]
    Path(state).mkdir(parents=True, exist_ok=True)
    print(render(listen, state, workers), end="")


if __name__ == "__main__":
    main()
