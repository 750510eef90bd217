"""Shared-prefix forward: a group's common prompt goes through the model once, not once per completion.

GRPO-style batches hold G prompts × n completions, and every completion of a group starts with the same tokens.
The plain forward computes those prompt positions n times; this one runs each group's longest common prefix once
(batch G), hands its KV cache to the rows of the group (an index, not a copy of work), and runs only each row's
suffix against it. Logits and hidden states are then laid out exactly as the plain forward's, so everything
downstream is unchanged, and gradients reach the prefix through the cache (the sum over the group's rows, as in
the plain forward). Training FLOPs fall by the saved share ``Σ_g (n_g − 1)·P_g / Σ_b T_b``.

Two layouts compute it:

- **packed** (Llama-family models on SDPA or eager attention, `unpadded.masks_apply`, when each group fits in
  ``PACKED_MAX_LEN`` tokens): each group becomes one sequence, its prefix followed by every row's suffix, under a
  tree mask (a suffix token sees the prefix and the earlier tokens of its own suffix) with each token at its
  original position id. One model call, and no padding between a group's suffixes; where `unpadded` applies, the
  padding after short groups is not computed either (only attention sees the [G, L] grid).
- **cache**: the prefix runs once, its KV cache is index_select'ed to the group's rows, and the suffixes (padded to
  the longest) run against it. Any HF causal LM whose cache is a plain per-layer key/value cache qualifies.

Anything else (sliding-window or recurrent layers) takes the plain forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from outrider.policy import unpadded
from outrider.policy.outputs import RowOutputs

# below this share of saved tokens the second model call costs more than it saves
MIN_SAVED_SHARE = 0.1
# the packed layout's attention is dense over a group's whole packed sequence (G·L² scores, most of them masked):
# up to this length that is cheaper than the cache layout's second call and its padding (docs/benchmarks.md);
# the budget bounds the mask's memory
PACKED_MAX_LEN = 512
PACKED_MASK_BUDGET = 2 ** 24  # G·L² mask entries


def cache_argument(model: nn.Module) -> str:
    """The name under which this model's forward takes a KV cache (``cache`` from transformers 5.24 on)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class PrefixPlan:
    prefix_ids: Tensor  # [G, P] each group's shared prefix, right-padded
    prefix_mask: Tensor  # [G, P]
    row_group: Tensor  # [B] which prefix row each sequence continues
    suffix_ids: Tensor  # [B, S] each row's tokens after its prefix, right-padded
    suffix_mask: Tensor  # [B, S]
    suffix_positions: Tensor  # [B, S] position ids of the suffix tokens
    gather: Tensor  # [B, T] index of each (row, position) into cat(prefix outputs, suffix outputs) flattened
    saved_share: float


def plan(input_ids: Tensor, attention_mask: Tensor, groups: Tensor,
         min_saved_share: float = MIN_SAVED_SHARE) -> PrefixPlan | None:
    """The prefix/suffix split of a right-padded batch by `groups` (one id per row), or None when too little
    is shared or the batch is not right-padded. A group's prefix is its rows' longest common prefix, kept at
    least one token short of its shortest row (every row keeps a suffix) and at least one token long (no empty
    attention rows)."""
    B, T = input_ids.shape
    if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):  # a real token after padding: not right-padded
        return None
    lengths = attention_mask.sum(-1)
    group_ids, row_group = torch.unique(groups, return_inverse=True)
    prefix_len = torch.zeros(len(group_ids), dtype=torch.long)
    first_row = torch.zeros(len(group_ids), dtype=torch.long)
    for g in range(len(group_ids)):
        rows = (row_group == g).nonzero().flatten()
        first_row[g] = rows[0]
        shortest = int(lengths[rows].min())
        same = (input_ids[rows, :shortest] == input_ids[rows[0], :shortest]).all(0)
        common = int(same.long().cumprod(0).sum())
        prefix_len[g] = min(common, shortest - 1)
    if int(prefix_len.min()) < 1:
        return None
    per_row = prefix_len[row_group]
    counts = torch.bincount(row_group, minlength=len(group_ids))
    saved = float(((counts - 1) * prefix_len).sum())
    total = float(lengths.sum())
    if saved < min_saved_share * total:
        return None
    P, S = int(prefix_len.max()), int((lengths - per_row).max())
    cols = torch.arange(P)
    prefix_mask = (cols[None] < prefix_len[:, None]).long()
    prefix_ids = torch.where(prefix_mask.bool(), input_ids[first_row, :P], input_ids.new_zeros(()))
    offsets = torch.arange(S)
    src = (per_row[:, None] + offsets[None]).clamp(max=T - 1)
    suffix_mask = (per_row[:, None] + offsets[None] < lengths[:, None]).long()
    suffix_ids = torch.where(suffix_mask.bool(), input_ids.gather(1, src), input_ids.new_zeros(()))
    positions = torch.arange(T)[None].expand(B, T)
    in_prefix = positions < per_row[:, None]
    from_prefix = row_group[:, None] * P + positions
    from_suffix = len(group_ids) * P + torch.arange(B)[:, None] * S + (positions - per_row[:, None]).clamp(0, S - 1)
    gather = torch.where(in_prefix, from_prefix, from_suffix)
    return PrefixPlan(prefix_ids, prefix_mask, row_group, suffix_ids, suffix_mask, per_row[:, None] + offsets[None],
                      gather, saved / total)


@dataclass
class PackedLayout:
    ids: Tensor  # [G, L] each group's prefix, then its rows' suffixes one after another
    positions: Tensor  # [G, L] each token's position id in its own sequence
    mask: Tensor  # [G, 1, L, L] additive: 0 where a query may attend to a key, the dtype's minimum elsewhere
    gather: Tensor  # [B, T] index of each (row, position) into the flattened [G·L] outputs
    real: Tensor  # [G, L] bool: the slot holds a token (not padding)


def packed_layout(p: PrefixPlan, dtype: torch.dtype, max_len: int | None = None) -> PackedLayout | None:
    """The packed layout of `p`, or None when a group's packed sequence would exceed `max_len` tokens (default
    `PACKED_MAX_LEN`) or the mask the memory budget. Padding (between a short prefix and its suffixes, and after
    a short group) attends only to itself and is attended by nothing."""
    G, P = p.prefix_ids.shape
    B, S = p.suffix_ids.shape
    prefix_len, suffix_len, per_row = p.prefix_mask.sum(-1), p.suffix_mask.sum(-1), p.suffix_positions[:, 0]
    # each row's suffix starts after its group's prefix and the suffixes of the group's earlier rows
    order = torch.argsort(p.row_group, stable=True)
    ordered_group, ordered_len = p.row_group[order], suffix_len[order]
    before = ordered_len.cumsum(0) - ordered_len
    first = torch.searchsorted(ordered_group, torch.arange(G))
    start = torch.empty(B, dtype=torch.long)
    start[order] = prefix_len[ordered_group] + before - before[first][ordered_group]
    L = int((prefix_len + torch.bincount(p.row_group, weights=suffix_len, minlength=G).long()).max())
    if L > (PACKED_MAX_LEN if max_len is None else max_len) or G * L * L > PACKED_MASK_BUDGET:
        return None
    ids = torch.zeros(G, L, dtype=torch.long)
    positions = torch.zeros(G, L, dtype=torch.long)
    segment = torch.full((G, L), -1, dtype=torch.long)  # 0: the prefix, b + 1: row b's suffix, -1: padding
    ids[:, :P] = p.prefix_ids  # P ≤ L: every group is at least as long as its prefix
    positions[:, :P] = torch.arange(P)
    segment[:, :P] = torch.where(p.prefix_mask.bool(), 0, -1)
    real = p.suffix_mask.bool()
    slot = (p.row_group[:, None] * L + start[:, None] + torch.arange(S)[None])[real]
    ids.view(-1)[slot] = p.suffix_ids[real]
    positions.view(-1)[slot] = p.suffix_positions[real]
    segment.view(-1)[slot] = (torch.arange(B)[:, None] + 1).expand(B, S)[real]
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None] & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(L, dtype=torch.bool)[None]
    mask = torch.zeros(G, 1, L, L, dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    T = p.gather.shape[1]
    t = torch.minimum(torch.arange(T)[None], (per_row + suffix_len - 1)[:, None])  # padding: the row's last token
    base = p.row_group[:, None] * L
    gather = torch.where(t < per_row[:, None], base + t, base + start[:, None] + t - per_row[:, None])
    return PackedLayout(ids, positions, mask, gather, segment >= 0)


def _forward_packed(model: nn.Module, layout: PackedLayout, hidden: bool) -> RowOutputs:
    device = next(model.parameters()).device
    if unpadded.available(model):  # the per-token work on the real tokens only, not the groups' padding
        out = unpadded.forward(model, layout.ids, layout.positions, layout.mask, layout.real, layout.gather, hidden)
        if out is not None:
            return out
    out = model(input_ids=layout.ids.to(device), attention_mask=layout.mask.to(device),
                position_ids=layout.positions.to(device), use_cache=False, output_hidden_states=hidden)
    flat = RowOutputs.dense(out.logits, out.hidden_states[-1] if hidden else None)
    return RowOutputs(flat.logits, flat.hidden, layout.gather.to(device))


def _plain_cache(cache: object) -> bool:
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers < 4.56: DynamicCache with key_cache/value_cache lists
        return type(cache).__name__ == "DynamicCache"
    return all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _expand(cache: object, rows: Tensor) -> None:
    """Give each row its group's prefix keys/values. `index_select`, whose backward (index_add) sums a group's
    gradients in a fixed order; advanced indexing's backward (accumulating index_put) does not on 2+ threads, and
    runs with the same seed would differ in the last bits."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
    else:  # transformers < 4.56
        for i in range(len(cache.key_cache)):
            cache.key_cache[i] = cache.key_cache[i].index_select(0, rows)
            cache.value_cache[i] = cache.value_cache[i].index_select(0, rows)


def forward(model: nn.Module, p: PrefixPlan, hidden: bool, cache: bool = True) -> RowOutputs | None:
    """Logits (and last-layer hidden states if `hidden`) of the plan's computed positions, indexed by (row,
    position) of the plain layout; None when the model's cache is not a plain key/value cache. Packed layout where
    it applies, else the cache (unless `cache` is False: then None)."""
    if unpadded.masks_apply(model):
        layout = packed_layout(p, next(model.parameters()).dtype)
        if layout is not None:
            return _forward_packed(model, layout, hidden)
    if not cache:
        return None
    device = next(model.parameters()).device
    arg = cache_argument(model)
    first = model(input_ids=p.prefix_ids.to(device), attention_mask=p.prefix_mask.to(device),
                  position_ids=torch.arange(p.prefix_ids.shape[1], device=device)[None].expand_as(p.prefix_ids),
                  use_cache=True, output_hidden_states=hidden)
    cache = getattr(first, arg)
    if not _plain_cache(cache):
        return None
    _expand(cache, p.row_group.to(device))
    mask = torch.cat([p.prefix_mask[p.row_group], p.suffix_mask], dim=1).to(device)
    second = model(input_ids=p.suffix_ids.to(device), attention_mask=mask, position_ids=p.suffix_positions.to(device),
                   use_cache=True, output_hidden_states=hidden, **{arg: cache})

    def rows(a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])])

    states = rows(first.hidden_states[-1], second.hidden_states[-1]) if hidden else None
    return RowOutputs(rows(first.logits, second.logits), states, p.gather.to(device))
