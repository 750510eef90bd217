"""Slow work that should be visible while it happens (a TextWorld game being generated takes seconds), reported by
any module without knowing how it is shown: ``with work_item("TextWorld games generated"): ...``. The progress
display (`outrider.observe.progress`) puts the display it is showing here; with none shown (quiet runs, library
calls outside a run), nothing is shown. Neutral, so envs and policies may use it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

SHOWN: list[Any] = []  # rich Progress displays being shown, innermost last (`outrider.observe.progress`)


@contextmanager
def work_item(label: str) -> Iterator[None]:
    """Count one item of slow work on a line ``label`` under the progress display being shown (the line appears
    with the first item and stays until that display ends)."""
    if not SHOWN:
        yield
        return
    bar = SHOWN[-1]
    task = next((t.id for t in bar.tasks if t.description == label), None)
    if task is None:
        task = bar.add_task(label, total=None, info="")
    try:
        yield
    finally:
        bar.update(task, advance=1)
