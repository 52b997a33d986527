"""What stands between the network and the API: the API key, the request-size limit, the body's deadline,
and the send deadline of a stream whose client stopped reading.

A pure ASGI middleware (no BaseHTTPMiddleware: it buffers streaming responses). Request bodies are read
here, whole, before any parsing: one larger than max_body_bytes ends in 413 without being held, one that
trickles in slower than body_timeout_s (a stalled or slowloris client) in 408.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time

from starlette.responses import StreamingResponse


def error_body(status: int, message: str, type_: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


async def respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


DISCARD_FACTOR = 4  # a refused body up to this many times the limit is read off the socket before the 413


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout_s: float, open_paths=("/health",)):
        self.app = app
        self.key = f"Bearer {api_key}".encode() if api_key is not None else None
        self.max_body, self.body_timeout = max_body_bytes, body_timeout_s
        self.open_paths = set(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is not None and scope["path"] not in self.open_paths and not self._authorized(scope):
            return await respond(send, 401, error_body(401, "missing or invalid API key", "authentication_error",
                                                       "invalid_api_key"), [(b"www-authenticate", b"Bearer")])
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._discard(receive, 0)
            return await self._too_large(send)
        body, status = await self._read(receive)
        if status == 413:
            await self._discard(receive, self.max_body)
            return await self._too_large(send)
        if status == 408:
            return await respond(send, 408, error_body(408, f"the request body did not arrive within "
                                                            f"{self.body_timeout:g} s", "invalid_request_error"),
                                 [(b"connection", b"close")])
        if body is None:  # the client went away
            return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect a streaming response listens for

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        # raw header bytes, compared in constant time: any bytes a client sends get 401, never an error
        got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(got, self.key)

    async def _read(self, receive) -> tuple[bytes | None, int]:
        deadline = time.monotonic() + self.body_timeout
        parts, size = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return None, 408
            if msg["type"] == "http.disconnect":
                return None, 0
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None, 413
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts), 200

    async def _discard(self, receive, seen: int) -> None:
        """Read and drop the rest of a refused body (at most DISCARD_FACTOR times the limit, within the body
        deadline) before answering: closing a connection with unread bytes in its buffer makes the kernel reset
        it, and the client loses the 413 it was being sent."""
        deadline = time.monotonic() + self.body_timeout
        while seen <= DISCARD_FACTOR * self.max_body:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return
            if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
                return
            seen += len(msg.get("body", b""))

    async def _too_large(self, send) -> None:
        await respond(send, 413, error_body(413, f"request body larger than the server's limit of {self.max_body} "
                                                 "bytes (maverick-serve --max-request-bytes)", "invalid_request_error"),
                      [(b"connection", b"close")])


class TimedStreamingResponse(StreamingResponse):
    """A stream whose client stops reading for send_timeout_s is ended (its generator closed: the request
    is aborted and its KV blocks freed) instead of holding the request forever."""

    def __init__(self, content, send_timeout_s: float, **kw):
        super().__init__(content, **kw)
        self.send_timeout = send_timeout_s

    async def stream_response(self, send) -> None:
        async def timed(message):
            await asyncio.wait_for(send(message), self.send_timeout)

        try:
            await super().stream_response(timed)
        except TimeoutError:
            await self.body_iterator.aclose()
