"""Groups as data: ids come from `GroupIds`, groups differ in size and gain members (a retry joins its parent's
group), and every credit piece takes them as they are."""

from __future__ import annotations

import pytest
import torch

from outrider.credit import CREDIT
from outrider.data import Episode, GroupIds, Turn, pack
from outrider.policy.model import Policy
from outrider.registry import BuildContext


def episode(group: int, reward: float, states: tuple, entropy: float) -> Episode:
    e = Episode(group_id=group, seed=group)
    for k, key in enumerate(states):
        e.turns.append(Turn(f"o{k}", [3, 4], "ab"[k % 2], [5 + k, 6], behaviour_logprobs=[-0.5, -1.0 - k],
                            behaviour_entropy=[entropy, entropy + k], info={"state_key": key}))
    e.rewards["trajectory"]["r"] = reward
    return e


def unequal_batch() -> tuple[list[Episode], list[int]]:
    """Groups of 1, 2, 3 and 5 episodes, their ids handed out by `GroupIds` and interleaved, and one retry that
    joins group `b` last (so `b` has 3 members)."""
    ids = GroupIds()
    a, b, c, d = (ids.new() for _ in range(4))
    spec = [(a, 1.0), (b, 1.0), (c, 0.0), (d, 1.0), (b, 0.0), (c, 1.0), (d, 0.0), (d, 0.0), (c, 1.0), (d, 1.0),
            (d, 0.5)]
    eps = [episode(g, r, (("s", g), ("t", i % 3)), 0.2 + 0.1 * i) for i, (g, r) in enumerate(spec)]
    retry = episode(b, 1.0, (("s", b), ("t", 0)), 0.9)
    retry.origin = "retry"
    eps.append(retry)
    return eps, [a, b, c, d]


def test_group_ids_are_handed_out_by_the_data_layer():
    ids = GroupIds()
    assert [ids.new() for _ in range(3)] == [0, 1, 2]
    eps, (a, b, c, d) = unequal_batch()
    sizes = {g: sum(e.group_id == g for e in eps) for g in (a, b, c, d)}
    assert sizes == {a: 1, b: 3, c: 3, d: 5}


def test_grpo_and_rloo_on_unequal_groups_by_hand():
    eps, (a, b, c, d) = unequal_batch()
    batch = pack(eps, pad_id=0)
    last = batch.action_mask.cumsum(-1).argmax(-1)  # a row's last action token carries its advantage like all
    grpo = CREDIT.create({"name": "grpo"})(batch).advantages[torch.arange(len(eps)), last]
    rloo = CREDIT.create({"name": "rloo"})(batch).advantages[torch.arange(len(eps)), last]
    # a: alone → R / (1 + ε); b: rewards 1, 0, 1 (the retry last): mean 2/3, std √(1/3)
    assert float(grpo[0]) == pytest.approx(1.0 / (1 + 1e-6))
    s = (1 / 3) ** 0.5
    assert [float(grpo[i]) for i in (1, 4, 11)] == pytest.approx([(1 / 3) / s, (-2 / 3) / s, (1 / 3) / s], rel=1e-5)
    # d: 1, 0, 0, 1, 0.5: mean 0.5, unbiased std √(0.25·2 + 0.25·2)/2 = √0.25 = 0.5 → ±1, 0
    assert [float(grpo[i]) for i in (3, 6, 7, 9, 10)] == pytest.approx([1, -1, -1, 1, 0], abs=1e-5)
    # RLOO: R_i − mean of the others; a alone: baseline 0
    assert float(rloo[0]) == 1.0
    assert [float(rloo[i]) for i in (1, 4, 11)] == pytest.approx([0.5, -1.0, 0.5])
    assert [float(rloo[i]) for i in (3, 6, 10)] == pytest.approx([0.625, -0.625, 0.0])


@pytest.mark.parametrize("name", CREDIT.names())
def test_every_credit_piece_takes_unequal_groups_in_any_order(name):
    """Finite, 0 off the mask, and the same per row whatever order the rows come in (a group's members need not
    be contiguous, and a late member is a member like the others)."""
    eps, _ = unequal_batch()
    batch = pack(eps, pad_id=0)
    batch.values = torch.linspace(0, 1, batch.action_mask.numel()).view_as(batch.action_mask)
    # what the run fills for pieces that need the old-policy and reference log-probs (prl)
    batch.old_logprobs = -torch.linspace(0, 2, batch.action_mask.numel()).view_as(batch.action_mask)
    batch.ref_logprobs = -torch.linspace(0, 1, batch.action_mask.numel()).view_as(batch.action_mask).flip(-1)
    adv = fresh_piece(name)(batch).advantages
    assert torch.isfinite(adv).all() and adv[batch.action_mask == 0].abs().sum() == 0
    order = torch.randperm(len(eps), generator=torch.Generator().manual_seed(0))
    shuffled = pack([eps[i] for i in order], pad_id=0)
    shuffled.values = batch.values[order]
    shuffled.old_logprobs, shuffled.ref_logprobs = batch.old_logprobs[order], batch.ref_logprobs[order]
    torch.testing.assert_close(fresh_piece(name)(shuffled).advantages, adv[order], rtol=1e-5, atol=1e-6)


def fresh_piece(name: str):
    """A new piece each call (a stateful one, oprl, trains at each call), built as a run builds it: with the
    run's policy, which oprl copies as its PRM."""
    entry, cfg = CREDIT.build({"name": name})
    return entry.create(cfg, BuildContext(None, Policy.tiny(hidden=32, layers=1, seed=0), torch.device("cpu"), 0))
