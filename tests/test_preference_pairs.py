"""Pairs as data: a user's pairs file (one-line errors naming the line, per-side prompts, step-level prefixes), the
preference oracles, and on-policy pairs picked from the policy's own samples (`explore: preference_pairs`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from outrider.data import Episode, GroupIds, Turn, pack
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreContext
from outrider.loops.offline import Pair, pair_episodes, parse_pair, read_pairs
from outrider.policy.model import Policy
from outrider.registry import BuildContext
from outrider.score.preference import PREFERENCES, oracle_pairs, win_rates


def write(tmp_path, *rows) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_pairs_file_forms(tmp_path):
    path = write(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b"},
                 {"chosen": {"prompt": "q", "response": "c"}, "rejected": {"prompt": "q", "response": "d"}},
                 {"prompt": "r", "chosen": {"prompt": "r", "response": "e"}, "rejected": "f"},
                 {"prompt": "s", "prefix": "1+", "chosen": "2", "rejected": "3", "chosen_value": 0.75,
                  "rejected_value": 0})
    assert read_pairs(path, "loop") == [Pair("p", "a", "b"), Pair("q", "c", "d"), Pair("r", "e", "f"),
                                        Pair("s", "2", "3", "1+", 0.75, 0.0)]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "chosen": "a"}, "pairs.jsonl:2: missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "pairs.jsonl:2: missing field 'prompt'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "pairs.jsonl:2: field 'chosen' must be a string or"),
    ({"prompt": 1, "chosen": "a", "rejected": "b"}, "pairs.jsonl:2: field 'prompt' must be a string, got int"),
    ({"chosen": {"prompt": "q", "response": "c"}, "rejected": {"prompt": "Q", "response": "d"}},
     r"pairs.jsonl:2: the prompt differs between chosen.prompt \('q'\) and rejected.prompt \('Q'\); a pair "
     "compares two responses to one prompt"),
    ({"prompt": "p", "chosen": {"prompt": "q", "response": "c"}, "rejected": "d"},
     r"pairs.jsonl:2: the prompt differs between prompt \('p'\) and chosen.prompt \('q'\)"),
    ({"chosen": {"prompt": "q"}, "rejected": "d"}, "pairs.jsonl:2: field 'chosen.response' is missing"),
    ({"chosen": {"prompt": "q", "response": "c", "score": 1}, "rejected": "d"},
     "pairs.jsonl:2: field 'chosen' has unknown key 'score'; valid: prompt, response"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "prefix": 5}, "pairs.jsonl:2: field 'prefix' must be a string"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_value": True},
     "pairs.jsonl:2: field 'chosen_value' must be a finite number, got True"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "label": 1}, "pairs.jsonl:2: unknown field 'label'; valid: "),
    ("[1, 2]", "pairs.jsonl:2: expected an object, got list"),
])
def test_a_bad_pair_is_one_error_naming_its_line(tmp_path, row, message):
    path = write(tmp_path, {"prompt": "ok", "chosen": "a", "rejected": "b"}, row)
    with pytest.raises(OutriderError, match=message) as e:
        read_pairs(path, "loop")
    assert "\n" not in str(e.value)


def test_empty_pairs_file(tmp_path):
    with pytest.raises(OutriderError, match="loop.path: '.*' holds no pairs"):
        read_pairs(write(tmp_path, "   "), "loop")


def test_step_level_pairs_train_only_the_step():
    """A pair's prefix (the shared earlier steps) is in both rows and outside the trained mask; each side's value
    is its reward on the trained tokens (what `step_apo` reads)."""
    policy = Policy.tiny(hidden=16, layers=1, heads=2)
    episodes = pair_episodes(policy, [Pair("3+4*2 ->", "8=", "14=", prefix="4*2=", chosen_value=1.0)])
    batch = pack(episodes, policy.pad_id, policy.bos_id)
    prompt = len(policy.encode_observation("3+4*2 ->", first=True)) + 1  # + BOS
    for row, step in enumerate(("8=", "14=")):
        trained = batch.input_ids[row][batch.action_mask[row] > 0].tolist()
        assert trained == policy.encode(step) + [policy.eos_id]
        assert batch.input_ids[row, prompt:prompt + 4].tolist() == policy.encode("4*2=")
    assert batch.pairs()[0].tolist() == [0] and batch.pairs()[1].tolist() == [1]
    assert ((batch.token_rewards * batch.action_mask).sum(-1)).tolist() == [1.0, 0.0]


# --- oracles ----------------------------------------------------------------------------------------------------

def episode(response: str, reward: float = 0.0, success: bool = False, group: int = 0) -> Episode:
    e = Episode(group_id=group, seed=group, turns=[Turn("p", [1], action=response, action_ids=[2] * len(response))],
                success=success)
    e.rewards["trajectory"]["verifier"] = reward
    return e


def oracle(name: str, **options):
    return PREFERENCES.create({"name": name, **options})


def test_reward_oracle_and_win_rates():
    group = [episode("a", 1.0), episode("b", 0.0), episode("c", 1.0)]
    p = oracle("reward")(group)
    assert p.tolist() == [[0.5, 1.0, 0.5], [0.0, 0.5, 0.0], [0.5, 1.0, 0.5]]
    assert win_rates(p).tolist() == [0.75, 0.0, 0.75]
    soft = oracle("reward", temperature=0.5)(group)
    assert soft[0, 1].item() == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert torch.allclose(soft + soft.T, torch.ones(3, 3, dtype=soft.dtype))
    assert win_rates(p[:1, :1]).tolist() == [0.5]


def test_cyclic_oracle_is_rock_paper_scissors():
    # ord('0') = 48: classes 0, 1, 2 for '0', '1', '2'; '3' is class 0 again
    group = [episode(c, success=True) for c in "0123"]
    p = oracle("cyclic")(group)
    assert p[1, 0] == 1 and p[2, 1] == 1 and p[0, 2] == 1  # 1 beats 0, 2 beats 1, 0 beats 2
    assert p[0, 3] == 0.5 and p[0, 1] == 0 and p[3, 2] == 1
    assert torch.allclose(p + p.T, torch.ones(4, 4, dtype=p.dtype))
    assert win_rates(p[:3, :3]).tolist() == [0.5, 0.5, 0.5]  # the uniform mixture is the equilibrium
    mixed = [episode("0", success=True), episode("1", success=False), episode("2", success=False)]
    p = oracle("cyclic")(mixed)
    assert p[0, 1] == 1 and p[0, 2] == 1 and p[1, 2] == 0.5  # success first; two failures tie
    assert oracle("cyclic", correct_first=False)(mixed)[2, 1] == 1
    five = oracle("cyclic", classes=5, correct_first=False)([episode(chr(45 + k)) for k in range(5)])  # classes 0..4
    assert five[0].tolist() == [0.5, 0.0, 0.0, 1.0, 1.0]  # 0 beats 3 and 4 (0 − 3 ≡ 2, 0 − 4 ≡ 1 mod 5)


def test_oracle_pairs_label_a_group_for_a_reward_model():
    """The cyclic oracle's pairs: each two distinct texts once, the winner first, ties and repeats left out."""
    group = [episode(c, success=ok) for c, ok in [("0", True), ("1", True), ("2", True), ("1", True), ("5", False),
                                                   ("8", False)]]
    p = oracle("cyclic")(group)
    rng = np.random.default_rng(0)
    pairs = oracle_pairs(p, [e.response for e in group], rng)
    # 1 beats 0, 2 beats 1, 0 beats 2; successes beat failures; the two failures tie; the repeated '1' is dropped
    assert sorted(pairs) == sorted([(1, 0), (2, 1), (0, 2), (0, 4), (0, 5), (1, 4), (1, 5), (2, 4), (2, 5)])
    assert len(oracle_pairs(p, [e.response for e in group], rng, max_pairs=4)) == 4
    assert oracle_pairs(p[:1, :1], ["0"], rng) == []
    soft = torch.tensor([[0.5, 0.8], [0.2, 0.5]], dtype=torch.float64)  # soft preferences are drawn
    draws = [oracle_pairs(soft, ["a", "b"], rng)[0] for _ in range(2000)]
    assert draws.count((0, 1)) / 2000 == pytest.approx(0.8, abs=0.03)


def test_unknown_oracle_or_even_cycle_is_one_line(tmp_path):
    from conftest import write_recipe
    from outrider.recipe import load_recipe

    with pytest.raises(OutriderError, match="explore.oracle: unknown preference oracle 'elo'; valid: cyclic, reward"):
        load_recipe(write_recipe(tmp_path, explore={"name": "preference_pairs", "oracle": "elo"}))
    with pytest.raises(OutriderError, match="explore.oracle.classes: must be odd"):
        load_recipe(write_recipe(tmp_path, explore={"name": "preference_pairs",
                                                    "oracle": {"name": "cyclic", "classes": 4}}))


# --- on-policy pairs --------------------------------------------------------------------------------------------

def explore_with(groups: list[list[tuple[str, float]]], **options):
    """Run `preference_pairs` on canned samples: one group per inner list of (response, reward)."""
    piece = EXPLORE.create({"name": "preference_pairs", "prompts_per_step": len(groups),
                            "group_size": len(groups[0]), **options}, BuildContext(where="explore"))
    ids = GroupIds()

    def rollout(starts):
        return [episode(*groups[s.seed][i % len(groups[0])], group=s.group_id)
                for i, s in enumerate(starts)]

    def score(episodes):
        for e in episodes:
            e.success = e.rewards["trajectory"]["verifier"] > 0
    ctx = ExploreContext(rollout=rollout, score=score, next_seeds=lambda n: list(range(n)), groups=ids,
                         rng=np.random.default_rng(0))
    return piece(ctx)


def test_best_and_worst_sample_of_each_group_form_the_pair():
    episodes, metrics = explore_with([[("a", 0.0), ("b", 1.0), ("c", 0.5), ("d", 0.0)],
                                      [("e", 1.0), ("f", 1.0), ("g", 1.0), ("h", 1.0)],  # no preference: dropped
                                      [("i", 0.2), ("j", 0.9), ("k", 0.9), ("l", 0.1)]])
    pairs = {(e.group_id, e.response, e.preference) for e in episodes}
    assert {(0, "b", "chosen"), (2, "l", "rejected")} <= pairs
    assert any(p[:2] in ((0, "a"), (0, "d")) and p[2] == "rejected" for p in pairs)  # a tie, broken at random
    assert any(p[:2] in ((2, "j"), (2, "k")) and p[2] == "chosen" for p in pairs)
    assert len(episodes) == 4 and all(e.preference for e in episodes)
    assert metrics["explore/pairs"] == 2 and metrics["explore/pair_frac"] == pytest.approx(2 / 3)
    # win rates: group 0 b = 1, a/d = (0 + 0.5 + 0)/3; group 2 j = (1 + 0.5 + 1)/3, l = 0
    assert metrics["explore/winrate_gap"] == pytest.approx(((1 - 0.5 / 3) + 2.5 / 3) / 2)
    assert metrics["explore/sampled_reward"] == pytest.approx((1.5 + 4 + 2.1) / 12)


def test_margin_filter_and_keeping_unpaired_samples():
    groups = [[("a", 0.0), ("b", 1.0), ("c", 1.0), ("d", 0.9)],  # gap (1 + 0.5 + 1)/3 − 0 = 0.83
              [("e", 0.0), ("f", 0.0), ("g", 0.0), ("h", 1.0)]]  # gap 1 − (0.5 + 0.5)/3 = 0.67
    episodes, metrics = explore_with(groups, min_margin=0.7)
    assert {e.group_id for e in episodes} == {0} and metrics["explore/pairs"] == 1
    episodes, _ = explore_with(groups, keep_unpaired=True)
    assert len(episodes) == 8 and sum(e.preference is not None for e in episodes) == 4
    # no pair anywhere: every sample is returned, none marked (pairwise terms give 0)
    episodes, metrics = explore_with([[("a", 1.0), ("b", 1.0)]])
    assert len(episodes) == 2 and not any(e.preference for e in episodes) and metrics["explore/pairs"] == 0
