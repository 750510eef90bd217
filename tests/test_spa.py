"""SPA-RL [59] (score/spa.py): the progress objective and the redistributed rewards against hand-computed numbers,
the grounding signal, the estimator fitting the outcome, and its state surviving kill -9 + --resume."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import read_jsonl, write_recipe
from outrider.checkpoint import STATE_FILE, list_checkpoints
from outrider.errors import OutriderError
from outrider.data import Episode, Turn, sequence_ids
from outrider.policy.model import Policy
from outrider.recipe import load_recipe
from outrider.registry import BuildContext
from outrider.score import SCORE, Component, compose
from outrider.score.spa import episode_tokens, grounding, progress_loss, progress_turns, spa_rewards
from outrider.trainer import Trainer
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like


def _episode(policy: Policy, actions: list[str], rewards: list[float], invalid: tuple[int, ...] = (),
             events: dict[int, list[str]] | None = None) -> Episode:
    events = events or {}
    turns = [Turn(observation="ab", observation_ids=policy.encode("ab"), action=a,
                  action_ids=policy.encode(a) + [policy.eos_id] if a else [], reward=r,
                  info={"invalid": k in invalid, "events": events.get(k, [])})
             for k, (a, r) in enumerate(zip(actions, rewards))]
    return Episode(group_id=0, seed=0, turns=turns)


def _piece(policy: Policy, **options):
    entry, cfg = SCORE.build({"name": "spa", **options})
    return entry.create(cfg, BuildContext(None, policy, torch.device("cpu"), 0))


# --- formulas -----------------------------------------------------------------------------------------------------

def test_progress_loss_is_the_mse_of_the_summed_contributions():
    c = [torch.tensor([0.2, 0.3, 0.1]), torch.tensor([-0.5]), torch.zeros(0)]
    y = torch.tensor([1.0, 0.0, 0.5])
    # sums 0.6, -0.5, 0 (an episode without a scored turn predicts 0): ((0.4)² + (0.5)² + (0.5)²) / 3
    assert float(progress_loss(c, y)) == pytest.approx((0.16 + 0.25 + 0.25) / 3, rel=1e-6)
    assert float(progress_loss([torch.tensor([0.25, 0.75])], torch.tensor([1.0]))) == 0.0  # Σ c = R: no loss


def test_rewards_by_hand_and_invalid_actions_get_no_grounding():
    policy = Policy.tiny(hidden=32, layers=1, seed=0)
    e = _episode(policy, ["f", "zz", "p"], [0.0, 0.0, 1.0], invalid=(1,))
    assert grounding(e, "bonus") == [1.0, 0.0, 1.0]
    assert grounding(e, "penalty") == [0.0, -1.0, 0.0]
    # r_t = α c_t + β g_t with α 2, β 0.5
    assert spa_rewards([0.1, -0.2, 0.4], grounding(e, "bonus"), 2.0, 0.5) == pytest.approx([0.7, -0.4, 1.3])
    assert spa_rewards([0.1, -0.2, 0.4], grounding(e, "penalty"), 2.0, 0.5) == pytest.approx([0.2, -0.9, 0.8])
    assert spa_rewards([], [], 1.0, 0.5) == []


def test_turn_ends_are_the_last_action_tokens_of_the_packed_sequence():
    policy = Policy.tiny(hidden=32, layers=1, seed=0)
    e = _episode(policy, ["f", "", "pp"], [0.0, 0.0, 0.0])  # the second turn made no action token
    for bos in (None, policy.bos_id):
        ids, ends = episode_tokens(e, bos)
        assert ids == sequence_ids(e, bos)[0]
        off = 0 if bos is None else 1
        # "ab" + "f" EOS | "ab" | "ab" + "pp" EOS: turn 0 ends at 3, turn 2 at 4+2+2+2 = 10 (no BOS)
        assert ends == [3 + off, None, 10 + off]
        assert ids[ends[0]] == policy.eos_id and ids[ends[2]] == policy.eos_id


def test_progress_turns_count_each_event_once():
    policy = Policy.tiny(hidden=32, layers=1, seed=0)
    e = _episode(policy, ["p", "d", "p", "t", "f"], [0.0] * 5,
                 events={0: ["picked_key"], 1: ["dropped_key"], 2: ["picked_key"], 3: ["unlocked_door", "opened_door"],
                         4: ["reached_goal"]})
    assert progress_turns(e, ["picked_key", "opened_door", "reached_goal"]) == [True, False, False, True, True]
    assert progress_turns(e, []) == [False] * 5


def test_bad_options_are_one_line_errors_naming_the_field():
    with pytest.raises(OutriderError, match=r"^score\.grounding: Input should be 'bonus' or 'penalty'"):
        SCORE.build({"name": "spa", "grounding": "always"})
    with pytest.raises(OutriderError, match=r"^score\.beta: "):
        SCORE.build({"name": "spa", "beta": -1.0})
    with pytest.raises(OutriderError, match=r"^score\.head: "):
        SCORE.build({"name": "spa", "head": "values"})


# --- the piece ----------------------------------------------------------------------------------------------------

def test_first_call_scores_grounding_only_then_the_sum_fits_the_outcome():
    torch.manual_seed(0)
    policy = Policy.tiny(hidden=32, layers=1, seed=0)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    piece = _piece(policy, lr=1e-2, updates=10, batch_size=4, alpha=1.0, beta=0.5, grounding="bonus")
    win = _episode(policy, ["f", "p", "f"], [0.0, 0.0, 1.0], events={1: ["picked_key"], 2: ["reached_goal"]})
    lose = _episode(policy, ["l", "zz", "l"], [0.0, 0.0, 0.0], invalid=(1,))
    first = piece([win, lose])
    assert first == [[0.5, 0.5, 0.5], [0.5, 0.0, 0.5]]  # the head starts at zero: c = 0
    for _ in range(8):
        piece([win, lose])
    piece.step_metrics()
    out = piece([win, lose])
    c_win = [r - 0.5 for r in out[0]]
    c_lose = [r - g for r, g in zip(out[1], [0.5, 0.0, 0.5])]
    assert sum(c_win) == pytest.approx(1.0, abs=0.1) and sum(c_lose) == pytest.approx(0.0, abs=0.1)
    metrics = piece.step_metrics()
    assert metrics["spa/mse"] < 0.01 and metrics["spa/grounded"] == pytest.approx(5 / 6)
    assert metrics["time/score/spa_s"] > 0 and "spa/event_auroc" in metrics
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())  # the policy is untouched
    # its state restores it exactly: the same rewards, and the same ones after one more update on each side
    state = piece.state_dict()
    assert set(state) == {"model", "head", "optimizer", "buffer", "generator"}
    fresh = _piece(Policy.tiny(hidden=32, layers=1, seed=1), lr=1e-2, updates=10, batch_size=4, grounding="bonus")
    fresh.load_state_dict(copy.deepcopy(state))  # as a checkpoint does: no tensor shared with the live piece
    assert fresh([win, lose]) == piece([win, lose])
    assert fresh([win, lose]) == piece([win, lose])


def test_warmup_fits_the_first_batch_before_scoring_it_and_success_targets():
    torch.manual_seed(0)
    policy = Policy.tiny(hidden=32, layers=1, seed=0)
    piece = _piece(policy, lr=1e-2, updates=0, warmup_updates=60, batch_size=2, beta=0.0, target="success",
                   head="hidden", init="random")
    win = _episode(policy, ["f", "f"], [0.0, 0.4])
    win.success = True
    lose = _episode(policy, ["l", "l"], [0.0, 0.0])
    out = piece([win, lose])
    assert sum(out[0]) == pytest.approx(1.0, abs=0.15) and sum(out[1]) == pytest.approx(0.0, abs=0.15)
    assert "spa/warmup_loss" in piece.step_metrics()


def test_composed_as_a_step_level_component_with_its_weight():
    policy = Policy.tiny(hidden=32, layers=1, seed=0)
    piece = _piece(policy, updates=0, beta=1.0, grounding="penalty")
    episodes = [_episode(policy, ["f", "zz"], [0.0, 0.0], invalid=(1,))]
    compose(episodes, [Component("spa", piece, 0.5)])
    assert episodes[0].rewards["step"]["spa"] == [0.0, -0.5]


SPA_OVERRIDES = dict(
    RESUME_OVERRIDES,
    score=RESUME_OVERRIDES["score"] + [{"name": "spa", "weight": 1.0, "lr": 1e-3, "updates": 2, "batch_size": 4,
                                         "buffer": 16, "warmup_updates": 2}],
    credit={"name": "gae", "gamma": 1.0, "lam": 0.95},
)


@pytest.fixture(scope="module")
def spa_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("spa")
    run = root / "A"
    Trainer(load_recipe(write_recipe(root, **SPA_OVERRIDES)), run, quiet=True).run()
    return run


def test_spa_run_logs_the_estimator_and_its_time(spa_reference):
    rows = [r for r in read_jsonl(spa_reference / "metrics.jsonl") if r["step"] > 0]
    assert all("time/score/spa_s" in r and "spa/loss" in r and "spa/mse" in r for r in rows)
    assert any(r["reward/spa"] != 0 for r in rows)
    state = torch.load(list_checkpoints(spa_reference)[-1] / STATE_FILE, weights_only=False)
    assert set(state["pieces"]["score[2]"]) == {"model", "head", "optimizer", "buffer", "generator"}


@pytest.mark.slow  # two real processes, ~25 s
def test_killed_spa_run_resumes_to_identical_metrics(spa_reference, tmp_path):
    killed_run_resumes_like(spa_reference, write_recipe(tmp_path, **SPA_OVERRIDES), tmp_path)
