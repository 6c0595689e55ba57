"""Build helpers for the images: ``python -m kestrel.deploy api-requirements`` prints the slim API
image's requirements, Kestrel's dependencies less the engine's.

Both lists live in pyproject.toml (``[project] dependencies`` and ``[tool.kestrel]
engine-only-dependencies``), so a version is written once. Standard library only: the Dockerfile
runs this in a bare virtual environment, before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Scikit_Learn`` == ``scikit-learn``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot read a distribution name from {requirement!r}")
    return normalized(match.group(1))


def api_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """``[project] dependencies`` without the engine-only ones, as written (with their versions)."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    excluded = {normalized(name) for name in data["tool"]["kestrel"]["engine-only-dependencies"]}
    dependencies = data["project"]["dependencies"]
    unknown = excluded - {requirement_name(r) for r in dependencies}
    if unknown:  # a typo would silently keep a heavy dependency in the API image
        raise ValueError(f"engine-only-dependencies not among the dependencies: {sorted(unknown)}")
    return [r for r in dependencies if requirement_name(r) not in excluded]


def main(argv: list[str]) -> int:
    if argv != ["api-requirements"]:
        print("usage: python -m kestrel.deploy api-requirements", file=sys.stderr)
        return 2
    print("\n".join(api_requirements()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
