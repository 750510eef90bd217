"""XRPO [134]: the t-interval half-width and its shrinkage by hand (n = 1 and s = 0 included), one phase's
allocation on hand-made prompts, the budget piece's rounds and in-context seeding (exemplars of other prompts,
removed from the trained sequence), the novelty-aware sharpening, and a kill -9 + --resume run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from conftest import read_jsonl, tiny_recipe
from outrider.credit import CREDIT
from outrider.data import Batch, Episode, GroupIds, Start, Turn
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreContext
from outrider.explore.xrpo import ExemplarBank, allocate_phase, bonus, half_width, reduction
from outrider.registry import BuildContext
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like

T1, T2, T3, T4 = 12.7062047362, 4.30265272975, 3.18244630528, 2.7764451052  # t_{0.975, 1..4}


def test_half_width_and_its_reduction_by_hand():
    assert half_width(1, 0.5, 0.05) == math.inf and reduction(1, 0.5, 0.05) == math.inf  # no interval at n = 1
    assert half_width(4, 0.0, 0.05) == 0.0 and reduction(4, 0.0, 0.05) == 0.0  # all rewards equal
    assert half_width(2, 0.5, 0.05) == pytest.approx(T1 * 0.5 / math.sqrt(2), rel=1e-9)
    assert half_width(3, 0.5, 0.05) == pytest.approx(T2 * 0.5 / math.sqrt(3), rel=1e-9)
    assert reduction(2, 0.5, 0.05) == pytest.approx(T1 * 0.5 / math.sqrt(2) - T2 * 0.5 / math.sqrt(3), rel=1e-9)
    assert bonus(4, 3, 0.1) == pytest.approx(0.1 * math.sqrt(math.log(4) / 4))
    assert bonus(0, 3, 0.1) == math.inf


def test_one_phase_by_hand():
    # prompt 0: rewards 1, 0 (s = 0.7071, n = 2); prompt 1: 0, 0 (s = 0); prompt 2: 1, 1, 0, 0 (s = 0.5774, n = 4)
    rewards = [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    s0, s2 = math.sqrt(0.5), math.sqrt(1 / 3)
    d0 = [T1 * s0 / math.sqrt(2) - T2 * s0 / math.sqrt(3), T2 * s0 / math.sqrt(3) - T3 * s0 / 2,
          T3 * s0 / 2 - T4 * s0 / math.sqrt(5)]  # Δ̂ of prompt 0 at n = 2, 3, 4: 4.60, 0.63, 0.25
    d2 = T3 * s2 / 2 - T4 * s2 / math.sqrt(5)  # Δ̂ of prompt 2 at n = 4: 0.20
    assert d0[2] > d2 and reduction(5, s0, 0.05) < d2
    assert allocate_phase(rewards, 3, 1, 0.05, 0.0, 64) == [3, 0, 0]  # prompt 0 to n = 5 first
    assert allocate_phase(rewards, 4, 1, 0.05, 0.0, 64) == [3, 0, 1]  # then prompt 2 (Δ̂ 0.20 beats 0.14)
    # max_n 4: prompt 0 stops at 4 and prompt 2 is there already, so the rest goes to the s = 0 prompt
    assert allocate_phase(rewards, 4, 1, 0.05, 0.0, 4) == [2, 2, 0]
    # the bonus λ·sqrt(log(1+T)/n), λ = 1, T = 1 (0.589 at n = 2, 0.416 at n = 4, 0.372 at n = 5): prompt 0 to
    # n = 5 (Π 5.19, 1.11, 0.66), then prompt 2 (0.20 + 0.42 = 0.62), then the s = 0 prompt on its bonus alone
    # (0.589 beats prompt 0's 0.14 + 0.37 and prompt 2's 0.11 + 0.37); without the bonus the 5th goes to prompt 0
    assert allocate_phase(rewards, 5, 1, 0.05, 1.0, 64) == [3, 1, 1]
    assert allocate_phase(rewards, 5, 1, 0.05, 0.0, 64) == [4, 0, 1]
    assert allocate_phase([[0.0, 0.0], [0.0, 0.0]], 3, 5, 0.05, 0.1, 64) == [2, 1]  # equal: ties go first
    assert allocate_phase([[0.0, 0.0], [0.0, 0.0]], 5, 5, 0.05, 0.1, 3) == [1, 1]  # every prompt capped


def fake_context(step: int, p_of_seed: dict[int, float], starts_seen: list[Start]) -> ExploreContext:
    """Rollouts whose success is seed-determined (p 0, 1 or alternating); a start with context (exemplars)
    always succeeds and comes back off-policy, as `rollout` marks it; scoring a no-op."""
    counter = {"n": 0}

    def rollout(starts):
        out = []
        for s in starts:
            starts_seen.append(s)
            counter["n"] += 1
            p = p_of_seed[s.seed]
            ok = s.context is not None or p == 1.0 or (0 < p < 1 and counter["n"] % 2 == 0)
            out.append(Episode(group_id=s.group_id, seed=s.seed, origin=s.origin, success=ok,
                               off_policy=s.context is not None and not s.keep_context,
                               turns=[Turn(f"q{s.seed} ->", [1], f" a{s.seed}", [2], reward=float(ok))],
                               rewards={"trajectory": {"v": float(ok)}, "step": {}, "token": {}}))
        return out

    seeds = iter(sorted(p_of_seed))
    return ExploreContext(rollout=rollout, score=lambda eps: None, next_seeds=lambda n: [next(seeds) for _ in range(n)],
                          groups=GroupIds(), rng=np.random.default_rng([0, step, 1]), step=step)


def build(**options):
    entry, cfg = EXPLORE.build({"name": "budget", "allocation": "xrpo", "prompts_per_step": 3, "group_size": 4,
                                "pool": 3, "min_n": 2, "phases": 2, **options}, "explore")
    return entry.create(cfg, BuildContext(where="explore"))


def test_rounds_keep_the_total_and_seed_all_fail_prompts_with_other_prompts_exemplars():
    p = {10: 0.0, 11: 0.5, 12: 1.0}
    piece, seen = build(), []
    episodes, m = piece(fake_context(1, p, seen))
    assert len(episodes) == 12 and m["explore/seeded_rollouts"] == 0  # no exemplar yet at the first step
    assert {e.seed for e in episodes} == set(p) and len({e.group_id for e in episodes}) == 3
    assert set(piece.bank.items) == {11, 12}  # the successes of step 1
    seen.clear()
    episodes, m = piece(fake_context(2, p, seen))
    seeded = [s for s in seen if s.context is not None]
    assert len(episodes) == 12 and m["explore/seeded_rollouts"] == 2 and m["explore/seeded_success"] == 1.0
    assert all(s.seed == 10 and s.origin == "guided" and not s.keep_context and s.context_at == "before_observation"
               for s in seeded)
    # two exemplars, both of other prompts (prompt and answer), one per line
    assert sorted(seeded[0].context.splitlines(keepends=True)) == ["q11 -> a11\n", "q12 -> a12\n"]
    group_10 = {e.group_id for e in episodes if e.seed == 10}
    assert len(group_10) == 1  # the seeded rows join the prompt's group
    rows = [e for e in episodes if e.origin == "guided"]
    assert len(rows) == 2 and all(e.off_policy and e.seed == 10 for e in rows)
    clone = build()
    clone.load_state_dict(piece.state_dict())
    assert clone.state_dict() == piece.state_dict() and clone.bank.items == piece.bank.items
    off, seen = build(seeding=False), []
    off.load_state_dict(piece.state_dict())
    episodes, m = off(fake_context(3, p, seen))
    assert len(episodes) == 12 and all(s.context is None for s in seen) and m["explore/seeded_rollouts"] == 0


def test_the_bank_keeps_the_latest_success_per_prompt():
    bank = ExemplarBank(2)

    def ep(seed, ok, answer="x", origin="on_policy"):
        return Episode(group_id=0, seed=seed, success=ok, origin=origin,
                       turns=[Turn(f"q{seed}", [1], answer, [2])], rewards={"trajectory": {}, "step": {}, "token": {}})

    bank.add([ep(1, True, "a"), ep(2, False), ep(3, True, "b"), ep(4, True, "c", origin="guided")])
    bank.add([ep(1, True, "d")])
    assert list(bank.items.items()) == [(3, "q3b"), (1, "q1d")]  # at most 2, oldest out, guided rows never
    assert bank.context(1, 5, np.random.default_rng(0)) == "q3b\n" and ExemplarBank(2).context(1, 2, None) is None


def sharpen_batch(rewards, logprobs, groups):
    r = torch.tensor(rewards, dtype=torch.float32)
    B, T = len(rewards), 2
    token_rewards = torch.zeros(B, T)
    token_rewards[:, -1] = r
    lp = torch.tensor([[x, x] for x in logprobs], dtype=torch.float32)
    return Batch(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.long),
                 action_mask=torch.ones(B, T), token_rewards=token_rewards, step_index=torch.zeros(B, T, dtype=torch.long),
                 group_index=torch.tensor(groups), sample_weight=torch.ones(B), behaviour_logprobs=lp)


def test_sharpening_by_hand():
    # group of 3: rewards 1, 1, 0; mean log-probs −1, −2, −1.5 (s̄ = −1.5): η = e^0.5, e^−0.5, 1
    # GRPO: A = ±(r − 2/3)/0.5774 = 0.5774, 0.5774, −1.1547; only row 1 (correct, less likely) is boosted:
    # λ(1 − e^−0.5) = 0.3935 < κA = 0.5774 → 0.9709; with κ = 0.5 the cap 0.2887 binds → 0.8660
    batch = sharpen_batch([1.0, 1.0, 0.0, 1.0], [-1.0, -2.0, -1.5, -9.0], [0, 0, 0, 1])
    entry, cfg = CREDIT.build({"name": "xrpo_sharpen", "novelty": 1.0, "clip": 1.0})
    out = entry.fn(batch, cfg)
    a = (1 / 3) / math.sqrt(1 / 3)  # (1 − 2/3)/std, std = sqrt(1/3)
    expected = [a, a + 1 - math.exp(-0.5), -2 * a, 1.0]  # the lone row: GRPO's A = R, η = 1 → no boost
    assert out.advantages[:, 0].tolist() == pytest.approx(expected, rel=1e-5)
    assert (out.advantages[:, 0] == out.advantages[:, 1]).all() and out.metrics["sharpened_rows"] == 0.25
    entry, cfg = CREDIT.build({"name": "xrpo_sharpen", "clip": 0.5})
    assert entry.fn(batch, cfg).advantages[1, 0].item() == pytest.approx(1.5 * a, rel=1e-5)
    entry, cfg = CREDIT.build({"name": "xrpo_sharpen", "novelty": 0.0})
    assert entry.fn(batch, cfg).advantages[:, 0].tolist() == pytest.approx([a, a, -2 * a, 1.0], rel=1e-5)


@pytest.mark.parametrize("section", [{"name": "xrpo_sharpen", "base": "gae"}, {"name": "xrpo_sharpen", "clip": -1}])
def test_bad_sharpen_options_are_one_line_errors(section):
    with pytest.raises(OutriderError):
        CREDIT.build(section)


def test_bad_xrpo_options_are_rejected():
    with pytest.raises(OutriderError):
        build(phases=0)


@pytest.mark.slow  # two runs of 40 small steps and a killed one, 55-68 s under load (Knapsack's: 44 s)
def test_killed_xrpo_run_resumes_to_identical_metrics(tmp_path):
    """Rounds, seeded off-policy rows and the sharpened credit go through the learner; pool, order, estimates
    and the exemplar bank ride in checkpoints."""
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    explore = {"name": "budget", "allocation": "xrpo", "prompts_per_step": 4, "group_size": 4, "pool": 8,
               "min_n": 2, "phases": 2}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(**dict(RESUME_OVERRIDES, explore=explore,
                                                        credit={"name": "xrpo_sharpen"})), sort_keys=False))
    reference = tmp_path / "A"
    Trainer(load_recipe(recipe), reference, quiet=True).run()
    rows = [r for r in read_jsonl(reference / "metrics.jsonl") if "explore/rollouts" in r]
    assert all(r["explore/rollouts"] == 16 for r in rows)
    assert any(r["explore/group_size_max"] > r["explore/group_size_min"] for r in rows)
    assert sum(r["explore/seeded_rollouts"] > 0 for r in rows) >= 1  # the bank's state is exercised
    killed_run_resumes_like(reference, recipe, tmp_path)
