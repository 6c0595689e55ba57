"""An SDK generated from the committed openapi/openapi.json drives a workflow on the live service.

`openapi-python-client` (offline, no post hooks: openapi/sdk-config.yaml) generates the package
into a temporary directory; the test imports it and, through its typed functions only, lists
models, captures a run on the tiny local model, polls the job, trains a small SAE, encodes a
prompt, and deletes what it made. A spec the generator cannot turn into working code fails here.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from service_stack import JOB_TIMEOUT_S, REPO, TEXTS, Stack

from kestrel.core.models import DEFAULT_MODEL

SPEC = REPO / "openapi" / "openapi.json"
CONFIG = REPO / "openapi" / "sdk-config.yaml"
PACKAGE = "kestrel_client"


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], ModuleType]]:
    """Generate the SDK and return an importer for its modules (``sdk("api.jobs.get_job")``)."""
    out = tmp_path_factory.mktemp("sdk") / "kestrel-client"
    generator = Path(sys.executable).parent / "openapi-python-client"
    result = subprocess.run(
        [str(generator), "generate", "--path", str(SPEC), "--output-path", str(out), "--config", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout, f"the generator skipped parts of the spec:\n{result.stdout}"
    sys.path.insert(0, str(out))
    try:
        yield lambda name: importlib.import_module(f"{PACKAGE}.{name}")
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def wait_finished(
    sdk: Callable[[str], ModuleType], client: Any, job_id: str, timeout_s: float = JOB_TIMEOUT_S
) -> Any:
    get_job = sdk("api.jobs.get_job")
    deadline = time.monotonic() + timeout_s
    while True:
        job = get_job.sync(job_id, client=client)
        assert isinstance(job, sdk("models").JobInfo), job
        if job.status.value in ("finished", "failed", "canceled"):
            assert job.status.value == "finished", job.to_dict()
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status.value}"
        time.sleep(0.1)


def test_generated_sdk_drives_a_workflow(sdk, service: Stack) -> None:
    m = sdk("models")
    client = sdk("client").Client(base_url=service.base_url, timeout=60.0, raise_on_unexpected_status=True)
    with client:
        health = sdk("api.health.get_health").sync(client=client)
        assert isinstance(health, m.HealthStatus) and health.status == "ok"

        models = sdk("api.models.list_models").sync(client=client, limit=100)
        assert isinstance(models, m.ModelPage)
        assert {DEFAULT_MODEL, "tiny-llama"} <= {row.name for row in models.items}
        layers = sdk("api.models.get_model_layers").sync("tiny-llama", client=client)
        assert isinstance(layers, m.LayerTable) and "model.layers.1" in {row.name for row in layers.layers}

        # capture: 202 with the job, then poll it
        request = m.CaptureRequest(
            model="tiny-llama", layers=["model.layers.1"], dataset=m.TextsSource(texts=TEXTS)
        )
        accepted = sdk("api.activations.start_capture").sync_detailed(client=client, body=request)
        assert (
            accepted.status_code == 202 and accepted.headers["location"] == f"/v1/jobs/{accepted.parsed.id}"
        )
        job = wait_finished(sdk, client, accepted.parsed.id)
        run_id = job.artifacts["run_id"]

        runs = sdk("api.activations.list_runs").sync(client=client)
        assert isinstance(runs, m.RunPage) and run_id in [run.id for run in runs.items]
        manifest = sdk("api.activations.get_run").sync(run_id, client=client)
        assert isinstance(manifest, m.RunManifest) and manifest.n_docs == len(TEXTS)

        # a small SAE on it, then the top latents of a prompt
        train = m.TrainRequest(
            run_id=run_id,
            layer="model.layers.1",
            sae=m.SAEHyperparameters(n_latents=64, k=4),
            train=m.TrainConfig(batch_size=64, token_budget=2_000),
        )
        job = wait_finished(sdk, client, sdk("api.saes.start_training").sync(client=client, body=train).id)
        sae_id = job.artifacts["sae_id"]
        sae = sdk("api.saes.get_sae").sync(sae_id, client=client)
        assert isinstance(sae, m.SAEManifest) and sae.config["n_latents"] == 64
        encoded = sdk("api.saes.encode_text").sync(
            sae_id, client=client, body=m.EncodeRequest(text="The cat sat on the mat.", top_k=3)
        )
        assert isinstance(encoded, m.EncodeResponse) and encoded.tokens
        assert all(len(token.latents) == 3 for token in encoded.tokens)

        # clean up; a deleted run reads as the error shape
        assert sdk("api.saes.delete_sae").sync(sae_id, client=client).deleted
        assert sdk("api.activations.delete_run").sync(run_id, client=client).deleted
        gone = sdk("api.activations.get_run").sync_detailed(run_id, client=client)
        assert gone.status_code == 404 and isinstance(gone.parsed, m.ErrorResponse)
        assert gone.parsed.error.code == "not_found"
