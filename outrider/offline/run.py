"""`outrider offline`: train OPPO [38] or a baseline on an offline dataset of trajectories with preferences, then
evaluate the policy on held-out layouts; and `outrider offline data` to generate such a dataset.

A run directory holds ``config.json``, ``metrics.jsonl`` (one row per logged step), ``checkpoints/step_N.pt``
(every piece's state_dict: networks, z*, optimisers) and ``summary.json``. Batches are drawn from a generator
seeded by (seed, step), so ``--resume`` from a checkpoint continues bit-identically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from outrider.errors import OutriderError
from outrider.offline import text
from outrider.offline.baselines import BC, BTFilteredBC
from outrider.offline.config import OfflineConfig, load_config  # noqa: F401 (load_config: callers import it here)
from outrider.offline.oppo import OPPO
from outrider.offline.trajectories import N_ACTIONS, Dataset, features, generate, layout_id, load_dataset, \
    make_env


def get_dataset(cfg: OfflineConfig) -> Dataset:
    d = cfg.data
    if d.path:
        ds = load_dataset(d.path)
        if ds.is_text != (cfg.policy == "lm"):
            raise OutriderError(f"data.path: '{d.path}' holds {'text' if ds.is_text else 'vector'} observations; "
                                f"policy {cfg.policy} needs {'text' if cfg.policy == 'lm' else 'vectors'}")
        return ds
    sources = {"expert": (d.expert, 0.0), "noisy": (d.noisy, d.epsilon), "random": (d.random, 1.0)}
    seed = cfg.seed if d.seed is None else d.seed
    if cfg.policy == "lm":
        return text.generate_bandit(d.env_options, sources, d.pairs, d.label_noise, seed)
    return generate(d.env, sources, d.pairs, d.label_noise, d.horizon, seed)


def padded(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every trajectory padded to the longest: observations [N, T, D], actions [N, T], mask [N, T]."""
    n, t = len(ds.trajectories), max(len(tr.actions) for tr in ds.trajectories)
    obs, act, mask = torch.zeros(n, t, ds.obs_dim), torch.zeros(n, t, dtype=torch.long), torch.zeros(n, t)
    for i, tr in enumerate(ds.trajectories):
        k = len(tr.actions)
        obs[i, :k], act[i, :k], mask[i, :k] = torch.from_numpy(tr.observations), torch.from_numpy(tr.actions), 1
    return obs, act, mask


def build(cfg: OfflineConfig, obs_dim: int) -> Any:
    if cfg.method == "oppo":
        return OPPO.mlp(obs_dim, N_ACTIONS, cfg.hidden, cfg.z_dim, cfg.lr, cfg.z_lr, cfg.z_init, cfg.z_max_norm,
                        cfg.weight_decay, cfg.pref_weight, cfg.norm_weight, cfg.margin, cfg.state_noise, cfg.seed)
    if cfg.method == "bc":
        return BC.mlp(obs_dim, N_ACTIONS, cfg.hidden, cfg.lr, cfg.weight_decay, cfg.seed)
    return BTFilteredBC.mlp(obs_dim, N_ACTIONS, cfg.hidden, cfg.lr, cfg.weight_decay, cfg.seed, cfg.reward_steps,
                            cfg.keep)


def setup(cfg: OfflineConfig, ds: Dataset) -> tuple[tuple[torch.Tensor, ...], Any, Callable[[Any], dict]]:
    """The dataset as tensors (first dimension: trajectories), the learner, and its held-out evaluation."""
    layouts = {t.layout for t in ds.trajectories if t.layout}
    if cfg.policy == "lm":
        tok, actions = text.tokenizer(), text.env_actions(cfg.data.env_options)
        tensors = text.text_tensors(ds, tok, actions)
        return tensors, text.build(cfg, tok, actions), \
            lambda learner: text.evaluate(learner, tok, cfg.data.env_options, cfg.eval_episodes, layouts)
    tensors = padded(ds)
    horizon = cfg.data.horizon if not cfg.data.path else int(tensors[2].sum(1).max())
    return tensors, build(cfg, ds.obs_dim), \
        lambda learner: evaluate(learner, cfg.data.env, cfg.eval_episodes, horizon, layouts)


@torch.no_grad()
def evaluate(learner: Any, env_id: str, episodes: int, horizon: int, train_layouts: set[str]) -> dict[str, float]:
    """Greedy episodes on held-out layouts (eval seeds 0..episodes-1); a layout seen in the data is an error."""
    tenv = make_env(env_id, "eval")
    successes, returns = [], []
    for e in range(episodes):
        tenv.reset(e)
        env = tenv.env
        if layout_id(env) in train_layouts:
            raise OutriderError(f"data: evaluation layout of eval seed {e} appears in the dataset; the splits overlap")
        ret, won = 0.0, False
        for _ in range(horizon):
            a = int(learner.policy(torch.from_numpy(features(env)), learner.context()).argmax())
            _, r, terminated, truncated, _ = env.step(a)
            ret += float(r)
            if terminated or truncated:
                won = terminated and r > 0
                break
        successes.append(float(won))
        returns.append(ret)
    return {"eval/success": float(np.mean(successes)), "eval/return": float(np.mean(returns))}


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def run(cfg: OfflineConfig, out: Path, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Train and evaluate; `stop_after` ends the process's work early (tests: a run cut short, then resumed)."""
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(), indent=1) + "\n")
    t0 = time.time()
    ds = get_dataset(cfg)
    data_s = time.time() - t0
    tensors, learner, evaluate_now = setup(cfg, ds)
    pa = torch.tensor([i for i, _, _ in ds.pairs])
    pb = torch.tensor([j for _, j, _ in ds.pairs])
    pref = torch.tensor([p for *_, p in ds.pairs], dtype=torch.float32)
    total = cfg.steps + (cfg.reward_steps if cfg.method == "bt_filtered_bc" else 0)
    start, rows = 0, []
    if resume and _checkpoints(out):
        state = torch.load(_checkpoints(out)[-1], weights_only=False)
        learner.load_state_dict(state["learner"])
        start = state["step"]
        rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["step"] <= start]
    pool = torch.arange(len(ds.trajectories))
    if cfg.method == "bt_filtered_bc" and start >= cfg.reward_steps:
        pool = torch.tensor(learner.select(learner.reward(*tensors).detach()))
    train_s = 0.0
    for step in range(start + 1, total + 1):
        gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
        t1 = time.time()
        ti = pool[torch.randint(len(pool), (cfg.batch,), generator=gen)]
        pi = torch.randint(len(pa), (cfg.pair_batch,), generator=gen)
        ia, ib = pa[pi], pb[pi]
        metrics = learner.step(step, tuple(x[ti] for x in tensors),
                               (tuple(x[ia] for x in tensors), tuple(x[ib] for x in tensors), pref[pi]), gen)
        if cfg.method == "bt_filtered_bc" and step == cfg.reward_steps:
            with torch.no_grad():
                pool = torch.tensor(learner.select(learner.reward(*tensors)))
            kept = {ds.trajectories[int(i)].source for i in pool}
            metrics["bt/kept_expert_share"] = float(np.mean([ds.trajectories[int(i)].source == "expert" for i in pool]))
            metrics["bt/kept_sources"] = len(kept)
        dt = time.time() - t1
        train_s += dt
        metrics.update({"step": step, "time/train_s": dt})
        if step == total or (cfg.eval_every and step % cfg.eval_every == 0):
            t2 = time.time()
            metrics.update(evaluate_now(learner))
            metrics["time/eval_s"] = time.time() - t2
        if step % 50 == 0 or "eval/success" in metrics:
            rows.append(metrics)
        if step % cfg.checkpoint_every == 0 or step == total:
            # each file written aside and renamed: a kill leaves the previous complete version
            (out / "metrics.jsonl.tmp").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (out / "metrics.jsonl.tmp").replace(out / "metrics.jsonl")
            (out / "checkpoints").mkdir(exist_ok=True)
            torch.save({"step": step, "learner": learner.state_dict()}, out / "checkpoints" / f"step_{step}.pt.tmp")
            (out / "checkpoints" / f"step_{step}.pt.tmp").replace(out / "checkpoints" / f"step_{step}.pt")
            for old in _checkpoints(out)[:-2]:
                old.unlink()
        if stop_after is not None and step >= stop_after:
            return {}
    final = {k: v for k, v in rows[-1].items() if k.startswith("eval/")}
    summary = {**final, "method": cfg.method, "seed": cfg.seed, "steps": total, "data_s": data_s,
               "train_s_per_step": train_s / max(total - start, 1), "trajectories": len(ds.trajectories),
               "pairs": len(ds.pairs), "data_meta": ds.meta}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
