"""CANON [156], RiskPO [163], PPL/position shaping [144] and the PEAR reward [142] against hand-computed numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from outrider.credit import CREDIT, CreditOutput
from outrider.credit.entropy_aware import ppl_weights
from outrider.data import Batch, Episode, Turn, pack
from outrider.errors import OutriderError
from outrider.recipe import load_recipe, resolve
from outrider.score import SCORE, Component, compose
from outrider.score.phase_entropy import think_token_count

E = 1e-6  # RiskPO's epsilon
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def ep(group: int, reward: float, n: int = 2, entropy=None, logprob=None, action: str = "",
       success: bool = False) -> Episode:
    """A one-turn episode: one observation token, n action tokens, a trajectory reward; entropies / log-probs are
    per token lists, or a float repeated on every token."""
    h = [entropy] * n if isinstance(entropy, (int, float)) else (entropy or [])
    lp = [logprob] * n if isinstance(logprob, (int, float)) else (logprob or [])
    n = len(h) or len(lp) or n
    turn = Turn(observation="q", observation_ids=[5], action=action, action_ids=[7] * n,
                behaviour_logprobs=list(lp), behaviour_entropy=list(h))
    e = Episode(group_id=group, seed=0, turns=[turn], success=success)
    e.rewards["trajectory"]["verifier"] = reward
    return e


def run(name: str, batch: Batch, **options) -> CreditOutput:
    entry, cfg = CREDIT.build({"name": name, **options})
    return entry.fn(batch, cfg)


def assert_rows(adv: torch.Tensor, batch: Batch, expected) -> None:
    """Every action token of row i carries expected[i]; observation and padding positions are exactly 0."""
    m = batch.action_mask > 0
    exp = torch.tensor(expected, dtype=torch.float32)[:, None].expand_as(adv)
    torch.testing.assert_close(adv[m], exp[m], rtol=1e-5, atol=1e-6)
    assert torch.equal(adv[~m], torch.zeros_like(adv[~m]))
    assert torch.isfinite(adv).all()


# ------------------------------------------------------------------------------------------------------ CANON
# group 7: R = 1, 0, .5, 1 with mean entropies .5, .1, .3, .9 -> ascending: row1, row2 | row0, row3
#   Low = {1, 2}: mu_L = (0 + .5)/2 = .25;  High = {0, 3}: mu_H = 1
def canon_batch() -> Batch:
    return pack([ep(7, 1.0, entropy=[0.4, 0.6]), ep(7, 0.0, entropy=[0.1, 0.1]),
                 ep(7, 0.5, entropy=[0.2, 0.4]), ep(7, 1.0, entropy=[0.9, 0.9])], pad_id=0)


def test_canon_pure_inter_group_default():
    # High: R - mu_L = .75, .75;  Low: R - mu_H = -1, -.5
    assert_rows(run("canon", canon_batch()).advantages, canon_batch(), [0.75, -1.0, -0.5, 0.75])


def test_canon_half_lambda_equal_halves_is_dr_grpo():
    # High: .5(R - .25) + .5(R - 1) = R - .625;  Low: .5(R - 1) + .5(R - .25) = R - .625 = R - mean(R)
    out = run("canon", canon_batch(), lam=0.5)
    assert_rows(out.advantages, canon_batch(), [0.375, -0.625, -0.125, 0.375])
    assert_rows(run("dr_grpo", canon_batch()).advantages, canon_batch(), [0.375, -0.625, -0.125, 0.375])


def test_canon_alpha_beta_intra_and_scale():
    # alpha 2, beta .1, lam 1:  High: R - 2*.25 + .1 = R - .4 -> .6, .6;  Low: 2R - 1 - .1 -> -1.1, -.1
    assert_rows(run("canon", canon_batch(), alpha=2.0, beta=0.1).advantages, canon_batch(), [0.6, -1.1, -0.1, 0.6])
    # lam 0 (intra only): High: R - mu_H = 0, 0;  Low: R - mu_L = -.25, .25; scale 2 halves everything
    out = run("canon", canon_batch(), lam=0.0, scale=2.0)
    assert_rows(out.advantages, canon_batch(), [0.0, -0.125, 0.125, 0.0])


def test_canon_length_metric_swaps_alpha_and_breaks_ties_by_batch_order():
    # lengths 3, 1, 2, 2 (rows 2 and 3 tie, stable order keeps row 2 first): ascending row1, row2 | row3, row0
    # same halves as above; alpha 2, length form:  High: 2R - mu_L = 2 - .25 = 1.75;  Low: R - 2*mu_H = R - 2
    b = pack([ep(0, 1.0, n=3), ep(0, 0.0, n=1), ep(0, 0.5, n=2), ep(0, 1.0, n=2)], pad_id=0)
    assert_rows(run("canon", b, metric="length", alpha=2.0).advantages, b, [1.75, -2.0, -1.5, 1.75])


def test_canon_ties_odd_and_single_groups():
    # g0: equal entropies -> batch order: Low = rows 0, 1 (R 0, 0), High = rows 2, 3 (R 1, 1): A = -1, -1, 1, 1
    # g1 (odd): entropies .2, .1, .3 -> ascending row5 | row4, row6: Low = {5} mu_L = 0, High mu_H = .75
    #           High: R - 0 = 1, .5;  Low: R - .75 = -.75
    # g2 (size 1): mu_L = mu_H = 0 -> A = R + lam*beta = 2 + .5 = 2.5 (beta .5 shifts the others too:
    #           High +.5, Low -.5)
    eps = [ep(0, 0.0, entropy=0.3), ep(0, 0.0, entropy=0.3), ep(0, 1.0, entropy=0.3), ep(0, 1.0, entropy=0.3),
           ep(1, 1.0, entropy=0.2), ep(1, 0.0, entropy=0.1), ep(1, 0.5, entropy=0.3), ep(2, 2.0, entropy=0.5)]
    b = pack(eps, pad_id=0)
    assert_rows(run("canon", b).advantages, b, [-1.0, -1.0, 1.0, 1.0, 1.0, -0.75, 0.5, 2.0])
    assert_rows(run("canon", b, beta=0.5).advantages, b, [-1.5, -1.5, 1.5, 1.5, 1.5, -1.25, 1.0, 2.5])
    # lam .5 on the lone member: .5(2 + .5) + .5(2 - 0) = 2.25
    assert run("canon", b, beta=0.5, lam=0.5).advantages[7].max().item() == pytest.approx(2.25)


# ----------------------------------------------------------------------------------------------------- RiskPO
# One bundle of two questions, 4 responses each: A = 1, 0, 1, 0 (mean .5), B = 1, 1, 1, 0 (mean .75).
# Papers (j-th response of each): S = 2, 1, 2, 0. Sorted 0, 1, 2, 2: q_.2 at position .6 -> .6; q_.8 at 2.4 -> 2.
# sigma_b: mean 1.25, squared deviations .5625 + .0625 + .5625 + 1.5625 = 2.75 -> sqrt(2.75 / 3).
# g_R = ((S - .6)+ - (S - 2)+) / (.6 + E): S=2 -> 1.4/(.6+E), S=1 -> .4/(.6+E), S=0 -> 0
# g_C = -(.6 - S)+ / (.2 + E): only S=0 -> -.6/(.2+E)
# A_paper = (1.5 g_C + g_R) / 2.5 / (sigma_b + E)
SIG_B = math.sqrt(2.75 / 3) + E
AP = [1.4 / (0.6 + E) / 2.5 / SIG_B, 0.4 / (0.6 + E) / 2.5 / SIG_B, 1.4 / (0.6 + E) / 2.5 / SIG_B,
      1.5 * (-0.6 / (0.2 + E)) / 2.5 / SIG_B]


def riskpo_batch(extra=()) -> Batch:
    eps = [ep(0, r) for r in (1.0, 0.0, 1.0, 0.0)] + [ep(1, r) for r in (1.0, 1.0, 1.0, 0.0)] + list(extra)
    return pack(eps, pad_id=0)


def test_riskpo_uniform_and_std_credit():
    b = riskpo_batch()
    assert_rows(run("riskpo", b, bundle_size=2, credit="uniform").advantages, b, AP + AP)
    # sigma_A = sqrt(4 * .25 / 3) = sqrt(1/3); sigma_B = sqrt((3 * .0625 + .5625) / 3) = .5
    sa, sb = math.sqrt(1 / 3) + E, 0.5 + E
    out = run("riskpo", b, bundle_size=2, credit="std")
    assert_rows(out.advantages, b, [a / sa for a in AP] + [a / sb for a in AP])


def test_riskpo_sum_mean_credit_default():
    # deviations r - mean_q per paper: (.5, .25) sum .75 -> 2/3, 1/3;  (-.5, .25) sum -.25 -> 2, -1;
    # (.5, .25) -> 2/3, 1/3;  (-.5, -.75) sum -1.25 -> .4, .6
    b = riskpo_batch()
    expected = [AP[0] * 2 / 3, AP[1] * 2, AP[2] * 2 / 3, AP[3] * 0.4, AP[0] / 3, -AP[1], AP[2] / 3, AP[3] * 0.6]
    assert_rows(run("riskpo", b, bundle_size=2).advantages, b, expected)


def test_riskpo_natural_baseline_pure_rvar_unnormalised():
    # w_mix 0, natural baseline adds q_.2 - q_.8 = -1.4: S=2 -> 0, S=1 -> (.4 - 1.4)/(.6+E), S=0 -> -1.4/(.6+E)
    b = riskpo_batch()
    out = run("riskpo", b, bundle_size=2, credit="uniform", w_mix=0.0, natural_baseline=True, norm_adv_by_std=False)
    ap = [0.0, -1.0 / (0.6 + E), 0.0, -1.4 / (0.6 + E)]
    assert_rows(out.advantages, b, ap + ap)


def test_riskpo_partial_bundle_and_unequal_groups():
    # bundle_size 2 with three questions: {0, 1} as above, then {2} alone with R = 1, 0, 0: papers S = 1, 0, 0,
    # q_.2 = 0 (position .4), q_.8 = .6 (position 1.6), sigma_b = sqrt(1/3): S=1 -> g_R = .6/(.6+E), g_C = 0;
    # S=0 -> both 0
    b = riskpo_batch([ep(2, 1.0), ep(2, 0.0), ep(2, 0.0)])
    lone = 0.6 / (0.6 + E) / 2.5 / (math.sqrt(1 / 3) + E)
    assert_rows(run("riskpo", b, bundle_size=2, credit="uniform").advantages, b, AP + AP + [lone, 0.0, 0.0])
    # one bundle of groups with 3 and 2 responses: 2 papers, S = 1+1, 0+1 = 2, 1; q_.2 = 1.2, q_.8 = 1.8,
    # sigma_b = sqrt(.5). S=2: g_R = .6/(.6+E);  S=1: g_C = -.2/(.2+E). The third response of g0 is in no paper: 0
    b = pack([ep(0, 1.0), ep(0, 0.0), ep(0, 1.0), ep(1, 1.0), ep(1, 1.0)], pad_id=0)
    s = math.sqrt(0.5) + E
    hi, lo = 0.6 / (0.6 + E) / 2.5 / s, 1.5 * (-0.2 / (0.2 + E)) / 2.5 / s
    assert_rows(run("riskpo", b, credit="uniform").advantages, b, [hi, lo, 0.0, hi, lo])


@pytest.mark.parametrize("credit", ["sum_mean", "std", "uniform"])
@pytest.mark.parametrize("reward", [0.0, 1.0])
def test_riskpo_all_equal_rewards_is_zero(credit, reward):
    b = pack([ep(g, reward) for g in range(3) for _ in range(4)] + [ep(9, reward)], pad_id=0)
    assert_rows(run("riskpo", b, credit=credit, bundle_size=2).advantages, b, [0.0] * 13)


def test_riskpo_rejects_unordered_quantiles():
    with pytest.raises(OutriderError, match="alpha"):
        CREDIT.build({"name": "riskpo", "alpha": 0.8, "beta": 0.2})


# ----------------------------------------------------------------------------------------------- ppl_position
# g0: logPPL 1, 2, 3, 4 -> Q1 = 1.75, Q3 = 3.25, IQR 1.5, all inliers; mu 2.5, population sigma sqrt(1.25)
#     w = (-1.5, -.5, .5, 1.5) / 1.1180340 = -1.3416408, -.4472136, .4472136, 1.3416408
# g1: logPPL 1, 1.1, 1.2, 1.3, 10 -> Q1 = 1.1, Q3 = 1.3, IQR .2, bounds [.8, 1.6]: 10 is an outlier;
#     inliers mu 1.15, sigma sqrt(.0125) = .1118034 -> same four w, and (10 - 1.15)/.1118034 = 79.156812
W0 = [-1.3416408, -0.4472136, 0.4472136, 1.3416408]
W1 = W0 + [79.156812]


def ppl_batch() -> Batch:
    g0 = [ep(0, r, logprob=-x) for r, x in zip((1.0, 0.0, 1.0, 0.0), (1.0, 2.0, 3.0, 4.0))]
    g1 = [ep(1, r, logprob=-x) for r, x in zip((1.0, 0.0, 0.0, 0.0, 1.0), (1.0, 1.1, 1.2, 1.3, 10.0))]
    return pack(g0 + g1, pad_id=0)


def test_ppl_weights_per_group_with_iqr_outlier():
    w, inlier = ppl_weights(ppl_batch())
    torch.testing.assert_close(w, torch.tensor(W0 + W1), rtol=1e-4, atol=1e-4)
    assert inlier.tolist() == [1.0] * 8 + [0.0]


def test_ppl_scale_and_penalty_modes():
    # base dr_grpo: g0 A = .5, -.5, .5, -.5; g1 (mean .4) A = .6, -.4, -.4, -.4, .6
    b = ppl_batch()
    base = [0.5, -0.5, 0.5, -0.5, 0.6, -0.4, -0.4, -0.4, 0.6]
    opts = {"base": "dr_grpo", "position_alpha": 0.0, "ppl_alpha": 0.1}
    # scale: A * clamp(1 - .1 w, .8, 1.2): 1.1341641, 1.0447214, .9552786, .8658359, and .8 for w = 79
    scale = [1.1341641, 1.0447214, 0.9552786, 0.8658359] * 2 + [0.8]
    assert_rows(run("ppl_position", b, **opts).advantages, b, [a * s for a, s in zip(base, scale)])
    # penalty: A - .1 sign(A) clip(w, -2, 2): the outlier's w clips to 2 -> .6 - .2 = .4
    clipped = W0 + W0 + [2.0]
    pen = [a - 0.1 * math.copysign(1.0, a) * w for a, w in zip(base, clipped)]
    assert_rows(run("ppl_position", b, mode="penalty", **opts).advantages, b, pen)
    # iqr_mask zeroes the outlier's advantage only
    out = run("ppl_position", b, mode="penalty", iqr_mask=True, **opts)
    assert_rows(out.advantages, b, pen[:-1] + [0.0])


def test_ppl_zero_logprobs_leave_the_base_unchanged():
    # hand-made episodes carry no log-probs: logPPL = 0 everywhere, sigma 0 -> 1, w_ppl = 0
    b = canon_batch()
    assert torch.equal(b.behaviour_logprobs, torch.zeros_like(b.behaviour_logprobs))
    out = run("ppl_position", b, position_alpha=0.0, ppl_alpha=0.5)
    torch.testing.assert_close(out.advantages, run("grpo", b).advantages)


def test_position_bonus_at_known_positions_with_cap():
    # one group, R = 1, 0 with 4 action tokens each -> dr_grpo A = +-.5; rel_pos = 0, .25, .5, .75
    # sigma(15(rel - .5)) = sigma(-7.5), sigma(-3.75), sigma(0), sigma(3.75) = .00055278, .0229774, .5, .9770226
    b = pack([ep(0, 1.0, n=4), ep(0, 0.0, n=4)], pad_id=0)
    sig = [0.00055278, 0.0229774, 0.5, 0.9770226]
    opts = {"base": "dr_grpo", "ppl_alpha": 0.0}
    out = run("ppl_position", b, position_alpha=0.1, **opts).advantages
    # alpha .1: every bonus is below the cap .5|A| = .25 -> A +- .1 sigma
    torch.testing.assert_close(out[0, 1:5], torch.tensor([0.5 + 0.1 * s for s in sig]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1, 1:5], torch.tensor([-0.5 - 0.1 * s for s in sig]), rtol=1e-5, atol=1e-6)
    # alpha 2: bonuses .0011056, .0459548, 1, 1.9540453 -> the last two capped at .25 (A becomes 1.5x at most)
    out = run("ppl_position", b, position_alpha=2.0, **opts).advantages
    torch.testing.assert_close(out[0, 1:5], torch.tensor([0.5011056, 0.5459548, 0.75, 0.75]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1, 1:5], -out[0, 1:5])
    assert out[:, 0].abs().sum() == 0 and out[:, 5:].abs().sum() == 0  # observation and padding stay 0


def test_position_bonus_keeps_zero_advantage_and_masked_tokens_zero():
    b = pack([ep(0, 1.0, n=3), ep(0, 1.0, n=1)], pad_id=0)  # all-equal group: A = 0
    out = run("ppl_position", b, position_alpha=0.5)
    assert torch.equal(out.advantages, torch.zeros_like(out.advantages))


def test_ppl_position_base_validation():
    with pytest.raises(OutriderError, match="credit.base"):
        CREDIT.build({"name": "ppl_position", "base": {"name": "nope"}})
    with pytest.raises(OutriderError, match="value head"):
        CREDIT.build({"name": "ppl_position", "base": {"name": "gae"}})
    with pytest.raises(OutriderError, match="credit.base"):
        CREDIT.build({"name": "ppl_position", "base": {"name": "grpo", "bogus": 1}})
    _, cfg = CREDIT.build({"name": "ppl_position", "base": "rloo"})
    assert cfg.base == {"name": "rloo"}


# ------------------------------------------------------------------------------------------------------- PEAR
def pear(episodes: list[Episode], **options) -> list[float]:
    entry, cfg = SCORE.build({"name": "pear", **options})
    return entry.fn(episodes, cfg)


def test_pear_think_answer_split_char_tokenizer():
    # "ab</think>cd": 12 characters, 12 char tokens + EOS = 13 tokens; the delimiter starts at character 2 -> the
    # think phase is the first round(2 * min(13, 12) / 12) = 2 tokens (entropies 1, 3: mean 2); the other 11
    # (delimiter, answer, EOS) have entropy .5. R = -.1 * 2 + .2 * .5 = -.1
    e = ep(0, 1.0, entropy=[1.0, 3.0] + [0.5] * 11, action="ab</think>cd")
    assert think_token_count(e, "</think>") == 2
    assert pear([e], beta=0.2) == pytest.approx([-0.1])
    assert pear([e]) == pytest.approx([-0.2])  # defaults alpha .1, beta 0


def test_pear_subword_approximation_and_multi_turn():
    # 4 tokens for 14 characters, delimiter at 4: round(4 * 4 / 14) = round(1.14) = 1 think token
    e = ep(0, 1.0, entropy=[2.0, 1.0, 1.0, 1.0], action="abcd</think>xy")
    assert think_token_count(e, "</think>") == 1
    assert pear([e], alpha=0.5, beta=1.0) == pytest.approx([-0.5 * 2.0 + 1.0])
    # two turns "ab" | "c</think>d" (char tokens): delimiter at 3 = 1 character into turn 1 -> 2 + 1 think tokens
    t0 = Turn(observation="q", observation_ids=[5], action="ab", action_ids=[1, 2], behaviour_entropy=[1.0, 1.0])
    t1 = Turn(observation="o", observation_ids=[5], action="c</think>d", action_ids=[3] * 10,
              behaviour_entropy=[4.0] + [0.0] * 9)
    mt = Episode(group_id=0, seed=0, turns=[t0, t1])
    assert think_token_count(mt, "</think>") == 3
    assert pear([mt], alpha=1.0) == pytest.approx([-2.0])  # think mean (1 + 1 + 4)/3


def test_pear_no_delimiter_is_all_think_and_gating():
    e = ep(0, 0.0, entropy=[1.0, 2.0, 3.0], action="abc", success=False)
    ok = ep(0, 1.0, entropy=[1.0, 2.0, 3.0], action="abc", success=True)
    assert pear([e, ok], beta=5.0) == pytest.approx([-0.2, -0.2])  # whole response think, answer empty
    assert pear([e, ok], only_correct=True) == pytest.approx([0.0, -0.2])
    assert pear([ep(0, 1.0, n=3, action="abc")]) == [0.0]  # no entropies recorded (demonstration): 0
    assert pear([e], delimiter="a") == pytest.approx([0.0])  # delimiter first: empty think phase


def test_pear_composes_with_the_verifier():
    e = ep(0, 0.0, entropy=[1.0, 3.0], action="ab", success=True)
    e.turns[0].reward = 1.0
    comps = []
    for c in ({"name": "verifier", "weight": 1.0}, {"name": "pear", "weight": 2.0, "alpha": 0.1}):
        entry, cfg = SCORE.build({k: v for k, v in c.items() if k != "weight"})
        comps.append(Component(c["name"], entry.create(cfg), c["weight"]))
    compose([e], comps)
    assert e.rewards["trajectory"]["pear"] == pytest.approx(-0.4)  # 2 * (-.1 * 2)
    assert e.total_reward() == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name,credit,score", [
    ("canon_multisol", "canon", "verifier"), ("riskpo_multisol", "riskpo", "verifier"),
    ("ppl_position_multisol", "ppl_position", "verifier"), ("pear_multisol", "grpo", "pear"),
])
def test_recipes_load(name, credit, score):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    resolved = resolve(recipe)
    assert resolved["credit"]["name"] == credit
    assert score in [c["name"] for c in resolved["score"]]
    # everything but the credit and score sections is the GRPO baseline's, so runs compare like with like
    baseline = resolve(load_recipe(RECIPES / "grpo_multisol.yaml"))
    for section in set(resolved) - {"credit", "score"}:
        assert resolved[section] == baseline[section], section
