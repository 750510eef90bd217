"""Entropy control against hand-computed numbers: Clip-Cov and KL-Cov [153], the high-entropy token mask [168],
SIREN [149] and the adaptive entropy coefficient (Skywork-OR1), then each piece inside `learner_step`."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from outrider.data import Episode, Turn, pack
from outrider.errors import OutriderError
from outrider.policy.model import Policy
from outrider.update import ENTROPY, LOSSES, TokenContext
from outrider.update.aggregate import aggregate
from outrider.update.entropy_control import peak_mask, top_p_entropy
from outrider.update.learner import UpdateConfig, learner_step, prepare
from conftest import learner_terms


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def build_regulator(name: str, **options):
    entry, cfg = ENTROPY.build({"name": name, **options})
    return entry.create(cfg)


def nucleus_entropy(probs: list[float]) -> float:
    """Entropy of the renormalised nucleus, by hand."""
    z = sum(probs)
    return -sum(p / z * math.log(p / z) for p in probs)


# ---------------------------------------------------------------- Clip-Cov / KL-Cov

# 12 action tokens in two rows (plus one masked token per row). A and logp are chosen so that the masked means
# over the action tokens are exactly mean A = 0 and mean logp = −12 (the shift −10 does not change cov):
#   cov_t = A_t · (logp_t + 12)
# row 0: A  2   2  -2  -2   2  -2      logp+12:  2   1  -2  -1   0   0     cov: 4  2  4  2  0  0
# row 1: A  2  -2   2  -2   2  -2      logp+12: .5 -.5 2.5 -2.5 3  -3      cov: 1  1  5  5  6  6
COV_A = [[2, 2, -2, -2, 2, -2, 9], [2, -2, 2, -2, 2, -2, -9]]
COV_LOGP = [[2, 1, -2, -1, 0, 0, 7], [0.5, -0.5, 2.5, -2.5, 3, -3, 7]]
COV_MASK = [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0]]
COV = [4, 2, 4, 2, 0, 0, 1, 1, 5, 5, 6, 6]
# 1 < cov < 5 strictly; flat index 0 has cov 4 but PPO clips it (see cov_ctx); flat 6, 7, 8, 9 sit on the bounds
BAND = {1, 2, 3}


def cov_ctx(log_ratio: list[list[float]] | None = None, generator: torch.Generator | None = None) -> TokenContext:
    """Flat token 0 has ratio 1.5 with A = 2 > 0: PPO's upper clip (1.2) holds its loss at −2.4."""
    logp = (t(COV_LOGP) - 12.0).requires_grad_(True)
    if log_ratio is None:
        log_ratio = [[math.log(1.5)] + [0.0] * 6, [0.0] * 7]
    old = logp.detach() - t(log_ratio)
    return TokenContext(logp, old, t(COV_A), t(COV_MASK), generator=generator)


def flat_zero_loss_tokens(loss: torch.Tensor) -> set[int]:
    flat = loss.detach()[t(COV_MASK) > 0]
    return {i for i, v in enumerate(flat.tolist()) if v == 0.0}


def test_clip_cov_detaches_exactly_the_band():
    entry, cfg = LOSSES.build({"name": "clip_cov", "clip_ratio": 0.25})  # n = int(0.25·12) = 3 = |band|
    ctx = cov_ctx()
    loss, m = entry.fn(ctx, cfg)
    # token 0 clipped: max(−2·1.5, −2·1.2) = −2.4; band tokens 1, 2, 3 → 0; the rest unclipped −A·1
    expected = t([[-2.4, 0.0, 0.0, 0.0, -2.0, 2.0, 0.0], [-2.0, 2.0, -2.0, 2.0, -2.0, 2.0, 0.0]])
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    # gradient exactly 0 at the clipped token, the band tokens and the masked ones; −A·r elsewhere
    grad = t([[0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 0.0], [-2.0, 2.0, -2.0, 2.0, -2.0, 2.0, 0.0]])
    assert torch.equal(ctx.logprobs.grad, grad)
    torch.testing.assert_close(m["cov_detached_frac"], t(3 / 12))
    torch.testing.assert_close(m["cov_mean"], t(sum(COV) / 12))
    torch.testing.assert_close(m["clip_frac_high"], t(1 / 12))
    torch.testing.assert_close(m["clip_frac_low"], t(0.0))


def test_clip_cov_never_selects_ppo_clipped_tokens_and_bounds_are_strict():
    # n = 12 ≥ every candidate: still only the band, never token 0 (clipped) nor cov = 1, 5 (on the bounds)
    entry, cfg = LOSSES.build({"name": "clip_cov", "clip_ratio": 1.0})
    loss, m = entry.fn(cov_ctx(), cfg)
    assert flat_zero_loss_tokens(loss) == BAND
    # clip_high 0.6 lets ratio 1.5 through unclipped: token 0 (cov 4) joins the band and is detached
    entry, cfg = LOSSES.build({"name": "clip_cov", "clip_ratio": 1.0, "clip_high": 0.6})
    loss, m = entry.fn(cov_ctx(), cfg)
    assert flat_zero_loss_tokens(loss) == BAND | {0}
    assert m["clip_frac_high"] == 0.0
    # a wider band [0.5, 5.5] takes in the cov = 1 and cov = 5 tokens (flat 6, 7, 8, 9)
    entry, cfg = LOSSES.build({"name": "clip_cov", "clip_ratio": 1.0, "clip_cov_lb": 0.5, "clip_cov_ub": 5.5})
    loss, _ = entry.fn(cov_ctx(), cfg)
    assert flat_zero_loss_tokens(loss) == BAND | {6, 7, 8, 9}


def test_clip_cov_random_selection_is_seeded():
    # default ratio 2e-4: n = max(int(2e-4·12), 1) = 1 token drawn from the band
    entry, cfg = LOSSES.build({"name": "clip_cov"})
    picks = []
    for seed in range(8):
        loss, m = entry.fn(cov_ctx(generator=torch.Generator().manual_seed(seed)), cfg)
        chosen = flat_zero_loss_tokens(loss)
        assert len(chosen) == 1 and chosen <= BAND
        torch.testing.assert_close(m["cov_detached_frac"], t(1 / 12))
        picks.append(chosen)
    again, _ = entry.fn(cov_ctx(generator=torch.Generator().manual_seed(3)), cfg)
    assert flat_zero_loss_tokens(again) == picks[3]
    assert len({min(p) for p in picks}) > 1  # the draw depends on the generator
    # no generator: a fresh one seeded 0, so the same as seed 0
    loss, _ = entry.fn(cov_ctx(), cfg)
    assert flat_zero_loss_tokens(loss) == picks[0]


def test_clip_cov_options_validated():
    for bad in ({"clip_cov_lb": 5.0, "clip_cov_ub": 1.0}, {"clip_ratio": 1.5}, {"clip_low": 1.0}, {"coef": 1}):
        with pytest.raises(OutriderError):
            LOSSES.build({"name": "clip_cov", **bad})


def test_kl_cov_penalises_exactly_the_top_k():
    # log-ratios Δ: row 0 all 0.1, row 1 alternating ±0.2; k = int(0.34·12) = 4 → cov 6, 6, 5, 5 (flat 8..11)
    deltas = [[0.1] * 6 + [0.0], [0.2, -0.2, 0.2, -0.2, 0.2, -0.2, 0.0]]
    entry, cfg = LOSSES.build({"name": "kl_cov", "kl_cov_ratio": 0.34, "ppo_kl_coef": 0.5})
    ctx = cov_ctx(deltas)
    loss, m = entry.fn(ctx, cfg)
    a, d, mask = t(COV_A), t(deltas), t(COV_MASK)
    top = torch.zeros_like(mask)
    top[1, 2:6] = 1.0
    # no clipping anywhere (row 0 has ratio e^0.1 and would not be clipped either way; row 1 ±0.2 is inside too)
    expected = (-a * torch.exp(d) + 0.5 * d.abs() * top) * mask
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    # d/dlogp: −A·r everywhere, + β·sign(Δ) on the top-k
    torch.testing.assert_close(ctx.logprobs.grad, (-a * torch.exp(d) + 0.5 * torch.sign(d) * top) * mask)
    torch.testing.assert_close(m["kl_cov_frac"], t(4 / 12))
    torch.testing.assert_close(m["kl_abs_mean"], t((6 * 0.1 + 6 * 0.2) / 12))
    torch.testing.assert_close(m["cov_mean"], t(3.0))


def test_kl_cov_default_selects_one_token_and_never_clips():
    # default ratio 2e-4: k = max(1, int(2e-4·12)) = 1. Flat 10 and 11 tie at the top cov 6; give them log-ratios
    # 1.0 and −0.5 so the penalty |Δ| shows which one was picked
    deltas = [[0.0] * 7, [0.0, 0.0, 0.0, 0.0, 1.0, -0.5, 0.0]]
    entry, cfg = LOSSES.build({"name": "kl_cov"})
    assert cfg.kl_cov_ratio == 2e-4 and cfg.ppo_kl_coef == 1.0
    loss, m = entry.fn(cov_ctx(deltas), cfg)
    torch.testing.assert_close(m["kl_cov_frac"], t(1 / 12))
    surrogate = -t([2, -2]) * torch.exp(t([1.0, -0.5]))  # −A·r, unclipped
    extra = (loss.detach()[1, 4:6] - surrogate).tolist()
    assert extra == pytest.approx([1.0, 0.0]) or extra == pytest.approx([0.0, 0.5])
    # every other action token is exactly −A·r
    rest = loss.detach().clone()
    rest[1, 4:6] = 0.0
    torch.testing.assert_close(rest, (-t(COV_A) * t(COV_MASK)) * torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 1]]))
    # flat 10 has ratio e with A = 2 > 0: PPO would clip it at −2.4, KL-Cov keeps −2e (+1 if picked)
    assert loss[1, 4].item() < -2.4


# ---------------------------------------------------------------- entropy_mask [168]


def entropy_ctx(entropy, mask) -> TokenContext:
    zeros = torch.zeros_like(t(mask))
    agg = partial(aggregate, mode="token-mean")
    return TokenContext(zeros, zeros, zeros, t(mask), entropy=t(entropy), aggregate=agg)


def test_entropy_mask_keeps_the_top_quantile():
    # valid H sorted: 0.1 0.2 0.3 0.5 0.5 0.7 0.9 (the masked 9.0 is ignored)
    h, mask = [[0.1, 0.5, 0.9, 0.3], [0.7, 0.5, 9.0, 0.2]], [[1, 1, 1, 1], [1, 1, 0, 1]]
    # ρ = 0.5: τ = quantile 0.5 = sorted[3] = 0.5; H ≥ 0.5 keeps both ties at 0.5
    out = build_regulator("entropy_mask", rho=0.5)(entropy_ctx(h, mask))
    torch.testing.assert_close(out.token_weight, t([[0, 1, 1, 0], [1, 1, 0, 0]]))
    assert out.term.item() == 0.0
    torch.testing.assert_close(out.metrics["threshold"], t(0.5))
    torch.testing.assert_close(out.metrics["kept_frac"], t(4 / 7))
    # default ρ = 0.2: quantile 0.8 at position 6·0.8 = 4.8 → 0.5 + 0.8·(0.7 − 0.5) = 0.66
    out = build_regulator("entropy_mask")(entropy_ctx(h, mask))
    torch.testing.assert_close(out.metrics["threshold"], t(0.66))
    torch.testing.assert_close(out.token_weight, t([[0, 0, 1, 0], [1, 0, 0, 0]]))
    # ρ = 1 keeps every action token, ρ = 0 only the maximum
    assert torch.equal(build_regulator("entropy_mask", rho=1.0)(entropy_ctx(h, mask)).token_weight, t(mask))
    torch.testing.assert_close(build_regulator("entropy_mask", rho=0.0)(entropy_ctx(h, mask)).token_weight,
                               t([[0, 0, 1, 0], [0, 0, 0, 0]]))


# ---------------------------------------------------------------- siren [149]


def logits_of(probs: list[float], order: list[int] | None = None) -> torch.Tensor:
    x = torch.log(t(probs))
    return x if order is None else x[order]


def test_top_p_entropy_by_hand():
    p = [0.5, 0.2, 0.15, 0.1, 0.05]
    shuffled = logits_of(p, [3, 0, 4, 2, 1])  # vocabulary order must not matter
    # top_p 0.8: cum 0.5, 0.7, 0.85 → nucleus {0.5, 0.2}; 0.15 crosses 0.8 and is excluded
    torch.testing.assert_close(top_p_entropy(shuffled, 0.8), t(nucleus_entropy([0.5, 0.2])))
    # top_p 0.9: cum 0.85 < 0.9 → {0.5, 0.2, 0.15}
    torch.testing.assert_close(top_p_entropy(shuffled, 0.9), t(nucleus_entropy([0.5, 0.2, 0.15])))
    # top_k 2 truncates the search: {0.5, 0.2} even at top_p 0.9
    torch.testing.assert_close(top_p_entropy(shuffled, 0.9, top_k=2), t(nucleus_entropy([0.5, 0.2])))
    # p_max 0.9 ≥ 0.8: empty nucleus, H^p = 0 exactly (and no NaN)
    assert top_p_entropy(logits_of([0.05, 0.9, 0.05]), 0.8).item() == 0.0
    # top_p 1: the plain entropy of the whole distribution
    torch.testing.assert_close(top_p_entropy(logits_of([0.6, 0.3, 0.1]), 1.0), t(nucleus_entropy([0.6, 0.3, 0.1])))


def test_top_p_entropy_has_gradient():
    logits = logits_of([0.5, 0.2, 0.15, 0.1, 0.05]).requires_grad_(True)
    top_p_entropy(logits, 0.8).backward()
    g = logits.grad
    # H of the renormalised pair [5/7, 2/7] moves with the two nucleus logits only (opposite, and towards
    # equal logits); the others get only the 1e-12 guard's ~1e-13
    assert g[0] < 0 < g[1] and torch.allclose(g[0], -g[1])
    assert g[2:].abs().max() < 1e-12


def test_peak_mask_is_per_response_and_strict():
    x = t([[1, 2, 3, 4, 5], [2, 2, 2, 0, 0], [0, 9, 1, 3, 0], [7, 7, 7, 7, 7]])
    mask = t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    # row 0: q0.8 of 1..5 = 4.2 → {5}; row 1: flat 2, 2, 2 → threshold 2, strict > → none;
    # row 2: valid 0, 1, 3 → 1 + 0.6·2 = 2.2 → {3} (a batch threshold, 3, would drop it; 9 is masked);
    # row 3: no action token → none
    expected = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(peak_mask(x, mask, 0.8), expected)


P_A = [0.4, 0.3, 0.2, 0.05, 0.05]  # top-0.8 nucleus {0.4, 0.3}
P_B = [0.9, 0.04, 0.03, 0.02, 0.01]  # empty nucleus: H^p = 0
P_C = [0.3, 0.25, 0.2, 0.15, 0.1]  # nucleus {0.3, 0.25, 0.2}
H_A, H_C = nucleus_entropy([0.4, 0.3]), nucleus_entropy([0.3, 0.25, 0.2])


def siren_ctx(rows: list[list[list[float]]], mask: list[list[int]]) -> TokenContext:
    logits = torch.stack([torch.stack([logits_of(p) for p in row]) for row in rows]).requires_grad_(True)
    zeros = torch.zeros_like(t(mask))
    return TokenContext(zeros, zeros, zeros, t(mask), entropy=zeros, logits=logits)


def test_siren_anchor_term_and_state():
    reg = build_regulator("siren")
    assert reg.needs.logits and (reg.cfg.coef, reg.cfg.mask_ratio, reg.cfg.top_p, reg.cfg.top_k) == (0.005, 0.8, 0.8, 0)
    mask = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # H^p row 0: [H_C, H_A, 0, 0, 0] → q0.8 = H_A + 0.2·(H_C − H_A) → only the H_C token; row 1: [H_A, 0, 0, 0]
    # → q0.8 = 0.4·H_A → only the H_A token (padding P_C is masked). Ĥ = (H_C + H_A) / 2
    first = siren_ctx([[P_C, P_A, P_B, P_B, P_B], [P_A, P_B, P_B, P_B, P_C]], mask)
    out = reg(first)
    h1 = (H_C + H_A) / 2
    torch.testing.assert_close(out.metrics["topp_entropy"], t(h1))
    assert out.metrics["anchor"] == pytest.approx(h1)
    torch.testing.assert_close(out.metrics["peak_frac"], t(2 / 9))
    assert out.term.item() == 0.0  # anchored on itself at the first call
    assert reg.state_dict() == {"anchor": pytest.approx(h1)}

    # second call: both peaks are H_C → Ĥ = H_C; the anchor stays at the first value
    second = [[P_C, P_A, P_B, P_B, P_B], [P_C, P_B, P_B, P_B, P_A]]
    ctx = siren_ctx(second, mask)
    out = reg(ctx)
    expected = 0.005 * (H_C - h1) ** 2
    torch.testing.assert_close(out.term, t(expected))
    assert reg.anchor == pytest.approx(h1)
    out.term.backward()
    # gradient only at the selected peak tokens: row 0 t0 and row 1 t0
    touched = ctx.logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, torch.tensor([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool))

    # resume: a fresh regulator with the saved state does not re-anchor
    fresh = build_regulator("siren")
    fresh.load_state_dict(reg.state_dict())
    torch.testing.assert_close(fresh(siren_ctx(second, mask)).term, t(expected))
    # without the state it would anchor on this batch instead
    assert build_regulator("siren")(siren_ctx(second, mask)).term.item() == 0.0


def test_siren_needs_logits():
    zeros = t([[0.0]])
    with pytest.raises(ValueError, match="logits"):
        build_regulator("siren")(TokenContext(zeros, zeros, zeros, t([[1]]), entropy=zeros))


# ---------------------------------------------------------------- adaptive_entropy (Skywork-OR1)


def h_ctx(h: float) -> TokenContext:
    """Token-mean entropy h over two action tokens (a masked token carries 5.0, ignored)."""
    return entropy_ctx([[h, h, 5.0]], [[1, 1, 0]])


ADAPTIVE = {"target": 0.5, "delta": 0.1, "coef_init": 0.0, "coef_min": 0.0, "coef_max": 0.25}
# (H this call, c used, active, term, c after): c_eff uses the previous call's H (the first call: its own);
# then c ± δ by this call's H ≤ 0.5, clamped to [0, 0.25]
TRAJECTORY = [
    (0.3, 0.0, True, -0.0, 0.1),  # first call gated on its own H 0.3 ≤ 0.5
    (0.4, 0.1, True, -0.04, 0.2),  # last 0.3 ≤ target → active
    (0.8, 0.2, True, -0.16, 0.1),  # active by the last H 0.4; H 0.8 > target lowers c
    (0.2, 0.1, False, 0.0, 0.2),  # last 0.8 > target: off for this call
    (0.5, 0.2, True, -0.1, 0.25),  # H = target counts as ≤; 0.3 clamped to c_max
    (0.1, 0.25, True, -0.025, 0.25),  # stays at c_max
    (0.9, 0.25, True, -0.225, 0.15),
    (0.9, 0.15, False, 0.0, 0.05),
    (0.9, 0.05, False, 0.0, 0.0),  # 0.05 − 0.1 clamped to c_min
]


def test_adaptive_entropy_trajectory_and_clamps():
    reg = build_regulator("adaptive_entropy", **ADAPTIVE)
    for h, coef, active, term, after in TRAJECTORY:
        out = reg(h_ctx(h))
        assert out.metrics["coef"] == pytest.approx(coef)
        assert out.metrics["active"] == float(active)
        assert out.term.item() == pytest.approx(term)
        assert reg.coef == pytest.approx(after)
        assert reg.last_entropy == pytest.approx(h)


def test_adaptive_entropy_gradient_first_call_and_state_round_trip():
    # the term is −c_eff · token-mean(H): gradient −c/2 per action token
    reg = build_regulator("adaptive_entropy", **{**ADAPTIVE, "coef_init": 0.2})
    ctx = h_ctx(0.3)
    ctx.entropy.requires_grad_(True)
    reg(ctx).term.backward()
    torch.testing.assert_close(ctx.entropy.grad, t([[-0.1, -0.1, 0.0]]))
    # a first call above target is off even with c > 0
    reg2 = build_regulator("adaptive_entropy", **{**ADAPTIVE, "coef_init": 0.2})
    assert reg2(h_ctx(0.8)).term.item() == 0.0 and reg2.coef == pytest.approx(0.1)
    # resume: a fresh regulator continues where the saved one left off
    a = build_regulator("adaptive_entropy", **ADAPTIVE)
    for h, *_ in TRAJECTORY[:3]:
        a(h_ctx(h))
    b = build_regulator("adaptive_entropy", **ADAPTIVE)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for h, *_ in TRAJECTORY[3:]:
        oa, ob = a(h_ctx(h)), b(h_ctx(h))
        assert oa.term.item() == ob.term.item() and oa.metrics == ob.metrics
    defaults = ENTROPY.build({"name": "adaptive_entropy"})[1]
    assert (defaults.target, defaults.delta, defaults.coef_init, defaults.coef_max) == (0.2, 0.005, 0.0, 0.005)
    with pytest.raises(OutriderError):
        ENTROPY.build({"name": "adaptive_entropy", "coef_init": 0.01})  # above coef_max 0.005


# ---------------------------------------------------------------- inside the learner


def small_batch(policy: Policy):
    def episode(group: int, prompt: str, action: str, reward: float) -> Episode:
        ep = Episode(group_id=group, seed=group)
        ep.turns.append(Turn(observation=prompt, observation_ids=policy.encode(prompt), action=action,
                             action_ids=policy.encode(action)))
        ep.rewards["trajectory"]["r"] = reward
        return ep

    eps = [episode(0, "ab ->", "bab", 1.0), episode(0, "ab ->", "bb", 0.0),
           episode(1, "xyz ->", "zyx", 1.0), episode(1, "xyz ->", "q", 0.0)]
    batch = pack(eps, policy.pad_id, policy.bos_id)
    batch.advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None] * batch.action_mask
    return batch


@pytest.mark.parametrize("loss, entropy", [
    ({"name": "clip_cov", "clip_ratio": 0.2}, {"name": "none"}),
    ({"name": "kl_cov", "kl_cov_ratio": 0.2}, {"name": "none"}),
    ({"name": "ppo"}, {"name": "entropy_mask"}),
    ({"name": "ppo"}, {"name": "siren"}),
    ({"name": "ppo"}, {"name": "adaptive_entropy", "target": 10.0}),
])
def test_pieces_run_inside_learner_step(loss, entropy):
    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    cfg = UpdateConfig(epochs=2, minibatches=2, lr=1e-2, loss=loss, entropy=entropy)
    batch = small_batch(policy)
    prepare(batch, policy, None, cfg, 1.0, need_old=True, need_values=False)
    entry, reg_cfg = ENTROPY.build(cfg.entropy)
    regulator = entry.create(reg_cfg)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    metrics = learner_step(policy, opt, batch, learner_terms(LOSSES.build(cfg.loss), cfg, regulator), cfg, 1.0,
                           torch.Generator().manual_seed(0), norm_length=4)
    assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics
    if entropy["name"] != "none":
        assert any(k.startswith("entropy_reg/") for k in metrics)
    if entropy["name"] == "adaptive_entropy":  # target far above the entropy: on, and c grew every step
        assert regulator.coef == pytest.approx(min(4 * 0.005, 0.005))
