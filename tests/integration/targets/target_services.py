"""Helpers of the target tests: service addresses, polling, a TCP proxy, a webhook receiver.

The :class:`TcpProxy` stands between a target and a real server so a test can
take the server "down" (stop listening, cut open connections) and bring it back
on the same port. Fixtures using these live in this directory's conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.integration.harness import PG_URL, REDIS_URL, eventually, free_port

__all__ = ["PG_URL", "REDIS_URL", "TcpProxy", "Webhook", "eventually", "free_port", "unique"]

STACK_HINT = "run `make stack-up` (or `.venv/bin/python -m app.ops.stack up`)"


def reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
        return True
    return False


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class TcpProxy:
    """A loopback TCP forwarder to ``upstream`` that can be stopped and started on one port."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Stop listening and cut every open connection, as a dying server would."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.time)
    ok: bool = False  # answered 2xx


@dataclass
class Webhook:
    """A real HTTP receiver on loopback with scripted failures.

    ``fail(n, status, headers)`` makes the next ``n`` requests answer ``status``;
    a body ``{"reject": true}`` gets 422; ``/slow`` answers after ``slow_s``;
    ``/echo401`` answers 401 with the request's headers in the body, ``/echo-reason``
    in the reason phrase too (a hostile receiver); while ``etag`` is set, a request
    whose ``If-Match`` differs from it gets 412.
    """

    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    failures: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)
    in_flight: int = 0
    max_in_flight: int = 0
    hold_s: float = 0.0
    #: While set and not yet set free, every request waits for it (a hung receiver).
    gate: asyncio.Event | None = None
    slow_s: float = 2.0
    #: Called with each request's JSON body; a status it returns is the answer.
    fail_if: Callable[[Any], int | None] | None = None
    #: The entity tag of the receiver's resource, checked against ``If-Match``.
    etag: str | None = None
    _runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def fail(self, times: int, status: int, headers: dict[str, str] | None = None) -> None:
        self.failures.extend([(status, headers or {})] * times)

    def keys(self) -> list[str]:
        return [r.headers.get("Idempotency-Key", "") for r in self.received]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        received = Received(request.method, request.path, dict(request.headers), body)
        self.received.append(received)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.hold_s:
                await asyncio.sleep(self.hold_s)
            if request.path == "/slow":
                await asyncio.sleep(self.slow_s)
            echoed = "; ".join(f"{k}={v}" for k, v in request.headers.items())
            if request.path == "/echo401":
                return web.Response(status=401, text=echoed)
            if request.path == "/echo-reason":
                return web.Response(status=401, reason=f"Denied {echoed}"[:200], text=echoed)
            if request.path == "/moved":
                raise web.HTTPFound("http://169.254.169.254/")
            if self.fail_if is not None and (status := self.fail_if(body)):
                return web.Response(status=status, text="scripted failure")
            if self.etag is not None and request.headers.get("If-Match", self.etag) != self.etag:
                return web.Response(status=412, text="precondition failed")
            if self.failures:
                status, headers = self.failures.popleft()
                return web.Response(status=status, headers=headers, text="try later")
            if isinstance(body, dict) and body.get("reject"):
                return web.Response(status=422, text="unprocessable")
            received.ok = True
            return web.json_response({"ok": True})
        finally:
            self.in_flight -= 1
