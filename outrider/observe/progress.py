"""Progress bars (rich, on stderr) per phase (warm start, evaluation, RL) with the latest loss/reward/accuracy in
the description. A phase started while another is shown (an evaluation during RL) is a line of its own under the
same display, and so is slow work counted by `outrider.activity.work_item` (TextWorld games being generated).
Quiet runs, and library calls outside any phase, show nothing."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from outrider.activity import SHOWN as _SHOWN  # the display being shown (rich allows one live display at a time)


class RunProgress:
    def __init__(self, total_steps: int, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    @contextmanager
    def phase(self, name: str, total: int, start: int = 0) -> Iterator[Callable[..., None]]:
        """A bar for `total` units of work; yields ``advance(n=1, **fields)`` (fields shown as ``key=value``)."""
        if self.quiet or total == 0:
            yield lambda *_, **__: None
            return
        if _SHOWN:  # inside another phase: a line of its own under that phase's bar, gone when done
            bar = _SHOWN[-1]
            task = bar.add_task(name, total=total, completed=start, info="")
            try:
                yield _advancer(bar, task)
            finally:
                bar.remove_task(task)
            return
        columns = [TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        with Progress(*columns, console=self.console) as bar:
            task = bar.add_task(name, total=total, completed=start, info="")
            _SHOWN.append(bar)
            try:
                yield _advancer(bar, task)
            finally:
                _SHOWN.remove(bar)


def _advancer(bar: Progress, task: int) -> Callable[..., None]:
    def advance(n: int = 1, **fields: float | None) -> None:
        info = " ".join(f"{k}={v:.3f}" for k, v in fields.items() if v is not None)
        bar.update(task, advance=n, info=info)

    return advance

