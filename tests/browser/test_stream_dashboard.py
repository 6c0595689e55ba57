"""A stream training job on the overview: one row per SAE under the job's row, with its live step,
FVU and L0 from the job's metrics, a small FVU-by-step curve built from the points the page saw,
and, once the job has published its SAEs, a link to each SAE's page (which draws the whole history).

The jobs are submitted over HTTP to the live stack after the page is open, so the page follows them
as a user would (the list's refresh finds them, their streams update them). Waits poll with
deadlines, and no assertion depends on how fast a job runs: the live figures are read from a job
far longer than the wait (one of its SAEs stopped from its row, then the job cancelled, once the
page has drawn them), the links from a short job that is awaited to the end.
"""

from __future__ import annotations

import json

import pytest
from browser_stack import OUTPUT, Dashboard
from service_stack import wait_for_job, wait_until

pytestmark = pytest.mark.timeout(420)

TOPICS = ["rivers and lakes", "a chess match", "baking bread", "old maps"]
TEXTS = [
    f"Document {i} is about {topic}, and it keeps going about {topic} for a while. " * 6
    for i, topic in enumerate(TOPICS * 50)
]
LONG_DOCS = 10_000  # an uploaded dataset at a point a step: many minutes, cancelled after the check
SAES = [
    {"layer": "model.layers.0", "sae": {"architecture": "topk", "n_latents": 64, "k": 4}},
    {"layer": "model.layers.1", "sae": {"architecture": "topk", "n_latents": 96, "k": 8}},
]
TRAIN = {"batch_size": 8, "log_every": 1}


def number_in(cell) -> bool:
    """A figure cell shows a number (the dashboard writes '–' for none)."""
    text = cell.inner_text().strip()
    return bool(text) and text != "–"


def long_dataset(dashboard: Dashboard) -> dict:
    """An uploaded JSONL dataset of LONG_DOCS documents (inline texts are capped per request)."""
    lines = "".join(json.dumps({"text": TEXTS[i % len(TEXTS)]}) + "\n" for i in range(LONG_DOCS))
    with dashboard.client() as http:
        uploaded = http.post("/v1/uploads", files={"file": ("long.jsonl", lines.encode(), "text/plain")})
    assert uploaded.status_code == 201, uploaded.text
    return {"kind": "upload", "upload_id": uploaded.json()["id"], "text_field": "text"}


def submit(dashboard: Dashboard, dataset: dict) -> tuple[str, list[str]]:
    """A stream training of the two SAEs over ``dataset``: its job id and SAE ids."""
    body = {"model": "tiny-llama", "dataset": dataset, "saes": [{**s, "train": TRAIN} for s in SAES]}
    with dashboard.client() as http:
        accepted = http.post("/v1/saes", json=body)
    assert accepted.status_code == 202, accepted.text
    sae_ids = accepted.json()["artifacts"]["sae_ids"]
    assert len(sae_ids) == 2
    return accepted.json()["id"], sae_ids


def sae_rows(page, job_id: str, sae_ids: list[str]) -> dict:
    """The rows the overview lists under the job, one per SAE (the list's refresh finds the job)."""
    detail = page.locator(f"tr[data-detail-of='{job_id}']")
    detail.wait_for()
    rows = {sae_id: detail.locator(f"tr[data-sae-id='{sae_id}']") for sae_id in sae_ids}
    for row in rows.values():
        row.wait_for()
    return rows


def test_stream_job_lists_each_sae_with_live_figures_curve_and_link(page, dashboard: Dashboard) -> None:
    page.goto(f"{dashboard.url}/ui")
    page.wait_for_selector("body[data-ready]")
    live_job, live_ids = submit(dashboard, long_dataset(dashboard))
    live_rows = sae_rows(page, live_job, live_ids)

    # While it runs: each SAE shows its step and FVU, and its curve grows from the points seen.
    def live_curves() -> bool:
        return all(row.locator("svg path.line").count() == 1 for row in live_rows.values())

    wait_until(live_curves, 240, "a live FVU curve for each SAE")
    for row in live_rows.values():
        assert "/" in row.locator("td[data-figure=step]").inner_text()  # step / total steps
        assert number_in(row.locator("td[data-figure=fvu]")) and number_in(row.locator("td[data-figure=l0]"))
    # Stop one SAE from its row: the job goes on training the other, and says which one stopped.
    stopped_id = live_ids[0]
    live_rows[stopped_id].get_by_role("button", name=f"Stop SAE {stopped_id}").click()
    page.locator("#jobs-status", has_text=f"Stop requested for {stopped_id}").wait_for()
    with dashboard.client() as http:

        def told_stopped() -> bool:
            job = http.get(f"/v1/jobs/{live_job}").json()
            told = any(f"{stopped_id} cancelled" in line for line in job["log"])
            return told and job["status"] == "started"

        wait_until(told_stopped, 120, f"the job to stop {stopped_id} alone")
        assert http.post(f"/v1/jobs/{live_job}/cancel").status_code == 202  # started: stops at its next step
        wait_for_job(http, live_job, ("canceled",), timeout_s=120)

    job_id, sae_ids = submit(dashboard, {"kind": "texts", "texts": TEXTS})
    rows = sae_rows(page, job_id, sae_ids)
    with dashboard.client() as http:
        wait_for_job(http, job_id, timeout_s=300)
    # Once published, each SAE links to its page, with its layer, and keeps its figures.
    for sae_id, request in zip(sae_ids, SAES, strict=True):
        link = rows[sae_id].locator(f"a[href$='/ui/saes/{sae_id}']")
        link.wait_for()
        assert request["layer"] in rows[sae_id].inner_text()
        assert number_in(rows[sae_id].locator("td[data-figure=fvu]"))
        assert number_in(rows[sae_id].locator("td[data-figure=step]"))
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / "stream_job_on_the_overview.png"), full_page=True)
    rows[sae_ids[0]].locator("a").first.click()
    page.wait_for_selector("body[data-ready]")
    assert sae_ids[0] in page.url
    page.locator("#curves svg path.line").first.wait_for()  # the published history's curves
