"""An attribution graph's page in the dashboard: transcoders of the tiny Llama's blocks 0 and 1
trained through the API, a graph analysis over them, its page opened in chromium. The report's key
numbers (replacement, completeness) are shown and the drawing of the graph loads at a readable size."""

from __future__ import annotations

from typing import Any

import pytest
from browser_stack import OUTPUT, Dashboard
from service_stack import tiny_transcoders, wait_for_job

pytestmark = pytest.mark.timeout(300)

GRAPH_LOADED = """() => {
  const img = document.querySelector('#report figure img[data-plot="graph"]');
  return img !== null && img.complete && img.naturalWidth > 0;
}"""


@pytest.fixture(scope="module")
def graph_analysis(dashboard: Dashboard) -> dict[str, Any]:
    """The manifest of a finished graph analysis over two tiny transcoders, unpruned (node_keep 1.0:
    the tiny random model's default pruning keeps no feature, so the page would show none)."""
    with dashboard.client() as http:
        _, transcoders = tiny_transcoders(http, (0, 1))
        body = {"kind": "graph", "model": "tiny-llama", "prompt": "The capital of France is"}
        submitted = http.post(
            "/v1/analyses", json={**body, "transcoders": transcoders, "target": " Paris", "node_keep": 1.0}
        )
        assert submitted.status_code == 202, submitted.text
        analysis_id = wait_for_job(http, submitted.json()["id"])["artifacts"]["analysis_id"]
        return http.get(f"/v1/analyses/{analysis_id}").json()


def test_graph_report_renders_with_scores_and_drawing(
    page, dashboard: Dashboard, graph_analysis: dict
) -> None:
    analysis_id = graph_analysis["id"]
    page.goto(f"{dashboard.url}/ui/analyses/{analysis_id}")
    page.wait_for_selector("body[data-ready]")
    assert page.inner_text("h1") == graph_analysis["title"]
    assert "graph" in page.inner_text("#analysis-subtitle")

    key_numbers = page.locator("#report section", has=page.locator("h2", has_text="Key numbers"))
    for name in ("replacement", "completeness"):
        row = key_numbers.locator("tr", has_text=f"{name} score")
        assert row.count() == 1, key_numbers.inner_text()
        shown = float(row.locator("td").last.inner_text().replace(",", ""))
        assert shown == pytest.approx(graph_analysis["key_numbers"][name], abs=1e-3)
    stats = page.inner_text("#analysis-stats")
    assert "replacement" in stats and "completeness" in stats and "links kept" in stats
    features = page.locator("#report section", has=page.locator("h2", has_text="Most influential features"))
    kept = graph_analysis["key_numbers"]["features_kept"]
    assert kept > 0 and features.locator("tbody tr").count() == min(20, kept)  # the top 20 at most

    page.wait_for_function(GRAPH_LOADED)
    image = page.locator('#report figure img[data-plot="graph"]')
    size = image.evaluate("img => ({natural: img.naturalWidth, shown: img.getBoundingClientRect().width})")
    assert size["natural"] > 0 and size["shown"] >= 400, size  # drawn large enough to read
    image.scroll_into_view_if_needed()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / "test_graph_dashboard-graph.png"))
