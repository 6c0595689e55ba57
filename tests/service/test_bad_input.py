"""Bad input and limits over HTTP: every malformed or oversized request is a 4xx in the one error
shape that says what is wrong, and writes nothing (no upload, run, SAE or dictionary change, no job).

Most tests use in-process apps on a real Redis (``make_client``); the API key check before any body
is read runs against a real ``kestrel serve`` over a socket, and a device the worker lacks against
the shared stack's real interactive worker.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from service_stack import assert_error

from kestrel.core.models import DEFAULT_MODEL

D_IN, N_LATENTS = 8, 32
DEEP = b"[" * 20_000 + b"]" * 20_000
HUGE_INT = b"1" * 5000


@pytest.fixture
def http(make_client):
    return make_client()


def tree(http, kind: str) -> list[str]:
    """Every path under the store's ``kind`` directory, hidden staging directories included."""
    root = Path(http.app.state.settings.store_root) / kind
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def assert_nothing_queued(http) -> None:
    assert http.get("/v1/jobs").json()["total"] == 0


# ---------------------------------------------------------------------------------------------
# SAELens files


def saelens_files(n_latents: int = N_LATENTS, **cfg_updates: object) -> tuple[bytes, bytes]:
    """cfg.json and sae_weights.safetensors of a small TopK SAE as SAELens writes them (no model)."""
    generator = torch.Generator().manual_seed(0)
    w_dec = torch.randn(n_latents, D_IN, generator=generator)
    weights = {
        "W_enc": w_dec.t().contiguous(),
        "b_enc": torch.zeros(n_latents),
        "W_dec": w_dec,
        "b_dec": torch.zeros(D_IN),
    }
    cfg = {
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": n_latents,
        "k": 4,
        "dtype": "float32",
        **cfg_updates,
    }
    return json.dumps(cfg).encode(), save_safetensors(weights)


def raw_safetensors(header_bytes: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def import_sae(http, cfg: bytes, weights: bytes, **form: str):
    return http.post(
        "/v1/saes/import",
        files={"cfg": ("cfg.json", cfg), "weights": ("sae_weights.safetensors", weights)},
        data=form,
    )


def nan_weights() -> tuple[bytes, bytes]:
    cfg, weights = saelens_files()
    tensors = load_safetensors(weights)
    tensors["W_enc"][2, 5] = float("nan")
    return cfg, save_safetensors(tensors)


STRING_OFFSETS = raw_safetensors(
    b'{"W_enc": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}', b"\0" * 8
)
HUGE_SHAPE = raw_safetensors(
    b'{"W_enc": {"dtype": "F32", "shape": [' + HUGE_INT + b'], "data_offsets": [0, 8]}}', b"\0" * 8
)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (lambda: saelens_files(d_sae=300_000), "cfg.json says d_sae=300000 but the weights have 32"),
        (nan_weights, "W_enc has non-finite values"),
        (lambda: (saelens_files()[0], STRING_OFFSETS), "tensor 'W_enc' has invalid data_offsets"),
        (lambda: (saelens_files()[0], HUGE_SHAPE), "value out of range"),
        (lambda: (saelens_files()[0], raw_safetensors(DEEP)), "nested too deeply"),
        (lambda: (DEEP, saelens_files()[1]), "cfg.json is nested too deeply"),
        (lambda: (b'{"d_in": ' + HUGE_INT + b"}", saelens_files()[1]), "cfg.json holds a value out of range"),
        (lambda: (b"[8, 32]", saelens_files()[1]), "cfg.json must hold a JSON object"),
    ],
    ids=[
        "claimed-size",
        "nan",
        "string-offsets",
        "huge-shape",
        "deep-header",
        "deep-cfg",
        "huge-int",
        "array",
    ],
)
def test_bad_saelens_imports_are_422s_and_publish_nothing(http, files, message: str) -> None:
    cfg, weights = files()
    error = assert_error(import_sae(http, cfg, weights), 422, "invalid_input")
    assert message in error["message"], error
    assert http.get("/v1/saes").json()["total"] == 0 and tree(http, "saes") == []


@pytest.mark.parametrize(
    ("cap", "value", "limit"),
    [
        ("max_n_latents", N_LATENTS - 1, "max_n_latents"),
        ("max_sae_params", D_IN * N_LATENTS - 1, "max_sae_params"),
    ],
)
def test_saelens_imports_over_a_cap_are_refused_naming_it(
    make_client, cap: str, value: int, limit: str
) -> None:
    http = make_client(**{cap: value})
    error = assert_error(import_sae(http, *saelens_files()), 422, "limit_exceeded")
    assert error["details"]["limit"] == limit and f"the limit {limit}={value}" in error["message"]
    assert tree(http, "saes") == []
    assert import_sae(make_client(), *saelens_files()).status_code == 201  # within the default caps


def test_encode_of_an_imported_sae_without_a_model_is_a_422(http) -> None:
    imported = import_sae(http, *saelens_files())
    assert imported.status_code == 201, imported.text
    sae_id = imported.json()["id"]
    error = assert_error(http.post(f"/v1/saes/{sae_id}/encode", json={"text": "hello"}), 422, "invalid_input")
    assert "does not record the model and layer it reads" in error["message"]
    assert error["details"] == {"sae_id": sae_id, "missing": ["model", "layer"]}
    assert_nothing_queued(http)


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, payload in files.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def import_zip(http, data: bytes, **form: str):
    return http.post("/v1/saes/import", files={"archive": ("sae.zip", data, "application/zip")}, data=form)


def test_a_zip_imports_and_downloads_import_back_in_every_layout(http) -> None:
    cfg, weights = saelens_files()
    imported = import_zip(http, zipped({"my-sae/cfg.json": cfg, "my-sae/sae_weights.safetensors": weights}))
    assert imported.status_code == 201, imported.text
    first = imported.json()
    assert first["imported_from"] == "saelens" and first["config"]["k"] == 4
    assert first["config"]["l1_coefficient"] is None and first["config"]["normalize_input"] is None
    for fmt in ("kestrel", "saelens", "sparsify"):
        download = http.get(f"/v1/saes/{first['id']}/download", params={"format": fmt})
        assert download.status_code == 200, download.text
        again = import_zip(http, download.content)
        assert again.status_code == 201, (fmt, again.text)
        assert again.json()["imported_from"] == fmt and again.json()["config"]["n_latents"] == N_LATENTS
    assert http.get("/v1/saes").json()["total"] == 4


def test_expected_average_only_in_imports_with_its_scaling_factor(http) -> None:
    cfg, weights = saelens_files(normalize_activations="expected_average_only_in")
    error = assert_error(import_sae(http, cfg, weights), 422, "invalid_input")
    assert (
        "give its norm_scaling_factor" in error["message"]
        and error["details"]["missing"] == "norm_scaling_factor"
    )
    for bad in ("0", "-1", "nan", "inf"):
        assert_error(import_sae(http, cfg, weights, norm_scaling_factor=bad), 422)
    assert tree(http, "saes") == []
    imported = import_sae(http, cfg, weights, norm_scaling_factor="0.5")
    assert imported.status_code == 201, imported.text
    assert (
        imported.json()["config"]["input_scale"] == 0.5
        and imported.json()["config"]["normalize_input"] is True
    )
    scaler = json.dumps({"scaling_factor": 0.5, "has_whitening": False}).encode()
    from_zip = import_zip(
        http, zipped({"cfg.json": cfg, "sae_weights.safetensors": weights, "activation_scaler.json": scaler})
    )
    assert from_zip.status_code == 201 and from_zip.json()["config"]["input_scale"] == 0.5


@pytest.mark.parametrize(
    ("send", "message"),
    [
        (lambda http: import_zip(http, b"not a zip"), "not a zip file"),
        (lambda http: import_zip(http, zipped({"cfg.json": b"{}"})), "cannot tell the SAE's layout"),
        (
            lambda http: import_zip(http, zipped({"a/cfg.json": b"{}", "b/sae_weights.safetensors": b""})),
            "all in one folder",
        ),
        (
            lambda http: http.post(
                "/v1/saes/import",
                files={"archive": ("sae.zip", zipped({}), "application/zip"), "cfg": ("cfg.json", b"{}")},
            ),
            "not both",
        ),
        (lambda http: http.post("/v1/saes/import", data={"model": DEFAULT_MODEL}), "as a zip (archive) or"),
        (
            lambda http: import_sae(
                http, *saelens_files(rescale_acts_by_decoder_norm=True, architecture="standard")
            ),
            "rescale_acts_by_decoder_norm is set on a 'standard' SAE",
        ),
    ],
    ids=["not-zip", "no-layout", "two-folders", "zip-and-files", "nothing", "rescale-standard"],
)
def test_bad_sae_imports_say_what_is_wrong_and_store_nothing(http, send, message: str) -> None:
    error = assert_error(send(http), 422)
    assert message in error["message"], error
    assert tree(http, "saes") == [] and http.get("/v1/saes").json()["total"] == 0


def test_a_zip_bomb_costs_no_more_than_the_upload_limit(make_client) -> None:
    http = make_client(max_upload_mb=1)
    bomb = zipped({"cfg.json": b"{}", "sae_weights.safetensors": bytes(8 << 20)})
    assert len(bomb) < 64 << 10
    error = assert_error(import_zip(http, bomb), 422, "invalid_input")
    assert "exceed 1,048,576 bytes uncompressed" in error["message"]
    assert tree(http, "saes") == []


# ---------------------------------------------------------------------------------------------
# Uploads and request bodies


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (STRING_OFFSETS, "invalid data_offsets"),
        (HUGE_SHAPE, "value out of range"),
        (raw_safetensors(DEEP), "nested too deeply"),
        (
            raw_safetensors(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 4),
            "outside",
        ),
    ],
)
def test_bad_safetensors_uploads_are_422s_and_store_nothing(http, content: bytes, message: str) -> None:
    error = assert_error(http.post("/v1/uploads", files={"file": ("a.safetensors", content)}), 422)
    assert message in error["message"], error
    assert http.get("/v1/uploads").json()["total"] == 0 and tree(http, "uploads") == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"layers": ["model.layers.3"], "dataset": ' + DEEP + b"}",
        b'{"layers": ["model.layers.3"], "dataset": {"kind": "texts", "texts": ["a"]}, '
        + b'"options": {"max_length": '
        + HUGE_INT
        + b"}}",
    ],
    ids=["deep", "huge-int"],
)
def test_unparseable_json_bodies_are_400s(http, body: bytes) -> None:
    response = http.post("/v1/activations", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 400, "bad_request")
    assert_nothing_queued(http)


def test_a_long_int_within_python_limits_is_named_not_echoed(http) -> None:
    body = {"layers": ["model.layers.3"], "dataset": {"kind": "texts", "texts": ["a"]}, "options": {}}
    body["options"]["max_length"] = 10**3999
    response = http.post(
        "/v1/activations", content=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    error = assert_error(response, 422, "limit_exceeded")
    assert "a 4000-digit number exceeds the limit max_tokens_per_text" in error["message"]
    assert len(response.content) < 2000
    assert_nothing_queued(http)


@pytest.mark.parametrize("bad_id", ["upload-abc\n", "upload-abc\n\n", "UPLOAD", "../x"])
def test_ids_with_a_trailing_newline_are_invalid(http, bad_id: str) -> None:
    error = assert_error(
        http.post("/v1/activations/imports", json={"upload_id": bad_id}), 422, "invalid_input"
    )
    assert "invalid upload id" in error["message"]
    assert_error(http.get("/v1/activations/run-abc%0A"), 422, "invalid_input")
    assert tree(http, "activations") == []


# ---------------------------------------------------------------------------------------------
# Operator caps


def imported_run(http) -> str:
    """A run of 64 rows of width 8 (upload + import), to train on."""
    data = save_safetensors({"resid": torch.randn(64, D_IN)})
    upload = http.post("/v1/uploads", files={"file": ("acts.safetensors", data)}).json()["id"]
    response = http.post("/v1/activations/imports", json={"upload_id": upload, "tensors": {"resid": "layer"}})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.parametrize(
    ("sae", "train", "limit"),
    [
        ({"n_latents": 10**6}, {}, "max_n_latents"),
        ({"n_latents": 4096}, {}, "max_sae_params"),
        ({"n_latents": 64}, {"batch_size": 10**6}, "max_batch_size"),
        ({"n_latents": 64}, {"epochs": 10**5}, "max_epochs"),
        ({"n_latents": 64}, {"token_budget": 10**12}, "max_tokens_per_job"),
    ],
)
def test_training_over_a_cap_is_refused_before_queueing(
    make_client, sae: dict, train: dict, limit: str
) -> None:
    http = make_client(max_sae_params=D_IN * 1024)
    run_id = imported_run(http)
    body = {
        "run_id": run_id,
        "layer": "layer",
        "sae": {"architecture": "topk", "k": 4, **sae},
        "train": train,
    }
    error = assert_error(http.post("/v1/saes", json=body), 422, "limit_exceeded")
    assert error["details"]["limit"] == limit and f"KESTREL_{limit.upper()}" in error["message"]
    assert_nothing_queued(http)
    assert tree(http, "saes") == []


@pytest.mark.parametrize(
    ("options", "limit"),
    [
        ({"shard_mb": 1e-9}, "min_shard_mb"),
        ({"shard_mb": 10_000}, "max_shard_mb"),
        ({"token_budget": 10**9}, "max_batch_tokens"),
        ({"max_batch_size": 10**9}, "max_batch_size"),
    ],
)
def test_captures_over_a_cap_are_refused_before_queueing(http, options: dict, limit: str) -> None:
    body = {"layers": ["model.layers.3"], "dataset": {"kind": "texts", "texts": ["a"]}, "options": options}
    error = assert_error(http.post("/v1/activations", json=body), 422, "limit_exceeded")
    assert error["details"]["limit"] == limit
    assert_nothing_queued(http)


def test_run_imports_with_a_tiny_shard_size_write_nothing(http) -> None:
    data = save_safetensors({"resid": torch.randn(64, D_IN)})
    upload = http.post("/v1/uploads", files={"file": ("acts.safetensors", data)}).json()["id"]
    response = http.post("/v1/activations/imports", json={"upload_id": upload, "shard_mb": 1e-9})
    error = assert_error(response, 422, "limit_exceeded")
    assert error["details"] == {"limit": "min_shard_mb", "min": 1.0, "got": 1e-9}
    assert tree(http, "activations") == []


def test_discovery_over_the_token_cap_is_refused(http) -> None:
    sae_id = import_sae(http, *saelens_files()).json()["id"]
    body = {"dataset": {"kind": "texts", "texts": ["a"]}, "config": {"token_budget": 10**9}}
    error = assert_error(http.post(f"/v1/saes/{sae_id}/features/discover", json=body), 422, "limit_exceeded")
    assert error["details"]["limit"] == "max_batch_tokens"
    assert_nothing_queued(http)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"hist_min": 5e-324}, "the histogram would have"),  # its range once overflowed to a 500
        ({"hist_min": 1e-300, "hist_max": 1e300}, "the histogram would have"),
    ],
)
def test_discovery_histograms_out_of_range_are_422s(http, config: dict, message: str) -> None:
    sae_id = import_sae(http, *saelens_files()).json()["id"]
    body = {"dataset": {"kind": "texts", "texts": ["a"]}, "config": config}
    response = http.post(f"/v1/saes/{sae_id}/features/discover", json=body)
    assert message in assert_error(response, 422)["message"]
    assert_nothing_queued(http)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_a_request_are_422s(http, value: str) -> None:
    """Python's JSON reader accepts NaN and Infinity; no request field means them."""
    sae_id = import_sae(http, *saelens_files()).json()["id"]
    texts = {"kind": "texts", "texts": ["a"]}
    bodies = {  # VALUE stands where the non-finite number goes
        f"/v1/saes/{sae_id}/features/discover": {"dataset": texts, "config": {"hist_max": "VALUE"}},
        "/v1/saes": {
            "run_id": "run-x",
            "layer": "l",
            "sae": {"n_latents": 64, "k": 4},
            "train": {"lr": "VALUE"},
        },
        "/v1/steering": {"sae_id": sae_id, "edits": [{"latent": 0, "op": "clamp", "value": "VALUE"}]},
    }
    for path, body in bodies.items():
        content = json.dumps(body).replace('"VALUE"', value)
        response = http.post(path, content=content, headers={"Content-Type": "application/json"})
        assert_error(response, 422)
    assert_nothing_queued(http)
    assert tree(http, "steering") == []


# ---------------------------------------------------------------------------------------------
# Devices


@pytest.mark.parametrize("device", ["cuda:x", "gpu", "cuda:1\n", "cpu;rm"])
def test_malformed_devices_are_422s(http, device: str) -> None:
    error = assert_error(http.post(f"/v1/models/{DEFAULT_MODEL}/load", json={"device": device}), 422)
    assert "body.device" in error["message"]
    assert_error(http.post("/v1/saes", json={"run_id": "run-x", "train": {"device": device}}), 422)
    assert_nothing_queued(http)


def test_a_cuda_device_the_worker_lacks_is_a_422(client) -> None:
    error = assert_error(client.post(f"/v1/models/{DEFAULT_MODEL}/load", json={"device": "cuda:999"}), 422)
    assert error["code"] == "invalid_input" and "device 'cuda:999' was asked for" in error["message"]


# ---------------------------------------------------------------------------------------------
# Concept dictionaries


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("names.json", DEEP, "nested too deeply"),
        ("names.json", b'{"concepts": [{"latent": ' + HUGE_INT + b', "name": "x"}]}', "out of range"),
        ("names.csv", b"latent,name\n" + HUGE_INT + b",x\n", "is not an integer"),
    ],
)
def test_bad_dictionary_files_are_422s_and_change_nothing(
    http, name: str, content: bytes, message: str
) -> None:
    sae_id = import_sae(http, *saelens_files()).json()["id"]
    before = tree(http, "saes")
    response = http.post(f"/v1/saes/{sae_id}/concepts/import", files={"file": (name, content)})
    error = assert_error(response, 422, "invalid_input")
    assert message in error["message"], error
    assert http.get(f"/v1/saes/{sae_id}/concepts").json()["total"] == 0 and tree(http, "saes") == before


def test_csv_export_escapes_formulas_and_imports_back_unchanged(http) -> None:
    sae_id = import_sae(http, *saelens_files()).json()["id"]
    names = {1: '=HYPERLINK("http://evil.example","click")', 2: "+cmd|' /C calc'!A0", 3: "-ing endings"}
    concepts = [{"latent": i, "name": n, "description": "@SUM(A1:A9)"} for i, n in names.items()]
    assert (
        http.post(
            f"/v1/saes/{sae_id}/concepts/import", files={"file": ("names.json", json.dumps(concepts))}
        ).status_code
        == 200
    )
    exported = http.get(f"/v1/saes/{sae_id}/concepts/export", params={"format": "csv"}).text
    cells = [cell for line in exported.splitlines()[1:] for cell in line.split(",")[1:3]]
    assert cells and all(not cell.lstrip('"').startswith(("=", "+", "-", "@")) for cell in cells), exported
    assert "'=HYPERLINK" in exported and "'@SUM(A1:A9)" in exported
    response = http.post(
        f"/v1/saes/{sae_id}/concepts/import",
        files={"file": ("names.csv", exported.encode())},
        data={"replace": "true"},
    )
    assert response.status_code == 200, response.text
    back = http.get(f"/v1/saes/{sae_id}/concepts").json()["items"]
    assert {c["latent"]: c["name"] for c in back} == names
    assert {c["description"] for c in back} == {"@SUM(A1:A9)"}


# ---------------------------------------------------------------------------------------------
# Auth, unload requests, documentation


def test_an_empty_api_key_is_no_key(make_client) -> None:
    for value in ("", "  "):
        assert make_client(api_key=value).get("/v1/jobs").status_code == 200


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(make_stack) -> None:
    """150 MB declared, 64 KB sent: the 401 must come without waiting for the rest."""
    stack = make_stack(KESTREL_API_KEY="s3cret")
    stack.start_api()
    head = (
        "POST /v1/uploads HTTP/1.1\r\nHost: kestrel\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {150 << 20}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", stack.api_port), timeout=30) as sock:
        sock.sendall(head + b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n')
        sock.sendall(b"x" * (64 << 10))
        status, headers, body = read_response(sock)
    assert status == 401, body
    assert json.loads(body)["error"]["code"] == "unauthorized" and headers["www-authenticate"] == "ApiKey"
    assert not (stack.store_root / "uploads").exists()
    with stack.client() as http:  # and with the key the route still works
        response = http.post(
            "/v1/uploads", files={"file": ("a.txt", b"hi\n")}, headers={"X-API-Key": "s3cret"}
        )
        assert response.status_code == 201, response.text


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-body: {body!r}"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_unload_requests_stay_bounded(make_client) -> None:
    from kestrel.server.services import MAX_UNLOAD_REQUESTS
    from kestrel.workers import lifecycle

    http = make_client(allowed_models=["org/*"])  # names a worker could load: the hash takes them
    assert_error(http.post("/v1/models/other/model/unload"), 422)  # one it could not: refused
    redis = http.app.state.redis
    redis.hset(lifecycle.UNLOAD_HASH, "org/stale", 1.0)  # long before any live worker's last heartbeat
    for i in range(MAX_UNLOAD_REQUESTS + 20):
        assert http.post(f"/v1/models/org/model-{i}/unload").status_code == 202
    names = {key.decode() for key in redis.hkeys(lifecycle.UNLOAD_HASH)}
    assert len(names) == MAX_UNLOAD_REQUESTS and "org/stale" not in names
    assert f"org/model-{MAX_UNLOAD_REQUESTS + 19}" in names and "org/model-0" not in names
    assert_error(http.post("/v1/models/..%2Fetc/unload"), 422)


def test_every_route_taking_an_idempotency_key_documents_its_409(http) -> None:
    spec = http.get("/openapi.json").json()
    keyed = [
        (path, method, operation)
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if any(p.get("name") == "Idempotency-Key" for p in operation.get("parameters", []))
    ]
    assert len(keyed) >= 6  # capture, train, evaluate, discover, label, analyses
    assert [(path, method) for path, method, op in keyed if "409" not in op["responses"]] == []
