"""OPPO [38] and its baselines with the tiny LM policy on a multi-turn text env: z enters as a learned prefix.

* The policy ``π(a | s, z)`` is the built-in tiny Llama (`outrider.policy.model.build_tiny_model`) reading
  ``[P(z)] + text``: ``P`` (a linear map) turns z into `prefix_tokens` input embeddings placed before the token
  embeddings of the trajectory's text so far. A trajectory's text is ``<bos> o_0 a_0 \\n o_1 a_1 \\n …`` (the
  env's observations and text actions); action ``a_t`` is scored by the LM's log-likelihood of its token at its
  position, normalised over the env's actions (a softmax of those tokens' logits: the categorical over valid
  actions). One forward scores every action of a trajectory (the causal mask hides what comes after it).
* The encoder ``E(τ)`` is a second, smaller tiny Llama over the whole trajectory text, its last hidden states
  mean-pooled over the non-padding tokens, then a linear head to z (the BT baseline's reward is the same network
  with a 1-dimensional head: R̂(τ)).
* The data: a K-armed bandit (`outrider.envs.bandit`) played by Thompson sampling (the expert), an ε-noisy expert
  and a uniformly random policy; a trajectory's return is its expected payoff ``Σ_t μ_{a_t}`` (= H·μ* − the
  pseudo-regret: the sampled 0/1 payoffs would label pairs by luck as much as by play).

Differences from the MLP version (`offline.oppo`), the same otherwise: no state noise in the HIM step (tokens
are discrete); every action must be one token (the bandit's arm digits are).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from outrider.errors import OutriderError
from outrider.offline.baselines import BC, BTFilteredBC
from outrider.offline.oppo import OPPO, nll
from outrider.offline.trajectories import Dataset, Trajectory, draw_pairs


SEP = "\n"  # after each action, so the next observation starts on its own line
MAX_POSITIONS = 512


def tokenizer() -> Any:
    from outrider.policy.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def action_ids(tok: Any, actions: list[str]) -> list[int]:
    """The token of each env action; an action that is not exactly one token is an error."""
    out = []
    for a in actions:
        ids = encode(tok, a)
        if len(ids) != 1:
            raise OutriderError(f"policy: lm scores one-token actions; the env's action {a!r} is {len(ids)} tokens")
        out.append(ids[0])
    return out


def trajectory_ids(tok: Any, observations: list[str], actions: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of ``<bos> o_0 a_0 SEP o_1 a_1 SEP …`` and the position of each action's token in them."""
    ids, positions = [tok.bos_token_id], []
    for obs, act in zip(observations, actions):
        ids += encode(tok, obs)
        positions.append(len(ids))
        ids += encode(tok, act) + encode(tok, SEP)
    return ids, positions


def pad(rows: list[list[int]], value: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded [N, L] tensor and its 0/1 mask."""
    width = max(len(r) for r in rows)
    out, mask = torch.full((len(rows), width), value, dtype=torch.long), torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1.0
    return out, mask


def text_tensors(ds: Dataset, tok: Any, actions: list[str]) -> tuple[Tensor, ...]:
    """The dataset as (ids [N, L], attention [N, L], action positions [N, T], action indices [N, T], action mask
    [N, T]); an action outside the env's is an error naming the trajectory."""
    index = {a: k for k, a in enumerate(actions)}
    ids, pos, acts = [], [], []
    for t in ds.trajectories:
        bad = [a for a in t.actions if a not in index]
        if bad:
            raise OutriderError(f"data: trajectory '{t.id}' has action {bad[0]!r}, not one of the env's {actions}")
        row, p = trajectory_ids(tok, list(t.observations), list(t.actions))  # type: ignore[arg-type]
        if len(row) > MAX_POSITIONS:
            raise OutriderError(f"data: trajectory '{t.id}' is {len(row)} tokens, over the LM's {MAX_POSITIONS}")
        ids.append(row), pos.append(p), acts.append([index[a] for a in t.actions])
    ids_t, attn = pad(ids, tok.pad_token_id)
    pos_t, act_mask = pad(pos)
    return ids_t, attn, pos_t, pad(acts)[0], act_mask


class TextPolicy(nn.Module):
    """``π(a | s, z)``: the tiny LM over [`prefix_tokens` embeddings from z] + the text (z_dim 0: no prefix)."""

    def __init__(self, model: nn.Module, candidates: list[int], z_dim: int, prefix_tokens: int):
        super().__init__()
        self.model = model
        self.register_buffer("candidates", torch.tensor(candidates, dtype=torch.long), persistent=False)
        self.k = prefix_tokens if z_dim > 0 else 0
        self.prefix = nn.Linear(z_dim, self.k * model.config.hidden_size) if self.k else None

    def embed(self, ids: Tensor, attn: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor]:
        """Input embeddings [B, k + L, H] and attention [B, k + L]: the prefix P(z) first, then the tokens."""
        emb = self.model.get_input_embeddings()(ids)
        if z is None or self.prefix is None:
            return emb, attn
        b, h = ids.shape[0], emb.shape[-1]
        prefix = self.prefix(z.expand(b, -1) if z.dim() == 1 else z).view(b, self.k, h)
        return torch.cat([prefix, emb], 1), torch.cat([attn.new_ones(b, self.k), attn], 1)

    def forward(self, ids: Tensor, attn: Tensor, positions: Tensor, z: Tensor | None = None) -> Tensor:
        """Logits of the env's actions [B, T, K] at token positions [B, T] (the logit predicting position p is
        the one at p − 1, shifted by the prefix)."""
        emb, mask = self.embed(ids, attn, z)
        logits = self.model(inputs_embeds=emb, attention_mask=mask).logits
        shift = emb.shape[1] - ids.shape[1]
        at = (positions + shift - 1).clamp_min(0)
        picked = logits.gather(1, at.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return picked[..., self.candidates]

    def loss(self, batch: tuple[Tensor, ...], z: Tensor | None, noise: float = 0.0,
             gen: torch.Generator | None = None) -> Tensor:
        """HIM / BC: ``− mean_t log π(a_t | text_<t, z)`` over the valid actions (no state noise on tokens)."""
        ids, attn, positions, act, act_mask = batch
        return nll(self(ids, attn, positions, z), act, act_mask)


class TextEncoder(nn.Module):
    """``E(τ)``: a tiny Llama's last hidden states mean-pooled over the attended tokens, a linear head to `out`."""

    def __init__(self, tok: Any, hidden: int, layers: int, heads: int, out: int, seed: int):
        super().__init__()
        from outrider.policy.model import build_tiny_model

        self.body = build_tiny_model(tok, hidden, layers, heads, MAX_POSITIONS, seed).model
        self.head = nn.Linear(hidden, out)

    def forward(self, ids: Tensor, attn: Tensor, *rest: Tensor) -> Tensor:
        h = self.body(input_ids=ids, attention_mask=attn).last_hidden_state
        m = attn.unsqueeze(-1)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


class TextReward(TextEncoder):
    """R̂(τ) [B] for the Bradley–Terry baseline: the encoder with a one-number head."""

    def __init__(self, tok: Any, hidden: int, layers: int, heads: int, seed: int):
        super().__init__(tok, hidden, layers, heads, 1, seed)

    def forward(self, ids: Tensor, attn: Tensor, *rest: Tensor) -> Tensor:
        return super().forward(ids, attn).squeeze(-1)


def build(cfg: Any, tok: Any, actions: list[str]) -> Any:
    """The learner of `cfg.method` with the tiny LM policy (and tiny-LM encoder / reward)."""
    from outrider.policy.model import build_tiny_model

    torch.manual_seed(cfg.seed)
    cand = action_ids(tok, actions)

    def policy(z_dim: int) -> TextPolicy:
        model = build_tiny_model(tok, cfg.lm_hidden, cfg.lm_layers, cfg.lm_heads, MAX_POSITIONS, cfg.seed)
        return TextPolicy(model, cand, z_dim, cfg.prefix_tokens)

    if cfg.method == "oppo":
        encoder = TextEncoder(tok, cfg.lm_hidden, cfg.encoder_layers, cfg.lm_heads, cfg.z_dim, cfg.seed + 1)
        return OPPO(encoder, policy(cfg.z_dim), cfg.z_dim, cfg.lr, cfg.z_lr, cfg.z_init, cfg.z_max_norm,
                    cfg.weight_decay, cfg.pref_weight, cfg.norm_weight, cfg.margin, cfg.state_noise)
    if cfg.method == "bc":
        return BC(policy(0), cfg.lr, cfg.weight_decay)
    reward = TextReward(tok, cfg.lm_hidden, cfg.encoder_layers, cfg.lm_heads, cfg.seed + 1)
    return BTFilteredBC(policy(0), reward, cfg.lr, cfg.weight_decay, cfg.reward_steps, cfg.keep)


# --- the bandit: data and evaluation ----------------------------------------------------------------------------
def bandit_config(options: dict[str, Any]) -> Any:
    from outrider.envs.bandit import BanditConfig

    try:
        return BanditConfig.model_validate(options)
    except ValidationError as e:
        err = e.errors()[0]
        raise OutriderError(f"data.env_options.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def env_actions(options: dict[str, Any]) -> list[str]:
    return [str(k + 1) for k in range(bandit_config(options).arms)]


def bandit_layout(env: Any, seed: int) -> str:
    """The unit of train/eval disjointness: the bandit's internal seed (eval seed s is 2^31 + s, train seeds are
    below 2^30). Not its content: with 2 arms of means 0.8/0.2 and 12 pulls, identical payoff sequences recur
    across seeds (12 wins in a row on the 0.8 arm has probability 0.07), as they would for any two draws."""
    from outrider.envs.base import EVAL_OFFSET

    return f"bandit:{seed + EVAL_OFFSET if env.split == 'eval' else seed}"


def generate_bandit(options: dict[str, Any], sources: dict[str, tuple[int, float]], n_pairs: int,
                    label_noise: float, seed: int) -> Dataset:
    """`sources` maps a name to (trajectories, ε): Thompson sampling (the bandit's `expert`) with a uniformly random
    arm with probability ε; train bandits only; return = Σ_t μ_{a_t}; pairs as in `draw_pairs`."""
    from outrider.envs.bandit import BanditEnv, expert_action

    cfg = bandit_config(options)
    env, rng = BanditEnv(cfg, "train"), random.Random(seed)
    trajs: list[Trajectory] = []
    solved: dict[str, list[bool]] = {n: [] for n in sources}
    for name, (count, eps) in sources.items():
        for _ in range(count):
            seed_k = rng.randrange(2**30)
            obs, observations, actions, info = env.reset(seed_k), [], [], {}
            layout = bandit_layout(env, seed_k)
            for _ in range(cfg.pulls):
                arm = rng.randrange(cfg.arms) if rng.random() < eps else \
                    expert_action(cfg.expert, env.counts, env.successes, rng)
                observations.append(obs)
                actions.append(str(arm + 1))
                obs, _, done, info = env.step(str(arm + 1))
                if done:
                    break
            ret = sum(env.means[a] for a in env.history if a is not None)
            trajs.append(Trajectory(f"t{len(trajs)}", observations, actions, ret, name, layout))
            solved[name].append(bool(info.get("success")))
    pairs, flipped = draw_pairs(trajs, n_pairs, label_noise, rng)
    meta = {"env": "bandit", "env_options": options, "seed": seed, "label_noise": label_noise, "flipped": flipped,
            "mean_return": {n: float(np.mean([t.ret for t in trajs if t.source == n])) for n in sources},
            "success": {n: float(np.mean(v)) for n, v in solved.items()}, "ties": sum(p == 0.5 for *_, p in pairs)}
    return Dataset(trajs, pairs, meta)


@torch.no_grad()
def evaluate(learner: Any, tok: Any, options: dict[str, Any], episodes: int, train_layouts: set[str]
             ) -> dict[str, float]:
    """Greedy (most likely action) episodes on held-out bandits (eval seeds 0..episodes-1), all in lockstep; a
    held-out bandit seen in the data is an error."""
    from outrider.envs.bandit import BanditEnv

    cfg, actions = bandit_config(options), env_actions(options)
    envs = [BanditEnv(cfg, "eval") for _ in range(episodes)]
    rows = []
    for e, env in enumerate(envs):
        rows.append([tok.bos_token_id] + encode(tok, env.reset(e)))
        if bandit_layout(env, e) in train_layouts:
            raise OutriderError(f"data: the held-out bandit of eval seed {e} appears in the dataset; the splits overlap")
    infos: list[dict[str, Any]] = [{} for _ in envs]
    z = learner.context()
    for _ in range(cfg.pulls):
        ids, attn = pad(rows, tok.pad_token_id)
        at = torch.tensor([[len(r)] for r in rows])
        choice = learner.policy(ids, attn, at, z)[:, 0].argmax(-1).tolist()
        for e, env in enumerate(envs):
            obs, _, _, infos[e] = env.step(actions[choice[e]])
            rows[e] += encode(tok, actions[choice[e]] + SEP + obs)
    regret = [i["metrics"]["regret"] for i in infos]
    return {"eval/success": float(np.mean([i["success"] for i in infos])),
            "eval/return": float(np.mean([cfg.pulls * max(env.means) - r for env, r in zip(envs, regret)])),
            "eval/regret": float(np.mean(regret)),
            "eval/best_arm_frac": float(np.mean([i["metrics"]["best_arm_frac"] for i in infos]))}
