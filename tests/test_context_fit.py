"""Prompts longer than the model's context: refused at start with the numbers when none fits, a warning when some
do not, and a warning when a step trains nothing."""

from __future__ import annotations

import json

import yaml

from conftest import call_main, tiny_recipe
from test_recipe_cli import assert_main_error


def _jsonl(path, prompts: list[str]) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
    return str(path)


def _recipe(tmp_path, train: list[str], max_positions: int = 32):
    task = {"name": "jsonl", "path": _jsonl(tmp_path / "train.jsonl", train),
            "eval_path": _jsonl(tmp_path / "eval.jsonl", ["1+0="]), "eval_size": 1}
    recipe = tiny_recipe(policy={"max_positions": max_positions, "warm_start": {"steps": 0}}, train={"steps": 1},
                         observe={"eval_prompts": 1, "pass_at": [1]})
    recipe["task"] = task
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_no_prompt_fits_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    recipe = _recipe(tmp_path, ["x" * 40, "y" * 50])
    code, out, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(tmp_path / "run"))
    assert_main_error(code, out, err, "task: no prompt fits: 8 of 8 sampled train prompts are 41-51 tokens long; "
                                      "with explore.max_new_tokens=4 they exceed the model's 32-token context, so no "
                                      "episode could act.")
    assert not (tmp_path / "run").exists()


def test_some_prompts_too_long_is_a_warning(tmp_path, monkeypatch, capsys):
    recipe = _recipe(tmp_path, ["1+1=", "z" * 40])
    code, out, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(tmp_path / "run"), "--quiet")
    assert code == 0, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert " sampled train prompts are 41 tokens long; with explore.max_new_tokens=4 they exceed the model's " \
           "32-token context: those episodes end before acting and train nothing" in line


def test_a_step_without_an_action_token_is_reported_once(tmp_path, monkeypatch, capsys):
    import outrider.trainer

    monkeypatch.setattr(outrider.trainer, "check_prompts_fit", lambda *a: None)
    recipe = _recipe(tmp_path, ["x" * 40])
    code, out, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(tmp_path / "run"), "--quiet",
                               "--set", "train.steps=2")
    assert code == 0, err
    assert [ln for ln in err.splitlines() if ln.startswith("warning:")] == [
        "warning: step 1 trained nothing: no episode made an action token (context_full_frac 1.00); said once"]
