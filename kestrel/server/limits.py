"""Request body limits, enforced while the body streams in, answered in the one error shape.

A declared ``Content-Length`` over the limit is refused before a byte is read; a body without one
(chunked) is counted as it arrives and refused as soon as it passes the limit. File routes
(uploads, SAELens import) have the upload limit, every other route the request limit, so a JSON
body of texts can never grow to the size of a dataset upload.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kestrel.server.errors import ApiError, error_json

FILE_ROUTES = ("/v1/uploads", "/v1/saes/import")


def _too_large(limit_name: str, max_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"request body too large: over the limit {limit_name} ({max_bytes} bytes)",
        code="limit_exceeded",
        details={"limit": limit_name, "max_bytes": max_bytes},
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, default_limit: int, file_limit: int) -> None:
        self.app = app
        self.default_limit = default_limit
        self.file_limit = file_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        takes_files = scope["path"].startswith(FILE_ROUTES)
        limit, name = (
            (self.file_limit, "max_upload_mb") if takes_files else (self.default_limit, "max_request_mb")
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            error = _too_large(name, limit)
            response = error_json(error.status, error.code, error.message, error.details)
            await response(scope, receive, send)
            return
        await self._counted(scope, receive, send, limit, name)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int, name: str) -> None:
        """Pass the body through, counting; past the limit answer 413 and end the request.

        The 413 is sent from here (the app sees a disconnect and whatever it answers is dropped):
        an exception raised from ``receive`` would reach the app as a malformed body, a 400.
        """
        received, refused = 0, False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    error = _too_large(name, limit)
                    await error_json(error.status, error.code, error.message, error.details)(
                        scope, receive, send
                    )
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise
