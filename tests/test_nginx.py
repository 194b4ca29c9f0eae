"""deploy/nginx.conf under nginx itself, in front of small HTTP servers standing in for workers
that are live, answering 503 (an outage of Redis or PostgreSQL, a drain), or gone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from backend.process.server import free_port
from deploy.services import Nginx
from tests.harness import UNIT


class Upstream(ThreadingHTTPServer):
    """An HTTP server on a loopback port that answers every request with its own name, or with
    503 and Retry-After for the next `busy` requests."""

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), Answer)
        self.name = name
        self.port: int = self.server_address[1]
        self.busy = 0
        self.answered: list[int] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)
        self.thread.start()

    def status(self) -> int:
        """The status of the next answer."""
        with self.lock:
            status = 503 if self.busy > 0 else 200
            self.busy -= status == 503
            self.answered.append(status)
            return status

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(UNIT)


class Answer(BaseHTTPRequestHandler):
    server: Upstream

    def do_GET(self) -> None:
        status = self.server.status()
        body = self.server.name.encode()
        self.send_response(status)
        if status == 503:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstreams() -> Iterator[tuple[Upstream, Upstream]]:
    one, two = Upstream("one"), Upstream("two")
    yield one, two
    one.stop()
    two.stop()


class LimitedNginx(Nginx):
    """nginx started with at most 1024 open files, as a login shell usually allows."""

    def command(self) -> list[str]:
        return ["sh", "-c", 'ulimit -S -n 1024 && exec "$@"', "nginx", *super().command()]


@pytest.fixture
def proxy(request: pytest.FixtureRequest, upstreams: tuple[Upstream, Upstream]) -> Iterator[Nginx]:
    """nginx with the deployment's configuration in front of the two upstream servers."""
    kind = getattr(request, "param", Nginx)
    nginx = kind([upstream.port for upstream in upstreams])
    nginx.start()
    yield nginx
    nginx.remove()


@pytest.fixture
def client(proxy: Nginx) -> Iterator[httpx.Client]:
    """One connection to nginx, so that one nginx process (each keeps its own account of the
    upstreams) serves every request of a test."""
    limits = httpx.Limits(max_connections=1)
    with httpx.Client(
        base_url=f"http://127.0.0.1:{proxy.port}", timeout=UNIT, limits=limits
    ) as client:
        yield client


def gets(client: httpx.Client, count: int) -> list[tuple[int, str]]:
    """`count` GETs: each status and body."""
    return [((r := client.get("/")).status_code, r.text) for _ in range(count)]


def error_log(nginx: Nginx) -> str:
    return (nginx.folder / "error.log").read_text()


def test_a_draining_workers_503_is_retried_elsewhere_and_keeps_it_in_rotation(
    proxy: Nginx, client: httpx.Client, upstreams: tuple[Upstream, Upstream]
) -> None:
    one = upstreams[0]
    one.busy = 1
    served = []
    while not one.answered:
        served += gets(client, 1)
    assert one.answered == [503]
    assert served in ([(200, "two")], [(200, "two")] * 2)
    assert sorted(gets(client, 6)) == [(200, "one")] * 3 + [(200, "two")] * 3
    assert "temporarily disabled" not in error_log(proxy)


def test_after_an_outage_every_worker_serves_again_at_once(
    proxy: Nginx, client: httpx.Client, upstreams: tuple[Upstream, Upstream]
) -> None:
    one, two = upstreams
    one.busy = two.busy = 2  # Redis out of reach: every worker answers 503, twice
    during = [client.get("/") for _ in range(2)]
    assert [(r.status_code, r.headers.get("retry-after")) for r in during] == [(503, "1")] * 2
    assert one.answered == two.answered == [503, 503]
    assert sorted(gets(client, 6)) == [(200, "one")] * 3 + [(200, "two")] * 3
    assert "no live upstreams" not in error_log(proxy)


def test_with_one_worker_gone_the_other_serves_through_an_outage(
    upstreams: tuple[Upstream, Upstream],
) -> None:
    live = upstreams[1]
    nginx = Nginx([free_port(), live.port])  # the first one's port: nobody listens
    nginx.start()
    limits = httpx.Limits(max_connections=1)
    base = f"http://127.0.0.1:{nginx.port}"
    try:
        with httpx.Client(base_url=base, timeout=UNIT, limits=limits) as client:
            live.busy = 2
            during = gets(client, 2)  # every worker failed these: 503, or 502 if tried last
            assert gets(client, 6) == [(200, "two")] * 6
            assert {status for status, _ in during} <= {502, 503}
            assert live.answered[:2] == [503, 503]
        assert "no live upstreams" not in error_log(nginx)
    finally:
        nginx.remove()


@pytest.mark.parametrize("proxy", [LimitedNginx], indirect=True)
def test_nginx_has_the_open_files_its_connections_need(proxy: Nginx, client: httpx.Client) -> None:
    assert sorted(gets(client, 2)) == [(200, "one"), (200, "two")]
    proxy.stop()
    said = error_log(proxy)
    assert "exceed open file resource limit" not in said
    assert [line for line in said.splitlines() if "[warn]" in line or "[alert]" in line] == []
