"""`python -m backend [--host H] [--port P] [--workers N]`: serve the chat server."""

from __future__ import annotations

import argparse
import asyncio
import socket

from pydantic import ValidationError
from pydantic_settings import SettingsError

from backend.config.settings import Settings
from backend.config.table import for_help
from backend.model.assistants import ChainImportError, check_importable
from backend.observe import logs
from backend.process.server import chat_server
from backend.process.workers import scale_out_problem, serve_workers
from backend.users.auth import anonymous_refusal
from backend.web.app import create_app


def settings_problems(invalid: ValidationError | SettingsError) -> str:
    """Each problem with the settings on a line of its own, by the variable it is in (and the
    place in its JSON), without the value given: it may be a secret."""
    if isinstance(invalid, SettingsError):
        # A value that is not JSON where JSON is expected: the parser's own words say where.
        field = str(invalid).split('"')[1] if '"' in str(invalid) else "a setting"
        return f"\n  {field.upper()}: not valid JSON ({invalid.__cause__})"
    lines = []
    for error in invalid.errors(include_input=False, include_url=False):
        variable, *place = (str(part) for part in error["loc"])
        where = variable.upper() + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in place)
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"\n  {where}: {message}")
    return "".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, read settings once, and serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m backend",
        description=__doc__,
        epilog=for_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (default 1); more than one needs "
        "CHAT_REDIS_URL, a PostgreSQL CHAT_DATABASE_URL and a model server",
    )
    # A worker started by `--workers`: serve on the listening socket it inherited.
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as invalid:
        parser.exit(
            2, f"python -m backend: the settings are not valid:{settings_problems(invalid)}\n"
        )
    logs.configure(settings.chat_log_format)  # again once uvicorn has set up its loggers
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    refusal = anonymous_refusal(settings, args.host)
    if refusal is not None and args.fd is None:
        parser.exit(2, f"python -m backend: {refusal}\n")
    if args.workers > 1:
        problem = scale_out_problem(settings)
        if problem is not None:
            parser.exit(2, f"python -m backend: cannot run {args.workers} workers: {problem}\n")
        try:
            check_importable(settings)
        except ChainImportError as refused:
            parser.exit(2, f"python -m backend: {refused}\n")
        asyncio.run(serve_workers(args.workers, args.host, args.port, settings))
        return
    try:
        app = create_app(settings)
    except ChainImportError as refused:
        parser.exit(2, f"python -m backend: {refused}\n")
    server = chat_server(app, settings, args.host, args.port)
    logs.configure(settings.chat_log_format)
    if args.fd is not None:
        server.run(sockets=[socket.socket(fileno=args.fd)])
    else:
        server.run()


if __name__ == "__main__":
    main()
