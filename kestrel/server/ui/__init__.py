"""The dashboard: HTML pages at ``/ui``, each a client of the ``/v1`` API.

The pages hold no data: they are shells that load plain ES modules, and the modules fetch ``/v1``
with the API key the user typed (kept in ``sessionStorage``). Serving the shells without a key is
therefore safe, and the dashboard can never do anything a client of the API cannot.
"""

from kestrel.server.ui.routes import router

__all__ = ["router"]
