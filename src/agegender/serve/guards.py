"""The HTTP plumbing of ``agegender serve``: ASGI middleware and uvicorn's protocol, kept apart
from the routes.

- :class:`Guard` answers only the host names the service is bound to (and those allowed), so
  that a web page cannot reach a loopback service through DNS rebinding; refuses posts from
  another origin (scheme, host and port compared); asks for the API key where one is set;
  and puts security headers on every answer. A refused request's body is read and dropped
  (up to a bound) before the answer, so the client reads it.
- :class:`Admission` admits an upload before its body is read (step 1 of
  :mod:`agegender.serve.uploads`): 413 from ``Content-Length`` over the route's limit, 503
  when its lane (the photo queue, or the clips) is full or its bytes would not fit the
  buffered-bytes budget; then it counts the body as it streams in (413). A client that asked
  ``Expect: 100-continue`` is answered before it sends.
- :class:`GuardedH11` is uvicorn's h11 protocol with deadlines: for a request's headers, for
  its body (a deadline that grows with what arrives, so only trickling clients are cut), and
  a cap on open connections; what it refuses is logged at most once in a while.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11
from fastapi import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from agegender.serve.uploads import ServiceLimits

#: bytes of a refused body read (and dropped) before answering; beyond, the connection is
#: closed, and a client still sending meets a reset
DRAIN_MAX = 64 * 2**20
#: the page is self-contained: its own inline script and style, images made in the browser,
#: the webcam's stream, requests to this service only, never framed by another site
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        # wasm-unsafe-eval: the private page (/private/) compiles ONNX Runtime's WebAssembly
        b"default-src 'self'; script-src 'self' 'unsafe-inline' 'wasm-unsafe-eval'; "
        b"style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        b"media-src 'self' blob: mediastream:; connect-src 'self'; frame-ancestors 'none'; "
        b"base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
BUSY = "server busy, retry shortly"

log = logging.getLogger("agegender.serve")


class RateLimitedLog:
    """A warning at most once every ``every_s`` seconds, saying how many were held back:
    a flood of refused connections must not flood the log."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s, self.last, self.held = every_s, -float("inf"), 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.held += 1
            return
        more = f" ({self.held} more like it since the last)" if self.held else ""
        self.last, self.held = now, 0
        log.warning("%s%s", message, more)


def quiet_resource_errors(loop: Any, refusals: RateLimitedLog) -> None:
    """Rate-limit asyncio's report of a full file table: past the open-file limit each failed
    ``accept()`` logs a traceback (thousands a second under a connection flood), where one line
    every few seconds says all there is to say. Other errors go to the default handler."""

    def handler(loop: Any, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            refusals.warning(f"out of file descriptors ({exc.strerror}): connections wait")
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def json_headers(body: bytes, close: bool, extra: Iterable[tuple[bytes, bytes]] = ()) -> list:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return [*headers, *([(b"connection", b"close")] if close else []), *extra]


async def send_json(
    send: Callable, status: int, detail: str, close: bool = True, headers: Iterable = ()
) -> None:
    """A ``{"detail": ...}`` answer, straight from the middleware."""
    body = json.dumps({"detail": detail}).encode()
    start = {"type": "http.response.start", "status": status}
    await send({**start, "headers": json_headers(body, close, headers)})
    await send({"type": "http.response.body", "body": body})


def _has_body(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


async def drain(receive: Callable, received: int = 0) -> None:
    """Read and drop the rest of a request body, ``DRAIN_MAX`` bytes at most."""
    while received < DRAIN_MAX:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def refuse(
    scope: dict, receive: Callable, send: Callable, status: int, detail: str, headers=()
) -> None:
    """Answer ``status`` to a request whose body is not wanted: the body is drained first
    (unless the client waits for ``100 Continue``), then the connection closed."""
    found = dict(scope.get("headers") or [])
    if _has_body(found) and found.get(b"expect", b"").lower() != b"100-continue":
        await drain(receive)
    await send_json(send, status, detail, close=True, headers=headers)


# ------------------------------------------------------------------------------- admission


@dataclass
class Lane:
    """Requests admitted to one kind of work: at most ``capacity`` at once, holding at most
    ``budget`` bytes of bodies. Only the event loop's thread touches it: no lock."""

    capacity: int
    budget: int
    refusal: str = BUSY
    inside: int = 0
    held: int = 0

    def admit(self, nbytes: int) -> str | None:
        """Book a place and ``nbytes``: None, or why not."""
        if self.inside >= self.capacity:
            return self.refusal
        if self.held + nbytes > self.budget:
            return f"{BUSY}: {self.budget / 1e6:g} MB of uploads in memory (--max-buffered-mb)"
        self.inside, self.held = self.inside + 1, self.held + nbytes
        return None

    def release(self, nbytes: int) -> None:
        self.inside, self.held = self.inside - 1, self.held - nbytes


@dataclass(frozen=True)
class Route:
    """What :class:`Admission` applies to a path: its lane, body limit and 413 message."""

    lane: Lane
    limit: int
    too_large: str


class Admission:
    """Step 1 of the upload admission (see the module's docstring). ``routes(path)``: the
    path's :class:`Route`, or None for a path without an upload."""

    def __init__(self, app: Any, routes: Callable[[str], Route | None]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        route = self.routes(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > route.limit:
            return await refuse(scope, receive, send, 413, route.too_large)
        booked = int(length) if length is not None and length.isdigit() else route.limit
        why = route.lane.admit(booked)
        if why is not None:
            retry = [(b"retry-after", b"5" if "clips" in why else b"1")]
            return await refuse(scope, receive, send, 503, why, retry)
        try:
            await self.app(scope, _counted(receive, route), send)
        finally:
            route.lane.release(booked)


def _counted(receive: Callable, route: Route) -> Callable:
    """``receive``, refusing (413) a body past the route's limit as it streams in."""
    received, over = 0, False

    async def limited() -> dict:
        nonlocal received, over
        if over:  # the route asks for more after its 413: there is no more
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > route.limit:
                over = True
                if message.get("more_body", False):
                    await drain(receive, received)
                # raised inside the route's body parsing, which lets an HTTPException
                # through as it is (any other becomes a 400)
                raise HTTPException(413, route.too_large)
        return message

    return limited


# ----------------------------------------------------------------------- hosts and origins


def _host_name(value: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def origin_of(url: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of a web origin, the port made explicit; None if unreadable."""
    try:
        parts = urlsplit(url.strip().lower())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return (parts.scheme, parts.hostname or "", port) if parts.scheme and parts.hostname else None


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> set[str] | None:
    """The Host names a service bound to ``bind`` answers: its loopback names for a loopback
    bind, ``extra`` besides; None (any) for a service bound to every interface with none
    given (reached by whatever name the network gives it: the API key guards it then)."""
    names = {_host_name(h) for h in extra}
    if bind in ("0.0.0.0", "::", ""):
        return names or None
    names |= {_host_name(bind)}
    try:
        loopback = ipaddress.ip_address(_host_name(bind)).is_loopback
    except ValueError:
        loopback = bind == "localhost"
    if loopback:
        names |= {"localhost", "127.0.0.1", "::1"}
    return names


def bearer(headers: dict[bytes, bytes]) -> bytes:
    """The key a request gives, as bytes: ``X-API-Key``, or ``Authorization: Bearer KEY``
    (the scheme in any case, as RFC 9110 has it)."""
    if b"x-api-key" in headers:
        return headers[b"x-api-key"].strip()
    scheme, _, key = headers.get(b"authorization", b"").strip().partition(b" ")
    return key.strip() if scheme.lower() == b"bearer" else b""


class Guard:
    """Host names, origins, the API key and security headers; see the module's docstring.

    ``hosts``: the Host names answered (None: any). ``origins``: web origins besides the
    service's own allowed to post (``https://app.example``). ``api_key``: required on
    ``/api/`` requests, as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, compared as
    UTF-8 bytes in constant time.
    """

    def __init__(
        self,
        app: Any,
        hosts: set[str] | None,
        origins: Iterable[str] = (),
        api_key: str | None = None,
    ) -> None:
        self.app, self.hosts = app, hosts
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.origins = {origin_of(o) for o in origins} - {None}

    def _refusal(self, scope: dict) -> tuple[int, str] | None:
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        raw_host = headers.get(b"host", b"").decode("latin-1")
        host = _host_name(raw_host)
        if self.hosts is not None and host not in self.hosts:
            known = ", ".join(sorted(self.hosts))
            return 400, f"unknown host {host!r}: this service answers {known} (--allow-host)"
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            theirs = origin_of(origin)
            own = theirs is not None and theirs == origin_of(f"{scope['scheme']}://{raw_host}")
            if not own and theirs not in self.origins:
                return 403, f"cross-origin request from {origin} refused (see --allow-origin)"
        api = self.api_key is not None and scope["path"].startswith("/api/")
        if api and not hmac.compare_digest(bearer(headers), self.api_key):
            return 401, "an API key is needed: Authorization: Bearer KEY, or X-API-Key"
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            return await refuse(scope, receive, with_headers, *refusal)
        await self.app(scope, receive, with_headers)


# ------------------------------------------------------------------------------ deadlines


def _raw_503(detail: str) -> bytes:
    """A whole HTTP answer in bytes, for a connection refused before it sent anything."""
    body = json.dumps({"detail": detail}).encode()
    headers = json_headers(body, True, [(b"retry-after", b"1"), *SECURITY_HEADERS])
    head = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return b"HTTP/1.1 503 Service Unavailable\r\n" + head + b"\r\n" + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with :class:`ServiceLimits`' ``header_timeout_s``,
    ``body_timeout_s`` / ``min_body_kbps`` and ``max_connections``. Build it for a service
    with :func:`protocol_for`."""

    limits = ServiceLimits()
    refusals = RateLimitedLog()  # one per service: protocol_for makes its own

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: Any = None
        self._since, self._body_start, self._body_bytes = self.loop.time(), None, 0
        if len(self.connections) > self.limits.max_connections and not self._evict_one():
            self.refusals.warning(
                f"refused a connection: {self.limits.max_connections} open (--max-connections)"
            )
            limit = f"{self.limits.max_connections} connections (--max-connections)"
            transport.write(_raw_503(f"{BUSY}: the limit is {limit}"))
            transport.close()
            return
        self._arm(self.limits.header_timeout_s)

    def _evict_one(self) -> bool:
        """Make room by closing the connection that holds a slot while sending least: still
        sending its headers, or its body slower than ``min_body_kbps``, for over a second (a
        slow client, or one trickling bytes on purpose). Otherwise the new connection is
        refused: the busy ones are doing work."""
        now, rate = self.loop.time(), self.limits.min_body_kbps * 1e3
        worst, worst_rate = None, rate
        for other in self.connections:
            if other is self or not isinstance(other, GuardedH11) or other.transport.is_closing():
                continue
            state = other.conn.their_state
            if state is h11.IDLE and now - other._since > 1.0:
                seen = 0.0  # no request yet: nothing sent at all
            elif state is h11.SEND_BODY and other._body_start is not None:
                spent = now - other._body_start
                seen = other._body_bytes / spent if spent > 1.0 else rate
            else:
                continue
            if seen < worst_rate:
                worst, worst_rate = other, seen
        if worst is None:
            return False
        self.refusals.warning("closed the slowest connection to make room for a new one")
        worst._arm(None)
        worst.transport.close()
        return True

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state, now = self.conn.their_state, self.loop.time()
        if state is h11.SEND_BODY:
            if self._body_start is None:  # the headers are in: the body's clock starts
                self._body_start, self._body_bytes = now, 0
                self._arm(self.limits.body_timeout_s)
            self._body_bytes += len(data)
        elif state is h11.IDLE:
            self._body_start = None
            if self._timer is None:  # a new request on a kept-alive connection
                self._since = now
                self._arm(self.limits.header_timeout_s)
        else:  # the request is in
            self._body_start = None
            self._arm(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def _arm(self, delay: float | None) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
        self._timer = None if delay is None else self.loop.call_later(delay, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        state, now = self.conn.their_state, self.loop.time()
        if state is h11.IDLE:
            due = self._since + self.limits.header_timeout_s
            what = "headers"
        elif state is h11.SEND_BODY and self._body_start is not None:
            if self.flow.read_paused:  # the service stopped reading, not the client sending
                return self._arm(1.0)
            rate = self.limits.min_body_kbps * 1e3
            due = self._body_start + self.limits.body_timeout_s + self._body_bytes / rate
            what = "body"
        else:
            return
        if now < due:
            return self._arm(due - now)
        self.refusals.warning(f"closed a connection too slow to send its request's {what}")
        self.transport.close()


def protocol_for(limits: ServiceLimits) -> type[GuardedH11]:
    """:class:`GuardedH11` with ``limits``: what uvicorn's ``http`` setting takes."""
    return type("GuardedH11", (GuardedH11,), {"limits": limits, "refusals": RateLimitedLog()})
