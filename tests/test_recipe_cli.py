"""Recipes and the command line, as a user meets them.

A real process spends ~8 s importing torch and transformers on this machine, so only three run as real
processes (`outrider` and `python -m outrider.cli`, started together by the `cli` fixture); every other case calls
`outrider.cli.main` in-process with the same arguments and checks its exit code and stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import (assert_user_error, call_main, read_jsonl, run_cli_many, snapshot, tiny_recipe,
                      write_recipe)
from outrider.cli import RECIPES_DIR
from outrider.credit import CREDIT
from outrider.envs import ENVS
from outrider.errors import OutriderError
from outrider.explore import EXPLORE
from outrider.loops import LOOPS
from outrider.recipe import apply_overrides, load_recipe, parse_recipe, resolve
from outrider.score import SCORE
from outrider.update import ENTROPY, LOSSES, TERMS

REGISTRIES = {r.family: r for r in (ENVS, EXPLORE, SCORE, CREDIT, LOSSES, ENTROPY, TERMS, LOOPS)}


def make_existing_run(directory: Path) -> Path:
    """A run directory with a valid recipe.yaml and some files whose bytes must survive refused commands."""
    directory.mkdir(parents=True)
    write_recipe(directory, "recipe.yaml")
    (directory / "metrics.jsonl").write_text('{"step": 0, "eval/pass@1": 0.25}\n')
    (directory / "checkpoints" / "step_2").mkdir(parents=True)
    (directory / "checkpoints" / "step_2" / "trainer_state.pt").write_bytes(bytes(range(256)))
    return directory


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """The real processes of this module (name -> CompletedProcess), started together."""
    root = tmp_path_factory.mktemp("cli")
    write_recipe(root, "bad_key.yaml", bogus_section={"x": 1})
    write_recipe(root, "bad_name.yaml", credit={"name": "nope"})
    write_recipe(root, "good.yaml", train={"steps": 2})
    calls = {
        "bad_key": (["train", "bad_key.yaml", "--out", "runs/bad"], True),  # python -m outrider.cli
        "bad_name": (["train", "bad_name.yaml", "--out", "runs/bad"], False),  # the outrider script
        "train": (["train", "good.yaml", "--out", "runs/set", "--set", "update.lr=1e-4", "--quiet"], False),
    }
    results = run_cli_many(calls, root)
    results["root"] = root
    return results


@pytest.mark.slow  # shares the `cli` fixture: three real processes, ~25 s together
def test_unknown_top_level_key_as_a_process(cli):
    assert_user_error(cli["bad_key"], "bogus_section: unknown option; valid: plugins, task, policy, explore, score, "
                                      "credit, update, observe, train, loop")


@pytest.mark.slow  # shares the `cli` fixture: three real processes, ~25 s together
def test_unknown_registry_name_as_a_process(cli):
    line = assert_user_error(cli["bad_name"], "credit: unknown credit 'nope'; valid: ")
    assert line.split("valid: ")[1].split(", ") == CREDIT.names()
    assert not (cli["root"] / "runs" / "bad").exists()


@pytest.mark.slow  # shares the `cli` fixture: three real processes, ~25 s together
def test_set_override_is_applied_and_recorded(cli):
    result = cli["train"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    run = cli["root"] / "runs" / "set"
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["update"]["lr"] == 1e-4 and tiny_recipe()["update"]["lr"] != 1e-4
    assert saved["train"]["steps"] == 2
    # recipe.yaml is the resolved recipe: piece defaults are filled in
    assert saved["credit"] == {"name": "grpo", "std_normalize": True, "epsilon": 1e-6}
    assert [row["step"] for row in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["eval_end"]) >= {"pass@1", "pass@2", "accuracy"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0", "step_2"]
    assert "pass@1" in result.stdout and "(2 steps" in result.stdout


@pytest.mark.slow  # shares the `cli` fixture: three real processes, ~25 s together
def test_eval_prints_pass_at_k_json(cli, monkeypatch, capsys):
    code, out, err = call_main(monkeypatch, capsys, "eval", str(cli["root"] / "runs" / "set"), "--samples", "2",
                               "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["checkpoint"] == "step_2"
    assert set(result) == {"checkpoint", "pass@1", "pass@2", "accuracy", "invalid_rate", "response_length",
                           "entropy_mean", "entropy_p80", "entropy_p95", "forking_frac", "distinct_answers",
                           "distinct_correct", "answer_entropy", "repeat_rate", "zero_variance_frac",
                           "effective_rank"}
    assert 1 <= result["distinct_answers"] <= 2 and 0 < result["entropy_mean"]
    assert 0 <= result["pass@1"] <= result["pass@2"] <= 1
    assert result["pass@1"] == pytest.approx(result["accuracy"])
    assert 0 < result["response_length"] <= tiny_recipe()["explore"]["max_new_tokens"]


def test_recipes_json_lists_every_family_and_shipped_recipe(monkeypatch, capsys):
    code, out, err = call_main(monkeypatch, capsys, "recipes", "--json")
    assert code == 0, err
    listing = json.loads(out)
    assert set(listing["pieces"]) == set(REGISTRIES)
    for family, registry in REGISTRIES.items():
        assert sorted(listing["pieces"][family]) == registry.names(), family
    assert listing["pieces"]["credit"]["grpo"]["options"]["std_normalize"]["default"] is True
    assert listing["pieces"]["score"]["overlong"]["options"]["buffer"]["description"]
    shipped = sorted(str(p) for p in RECIPES_DIR.glob("*.yaml"))
    assert sorted(listing["recipes"]) == shipped
    assert any(Path(p).name == "quickstart.yaml" for p in listing["recipes"])


# ---------------------------------------------------------------- in-process checks of the same entry point


def assert_main_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, (code, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


THE_FOUR = {
    "malformed_yaml": (None, ["recipe.yaml:2: not valid YAML"]),
    "unknown_top_level_key": ({"bogus_section": 1}, ["bogus_section: unknown option; valid: plugins, task, policy, "
                                                     "explore, score, credit, update, observe, train, loop"]),
    "unknown_piece_option": ({"credit": {"name": "grpo", "bogus": 1}},
                             ["credit.bogus: unknown option; valid: std_normalize, epsilon"]),
    "unknown_registry_name": ({"credit": {"name": "nope"}},
                              ["credit: unknown credit 'nope'; valid: arena, canon, dr_grpo, empg, gae, gigpo, grpo, "
                               "ppl_position, prime, reinforce_pp, reinforce_pp_baseline, riskpo, rloo, salt"]),
}


@pytest.mark.parametrize("case", list(THE_FOUR))
def test_recipe_mistakes_exit_2_with_one_line(tmp_path, monkeypatch, capsys, case):
    override, fragments = THE_FOUR[case]
    if override is None:
        path = tmp_path / "recipe.yaml"
        path.write_text("task: {name: reasoning_gym\npolicy: [1, 2\n")
    else:
        path = write_recipe(tmp_path, **override)
    code, out, err = call_main(monkeypatch, capsys, "train", str(path), "--out", str(tmp_path / "run"))
    assert_main_error(code, out, err, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [
    ["train", "{good}", "--out", "{run}"],  # refused: already holds a run
    ["train", "{bad_dataset}", "--out", "{run}", "--overwrite"],  # bad dataset is found when the task is built
    ["train", "{bad_option}", "--out", "{run}", "--overwrite"],
    ["train", "--resume", "--out", "{run}", "--set", "credit.bogus=1"],
    ["train", "{good}", "--out", "{run}", "--resume", "--set", "update.lr=0.5"],  # differs from the saved recipe
], ids=["refused", "bad_dataset_overwrite", "bad_option_overwrite", "bad_set_resume", "different_resume"])
def test_existing_run_is_untouched_by_refused_commands(tmp_path, monkeypatch, capsys, argv):
    run = make_existing_run(tmp_path / "run")
    before = snapshot(run)
    paths = {"good": write_recipe(tmp_path, "good.yaml"), "run": run,
             "bad_dataset": write_recipe(tmp_path, "bad_dataset.yaml", task={"dataset": "chain_summ"}),
             "bad_option": write_recipe(tmp_path, "bad_option.yaml", credit={"name": "grpo", "bogus": 1})}
    code, out, err = call_main(monkeypatch, capsys, *[a.format(**paths) for a in argv])
    assert_main_error(code, out, err)
    assert snapshot(run) == before
    if argv[-1] == "{run}":
        assert "already holds a run; use --resume to continue it or --overwrite to replace it" in err


@pytest.mark.parametrize("override,fragments", [
    ({"train": {"steps": -1}}, ["train.steps: Input should be greater than or equal to 0"]),
    ({"policy": {"warm_start": {"bogus": 1}}}, ["policy.warm_start.bogus: unknown option; valid: steps, batch_size"]),
    ({"update": {"kl": {"estimator": "k9"}}}, ["update.kl.estimator", "k1", "k3"]),
    ({"update": {"loss": "nope"}}, ["update.loss: unknown update.loss 'nope'; valid: clip_cov, gspo, kl_cov, none, ppo"]),
    ({"explore": "nope"}, ["explore: unknown explore 'nope'; valid: ", "dynamic", "go_explore", "group", "reflect_retry"]),
    ({"score": [{"weight": 1.0}]}, ["score[0]: missing 'name'; valid: exact_match"]),
    ({"score": [{"name": "format"}]}, ["score[0].pattern: Field required"]),
    ({"score": []}, ["score: at least one reward component is needed"]),
    ({"observe": {"pass_at": [1, 4]}}, ["observe.pass_at: k=4 exceeds observe.eval_samples=2"]),
    ({"observe": {"pass_at": []}}, ["observe.pass_at: needs at least one k"]),
    ({"task": {"name": "nope"}}, ["task: unknown task 'nope'; valid: ", "jsonl", "minigrid", "reasoning_gym"]),
    ({"update": {"kl": {"estimator": "k1", "coef": 0.1}}}, ["update.kl: ", "k1 has zero expected gradient"]),
    ({"update": {"betas": [0.9, 1.0]}}, ["update.betas: ", "must each be in [0, 1)"]),
    ({"policy": {"hidden": 100, "heads": 3}}, ["policy: ", "hidden=100 must be a multiple of heads=3"]),
    ({"policy": {"hidden": 36, "heads": 4}}, ["policy: ", "even head size"]),
    ({"train": {"device": "gpu"}}, ["train.device: ", "unknown device 'gpu'; valid: cpu, cuda"]),
])
def test_recipe_errors_are_one_line(tmp_path, monkeypatch, capsys, override, fragments):
    path = write_recipe(tmp_path, **override)
    code, out, err = call_main(monkeypatch, capsys, "train", str(path), "--out", str(tmp_path / "run"))
    assert_main_error(code, out, err, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,fragments", [
    (["--set", "update.lr"], ["--set 'update.lr': expected KEY.PATH=VALUE"]),
    (["--set", "train.steps.x=1"], ["--set train.steps.x: 'train.steps' is 3, which has no 'x'"]),
    (["--set", "score.3.weight=1"], ["--set score.3.weight: '3' is not an index of a list of 1"]),
    (["--set", "update.nope=1"], ["update.nope: unknown option; valid: loss, aggregation"]),
    (["--set", "explore.temperature=hot"], ["explore.temperature: Input should be a valid number"]),
])
def test_bad_overrides_are_one_line(tmp_path, monkeypatch, capsys, argv, fragments):
    path = write_recipe(tmp_path)
    code, out, err = call_main(monkeypatch, capsys, "train", str(path), "--out", str(tmp_path / "run"), *argv)
    assert_main_error(code, out, err, *fragments)


def test_missing_recipe_and_usage_errors(tmp_path, monkeypatch, capsys):
    code, out, err = call_main(monkeypatch, capsys, "train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path))
    assert_main_error(code, out, err, "recipe: no such file")
    code, out, err = call_main(monkeypatch, capsys, "train", "--out", str(tmp_path / "x"))
    assert_main_error(code, out, err, "train: a RECIPE is needed")
    code, out, err = call_main(monkeypatch, capsys, "train", "--resume", "--out", str(tmp_path / "x"))
    assert_main_error(code, out, err, "--resume:", "has no recipe.yaml")
    code, out, err = call_main(monkeypatch, capsys, "eval", str(tmp_path))
    assert_main_error(code, out, err, "is not a run directory (no recipe.yaml)")
    # click usage errors (unknown option, missing argument): exit code 2, a usage message, no traceback
    code, out, err = call_main(monkeypatch, capsys, "train", "--bogus")
    assert code == 2 and "No such option: --bogus" in err and "Traceback" not in out + err
    code, out, err = call_main(monkeypatch, capsys, "eval")
    assert code == 2 and "Missing argument" in err and "Traceback" not in out + err


def test_out_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    code, out, err = call_main(monkeypatch, capsys, "train", str(path), "--out", str(tmp_path / "afile"))
    assert_main_error(code, out, err, "is a file, not a run directory")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path, train={"steps": 2})
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("do not delete")
    code, out, err = call_main(monkeypatch, capsys, "train", str(path), "--out", str(precious), "--overwrite")
    assert_main_error(code, out, err, "is not an outrider run directory", "refusing to delete it")
    assert (precious / "chapter1.tex").read_text() == "do not delete"


def test_overwrite_replaces_and_resume_rules(tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path, train={"steps": 2})
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(path.read_text())
    (run / "stale.txt").write_text("old run")
    code, out, err = call_main(monkeypatch, capsys, "train", str(path), "--out", str(run), "--overwrite", "--quiet")
    assert code == 0, err
    assert not (run / "stale.txt").exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2]
    # --resume with a recipe that differs beyond train.steps is refused
    other = write_recipe(tmp_path, "other.yaml", train={"steps": 2}, update={"lr": 0.5})
    code, out, err = call_main(monkeypatch, capsys, "train", str(other), "--out", str(run), "--resume")
    assert_main_error(code, out, err, "--resume: the recipe differs from", "only train.steps may change")
    # --resume without a recipe takes --set against the saved recipe: train two more steps
    code, out, err = call_main(monkeypatch, capsys, "train", "--resume", "--out", str(run), "--set", "train.steps=4",
                               "--quiet")
    assert code == 0, err
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["steps"] == 4
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    # resuming a finished run trains nothing and leaves its final checkpoint's bytes alone
    final = run / "checkpoints" / "step_4"
    before = snapshot(final)
    code, out, err = call_main(monkeypatch, capsys, "train", "--resume", "--out", str(run), "--quiet")
    assert code == 0, err
    assert snapshot(final) == before and [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    # eval option checks
    code, out, err = call_main(monkeypatch, capsys, "eval", str(run), "--samples", "0")
    assert_main_error(code, out, err, "--samples: must be at least 1")
    code, out, err = call_main(monkeypatch, capsys, "eval", str(run), "--checkpoint", "step_99")
    assert_main_error(code, out, err, "eval: no checkpoint step_99 in")
    code, out, err = call_main(monkeypatch, capsys, "eval", str(run), "--checkpoint", "step_2", "--samples", "2",
                               "--prompts", "3", "--temperature", "0", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["checkpoint"] == "step_2" and set(result) >= {"pass@1", "pass@2"}
    assert result["pass@1"] == result["pass@2"]  # greedy: both samples are the same


def test_sft_saves_a_loadable_model(tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path)
    code, out, err = call_main(monkeypatch, capsys, "sft", str(path), "--out", str(tmp_path / "sft"), "--steps", "3")
    assert code == 0, err
    out = " ".join(out.split())  # rich wraps long lines
    assert out.startswith("saved ") and "(3 steps, final loss" in out
    from outrider.policy.model import Policy

    policy = Policy.load(tmp_path / "sft")
    assert policy.model.config.hidden_size == 32 and policy.decode(policy.encode("1 + 2 =")) == "1 + 2 ="


def test_sft_uses_the_recipes_thread_count(tmp_path, monkeypatch, capsys):
    import torch

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    path = write_recipe(tmp_path)
    code, _, err = call_main(monkeypatch, capsys, "sft", str(path), "--out", str(tmp_path / "sft"), "--steps", "1",
                             "--set", "train.threads=1")
    assert code == 0, err
    assert threads == [1]


# ---------------------------------------------------------------- recipe module


def test_overrides_parse_yaml_values_and_name_shorthands():
    data = tiny_recipe(credit="grpo")
    apply_overrides(data, ["update.lr=1e-4", "credit.std_normalize=false", "observe.pass_at=[1]",
                           "score.0.weight=2e-1", "train.threads=2", "update.loss.clip_high=0.28"])
    assert data["update"]["lr"] == 1e-4  # a float, although YAML 1.1 alone reads "1e-4" as a string
    assert data["credit"] == {"name": "grpo", "std_normalize": False}
    assert data["observe"]["pass_at"] == [1] and data["score"][0]["weight"] == 0.2
    assert data["update"]["loss"] == {"name": "ppo", "clip_high": 0.28}  # the default piece, given an option
    rec = parse_recipe(data)
    assert rec.update.lr == 1e-4 and rec.train.threads == 2
    assert resolve(rec)["update"]["loss"]["clip_high"] == 0.28
    # a piece section the recipe leaves out entirely
    data = tiny_recipe()
    del data["explore"], data["credit"]
    apply_overrides(data, ["explore.temperature=0.5", "credit.epsilon=1e-3"])
    resolved = resolve(parse_recipe(data))
    assert resolved["explore"]["name"] == "group" and resolved["explore"]["temperature"] == 0.5
    assert resolved["credit"]["name"] == "grpo" and resolved["credit"]["epsilon"] == 1e-3


def test_exponent_without_a_dot_is_a_number_in_a_recipe_file(tmp_path):
    path = write_recipe(tmp_path, score=[])
    path.write_text(path.read_text().replace("score: []", "score:\n- {name: verifier, weight: 1e-1}"))
    assert "weight: 1e-1" in path.read_text()
    assert resolve(load_recipe(path))["score"][0]["weight"] == pytest.approx(0.1)


def test_resolve_fills_every_piece_default():
    resolved = resolve(parse_recipe(tiny_recipe()))
    assert resolved["explore"]["name"] == "group" and resolved["explore"]["top_p"] == 1.0
    assert resolved["update"]["loss"] == {"name": "ppo", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": None}
    assert resolved["update"]["entropy"] == {"name": "none"}
    assert resolved["score"] == [{"name": "verifier", "on_error": 0.0, "on_nonfinite": 0.0, "max_failed_steps": None,
                                  "weight": 1.0}]
    assert resolved["task"]["answer_format"] == "plain"
    # resolving is idempotent: a run's recipe.yaml loads back to the same thing
    assert resolve(parse_recipe(resolved)) == resolved


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(OutriderError, match=r"expected a mapping of sections"):
        load_recipe(path, ["train.steps=2"])


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    resolve(load_recipe(path))
