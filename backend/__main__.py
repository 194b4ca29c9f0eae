"""`python -m backend [--host H] [--port P]`: serve the chat server."""

from __future__ import annotations

import argparse
import logging

from backend.app import create_app
from backend.config import Settings
from backend.server import chat_server


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, read settings once, and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per HTTP request to the model server is noise at INFO.
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    settings = Settings()
    chat_server(create_app(settings), settings, args.host, args.port).run()


if __name__ == "__main__":
    main()
