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
    from kestrel.workers import jobs

    module, _, name = path.rpartition(".")
    assert module == jobs.__name__
    function = getattr(jobs, name)
    assert callable(function)
    assert f"{function.__module__}.{function.__name__}" == path  # what RQ records for a function
