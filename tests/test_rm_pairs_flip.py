"""`benchmarks/rm_pairs.py --flip`: a noisy annotator's label flips on preference pairs."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from rm_pairs import flip_pairs  # noqa: E402


def test_flip_pairs_swaps_at_the_rate_and_is_seeded():
    pairs = [{"prompt": str(i), "chosen": f"r{i}", "rejected": f"w{i}"} for i in range(4000)]
    out, n = flip_pairs(pairs, 0.2, seed=0)
    swapped = [x["chosen"].startswith("w") for x in out]
    assert n == sum(swapped) and 0.18 < n / len(pairs) < 0.22
    assert all({x["chosen"], x["rejected"]} == {p["chosen"], p["rejected"]} and x["prompt"] == p["prompt"]
               for x, p in zip(out, pairs))
    assert flip_pairs(pairs, 0.2, seed=0) == (out, n) and flip_pairs(pairs, 0.2, seed=1)[0] != out
    assert flip_pairs(pairs, 0.0, seed=0) == (pairs, 0)
    assert flip_pairs(pairs, 1.0, seed=0)[1] == len(pairs)
