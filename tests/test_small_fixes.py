"""The smaller findings of issue 33: each was silent or misleading before."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from conftest import call_main, learner_terms, write_recipe
from outrider.errors import OutriderError
from outrider.recipe import load_recipe
from test_recipe_cli import assert_main_error


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from outrider.trainer import Trainer

    root = tmp_path_factory.mktemp("small")
    Trainer(load_recipe(write_recipe(root, train={"steps": 2})), root / "run", quiet=True).run()
    return root / "run"


def test_sft_refuses_a_non_empty_out(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep")
    code, out, err = call_main(monkeypatch, capsys, "sft", str(recipe), "--out", str(notes), "--steps", "1")
    assert_main_error(code, out, err, f"--out: '{notes}' is not empty; choose another directory or use --overwrite")
    code, out, err = call_main(monkeypatch, capsys, "sft", str(recipe), "--out", str(notes), "--overwrite")
    assert_main_error(code, out, err, f"--overwrite: '{notes}' holds no model (no config.json); refusing")
    assert (notes / "todo.txt").read_text() == "keep"
    model = tmp_path / "model"
    for _ in range(2):  # the second time a model is there: --overwrite replaces it
        code, out, err = call_main(monkeypatch, capsys, "sft", str(recipe), "--out", str(model), "--steps", "1",
                                   "--overwrite")
        assert code == 0, err
    assert (model / "config.json").exists() and not list(tmp_path.glob(".model*"))


def test_resume_without_a_checkpoint_says_it_starts_over(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_recipe(run, "recipe.yaml", train={"steps": 1})
    code, out, err = call_main(monkeypatch, capsys, "train", "--resume", "--out", str(run), "--quiet")
    assert code == 0, err
    assert f"warning: --resume: no checkpoint in {run / 'checkpoints'} (the run stopped before its first one); " \
           "starting it over from step 0" in err


def test_unknown_nested_option_lists_its_own_options(tmp_path):
    with pytest.raises(OutriderError) as e:
        load_recipe(write_recipe(tmp_path), ["explore.turn_cap.foo=1"])
    assert str(e.value) == "explore.turn_cap.foo: unknown option; valid: start, increment, every"


@pytest.mark.parametrize("value", ["yes", "on", "true"])
def test_a_yaml_boolean_is_not_a_temperature(tmp_path, value):
    path = write_recipe(tmp_path)
    path.write_text(path.read_text().replace("max_new_tokens: 4", f"max_new_tokens: 4\n  temperature: {value}"))
    with pytest.raises(OutriderError, match=r"^explore.temperature: "):
        load_recipe(path)
    # a boolean field still reads "yes" as true (pydantic's own parsing): `observe.tensorboard` adds TensorBoard
    assert [t.name for t in load_recipe(write_recipe(tmp_path), ["observe.tensorboard=yes"]).observe.report_to] == [
        "tensorboard"]


def test_duplicate_sections_are_refused(tmp_path):
    path = write_recipe(tmp_path)
    lines = path.read_text().splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("train:")) + 1
    path.write_text(path.read_text() + "train: {steps: 5}\n")
    with pytest.raises(OutriderError) as e:
        load_recipe(path)
    assert str(e.value) == (f"{path}:{len(lines) + 1}: not valid YAML ('train' is given twice in one mapping (lines "
                            f"{first} and {len(lines) + 1}))")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": null, "answer": "1"}', '"prompt" must be a string (got null)'),
    ('{"prompt": "1+1=", "answer": {"a": 2}}', '"answer" must be a string or a number (got {"a": 2})'),
    ('{"prompt": "1+1=", "answer": true}', '"answer" must be a string or a number (got true)'),
    ('{"prompt": ["1+1="], "answer": "2"}', '"prompt" must be a string (got ["1+1="])')])
def test_jsonl_fields_must_be_text(tmp_path, line, message):
    from outrider.envs.jsonl_task import read_jsonl

    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "2+2=", "answer": 4}\n' + line + "\n")
    with pytest.raises(OutriderError) as e:
        read_jsonl(str(path))
    assert str(e.value) == f"{path}:2: {message}"
    path.write_text('{"prompt": "2+2=", "answer": 4}\n')
    assert read_jsonl(str(path)) == [{"question": "2+2=", "answer": "4"}]


def test_set_a_template_in_braces(tmp_path):
    rec = load_recipe(write_recipe(tmp_path), ["task.template={metadata[expression]}", "task.eval_size=8"])
    assert rec.task["template"] == "{metadata[expression]}"
    assert load_recipe(write_recipe(tmp_path), ["task.template={question}"]).task["template"] == "{question}"
    assert load_recipe(write_recipe(tmp_path), ["task.config={min_terms: 2}"]).task["config"] == {"min_terms": 2}


@pytest.mark.parametrize("temperature", ["-1", "nan", "inf"])
def test_eval_temperature_must_be_non_negative(finished_run, monkeypatch, capsys, temperature):
    code, out, err = call_main(monkeypatch, capsys, "eval", str(finished_run), "--temperature", temperature)
    assert_main_error(code, out, err, "--temperature: must be >= 0 (0: greedy; got ")


def test_report_metrics_must_be_logged_and_the_report_goes_into_the_run(finished_run, tmp_path, monkeypatch,
                                                                         capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    monkeypatch.chdir(tmp_path)
    code, out, err = call_main(monkeypatch, capsys, "report", str(run), "--metrics", "eval/pass@1,policy/entropyy")
    assert_main_error(code, out, err, "--metrics: no run logged 'policy/entropyy'; did you mean policy/entropy")
    code, out, err = call_main(monkeypatch, capsys, "report", str(run))
    assert code == 0, err
    assert (run / "report.html").exists() and (run / "summary.json").exists() and not (tmp_path / "report").exists()
    code, out, err = call_main(monkeypatch, capsys, "report", str(run), str(run))
    assert_main_error(code, out, err, "report: with several RUN_DIRs, say where the report goes with --out")


def test_more_minibatches_than_rows_is_said(capsys):
    from test_learner import small_batch

    from outrider.policy.model import Policy
    from outrider.update import LOSSES
    from outrider.update.learner import UpdateConfig, learner_step

    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    cfg = UpdateConfig(minibatches=6)
    terms = learner_terms(LOSSES.build({"name": "ppo"}), cfg)
    learner_step(policy, torch.optim.AdamW(policy.parameters()), small_batch(policy), terms, cfg, 1.0,
                 torch.Generator().manual_seed(0), 8)
    assert "warning: update.minibatches=6, but a step's batch has 4 rows: it is split into 4 minibatches of one " \
           "instead (set update.minibatches <= 4)" in capsys.readouterr().err


def test_checkpoint_files_follow_the_umask(finished_run):
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in (finished_run / "checkpoints").rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_resume_mismatch_names_the_field(finished_run, tmp_path, monkeypatch, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    other = write_recipe(tmp_path, "other.yaml", train={"steps": 2}, update={"lr": 0.5})
    code, out, err = call_main(monkeypatch, capsys, "train", str(other), "--out", str(run), "--resume")
    assert_main_error(code, out, err, f"--resume: the recipe differs from {run / 'recipe.yaml'} at update.lr (saved "
                                      "0.001, given 0.5); only train.steps may change")
    code, out, err = call_main(monkeypatch, capsys, "train", "--resume", "--out", str(run), "--set", "update.lr=0.5",
                               "--set", "train.seed=3")
    assert_main_error(code, out, err, "at update.lr (saved 0.001, given 0.5) and 1 more key(s);")
