"""Write docs/references.md: every paper cited as ``[N]`` in outrider's docstrings and comments, the docs, the
README and the recipes' comments, titled from the project's paper index (``../shared/reference/papers.txt``).

    python docs/gen_references.py [PAPERS_TXT]

`tests/test_references.py` checks that the file lists exactly the papers cited.
"""

from __future__ import annotations

import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# [153], [2, 3], (see [19]): after a space, a parenthesis or a line start, not after a number ("26 [10, 59]" is
# an interval); code spans are skipped ("`[1, 4, 16]`")
CITE = re.compile(r"(?:^|(?<=[\s(]))(?<![\d%] )\[(\d{1,3}(?:, \d{1,3})*)\](?!\()", re.M)
CODE = re.compile(r"```.*?```|``.*?``|`[^`\n]*`", re.S)


def cited_in(text: str) -> set[int]:
    return {int(n) for m in CITE.finditer(CODE.sub("", text)) for n in m.group(1).split(", ")}


def citations(root: Path = ROOT) -> dict[int, set[str]]:
    """Paper number -> the files that cite it."""
    where: dict[int, set[str]] = {}

    def add(numbers: set[int], path: Path) -> None:
        for n in numbers:
            where.setdefault(n, set()).add(str(path.relative_to(root)))

    for path in sorted((root / "outrider").rglob("*.py")):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type in (tokenize.STRING, tokenize.COMMENT):
                add(cited_in(tok.string), path)
    for path in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        if path.name != "references.md":
            add(cited_in(path.read_text()), path)
    for path in sorted((root / "recipes").glob("*.yaml")):
        add(cited_in("\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)), path)
    return where


def listed(root: Path = ROOT) -> dict[int, str]:
    """The numbers and titles docs/references.md lists."""
    text = (root / "docs" / "references.md").read_text()
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^- \*\*\[(\d+)\]\*\* (.*)$", text, re.M)}


def main(papers_txt: str) -> None:
    titles = {int(m.group(1)): m.group(2).strip() for m in
              re.finditer(r"^\[(\d+)\] (.*?)\s+\(seeds: [0-9,]+\)\s*$", Path(papers_txt).read_text(), re.M)}
    where = citations()
    missing = sorted(set(where) - set(titles))
    if missing:
        sys.exit(f"cited but not in {papers_txt}: {missing}")
    lines = ["# References", "",
             "Every paper outrider's code, docs and recipes cite as `[N]`, numbered as in the project's paper index.",
             "Regenerate with `python docs/gen_references.py PATH/TO/papers.txt`.", ""]
    lines += [f"- **[{n}]** {titles[n]}" for n in sorted(where)]
    (ROOT / "docs" / "references.md").write_text("\n".join(lines) + "\n")
    print(f"{len(where)} papers cited")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT.parent / "shared" / "reference" / "papers.txt"))
