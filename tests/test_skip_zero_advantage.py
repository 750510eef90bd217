"""`update.skip_zero_advantage`: rows whose advantages are all 0 are left out of the training forward and backward,
and the update is the same as on the full minibatch, for every aggregation, when every row is zero, and with
padding that only a skipped row reached; pieces without the trait, KL in the loss and value losses keep every row."""

from __future__ import annotations

import pytest
import torch

from conftest import learner_terms, text_batch
from outrider.policy.model import Policy
from outrider.registry import Entry
from outrider.update import ENTROPY, LOSSES
from outrider.update.aggregate import AGGREGATIONS
from outrider.update.learner import UpdateConfig, learner_step, trained_rows


def make_batch(policy: Policy, advantages: list[float]):
    # the longest completion (row 2) is in a zero-advantage group, so the kept rows need fewer columns
    prompts = ["ab ->", "ab ->", "xyz ->", "xyz ->", "q ->", "q ->"]
    actions = ["ba", "bb", "zyxzyxzyx", "zy", "q", "qq"]
    return text_batch(policy, prompts, actions, advantages)


def run(advantages_per_step: list[list[float]], skip: bool, aggregation: str = "token-mean",
        regulator: str = "none", spy_rows: list[int] | None = None, adam: bool = False, **update):
    """Train a fresh tiny policy for one optimiser step per advantage vector; return its parameters.

    SGD by default: its step is proportional to the gradient, so a wrong loss denominator would show (AdamW's
    first step is invariant to the gradient's scale)."""
    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    cfg = UpdateConfig(lr=1e-1, aggregation=aggregation, skip_zero_advantage=skip, grad_clip=None, **update)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.1) if adam else \
        torch.optim.SGD(policy.parameters(), lr=cfg.lr)
    entry, loss_cfg = LOSSES.build({"name": "ppo"})

    def spy(ctx, c):
        if spy_rows is not None:
            spy_rows.append(ctx.logprobs.shape[0])
        return entry.fn(ctx, c)

    reg_entry, reg_cfg = ENTROPY.build({"name": regulator})
    metrics = []
    for advantages in advantages_per_step:
        batch = make_batch(policy, advantages)
        terms = learner_terms((Entry(entry.name, spy, entry.config, entry.needs), loss_cfg), cfg,
                              reg_entry.create(reg_cfg))
        metrics.append(learner_step(policy, opt, batch, terms, cfg, 1.0, torch.Generator().manual_seed(0),
                                    norm_length=12))
    return [p.detach().clone() for p in policy.parameters()], metrics


def assert_same_parameters(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-6) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, rtol=0, atol=atol), float((x - y).abs().max())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_skipping_zero_rows_gives_the_same_update_under_every_aggregation(aggregation):
    steps = [[0.0, 0.0, 0.0, 0.0, 1.0, -1.0], [0.7, -0.7, 0.0, 0.0, 0.0, 0.0]]
    rows_seen: list[int] = []
    skipped, metrics = run(steps, skip=True, aggregation=aggregation, spy_rows=rows_seen)
    plain, _ = run(steps, skip=False, aggregation=aggregation)
    assert rows_seen == [2, 2]  # the forward saw only the two live rows each time
    assert_same_parameters(skipped, plain)
    assert [m["update/skipped_rows_frac"] for m in metrics] == pytest.approx([4 / 6, 4 / 6])
    # the update really moved the parameters (the comparison is not between two untouched models)
    untouched = [p.detach() for p in Policy.tiny(hidden=32, layers=1, heads=2, seed=0).parameters()]
    assert any(not torch.allclose(x, y) for x, y in zip(skipped, untouched))


def test_skipping_with_several_minibatches_and_epochs():
    # 3 minibatches of 2 rows in a seeded order, twice: some minibatches have no live row, some one, some two
    steps = [[0.0, 0.0, 0.0, 0.0, 1.0, -1.0]]
    rows_seen: list[int] = []
    skipped, _ = run(steps, skip=True, spy_rows=rows_seen, adam=True, epochs=2, minibatches=3)
    plain, _ = run(steps, skip=False, adam=True, epochs=2, minibatches=3)
    assert len(rows_seen) == 6 and sum(rows_seen) < 12
    # AdamW divides by the root of its second moment, which magnifies the rounding of near-zero gradients over
    # six steps (seen: 2.4e-6); a wrong row or denominator moves parameters by the order of lr = 1e-2
    assert_same_parameters(skipped, plain, atol=1e-4)


def test_an_all_zero_step_still_steps_the_optimiser_like_the_full_batch():
    # step 2 has no live row: AdamW still moves the parameters through its moments and weight decay
    steps = [[1.0, -1.0, 0.5, -0.5, 0.0, 0.0], [0.0] * 6]
    rows_seen: list[int] = []
    skipped, metrics = run(steps, skip=True, spy_rows=rows_seen, adam=True)
    plain, _ = run(steps, skip=False, adam=True)
    assert rows_seen == [4, 1]
    assert metrics[1]["update/skipped_rows_frac"] == 1.0
    assert metrics[1]["optim/grad_norm"] == 0.0
    assert_same_parameters(skipped, plain)
    after_one, _ = run(steps[:1], skip=False, adam=True)
    assert any(not torch.allclose(x, y) for x, y in zip(skipped, after_one))


def test_rows_are_kept_when_the_regulator_does_not_declare_the_trait():
    rows_seen: list[int] = []
    run([[0.0, 0.0, 0.0, 0.0, 1.0, -1.0]], skip=True, regulator="bonus", spy_rows=rows_seen)
    assert rows_seen == [6]


def test_rows_are_kept_with_kl_in_the_loss():
    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    batch = make_batch(policy, [0.0, 0.0, 0.0, 0.0, 1.0, -1.0])
    batch.ref_logprobs = policy.score(batch.input_ids, batch.attention_mask).logprobs.detach()
    cfg = UpdateConfig(kl={"coef": 0.1})
    rows_seen: list[int] = []
    entry, loss_cfg = LOSSES.build({"name": "ppo"})

    def spy(ctx, c):
        rows_seen.append(ctx.logprobs.shape[0])
        return entry.fn(ctx, c)

    reg_entry, reg_cfg = ENTROPY.build({"name": "none"})
    terms = learner_terms((Entry("ppo", spy, entry.config, entry.needs), loss_cfg), cfg, reg_entry.create(reg_cfg),
                          reference=True)
    learner_step(policy, torch.optim.AdamW(policy.parameters()), batch, terms, cfg, 1.0,
                 torch.Generator().manual_seed(0), 12)
    assert rows_seen == [6]


def test_traits_of_the_builtin_pieces():
    # `none` (no surrogate) is 0 everywhere
    assert {e.name for e in LOSSES.entries() if e.needs.zero_at_zero_advantage} == {"ppo", "gspo", "none"}
    # clip_cov / kl_cov pick tokens by covariance with the batch mean; entropy_mask by a batch quantile
    assert {e.name for e in ENTROPY.entries() if e.needs.zero_at_zero_advantage} == {"none"}


def test_trained_rows_by_hand():
    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.float)
    adv = torch.tensor([[5.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])  # row 0's and 2's are off the mask
    assert trained_rows(adv, mask).tolist() == [1]
    assert trained_rows(adv * 0, mask).tolist() == [0]
    assert trained_rows(torch.ones(3, 3), mask) is None
