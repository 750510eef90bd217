"""outrider: RL post-training of language-model reasoners and agents, with exploration, reward and credit
assignment as named, composable, tested pieces.

The Python API (`outrider.api`, imported on first use so that ``import outrider`` stays light)::

    import outrider
    summary = outrider.train("quickstart", out="runs/nb", overrides=["train.steps=20"])
    rows = outrider.load_metrics("runs/nb")
"""

from pathlib import Path as _Path

from transformers.utils import logging as _hf_logging

_hf_logging.disable_progress_bar()  # checkpoint saves should not print shard bars into our progress display

__version__ = "0.1.0"  # the package's version (pyproject.toml reads it from here)
RECIPES_DIR = _Path(__file__).resolve().parent / "recipes"  # the shipped recipes: package data (recipes/ links here)

_API = ("load_recipe", "train", "load_metrics", "load_summary")
__all__ = ["RECIPES_DIR", "__version__", *_API]


def __getattr__(name: str):  # PEP 562: the API's functions, imported when first used
    if name in _API:
        from outrider import api

        return getattr(api, name)
    raise AttributeError(f"module 'outrider' has no attribute {name!r}")
