"""The pairwise learner terms (`dpo`, `robust_dpo`, `ipo`, `step_apo`) against hand-computed numbers and against
TRL's `DPOTrainer` loss on the same log-probs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from outrider.data import Batch
from outrider.update import TERMS, TokenContext

# four rows, groups (0, 0, 1, 1): row 0 chosen over row 1, row 2 chosen over row 3; position 0 is the prompt
MASK = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 1]], dtype=torch.float)
# log π_θ − log π_ref per position: s = (0.8, -0.2, 0.2, 0.6); masked positions hold junk that must not count
RATIO = torch.tensor([[5.0, 0.5, 0.3], [5.0, -0.2, 9.0], [5.0, 0.1, 0.1], [5.0, 0.4, 0.2]])


def context(ratio=RATIO, mask=MASK, preference=(1, -1, 1, -1), groups=(0, 0, 1, 1), rewards=None) -> TokenContext:
    ref = torch.full(ratio.shape, -1.0)
    logprobs = (ref + ratio).requires_grad_(True)
    B, T = ratio.shape
    batch = Batch(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.long),
                  action_mask=mask, token_rewards=torch.zeros(B, T) if rewards is None else rewards,
                  step_index=torch.zeros(B, T, dtype=torch.long), group_index=torch.tensor(groups),
                  sample_weight=torch.ones(B), preference=torch.tensor(preference), ref_logprobs=ref)
    return TokenContext(logprobs, logprobs.detach(), torch.zeros(B, T), mask, batch=batch)


def term(name: str, **options):
    return TERMS.create({"name": name, **options})


def softplus(x: float) -> float:  # −log σ(−x)
    return math.log1p(math.exp(x))


def test_dpo_by_hand():
    out = term("dpo", beta=0.5)(context())
    # z = 0.5·(0.8 − (−0.2)) = 0.5 and 0.5·(0.2 − 0.6) = −0.2; ℓ = −log σ(z) = log(1 + e^−z)
    assert out.loss.item() == pytest.approx((softplus(-0.5) + softplus(0.2)) / 2, abs=1e-6)
    assert out.metrics["margin"].item() == pytest.approx(0.15, abs=1e-6)
    assert out.metrics["accuracy"].item() == 0.5
    assert out.metrics["chosen"].item() == pytest.approx(0.5 * (0.8 + 0.2) / 2, abs=1e-6)
    assert out.metrics["rejected"].item() == pytest.approx(0.5 * (-0.2 + 0.6) / 2, abs=1e-6)
    assert out.metrics["pairs"] == 2.0


def test_dpo_gradient_by_hand():
    ctx = context()
    term("dpo", beta=0.5)(ctx).loss.backward()
    # dℓ/ds_w = −β σ(−z) / n_pairs on every trained token of the chosen row; +β σ(−z) / 2 on the rejected one's
    g = ctx.logprobs.grad
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert g[0, 1].item() == pytest.approx(-0.5 * sig(-0.5) / 2, abs=1e-6)
    assert g[1, 1].item() == pytest.approx(0.5 * sig(-0.5) / 2, abs=1e-6)
    assert g[3, 2].item() == pytest.approx(0.5 * sig(0.2) / 2, abs=1e-6)
    assert g[1, 2].item() == 0.0 and g[:, 0].abs().sum().item() == 0.0  # untrained positions


def test_conservative_dpo_by_hand():
    out = term("dpo", beta=0.5, label_smoothing=0.2)(context())
    expected = [0.8 * softplus(-z) + 0.2 * softplus(z) for z in (0.5, -0.2)]
    assert out.loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)


def test_robust_dpo_by_hand():
    out = term("robust_dpo", beta=0.5, label_smoothing=0.2)(context())
    # [(1 − ε)·softplus(−z) − ε·softplus(z)] / (1 − 2ε)
    expected = [(0.8 * softplus(-z) - 0.2 * softplus(z)) / 0.6 for z in (0.5, -0.2)]
    assert out.loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    plain = term("dpo", beta=0.5)(context()).loss.item()
    assert term("robust_dpo", beta=0.5, label_smoothing=0.0)(context()).loss.item() == pytest.approx(plain)


def test_ipo_by_hand():
    out = term("ipo", beta=0.5)(context())
    # per-token means: 0.8/2, −0.2/1, 0.2/2, 0.6/2; h = 0.6 and −0.2; target 1/(2τ) = 1
    assert out.loss.item() == pytest.approx(((0.6 - 1) ** 2 + (-0.2 - 1) ** 2) / 2, abs=1e-6)
    summed = term("ipo", beta=0.5, length_normalize=False)(context())
    assert summed.loss.item() == pytest.approx(((1.0 - 1) ** 2 + (-0.4 - 1) ** 2) / 2, abs=1e-6)
    # at the target gap the loss and its gradient vanish
    at_target = context(ratio=torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), mask=torch.tensor(
        [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]), preference=(1, -1), groups=(0, 0))
    out = term("ipo", beta=1.0)(at_target)  # h = 2/2 − 0/2 = 1, target 1/(2·1) = 0.5
    assert out.loss.item() == pytest.approx(0.25, abs=1e-6)
    out = term("ipo", beta=0.5)(at_target)  # target 1: exactly met
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.0, abs=1e-9) and at_target.logprobs.grad.abs().max().item() < 1e-6


def test_step_apo_margin_is_the_value_gap():
    rewards = torch.zeros(4, 3)
    rewards[0, 2], rewards[1, 1], rewards[2, 2], rewards[3, 2] = 0.9, 0.1, 0.5, 0.5  # on each row's last trained token
    out = term("step_apo", beta=0.5, alpha=2.0)(context(rewards=rewards))
    # z = β·Δs − α·(V_w − V_l): 0.5 − 2·0.8 = −1.1 and −0.2 − 0 = −0.2
    assert out.loss.item() == pytest.approx((softplus(1.1) + softplus(0.2)) / 2, abs=1e-6)
    assert out.metrics["value_gap"].item() == pytest.approx(0.4, abs=1e-6)
    plain = term("dpo", beta=0.5)(context(rewards=rewards)).loss.item()
    assert term("step_apo", beta=0.5, alpha=0.0)(context(rewards=rewards)).loss.item() == pytest.approx(plain)


@pytest.mark.parametrize("name", ["dpo", "robust_dpo", "ipo", "step_apo"])
def test_no_pairs_is_zero_with_zero_gradient(name):
    ctx = context(preference=(1, 1, 0, -1), groups=(0, 0, 1, 2))  # no group holds both sides
    out = term(name)(ctx)
    out.loss.backward()
    assert out.loss.item() == 0.0 and ctx.logprobs.grad.abs().sum().item() == 0.0


def test_every_chosen_meets_every_rejected_of_its_group():
    ctx = context(preference=(1, 1, -1, 0), groups=(0, 0, 0, 0))  # two pairs: (0, 2), (1, 2); row 3 unpaired
    out = term("dpo", beta=1.0)(ctx)
    assert out.metrics["pairs"] == 2.0
    assert out.loss.item() == pytest.approx((softplus(-(0.8 - 0.2)) + softplus(-(-0.2 - 0.2))) / 2, abs=1e-6)


# --- TRL's DPOTrainer loss on the same log-probs ---------------------------------------------------------------

def trl_loss(loss_type: str, beta: float, eps: float, logprobs: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
             chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """TRL's `DPOTrainer._compute_loss` (its own code) on our per-token log-probs: a stand-in model returns them
    as TRL's fused LM head would (shifted by one, zero off the completion), reference log-probs precomputed."""
    from trl.trainer.dpo_trainer import DPOTrainer

    order = torch.cat([chosen, rejected])  # TRL's batch is [chosen..., rejected...]
    lp, m = logprobs[order].double(), mask[order].double()
    shifted = (lp * m)[:, 1:]
    ref_sums = (ref[order].double() * m).sum(-1)
    n = len(chosen)

    class Model:
        training = True

        def __call__(self, **kwargs):
            return SimpleNamespace(log_probs=shifted, entropy=torch.zeros_like(shifted),
                                   mean_logits=torch.zeros_like(shifted), is_top1=torch.zeros_like(shifted).bool())

    t = DPOTrainer.__new__(DPOTrainer)
    t.__dict__.update(model=Model(), accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x,
                                                                 gather=lambda x: x),
                      aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                      f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                      label_smoothing=eps, use_weighting=False, _metrics={"train": defaultdict(list)},
                      _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(m.shape, dtype=torch.long), "attention_mask": torch.ones(m.shape),
              "completion_mask": m, "ref_chosen_logps": ref_sums[:n], "ref_rejected_logps": ref_sums[n:]}
    return float(t._compute_loss(t.model, inputs, return_outputs=False))


@pytest.mark.parametrize("name,loss_type,options", [
    ("dpo", "sigmoid", {"beta": 0.1}),
    ("dpo", "sigmoid", {"beta": 2.0}),
    ("robust_dpo", "robust", {"beta": 0.3, "label_smoothing": 0.2}),
    ("ipo", "ipo", {"beta": 0.1}),
])
def test_loss_equals_trl_dpo_trainer(name, loss_type, options):
    """A tiny policy scores a packed batch of pairs (uneven lengths, a prefix-free prompt); a perturbed copy is the
    reference. Our term and TRL's loss agree to 1e-6."""
    pytest.importorskip("trl")
    from outrider.data import pack
    from outrider.loops.offline import Pair, pair_episodes
    from outrider.policy.model import Policy

    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    reference = Policy.tiny(hidden=32, layers=1, heads=2, seed=1)
    pairs = [Pair("abc ->", "cba", "bca"), Pair("hello ->", "olleh", "hello world"), Pair("xy ->", "yx", "")]
    batch = pack(pair_episodes(policy, pairs), policy.pad_id, policy.bos_id)
    with torch.no_grad():
        batch.ref_logprobs = reference.score(batch.input_ids, batch.attention_mask).logprobs
    logprobs = policy.score(batch.input_ids, batch.attention_mask).logprobs
    ctx = TokenContext(logprobs, logprobs.detach(), torch.zeros_like(logprobs), batch.action_mask, batch=batch)
    ours = term(name, **options)(ctx).loss.item()
    chosen, rejected = batch.pairs()
    theirs = trl_loss(loss_type, options["beta"], options.get("label_smoothing", 0.0), logprobs.detach(),
                      batch.ref_logprobs, batch.action_mask, chosen, rejected)
    assert abs(ours - theirs) < 1e-6, (ours, theirs)
    assert abs(ours - {"ipo": 25.0}.get(name, math.log(2))) > 1e-3  # the two models differ: not the s = 0 value
