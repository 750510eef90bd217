"""Run directories as the CLI touches them: replacing a finished run only once the new one has started, checking
that `--out` can be written before anything runs, and telling the user where an interrupted run stopped."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from typing import TYPE_CHECKING

from outrider.checkpoint import list_checkpoints
from outrider.errors import OutriderError

if TYPE_CHECKING:
    from outrider.policy.model import Policy


def check_writable(out_dir: Path, option: str = "--out") -> None:
    """Refuse, with one line, an output directory that cannot be created or written: one under a file, or in a
    directory without write permission (a read-only disk). A full disk shows only when writing."""
    path = out_dir.absolute()
    if path.exists() and not path.is_dir():
        raise OutriderError(f"{option}: '{out_dir}' is a file, not a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutriderError(f"{option}: '{out_dir}' is under '{parent}', which is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutriderError(f"{option}: cannot write in '{parent}' (read-only or no permission); choose another "
                            f"{option}")


class ReplacedRun:
    """A run directory that ``--overwrite`` replaces: moved aside (renamed next to it) before the new run writes
    anything, deleted once the new run has started (`drop`), or put back if it fails or is interrupted before that
    (`restore`). A kill -9 in between leaves it as ``.NAME.replaced-PID`` beside the new one."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.aside: Path | None = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
        run_dir.rename(self.aside)

    def drop(self) -> None:
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def restore(self) -> bool:
        """Put the previous run back (the new run's files are removed); False once it was dropped."""
        if self.aside is None:
            return False
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.aside.rename(self.run_dir)
        self.aside = None
        return True


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT until the block ends (a Ctrl-C that arrives meanwhile is raised again, through the handler that
    was in place, right after it), so that what the block writes and the counters an interrupt message reads change
    together. A handler, not a signal mask: the kernel hands a process-wide signal to any thread that does not block
    it (torch's threads included). Outside the main thread the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def report_interrupt(out_dir: Path, completed: int, total: int, replaced: ReplacedRun | None) -> int:
    """Say on stderr where an interrupted `train` stopped and how to go on; return the exit code (130, as a shell
    reports SIGINT). Nothing already written is touched: checkpoints and metrics are complete files."""
    if replaced is not None and replaced.restore():
        print(f"interrupted before the new run started; the previous run in {out_dir} is restored", file=sys.stderr)
        return 130
    newest = list_checkpoints(out_dir)
    where = (f"newest checkpoint: {newest[-1]} (a resume continues from there)" if newest else
             "no checkpoint yet (a resume starts over)")
    print(f"interrupted after step {completed} of {total}; {where}", file=sys.stderr)
    if (out_dir / "recipe.yaml").exists():
        print(f"resume with: outrider train --resume --out {shlex.quote(str(out_dir))}", file=sys.stderr)
    return 130


def save_model_dir(policy: "Policy", out_dir: Path) -> None:
    """Save a model into `out_dir` whole or not at all: written next to it first, then renamed into place (a
    model already there is replaced only then)."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        policy.save(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = ReplacedRun(out_dir) if out_dir.exists() else None
    tmp.rename(out_dir)
    if old is not None:
        old.drop()
