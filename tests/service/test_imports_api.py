"""``POST /v1/activations/imports``: an uploaded safetensors file of activations becomes a run, or a
422 that names the tensor and what is wrong with it (real Redis, in-process app, no worker needed)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save
from service_stack import assert_error

from kestrel.core.models import DEFAULT_MODEL

N_ROWS, D = 64, 8


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({name: t.contiguous() for name, t in tensors.items()})


def upload(http, tensors: dict[str, torch.Tensor], filename: str = "acts.safetensors") -> str:
    response = http.post("/v1/uploads", files={"file": (filename, safetensors_bytes(tensors))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def http(make_client):
    return make_client()


def test_an_upload_becomes_a_run(http) -> None:
    acts = torch.randn(N_ROWS, D)
    upload_id = upload(http, {"resid": acts, "doc_index": torch.arange(N_ROWS) // 8})
    response = http.post(
        "/v1/activations/imports",
        json={"upload_id": upload_id, "tensors": {"resid": "model.layers.2"}, "model": DEFAULT_MODEL},
    )
    assert response.status_code == 201, response.text
    run = response.json()
    assert list(run["layers"]) == ["model.layers.2"] and run["layers"]["model.layers.2"]["d"] == D
    assert run["n_tokens"] == N_ROWS and run["n_docs"] == 8 and run["dtype"] == "fp32"
    assert run["model"]["name"] == DEFAULT_MODEL and run["model"]["loadable"] is True
    assert run["model"]["source"] == "bundled"
    assert run["dataset"] == {"kind": "upload", "upload_id": upload_id, "filename": "acts.safetensors"}
    assert run["import"]["synthetic_row_fields"] == ["token_id", "position"]
    assert http.get(f"/v1/activations/{run['id']}").json() == run
    assert run["id"] in [r["id"] for r in http.get("/v1/activations").json()["items"]]


def test_an_unknown_model_is_recorded_but_not_loadable(http) -> None:
    upload_id = upload(http, {"a": torch.randn(N_ROWS, D).half()})
    run = http.post("/v1/activations/imports", json={"upload_id": upload_id, "model": "my-own-model"}).json()
    assert run["model"] == {"name": "my-own-model", "source": "external", "loadable": False, "d_model": D}
    assert run["dtype"] == "fp16" and list(run["layers"]) == ["a"]


@pytest.mark.parametrize(
    ("tensors", "body", "message"),
    [
        ({"a": torch.zeros(4, 3, 2)}, {"tensors": {"a": "a"}}, r"tensor 'a' has shape [4, 3, 2]"),
        ({"a": torch.zeros(4, 3, dtype=torch.int32)}, {"tensors": {"a": "a"}}, "tensor 'a' is I32"),
        ({"a": torch.zeros(4, 3), "b": torch.zeros(6, 3)}, {}, "tensor 'b' has 6 rows but tensor 'a' has 4"),
        ({"a": torch.tensor([[1.0], [float("inf")]])}, {}, "tensor 'a' has non-finite values"),
        ({"a": torch.zeros(4, 3), "position": torch.zeros(4)}, {}, "(tensor 'position') is F32"),
        ({"a": torch.zeros(4, 3), "token_id": torch.zeros(5, dtype=torch.int64)}, {}, "has shape [5]"),
        ({"a": torch.zeros(4, 3)}, {"tensors": {"b": "b"}}, "tensor 'b' is not in the file"),
        (
            {"a": torch.zeros(4, 3)},
            {"row_fields": {"position": "pos"}},
            "row field 'position': tensor 'pos' is not in the file",
        ),
    ],
)
def test_bad_files_are_422s_naming_the_tensor(http, tensors, body, message) -> None:
    upload_id = upload(http, tensors)
    error = assert_error(
        http.post("/v1/activations/imports", json={"upload_id": upload_id, **body}), 422, "invalid_input"
    )
    assert message in error["message"], error
    assert http.get("/v1/activations").json()["total"] == 0, "nothing is published"


def test_wrong_uploads_and_requests(http) -> None:
    dataset = http.post("/v1/uploads", files={"file": ("texts.txt", b"one\ntwo\n")}).json()["id"]
    error = assert_error(http.post("/v1/activations/imports", json={"upload_id": dataset}), 422)
    assert "not safetensors" in error["message"]
    assert_error(http.post("/v1/activations/imports", json={"upload_id": "upload-nope"}), 404, "not_found")
    assert_error(http.post("/v1/activations/imports", json={"upload_id": "Bad/Id"}), 422, "invalid_input")
    upload_id = upload(http, {"a": torch.zeros(4, 3)})
    error = assert_error(
        http.post("/v1/activations/imports", json={"upload_id": upload_id, "shards": 3}), 422, "invalid_input"
    )
    assert "shards" in error["message"], "unknown fields are rejected, not ignored"
