"""The API's JSON response: compact JSON with a trailing newline.

A response that ends with ``\\n`` prints cleanly from ``curl`` (the shell prompt starts on its own
line) and is one line of JSON Lines when responses are appended to a file. It is the app's
``default_response_class`` and the error handlers' class, so success and error bodies agree;
``Content-Length`` is computed by Starlette from the rendered bytes, newline included.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class JSONLineResponse(JSONResponse):
    """``JSONResponse`` whose body ends with a newline."""

    def render(self, content: Any) -> bytes:
        return super().render(content) + b"\n"
