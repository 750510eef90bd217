"""The optimisation step and its helpers: PPO epochs keep the old log-probs fixed, KL in the reward, the clipped
value loss, dynamic sampling, and the fast decoder's refusal of layouts it does not implement."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import learner_terms
from outrider.data import Episode, GroupIds, Turn, pack
from outrider.explore import EXPLORE, ExploreContext
from outrider.policy import fast_decode
from outrider.policy.model import Policy
from outrider.registry import Entry
from outrider.score import SCORE, Component, compose_packed
from outrider.update import ENTROPY, LOSSES
from outrider.update.learner import UpdateConfig, learner_step, prepare
from outrider.update.terms import value_loss


def episode(group: int, prompt: str, action: str, policy: Policy, reward: float) -> Episode:
    ep = Episode(group_id=group, seed=group)
    ep.turns.append(Turn(observation=prompt, observation_ids=policy.encode(prompt), action=action,
                         action_ids=policy.encode(action)))
    ep.rewards["trajectory"]["r"] = reward
    return ep


def no_regulator():
    entry, cfg = ENTROPY.build({"name": "none"})
    return entry.create(cfg)


def small_batch(policy: Policy):
    eps = [episode(0, "ab ->", "ba", policy, 1.0), episode(0, "ab ->", "bb", policy, 0.0),
           episode(1, "xyz ->", "zyx", policy, 1.0), episode(1, "xyz ->", "q", policy, 0.0)]
    batch = pack(eps, policy.pad_id, policy.bos_id)
    batch.advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None] * batch.action_mask
    return batch


def test_epochs_and_minibatches_keep_the_old_logprobs_of_the_batch():
    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    cfg = UpdateConfig(epochs=3, minibatches=2, lr=1e-2)
    batch = small_batch(policy)
    prepare(batch, policy, None, cfg, 1.0, need_old=True, need_values=False)
    old = batch.old_logprobs.clone()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    calls: list[torch.Tensor] = []
    entry, loss_cfg = LOSSES.build({"name": "ppo"})

    def spy(ctx, c):
        calls.append(ctx.old_logprobs.detach().clone())
        return entry.fn(ctx, c)

    spied = Entry(entry.name, spy, entry.config)
    metrics = learner_step(policy, opt, batch, learner_terms((spied, loss_cfg), cfg), cfg, 1.0,
                           torch.Generator().manual_seed(0), norm_length=4)
    assert len(calls) == 6  # 3 epochs × 2 minibatches, each an optimiser step
    # every minibatch saw the old log-probs of its rows as computed before the first step
    seen = torch.cat(calls, 0)
    assert all(any(torch.equal(row, o) for o in old) for row in seen)
    # later epochs moved the policy, so the ratio is no longer 1 everywhere
    assert metrics["loss/ratio_mean"] != 1.0
    new = policy.score(batch.input_ids, batch.attention_mask).logprobs
    assert not torch.allclose(new * batch.action_mask, old * batch.action_mask)


def test_prepare_and_learner_step_run_without_dropout():
    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    policy.model.config.attention_dropout = 0.5
    for m in policy.model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    policy.train()
    batch = small_batch(policy)
    cfg = UpdateConfig(epochs=1, minibatches=1, lr=1e-12)
    prepare(batch, policy, None, cfg, 1.0, need_old=True, need_values=False)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    metrics = learner_step(policy, opt, batch, learner_terms(LOSSES.build({"name": "ppo"}), cfg), cfg,
                           1.0, torch.Generator().manual_seed(0), norm_length=4)
    # with dropout active the first ratio would scatter around 1; in eval mode it is exactly 1
    assert abs(metrics["loss/ratio_mean"] - 1.0) < 1e-6


def test_kl_in_the_reward_subtracts_beta_kl_on_action_tokens():
    """``update.kl: {placement: reward}`` is the packed score component `kl_penalty` with weight β."""
    batch = pack([Episode(group_id=0, seed=0, turns=[Turn("ab", [5, 6], "c", [7, 8])])], pad_id=0)
    batch.old_logprobs = torch.tensor([[0.0, 0.0, -1.0, -2.0]])
    batch.ref_logprobs = torch.tensor([[-9.0, -9.0, -1.5, -1.0]])
    before = batch.token_rewards.clone()
    component = Component("kl_penalty", SCORE.create({"name": "kl_penalty", "estimator": "k1"}), 0.5)
    metrics = compose_packed(batch, [component])
    # k1 = logp − ref on the two action tokens: 0.5 and −1.0; observation tokens untouched
    assert torch.allclose(batch.token_rewards - before, torch.tensor([[0.0, 0.0, -0.25, 0.5]]))
    assert abs(metrics["policy/kl_in_reward"] - (-0.25)) < 1e-6
    assert abs(metrics["reward/kl_penalty"] - 0.25) < 1e-6  # the episode's summed reward change


def test_value_loss_clipped_and_unclipped():
    values, old, returns = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.6])
    # unclipped: ½(V−R)²
    assert torch.allclose(value_loss(values, old, returns, None), torch.tensor([0.5, 0.5, 0.005]))
    # clip 0.2: V clipped to old ± 0.2 → [0.2, 0.0, 0.5]; loss = ½·max((V−R)², (Vc−R)²)
    assert torch.allclose(value_loss(values, old, returns, 0.2), torch.tensor([0.5, 0.5, 0.005]))
    values = torch.tensor([0.1, 0.9])
    old, returns = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    # first: Vc = 0.1 (inside the band), ½·0.81; second: Vc = 0.2 → ½·max(0.01, 0.64) = 0.32 (pessimistic)
    assert torch.allclose(value_loss(values, old, returns, 0.2), torch.tensor([0.405, 0.32]))


def fake_context(reward_of_seed):
    """Each seed gives a group of 2 episodes whose rewards `reward_of_seed(seed)` decides."""
    counter = iter(range(1000))

    def rollout(starts, snapshots=False):
        return [Episode(group_id=s.group_id, seed=s.seed) for s in starts]

    def score(episodes):
        for i, e in enumerate(episodes):
            e.rewards["trajectory"]["r"] = reward_of_seed(e.seed, i % 2)

    return ExploreContext(rollout=rollout, score=score, next_seeds=lambda n: [next(counter) for _ in range(n)],
                          groups=GroupIds(), rng=np.random.default_rng(0))


def test_dynamic_sampling_keeps_informative_groups_and_stops_at_budget():
    entry, cfg = EXPLORE.build({"name": "dynamic", "prompts_per_step": 3, "group_size": 2, "max_rounds": 4})
    # odd seeds are informative (rewards 0 and 1), even seeds are not
    episodes, metrics = entry.fn(fake_context(lambda s, j: float(j) if s % 2 else 1.0), cfg)
    seeds = sorted({e.seed for e in episodes})
    assert seeds == [1, 3, 5]
    assert metrics["explore/groups_kept"] == 3.0
    # rounds: 3 sampled (1 kept), then 2 (1 kept: seed 3), then 1 (seed 5 kept) → 6 groups sampled
    assert metrics["explore/groups_sampled"] == 6.0


def test_dynamic_sampling_with_no_informative_group_keeps_the_last_round():
    entry, cfg = EXPLORE.build({"name": "dynamic", "prompts_per_step": 2, "group_size": 2, "max_rounds": 3})
    episodes, metrics = entry.fn(fake_context(lambda s, j: 0.0), cfg)
    assert len(episodes) == 4 and metrics["explore/groups_sampled"] == 6.0
    assert metrics["explore/kept_fraction"] == 0.0


def test_fast_decoder_refuses_mlp_biases():
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    assert fast_decode.supports(LlamaForCausalLM(cfg))
    cfg.mlp_bias = True
    assert not fast_decode.supports(LlamaForCausalLM(cfg))


def test_the_trainer_steps_with_fused_adamw_at_the_recipe_settings(tmp_path):
    """PyTorch's CPU default for AdamW is a per-tensor loop (about 5× slower on the tiny models); the trainer
    asks for the fused kernel, with the recipe's lr, betas and weight decay."""
    from conftest import write_recipe
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    recipe = write_recipe(tmp_path, update={"lr": 3.0e-4, "betas": [0.8, 0.95], "weight_decay": 0.01},
                          policy={"warm_start": {"steps": 0}})
    trainer = Trainer(load_recipe(recipe), tmp_path / "run", quiet=True)
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and group["fused"] is True
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (3.0e-4, (0.8, 0.95), 0.01)
