"""outrider's credit pieces as verl advantage estimators and its loss pieces as verl policy losses, registered
through verl's own registries (`register_adv_est`, `register_policy_loss` in ``verl.trainer.ppo.core_algos``).

Importing this module registers every credit piece as ``outrider_<name>`` (``algorithm.adv_estimator=
outrider_gigpo``) and every loss piece as ``outrider_<name>`` (``actor_rollout_ref.actor.policy_loss.loss_mode=
outrider_clip_cov``), each with outrider's default options; the ``outrider_`` prefix keeps verl's own ``grpo``,
``clip_cov``... untouched. verl imports it in every process (driver, TaskRunner, workers) through its
``verl.plugins`` entry point, which outrider's package declares; ``VERL_USE_EXTERNAL_MODULES=
outrider.integrations.verl`` does the same where entry points are off. Other options: `register` under a name of
your own, e.g. ``register("outrider_canon_len", {"name": "canon", "metric": "length"})`` in a plugin module.

Tensors map as: verl's ``token_level_rewards`` → ``batch.token_rewards``, ``response_mask`` → ``action_mask``,
``index`` (the prompt uids) → ``group_index`` (ids by first appearance); one turn per response. Credit pieces that
read the rollout's behaviour entropy or log-probs (CANON's entropy split, EMPG, PPL-position) take them as the
optional keyword arguments ``entropys`` / ``old_log_probs`` ([B, T] over the response): verl's
``compute_advantage`` passes only rewards, mask, index and config, so a verl run that uses them passes those two
from ``data.batch``. Step-level
pieces (GiGPO's anchor states) see single-turn responses unless ``step_index`` and ``turn_state_ids`` are given.
Losses: verl's ``loss_agg_mode`` is outrider's loss aggregation (the same four modes); the loss options are the
registered ones (verl's actor clip ratios are not read); ``rollout_is_weights``, when given, multiply the per-token
loss before aggregation, as in verl's vanilla loss.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from outrider.credit import CREDIT
from outrider.data import Batch
from outrider.errors import OutriderError
from outrider.integrations import require
from outrider.update import LOSSES, TokenContext
from outrider.update.aggregate import aggregate

PREFIX = "outrider_"
SKIPPED_CREDIT = {"gae": "needs a value head: use verl's own gae",
                  "oprl": "trains a PRM copied from the policy, which verl's estimator call does not give",
                  "prl": "needs the reference policy's log-probs, which verl's estimator call does not give"}
SKIPPED_LOSSES = {"none": "trains no policy"}


def group_index(index: Any, n: int, device: torch.device) -> Tensor:
    """verl's per-row prompt uids (strings, ints; None: each row its own group) as dense ints, by first appearance."""
    if index is None:
        return torch.arange(n, device=device)
    ids: dict[Any, int] = {}
    keys = index.tolist() if isinstance(index, (np.ndarray, Tensor)) else list(index)
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long, device=device)


def batch_from_verl(token_level_rewards: Tensor, response_mask: Tensor, index: Any = None,
                    entropys: Tensor | None = None, old_log_probs: Tensor | None = None,
                    step_index: Tensor | None = None, turn_state_ids: Tensor | None = None) -> Batch:
    """An outrider `Batch` over verl's response tensors ([B, T]); ``input_ids`` are placeholders (credit never
    reads them)."""
    mask = response_mask.to(token_level_rewards.dtype)
    B = mask.shape[0]
    if step_index is None:
        step_index = torch.where(mask > 0, torch.zeros_like(mask, dtype=torch.long),
                                 torch.full_like(mask, -1, dtype=torch.long))
    zero_off = (lambda x: None if x is None else torch.where(mask > 0, x.to(mask.dtype), torch.zeros_like(mask)))
    return Batch(input_ids=torch.zeros_like(mask, dtype=torch.long), attention_mask=(mask > 0).long(),
                 action_mask=mask, token_rewards=token_level_rewards, step_index=step_index,
                 group_index=group_index(index, B, mask.device), sample_weight=torch.ones(B, dtype=mask.dtype),
                 behaviour_entropy=zero_off(entropys), behaviour_logprobs=zero_off(old_log_probs),
                 old_logprobs=zero_off(old_log_probs), turn_state_ids=turn_state_ids)


def adv_estimator(section: dict[str, Any] | str) -> Callable[..., tuple[Tensor, Tensor]]:
    """verl's advantage-estimator signature around the outrider credit piece SECTION (``{"name": ..., **opts}``):
    ``fn(token_level_rewards, response_mask, index=None, config=None, **kwargs) -> (advantages, returns)``."""
    section = {"name": section} if isinstance(section, str) else dict(section)
    piece = CREDIT.create(section, where=f"verl adv_estimator {section.get('name')!r}")
    if piece.name in SKIPPED_CREDIT and piece.name != "gae":
        raise OutriderError(f"credit '{piece.name}': {SKIPPED_CREDIT[piece.name]}")
    if piece.needs.values:
        raise OutriderError(f"credit '{section['name']}': needs a value head, which verl's estimator call does not "
                            "give; use verl's own gae")
    if piece.needs.ref_logprobs:
        raise OutriderError(f"credit '{section['name']}': needs the reference policy's log-probs, which verl's "
                            "estimator call does not give")

    def estimate(token_level_rewards: Tensor, response_mask: Tensor, index: Any = None, config: Any = None,
                 entropys: Tensor | None = None, old_log_probs: Tensor | None = None,
                 step_index: Tensor | None = None, turn_state_ids: Tensor | None = None,
                 **_: Any) -> tuple[Tensor, Tensor]:
        batch = batch_from_verl(token_level_rewards, response_mask, index, entropys, old_log_probs, step_index,
                                turn_state_ids)
        with torch.no_grad():
            out = piece(batch)
        returns = out.returns if out.returns is not None else out.advantages
        return out.advantages, returns

    estimate.__name__ = f"{PREFIX}{piece.name}"
    estimate.__doc__ = piece.entry.doc if piece.entry is not None else None
    return estimate


def policy_loss(section: dict[str, Any] | str) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """verl's policy-loss signature around the outrider loss piece SECTION: ``fn(old_log_prob, log_prob, advantages,
    response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None) -> (loss, metrics)``."""
    section = {"name": section} if isinstance(section, str) else dict(section)
    piece = LOSSES.create(section, where=f"verl policy_loss {section.get('name')!r}")

    def loss_fn(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                loss_agg_mode: str = "token-mean", config: Any = None, rollout_is_weights: Tensor | None = None,
                **_: Any) -> tuple[Tensor, dict[str, Any]]:
        mask = response_mask.to(log_prob.dtype)
        ctx = TokenContext(log_prob, old_log_prob.detach(), advantages.detach(), mask,
                           aggregate=lambda x, m: aggregate(x, m, loss_agg_mode))
        per_token, metrics = piece(ctx)
        if rollout_is_weights is not None:
            per_token = per_token * rollout_is_weights
        loss = aggregate(per_token, mask, loss_agg_mode)
        return loss, {f"actor/{k}": float(v.detach()) if isinstance(v, Tensor) else v for k, v in metrics.items()}

    loss_fn.__name__ = f"{PREFIX}{piece.name}"
    return loss_fn


def register(name: str, section: dict[str, Any] | str, kind: str) -> str:
    """Register SECTION under NAME in verl's registry of KIND (``adv_estimator`` or ``policy_loss``)."""
    core = require("verl.trainer.ppo.core_algos", "verl")
    if kind == "adv_estimator":
        fn = adv_estimator(section)
        if core.ADV_ESTIMATOR_REGISTRY.get(name) is not None and \
                getattr(core.ADV_ESTIMATOR_REGISTRY[name], "__module__", "") == __name__:
            core.ADV_ESTIMATOR_REGISTRY.pop(name)  # re-registering ours (a second import) replaces it
        core.register_adv_est(name)(fn)
    elif kind == "policy_loss":
        if name in core.POLICY_LOSS_REGISTRY and getattr(core.POLICY_LOSS_REGISTRY[name], "__module__", "") != \
                __name__:
            raise OutriderError(f"verl policy_loss '{name}' is verl's own; register outrider's under another name")
        core.register_policy_loss(name)(policy_loss(section))
    else:
        raise OutriderError(f"kind: '{kind}' is not one of adv_estimator, policy_loss")
    return name


def register_all() -> list[str]:
    """Every outrider credit and loss piece under ``outrider_<name>``, with default options; returns the names."""
    names = [register(PREFIX + n, n, "adv_estimator") for n in CREDIT.names() if n not in SKIPPED_CREDIT]
    return names + [register(PREFIX + n, n, "policy_loss") for n in LOSSES.names() if n not in SKIPPED_LOSSES]


REGISTERED = register_all()
