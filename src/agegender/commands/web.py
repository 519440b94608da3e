"""The HTTP plumbing of ``agegender serve``: ASGI middleware and uvicorn's protocol, kept apart
from the routes.

- :class:`BodyLimit` answers 413 for a body over its limit, and first reads the rest of it (up
  to a bound), so that every client reads the answer: one that sends its whole body before
  reading (Python's urllib, requests, a browser's fetch) would otherwise meet a reset
  connection. A client that asked ``Expect: 100-continue`` is answered before it sends.
- :class:`Guard` answers only the host names the service is bound to (and those allowed), so
  that a web page cannot reach a loopback service through DNS rebinding; refuses cross-origin
  posts; asks for the API key where one is set; and puts security headers on every answer.
- :class:`HeaderDeadline` closes a connection that has not sent a request's headers within
  ``HEADER_TIMEOUT_S`` (slowloris: connections held open by headers sent a byte at a time).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import h11
from fastapi import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

#: bytes of an over-limit body read (and dropped) before answering 413; beyond, the
#: connection is closed, and a client still sending meets a reset
DRAIN_MAX = 64 * 2**20
HEADER_TIMEOUT_S = 10.0
#: the page is self-contained: its own inline script and style, images made in the browser,
#: the webcam's stream, requests to this service only, never framed by another site
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
        b"'unsafe-inline'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


async def send_json(send: Callable, status: int, detail: str, close: bool = True) -> None:
    """A ``{"detail": ...}`` answer, straight from the middleware."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _drain(receive: Callable, received: int) -> None:
    """Read and drop the rest of a request body, ``DRAIN_MAX`` bytes at most."""
    while received < DRAIN_MAX:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimit:
    """Refuse request bodies over a size limit with 413 while they stream in, before they are
    parsed or spooled to disk (uvicorn itself has no limit). ``limit(path)`` is ``(bytes,
    message)``, or None for no limit."""

    def __init__(self, app: Any, limit: Callable[[str], tuple[int, str] | None]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        found = self.limit(scope["path"]) if scope["type"] == "http" else None
        if found is None:
            return await self.app(scope, receive, send)
        limit, too_large = found
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            # with Expect: 100-continue nothing was sent yet (reading would ask for it)
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await _drain(receive, 0)
            return await send_json(send, 413, too_large)
        received, over = 0, False

        async def limited() -> dict:
            nonlocal received, over
            if over:  # the route asks for more after its 413: there is no more
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    if message.get("more_body", False):
                        await _drain(receive, received)
                    # raised inside the route's body parsing, which lets an HTTPException
                    # through as it is (any other becomes a 400)
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)


def _host_name(value: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


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


class Guard:
    """Host names, origins, the API key and security headers; see the module's docstring.

    ``hosts``: the Host names answered (None: any). ``origins``: web origins besides the
    service's own allowed to post (``https://app.example``). ``api_key``: required on
    ``/api/`` requests, as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
    """

    def __init__(
        self,
        app: Any,
        hosts: set[str] | None,
        origins: Iterable[str] = (),
        api_key: str | None = None,
    ) -> None:
        self.app, self.hosts, self.api_key = app, hosts, api_key
        self.origins = {o.rstrip("/").lower() for o in origins}

    def _refusal(self, scope: dict) -> tuple[int, str] | None:
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = _host_name(headers.get(b"host", ""))
        if self.hosts is not None and host not in self.hosts:
            return (
                400,
                f"unknown host {host!r}: this service answers {', '.join(sorted(self.hosts))}",
            )
        origin = headers.get(b"origin")
        if origin and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            own = (urlsplit(origin).hostname or "").lower() == host
            if not own and origin.rstrip("/").lower() not in self.origins:
                return 403, f"cross-origin request from {origin} refused (see --allow-origin)"
        if self.api_key and scope["path"].startswith("/api/"):
            given = headers.get(b"x-api-key") or headers.get(b"authorization", "")
            given = given.removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
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
            return await send_json(with_headers, *refusal, close=False)
        await self.app(scope, receive, with_headers)


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, with ``HEADER_TIMEOUT_S`` for the headers of each request: a
    connection that has not sent them in time is closed."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._too_slow)
        super().data_received(data)
        if self._deadline is not None and self.conn.their_state is not h11.IDLE:
            self._deadline.cancel()  # the headers are in
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
