"""The optimisation step: epochs over minibatches of one packed batch, the loss a sum of terms (`update.terms`).

The learner knows no term by name: it runs the scoring forward each term needs, calls every term on the
minibatch, weights and aggregates the per-token ones, sums them and steps the optimiser. See `update.terms` for
the built-in terms and their formula.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from outrider.data import Batch
from outrider.policy.model import Policy
from outrider.registry import Options, Piece
from outrider.stats import masked_mean
from outrider.update import TokenContext
from outrider.update.aggregate import AGGREGATIONS, aggregate
from outrider.update.cov import token_covariance
from outrider.update.micro_batch import MetricMerger, check_terms, pack, score_in_chunks, share, trim
from outrider.update.off_policy import OffPolicyConfig


class KLConfig(Options):

    @model_validator(mode="after")
    def _k1_only_in_reward(self) -> "KLConfig":
        # k1 = log π − log π_ref has the gradient ∇log π, whose expectation under π is 0: as a loss it does nothing
        if self.estimator == "k1" and self.placement == "loss" and self.coef > 0:
            raise ValueError("estimator k1 has zero expected gradient as a loss term; use k2 or k3 with "
                             "placement: loss, or k1 with placement: reward")
        return self

    estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token KL estimator (Schulman's k1/k2/k3).")
    coef: float = Field(0.0, ge=0, description="β. 0 turns KL off and skips the reference model entirely.")
    placement: Literal["loss", "reward"] = Field(
        "loss", description="loss: β·KL added to the loss; reward: −β·KL added to each action token's reward.")


class UpdateConfig(Options):
    """How the policy is updated from a batch with advantages."""
    loss: dict = Field(default_factory=lambda: {"name": "ppo"},
                       description="Policy surrogate: {name: ppo|gspo|clip_cov|kl_cov, ...options} "
                                   "(a bare name is accepted).")
    aggregation: str = Field("token-mean", description=f"Loss aggregation: one of {', '.join(AGGREGATIONS)}.")
    norm_length: int | None = Field(None, ge=1, description="Constant length for seq-mean-token-sum-norm "
                                                            "(default: the generation budget).")
    epochs: int = Field(1, ge=1, description="PPO epochs over each batch.")
    minibatches: int = Field(1, ge=1, description="Minibatches per epoch (optimiser steps per epoch).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm (null: no clipping).")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL to the frozen warm-started reference.")
    entropy: dict = Field(default_factory=lambda: {"name": "none"},
                          description="Entropy regulator: {name: none|bonus|adaptive_entropy|entropy_mask|"
                                      "siren, ...options}.")
    terms: list[dict] = Field(default_factory=list, description="Further learner terms, each {name, ...options} "
                                                                "(e.g. dpo), added to the loss after the built-in "
                                                                "ones.")
    off_policy: OffPolicyConfig = Field(default_factory=OffPolicyConfig,
                                        description="Importance correction of off-policy rows (replayed, or "
                                                    "sampled with context training removes).")
    shared_prefix: bool = Field(
        True, description="Run each group's common prompt through the model once per forward instead of once per "
                          "completion (same results up to float rounding; used when it saves ≥ 10% of tokens).")
    skip_zero_advantage: bool = Field(
        True, description="Leave rows whose advantages are 0 on every action token (e.g. a GRPO group where every "
                          "completion got the same reward) out of the training forward and backward, keeping them "
                          "in the loss's denominator: the same update up to float rounding. Applies only when the "
                          "loss and the entropy regulator declare that such rows contribute nothing (ppo, gspo; "
                          "regulator none), with no KL in the loss and no value loss. The update's own metrics "
                          "(policy/*, loss/*, entropy_reg/*) then describe the trained rows (row 0 when none is); "
                          "update/skipped_rows_frac says how many were left out.")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="Token budget of one forward and backward: each optimiser step's minibatch is run "
                                "in micro-batches of at most this many padded tokens (rows × longest row; rows "
                                "packed by length, a pairwise term's groups kept whole) and their gradients "
                                "accumulated, normalised by the whole minibatch's denominator: the same update "
                                "up to float rounding, in less memory (verl's ppo_max_token_len_per_gpu with "
                                "use_dynamic_bsz). null: one forward per minibatch. A row longer than the budget "
                                "is an error; pieces that read their whole minibatch (clip_cov, kl_cov, "
                                "entropy_mask, adaptive_entropy, siren, epo, sil) cannot be split.")
    vf_coef: float = Field(0.5, ge=0, description="Value-loss weight (used when the credit piece needs values).")
    value_clip: float | None = Field(0.2, gt=0, description="PPO value clipping range (null: unclipped).")

    @field_validator("loss", "entropy", mode="before")
    @classmethod
    def _name_shorthand(cls, v: object) -> object:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("terms", mode="before")
    @classmethod
    def _names_shorthand(cls, v: object) -> object:
        return [{"name": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must each be in [0, 1), got {list(v)}")
        return v

    @field_validator("aggregation")
    @classmethod
    def _known_aggregation(cls, v: str) -> str:
        if v not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation '{v}'; valid: {', '.join(AGGREGATIONS)}")
        return v


@torch.no_grad()
def prepare(batch: Batch, policy: Policy, reference: Policy | None, cfg: UpdateConfig, temperature: float,
            need_old: bool, need_values: bool, need_hidden: bool = False, top_k: int = 0, top_p: float = 1.0) -> None:
    """Fill the batch's old log-probs, values, hidden states and reference log-probs (one no-grad forward of the
    policy and one of the reference, each only if something needs it).

    ``top_k``/``top_p`` are the sampler's: the policy's log-probs are those of the truncated distribution the
    tokens were drawn from (`Policy.score`); the reference's stay untruncated (k3 then estimates the KL of the
    sampling policy to the reference model).

    With `cfg.max_tokens_per_micro_batch` both forwards run one micro-batch under the budget at a time.

    The policy runs in eval mode here and in `learner_step`: dropout would make the "old" and the new
    log-probs of the same parameters differ, biasing the ratio (TRL and verl likewise disable dropout for RL).
    """
    policy.eval()
    if need_old or need_values or need_hidden:
        scores = score_in_chunks(policy, batch, cfg.max_tokens_per_micro_batch, cfg.shared_prefix,
                                 temperature=temperature, values=need_values, hidden=need_hidden, top_k=top_k,
                                 top_p=top_p)
        batch.old_logprobs = scores.logprobs if need_old else None
        batch.values = scores.values
        batch.hidden = scores.hidden
    if reference is not None:
        batch.ref_logprobs = score_in_chunks(reference, batch, cfg.max_tokens_per_micro_batch, cfg.shared_prefix,
                                             temperature=temperature).logprobs


def entropy_advantage_covariance(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The masked mean of [153]'s `token_covariance` (positive predicts entropy falling) and the fraction of
    tokens with cov_t > 1 (the band Clip-Cov acts on)."""
    cov = token_covariance(logprobs, advantages, mask)
    return masked_mean(cov, mask), masked_mean((cov > 1).to(cov.dtype), mask)


def live_rows(advantages: Tensor, mask: Tensor) -> Tensor:
    """[B] bool: the row has a non-zero advantage on some action token."""
    return ((advantages != 0) & (mask > 0)).any(dim=-1)


def trained_rows(advantages: Tensor, mask: Tensor, live: Tensor | None = None) -> Tensor | None:
    """Indices of the rows with a non-zero advantage on some action token (`live`, if already computed), or None
    when that is every row.

    With no such row, row 0 is kept: its loss and gradients are exact zeros, so the optimiser still steps (AdamW
    moves parameters on a zero gradient through its moments and weight decay) exactly as on the full batch."""
    live = live_rows(advantages, mask) if live is None else live
    if bool(live.all()):
        return None
    rows = live.nonzero().squeeze(-1)
    return rows if rows.numel() else torch.zeros(1, dtype=torch.long, device=advantages.device)


def minibatch_rows(batch: Batch, minibatches: int, generator: torch.Generator, by_group: bool) -> list[Tensor]:
    """A random split of the batch's rows into `minibatches` chunks; with `by_group` (pairwise terms) whole groups
    stay together."""
    order = torch.randperm(batch.size, generator=generator)
    if not by_group:
        _warn_fewer(minibatches, batch.size, "rows")
        return list(order.chunk(minibatches))
    _, group = torch.unique(batch.group_index.cpu(), return_inverse=True)
    members = [(group == g).nonzero().squeeze(-1) for g in range(int(group.max()) + 1)]
    _warn_fewer(minibatches, len(members), "groups")
    chunks = torch.randperm(len(members), generator=generator).chunk(minibatches)
    return [torch.cat([members[int(g)] for g in c]) for c in chunks]


SKIPPED_NONFINITE = "update/skipped_nonfinite_steps"  # optimiser steps skipped for a NaN/inf loss or gradient


_WARNED: set[tuple[int, int, str]] = set()


def _warn_fewer(minibatches: int, units: int, what: str) -> None:
    """Say once (per run and batch size) that a batch has fewer rows (groups) than `update.minibatches`: it is
    split into one minibatch per row instead, fewer optimiser steps than asked for."""
    if minibatches > units and (minibatches, units, what) not in _WARNED:
        _WARNED.add((minibatches, units, what))
        print(f"warning: update.minibatches={minibatches}, but a step's batch has {units} {what}: it is split into "
              f"{units} minibatches of one instead (set update.minibatches <= {units})", file=sys.stderr)


def _term_name(term: Piece) -> str:
    return getattr(term, "prefix", None) or term.name


def learner_step(policy: Policy, optimizer: torch.optim.Optimizer, batch: Batch, terms: list[Piece],
                 cfg: UpdateConfig, temperature: float, generator: torch.Generator,
                 norm_length: int, top_k: int = 0, top_p: float = 1.0) -> dict[str, float]:
    """Run `epochs × minibatches` optimiser steps on `batch` (advantages already set); return mean metrics (the
    max over minibatches for keys ending in ``_max``). Log-probs are scored under the sampler's ``top_k``/``top_p``
    truncation (see `prepare`).

    When every term promises ``zero_at_zero_advantage``, `cfg.skip_zero_advantage` leaves zero-advantage rows out:
    the per-token losses of the kept rows are put back in their places in the minibatch, so every aggregation
    keeps its full-minibatch denominator.

    An optimiser step whose loss or gradient norm is not finite (NaN, inf) is skipped and counted as
    ``update/skipped_nonfinite_steps`` (the run stops after `train.max_nonfinite_steps` steps in a row with one).

    With `cfg.max_tokens_per_micro_batch`, each minibatch runs as micro-batches under the token budget
    (`micro_batch.pack`) whose gradients accumulate into one optimiser step equal to the unsplit one (every term
    declares `Needs.micro_batch`); ``update/micro_batches`` logs how many a step took."""
    agg_len = cfg.norm_length or norm_length

    def agg(x: Tensor, m: Tensor) -> Tensor:
        return aggregate(x, m, cfg.aggregation, agg_len)

    skip = cfg.skip_zero_advantage and all(t.needs.zero_at_zero_advantage for t in terms)
    by_group = any(t.needs.pairs for t in terms)
    budget = cfg.max_tokens_per_micro_batch
    if budget is not None:
        check_terms(terms)
    policy.eval()  # no dropout: see `prepare`; gradients flow in eval mode all the same
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    skipped = 0
    for _ in range(cfg.epochs):
        for rows in minibatch_rows(batch, cfg.minibatches, generator, by_group):
            full = batch.select(rows)
            live = live_rows(full.advantages, full.action_mask) if skip else None
            kept = None if live is None else trained_rows(full.advantages, full.action_mask, live)
            chunks: list[Tensor | None] = [kept]
            if budget is not None:
                base = torch.arange(full.size, device=full.input_ids.device) if kept is None else kept
                chunks = pack(full, base, budget, by_group)
                chunks = [kept] if len(chunks) == 1 else chunks
            whole = None if len(chunks) == 1 else full if kept is None else full.select(kept)
            optimizer.zero_grad(set_to_none=True)
            merger, total = MetricMerger(), 0.0
            for chunk in chunks:  # gradients accumulate over micro-batches
                loss, metrics, weights = _micro_loss(policy, full, chunk, whole, terms, cfg, agg, agg_len,
                                                     temperature, generator, top_k, top_p)
                loss.backward()
                total += float(loss.detach())
                merger.add(metrics, weights)
            metrics = merger.result()
            params = [p for p in policy.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
            if bool(torch.isfinite(torch.tensor(total)) & torch.isfinite(grad_norm)):
                optimizer.step()
            else:  # a NaN/inf loss or gradient would corrupt the parameters and the optimiser's moments for good
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
            metrics["optim/grad_norm"] = float(grad_norm)
            if budget is not None:
                metrics["update/micro_batches"] = float(len(chunks))
            if live is not None:
                metrics["update/skipped_rows_frac"] = 1.0 - float(live.sum()) / full.size
            for k, v in metrics.items():  # per-key counts: some pieces skip a metric on some minibatches
                if k.endswith("_max"):
                    sums[k] = max(sums[k], float(v)) if counts[k] else float(v)
                    counts[k] = 1
                    continue
                sums[k] += float(v)
                counts[k] += 1
    return {**{k: v / counts[k] for k, v in sums.items()}, SKIPPED_NONFINITE: float(skipped)}


def _micro_loss(policy: Policy, full: Batch, rows: Tensor | None, whole: Batch | None, terms: list[Piece],
                cfg: UpdateConfig, agg, agg_len: int, temperature: float, generator: torch.Generator, top_k: int,
                top_p: float) -> tuple[Tensor, dict[str, float], dict[str, float | None]]:
    """The loss of the minibatch's ``rows`` (None: all of them), its metrics and each metric's weight.

    Per-token losses are placed back in the minibatch and reduced with its denominator. With ``whole`` (the
    minibatch's trained rows, when it is split into micro-batches) each scalar term loss is multiplied by the
    micro-batch's `share`, so the micro-batches' losses sum to the unsplit one."""
    mb = full if rows is None else trim(full, rows)
    mask = mb.action_mask
    need_logits = any(t.needs.logits for t in terms)
    scores = policy.score(mb.input_ids, mb.attention_mask, temperature, entropy=True,
                          values=mb.returns is not None, logits=need_logits,
                          groups=mb.group_index if cfg.shared_prefix else None, top_k=top_k, top_p=top_p)
    old = mb.old_logprobs if mb.old_logprobs is not None else scores.logprobs.detach()
    ctx = TokenContext(scores.logprobs, old, mb.advantages, mask, entropy=scores.entropy,
                       logits=scores.logits, aggregate=agg, generator=generator,
                       step_index=mb.step_index, values=scores.values, batch=mb)
    outputs = [(term, term(ctx)) for term in terms]
    token_weight = None
    for _, out in outputs:
        if out.token_weight is not None:
            token_weight = out.token_weight if token_weight is None else token_weight * out.token_weight
    weight = mb.sample_weight[:, None] if token_weight is None else mb.sample_weight[:, None] * token_weight
    tokens = float(mask.sum())
    loss, metrics = None, {}
    weights: dict[str, float | None] = {}
    for term, out in outputs:
        part, w = out.loss, tokens
        if out.per_token is not None:
            part = agg(_placed(out.per_token * weight, full, rows), full.action_mask if rows is not None else mask)
            metrics[f"loss/{term.name}"] = part.detach()
            weights[f"loss/{term.name}"] = None  # a part of the step's reduced loss: summed
        elif whole is not None and part is not None:
            part = part * share(term, mb, whole, cfg.aggregation, agg_len)
        if whole is not None and term.entry.needs.micro_batch == "pairs":  # its metrics are means over pairs
            w = share(term, mb, whole, cfg.aggregation, agg_len)
        named = {k if "/" in k else f"{_term_name(term)}/{k}": v for k, v in out.metrics.items()}
        metrics.update(named)
        weights.update({k: w for k in named if k not in weights})
        if part is not None:
            loss = part if loss is None else loss + part
    if loss is None:  # no term contributes (e.g. a pairwise term on a minibatch without pairs)
        loss = scores.logprobs.sum() * 0.0
    metrics["policy/entropy"] = masked_mean(scores.entropy.detach(), mask)
    metrics["policy/entropy_adv_cov"], metrics["policy/cov_gt1_frac"] = entropy_advantage_covariance(
        scores.logprobs.detach(), mb.advantages, mask)
    metrics["loss/total"] = loss.detach()
    weights.update(dict.fromkeys(("policy/entropy", "policy/entropy_adv_cov", "policy/cov_gt1_frac"), tokens))
    weights["loss/total"] = None
    return loss, {k: float(v) for k, v in metrics.items()}, weights


def _placed(per_token: Tensor, full: Batch, kept: Tensor | None) -> Tensor:
    """A kept rows' per-token loss put back in its rows of the full minibatch (zeros elsewhere), or as it is."""
    if kept is None:
        return per_token
    width = full.action_mask.shape[1]
    padded = torch.nn.functional.pad(per_token, (0, width - per_token.shape[1]))
    return per_token.new_zeros(full.action_mask.shape).index_copy(0, kept, padded)
