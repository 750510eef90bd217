"""outrider: RL post-training of language-model reasoners and agents, with exploration, reward and credit
assignment as named, composable, tested pieces."""

from pathlib import Path as _Path

from transformers.utils import logging as _hf_logging

_hf_logging.disable_progress_bar()  # checkpoint saves should not print shard bars into our progress display

__version__ = "0.1.0"  # the package's version (pyproject.toml reads it from here)
RECIPES_DIR = _Path(__file__).resolve().parent / "recipes"  # the shipped recipes: package data (recipes/ links here)
