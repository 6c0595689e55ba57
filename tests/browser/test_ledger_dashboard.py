"""The evaluation ledger on the SAE page and the comparison page, in headless chromium against a
live stack: a ledger is computed from labelled lines typed into the page and plotted against its
baselines; two SAEs are compared with the L0-vs-FVU Pareto front marked."""

from __future__ import annotations

import pytest
from browser_stack import Dashboard
from service_stack import wait_for_job

pytestmark = pytest.mark.timeout(600)

TOPICS = {"food": "cooking pasta with garlic", "sport": "a football match", "space": "stars and galaxies"}
LINES = "\n".join(f"{label} | {text}, example {i}." for i in range(8) for label, text in TOPICS.items())


def open_page(page, dashboard: Dashboard, path: str) -> None:
    page.goto(f"{dashboard.url}{path}")
    page.wait_for_selector("body[data-ready]")


@pytest.fixture(scope="module")
def small_sae(dashboard: Dashboard) -> str:
    """A second, 64-latent SAE on the dashboard's run: quick to evaluate, and a point to compare."""
    with dashboard.client() as http:
        body = {
            "run_id": dashboard.run_id,
            "layer": "model.layers.1",
            "sae": {"n_latents": 64, "k": 4},
            "train": {"batch_size": 32},
        }
        return wait_for_job(http, http.post("/v1/saes", json=body).json()["id"])["artifacts"]["sae_id"]


def test_the_sae_page_computes_and_plots_the_ledger(page, dashboard: Dashboard, small_sae: str) -> None:
    open_page(page, dashboard, f"/ui/saes/{small_sae}")
    assert "No ledger yet" in page.inner_text("#ledger")
    page.get_by_text("Compute the ledger").click()
    page.get_by_label("Labelled texts for k-sparse probing").fill("no separator on this line")
    page.get_by_role("button", name="Compute ledger").click()
    page.wait_for_selector("#ledger-status.err")
    assert "no label separator" in page.inner_text("#ledger-status")

    page.get_by_label("Labelled texts for k-sparse probing").fill(LINES)
    page.get_by_label("k values").fill("1,2")
    page.get_by_label("Absorption words").fill("200")
    page.get_by_label("Synthetic rows").fill("4096")
    page.get_by_role("button", name="Compute ledger").click()
    page.wait_for_selector("#ledger-table", timeout=400_000)
    rows = {r.get_attribute("data-metric") for r in page.locator("#ledger-table tbody tr").all()}
    assert {
        "fvu",
        "l0",
        "ce_loss_recovered",
        "sparse_probing_top_1",
        "dense_probe",
        "synthetic_recovery",
    } <= rows
    probing_row = page.locator("#ledger-table tr[data-metric=sparse_probing_top_1]").inner_text()
    assert "chance" in probing_row and "higher" in probing_row
    plot = page.locator("svg.ledger-plot")
    assert "sparse_probing_top_1" in plot.get_attribute("aria-label")
    assert plot.locator("circle.value").count() >= 6 and plot.locator("line.baseline").count() >= 6
    open_page(page, dashboard, f"/ui/saes/{small_sae}")  # stored: a reload shows it straight away
    assert page.locator("#ledger-table").is_visible()


def test_the_compare_page_lays_saes_side_by_side_with_the_pareto_front(
    page, dashboard: Dashboard, small_sae: str
) -> None:
    ids = f"{small_sae},{dashboard.sae_id}"
    open_page(page, dashboard, f"/ui/compare?ids={ids}")
    table = page.locator("#compare-table tbody tr")
    assert [r.get_attribute("data-id") for r in table.all()] == [small_sae, dashboard.sae_id]
    scatter = page.locator("svg.pareto-plot")
    assert scatter.locator("circle").count() == 2
    assert scatter.locator("circle.pareto").count() >= 1
    assert "Pareto front" in scatter.get_attribute("aria-label")
    with dashboard.client() as http:
        rows = {r["id"]: r for r in http.get("/v1/saes/compare", params={"ids": ids}).json()["rows"]}
    for row in table.all():
        assert row.get_attribute("data-pareto") == str(rows[row.get_attribute("data-id")]["pareto"]).lower()

    page.get_by_role("checkbox", name=dashboard.sae_id).uncheck()  # the picker, from its label
    page.wait_for_selector(f"body[data-shown='{small_sae}']")
    assert page.locator("#compare-table tbody tr").count() == 1
    assert f"ids={small_sae}" in page.url and dashboard.sae_id not in page.url
