"""EPO [10] entropy regulator against hand-computed numbers: bonus, smoothing band, history state, schedule."""

from __future__ import annotations

import math

import pytest
import torch

from outrider.update import ENTROPY, TokenContext
from outrider.update.epo import EPO, phase_weight

# two rows, T = 5: obs(turn 0), act, act, obs(turn 1), act
STEP = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]])
MASK = torch.tensor([[0., 1., 1., 0., 1.], [0., 1., 1., 0., 1.]])
# action entropies: row 0 turn 0 [1, 2], turn 1 [1];  row 1 turn 0 [1.25, 1.25], turn 1 [3]
# (the observation positions carry junk that must never count)
H = [[9., 1., 2., 9., 1.], [9., 1.25, 1.25, 9., 3.]]
# history after one call: turn 0 = 5.5/4 = 1.375, turn 1 = 4/2 = 2;  token-mean H = 9.5/6


def ctx(h=H) -> TokenContext:
    ent = torch.tensor(h, requires_grad=True)
    z = torch.zeros(2, 5)
    return TokenContext(logprobs=z, old_logprobs=z, advantages=z, mask=MASK, entropy=ent, step_index=STEP)


def build(**options) -> EPO:
    entry, cfg = ENTROPY.build({"name": "epo", **options})
    return entry.create(cfg)


def test_first_call_is_the_plain_trajectory_bonus_and_records_history():
    reg = build()
    out = reg(ctx())
    assert float(out.term.detach()) == pytest.approx(-0.001 * 9.5 / 6)
    assert float(out.metrics["out_of_band_frac"]) == 0.0  # no history yet: nothing is smoothed
    assert reg.sums == pytest.approx([1.375, 2.0]) and reg.counts == [1, 1] and reg.calls == 1


def test_second_call_penalises_tokens_outside_the_band():
    reg = build(coef=1.0)
    reg(ctx())
    c = ctx()
    out = reg(c)
    # turn 0 band (1.1, 1.65): 1 and 2 are out (|dev| .375, .625), 1.25 twice inside;
    # turn 1 band (1.6, 2.4): 1 and 3 are out (|dev| 1 each) -> P = .1·[.375, .625, 0, 0, 1, 1], mean .05
    assert float(out.metrics["penalty"]) == pytest.approx(0.05)
    assert float(out.metrics["out_of_band_frac"]) == pytest.approx(4 / 6)
    assert float(out.term.detach()) == pytest.approx(-(9.5 / 6 - 0.05))
    out.term.backward()
    g = c.entropy.grad
    # d term / d H_t = −1/6 + .1·sign(H_t − H̄)/6 out of band, −1/6 inside, 0 off the mask
    exp = torch.tensor([[0., -1.1 / 6, -0.9 / 6, 0., -1.1 / 6], [0., -1 / 6, -1 / 6, 0., -0.9 / 6]])
    torch.testing.assert_close(g, exp)
    assert reg.sums == pytest.approx([2.75, 4.0]) and reg.counts == [2, 2] and reg.calls == 2


def test_constant_penalty_and_turn_mode():
    reg = build(coef=1.0, penalty="constant")
    reg(ctx())
    out = reg(ctx())
    assert float(out.metrics["penalty"]) == pytest.approx(0.4 / 6)  # .1 on each of the 4 out-of-band tokens
    reg = build(coef=1.0, mask_mode="turn")
    reg(ctx())
    out = reg(ctx())
    # turn means: row 0 turn 0 1.5 and row 1 turn 0 1.25 are inside (1.1, 1.65); turn 1 means 1 and 3 are out
    assert float(out.metrics["penalty"]) == pytest.approx(0.2 / 6)
    assert float(out.metrics["out_of_band_frac"]) == pytest.approx(2 / 6)


def test_window_history_and_shared_mean():
    reg = build(window=1)
    reg(ctx())
    reg(ctx([[9., 2., 2., 9., 2.], [9., 2., 2., 9., 2.]]))
    assert reg.recent == [[2.0, 2.0]]  # only the last call is kept
    reg = build(per_turn=False)
    reg(ctx())
    assert reg.sums == pytest.approx([9.5 / 6]) and reg.counts == [1]


def test_state_dict_round_trip_reproduces_the_term():
    reg = build(coef=1.0, schedule=True, horizon=4)
    reg(ctx())
    reg(ctx([[9., 1.5, 1.5, 9., 2.], [9., 1.5, 1.5, 9., 2.]]))
    state = reg.state_dict()
    twin = build(coef=1.0, schedule=True, horizon=4)
    twin.load_state_dict(state)
    assert twin.state_dict() == state
    a, b = reg(ctx()), twin(ctx())
    assert float(a.term.detach()) == pytest.approx(float(b.term.detach()))
    assert float(a.metrics["weight"]) == pytest.approx(phase_weight(2, 4))


def test_phase_schedule():
    assert phase_weight(0, 150) == 1.0
    assert phase_weight(75, 150) == pytest.approx(1 - 0.2 * (1 - math.exp(-2)))
    assert phase_weight(150, 150) == pytest.approx(0.8 * math.exp(-3))
    assert phase_weight(500, 150) == phase_weight(150, 150)
    ws = [phase_weight(k, 150) for k in range(151)]
    assert all(x >= y for x, y in zip(ws, ws[1:]))


def test_band_must_be_ordered():
    from outrider.errors import OutriderError
    with pytest.raises((OutriderError, ValueError)):
        build(min_ratio=1.5, max_ratio=1.2)
