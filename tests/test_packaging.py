"""The installed package works without the source tree: the recipes are package data, found by name; --version."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

import outrider
from conftest import call_main
from outrider import RECIPES_DIR
from outrider.errors import OutriderError
from outrider.recipe import find_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _package_data() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]


def test_every_shipped_recipe_is_package_data_and_the_repository_links_to_it():
    package_dir = Path(outrider.__file__).resolve().parent
    assert RECIPES_DIR.parent == package_dir and (RECIPES_DIR / "quickstart.yaml").is_file()
    globs = _package_data()["outrider"]
    files = sorted(p.relative_to(package_dir).as_posix() for p in RECIPES_DIR.rglob("*") if p.is_file())
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)
    # one source of truth: the repository's recipes/ (make demo, docs, tests) is a link to the package data
    assert (ROOT / "recipes").is_symlink() and (ROOT / "recipes").resolve() == RECIPES_DIR


def test_version_is_the_packages(monkeypatch, capsys):
    code, out, _ = call_main(monkeypatch, capsys, "--version")
    assert (code, out.strip()) == (0, f"outrider {outrider.__version__}")
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "outrider.__version__"}


def test_a_shipped_recipe_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_recipe("quickstart") == RECIPES_DIR / "quickstart.yaml"
    assert find_recipe("quickstart.yaml") == RECIPES_DIR / "quickstart.yaml"
    assert load_recipe("quickstart", ["train.steps=3"]).train.steps == 3
    (tmp_path / "quickstart.yaml").write_text("task: {name: multisol}\n")  # a file of that name comes first
    assert find_recipe("quickstart.yaml") == Path("quickstart.yaml")
    with pytest.raises(OutriderError, match=r"no such file 'quikstart' \(shipped recipes, by name: .*quickstart"):
        find_recipe("quikstart")
    with pytest.raises(OutriderError, match=r"no such file 'sub/quickstart'"):
        find_recipe("sub/quickstart")  # a path is a path, never a shipped name


def test_recipes_lists_the_shipped_recipes_outside_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = call_main(monkeypatch, capsys, "recipes")
    assert code == 0 and "quickstart" in out and "grpo_multisol" in out
