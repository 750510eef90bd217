"""A rich progress bar per phase (warm start, RL) with the latest loss/reward/accuracy in the description."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    def __init__(self, total_steps: int, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    @contextmanager
    def phase(self, name: str, total: int, start: int = 0) -> Iterator[Callable[..., None]]:
        if self.quiet or total == 0:
            yield lambda **_: None
            return
        columns = [TextColumn(f"[bold]{name}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        with Progress(*columns, console=self.console) as bar:
            task = bar.add_task(name, total=total, completed=start, info="")

            def advance(**fields: float | None) -> None:
                info = " ".join(f"{k}={v:.3f}" for k, v in fields.items() if v is not None)
                bar.update(task, advance=1, info=info)

            yield advance
