"""The event-stream token the dashboard uses instead of a header (runs without a browser)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from kestrel.server.app import create_app
from kestrel.server.deps import sign_stream_token, stream_token_valid
from kestrel.settings import Settings

PATH = "/v1/jobs/job-1/events"


def test_a_token_opens_its_own_path_until_it_expires() -> None:
    token = sign_stream_token("key", PATH, expires=1_000)
    assert stream_token_valid("key", PATH, token, now=999)
    assert stream_token_valid("key", PATH, token, now=1_000)
    assert not stream_token_valid("key", PATH, token, now=1_001)


def test_a_token_is_bound_to_the_path_and_the_key() -> None:
    token = sign_stream_token("key", PATH, expires=1_000)
    assert not stream_token_valid("key", "/v1/jobs/job-2/events", token, now=0)
    assert not stream_token_valid("other key", PATH, token, now=0)


def test_a_tampered_or_malformed_token_is_refused() -> None:
    token = sign_stream_token("key", PATH, expires=1_000)
    longer = sign_stream_token("key", PATH, expires=1_000).replace("1000.", "9999.")
    assert not stream_token_valid("key", PATH, longer, now=0)
    odd_digits = ("\u00b2.00", "\u0661\u0660\u0660\u0660." + token.partition(".")[2], "9" * 5_000 + ".00")
    for bad in ("", ".", "abc.def", "-5.00", token[:-1], f"{token}x", "1000", *odd_digits):
        assert not stream_token_valid("key", PATH, bad, now=0), bad


def test_a_malformed_token_is_a_401_not_a_500(tmp_path) -> None:
    settings = Settings(store_root=tmp_path / "store", redis_url="redis://127.0.0.1:1/0", api_key="key")
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    for bad in ("\u00b2.00", "9" * 5_000 + ".00"):
        answer = client.get(PATH, params={"token": bad})
        assert answer.status_code == 401, (bad[:8], answer.text)
