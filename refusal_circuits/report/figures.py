"""The report's figures: each drawn once, inlined in the page as SVG and saved as ``figures/NAME.svg``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_circuits import viz
from refusal_circuits.io import write_text
from refusal_circuits.markup import esc


class Figures:
    """Collects figures: inline SVG for the page, and the same figure saved as ``figures/NAME.svg``."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []

    def add(self, name: str, fig: Any, caption: str) -> str:
        """The ``<figure>`` of ``fig`` (a matplotlib figure, closed here) with its caption, after writing its file."""
        document = viz.svg_document(fig)  # rendered once: the file and the page show the same drawing
        write_text(self.dir / f"{name}.svg", document)
        svg = document[document.index("<svg"):]
        self.names.append(name)
        return (f"<figure id='fig-{esc(name)}' data-figure='{esc(name)}'>{svg}<figcaption>{esc(caption)} "
                f"<span class='muted'>(figures/{esc(name)}.svg)</span></figcaption></figure>")
