"""The exported OpenAPI document: committed, current, stable, and usable to generate an SDK."""

from __future__ import annotations

import json
import re

import pytest

from kestrel.server import openapi

VERBS = {"list", "get", "start", "create", "delete", "cancel", "load", "unload", "import", "download"}
VERBS |= {"encode", "stream", "update", "preview", "generate", "sweep", "measure", "compare", "intervene"}


@pytest.fixture(scope="module")
def spec() -> dict:
    return openapi.build_spec()


def test_committed_spec_matches_the_app(spec: dict) -> None:
    assert openapi.SPEC_PATH.is_file(), "openapi/openapi.json is missing: run `make openapi`"
    committed = openapi.SPEC_PATH.read_text(encoding="utf-8")
    assert committed == openapi.render(spec), (
        "openapi/openapi.json is out of date with the app: run `make openapi` and commit the result"
    )


def test_export_ignores_the_environment(monkeypatch: pytest.MonkeyPatch, spec: dict) -> None:
    monkeypatch.setenv("KESTREL_API_KEY", "secret")
    monkeypatch.setenv("KESTREL_MAX_TOP_K", "3")
    monkeypatch.setenv("KESTREL_CORS_ORIGINS", "http://example.org")
    assert openapi.render(openapi.build_spec()) == openapi.render(spec)


def test_operation_ids_read_as_verbs(spec: dict) -> None:
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), sorted(ids)
    for op_id in ids:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", op_id), op_id
        assert op_id.split("_")[0] in VERBS, f"{op_id} does not start with a verb"
    ops = {(method, path): op["operationId"] for path, o in spec["paths"].items() for method, op in o.items()}
    assert ops[("get", "/v1/activations")] == "list_runs"
    assert ops[("post", "/v1/activations")] == "start_capture"
    assert ops[("get", "/v1/jobs/{job_id}")] == "get_job"


def test_every_error_response_has_the_error_shape(spec: dict) -> None:
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "200" in op["responses"] or "201" in op["responses"] or "202" in op["responses"]
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_cli_writes_the_same_document(tmp_path) -> None:
    from typer.testing import CliRunner

    from kestrel.cli import app

    target = tmp_path / "openapi.json"
    result = CliRunner().invoke(app, ["openapi", "--output", str(target)])
    assert result.exit_code == 0, result.output
    assert json.loads(target.read_text()) == json.loads(openapi.SPEC_PATH.read_text())
