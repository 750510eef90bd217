"""The Python API: the README's example runs as written; recipes from dicts, paths and names; one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import outrider
from conftest import tiny_recipe
from outrider.errors import OutriderError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```\n<!-- /api-example -->", README.read_text(), re.S)
    assert block, "README.md has no api-example block"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md:api-example", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    summary = outrider.load_summary(tmp_path / "runs" / "notebook")
    assert printed[0] == f"{summary['eval_start']['pass@1']} -> {summary['eval_end']['pass@1']}"
    assert summary["steps"] == 5
    rewards = eval(printed[1])  # noqa: S307  (the list the example printed)
    assert len(rewards) == 5
    rows = outrider.load_metrics(tmp_path / "runs" / "notebook")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[-1]["eval/pass@1"] == summary["eval_end"]["pass@1"]


def test_load_recipe_from_a_dict_a_name_or_a_recipe(tmp_path):
    from_dict = outrider.load_recipe(tiny_recipe(), overrides=["train.steps=7"])
    assert from_dict.train.steps == 7
    assert outrider.load_recipe(from_dict, overrides=["update.lr=1e-2"]).update.lr == 1e-2
    assert from_dict.update.lr == 1e-3  # the given recipe is not changed
    assert outrider.load_recipe("quickstart").task["dataset"] == "spell_backward"
    with pytest.raises(OutriderError, match=r"explore\.temperature"):
        outrider.load_recipe(tiny_recipe(), overrides=["explore.temperature=-1"])
    with pytest.raises(OutriderError, match="expected a dict, a path or a recipe name"):
        outrider.load_recipe(3)


def test_train_refuses_a_directory_that_holds_something(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(OutriderError, match="already exists and is not empty"):
        outrider.train(tiny_recipe(), out=tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    with pytest.raises(OutriderError, match="has no summary.json"):
        outrider.load_summary(tmp_path)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        outrider.trian  # noqa: B018
