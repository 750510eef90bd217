"""Progress displays: evaluations (the CLI's and the trainer's) and TextWorld game generation show what is going on,
in one display with the phase around them; quiet shows nothing; counting changes no result."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from conftest import call_main, tiny_recipe
from outrider.activity import work_item
from outrider.envs import ENVS
from outrider.observe.evaluate import evaluate
from outrider.observe.progress import RunProgress
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams


def recording(progress: RunProgress, terminal: bool = False) -> io.StringIO:
    out = io.StringIO()
    progress.console = Console(file=out, force_terminal=terminal, width=140)
    return out


@pytest.mark.parametrize("terminal", [False, True])
def test_nested_phases_and_work_items_share_one_display(terminal):
    progress = RunProgress(3)
    out = recording(progress, terminal)
    with progress.phase("RL", 3) as advance:
        for _ in range(3):
            with progress.phase("eval", 8) as evaluated:  # a second live display would raise rich's LiveError
                with work_item("TextWorld games generated"):
                    pass
                evaluated(5)
                evaluated(3)
            advance(reward=0.5)
    if not terminal:  # a non-terminal gets the final state once
        lines = [" ".join(line.split()) for line in out.getvalue().splitlines()]
        assert lines[0].startswith("RL ") and "3/3 reward=0.500" in lines[0]
        assert lines[1].startswith("TextWorld games generated ") and "3/?" in lines[1]
        assert not any(line.startswith("eval") for line in lines)  # an inner phase's line goes when it ends


def test_quiet_shows_nothing_and_work_items_need_no_display():
    progress = RunProgress(3, quiet=True)
    out = recording(progress)
    with progress.phase("eval", 4) as evaluated:
        with work_item("TextWorld games generated"):
            evaluated(4)
    with work_item("outside any phase"):
        pass
    assert out.getvalue() == ""


def test_evaluation_counts_every_episode_and_gives_the_same_result():
    entry, cfg = ENVS.build({"name": "bandit", "pulls": 4, "eval_size": 8})
    task = entry.fn(cfg)
    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    params = SamplingParams(temperature=1.0, max_new_tokens=2)
    counted: list[int] = []
    seen = evaluate(policy, task, prompts=6, samples=3, ks=[1], params=params, seed=1, chunk=7,
                    on_episodes=counted.append)
    assert sum(counted) == 18 and len(counted) > 3  # multi-turn: episodes end along the way, in several chunks
    assert seen == evaluate(policy, task, prompts=6, samples=3, ks=[1], params=params, seed=1, chunk=7)


def test_trainer_evaluations_show_progress(tmp_path):
    from outrider.recipe import parse_recipe
    from outrider.trainer import Trainer

    trainer = Trainer(parse_recipe(tiny_recipe()), tmp_path / "run")
    out = recording(trainer.progress)
    trainer.run()
    lines = [" ".join(line.split()) for line in out.getvalue().splitlines()]
    assert any(line.startswith("eval ") and "8/8" in line for line in lines), lines  # 4 prompts x 2 samples
    assert any(line.startswith("RL ") and "3/3" in line for line in lines), lines


def test_cli_eval_shows_progress_on_stderr_and_quiet_hides_it(tmp_path, monkeypatch, capsys):
    from outrider.recipe import parse_recipe
    from outrider.trainer import Trainer

    Trainer(parse_recipe(tiny_recipe()), tmp_path / "run", quiet=True).run()
    code, out, err = call_main(monkeypatch, capsys, "eval", str(tmp_path / "run"), "--samples", "2", "--json")
    assert code == 0 and json.loads(out)["checkpoint"] == "step_3"
    assert any(line.split()[0] == "eval" and "8/8" in line for line in err.splitlines() if line.strip()), err
    code, out, err = call_main(monkeypatch, capsys, "eval", str(tmp_path / "run"), "--samples", "2", "--json",
                               "--quiet")
    assert code == 0 and err == ""


def test_textworld_game_generation_is_counted(tmp_path):
    pytest.importorskip("textworld")
    entry, cfg = ENVS.build({"name": "textworld", "challenge": "coin_collector", "level": 1, "train_games": 2,
                             "eval_games": 1, "cache_dir": str(tmp_path)})
    task = entry.fn(cfg)
    progress = RunProgress(1)
    out = recording(progress)
    with progress.phase("warm start", 1) as advance:
        task.game_path("train", 0)
        task.game_path("train", 1)
        task.game_path("train", 2)  # the first game again: cached, nothing generated
        advance()
    lines = [" ".join(line.split()) for line in out.getvalue().splitlines()]
    assert any(line.startswith("TextWorld games generated ") and "2/?" in line for line in lines), lines
