"""Answer matching shared by tasks (their verifiers) and score components: one definition of "equal"."""

from __future__ import annotations

import math


def numeric_equal(a: str, b: str, rel_tol: float = 1e-6) -> bool:
    """True when both parse as numbers within `rel_tol` (commas and surrounding spaces ignored)."""
    try:
        x, y = float(a.replace(",", "").strip()), float(b.replace(",", "").strip())
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=rel_tol)
