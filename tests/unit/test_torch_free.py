"""The API process never loads a model, so it must not import torch or transformers either.

Checked in a fresh interpreter: importing ``kestrel.server.app``, building the app and its OpenAPI
document leaves ``torch`` and ``transformers`` out of ``sys.modules``, and the job functions the
routes enqueue by dotted path are the real ones of ``kestrel.workers.jobs``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kestrel.core.catalog import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers")

PROBE = textwrap.dedent(
    """
    import json, sys
    import kestrel.server.app
    after_import = sorted(m for m in {heavy!r} if m in sys.modules)
    from kestrel.server.app import create_app
    from kestrel.settings import Settings
    app = create_app(Settings(store_root=sys.argv[1], redis_url="redis://127.0.0.1:1/0"))
    app.openapi()
    after_app = sorted(m for m in {heavy!r} if m in sys.modules)
    print(json.dumps({{
        "after_import": after_import,
        "after_app": after_app,
        "jobs_imported": "kestrel.workers.jobs" in sys.modules,
    }}))
    """
).format(heavy=HEAVY)


def _probe(tmp_path: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_api_process_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    seen = _probe(tmp_path)
    assert seen["after_import"] == [], f"import kestrel.server.app loaded {seen['after_import']}"
    assert seen["after_app"] == [], f"create_app() + openapi() loaded {seen['after_app']}"
    assert not seen["jobs_imported"], "the API imported kestrel.workers.jobs (enqueue by dotted path)"


def test_the_probe_would_see_torch(tmp_path: Path) -> None:
    """The check itself works: a module that does import torch is seen."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys, kestrel.core.models; print('torch' in sys.modules)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "True", done.stderr


@pytest.mark.parametrize("path", __import__("kestrel.workers.names", fromlist=["ALL"]).ALL)
def test_enqueued_paths_are_job_functions(path: str) -> None:
    import importlib

    from kestrel.workers.names import JOB_MODULES

    module, _, name = path.rpartition(".")
    assert module in JOB_MODULES
    function = getattr(importlib.import_module(module), name)
    assert callable(function)
    assert f"{function.__module__}.{function.__name__}" == path  # what RQ records for a function


# The slim API image, simulated: the engine's modules cannot be imported at all. Reads and checks
# work (a config is checked without the SAE classes, a saved steering config without torch); a
# route that computes with the engine answers 503 saying so; Redis being down is its usual 503.
SLIM_PROBE = textwrap.dedent(
    """
    import importlib.abc, json, sys
    from pathlib import Path

    ENGINE = {engine!r}

    class NoEngine(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ENGINE:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, NoEngine())
    root = Path(sys.argv[1])
    run = root / "activations" / "run-abc"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({{
        "id": "run-abc", "created": "2026-01-01T00:00:00Z", "model": {{"name": {model!r}}},
        "layers": {{"model.layers.3": {{"d": 8}}}}, "d_model": 8, "dtype": "fp16", "n_tokens": 10,
        "n_docs": 2, "shards": [], "dataset": {{"kind": "texts"}}, "options": {{}},
    }}))

    from fastapi.testclient import TestClient
    from kestrel.server.app import create_app
    from kestrel.settings import Settings

    app = create_app(Settings(store_root=root, redis_url="redis://127.0.0.1:1/0"))
    client = TestClient(app, raise_server_exceptions=False)
    texts = {{"kind": "texts", "texts": ["a b"]}}
    train = {{"run_id": "run-abc", "layer": "model.layers.3"}}
    direction = {{"layer": "model.layers.3", "alpha": 2, "vector": [1, 0]}}
    calls = [
        ("GET", "/health", None),
        ("GET", "/openapi.json", None),
        ("GET", "/v1/activations", None),
        ("GET", "/v1/activations/run-abc", None),
        ("POST", "/v1/activations", {{"model": "../x", "layers": ["a"], "dataset": texts}}),
        ("POST", "/v1/activations", {{"layers": ["model.layers.3"], "dataset": texts}}),
        ("GET", "/v1/saes", None),
        ("GET", "/v1/saes/sae-nope", None),
        ("POST", "/v1/saes", {{**train, "sae": {{"n_latents": 16, "k": 99}}}}),
        ("POST", "/v1/saes", {{**train, "sae": {{"n_latents": 64}}}}),
        ("POST", "/v1/steering", {{"directions": [direction]}}),
        ("GET", "/v1/steering", None),
        ("GET", "/v1/analyses", None),
        ("GET", "/v1/uploads", None),
        ("GET", "/v1/saes/sae-nope/concepts", None),
        ("GET", "/v1/saes/sae-nope/features", None),
    ]
    answers = []
    for method, path, body in calls:
        response = client.request(method, path, json=body)
        answers.append([method, path, response.status_code, response.json()])
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in ENGINE)
    print(json.dumps({{"answers": answers, "leaked": leaked}}))
    """
)


def test_slim_api_serves_without_the_engine(tmp_path: Path) -> None:
    from kestrel.server.errors import ENGINE_MODULES

    probe = SLIM_PROBE.format(engine=sorted(ENGINE_MODULES), model=DEFAULT_MODEL)
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["leaked"] == []
    statuses = [status for _, _, status, _ in seen["answers"]]
    bodies = [body for _, _, _, body in seen["answers"]]
    assert statuses == [200, 200, 200, 200, 422, 503, 200, 404, 422, 503, 201, 200, 200, 200, 404, 503], seen
    assert bodies[2]["total"] == 1 and bodies[3]["d_model"] == 8
    assert "is not a Hugging Face hub id" in bodies[4]["error"]["message"]  # the model name, checked
    assert "Redis" in bodies[5]["error"]["message"]  # validated, then the queue was down
    assert "k (99) cannot exceed n_latents (16)" in bodies[8]["error"]["message"]  # SAEConfig, no torch
    assert "Redis" in bodies[9]["error"]["message"]
    assert bodies[11]["total"] == 1  # the steering config saved above
    engine = bodies[15]["error"]
    assert engine["code"] == "unavailable" and engine["details"]["missing_module"] in ENGINE_MODULES


SERVE_PROBE = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoEngine(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {engine!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, NoEngine())
    from typer.testing import CliRunner
    from kestrel.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    print(result.exit_code, repr(result.exception))
    """
)


def test_kestrel_serve_starts_without_the_engine() -> None:
    from kestrel.server.errors import ENGINE_MODULES

    done = subprocess.run(
        [sys.executable, "-c", SERVE_PROBE.format(engine=sorted(ENGINE_MODULES))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "0", done.stdout
