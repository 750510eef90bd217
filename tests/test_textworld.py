"""TextWorld adapter [Côté et al. 2018]: generated Coin Collector games, walkthroughs that win, invalid marking,
determinism, snapshot/restore by replay, disjoint train/eval games, and an `outrider train` run end to end."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("textworld", reason="textworld not installed (pip install 'outrider[agents]')")

import yaml  # noqa: E402
from conftest import read_jsonl, run_cli, tiny_recipe  # noqa: E402
from outrider.envs import ENVS  # noqa: E402
from outrider.envs.time_limit import EnvTimeout, TimeLimit  # noqa: E402
from outrider.errors import OutriderError  # noqa: E402

SECTION = {"name": "textworld", "challenge": "coin_collector", "level": 3, "train_games": 2, "eval_games": 1,
           "max_turns": 6, "eval_size": 1}  # 3 games: ~1.2 s each to generate


def make_task(**section):
    entry, cfg = ENVS.build({**SECTION, **section}, "task")
    return entry.fn(cfg)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tw_cache")


@pytest.fixture(scope="module")
def task(cache):
    t = make_task(cache_dir=str(cache))
    yield t
    t.close()


def test_walkthrough_wins_every_game(task):
    for split, pool in (("train", 2), ("eval", 1)):
        for seed in range(pool):
            env = task.make_env(split)
            env.reset(seed)
            commands = list(env._state["policy_commands"])
            assert commands, "a generated game has a walkthrough"
            total, info, done = 0.0, {}, False
            for c in commands:
                obs, reward, done, info = env.step(c)
                total += reward
                assert not info["invalid"], c
            assert done and info["success"] and total == 1.0
            env.close()
    assert not list(Path(task.cache_dir).glob(".gen-*")), "temporary generation folders are removed"


def test_demonstrations_replay_to_success(task):
    (demo,) = task.demonstrations([10**8 + 1])
    env = task.make_env("train")
    obs = env.reset(10**8 + 1)
    for k, (demo_obs, action) in enumerate(demo.turns):
        assert obs == demo_obs
        assert set(obs) <= set("\n" + "".join(chr(c) for c in range(32, 127)))  # the char tokenizer's alphabet
        obs, _, done, info = env.step(action)
    assert done and info["success"] and len(demo.turns) <= task.max_turns


def test_compact_observation_and_invalid_marking(task):
    env = task.make_env("train")
    obs = env.reset(0)
    assert "exits:" in obs and obs.endswith("\n> ") and len(obs) < 120
    obs, reward, done, info = env.step("eat the moon")
    assert info["invalid"] and reward == 0.0 and not done and "exits:" in obs
    assert "can't" in obs.lower() or "not" in obs.lower()  # TextWorld's own answer, shortened
    first_exit = next(c for c in info["admissible"] if c.startswith("go "))
    _, _, _, info = env.step(" Go  " + first_exit[3:].upper())  # case and spacing are normalised
    assert not info["invalid"]


def test_determinism_and_snapshot_restore(task):
    def play(seed):
        env = task.make_env("train")
        out = [env.reset(seed)]
        for c in ["look", "go north", "go south", "go east", "go west"]:
            out.append(env.step(c)[0])
        return out, env

    first, env = play(1)
    again, _ = play(1)
    assert first == again
    state, key = env.snapshot(), env.state_key()
    after = env.step("go north")[0]
    other = task.make_env("train")
    other.restore(state)
    assert other.state_key() == key and other.step("go north")[0] == after


def test_train_and_eval_games_differ(task):
    train = {task.game_path("train", i) for i in range(2)}
    evals = {task.game_path("eval", i) for i in range(3)}  # seeds wrap around the pool of 1
    assert len(train) == 2 and len(evals) == 1 and not train & evals
    seeds = {task.game_seed("train", i) for i in range(1000)}
    assert not seeds & {task.game_seed("eval", i) for i in range(1000)}
    texts = {p.with_suffix(".json").read_text() for p in train | evals}
    assert len(texts) == 3


def test_verbose_format_is_the_game_text(cache):
    t = make_task(cache_dir=str(cache), format="verbose")
    obs = t.make_env("train").reset(0)
    assert "-= " in obs and "exit" in obs and "$$" not in obs  # the room text, without the ASCII banner
    t.close()


def test_broken_cache_entry_is_regenerated(cache):
    t = make_task(cache_dir=str(cache))
    path = t.game_path("train", 0)
    path.with_suffix(".json").unlink()  # as if killed between the two renames
    assert t.game_path("train", 0) == path and path.with_suffix(".json").exists()
    env = t.make_env("train")
    env.reset(0)
    t.close()


def test_missing_package_and_bad_level(monkeypatch):
    with pytest.raises(Exception, match="out of range"):
        make_task(level=31, challenge="treasure_hunter")
    monkeypatch.setitem(sys.modules, "textworld", None)
    with pytest.raises(OutriderError, match=r"needs the textworld package: pip install 'outrider\[agents\]'"):
        make_task()


def test_outrider_train_end_to_end(tmp_path, cache):
    recipe_dict = tiny_recipe(
        policy={"model": "tiny", "hidden": 32, "layers": 1, "heads": 2, "max_positions": 256,
                "warm_start": {"steps": 4, "batch_size": 4, "lr": 5.0e-3}},
        explore={"name": "group", "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 12},
        observe={"eval_every": 0, "eval_prompts": 2, "eval_samples": 2, "pass_at": [1, 2],
                 "checkpoint_every": 0, "tensorboard": False})
    recipe_dict["task"] = {**SECTION, "cache_dir": str(cache)}  # replaced, not merged: no reasoning-gym keys
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    out = tmp_path / "run"
    result = run_cli(["train", recipe, "--out", out], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval_start", "eval_end"):
        assert 0.0 <= summary[key]["pass@1"] <= 1.0, summary
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["step"] == 3 and 0.0 <= rows[-1]["reward/total"] <= 1.0
    assert "eval/pass@1" in rows[0] and "eval/accuracy" in rows[-1]


PRINTABLE = set("\n" + "".join(chr(c) for c in range(32, 127)))
PADDED_QUIT = "\nAre you sure you want to quit?" + " " * 150 + "-= Cookhouse =-0/1"  # the game's real text


def fake_state(feedback, admissible=("go north",), description="-= Cookhouse =-\nA cookhouse."):
    return {"feedback": feedback, "objective": "", "admissible_commands": list(admissible),
            "description": description}


def test_status_line_without_prompt_is_stripped(task, cache):
    # regression: the status line was cut at the last "\n>", which a yes/no question lacks, so the question was
    # dropped in compact format and the observation equalled a no-op's
    obs = task.render(fake_state(PADDED_QUIT), first=False, moved=False)
    assert obs == "Are you sure you want to quit? Cookhouse. exits: north.\n> "
    obs = task.render(fake_state("\nPlease answer yes or no.>" + " " * 130 + "-= Cookhouse =-0/2"), False, False)
    assert obs.startswith("Please answer yes or no. Cookhouse.")
    verbose = make_task(cache_dir=str(cache), format="verbose")
    assert verbose.render(fake_state(PADDED_QUIT), first=False, moved=False) == "Are you sure you want to quit?\n> "
    env = verbose.make_env("train")
    observations = [env.reset(0)] + [env.step(c)[0] for c in ["look", "eat the moon", "inventory"]]
    env.reset(0)
    observations += [env.step(c)[0] for c in env._state["policy_commands"]]  # ends on "*** The End ***"
    assert "The End" in observations[-1]
    for obs in observations:  # no padding run and no status line ("-= Room =-0/1") left
        assert "  " not in obs and not re.search(r"=-\s*\d+/\d+", obs), obs
        assert set(obs) <= PRINTABLE and obs.endswith("\n> ")
    verbose.close()


def test_meta_commands_are_refused_and_not_sent(task, tmp_path, monkeypatch):
    # regression: `quit`/`restart` were sent, the game then took the next command as its yes/no answer, and
    # `restart` + `y` restarted the game mid-episode; `save` wrote a .qzl file into the working directory
    monkeypatch.chdir(tmp_path)
    env = task.make_env("train")
    env.reset(0)
    go = next(c for c in env.admissible if c.startswith("go "))
    env.step(go)
    moved = env.state_key()
    for command in ["quit", "Restart", "y", "save", "restore", "undo", "score", "verbose", "superbrief",
                    "transcript", "notify off", "again", "q"]:
        obs, reward, done, info = env.step(command)
        assert not done and reward == 0.0 and "exits:" in obs
        assert "yes or no" not in obs.lower() and "sure you want" not in obs.lower()
        if command != "y":  # "y" is an ordinary (unknown) command, sent: "That was a rhetorical question."
            assert info["invalid"] and "is not allowed" in obs, (command, obs)
        assert env.state_key() == moved, command  # still in the room reached, score unchanged
    assert not list(tmp_path.iterdir()), "nothing was saved or transcribed"
    obs, _, _, info = env.step("look")
    assert not info["invalid"] and "not allowed" not in obs
    # the history keeps the refused commands; replaying refuses them again, so restore gives the same state
    state = env.snapshot()
    assert "restart" in state[1]
    after = env.step(go)[0]
    other = task.make_env("train")
    other.restore(state)
    assert other.state_key() == moved and other.step(go)[0] == after
    env.close(), other.close()


def test_backslash_commands_are_refused_not_sent(task, capfd):
    # regression: dumb-frotz reads a line starting with `\` as its own command; on an unknown one (`\zz`) the
    # interpreter's step never returned, printing "unknown command" to stderr at full CPU
    env = task.make_env("train")
    env.reset(0)
    before = env.state_key()
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(out=[env.step(c) for c in ("\\zz", " \\help me")]),
                              daemon=True)
    worker.start()
    worker.join(10)
    assert "out" in box, "step('\\zz') did not return"
    for command, (obs, reward, done, info) in zip(("\\zz", "\\help"), box["out"]):
        assert info["invalid"] and not done and reward == 0.0
        assert obs.startswith(f"'{command}' is not allowed in this game.") and "exits:" in obs
    assert env.state_key() == before
    env.close()
    assert "unknown command" not in capfd.readouterr().err


def test_a_hung_interpreter_is_killed_and_its_output_discarded(task, capfd):
    env = task.make_env("train")
    env.reset(0)
    game = env._game
    t0 = time.perf_counter()
    with TimeLimit(1.0) as clock, pytest.raises(EnvTimeout):
        clock.call(env._call, "step", "\\zz")  # sent past the filter: frotz loops, printing "unknown command"
    assert time.perf_counter() - t0 < 5
    assert env._game is None and not game._process.is_alive()  # killed, not returned to the pool
    out = capfd.readouterr()
    assert "unknown command" not in out.err + out.out
    assert "exits:" in env.reset(0)  # a fresh interpreter
    env.close()


def test_compact_names_are_ascii_and_no_feedback_means_no_space(task, cache):
    state = fake_state("\nYou can't do that.", admissible=("go north", "take caf\u00e9 coin", "drop b\u00e2ton"),
                       description="-= Caf\u00e9t\u00e9ria =-\n")
    obs = task.render(state, first=False, moved=False)
    assert set(obs) <= PRINTABLE and "Caftria. exits: north. here: caf coin. carrying: bton." in obs
    silent = make_task(cache_dir=str(cache), feedback_chars=0)
    env = silent.make_env("train")
    first = env.reset(0)
    obs, _, _, info = env.step("eat the moon")
    assert info["invalid"] and obs == first and not obs.startswith(" ")
    silent.close()


def test_walkthrough_longer_than_max_turns_or_not_winning_raises(cache, monkeypatch):
    short = make_task(cache_dir=str(cache), max_turns=1)
    with pytest.raises(OutriderError) as err:
        short.demonstrations([0])
    message = str(err.value)
    assert "\n" not in message and "task.max_turns=1" in message and re.search(r"needs \d+ commands", message)
    short.close()

    from outrider.envs import textworld_task

    reset = textworld_task.TextWorldEnv.reset

    def bad_walkthrough(self, seed):
        obs = reset(self, seed)
        self._state["policy_commands"] = ["look"]
        return obs

    monkeypatch.setattr(textworld_task.TextWorldEnv, "reset", bad_walkthrough)
    t = make_task(cache_dir=str(cache))
    with pytest.raises(OutriderError, match="does not win"):
        t.demonstrations([0])
    t.close()
