"""Checkpoints: `from_pretrained`-loadable model + tokenizer, plus optimiser, RNG and step state.

Each one is written to a temporary directory and renamed into place, so a kill at any moment leaves either the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from outrider.policy.model import Policy

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
    policy.save(tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        **extra,
    }
    torch.save(state, tmp / STATE_FILE)
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


def load_state(checkpoint: Path) -> dict[str, Any]:
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state
