"""The shared-prefix forward against the plain one: same log-probs, entropies, values, hidden states and gradients
on ragged groups, for Llama and Qwen2 (grouped-query attention, q/k/v biases); and the plan's split by hand."""

from __future__ import annotations

import pytest
import torch

from conftest import read_jsonl, run_cli_many, tiny_qwen2, write_recipe
from outrider.policy import shared_prefix, unpadded
from outrider.policy.model import Policy


def llama() -> Policy:
    return Policy.tiny(hidden=32, layers=2, heads=4, seed=0, value_head=True)


def qwen2() -> Policy:
    return tiny_qwen2(value_head=True)


def ragged_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three groups with prompts of 4, 6 and 9 tokens, completions of 1-10 tokens, and a singleton group."""
    g = torch.Generator().manual_seed(0)
    rows, groups = [], []
    for gi, (prompt_len, n) in enumerate([(4, 5), (6, 3), (9, 4), (3, 1)]):
        prompt = [1] + torch.randint(3, 90, (prompt_len - 1,), generator=g).tolist()
        for _ in range(n):
            rows.append(prompt + torch.randint(3, 90, (int(torch.randint(1, 11, (1,), generator=g)),),
                                               generator=g).tolist())
            groups.append(gi)
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask, torch.tensor(groups)


@pytest.mark.parametrize("layout", ["unpadded", "packed", "cache"])
@pytest.mark.parametrize("make", [llama, qwen2])
def test_scores_and_gradients_equal_the_plain_forward(make, layout, monkeypatch):
    if layout == "cache":
        monkeypatch.setattr(shared_prefix, "PACKED_MAX_LEN", 0)
    if layout != "unpadded":
        monkeypatch.setattr(unpadded, "available", lambda model: False)
    packed_calls, unpadded_calls = [], []
    original, original_unpadded = shared_prefix._forward_packed, unpadded.forward
    monkeypatch.setattr(shared_prefix, "_forward_packed", lambda *a: (packed_calls.append(1), original(*a))[1])
    monkeypatch.setattr(unpadded, "forward", lambda *a: (unpadded_calls.append(1), original_unpadded(*a))[1])
    policy = make()
    with torch.no_grad():
        policy.value_head.weight.copy_(torch.randn(policy.value_head.weight.shape,
                                                   generator=torch.Generator().manual_seed(1)) * 0.5)
    ids, mask, groups = ragged_batch()
    assert shared_prefix.plan(ids, mask, groups) is not None
    plain = score_and_gradients(policy, ids, mask, None, padded=True)
    shared = score_and_gradients(policy, ids, mask, groups)
    assert len(packed_calls) == (layout != "cache") and len(unpadded_calls) == (layout == "unpadded")
    assert_same_scores_and_gradients(plain, shared, mask)


def score_and_gradients(policy, ids, mask, groups, padded=False):
    """Scores and parameter gradients of one scoring forward; `padded`: the plain padded HF forward, not the
    unpadded one."""
    with pytest.MonkeyPatch.context() as m:
        if padded:
            m.setattr(unpadded, "MIN_PADDING_SHARE", 1.0)
        policy.zero_grad()
        s = policy.score(ids, mask, 0.7, entropy=True, values=True, hidden=True, logits=True, groups=groups)
        w = mask.float()
        (s.logprobs * w).sum().add((s.entropy * w).sum()).add((s.values * w).sum()).backward()
    return s, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def assert_same_scores_and_gradients(a, b, mask):
    (plain, plain_grad), (shared, shared_grad) = a, b
    real = mask.bool()
    for field in ("logprobs", "entropy", "values"):
        assert torch.allclose(getattr(plain, field)[real], getattr(shared, field)[real], atol=1e-5), field
    assert torch.allclose(plain.hidden[real], shared.hidden[real], atol=1e-5)
    assert torch.allclose(plain.logits[real], shared.logits[real], atol=1e-5)
    assert plain_grad.keys() == shared_grad.keys()
    for name, grad in plain_grad.items():  # float rounding only: ~1e-6 of the largest entry (seen up to 1.5e-6)
        assert (grad - shared_grad[name]).abs().max() <= 2e-5 * grad.abs().max(), name


def test_plan_splits_each_group_at_its_common_prefix():
    ids = torch.tensor([[1, 5, 6, 7, 8, 0],
                        [1, 5, 6, 9, 0, 0],
                        [1, 5, 6, 7, 8, 9],  # shares 5 tokens with row 0 but the group's common prefix is 3
                        [1, 4, 4, 0, 0, 0],
                        [1, 4, 4, 0, 0, 0]])  # identical rows: the prefix stops one short of the row
    mask = (ids != 0).long()
    p = shared_prefix.plan(ids, mask, torch.tensor([7, 7, 7, 3, 3]), min_saved_share=0.0)
    assert p.row_group.tolist() == [1, 1, 1, 0, 0]  # groups sorted by id: 3, then 7
    assert p.prefix_ids.tolist() == [[1, 4, 0], [1, 5, 6]]
    assert p.prefix_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert p.suffix_ids.tolist() == [[7, 8, 0], [9, 0, 0], [7, 8, 9], [4, 0, 0], [4, 0, 0]]
    assert p.suffix_positions[0].tolist() == [3, 4, 5] and p.suffix_positions[3].tolist() == [2, 3, 4]
    # saved: group 7 runs its 3 prefix tokens once instead of 3 times, group 3 its 2 once instead of twice
    assert p.saved_share == pytest.approx((2 * 3 + 1 * 2) / int(mask.sum()))

    # packed: group 3 is [prefix 1 4 | row 3: 4 | row 4: 4], group 7 [prefix 1 5 6 | 7 8 | 9 | 7 8 9]
    layout = shared_prefix.packed_layout(p, torch.float32)
    assert layout.ids.tolist() == [[1, 4, 4, 4, 0, 0, 0, 0, 0], [1, 5, 6, 7, 8, 9, 7, 8, 9]]
    assert layout.positions.tolist() == [[0, 1, 2, 2, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 3, 3, 4, 5]]
    # outputs of the flattened [2 × 9] packed batch each (row, position) reads; padding reads the row's last token
    assert layout.gather.tolist() == [[9, 10, 11, 12, 13, 13], [9, 10, 11, 14, 14, 14], [9, 10, 11, 15, 16, 17],
                                      [0, 1, 2, 2, 2, 2], [0, 1, 3, 3, 3, 3]]
    sees = (layout.mask[:, 0] == 0).int().tolist()
    assert sees[1][5] == [1, 1, 1, 0, 0, 1, 0, 0, 0]  # row 1's token: the prefix and itself, not row 0's suffix
    assert sees[1][8] == [1, 1, 1, 0, 0, 0, 1, 1, 1]
    assert sees[0][3] == [1, 1, 0, 1, 0, 0, 0, 0, 0]  # row 4's token: the prefix, not row 3's
    assert sees[0][5] == [0, 0, 0, 0, 0, 1, 0, 0, 0]  # padding sees only itself
    assert all(sees[g][i][j] == 0 for g in range(2) for i in range(9) for j in range(i + 1, 9))  # causal
    assert shared_prefix.packed_layout(p, torch.float32, max_len=8) is None
    # (row 0, position 4) is the 2nd suffix token of row 0; (row 4, position 1) is prefix group 0, position 1
    flat_prefix = 2 * 3
    assert int(p.gather[0, 4]) == flat_prefix + 0 * 3 + 1
    assert int(p.gather[4, 1]) == 0 * 3 + 1


@pytest.mark.parametrize("make", [llama, qwen2])
def test_unpadded_plain_forward_equals_the_padded_one(make):
    """Without groups, a padded batch's forward runs on its real tokens (one sequence) and gives the padded
    forward's scores and gradients."""
    policy = make()
    ids, mask, _ = ragged_batch()
    assert unpadded.rows_forward(policy.model, ids, mask, False) is not None
    padded = score_and_gradients(policy, ids, mask, None, padded=True)
    assert_same_scores_and_gradients(padded, score_and_gradients(policy, ids, mask, None), mask)
    # no padding: the plain padded forward, as is
    assert unpadded.rows_forward(policy.model, ids[:, :3], mask[:, :3], False) is None


def test_unpadded_forward_runs_the_real_tokens_only_and_falls_back_when_kwargs_do_not_reach_attention(monkeypatch):
    """The model sees one sequence of the packed groups' real tokens; a model whose forward drops the extra
    keyword argument is detected on its first call, and the padded packed forward then runs (same scores)."""
    policy = llama()
    ids, mask, groups = ragged_batch()
    seen = []
    forward = policy.model.forward
    monkeypatch.setattr(policy.model, "forward", lambda **kw: (seen.append(kw["input_ids"].shape), forward(**kw))[1])
    with torch.no_grad():
        expected = policy.score(ids, mask, groups=groups).logprobs
    p = shared_prefix.plan(ids, mask, groups)
    layout = shared_prefix.packed_layout(p, torch.float32)
    assert seen == [(1, int(layout.real.sum()))] and int(layout.real.sum()) < layout.real.numel()

    monkeypatch.setattr(unpadded, "_models_without_kwargs", set())
    monkeypatch.setattr(policy.model, "forward",
                        lambda **kw: (seen.append(kw["input_ids"].shape),
                                      forward(**{k: v for k, v in kw.items() if k != "outrider_grid"}))[1])
    with torch.no_grad():
        got = policy.score(ids, mask, groups=groups).logprobs
    assert seen[1:] == [(1, int(layout.real.sum())), tuple(layout.ids.shape)]  # tried, then the padded layout
    assert not unpadded.available(policy.model)
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)


def test_plan_declines_when_little_is_shared():
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10], [1, 2, 3, 4]])
    mask = torch.ones_like(ids)
    assert shared_prefix.plan(ids, mask, torch.tensor([0, 0, 1])) is None  # 1 token saved of 12
    assert shared_prefix.plan(ids, mask, torch.tensor([0, 1, 2])) is None  # singletons share nothing
    # left padding (its split would be wrong): the right-padded twin of this batch has a plan, this one has none
    right = torch.tensor([[1, 5, 6, 7, 0], [1, 5, 6, 8, 0], [1, 5, 6, 9, 0]])
    assert shared_prefix.plan(right, (right != 0).long(), torch.tensor([0, 0, 0])) is not None
    left = right.roll(1, dims=1)
    assert shared_prefix.plan(left, (left != 0).long(), torch.tensor([0, 0, 0])) is None


@pytest.mark.slow
def test_two_thread_runs_with_the_same_seed_are_bit_identical(tmp_path):
    """Reproducibility with the shared-prefix forward on 2 threads: two processes, same recipe and seed, give
    identical metrics. (With advanced indexing, whose backward accumulates in thread order, they did not.)"""
    recipe = write_recipe(tmp_path, policy={"hidden": 64, "layers": 2, "heads": 2},
                          explore={"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 6},
                          train={"steps": 4, "threads": 2})
    runs = run_cli_many({name: (["train", recipe, "--out", tmp_path / name, "--quiet"], False)
                         for name in ("a", "b")}, tmp_path)
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr[-500:] for r in runs.values()]

    def metrics(name):
        return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))}
                for row in read_jsonl(tmp_path / name / "metrics.jsonl")]

    a, b = metrics("a"), metrics("b")
    assert len(a) == 5 and a == b
    assert any(row.get("optim/grad_norm", 0) > 0 for row in a)  # the updates did something
