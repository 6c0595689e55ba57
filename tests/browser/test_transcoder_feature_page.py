"""A transcoder's feature page in the dashboard (what an attribution graph's node links to): a
transcoder of the tiny Llama's block-1 MLP trained and discovered through the API, its strongest
latent's page opened in chromium, with its contexts shaded, its histogram and its logit effects;
and a plain SAE of the MLP's (normed) input, whose page says why it has no logit effects."""

from __future__ import annotations

import pytest
from browser_stack import Dashboard
from service_stack import tiny_transcoders, wait_for_job

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def transcoder_latent(dashboard: Dashboard) -> tuple[str, dict]:
    """A discovered transcoder's id and the list item of its strongest latent."""
    with dashboard.client() as http:
        _, [transcoder] = tiny_transcoders(http, (1,))
        submitted = http.post(f"/v1/saes/{transcoder}/features/discover", json={"config": {"top_n": 8}})
        assert submitted.status_code == 202, submitted.text
        wait_for_job(http, submitted.json()["id"])
        listing = http.get(f"/v1/saes/{transcoder}/features", params={"sort": "max_activation", "limit": 1})
        return transcoder, listing.json()["items"][0]


@pytest.fixture(scope="module")
def normed_input_latent(dashboard: Dashboard) -> tuple[str, dict]:
    """An SAE of block 1's MLP input (the normed residual: not added to the stream), discovered."""
    with dashboard.client() as http:
        run_id, _ = tiny_transcoders(http, (1,))
        train = {"run_id": run_id, "layer": "model.layers.1.mlp:input", "sae": {"n_latents": 32, "k": 4}}
        submitted = http.post("/v1/saes", json=train | {"train": {"batch_size": 64, "token_budget": 2_000}})
        assert submitted.status_code == 202, submitted.text
        sae_id = wait_for_job(http, submitted.json()["id"])["artifacts"]["sae_id"]
        wait_for_job(http, http.post(f"/v1/saes/{sae_id}/features/discover", json={}).json()["id"])
        listing = http.get(f"/v1/saes/{sae_id}/features", params={"sort": "max_activation", "limit": 1})
        return sae_id, listing.json()["items"][0]


def test_a_transcoders_feature_page_renders(page, dashboard: Dashboard, transcoder_latent) -> None:
    transcoder, item = transcoder_latent
    page.goto(f"{dashboard.url}/ui/saes/{transcoder}/features/{item['latent']}")
    page.wait_for_selector("body[data-ready]")
    shaded = page.locator("#contexts .tok:not([data-activation='0'])")
    assert shaded.count() > 0
    assert page.locator("#histogram svg rect.bar").count() > 0
    assert page.locator("#logits .logit-list li").count() == 20  # its decoder rows' direct path
    # steering its input layer and measuring its row there are refused: the page offers neither
    assert page.locator("#steer-link").count() == 0 and page.locator("#measure-logits").count() == 0
    note = page.inner_text("#transcoder-note")
    assert "model.layers.1.mlp:input" in note and "attribution graph" in note

    page.goto(f"{dashboard.url}/ui/saes/{transcoder}/features")
    page.wait_for_selector("body[data-ready]")
    assert page.locator("#results-table tbody tr").count() > 0


def test_a_page_without_a_direct_path_says_why(page, dashboard: Dashboard, normed_input_latent) -> None:
    sae_id, item = normed_input_latent
    with dashboard.client() as http:
        logits = http.get(f"/v1/saes/{sae_id}/features/{item['latent']}").json()["logits"]
    assert logits["positive"] == [] and logits["note"].startswith("none"), logits
    page.goto(f"{dashboard.url}/ui/saes/{sae_id}/features/{item['latent']}")
    page.wait_for_selector("body[data-ready]")
    note = page.inner_text("#logits-note")
    assert note.startswith("No direct path to the logits") and "model.layers.1.mlp:input" in note, note
    assert page.locator("#logits .logit-list").count() == 0
