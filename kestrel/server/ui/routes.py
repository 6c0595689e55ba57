"""Routes of the dashboard: one HTML shell per page and the static files they load.

No build step: templates are Jinja2, scripts are hand-written ES modules and a stylesheet, served
from this package as they are. Nothing here reads the store or Redis; ids in paths are validated
like the API's and only ever handed to the page's script.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from kestrel import __version__
from kestrel.server.deps import AnalysisId, Latent, SaeId
from kestrel.server.errors import ApiError

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# A plain file name (no separator, no dot-dot), so a request can never reach outside the directory.
STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(js|css|svg)$")
STATIC_CACHE = "no-cache"  # revalidate each time: a new release must never run stale modules

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _page(request: Request, template: str, title: str, **context: object) -> HTMLResponse:
    """Render a shell; ``base`` is the root path of the API, so the scripts work behind a prefix."""
    base = request.scope.get("root_path", "").rstrip("/")
    html = templates.get_template(template).render(title=title, base=base, version=__version__, **context)
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


@router.get("", response_class=HTMLResponse)
def overview(request: Request) -> HTMLResponse:
    """Models and layers, capture runs, SAEs with their metrics, recent jobs (live)."""
    return _page(request, "overview.html", "Overview", page="overview")


@router.get("/", response_class=RedirectResponse)
def overview_slash(request: Request) -> RedirectResponse:
    return RedirectResponse(request.url_for("overview").path)


@router.get("/saes/{sae_id}", response_class=HTMLResponse)
def sae_page(request: Request, sae_id: SaeId) -> HTMLResponse:
    """Training curves, the evaluation table and the latent-density histogram of one SAE."""
    return _page(request, "sae.html", sae_id, page="sae", sae_id=sae_id)


@router.get("/saes/{sae_id}/features", response_class=HTMLResponse)
def feature_browser(request: Request, sae_id: SaeId) -> HTMLResponse:
    """Search an SAE's latents by name, label or index."""
    return _page(request, "features.html", f"Features of {sae_id}", page="features", sae_id=sae_id)


@router.get("/saes/{sae_id}/features/{latent}", response_class=HTMLResponse)
def feature_page(request: Request, sae_id: SaeId, latent: Latent) -> HTMLResponse:
    """One latent: contexts with shaded tokens, bins, histogram, logit effects, its editable name."""
    title = f"Latent {latent} of {sae_id}"
    return _page(request, "feature.html", title, page="feature", sae_id=sae_id, latent=latent)


@router.get("/steering", response_class=HTMLResponse)
def steering_playground(request: Request) -> HTMLResponse:
    """Pick latents, move sliders, compare default and steered generations; save configs by id."""
    return _page(request, "steering.html", "Steering playground", page="steering")


@router.get("/analyses/{analysis_id}", response_class=HTMLResponse)
def analysis_page(request: Request, analysis_id: AnalysisId) -> HTMLResponse:
    """An analysis: its key numbers, its report rendered from Markdown, the JSON and Markdown."""
    title = f"Analysis {analysis_id}"
    return _page(request, "analysis.html", title, page="analysis", analysis_id=analysis_id)


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request) -> HTMLResponse:
    """Several SAEs' ledgers side by side, with an L0-vs-FVU scatter marking the Pareto front."""
    return _page(request, "compare.html", "Compare SAEs", page="compare")


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    path = STATIC_DIR / name
    if not STATIC_NAME.fullmatch(name) or not path.is_file():
        raise ApiError(404, f"no dashboard file {name!r}", code="not_found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": STATIC_CACHE})
