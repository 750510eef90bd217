"""Micro-batches under a token budget (`update.max_tokens_per_micro_batch`): one optimiser step's minibatch is run
through the model in pieces whose padded size (rows × the longest row's tokens) stays under the budget, and the
gradients accumulate, so a long-sequence step needs the memory of one micro-batch's forward and backward.

The step is the same as the unsplit one: the learner reduces every per-token loss of a micro-batch with the
whole minibatch's denominator (`aggregate.denominator`), and multiplies every scalar loss a term gives by the
micro-batch's `share` of that denominator (its pairs' share, for pairwise terms), which is exact for terms that
promise ``Needs.micro_batch``. verl's ``use_dynamic_bsz`` with ``ppo_max_token_len_per_gpu`` is the same idea;
verl counts the unpadded tokens of its packed sequences, outrider's forward pads, so here the budget bounds
rows × width.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import fields

import torch
from torch import Tensor

from outrider.data import Batch
from outrider.errors import OutriderError
from outrider.policy.model import Policy, Scores
from outrider.registry import Piece
from outrider.update.aggregate import denominator

FIELD = "update.max_tokens_per_micro_batch"


def check_terms(terms: list[Piece]) -> None:
    """A one-line error for a term that cannot be split into micro-batches (its `Needs.micro_batch` is None)."""
    for term in terms:
        if term.entry.needs.micro_batch is None:
            raise OutriderError(f"{FIELD}: '{term.entry.name}' reads its whole minibatch at once (a batch "
                                f"statistic or a state update per call) and cannot be split into micro-batches; "
                                f"set {FIELD}: null, or use pieces that declare Needs.micro_batch")


def pack(batch: Batch, rows: Tensor, budget: int, by_group: bool) -> list[Tensor]:
    """Split ``rows`` (indices into ``batch``) into micro-batches of at most ``budget`` padded tokens.

    Units (a row; a whole group with ``by_group``) go longest first into the current micro-batch while
    ``units' rows × its longest row`` fits (next-fit decreasing: rows of similar length share a micro-batch, so
    little of the budget is padding). Deterministic: no random draw, so the run's generator is unchanged."""
    lengths = batch.attention_mask[rows].sum(-1).tolist()
    if by_group:
        groups: dict[int, list[int]] = defaultdict(list)
        for i, g in enumerate(batch.group_index[rows].tolist()):
            groups[g].append(i)
        units = list(groups.values())
    else:
        units = [[i] for i in range(len(lengths))]
    units.sort(key=lambda u: -max(lengths[i] for i in u))
    chunks: list[list[int]] = []
    width = count = 0
    for unit in units:
        longest = max(lengths[i] for i in unit)
        if len(unit) * longest > budget:
            what = (f"a group of {len(unit)} rows (kept together for a pairwise term) of up to" if by_group
                    else "a row of")
            raise OutriderError(f"{FIELD}={budget} is smaller than {what} {longest} tokens (prompt + response); "
                                f"set it to at least {len(unit) * longest}")
        if chunks and (count + len(unit)) * max(width, longest) <= budget:
            chunks[-1].extend(unit)
            count += len(unit)
            width = max(width, longest)
        else:
            chunks.append(list(unit))
            count, width = len(unit), longest
    return [rows[torch.tensor(sorted(c), dtype=torch.long, device=rows.device)] for c in chunks]


def trim(batch: Batch, rows: Tensor) -> Batch:
    """The sub-batch of `rows` without the padding columns that no kept row reaches."""
    sub = batch.select(rows)
    width = int(sub.attention_mask.sum(-1).max())
    return sub.select_columns(width) if width < sub.input_ids.shape[1] else sub


@torch.no_grad()
def score_in_chunks(policy: Policy, batch: Batch, budget: int | None, shared_prefix: bool, **options) -> Scores:
    """`Policy.score` of the whole batch without gradient (the preparing forward), one micro-batch under
    ``budget`` at a time (None: one forward), each result put back in its rows; positions past a row's length
    (padding, never trained) are 0."""
    chunks = [] if budget is None else pack(batch, torch.arange(batch.size, device=batch.input_ids.device), budget,
                                            by_group=False)
    if len(chunks) <= 1:
        return policy.score(batch.input_ids, batch.attention_mask,
                            groups=batch.group_index if shared_prefix else None, **options)
    out: dict[str, Tensor] = {}
    B, T = batch.input_ids.shape
    for rows in chunks:
        sub = trim(batch, rows)
        part = policy.score(sub.input_ids, sub.attention_mask, groups=sub.group_index if shared_prefix else None,
                            **options)
        for f in fields(Scores):
            v = getattr(part, f.name)
            if v is not None:
                if f.name not in out:
                    out[f.name] = v.new_zeros((B, T, *v.shape[2:]))
                out[f.name][rows, :v.shape[1]] = v
    return Scores(**out)


def share(term: Piece, micro: Batch, whole: Batch, mode: str, norm_length: int) -> float:
    """The fraction of the whole minibatch's loss a micro-batch's scalar term loss stands for: its share of the
    aggregation's denominator (rows' terms), or of the pairs (pairwise terms). 0 when the whole has none."""
    if term.entry.needs.micro_batch == "pairs":
        part, total = micro.pairs()[0].numel(), whole.pairs()[0].numel()
    else:
        part = float(denominator(micro.action_mask, mode, norm_length))
        total = float(denominator(whole.action_mask, mode, norm_length))
    return part / total if total > 0 else 0.0


class MetricMerger:
    """The metrics of one optimiser step from those of its micro-batches: keys weighted None (the reduced losses,
    each a part of the step's) summed; ``_max`` keys the max; others the mean weighted by what each value averages
    over (the micro-batch's action tokens; its pairs, for a pairwise term's metrics). Means over tokens and pairs
    come out as the unsplit step's; a metric reduced some other way (a scalar term's ``aggregate`` under a
    ``seq-mean-*`` mode: ``entropy_reg/entropy``, ``loss/value``; the batch-centred covariance diagnostics) is
    the token-weighted mean of the micro-batches' values, and a count (``dpo/pairs``) their weighted mean, not
    their sum. With one micro-batch the values pass unchanged."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[str, float], dict[str, float | None]]] = []

    def add(self, metrics: dict[str, float], weights: dict[str, float | None]) -> None:
        self.parts.append((metrics, weights))

    def result(self) -> dict[str, float]:
        if len(self.parts) == 1:
            return dict(self.parts[0][0])
        out: dict[str, float] = {}
        total: dict[str, float] = defaultdict(float)
        plain: dict[str, list[float]] = defaultdict(list)
        for metrics, weights in self.parts:
            for k, v in metrics.items():
                plain[k].append(v)
                if k.endswith("_max"):
                    out[k] = max(out.get(k, v), v)
                elif k in weights and weights[k] is None:
                    out[k] = out.get(k, 0.0) + v
                else:
                    w = weights.get(k) or 0.0
                    out[k] = out.get(k, 0.0) + w * v
                    total[k] += w
        for k, w in total.items():  # every part weighed 0 (no token, no pair): their plain mean
            out[k] = out[k] / w if w > 0 else sum(plain[k]) / len(plain[k])
        return out
