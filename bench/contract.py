"""Schemathesis over the live service's whole OpenAPI document, with an API key.

Starts the real service (``kestrel up``: embedded Redis, its workers, the API under uvicorn) on free
ports with a temporary store and ``KESTREL_API_KEY`` set, makes real resources through the API (a
capture of the bundled SmolLM2, an SAE trained on it, its discovered features and a name, a saved
steering config, an upload), then runs ``schemathesis run`` against ``/openapi.json`` as served:

- every operation, every phase but the stateful one (examples, coverage, fuzzing), positive and
  negative data, ``--max-examples`` cases per operation in the fuzzing phase;
- path parameters take the real ids half of the time (schemathesis dictionaries), so the routes
  are exercised on artifacts that exist, not only on 404s; DELETE operations run last, in a second
  pass, so they cannot remove the resources the first pass uses;
- checks: ``not_a_server_error`` (no 5xx), ``status_code_conformance`` (only documented statuses),
  ``content_type_conformance`` and ``response_schema_conformance`` (no schema violations).

Prints one JSON object: operations and test cases run, the failures of each check (0 is the target
for all of them), and the time taken. Schemathesis's own reports (JUnit) land in ``--report-dir``.

    python bench/contract.py                 # about 10-20 minutes on 2 cores
    python bench/contract.py --max-examples 5 --keep   # quicker; keep the store and the reports
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "bench"))

import service_up  # noqa: E402
from service_up import wait_job  # noqa: E402

MODEL = "smollm2-135m"
LAYER = "model.layers.3"
API_KEY = "bench-contract-key"
SERVICE_SETTINGS = {
    "KESTREL_API_KEY": API_KEY,
    # operator caps keep each fuzzed request cheap on a CPU: generation and inline data bounded
    "KESTREL_MAX_NEW_TOKENS": "8",
    "KESTREL_MAX_TEXTS_PER_REQUEST": "32",
    "KESTREL_MAX_TEXT_CHARS": "2000",
    "KESTREL_INTERACTIVE_TIMEOUT_S": "20",
}
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
TEXTS = [
    "The committee approved new funding for the city library on Tuesday.",
    "Rain is expected across the north of the country by the weekend.",
    "She tuned the violin before the concert and played the first movement slowly.",
    "The compiler reports an error when a variable is used before it is assigned.",
    "Fresh bread, olives and cheese were laid out on the long wooden table.",
    "The spacecraft entered orbit after a journey of seven months.",
    "Shares rose sharply after the company reported record quarterly profits.",
    "The river flooded the valley, and the villagers moved their animals uphill.",
] * 4


def seed(http: httpx.Client) -> dict[str, list[str]]:
    """Real resources of every kind, made through the API: ``{path parameter: [ids]}``."""
    capture = http.post(
        "/v1/activations",
        json={"model": MODEL, "layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS}},
    )
    capture.raise_for_status()
    capture_job = wait_job(http, capture.json()["id"])
    run_id = capture_job["artifacts"]["run_id"]
    train = http.post(
        "/v1/saes",
        json={
            "run_id": run_id,
            "layer": LAYER,
            "sae": {"architecture": "topk", "n_latents": 128, "k": 8},
            "train": {"batch_size": 64, "epochs": 2},
        },
    )
    train.raise_for_status()
    train_job = wait_job(http, train.json()["id"])
    sae_id = train_job["artifacts"]["sae_id"]
    discover = http.post(f"/v1/saes/{sae_id}/features/discover", json={"run_id": run_id})
    discover.raise_for_status()
    wait_job(http, discover.json()["id"])
    http.put(f"/v1/saes/{sae_id}/concepts/0", json={"name": "bench concept"}).raise_for_status()
    steering = http.post(
        "/v1/steering",
        json={"name": "bench", "sae_id": sae_id, "edits": [{"latent": 0, "op": "scale", "value": 2.0}]},
    )
    steering.raise_for_status()
    upload = http.post(
        "/v1/uploads",
        files={"file": ("texts.txt", "\n".join(TEXTS[:8]).encode(), "text/plain")},
    )
    upload.raise_for_status()
    return {
        "run_id": [run_id],
        "sae_id": [sae_id],
        "job_id": [capture_job["id"], train_job["id"]],
        "config_id": [steering.json()["id"]],
        "upload_id": [upload.json()["id"]],
        "name": [MODEL],
        "latent": ["0", "1"],
    }


def write_config(path: Path, ids: dict[str, list[str]]) -> None:
    """A schemathesis.toml binding each path parameter to the real ids half of the time."""
    lines = ['headers = { "X-API-Key" = "' + API_KEY + '" }', ""]
    for name, values in ids.items():
        lines.append(f"[dictionaries.{name}]")
        lines.append("values = [" + ", ".join(json.dumps(v) for v in values) + "]")
        lines.append("")
    lines.append("[parameters]")
    for name in ids:
        lines.append(f'"path.{name}" = {{ dictionary = "{name}", probability = 0.5 }}')
    path.write_text("\n".join(lines) + "\n")


def run_schemathesis(
    base: str, config: Path, report: Path, max_examples: int, seed_value: int, only_delete: bool
) -> str:
    """One ``schemathesis run``; its output (the JUnit report is the record that is counted)."""
    argv = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(config),
        "run",
        f"{base}/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed_value),
        "--workers",
        "1",
        "--request-timeout",
        "120",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
        "--no-color",
        "--generation-database",
        "none",
        "--include-method" if only_delete else "--exclude-method",
        "DELETE",
    ]
    done = subprocess.run(argv, cwd=report.parent, capture_output=True, text=True, timeout=3600)
    output = done.stdout + done.stderr
    if not report.is_file():  # schemathesis itself failed (bad config, schema not loadable)
        raise RuntimeError(f"schemathesis exited {done.returncode} without a report:\n{output[-5000:]}")
    return output


# Schemathesis names each failure with a code (``schemathesis explain ST103``); which check it is.
FAILURE_CODES = {
    "ST101": "not_a_server_error",
    "ST102": "not_a_server_error",
    "ST103": "status_code_conformance",
    "ST104": "content_type_conformance",
    "ST105": "content_type_conformance",
    "ST106": "content_type_conformance",
    "ST108": "response_schema_conformance",
    "ST109": "response_schema_conformance",
    "ST110": "response_schema_conformance",
}


def count_junit(report: Path) -> dict[str, int]:
    """Operations, failures per check and errors, read from schemathesis's JUnit report."""
    root = ET.parse(report).getroot()
    counts = {"operations": 0, "operations_failed": 0, "errors": 0, "other_failures": 0}
    counts.update(dict.fromkeys(CHECKS.split(","), 0))
    for case in root.iter("testcase"):
        counts["operations"] += 1
        problems = [*case.iter("failure"), *case.iter("error")]
        counts["operations_failed"] += bool(problems)
        for problem in problems:
            if problem.tag == "error":
                counts["errors"] += 1
                continue
            codes = re.findall(r"^- (ST\d{3}) ", problem.text or "", flags=re.MULTILINE)
            for code in codes:
                check = FAILURE_CODES.get(code)
                counts[check if check else "other_failures"] += 1
            if not codes:
                counts["other_failures"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the store and the reports")
    parser.add_argument("--report-dir", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kestrel-contract-"))
    report_dir = args.report_dir or work / "reports"
    report_dir.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    service_up.link_warm_models(store)
    service = service_up.start(store, work / "up.log", **SERVICE_SETTINGS)
    base = service.base
    started = time.monotonic()
    try:
        with httpx.Client(base_url=base, timeout=300, headers={"X-API-Key": API_KEY}) as http:
            ids = seed(http)
        seeded_s = time.monotonic() - started
        config = work / "schemathesis.toml"
        write_config(config, ids)
        totals: dict[str, int] = {}
        outputs = []
        for only_delete in (False, True):
            report = report_dir / ("delete.xml" if only_delete else "main.xml")
            output = run_schemathesis(base, config, report, args.max_examples, args.seed, only_delete)
            outputs.append(output)
            for key, value in count_junit(report).items():
                totals[key] = totals.get(key, 0) + value
        summary_line = next(
            (line for line in reversed(outputs[0].splitlines()) if "passed" in line or "failed" in line), ""
        )
        up_alive = service.process.poll() is None
        result = {
            "bench": "contract",
            "spec": f"{base}/openapi.json (live, X-API-Key set)",
            "checks": CHECKS.split(","),
            "max_examples": args.max_examples,
            "seed": args.seed,
            **totals,
            "server_errors": totals.get("not_a_server_error", 0),
            "schema_violations": totals.get("response_schema_conformance", 0),
            "undocumented_statuses": totals.get("status_code_conformance", 0),
            "service_still_up": up_alive,
            "schemathesis_summary": summary_line.strip(" =-"),
            "seed_s": round(seeded_s, 1),
            "seconds": round(time.monotonic() - started, 1),
            "reports": str(report_dir),
        }
        print(json.dumps(result, indent=2))
        if any(result[k] for k in ("server_errors", "schema_violations", "undocumented_statuses")):
            for output in outputs:
                sys.stderr.write(output[-20000:])
    finally:
        service_up.stop(service)
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
