"""A real-English corpus that needs no download: paragraphs of the docstrings installed here.

Benchmarks need natural text, and the machine has no network; the standard library and the
installed scientific packages carry a few hundred thousand tokens of prose in their docstrings.
The order is deterministic, so two runs measure the same texts.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings
from collections.abc import Iterator

SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
}
EXTRA_PACKAGES = ("numpy", "torch", "transformers", "pydantic", "datasets")


def _objects(module) -> Iterator[object]:
    yield module
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        yield obj
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if not attr.startswith("_"):
                    yield getattr(obj, attr, None)


def _paragraphs(doc: str) -> Iterator[str]:
    for para in re.split(r"\n\s*\n", doc):
        text = " ".join(para.split())
        if len(text) >= 120 and not text.startswith((">>>", "...", ":", "..")) and text.count("|") < 3:
            yield text


def _module_names() -> list[str]:
    names = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in SKIP)
    return names + list(EXTRA_PACKAGES)


def docstring_corpus(max_docs: int | None = None, min_chars: int = 120) -> list[str]:
    """Unique docstring paragraphs of the standard library and a few installed packages."""
    seen: dict[str, None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in _module_names():
            try:
                module = importlib.import_module(module_name)
            except Exception:
                continue
            for obj in _objects(module):
                try:
                    doc = inspect.getdoc(obj)
                except Exception:
                    continue
                for para in _paragraphs(doc or ""):
                    if len(para) >= min_chars:
                        seen.setdefault(para, None)
                if max_docs is not None and len(seen) >= max_docs:
                    return list(seen)[:max_docs]
    return list(seen)


if __name__ == "__main__":
    docs = docstring_corpus()
    print(len(docs), "paragraphs,", sum(len(d) for d in docs) // 4, "tokens (approx.)")
