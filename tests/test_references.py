"""docs/references.md lists exactly the papers cited as [N] in the code, the docs and the recipes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))

from gen_references import cited_in, citations, listed  # noqa: E402


def test_every_citation_resolves_and_every_listed_paper_is_cited():
    where, titles = citations(), listed()
    assert not set(where) - set(titles), {n: where[n] for n in set(where) - set(titles)}
    assert not set(titles) - set(where), sorted(set(titles) - set(where))
    assert all(titles.values())


def test_what_counts_as_a_citation():
    assert cited_in("as [153] shows; [2, 3] and ([19])") == {153, 2, 3, 19}
    assert cited_in("x[0], a CI 26 [10, 59], `pass_at: [1, 4, 16]`, ``[0, 1]``, see [link](x) [9](y)") == set()
