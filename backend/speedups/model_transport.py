"""The connections to the model server: httpx's connection pool over plain asyncio protocols.

httpcore's default network layer goes through anyio, which opens a cancel scope (and asks
which event loop is running) around every read, and checks whether an idle pooled connection
was closed by the server with a `poll()` of its socket, for every idle connection each time a
request starts or ends. Many slow streams at once pay for both on every token and every
request. Here a connection is an `asyncio.Protocol`: data is pushed to it as it arrives, a
read with nothing buffered waits on one future with one timer, and "did the server close it?"
is a flag set by the protocol's own callbacks.

The methods take httpcore's `timeout` arguments, as its interface says. Errors are httpcore's
own (`ReadTimeout`, `ReadError`, `ConnectError`...), so httpx and the openai SDK report them
exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable
from typing import Any, cast

import httpcore2
import httpx2
from httpcore2 import (
    ConnectError,
    ConnectTimeout,
    ReadError,
    ReadTimeout,
    WriteError,
    WriteTimeout,
)
from httpcore2._backends.base import AsyncNetworkBackend, AsyncNetworkStream
from httpcore2._types import SOCKET_OPTION

# Bytes buffered unread before the socket stops being read (a model never sends that much
# ahead of its reader; this only bounds memory).
READ_HIGH_WATER = 1 << 20


class ProtocolStream(asyncio.Protocol, AsyncNetworkStream):
    """One TCP (or TLS) connection, read from a buffer the event loop fills."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._lost: Exception | None = None
        self._closed = False
        self._reader: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._reading_paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > READ_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._lost = exc
        self._wake()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _wake(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    # httpcore's AsyncNetworkStream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if not self._buffer and not self._eof and not self._closed:
            loop = asyncio.get_running_loop()
            self._reader = reader = loop.create_future()
            timer = loop.call_later(timeout, _time_out, reader) if timeout is not None else None
            try:
                await reader
            except TimeoutError:
                raise ReadTimeout("timed out waiting for the model server") from None
            finally:
                self._reader = None
                if timer is not None:
                    timer.cancel()
        if self._buffer:
            data = bytes(self._buffer[:max_bytes])
            del self._buffer[:max_bytes]
            if self._reading_paused and len(self._buffer) < READ_HIGH_WATER // 2:
                self._reading_paused = False
                if self.transport is not None:
                    self.transport.resume_reading()
            return data
        if self._lost is not None:
            raise ReadError(str(self._lost) or type(self._lost).__name__)
        return b""  # the server closed the connection

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        if self._closed or self.transport is None or self.transport.is_closing():
            raise WriteError("the connection to the model server is closed")
        self.transport.write(buffer)
        if not self._writable.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._writable.wait()
            except TimeoutError:
                raise WriteTimeout("timed out writing to the model server") from None
            if self._closed:
                raise WriteError("the connection to the model server was lost")

    async def aclose(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()
        self._closed = True

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> AsyncNetworkStream:
        if self.transport is None:
            raise ConnectionError("the connection to the model server is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                tls = await loop.start_tls(
                    self.transport, self, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            await self.aclose()
            raise ConnectTimeout("timed out in the TLS handshake") from None
        except (OSError, ssl.SSLError) as exc:
            await self.aclose()
            raise ConnectError(str(exc)) from exc
        if tls is None:
            raise ConnectError("the connection closed during the TLS handshake")
        self.transport = tls
        return self

    def get_extra_info(self, info: str) -> Any:
        transport = self.transport
        if info == "is_readable":
            # Data or a close waiting on a connection no request uses: the server hung up.
            return bool(self._buffer) or self._eof or self._closed
        if transport is None:
            return None
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "socket":
            return transport.get_extra_info("socket")
        return None


def _time_out(reader: asyncio.Future[None]) -> None:
    if not reader.done():
        reader.set_exception(TimeoutError())


class AsyncioBackend(AsyncNetworkBackend):
    """Opens `ProtocolStream`s."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, stream = await loop.create_connection(
                    ProtocolStream,
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:
            raise ConnectError(str(exc)) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            with contextlib.suppress(OSError):
                sock.setsockopt(*option)
        return stream

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, stream = await loop.create_unix_connection(ProtocolStream, path)
        except TimeoutError:
            raise ConnectTimeout(f"timed out connecting to {path}") from None
        except OSError as exc:
            raise ConnectError(str(exc)) from exc
        return stream

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def model_transport(limits: httpx2.Limits) -> httpx2.AsyncHTTPTransport:
    """httpx's transport with its pool's connections made by `AsyncioBackend`."""
    transport = httpx2.AsyncHTTPTransport(limits=limits)
    # The only way in: the pool makes its own backend (`usable("model_transport")` checks it).
    pool = transport._pool
    if isinstance(pool, httpcore2.AsyncConnectionPool):
        pool._network_backend = AsyncioBackend()
    return transport
