"""`update.max_tokens_per_micro_batch`: a minibatch run as micro-batches under a token budget, gradients
accumulated, gives the unsplit update (every aggregation, scalar terms, skipped rows, a pairwise term with its
groups kept whole) and the same metrics; a row over the budget and a term that cannot be split are one-line errors;
a run with the budget writes the same checkpoint state as one without."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import learner_terms, text_batch, tiny_recipe
from outrider.errors import OutriderError
from outrider.policy.model import Policy
from outrider.registry import Entry
from outrider.update import ENTROPY, LOSSES, TERMS
from outrider.update.aggregate import AGGREGATIONS
from outrider.update.learner import UpdateConfig, learner_step
from outrider.update.micro_batch import MetricMerger
from outrider.update.micro_batch import pack as pack_micro

PROMPTS = ["ab ->", "ab ->", "xyz ->", "xyz ->", "q ->", "q ->", "mn ->", "mn ->"]
ACTIONS = ["ba", "bbabab", "zyxzyxzyx", "zy", "q", "qqqqqqqqqqq", "nm", "nmnmn"]
ADVANTAGES = [0.7, -0.7, 0.0, 0.0, 1.0, -1.0, 0.3, -0.3]  # one group of zeros, for skip_zero_advantage


def make_batch(policy: Policy, preference: bool = False):
    batch = text_batch(policy, PROMPTS, ACTIONS, ADVANTAGES)
    batch.ref_logprobs = (policy.score(batch.input_ids, batch.attention_mask).logprobs.detach() + 0.05
                          * torch.arange(batch.input_ids.shape[1]) % 0.3)
    if preference:
        batch.preference = torch.tensor([1, -1] * 4)
    return batch


def step(budget: int | None, aggregation: str = "token-mean", regulator: str = "none", extra=(), rows_seen=None,
         **update):
    """One learner step of a fresh tiny policy with SGD at lr 1 (parameters move by the gradient itself)."""
    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    cfg = UpdateConfig(lr=1.0, aggregation=aggregation, grad_clip=None, max_tokens_per_micro_batch=budget, **update)
    entry, loss_cfg = LOSSES.build({"name": "ppo"})

    def spy(ctx, c):
        if rows_seen is not None:
            rows_seen.append(ctx.batch.group_index.tolist())
        return entry.fn(ctx, c)

    terms = learner_terms((Entry(entry.name, spy, entry.config, entry.needs), loss_cfg), cfg,
                          ENTROPY.create({"name": regulator}), reference=cfg.kl.coef > 0)
    terms += [TERMS.create(t) for t in extra]
    before = [p.detach().clone() for p in policy.parameters()]
    batch = make_batch(policy, preference=bool(extra))
    metrics = learner_step(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, terms, cfg, 1.0,
                           torch.Generator().manual_seed(0), norm_length=16)
    grads = [b - p.detach() for b, p in zip(before, policy.parameters())]
    return grads, metrics


def assert_same(a, b, atol=1e-6):
    assert any(float(x.abs().max()) > 1e-4 for x in a)  # the step really moved the parameters
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, rtol=0, atol=atol), float((x - y).abs().max())


SAME_METRICS = ("loss/total", "loss/policy", "optim/grad_norm", "policy/entropy", "clip/frac", "entropy_reg/entropy",
                "policy/kl")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("skip", [False, True])
def test_the_split_step_is_the_unsplit_one_under_every_aggregation(aggregation, skip):
    # KL in the loss and the entropy bonus are scalar terms, scaled by each micro-batch's share
    options = {} if skip else {"kl": {"coef": 0.2}}
    regulator = "none" if skip else "bonus"
    whole, m0 = step(None, aggregation, regulator, skip_zero_advantage=skip, **options)
    split, m1 = step(40, aggregation, regulator, skip_zero_advantage=skip, **options)
    assert m1["update/micro_batches"] >= 3 and "update/micro_batches" not in m0
    assert_same(whole, split)
    for key in SAME_METRICS:  # entropy_reg/entropy is an aggregate: the token-weighted mean in seq-mean modes
        if key in m0 and (aggregation == "token-mean" or key != "entropy_reg/entropy"):
            assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
    assert set(m1) - set(m0) == {"update/micro_batches"}


def test_a_budget_that_holds_the_minibatch_changes_nothing():
    whole, m0 = step(None)
    same, m1 = step(10_000)
    assert m1.pop("update/micro_batches") == 1.0
    assert m0 == m1
    assert all(torch.equal(x, y) for x, y in zip(whole, same))


def test_pairwise_terms_keep_their_groups_and_the_pair_mean():
    extra = [{"name": "dpo", "beta": 0.5}, {"name": "nll", "coef": 0.3}]
    rows: list[list[int]] = []
    whole, m0 = step(None, extra=extra)
    split, m1 = step(60, extra=extra, rows_seen=rows)
    assert len(rows) == m1["update/micro_batches"] > 1
    for groups in rows:  # both rows of every group in the same micro-batch
        assert all(groups.count(g) == 2 for g in groups)
    assert_same(whole, split)
    for key in ("loss/total", "loss/nll", "dpo/margin", "dpo/accuracy"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key


def test_a_budget_under_the_longest_row_is_one_line_naming_the_field_and_the_length():
    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    longest = int(make_batch(policy).attention_mask.sum(-1).max())
    with pytest.raises(OutriderError) as err:
        step(longest - 1)
    msg = str(err.value)
    assert "\n" not in msg and "update.max_tokens_per_micro_batch" in msg and f"{longest} tokens" in msg


def test_a_term_that_reads_the_whole_minibatch_cannot_be_split():
    with pytest.raises(OutriderError, match="'entropy_mask' reads its whole minibatch"):
        step(40, regulator="entropy_mask")
    step(None, regulator="entropy_mask")  # without a budget it runs as before


def test_packing_by_hand():
    # lengths 4, 9, 3, 7, 4: longest first into the current micro-batch while rows × its longest row fits
    mask = torch.zeros(5, 9)
    for i, n in enumerate([4, 9, 3, 7, 4]):
        mask[i, :n] = 1
    fake = SimpleNamespace(attention_mask=mask, group_index=torch.tensor([0, 0, 1, 1, 2]))
    chunks = pack_micro(fake, torch.arange(5), 14, by_group=False)
    assert [c.tolist() for c in chunks] == [[1], [0, 3], [2, 4]]  # 9 | 7, 4 (2 × 7) | 4, 3 (2 × 4)
    groups = pack_micro(fake, torch.arange(5), 21, by_group=True)
    assert [c.tolist() for c in groups] == [[0, 1], [2, 3, 4]]  # 2 × 9 | 2 × 7, then row 4: 3 × 7
    assert [c.tolist() for c in pack_micro(fake, torch.tensor([4, 2]), 8, by_group=False)] == [[4, 2]]


def test_metric_merging_by_hand():
    merger = MetricMerger()
    merger.add({"loss/total": 1.0, "a": 2.0, "b_max": 3.0}, {"loss/total": None, "a": 1.0})
    merger.add({"loss/total": 0.5, "a": 5.0, "b_max": 1.0}, {"loss/total": None, "a": 2.0})
    assert merger.result() == {"loss/total": 1.5, "a": 4.0, "b_max": 3.0}


def test_a_run_with_the_budget_checkpoints_the_same_state(tmp_path):
    import outrider
    from safetensors.torch import load_file

    from outrider.checkpoint import STATE_FILE, list_checkpoints

    # an entropy bonus, so every step has a gradient (the tiny task's first rewards are all 0)
    recipe = tiny_recipe(train={"steps": 2}, observe={"checkpoint_every": 2, "eval_every": 100},
                         update={"skip_zero_advantage": False, "entropy": {"name": "bonus", "coef": 0.01}})
    outrider.train(recipe, out=tmp_path / "a")
    outrider.train(recipe, out=tmp_path / "b", overrides=["update.max_tokens_per_micro_batch=32"])
    ca, cb = list_checkpoints(tmp_path / "a")[-1], list_checkpoints(tmp_path / "b")[-1]
    assert sorted(p.name for p in ca.iterdir()) == sorted(p.name for p in cb.iterdir())
    sa = torch.load(ca / STATE_FILE, weights_only=False)
    sb = torch.load(cb / STATE_FILE, weights_only=False)
    assert sorted(sa) == sorted(sb)
    wa, wb = load_file(ca / "model.safetensors"), load_file(cb / "model.safetensors")
    for key, value in wa.items():
        assert torch.allclose(value, wb[key], rtol=0, atol=1e-4), key
    metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["update/micro_batches"] > 1 for m in metrics if "update/micro_batches" in m)
    assert any("update/micro_batches" in m for m in metrics)


def test_the_preparing_forwards_run_under_the_budget_too():
    from outrider.update.learner import prepare

    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    seen: list[int] = []
    score = policy.score
    policy.score = lambda ids, *a, **k: (seen.append(ids.numel()), score(ids, *a, **k))[1]
    results = []
    for budget in (None, 40):
        batch = make_batch(policy)
        seen.clear()
        prepare(batch, policy, policy, UpdateConfig(max_tokens_per_micro_batch=budget, kl={"coef": 0.1}), 1.0,
                need_old=True, need_values=False)
        results.append((batch, list(seen)))
    (whole, n0), (split, n1) = results
    assert len(n0) == 2 and len(n1) > 2 and max(n1) <= 40
    mask = whole.action_mask > 0
    for name in ("old_logprobs", "ref_logprobs"):
        assert torch.allclose(getattr(whole, name)[mask], getattr(split, name)[mask], rtol=0, atol=1e-6), name


def test_a_recipe_whose_terms_cannot_be_split_is_refused_before_the_warm_start(tmp_path, monkeypatch, capsys):
    import time

    import yaml

    from conftest import call_main, tiny_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(update={"loss": {"name": "clip_cov"},
                                                         "max_tokens_per_micro_batch": 256})))
    t0 = time.monotonic()
    code, _, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1 and "'clip_cov' reads its whole minibatch" in err, err
    assert time.monotonic() - t0 < 30 and not (tmp_path / "run" / "metrics.jsonl").exists()
