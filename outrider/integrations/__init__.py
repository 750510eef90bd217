"""Bridges to the engines users run at scale: outrider's pieces inside TRL (`outrider.integrations.trl`) and verl
(`outrider.integrations.verl`). Each module imports its engine lazily and names its extra when it is missing; see
docs/integrations.md for the configs."""

from __future__ import annotations

from typing import Any

from outrider.errors import OutriderError


def require(module: str, extra: str) -> Any:
    """Import MODULE, or fail with one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OutriderError(f"{module} is not installed ({e.msg}); install the extra: pip install "
                            f"'outrider[{extra}]'") from None
