"""An attribution graph's page in the dashboard: transcoders of the tiny Llama's blocks 0 and 1
trained through the API, a graph analysis over them, its page opened in chromium. The report's key
numbers (replacement, completeness) are shown and the drawing of the graph loads at a readable size;
the interactive view (graph_view.js) draws every node, shows a clicked feature with its feature
page, keeps pins across a reload, and tests pinned features through the interventions endpoint."""

from __future__ import annotations

import time
from typing import Any

import pytest
from browser_stack import OUTPUT, Dashboard
from service_stack import tiny_transcoders, wait_for_job
from test_dashboard import UNLABELLED_CONTROLS

pytestmark = pytest.mark.timeout(300)

GRAPH_LOADED = """() => {
  const img = document.querySelector('#report figure img[data-plot="graph"]');
  return img !== null && img.complete && img.naturalWidth > 0;
}"""


@pytest.fixture(scope="module")
def graph_analysis(dashboard: Dashboard) -> dict[str, Any]:
    """The manifest and results of a finished graph analysis over two tiny transcoders (blocks 0
    and 1, their SAE ids under ``block_transcoders``), unpruned (node_keep 1.0: the tiny random
    model's default pruning keeps no feature, so the page would show none)."""
    with dashboard.client() as http:
        _, transcoders = tiny_transcoders(http, (0, 1))
        body = {"kind": "graph", "model": "tiny-llama", "prompt": "The capital of France is"}
        submitted = http.post(
            "/v1/analyses", json={**body, "transcoders": transcoders, "target": " Paris", "node_keep": 1.0}
        )
        assert submitted.status_code == 202, submitted.text
        analysis_id = wait_for_job(http, submitted.json()["id"])["artifacts"]["analysis_id"]
        return {**http.get(f"/v1/analyses/{analysis_id}").json(), "block_transcoders": transcoders}


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


# ---------------------------------------------------------------------------------------------
# The interactive view (graph_view.js, graph_test.js)


def open_graph(page, dashboard: Dashboard, analysis_id: str) -> None:
    page.goto(f"{dashboard.url}/ui/analyses/{analysis_id}")
    page.wait_for_selector("body[data-ready]")
    page.wait_for_selector("#graph-view svg [data-node]")


def strongest_feature(graph: dict[str, Any]) -> dict[str, Any]:
    return max((n for n in graph["nodes"] if n["kind"] == "feature"), key=lambda n: n["influence"])


def feature_href(graph_analysis: dict[str, Any], node: dict[str, Any]) -> str:
    """The feature page the node must link to: its own sae_id, else its block's transcoder."""
    sae_id = node.get("sae_id") or graph_analysis["block_transcoders"][node["layer"]]
    return f"/ui/saes/{sae_id}/features/{node['latent']}"


def node(page, node_id: str):
    return page.locator(f'#graph-view svg [data-node="{node_id}"]')


def test_graph_view_draws_every_node_and_shows_a_feature(
    page, dashboard: Dashboard, graph_analysis: dict
) -> None:
    graph = graph_analysis["results"]
    open_graph(page, dashboard, graph_analysis["id"])
    drawn = page.eval_on_selector_all("#graph-view svg [data-node]", "els => els.map(e => e.dataset.node)")
    assert sorted(drawn) == sorted(n["id"] for n in graph["nodes"])  # one element per node, no more
    assert page.locator("#graph-view svg line.gv-edge").count() == len(graph["links"])
    labels = page.eval_on_selector_all("#graph-view svg .gv-token", "els => els.map(e => e.firstChild.data)")
    assert labels == [t.replace("\n", "↵") for t in graph["tokens"]]  # along the bottom, in order

    feature = strongest_feature(graph)
    touching = [link for link in graph["links"] if feature["id"] in (link["source"], link["target"])]
    node(page, feature["id"]).hover()  # lights the node's own edges, no others
    assert page.locator("#graph-view svg line.gv-edge.hot").count() == len(touching) > 0
    node(page, feature["id"]).click()
    details = page.locator(".gv-details")
    assert f"#{feature['latent']}" in details.locator("h2").inner_text()
    for field in ("layer", "position", "latent"):
        assert details.locator(f'dd[data-field="{field}"]').inner_text() == str(feature[field])
    assert details.locator('dd[data-field="kind"]').inner_text() == "feature"
    incoming = [link for link in graph["links"] if link["target"] == feature["id"]]
    assert f"({len(incoming)})" in details.inner_text()
    link = page.locator("#gv-feature-link")
    href = feature_href(graph_analysis, feature)
    assert link.get_attribute("href") == href
    with dashboard.client() as http:
        assert http.get(href).status_code == 200  # the feature page exists

    # Keyboard: the drawing is one tab stop; arrows move between nodes, Enter selects.
    token = next(n for n in graph["nodes"] if n["kind"] == "token" and n["position"] == 0)
    node(page, token["id"]).click()
    node(page, token["id"]).press("ArrowRight")
    focused = page.evaluate("document.activeElement.dataset.node")
    assert focused and focused != token["id"]
    page.keyboard.press("Enter")
    assert page.locator(".gv-details h2").inner_text() == page.evaluate(
        "document.activeElement.getAttribute('aria-label')"
    )


def test_graph_view_links_a_graph_without_sae_ids(page, dashboard: Dashboard, graph_analysis: dict) -> None:
    """A graph stored before its nodes named their transcoder (no sae_id, no transcoders map) still
    links each feature to its page: the analysis's transcoders are matched to blocks by the target
    layer the API reports for each."""

    def without_sae_ids(route) -> None:
        response = route.fetch()
        body = response.json()
        body["results"].pop("transcoders", None)
        for graph_node in body["results"]["nodes"]:
            graph_node.pop("sae_id", None)
        route.fulfill(response=response, json=body)

    page.route(f"**/v1/analyses/{graph_analysis['id']}", without_sae_ids)
    open_graph(page, dashboard, graph_analysis["id"])
    for layer in (0, 1):
        feature = max(
            (n for n in graph_analysis["results"]["nodes"] if n["kind"] == "feature" and n["layer"] == layer),
            key=lambda n: n["influence"],
        )
        node(page, feature["id"]).click()
        expected = f"/ui/saes/{graph_analysis['block_transcoders'][layer]}/features/{feature['latent']}"
        assert page.get_attribute("#gv-feature-link", "href") == expected


def test_graph_view_draws_the_strongest_links_of_a_dense_graph(
    page, dashboard: Dashboard, graph_analysis: dict
) -> None:
    """A real model's pruned graph keeps tens of thousands of links: the drawing shows the
    strongest (a choice of how many), and a hovered node still shows every link of its own. The
    stored graph's links are repeated here, weights spread, to make one past the first choice."""
    links = graph_analysis["results"]["links"]
    dense = [{**link, "weight": link["weight"] * (1 + i)} for i in range(8) for link in links]
    assert len(dense) > 500

    def densified(route) -> None:
        response = route.fetch()
        body = response.json()
        body["results"]["links"] = dense
        route.fulfill(response=response, json=body)

    page.route(f"**/v1/analyses/{graph_analysis['id']}", densified)
    open_graph(page, dashboard, graph_analysis["id"])
    drawn = page.locator("#graph-view svg .gv-edges line")
    assert drawn.count() == len(dense)  # fewer than the default 1,000: all of them
    page.select_option("#gv-edges-shown", "250")
    assert drawn.count() == 250
    weights = sorted((abs(link["weight"]) for link in dense), reverse=True)
    widths = drawn.evaluate_all("els => els.map(e => Number(e.getAttribute('stroke-width')))")
    assert min(widths) == pytest.approx(0.4 + 2.8 * weights[249] / weights[0], abs=0.01)  # the strongest
    feature = strongest_feature(graph_analysis["results"])
    node(page, feature["id"]).hover()
    own = [link for link in dense if feature["id"] in (link["source"], link["target"])]
    assert page.locator("#graph-view svg line.gv-edge.hot").count() == len(own)


def test_graph_view_pins_survive_a_reload(page, dashboard: Dashboard, graph_analysis: dict) -> None:
    feature = strongest_feature(graph_analysis["results"])
    open_graph(page, dashboard, graph_analysis["id"])
    pinned = page.locator(".gv-pin-list li")
    assert pinned.count() == 0
    node(page, feature["id"]).click()
    page.click("#gv-pin")
    assert "pinned" in node(page, feature["id"]).get_attribute("class")
    assert page.get_attribute("#gv-pin", "aria-pressed") == "true"
    assert pinned.count() == 1 and pinned.first.get_attribute("data-node") == feature["id"]
    assert page.locator(f'#gv-test .gv-test-row[data-node="{feature["id"]}"]').count() == 1

    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert "pinned" in node(page, feature["id"]).get_attribute("class")
    assert pinned.count() == 1 and pinned.first.get_attribute("data-node") == feature["id"]
    assert page.get_by_role("button", name="Run").is_enabled()

    pinned.first.get_by_role("button", name="Unpin").click()
    assert pinned.count() == 0
    assert "pinned" not in node(page, feature["id"]).get_attribute("class")
    assert page.get_by_role("button", name="Run").is_disabled()  # nothing pinned, nothing to run
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert pinned.count() == 0 and "pinned" not in node(page, feature["id"]).get_attribute("class")


def test_graph_view_refuses_bad_input_and_shows_api_errors(
    page, dashboard: Dashboard, graph_analysis: dict
) -> None:
    """A strength out of the API's bounds is refused before any request; an error the API answers
    (here a 503 answered in its stead: no interactive worker) is said in the status line and the
    form is usable again."""
    feature = strongest_feature(graph_analysis["results"])
    open_graph(page, dashboard, graph_analysis["id"])
    node(page, feature["id"]).click()
    page.click("#gv-pin")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/graph/interventions" in r.url else None)
    page.fill(f'[id="gv-strength-{feature["id"]}"]', "20000")
    page.click("#gv-run")
    assert "Not run" in page.inner_text("#gv-test-status") and "10,000" in page.inner_text("#gv-test-status")
    assert requests == []

    error = {"error": {"code": "no_worker", "message": "no interactive worker is running", "details": {}}}
    page.route(
        "**/graph/interventions",
        lambda route: route.fulfill(status=503, content_type="application/json", json=error),
    )
    page.fill(f'[id="gv-strength-{feature["id"]}"]', "0")
    page.click("#gv-run")
    page.wait_for_selector("#gv-test-status.err")
    shown = page.inner_text("#gv-test-status")
    assert "no interactive worker is running" in shown and "503 no_worker" in shown
    assert page.locator("#gv-run").is_enabled() and len(requests) == 1


def test_graph_view_ablation_matches_the_api(page, dashboard: Dashboard, graph_analysis: dict) -> None:
    """Pin the most influential feature, run scale 0 from the page, and see the numbers a direct
    POST to the interventions endpoint answers (the same real model run, so equal up to float32)."""
    feature = strongest_feature(graph_analysis["results"])
    body = {"edits": [{"node": feature["id"], "scale": 0.0}], "top_k": 5, "max_new_tokens": 3}
    with dashboard.client() as http:
        direct = http.post(f"/v1/analyses/{graph_analysis['id']}/graph/interventions", json=body)
    assert direct.status_code == 200, direct.text
    expected = direct.json()

    open_graph(page, dashboard, graph_analysis["id"])
    node(page, feature["id"]).click()
    page.click("#gv-pin")
    page.fill("#gv-top-k", "5")
    page.fill("#gv-new-tokens", "3")
    held: list[Any] = []  # the page's request, held until the form is seen disabled, then sent on
    page.route("**/graph/interventions", lambda route: held.append(route))
    page.click("#gv-run")
    deadline = time.monotonic() + 60
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert held, "the page sent no intervention request"
    assert page.locator("#gv-run").is_disabled() and page.locator("#gv-top-k").is_disabled()
    assert page.locator(f'[id="gv-strength-{feature["id"]}"]').is_disabled()
    held[0].continue_()
    page.wait_for_selector("#gv-test-status.ok, #gv-test-status.err")
    assert page.locator("#gv-run").is_enabled()
    assert "Ran 1 edit" in page.inner_text("#gv-test-status"), page.inner_text("#gv-test-status")

    result = page.locator("#gv-result")

    def shown(field: str, within=result) -> list[float]:
        cells = within.locator(f'[data-field="{field}"]')
        return [float(v) for v in cells.evaluate_all("els => els.map(e => e.dataset.value)")]

    target = expected["target"]
    for field in ("logit_before", "logit_after", "prob_before", "prob_after"):
        assert shown(field) == pytest.approx([target[field]], rel=1e-4, abs=1e-5), field
    for side in ("before", "after"):
        table = result.locator(f'[data-field="top-{side}"]')
        items = expected[f"top_{side}"]
        assert shown("logit", table) == pytest.approx([t["logit"] for t in items], rel=1e-4, abs=1e-5)
        assert table.locator("tbody tr").count() == 5
    edit = expected["edits"][0]
    assert shown("activation_before") == pytest.approx([edit["activation_before"]], rel=1e-4, abs=1e-5)
    assert shown("activation_after") == pytest.approx([0.0], abs=1e-6)  # ablated
    conts = result.locator(".gv-conts .cont").all_inner_texts()
    assert conts == [expected["continuation_before"], expected["continuation_after"]]
    assert page.evaluate(UNLABELLED_CONTROLS) == []  # every control of the view and its panels is named
    result.scroll_into_view_if_needed()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / "test_graph_view-ablation.png"), full_page=True)


def test_graph_view_keeps_every_node_of_a_crowded_cell_clickable(
    page, dashboard: Dashboard, graph_analysis: dict
) -> None:
    """A real graph puts dozens of features on one (layer, position) of a 30-layer model, whose rows
    are a few pixels apart: each must still be the node a click on it selects (its column widens
    and scrolls instead). Here 40 features share block 1's first position, and the graph is given
    30 layers (an error node at layer 29) so its rows are as short as SmolLM2's."""
    base_node = strongest_feature(graph_analysis["results"])
    crowd = [
        {**base_node, "id": f"1_{900 + i}_0", "layer": 1, "position": 0, "latent": 900 + i, "influence": 0.01}
        for i in range(40)
    ]
    top_error = {**base_node, "id": "E29_0", "kind": "error", "layer": 29, "latent": None, "position": 0}

    def crowded(route) -> None:
        response = route.fetch()
        body = response.json()
        body["results"]["nodes"] = [*body["results"]["nodes"], *crowd, top_error]
        route.fulfill(response=response, json=body)

    page.route(f"**/v1/analyses/{graph_analysis['id']}", crowded)
    open_graph(page, dashboard, graph_analysis["id"])
    for member in crowd:
        node(page, member["id"]).click()
        assert page.locator(".gv-details h2").inner_text().startswith(f"L1 #{member['latent']} "), member[
            "id"
        ]
