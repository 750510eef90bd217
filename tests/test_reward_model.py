"""Learned reward models: the Bradley–Terry and label losses against hand-computed numbers, the data files' one-line
errors, `outrider rm train` end to end (a directory that loads with one call), the `reward_model` component in a
run's scoring (a NaN counted and scored as configured) and the hacking monitor's per-step statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import call_main
from outrider.data import Episode, Turn
from outrider.errors import OutriderError
from outrider.policy.model import Policy
from outrider.registry import BuildContext
from outrider.score import SCORE, Component, compose, score_step_metrics
from outrider.score.monitor import pearson
from outrider.score.reward_model import RewardModel, bt_loss, label_loss, read_examples
from outrider.score.rm_training import TrainConfig, split_by_prompt, train


def test_bradley_terry_loss_and_gradient_on_two_pairs_one_a_tie():
    rw = torch.tensor([1.0, 0.0], requires_grad=True)
    rl = torch.tensor([0.0, 0.0], requires_grad=True)
    loss = bt_loss(rw, rl)
    # (−log σ(1) + log 2) / 2 = (0.3132617 + 0.6931472) / 2
    assert float(loss) == pytest.approx(0.5032044, abs=1e-6)
    loss.backward()
    # ∂ℓ/∂r_w = −σ(r_l − r_w)/n: −σ(−1)/2 = −0.1344707 and, for the tie, −½/2
    assert rw.grad.tolist() == pytest.approx([-0.1344707, -0.25], abs=1e-6)
    assert rl.grad.tolist() == pytest.approx([0.1344707, 0.25], abs=1e-6)


def test_label_loss_hand_computed():
    # (log 2 + log(1 + e²)) / 2
    assert float(label_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))) == pytest.approx(1.4100379, abs=1e-6)


def write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_data_files_kinds_and_one_line_errors(tmp_path):
    pairs = write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert read_examples(pairs)[0] == "pairs"
    labels = write(tmp_path / "l.jsonl", [{"prompt": "q", "response": "a", "label": True}])
    kind, rows = read_examples(labels)
    assert kind == "labels" and rows[0].label == 1.0
    cases = [([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}], ":2: missing field 'rejected'"),
             ([{"prompt": "q", "response": "a", "label": "yes"}], ":1: field 'label' must be a number"),
             ([{"prompt": "q", "response": "a", "label": 1.5}], ":1: field 'label' must be a number from 0 to 1"),
             ([{"prompt": "q", "response": 3, "label": 1}], ":1: field 'response' is a int, not a string"),
             ([{"prompt": "q", "response": "a", "label": 1, "score": 2}], ":1: unknown field 'score'"),
             (["{not json"], ":1: not valid JSON"),
             ([{"prompt": "q", "chosen": "a", "rejected": "b", "prefix": "x"}], ":1: field 'prefix' is not read")]
    for k, (rows, fragment) in enumerate(cases):
        path = write(tmp_path / f"bad{k}.jsonl", rows)
        with pytest.raises(OutriderError) as e:
            read_examples(path)
        assert fragment in str(e.value) and str(e.value).startswith(path) and "\n" not in str(e.value)
    with pytest.raises(OutriderError, match="no such file"):
        read_examples(str(tmp_path / "missing.jsonl"))


def test_heldout_split_is_by_prompt():
    from outrider.loops.offline import Pair

    rows = [Pair(f"q{i % 10}", "a", "b") for i in range(40)]
    tr, held = split_by_prompt(rows, 0.2, 0)
    assert len(held) == 8 and not {p.prompt for p in tr} & {p.prompt for p in held}


def synthetic_pairs(n: int) -> list[dict]:
    """Chosen responses start with '7', rejected ones with '3': a rule a tiny RM learns in a few epochs."""
    return [{"prompt": f"{i}+{i}=", "chosen": f"7{i}", "rejected": f"3{i}"} for i in range(n)]


def test_rm_train_cli_saves_a_directory_that_loads_with_one_call(tmp_path, monkeypatch, capsys):
    data = write(tmp_path / "pairs.jsonl", synthetic_pairs(60))
    out = tmp_path / "rm"
    code, stdout, err = call_main(monkeypatch, capsys, "rm", "train", data, "--out", str(out), "--hidden", "32",
                                  "--layers", "1", "--heads", "2", "--epochs", "6", "--batch-size", "8",
                                  "--lr", "3e-3", "--heldout", "0.2", "--quiet")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["objective"] == "bradley_terry" and summary["heldout_examples"] == 12
    assert summary["heldout"]["accuracy"] == 1.0
    rm = RewardModel.load(out)
    assert rm.meta["heldout"]["accuracy"] == 1.0
    r = rm.rewards(["5+5=", "5+5="], ["75", "35"])
    assert r[0] > r[1]
    # a second run into the same directory needs --overwrite; a malformed file is one line naming file:line:field
    code, _, err = call_main(monkeypatch, capsys, "rm", "train", data, "--out", str(out), "--quiet")
    assert code == 2 and "--overwrite" in err
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": 1,
                                                                                          "rejected": "b"}])
    code, _, err = call_main(monkeypatch, capsys, "rm", "train", bad, "--out", str(tmp_path / "rm2"), "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{bad}:2: field 'chosen'" in err
    with pytest.raises(OutriderError, match="no reward model at"):
        RewardModel.load(tmp_path)


def episode(prompt: str, response: str, reward: float = 0.0) -> Episode:
    e = Episode(group_id=0, seed=0)
    e.turns.append(Turn(prompt, [1], response, [5] * len(response), reward=reward))
    return e


def tiny_rm(tmp_path, bias: float) -> str:
    rm = RewardModel(Policy.tiny(hidden=32, layers=1, heads=2, value_head=True))
    with torch.no_grad():
        rm.policy.value_head.bias.fill_(bias)
    rm.save(tmp_path / "rm")
    return str(tmp_path / "rm")


def test_reward_model_component_scores_episodes_and_a_nan_is_counted(tmp_path):
    path = tiny_rm(tmp_path, 0.25)
    piece = SCORE.create({"name": "reward_model", "path": path}, where="score[0]")
    comp = Component("reward_model", piece, 2.0, "score[0]")
    eps = [episode("1+2=", "3"), episode("1+2=", "4")]
    compose(eps, [comp])
    assert [e.rewards["trajectory"]["reward_model"] for e in eps] == pytest.approx([0.5, 0.5])  # head: bias only
    metrics = score_step_metrics([comp])
    assert metrics["score/reward_model/nonfinite"] == 0.0 and metrics["time/score/reward_model_s"] > 0
    nan_path = tiny_rm(tmp_path / "nan", math.nan)
    piece = SCORE.create({"name": "reward_model", "path": nan_path, "on_nonfinite": -1.0}, where="score[0]")
    comp = Component("reward_model", piece, 1.0, "score[0]")
    compose(eps, [comp])
    assert [e.rewards["trajectory"]["reward_model"] for e in eps] == [-1.0, -1.0]
    assert score_step_metrics([comp])["score/reward_model/nonfinite"] == 2.0
    with pytest.raises(OutriderError, match=r"score\[3\]\.path: no reward model"):
        SCORE.create({"name": "reward_model", "path": str(tmp_path)}, BuildContext(), where="score[3]")


def test_train_labels_objective_fits_a_rule(tmp_path):
    rows = [{"prompt": f"{i}", "response": f"{'7' if i % 2 else '3'}{i}", "label": i % 2} for i in range(40)]
    kind, examples = read_examples(write(tmp_path / "l.jsonl", rows))
    rm = RewardModel(Policy.tiny(hidden=32, layers=1, heads=2, value_head=True))
    summary = train(rm, kind, examples, TrainConfig(epochs=8, batch_size=8, lr=3e-3, heldout=0.2))
    assert summary["objective"] == "label_bce" and summary["heldout"]["accuracy"] == 1.0


def test_pearson_hand_computed_and_degenerate():
    assert pearson([1, 2, 3], [0, 1, 1]) == pytest.approx(0.8660254, abs=1e-6)  # 1 / (√2 · √(2/3))
    assert pearson([1, 1, 1], [0, 1, 1]) == 0.0 and pearson([1.0], [2.0]) == 0.0


def test_hacking_monitor_logs_proxy_gold_correlation_length_per_step():
    proxy = Component("length", SCORE.create({"name": "length"}, where="score[0]"), -1.0, "score[0]")
    monitor = Component("hacking_monitor", SCORE.create({"name": "hacking_monitor", "proxy": ["length"]},
                                                        where="score[1]"), 0.0, "score[1]")
    eps = [episode("q", "a", 0.0), episode("q", "ab", 1.0)]
    compose(eps, [proxy, monitor])
    compose([episode("q", "abc", 1.0)], [proxy, monitor])  # a second scoring call within the step
    m = score_step_metrics([proxy, monitor])
    # proxy = −(−len) = 1, 2, 3 (length penalty at weight −1), gold = env reward 0, 1, 1
    assert m["monitor/proxy"] == pytest.approx(2.0) and m["monitor/gold"] == pytest.approx(2 / 3)
    assert m["monitor/correlation"] == pytest.approx(0.8660254, abs=1e-6) and m["monitor/length"] == 2.0
    assert all(e.rewards["trajectory"]["hacking_monitor"] == 0.0 for e in eps)
    assert "monitor/proxy" not in score_step_metrics([proxy, monitor])  # reset: nothing scored since


def test_a_run_optimises_a_reward_model_and_logs_the_monitor(tmp_path):
    from conftest import read_jsonl, tiny_recipe
    from outrider.recipe import parse_recipe
    from outrider.trainer import Trainer

    path = tiny_rm(tmp_path, 0.0)
    recipe = parse_recipe(tiny_recipe(score=[{"name": "reward_model", "weight": 1.0, "path": path},
                                             {"name": "hacking_monitor", "weight": 0.0}], train={"steps": 2}))
    Trainer(recipe, tmp_path / "run", quiet=True).run()
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "monitor/proxy" in r]
    assert len(rows) == 2
    for r in rows:
        assert {"monitor/gold", "monitor/correlation", "monitor/length", "time/score/reward_model_s"} <= set(r)
        assert r["monitor/proxy"] == pytest.approx(r["reward/reward_model"], abs=1e-5)


def test_step_pairs_take_each_groups_best_over_worst_by_env_reward():
    from outrider.score.reward_model import step_pairs

    eps = [episode("a", "x", 0.0), episode("a", "y", 1.0), episode("a", "z", 1.0), episode("b", "u", 0.5),
           episode("b", "v", 0.5)]
    for e, g in zip(eps, [0, 0, 0, 1, 1]):
        e.group_id = g
    pairs = step_pairs(eps, [e.turns[0].observation for e in eps])
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("a", "y", "x")]  # group 1 ties: no pair


def test_online_reward_model_trains_after_scoring_and_its_state_round_trips(tmp_path):
    path = tiny_rm(tmp_path, 0.0)
    section = {"name": "reward_model", "path": path, "online": True, "lr": 1e-2}
    piece = SCORE.create(section, where="score[0]")
    eps = [episode("1+2=", "3", 1.0), episode("1+2=", "4", 0.0)]
    before = piece(eps)
    assert before[0] == before[1] == 0.0 and len(piece.pending) == 1  # scored before it learns from them
    metrics = piece.step_metrics()
    assert metrics["rm/pairs"] == 1.0 and metrics["rm/loss"] == pytest.approx(math.log(2), abs=1e-6)
    state = piece.state_dict()
    fresh = SCORE.create(section, where="score[0]")
    fresh.load_state_dict(state)
    after, again = piece(eps), fresh(eps)
    assert after == again and after[0] > after[1]
    assert SCORE.create({"name": "reward_model", "path": path}, where="score[0]").state_dict() == {}


@pytest.mark.slow  # three real runs, ~40 s
def test_killed_online_reward_model_run_resumes_to_identical_metrics(tmp_path):
    from conftest import read_jsonl, write_recipe
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer
    from test_resume import RESUME_OVERRIDES, killed_run_resumes_like

    path = tiny_rm(tmp_path, 0.0)
    overrides = dict(RESUME_OVERRIDES, score=RESUME_OVERRIDES["score"] + [
        {"name": "reward_model", "weight": 1.0, "path": path, "online": True, "lr": 1e-3}])
    recipe = write_recipe(tmp_path, **overrides)
    Trainer(load_recipe(recipe), tmp_path / "A", quiet=True).run()
    rows = [r for r in read_jsonl(tmp_path / "A" / "metrics.jsonl") if r["step"] > 0]
    assert sum(r["rm/pairs"] for r in rows) > 0
    killed_run_resumes_like(tmp_path / "A", recipe, tmp_path)
