"""Unpadded forward: a padded batch's projections, norms, MLP and LM head run on its real tokens only.

A padded batch of sequences (a grid ``[G, L]``: rows of a batch, or `shared_prefix`'s packed groups) spends the
model's per-token work on its padding too: on the GRPO benchmark's packed groups a fifth of the slots are padding.
This forward hands the model the real tokens as one sequence ``[1, N]`` with their own position ids, so every
per-token op runs on ``N`` rows; only attention, which must not mix sequences, goes back to the grid: inside the
attention call q, k and v are gathered into ``[G, H, L, D]``, attend under the grid's mask with SDPA, and the
outputs of the real slots are gathered back to ``[1, N]``. verl's ``use_remove_padding`` does the same with
flash-attention's variable-length kernels, which CPUs lack; here the attention itself stays padded (it is a small
part of a tiny model's FLOPs) and everything else is not.

The results equal the padded forward's up to float rounding (the same ops on the same rows). It needs the HF
attention-function interface (``transformers.AttentionInterface``) and a model whose forward passes extra keyword
arguments down to its attention calls, as Llama-family models do; `available` says when it applies, and the first
call checks that the arguments arrived.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from outrider.policy import fast_decode
from outrider.policy.outputs import RowOutputs

ATTENTION = "outrider_unpadded"
# below this share of padding a plain batch runs padded: the gathers would cost more than the padding
MIN_PADDING_SHARE = 0.1
MASK_BUDGET = 2 ** 24  # G·L² mask entries
_KWARG = "outrider_grid"
_registered: bool | None = None  # None: not tried yet
_models_without_kwargs: set[type] = set()


@dataclass
class Grid:
    """Where the ``N`` real tokens sit in the padded ``[G, L]`` grid."""

    token_of_slot: Tensor  # [G·L] the real token at each slot (0 at padding slots: read, never used)
    slot_of_token: Tensor  # [N] each real token's slot, ascending
    mask: Tensor  # [G, 1, L, L] additive attention mask over the grid (every query row attends somewhere)


class _KwargsNotForwarded(Exception):
    pass


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               dropout: float = 0.0, scaling: float | None = None, **kwargs: object) -> tuple[Tensor, None]:
    """The HF attention-function signature: q [1, Hq, N, D], k/v [1, Hkv, N, D] -> output [1, N, Hq, D]."""
    grid = kwargs.get(_KWARG)
    if not isinstance(grid, Grid):
        raise _KwargsNotForwarded
    G, _, L, _ = grid.mask.shape
    heads, dim = query.shape[1], query.shape[3]

    def on_grid(x: Tensor) -> Tensor:  # [1, H, N, D] -> [G, H, L, D]
        h = x.shape[1]
        x = x[0].index_select(1, grid.token_of_slot).view(h, G, L, dim).transpose(0, 1)
        return x if h == heads else x.repeat_interleave(heads // h, dim=1)  # grouped-query heads, as repeat_kv

    out = F.scaled_dot_product_attention(on_grid(query), on_grid(key), on_grid(value), attn_mask=grid.mask,
                                         dropout_p=dropout, scale=scaling)
    out = out.transpose(1, 2).reshape(G * L, heads, dim).index_select(0, grid.slot_of_token)
    return out[None], None


def _register() -> bool:
    global _registered
    if _registered is None:
        try:
            from transformers import AttentionInterface
        except ImportError:  # transformers < 4.48
            _registered = False
        else:
            AttentionInterface.register(ATTENTION, _attention)
            _registered = True
    return _registered


def masks_apply(model: nn.Module) -> bool:
    """A Llama-family model (`fast_decode.supports`) on SDPA or eager attention: a ``[G, 1, L, L]`` additive mask
    and per-token position ids are honoured as given (the packed and unpadded layouts rely on both)."""
    return fast_decode.supports(model) and getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def available(model: nn.Module) -> bool:
    """Whether `forward` can run this model: `masks_apply`, the HF interface exists, and the model was not found
    to drop the grid on its way to attention."""
    return masks_apply(model) and type(model) not in _models_without_kwargs and _register()


def forward(model: nn.Module, ids: Tensor, positions: Tensor, mask: Tensor, real: Tensor, gather: Tensor,
            hidden: bool) -> RowOutputs | None:
    """The model on the real slots of a grid: `ids`, `positions` ``[G, L]``, `mask` ``[G, 1, L, L]`` additive,
    `real` ``[G, L]`` bool; `gather` ``[B, T]`` names the slot each (sequence, position) reads. Returns the real
    tokens' outputs (logits ``[N, V]``, last hidden states if `hidden`) indexed by `gather` (padding slots read
    a real token's); None when the model did not pass the grid to its attention (it is then not tried again)."""
    device = next(model.parameters()).device
    slot_of_token = real.reshape(-1).nonzero().squeeze(-1)
    token_of_slot = torch.zeros(real.numel(), dtype=torch.long)
    token_of_slot[slot_of_token] = torch.arange(slot_of_token.numel())
    grid = Grid(token_of_slot.to(device), slot_of_token.to(device), mask.to(device))
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        out = model(input_ids=ids.reshape(-1)[slot_of_token].to(device)[None],
                    position_ids=positions.reshape(-1)[slot_of_token].to(device)[None],
                    use_cache=False, output_hidden_states=hidden, **{_KWARG: grid})
    except _KwargsNotForwarded:
        _models_without_kwargs.add(type(model))
        return None
    finally:
        config._attn_implementation = before
    return RowOutputs(out.logits[0], out.hidden_states[-1][0] if hidden else None,
                      grid.token_of_slot[gather.to(device)])


def rows_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, hidden: bool) -> RowOutputs | None:
    """The plain forward of a padded batch ``[B, T]`` (each row causal over its own real tokens, position ids
    ``0..T-1`` as the plain forward gives them) on its real tokens only; padding positions read another
    position's outputs. None when it does not apply: too little padding (`MIN_PADDING_SHARE`), a mask over
    `MASK_BUDGET`, or `available` says no."""
    B, T = attention_mask.shape
    real = attention_mask.bool().cpu()
    n_real = int(real.sum())
    if n_real == 0 or n_real > (1 - MIN_PADDING_SHARE) * B * T or B * T * T > MASK_BUDGET or not available(model):
        return None
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & real[:, None, :] | torch.eye(T, dtype=torch.bool)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(B, 1, T, T, dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return forward(model, input_ids.cpu(), torch.arange(T).expand(B, T), mask, real,
                   torch.arange(B * T).view(B, T), hidden)
