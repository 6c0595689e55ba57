"""The exported OpenAPI document: ``openapi/openapi.json``, what SDKs are generated from.

``python -m kestrel.server.openapi`` (or ``kestrel openapi``, ``make openapi``) writes it; a unit
test rebuilds it in memory and fails when the committed file has drifted from the app. The
document depends on the code only: it is built from an app with default settings (the
environment is ignored), and written with sorted keys, so the same code always gives the same
bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SPEC_PATH = REPO / "openapi" / "openapi.json"


def build_spec() -> dict[str, Any]:
    """The app's OpenAPI document. Building the app opens no connection (Redis is lazy)."""
    from kestrel.server.app import create_app
    from kestrel.settings import Settings

    # model_construct: the defaults, never the environment (an operator's limits are not the spec)
    return create_app(Settings.model_construct()).openapi()


def render(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(path: Path = SPEC_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(build_spec()), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else SPEC_PATH
    print(f"wrote {write(target)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
