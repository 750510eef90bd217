"""Checkpoints: `from_pretrained`-loadable model + tokenizer, plus optimiser, RNG and step state.

Each one is written to a temporary directory and renamed into place, so a kill at any moment leaves either the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from outrider.errors import OutriderError
from outrider.policy.model import Policy

T = TypeVar("T")

STATE_FILE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(run_dir: Path, step: int, policy: Policy, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], keep: int) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        **extra,
    }
    try:
        policy.save(tmp)
        torch.save(state, tmp / STATE_FILE)
    except Exception as e:  # noqa: BLE001  (a full disk fails as OSError, SafetensorError or torch's RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        done = list_checkpoints(run_dir)
        raise OutriderError(f"checkpoint: writing {final} failed ({_brief(e)}; {shutil.disk_usage(root).free} bytes "
                            f"free there); newest complete checkpoint: {done[-1].name if done else 'none'}. Free "
                            f"space and resume with: outrider train --resume --out {run_dir}") from None
    if final.exists():
        # move the old one aside first: a kill between these renames still leaves a complete step_N (.old_*)
        # that the next save clears, and never a half-deleted step_N
        aside = root / f".old_step_{step}"
        if aside.exists():
            shutil.rmtree(aside)
        final.rename(aside)
        tmp.rename(final)
        shutil.rmtree(aside)
    else:
        tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints, oldest first (temporary directories of an interrupted save are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and
             (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (optimiser, RNG states, step, summary, pieces), without applying it."""
    return torch.load(checkpoint / STATE_FILE, weights_only=False)


def restore_rng(state: dict[str, Any]) -> None:
    """Put the torch, numpy and Python RNGs where the checkpoint's run left them."""
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])


def newest_intact(checkpoints: list[Path], load: Callable[[Path], T], using: str) -> tuple[Path, T]:
    """``(checkpoint, load(checkpoint))`` for the newest checkpoint `load` can read, newest first. A checkpoint
    that fails (truncated weights or trainer state, a broken config, a missing tokenizer) is skipped with one line
    on stderr naming it and the checkpoint used instead (`using`: e.g. "resuming from"); none readable is an
    OutriderError naming each one's problem."""
    problems = []
    for checkpoint in reversed(checkpoints):
        try:
            value = load(checkpoint)
        except Exception as e:  # noqa: BLE001  (any unreadable file: the next older checkpoint is tried)
            problems.append((checkpoint, _brief(e)))
            continue
        for skipped, problem in problems:
            print(f"warning: skipped {skipped}, which is unreadable ({problem}); {using} {checkpoint.name}",
                  file=sys.stderr)
        return checkpoint, value
    raise OutriderError("no readable checkpoint in " + str(checkpoints[0].parent) + ": " +
                        "; ".join(f"{c.name}: {p}" for c, p in problems))


def _brief(e: Exception) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:160]}" if not isinstance(e, OutriderError) else first[:200]
