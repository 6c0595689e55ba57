"""Every JSON body the API sends ends with a newline.

A body that ends with ``\\n`` prints cleanly from ``curl`` (the shell prompt starts on its own
line) and is one line of JSON Lines when answers are appended to a file.

Two parts do it. `JSONLineResponse` is the error handlers' class (their bodies are rendered here,
including the 500 answered outside every middleware). `JSONNewlineMiddleware` covers the rest:
route answers, which FastAPI serialises straight to bytes with pydantic (its fast path, which also
writes a non-finite float as null, so it is kept rather than replaced by a custom response class),
and ``/openapi.json``. It holds back a JSON response's start until its body arrives; a body sent
in one piece gets the newline, unless it has one, and a ``Content-Length`` that counts it. A body
streamed in pieces passes through untouched.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class JSONLineResponse(JSONResponse):
    """``JSONResponse`` whose body ends with a newline."""

    def render(self, content: Any) -> bytes:
        return super().render(content) + b"\n"


class JSONNewlineMiddleware:
    """Append ``\\n`` to every one-piece ``application/json`` body (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "HEAD":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def send_with_newline(message: Message) -> None:
            if message["type"] == "http.response.start":
                content_type = MutableHeaders(raw=message["headers"]).get("content-type", "")
                if content_type.startswith("application/json"):
                    held.append(message)  # sent with the body, once its length is known
                    return
            elif message["type"] == "http.response.body" and held:
                start = held.pop()
                body = message.get("body", b"")
                if not message.get("more_body", False) and body and not body.endswith(b"\n"):
                    body += b"\n"
                    headers = MutableHeaders(raw=start["headers"])
                    if "content-length" in headers:
                        headers["content-length"] = str(len(body))
                    message = {**message, "body": body}
                await send(start)
            await send(message)

        await self.app(scope, receive, send_with_newline)
