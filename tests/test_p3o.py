"""P3O [45] (`update/p3o.py`) against hand-computed gradients, its two clipping variants on hand-made ratios, its
invariance to a per-prompt reward shift, and the `prompt_offset` component (`score/offset.py`)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from outrider.data import Batch, Episode, Turn
from outrider.score import SCORE
from outrider.update import TERMS, TokenContext
from outrider.errors import OutriderError
from outrider.update.p3o import group_pairs, judge_flips, p3o_pair_loss

# four rows, groups (0, 0, 1, 1); position 0 is the prompt; row 1 has one trained token
MASK = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 1]], dtype=torch.float)


def context(rewards, log_ratio=None, groups=(0, 0, 1, 1), mask=MASK) -> TokenContext:
    """``rewards``: each row's summed reward, put on its last position; ``log_ratio``: log π_θ − log π_old per
    position (0: on-policy)."""
    B, T = mask.shape
    old = torch.full((B, T), -1.0)
    lr = torch.zeros(B, T) if log_ratio is None else log_ratio
    logprobs = (old + lr).requires_grad_(True)
    token_rewards = torch.zeros(B, T)
    token_rewards[:, -1] = torch.tensor(rewards, dtype=torch.float)
    token_rewards[1, 1], token_rewards[1, 2] = token_rewards[1, 2], 5.0  # row 1: reward on its trained token; junk off it
    batch = Batch(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.long),
                  action_mask=mask, token_rewards=token_rewards, step_index=torch.zeros(B, T, dtype=torch.long),
                  group_index=torch.tensor(groups), sample_weight=torch.ones(B))
    return TokenContext(logprobs, old, torch.zeros(B, T), mask, batch=batch)


def run(ctx: TokenContext, **options):
    out = TERMS.create({"name": "p3o", **options})(ctx)
    out.loss.backward()
    return out, ctx.logprobs.grad


@pytest.mark.parametrize("clip", ["separate", "joint"])
def test_on_policy_gradient_is_the_pairwise_policy_gradient(clip):
    # rewards (1, 0 | 0.5, 2): δ = 0.5 and −0.75; at ρ = 1 the loss gradient on every trained token of y₁ is −δ/2
    # (mean over 2 pairs), +δ/2 on y₂'s
    out, g = run(context([1.0, 0.0, 0.5, 2.0]), clip=clip)
    assert out.loss.item() == pytest.approx(0.0 if clip == "separate" else -(0.5 - 0.75) / 2, abs=1e-6)
    want = torch.tensor([[0, -0.25, -0.25], [0, 0.25, 0], [0, 0.375, 0.375], [0, -0.375, -0.375]])
    assert torch.allclose(g, want, atol=1e-6)
    assert out.metrics["pairs"] == 2.0 and out.metrics["reward_gap"].item() == pytest.approx(1.25)
    assert out.metrics["clip_frac"].item() == 0.0 and out.metrics["ratio_mean"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("clip", ["separate", "joint"])
def test_equal_rewards_give_zero_gradient(clip):
    ratios = torch.tensor([[0.0, 0.1, -0.3], [0.0, 0.4, 0.0], [0.0, -0.2, 0.05], [0.0, 0.3, 0.3]])
    _, g = run(context([0.7, 0.7, -2.0, -2.0], log_ratio=ratios), clip=clip)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("clip", ["separate", "joint"])
def test_a_per_prompt_shift_changes_nothing(clip):
    ratios = torch.tensor([[0.0, 0.05, -0.1], [0.0, 0.3, 0.0], [0.0, -0.2, 0.05], [0.0, 0.1, 0.3]])
    out_a, g_a = run(context([1.0, 0.0, 0.5, 2.0], log_ratio=ratios), clip=clip)
    out_b, g_b = run(context([1.0 + 7.0, 0.0 + 7.0, 0.5 - 3.0, 2.0 - 3.0], log_ratio=ratios), clip=clip)
    assert out_a.loss.item() == pytest.approx(out_b.loss.item(), abs=1e-6)
    assert torch.allclose(g_a, g_b, atol=1e-6)


def test_separate_clipping_on_hand_made_ratios():
    # δ = 1: y₁ has ρ₁ = e^0.5 > 1.2 (its +δ clipped: no gradient, loss −1.2); y₂ has ρ₂ = e^−0.1 inside the
    # bounds (advantage −δ: loss +ρ₂, gradient ρ₂ on its log-ratio)
    delta = torch.tensor([1.0])
    l1, l2 = torch.tensor([0.5], requires_grad=True), torch.tensor([-0.1], requires_grad=True)
    loss, held = p3o_pair_loss(delta, l1, l2, "separate", 0.2)
    loss.sum().backward()
    assert loss.item() == pytest.approx(-1.2 + math.exp(-0.1), abs=1e-6)
    assert l1.grad.item() == 0.0 and l2.grad.item() == pytest.approx(math.exp(-0.1), abs=1e-6)
    assert held.item()
    # δ = −1: ρ₁ = e^−0.5 < 0.8 clipped (advantage −1: loss 0.8, no gradient); ρ₂ = e^0.5 > 1.2 with advantage +1:
    # clipped as well (loss −1.2)
    l1, l2 = torch.tensor([-0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    loss, _ = p3o_pair_loss(-delta, l1, l2, "separate", 0.2)
    loss.sum().backward()
    assert loss.item() == pytest.approx(0.8 - 1.2, abs=1e-6)
    assert l1.grad.item() == 0.0 and l2.grad.item() == 0.0


def test_joint_clipping_on_hand_made_ratios():
    # ρ₁ = e^0.5 and ρ₂ = e^0.3 each leave [0.8, 1.2], but the pair's ratio e^0.2 = 1.221 > 1.2 clips (δ > 0)
    delta = torch.tensor([1.0])
    l1, l2 = torch.tensor([0.5], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    loss, held = p3o_pair_loss(delta, l1, l2, "joint", 0.2)
    loss.sum().backward()
    assert loss.item() == pytest.approx(-1.2, abs=1e-6) and held.item()
    assert l1.grad.item() == 0.0 and l2.grad.item() == 0.0
    # ρ₁₂ = e^0.1 inside: loss −δ ρ₁₂, gradient −δ ρ₁₂ on log ρ₁ and +δ ρ₁₂ on log ρ₂ (separate would clip ρ₁)
    l1, l2 = torch.tensor([0.4], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    loss, held = p3o_pair_loss(delta, l1, l2, "joint", 0.2)
    loss.sum().backward()
    r = math.exp(0.1)
    assert loss.item() == pytest.approx(-r, abs=1e-6) and not held.item()
    assert l1.grad.item() == pytest.approx(-r, abs=1e-6) and l2.grad.item() == pytest.approx(r, abs=1e-6)
    # δ < 0 and ρ₁₂ = e^−0.4 < 0.8: the lower bound holds (loss 0.8·1, no gradient)
    l1, l2 = torch.tensor([-0.2], requires_grad=True), torch.tensor([0.2], requires_grad=True)
    loss, held = p3o_pair_loss(-delta, l1, l2, "joint", 0.2)
    loss.sum().backward()
    assert loss.item() == pytest.approx(0.8, abs=1e-6) and held.item() and l1.grad.item() == 0.0


def test_pairs_inside_groups():
    groups = torch.tensor([3, 3, 7, 3, 7, 9])
    first, second = group_pairs(groups, "all")
    assert list(zip(first.tolist(), second.tolist())) == [(0, 1), (0, 3), (1, 3), (2, 4)]
    first, second = group_pairs(groups, "adjacent")
    assert list(zip(first.tolist(), second.tolist())) == [(0, 1), (2, 4)]
    # a minibatch of lone rows has no pair: loss 0 with a gradient path, no NaN
    out, g = run(context([1.0, 0.0, 0.5, 2.0], groups=(0, 1, 2, 3)))
    assert out.loss.item() == 0.0 and out.metrics["pairs"] == 0.0 and torch.equal(g, torch.zeros_like(g))


def test_prompt_offset_is_per_prompt_and_deterministic():
    comp = SCORE.create({"name": "prompt_offset", "scale": 2.0, "seed": 1})
    eps = [Episode(group_id=0, seed=s, turns=[Turn(observation=o, observation_ids=[])])
           for s, o in enumerate(["3+4=", "3+4=", "5+1="])]
    a = comp(eps)
    assert a[0] == a[1] != a[2] and a == comp(eps)
    other = SCORE.create({"name": "prompt_offset", "scale": 2.0, "seed": 2})(eps)
    assert other[0] != a[0]
    z = [SCORE.create({"name": "prompt_offset", "seed": 0})(
        [Episode(group_id=0, seed=0, turns=[Turn(observation=str(i), observation_ids=[])])])[0] for i in range(2000)]
    mean = sum(z) / len(z)
    std = math.sqrt(sum((x - mean) ** 2 for x in z) / len(z))
    assert abs(mean) < 0.1 and abs(std - 1.0) < 0.1


def judged(rewards, groups=(0, 0, 1, 1)) -> TokenContext:
    """`context` with distinct tokens per row (the judge's coins hash the rows)."""
    ctx = context(rewards, groups=groups)
    ctx.batch.input_ids = torch.arange(ctx.batch.input_ids.numel()).view_as(ctx.batch.input_ids)
    return ctx


@pytest.mark.parametrize("clip", ["separate", "joint"])
def test_a_judge_that_always_flips_negates_the_gradient(clip):
    # rewards (1, 0 | 0.5, 2): δ = 0.5 and −0.75 become −0.5 and +0.75, so the on-policy gradient changes sign
    _, g = run(judged([1.0, 0.0, 0.5, 2.0]), clip=clip)
    out, g_flip = run(judged([1.0, 0.0, 0.5, 2.0]), clip=clip, judge_noise=1.0)
    assert torch.allclose(g_flip, -g, atol=1e-6) and out.metrics["judge_flips"].item() == 1.0
    # a tie gets no verdict: nothing to flip, no gradient
    out, g_tie = run(judged([0.7, 0.7, -2.0, -2.0]), clip=clip, judge_noise=1.0)
    assert torch.equal(g_tie, torch.zeros_like(g_tie)) and out.metrics["judge_flips"].item() == 0.0


def test_sign_verdict_keeps_only_the_direction():
    # rewards (1, 0 | 0.5, 2): δ = +0.5 and −0.5 (not −0.75): gradient −δ/2 on y₁'s trained tokens, +δ/2 on y₂'s
    out, g = run(judged([1.0, 0.0, 0.5, 2.0]), verdict="sign")
    want = torch.tensor([[0, -0.25, -0.25], [0, 0.25, 0], [0, 0.25, 0.25], [0, -0.25, -0.25]])
    assert torch.allclose(g, want, atol=1e-6) and out.metrics["reward_gap"].item() == pytest.approx(1.0)
    # on a 0/1 reward `sign` and `difference` are the same
    _, g_sign = run(judged([1.0, 0.0, 0.0, 1.0]), verdict="sign")
    _, g_diff = run(judged([1.0, 0.0, 0.0, 1.0]))
    assert torch.equal(g_sign, g_diff)


def test_judge_flips_are_seeded_per_pair_and_near_the_noise_rate():
    n = 64  # one group of 64 distinct rows: 2016 pairs
    ids = torch.arange(n * 3).view(n, 3)
    batch = Batch(input_ids=ids, attention_mask=torch.ones(n, 3, dtype=torch.long),
                  action_mask=torch.ones(n, 3), token_rewards=torch.zeros(n, 3),
                  step_index=torch.zeros(n, 3, dtype=torch.long), group_index=torch.zeros(n, dtype=torch.long),
                  sample_weight=torch.ones(n))
    first, second = group_pairs(batch.group_index, "all")
    flips = judge_flips(batch, first, second, 0.2, seed=0)
    assert 0.17 < flips.float().mean().item() < 0.23
    assert torch.equal(flips, judge_flips(batch, first, second, 0.2, seed=0))  # the same verdicts every call
    assert not torch.equal(flips, judge_flips(batch, first, second, 0.2, seed=1))
    # the coin belongs to the unordered pair: swapping the two sides draws the same flip
    assert torch.equal(flips, judge_flips(batch, second, first, 0.2, seed=0))
    assert not judge_flips(batch, first, second, 0.0, seed=0).any()


def test_bad_judge_options_are_one_line_errors():
    with pytest.raises(OutriderError, match=r"update\.terms\[0\]\.judge_noise") as e:
        TERMS.create({"name": "p3o", "judge_noise": 1.5}, where="update.terms[0]")
    assert "\n" not in str(e.value).strip()
    with pytest.raises(OutriderError, match=r"update\.terms\[0\]\.verdict"):
        TERMS.create({"name": "p3o", "verdict": "majority"}, where="update.terms[0]")


@pytest.mark.slow  # two runs of a few tiny steps and a killed one, ~30 s
def test_killed_noisy_judge_run_resumes_to_identical_metrics(tmp_path):
    # the judge keeps no state: its coins hash the rows, so a resumed run draws the same verdicts
    import yaml
    from conftest import tiny_recipe
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer
    from test_resume import RESUME_OVERRIDES, killed_run_resumes_like

    data = tiny_recipe(**dict(RESUME_OVERRIDES, update={"lr": 3.0e-3, "loss": "none", "terms": [
        {"name": "p3o", "verdict": "sign", "judge_noise": 0.4}]}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    Trainer(load_recipe(recipe), tmp_path / "A", quiet=True).run()
    rows = [json.loads(x) for x in (tmp_path / "A" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any(r.get("p3o/judge_flips", 0) > 0 for r in rows)  # the judge did flip verdicts in this run
    killed_run_resumes_like(tmp_path / "A", recipe, tmp_path)
