"""The readable side of an analysis: a Markdown report and its PNG plots.

Plots are drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg canvas directly, never
through ``pyplot``: pyplot keeps a global registry of open figures and a process-wide backend, and
a worker that runs analyses for days must neither leak figures nor change what another library in
the same process sees. A figure here is local, rendered to PNG bytes, and dropped.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PLOT_DPI = 110


def new_figure(width: float = 8.0, height: float = 4.5) -> Figure:
    """A figure with its own Agg canvas (no pyplot, no global state)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    return buffer.getvalue()


@dataclass
class Plot:
    name: str  # file name without ``.png``: [a-z0-9_-]
    caption: str
    png: bytes


@dataclass
class Report:
    """What every report says, in this order: what was measured, on what, the key numbers, the
    details, the plots, and how to read them."""

    title: str
    measured: str
    source: list[tuple[str, Any]]
    key_numbers: list[tuple[str, Any]]
    sections: list[tuple[str, str]] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_plot(self, name: str, caption: str, figure: Figure) -> None:
        self.plots.append(Plot(name, caption, png_bytes(figure)))

    def markdown(self) -> str:
        parts = [f"# {self.title}", "", "## What was measured", "", self.measured, ""]
        parts += ["## Source", "", table(["", "value"], self.source), ""]
        parts += ["## Key numbers", "", table(["", "value"], self.key_numbers), ""]
        for heading, body in self.sections:
            parts += [f"## {heading}", "", body.rstrip(), ""]
        if self.plots:
            parts += ["## Plots", ""]
            for plot in self.plots:
                parts += [f"![{plot.caption}](plots/{plot.name}.png)", "", f"*{plot.caption}*", ""]
        if self.notes:
            parts += ["## How to read it", ""] + [f"- {note}" for note in self.notes] + [""]
        return "\n".join(parts)


def fmt(value: Any) -> str:
    """A number as a person reads it: 4 significant digits, integers with separators."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def escape_cell(text: str) -> str:
    """Markdown table cells: pipes and newlines would break the row."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("`", "'")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(escape_cell(fmt(cell)) for cell in row) + " |")
    return "\n".join(lines)
