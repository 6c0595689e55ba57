"""Browser fixtures: a live Kestrel stack holding a trained 4,608-latent SAE, and Debian's chromium
driven by Playwright (never `playwright install`: the browser is the system's).

The stack is the service tests' (``tests/service/service_stack.py`` and the fixtures of
``tests/service/conftest.py``, imported, not copied): real Redis, real workers, the API under
uvicorn, on the tiny local Llama so the SAE trains and its features are discovered in seconds.
Every test saves a screenshot to ``test-output/browser/<test>.png`` when it ends.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SERVICE_TESTS = Path(__file__).resolve().parents[1] / "service"
sys.path.insert(0, str(SERVICE_TESTS))

from browser_stack import (  # noqa: E402
    API_KEY,
    CHROMIUM_ARGS,
    OUTPUT,
    Dashboard,
    chromium_path,
    run_neuron_analysis,
    train_sae_with_features,
)
from service_stack import DASHBOARD_DB, FULL_WORKERS, Stack, full_stack  # noqa: E402


def _load_service_fixtures() -> Any:
    """tests/service/conftest.py as a module, so its fixtures are this directory's too."""
    spec = importlib.util.spec_from_file_location("service_fixtures", SERVICE_TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_service = _load_service_fixtures()
redis_server = _service.redis_server
warm_model_cache = _service.warm_model_cache
local_models = _service.local_models


@pytest.fixture(scope="session")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip(
            "no chromium at /usr/bin/chromium: `make test` installs Debian's (apt-get install chromium)"
        )
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the playwright package is missing: `make install` installs the dev extras")
    return path


@pytest.fixture(scope="session")
def dashboard(
    chromium: str,
    redis_server,
    warm_model_cache: Path,
    local_models: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Dashboard]:
    """The shared stack (interactive, generate and batch workers, the API, no key) with its SAE."""
    url = f"redis://127.0.0.1:{redis_server.port}/{DASHBOARD_DB}"  # not the contract tests' database
    stack = full_stack(url, tmp_path_factory.mktemp("dashboard"), warm_model_cache, local_models)
    try:
        stack.start_api()
        stack.wait_ready(FULL_WORKERS)
        with stack.client() as http:
            run_id, sae_id = train_sae_with_features(http)
        yield Dashboard(stack, run_id, sae_id)
    finally:
        stack.stop_all()


@pytest.fixture(scope="session")
def neuron_analysis(dashboard: Dashboard) -> dict[str, Any]:
    """The finished job of a neuron analysis of the dashboard's run (``artifacts.analysis_id``)."""
    with dashboard.client() as http:
        return run_neuron_analysis(http, dashboard.run_id)


@pytest.fixture(scope="session")
def keyed_dashboard(dashboard: Dashboard, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """A second API process over the same Redis and store, with an API key set (reads need no worker)."""
    logs = tmp_path_factory.mktemp("keyed")
    stack = Stack(
        dashboard.stack.redis_url,
        dashboard.stack.store_root,
        logs,
        {**dashboard.stack.extra_env, "KESTREL_API_KEY": API_KEY},
    )
    try:
        stack.start_api()
        yield Dashboard(stack, dashboard.run_id, dashboard.sae_id)
    finally:
        stack.stop_all()


@pytest.fixture(scope="session")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context and page; its screenshot is saved when the test ends, pass or fail."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)  # a busy machine slows chromium too; a wait ends when it can
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"
