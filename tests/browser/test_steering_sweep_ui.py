"""The playground's sweep table and the generate effect line, and the feature page's measured
logit effects (issue #14), in chromium against the live stack."""

from __future__ import annotations

import pytest
from browser_stack import Dashboard
from test_dashboard import busiest_latent, open_page

pytestmark = pytest.mark.timeout(300)


def test_playground_sweeps_strengths_into_a_table_with_a_verdict(page, dashboard: Dashboard) -> None:
    latent = busiest_latent(dashboard)["latent"]
    open_page(page, dashboard, f"/ui/steering?sae={dashboard.sae_id}&latent={latent}")
    page.get_by_role("textbox", name="Prompt").fill("The weather today is")
    page.get_by_label("New tokens").fill("6")
    page.get_by_label("Keywords").fill("rain, sun")
    page.get_by_label("Strengths (× max activation)").fill("0, 2, 8")
    page.get_by_role("button", name="Sweep").click()
    page.wait_for_selector("#sweep-table tbody tr:nth-child(4)")
    rows = page.locator("#sweep-table tbody tr")
    assert rows.count() == 4
    cells = [rows.nth(i).locator("td") for i in range(4)]
    assert cells[0].first.inner_text() == "unsteered" and cells[1].first.inner_text() == "0×"
    assert cells[1].last.inner_text() == cells[0].last.inner_text(), "strength 0 is the unsteered text"
    assert cells[1].nth(4).inner_text() == "yes"  # fluent
    verdict = page.inner_text("#sweep-verdict")
    assert verdict.startswith(f"Latent {latent}") and ("steers" in verdict or "does not steer" in verdict)

    slider = page.locator(f"#slider-{latent}")
    slider.focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.wait_for_function("document.querySelector('#gen-effect').textContent.includes('Perplexity')")
    assert "keywords:" in page.inner_text("#gen-effect")


def test_bad_sweep_says_what_is_wrong(page, dashboard: Dashboard) -> None:
    open_page(page, dashboard, f"/ui/steering?sae={dashboard.sae_id}")
    page.get_by_label("Latent", exact=True).fill("1")
    page.get_by_label("Strengths (× max activation)").fill(", ".join(str(s) for s in range(13)))
    page.get_by_role("button", name="Sweep").click()
    page.wait_for_function(
        "document.querySelector('#sweep-status').textContent.startsWith('Could not sweep')"
    )
    assert "strengths" in page.inner_text("#sweep-status")


def test_feature_page_measures_logit_effects_next_to_the_direct_path(page, dashboard: Dashboard) -> None:
    latent = busiest_latent(dashboard)["latent"]
    open_page(page, dashboard, f"/ui/saes/{dashboard.sae_id}/features/{latent}")
    page.get_by_role("button", name="Measure through the model").click()
    page.wait_for_selector("#logits-agreement")
    assert "rank correlation" in page.inner_text("#logits-agreement")
    assert page.locator("#logits-measured .chip").count() == 40
    assert page.locator("#logits .logit-list li").count() == 20  # the direct path stays
