"""Steering with a sense of scale over HTTP (issue #14): the sweep, generate's fluency and keyword
effect, the measured logit effect, their 4xx errors, and a worker killed mid-sweep. Real Redis,
real workers, the API under uvicorn, on the tiny local Llama."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from service_stack import TEXTS, Stack, assert_error, wait_for_job

from kestrel.core.models import DEFAULT_MODEL

MODEL = "tiny-llama"
LAYER = "model.layers.1"


@pytest.fixture(scope="module")
def sae_id(service) -> str:
    """A 64-latent SAE on the tiny model, checked to refuse relative sweeps before discovery, then
    discovered."""
    with service.client() as http:
        body = {"model": MODEL, "layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS * 2}}
        job = wait_for_job(http, http.post("/v1/activations", json=body).json()["id"])
        train = {"run_id": job["artifacts"]["run_id"], "layer": LAYER, "sae": {"n_latents": 64, "k": 4}}
        train["train"] = {"batch_size": 64, "token_budget": 4_000}
        sae = wait_for_job(http, http.post("/v1/saes", json=train).json()["id"])["artifacts"]["sae_id"]
        early = http.post("/v1/steering/sweep", json={"sae_id": sae, "latent": 3, "prompts": ["x"]})
        assert "run discovery first" in assert_error(early, 422, "invalid_input")["message"]
        discover = http.post(f"/v1/saes/{sae}/features/discover", json={"config": {"top_n": 8}})
        wait_for_job(http, discover.json()["id"])
        return sae


def _alive(client: httpx.Client, sae_id: str) -> dict:
    return client.get(f"/v1/saes/{sae_id}/features", params={"sort": "density", "limit": 1}).json()["items"][
        0
    ]


def test_sweep_side_by_side_with_fluency_effect_and_verdict(client: httpx.Client, sae_id: str) -> None:
    latent = _alive(client, sae_id)
    body = {
        "sae_id": sae_id,
        "latent": latent["latent"],
        "strengths": [0, 1, 8],
        "prompts": ["The chef cooked", "A goal"],
        "keywords": ["pasta", "goal"],
        "max_new_tokens": 6,
    }
    answer = client.post("/v1/steering/sweep", json=body)
    assert answer.status_code == 200, answer.text
    sweep = answer.json()
    assert sweep["max_activation"] == pytest.approx(latent["max_activation"])
    zero, one, eight = sweep["points"]
    assert [i["token_ids"] for i in zero["items"]] == [i["token_ids"] for i in sweep["baseline"]["items"]]
    assert zero["perplexity_ratio"] == 1.0 and zero["fluent"] and not zero["effect"]
    assert eight["absolute_value"] == pytest.approx(8 * latent["max_activation"], rel=1e-6)
    assert one["keyword_logprob_delta"] is not None and eight["steered_keyword_hits"] is not None
    assert sweep["fluent_up_to"] is not None and isinstance(sweep["steers"], bool) and sweep["verdict"]
    assert sweep["job_id"] and client.get(f"/v1/jobs/{sweep['job_id']}").json()["kind"] == "steering_sweep"


@pytest.mark.parametrize(
    ("change", "status", "says"),
    [
        ({"strengths": list(range(13))}, 422, "strengths"),
        ({"strengths": [0, 1, 1]}, 422, "repeat"),
        ({"strengths": [0, 1e9]}, 422, "magnitude"),
        ({"prompts": ["p"] * 8, "max_new_tokens": 64}, 422, "more than 2048"),
        ({"max_new_tokens": 65}, 422, "max_new_tokens"),
        ({"latent": 64}, 422, "out of range"),
        ({"sae_id": "sae-nope"}, 404, "nope"),
        ({"keywords": ["  "]}, 422, "non-blank"),
        ({"op": "scale"}, 422, "op"),
    ],
)
def test_sweep_refuses_bad_requests_before_any_job(
    client: httpx.Client, sae_id: str, change: dict, status: int, says: str
) -> None:
    body = {"sae_id": sae_id, "latent": 3, "prompts": ["x"], **change}
    assert says in assert_error(client.post("/v1/steering/sweep", json=body), status)["message"]


def test_sweep_checks_texts_and_model_as_generate_does_before_any_job(
    make_client, service: Stack, sae_id: str, local_models: Path
) -> None:
    """The sweep shares generate's checks (`services.check_steered_generation`): prompts and
    keywords within the text limits, and a model other than the SAE's refused. This app has no
    workers, so anything queued would answer 202, not the 4xx."""
    http = make_client(max_text_chars=10, model_dirs=[local_models])
    root = Path(http.app.state.settings.store_root)
    for kind in ("saes", "activations"):  # the shared stack's SAE, its run and discovery
        shutil.copytree(service.store_root / kind, root / kind, dirs_exist_ok=True)
    body = {"sae_id": sae_id, "latent": 3, "prompts": ["short"]}
    long_prompt = http.post("/v1/steering/sweep", json={**body, "prompts": ["ok", "a prompt too long"]})
    assert "max_text_chars" in assert_error(long_prompt, 413)["message"]
    long_keyword = http.post("/v1/steering/sweep", json={**body, "keywords": ["a keyword too long"]})
    assert "max_text_chars" in assert_error(long_keyword, 413)["message"]
    other_model = http.post("/v1/steering/sweep", json={**body, "model": DEFAULT_MODEL})
    assert f"it cannot steer {DEFAULT_MODEL!r}" in assert_error(other_model, 422, "invalid_input")["message"]
    steering = {"sae_id": sae_id, "edits": [{"latent": 3, "op": "add", "value": 1.0}]}
    generate = {"prompts": ["short"], "steering": steering, "keywords": ["a keyword too long"]}
    assert (
        "max_text_chars"
        in assert_error(http.post(f"/v1/models/{MODEL}/generate", json=generate), 413)["message"]
    )
    assert http.get("/v1/jobs").json()["total"] == 0


def test_generate_reports_fluency_keyword_effect_and_resolved_edits(
    client: httpx.Client, sae_id: str
) -> None:
    latent = _alive(client, sae_id)
    edit = {"latent": latent["latent"], "op": "add", "value": 2, "unit": "max_activation"}
    body = {"prompts": ["The chef"], "steering": {"sae_id": sae_id, "edits": [edit]}, "max_new_tokens": 5}
    answer = client.post(f"/v1/models/{MODEL}/generate", json={**body, "keywords": ["pasta"]})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["edits"] == [
        {**edit, "value": 2.0, "absolute_value": pytest.approx(2 * latent["max_activation"], rel=1e-6)}
    ]
    effect = result["items"][0]["effect"]
    assert effect["default_perplexity"] > 0 and effect["steered_perplexity"] > 0
    assert effect["default_keyword_hits"] is not None and effect["keyword_logprob_delta"] is not None
    assert result["effect"]["perplexity_ratio"] == pytest.approx(
        effect["steered_perplexity"] / effect["default_perplexity"]
    )
    without = client.post(f"/v1/models/{MODEL}/generate", json=body).json()
    assert without["items"][0]["effect"]["default_keyword_hits"] is None


def test_measured_logit_effect_next_to_the_direct_path(client: httpx.Client, sae_id: str) -> None:
    latent = _alive(client, sae_id)["latent"]
    path = f"/v1/saes/{sae_id}/features/{latent}/logits/measured"
    answer = client.post(path, json={"k": 5, "n_contexts": 4})
    assert answer.status_code == 200, answer.text
    report = answer.json()
    page = client.get(f"/v1/saes/{sae_id}/features/{latent}").json()
    assert report["layer"] == LAYER and report["scale"] == pytest.approx(page["max_activation"])
    assert 0 < report["n_contexts"] <= 4
    assert len(report["direct"]["positive"]) == len(report["measured"]["negative"]) == 5
    assert len(report["measured_probability"]["positive"]) == 5
    # the direct path is the feature page's list
    assert [t["token_id"] for t in report["direct"]["positive"]] == [
        t["token_id"] for t in page["logits"]["positive"][:5]
    ]
    assert -1 <= report["agreement"]["spearman"] <= 1
    texts = client.post(path, json={"k": 3, "texts": ["Hello there", "A goal"], "scale": 2.0}).json()
    assert texts["n_contexts"] == 2 and texts["scale"] == 2.0
    assert_error(client.post(f"/v1/saes/{sae_id}/features/64/logits/measured", json={}), 422)
    assert_error(client.post(path, json={"k": 500}), 422)
    assert "texts[1]" in assert_error(client.post(path, json={"texts": ["ok", " "]}), 422)["message"]
    assert_error(client.post(path, json={"texts": []}), 422)
    assert_error(client.post("/v1/saes/sae-nope/features/1/logits/measured", json={}), 404)


def test_a_worker_killed_mid_sweep_fails_the_job_with_worker_died(
    make_stack, service: Stack, sae_id: str, local_models: Path
) -> None:
    """The awaited call has answered 202 (its wait is 0.5 s); SIGKILL of the interactive worker:
    the job reads failed with ``worker_died`` within the heartbeat ttl, and nothing was written."""
    stack: Stack = make_stack(
        KESTREL_INTERACTIVE_TIMEOUT_S="0.5",
        KESTREL_HEARTBEAT_TTL_S="6",
        KESTREL_HEARTBEAT_INTERVAL_S="1",
        KESTREL_MODEL_DIRS=str(local_models),
    )
    for kind in ("saes", "activations"):  # the shared stack's SAE, its run and discovery
        shutil.copytree(service.store_root / kind, stack.store_root / kind, dirs_exist_ok=True)
    before = sorted(p.relative_to(stack.store_root) for p in stack.store_root.rglob("*"))
    stack.start_worker("interactive")
    stack.start_api()
    stack.wait_ready({"interactive": 1})
    with stack.client() as http:
        body = {
            "sae_id": sae_id,
            "latent": 3,
            "unit": "absolute",
            "strengths": [float(s) for s in range(12)],
            "prompts": ["The chef cooked", "A goal was"],
            "max_new_tokens": 64,
        }
        accepted = http.post("/v1/steering/sweep", json=body)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        wait_for_job(http, job_id, states=("started",))
        stack.kill("worker-interactive")
        failed = wait_for_job(http, job_id, states=("failed",), timeout_s=120)
        assert failed["error"]["code"] == "worker_died", failed
    after = sorted(p.relative_to(stack.store_root) for p in stack.store_root.rglob("*"))
    assert [p for p in after if p not in before and p.parts[0] in ("saes", "steering")] == []
