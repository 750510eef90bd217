"""outrider's credit and loss pieces inside verl (outrider.integrations.verl): looked up through verl's own
registries, they give outrider's numbers to 1e-6, and where verl has the same method its own numbers too."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from outrider.credit import CREDIT
from outrider.data import Batch
from outrider.errors import OutriderError
from outrider.update import LOSSES, TokenContext
from outrider.update.aggregate import aggregate

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def test_missing_verl_extra_is_one_line(monkeypatch):
    monkeypatch.delitem(sys.modules, "outrider.integrations.verl", raising=False)
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", None)
    with pytest.raises(OutriderError, match=r"outrider\[verl\]") as err:
        importlib.import_module("outrider.integrations.verl")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def core():
    core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="the outrider[verl] extra (make test "
                                                                     "installs it)")
    importlib.import_module("outrider.integrations.verl")
    return core


def responses(seed: int = 0):
    """Two prompt groups of three responses of unequal lengths ([B, T] over the response, right-padded): outcome
    rewards on the last token, behaviour entropy and log-probs, and two turns per response for step-level pieces."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 6
    lengths = torch.tensor([6, 4, 5, 3, 6, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 1.0])
    entropy = torch.rand(B, T, generator=g) * 2 * mask
    old = -torch.rand(B, T, generator=g) * 3 * mask
    # turn 0 is the first half of each response; anchor states: equal ids across a group's responses
    step = torch.where(torch.arange(T)[None, :] < (lengths[:, None] + 1) // 2, 0, 1)
    step = torch.where(mask > 0, step, -1)
    states = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 4], [3, 4], [3, -1]])
    uids = np.array(["p0", "p0", "p0", "p1", "p1", "p1"], dtype=object)
    return dict(rewards=rewards, mask=mask, entropy=entropy, old=old, step=step, states=states, uids=uids)


def outrider_batch(d) -> Batch:
    """The same responses as outrider's own packing gives them to a credit piece."""
    m = d["mask"]
    return Batch(input_ids=torch.zeros_like(m, dtype=torch.long), attention_mask=m.long(), action_mask=m,
                 token_rewards=d["rewards"], step_index=d["step"], group_index=torch.tensor([0, 0, 0, 1, 1, 1]),
                 sample_weight=torch.ones(6), behaviour_entropy=d["entropy"], behaviour_logprobs=d["old"],
                 old_logprobs=d["old"], turn_state_ids=d["states"])


CREDIT_CASES = [n for n in CREDIT.names() if n not in ("gae", "oprl", "prl")] + ["canon_length", "riskpo_wide"]
OPTIONS = {"canon_length": {"name": "canon", "metric": "length"},
           "riskpo_wide": {"name": "riskpo", "alpha": 0.4, "bundle_size": 1, "natural_baseline": True}}


@pytest.mark.parametrize("case", CREDIT_CASES)
def test_credit_pieces_through_verls_registry_match_outrider(core, case):
    section = OPTIONS.get(case, {"name": case})
    name = f"outrider_{case}"
    if case in OPTIONS:
        from outrider.integrations.verl import register

        register(name, section, "adv_estimator")
    d = responses()
    fn = core.get_adv_estimator_fn(name)
    adv, returns = fn(token_level_rewards=d["rewards"], response_mask=d["mask"], index=d["uids"], config=None,
                      entropys=d["entropy"], old_log_probs=d["old"], step_index=d["step"],
                      turn_state_ids=d["states"])
    entry, cfg = CREDIT.build(section)
    ours = entry.create(cfg)(outrider_batch(d)).advantages
    torch.testing.assert_close(adv, ours, rtol=0, atol=1e-6)
    assert adv.abs().sum() > 0 and (adv[d["mask"] == 0] == 0).all()


def test_gigpo_by_name_in_verl_uses_the_anchor_states(core):
    """Without step structure GiGPO is its episode-level term alone; with it, the step-level term moves turns."""
    d = responses()
    fn = core.get_adv_estimator_fn("outrider_gigpo")
    plain, _ = fn(token_level_rewards=d["rewards"], response_mask=d["mask"], index=d["uids"])
    stepped, _ = fn(token_level_rewards=d["rewards"], response_mask=d["mask"], index=d["uids"],
                    step_index=d["step"], turn_state_ids=d["states"])
    episode, _ = core.get_adv_estimator_fn("outrider_grpo")(token_level_rewards=d["rewards"],
                                                            response_mask=d["mask"], index=d["uids"])
    entry, cfg = CREDIT.build({"name": "grpo", "std_normalize": False})
    torch.testing.assert_close(plain, entry.create(cfg)(outrider_batch(d)).advantages, rtol=0, atol=1e-6)
    assert not torch.allclose(stepped, plain) and not torch.allclose(episode, plain)


@pytest.mark.parametrize("ours, theirs, kwargs", [
    ("grpo", "grpo", {}), ("dr_grpo", "grpo", {"norm_adv_by_std_in_grpo": False}), ("rloo", "rloo", {}),
    ("reinforce_pp", "reinforce_plus_plus", {}), ("reinforce_pp_baseline", "reinforce_plus_plus_baseline", {})])
def test_outrider_estimators_equal_verls_own(core, ours, theirs, kwargs):
    from verl.trainer.config import AlgoConfig

    d = responses(1)
    common = dict(token_level_rewards=d["rewards"], response_mask=d["mask"], index=d["uids"],
                  config=AlgoConfig(gamma=1.0))
    mine, _ = core.get_adv_estimator_fn(f"outrider_{ours}")(**common)
    verls, _ = core.get_adv_estimator_fn(theirs)(**common, **kwargs)
    torch.testing.assert_close(mine, verls, rtol=0, atol=1e-6)


def loss_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    d = responses(seed)
    log_prob = (d["old"] + torch.randn(6, 6, generator=g, dtype=torch.float32) * 0.3).requires_grad_(True)
    return d["old"], log_prob, torch.randn(6, 6, generator=g) * d["mask"], d["mask"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [n for n in LOSSES.names() if n != "none"])
def test_loss_pieces_through_verls_registry_match_outrider(core, name, mode):
    old, log_prob, adv, mask = loss_inputs(2)
    loss, metrics = core.get_policy_loss_fn(f"outrider_{name}")(old_log_prob=old, log_prob=log_prob,
                                                                advantages=adv, response_mask=mask,
                                                                loss_agg_mode=mode, config=None)
    (grad,) = torch.autograd.grad(loss, log_prob)
    mine = log_prob.detach().clone().requires_grad_(True)
    entry, cfg = LOSSES.build({"name": name})
    per_token, _ = entry.fn(TokenContext(mine, old, adv, mask), cfg)
    ours = aggregate(per_token, mask, mode)
    ours.backward()
    torch.testing.assert_close(loss, ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, mine.grad, rtol=0, atol=1e-6)
    assert all(k.startswith("actor/") and isinstance(v, float) for k, v in metrics.items())


@pytest.mark.parametrize("ours, theirs, mode, clip", [("ppo", "vanilla", "token-mean", (0.2, 0.2)),
                                                      ("gspo", "gspo", "seq-mean-token-mean", (3e-4, 4e-4)),
                                                      ("clip_cov", "clip_cov", "token-mean", (0.2, 0.2)),
                                                      ("kl_cov", "kl_cov", "token-mean", (0.2, 0.2))])
def test_outrider_losses_equal_verls_own(core, ours, theirs, mode, clip):
    """verl's own losses with its config set to outrider's defaults (KL-Cov's β: outrider 1.0, verl's config 0.1)."""
    from verl.workers.config import ActorConfig, PolicyLossConfig

    config = ActorConfig(strategy="fsdp", clip_ratio_low=clip[0], clip_ratio_high=clip[1], clip_ratio_c=3.0,
                         ppo_micro_batch_size_per_gpu=1, rollout_n=1, loss_agg_mode=mode,
                         policy_loss=PolicyLossConfig(loss_mode=theirs, ppo_kl_coef=1.0))
    old, log_prob, adv, mask = loss_inputs(3)
    args = dict(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask, loss_agg_mode=mode)
    mine, _ = core.get_policy_loss_fn(f"outrider_{ours}")(**args)
    verls = core.get_policy_loss_fn(theirs)(**args, config=config)[0]
    torch.testing.assert_close(mine, verls, rtol=0, atol=1e-6)
    g_mine, = torch.autograd.grad(mine, log_prob)
    g_verl, = torch.autograd.grad(verls, log_prob)
    torch.testing.assert_close(g_mine, g_verl, rtol=0, atol=1e-6)


@pytest.mark.slow  # a fresh interpreter importing verl: ~10 s
def test_verl_loads_outrider_through_its_plugin_entry_point(core):
    """A fresh process that imports only verl finds outrider's names (how verl's workers see them)."""
    code = ("import verl\nfrom verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn\n"
            "print(get_adv_estimator_fn('outrider_canon').__name__, get_policy_loss_fn('outrider_clip_cov').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["outrider_canon", "outrider_clip_cov"], out.stderr[-2000:]


def test_bad_names_and_kinds_are_one_line(core):
    from outrider.integrations.verl import adv_estimator, register

    with pytest.raises(OutriderError, match="unknown credit 'nope'"):
        register("outrider_nope", "nope", "adv_estimator")
    with pytest.raises(OutriderError, match="value head"):
        adv_estimator("gae")
    with pytest.raises(OutriderError, match="oprl.*copied from the policy"):
        adv_estimator("oprl")
    with pytest.raises(OutriderError, match="reference policy's log-probs"):
        adv_estimator("prl")
    with pytest.raises(OutriderError, match="verl's own"):
        register("vanilla", "ppo", "policy_loss")
    with pytest.raises(OutriderError, match="kind"):
        register("x", "ppo", "loss")
