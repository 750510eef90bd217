"""Batched KV-cache sampling for HF causal LMs: one prefill for the whole (left-padded) batch, then one token per
step for every unfinished sequence. Seeded through a `torch.Generator`, so the same seed gives the same tokens.

Behaviour log-probs are those of the distribution each token is drawn from: the temperature-scaled one,
truncated by top-k/top-p and renormalised when either is on (``log q(x) = log π(x) − log Σ_{kept} π``); the
learner scores the same truncated distribution (`Policy.score` with ``top_k``/``top_p``). Entropies are the
untruncated distribution's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from outrider.policy import fast_decode, native
from outrider.policy.draw import draw_with_stats, inverse_cdf, truncate_logits
from outrider.policy.model import Policy
from outrider.policy.shared_prefix import cache_argument


# Finished rows are dropped from the decoding batch once no more than this share of it is still generating (and
# it has at least COMPACT_MIN_ROWS rows): a long-tailed batch then stops paying for rows that are done. Not with
# `compile`, where every new batch size would compile a new graph.
COMPACT_AT = 0.5
COMPACT_MIN_ROWS = 8


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep generating past EOS (fixed-length benchmarks)
    backend: str = "auto"  # "auto": the lean decoder for Llama-family models, else HF; "fast" or "hf" to force
    compile: bool = False  # torch.compile the lean decoder's step (first call compiles: tens of seconds on CPU)


@dataclass
class Sample:
    ids: list[int]
    logprobs: list[float]
    text: str
    entropies: list[float]  # H of the temperature-scaled (unfiltered) next-token distribution at each step
    finish_reason: str  # "stop" or "length"


def _draw_step(logits: Tensor, params: SamplingParams, generator: torch.Generator,
               kernels=None) -> tuple[Tensor, Tensor, Tensor]:
    """Token, behaviour log-prob and entropy per row from the next-token logits [B, V]: greedy at temperature 0,
    else `draw.inverse_cdf` (after top-k/top-p). The log-prob is that of the truncated, renormalised
    distribution the token is drawn from; the entropy is the untruncated distribution's.
    `kernels` (`native.kernels()`, for float32 CPU logits) runs the plain draw as one C call."""
    uniform = None if params.temperature <= 0 else torch.rand((logits.shape[0], 1), generator=generator,
                                                              device=logits.device)
    if uniform is not None and not (params.top_k or params.top_p < 1.0):
        if kernels is not None:
            return native.draw(kernels, logits, params.temperature, uniform)
        return draw_with_stats(logits, params.temperature, uniform)
    log_p = torch.log_softmax(logits.float() / max(params.temperature, 1e-6), dim=-1)
    probs = log_p.exp()
    kept = truncate_logits(log_p, params.top_k, params.top_p)
    token = log_p.argmax(-1) if uniform is None else inverse_cdf(kept.exp(), uniform)
    logprob = kept.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    if kept is not log_p:  # renormalise over the kept tokens
        logprob = logprob - torch.logsumexp(kept, dim=-1)
    return token, logprob, -(probs * log_p).nan_to_num().sum(-1)


class _HFStepper:
    """The generic path: the HF forward with its own KV cache (any causal LM)."""

    def __init__(self, model: torch.nn.Module, batch: int, width: int, max_new: int, device: torch.device):
        self.model, self.width = model, width
        self.attention = torch.zeros(batch, width + max_new, dtype=torch.long, device=device)
        self.past = None
        self.t = 0
        self.cache_arg = cache_argument(model)

    def prefill(self, input_ids: Tensor, attention: Tensor, rows: Tensor | None = None) -> Tensor:
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
        self.past = getattr(out, self.cache_arg)
        logits = out.logits[:, -1]
        if rows is not None:  # distinct prompts were prefilled once: give each row its prompt's cache
            self.past.batch_select_indices(rows)
            attention, positions, logits = attention[rows], positions[rows], logits[rows]
        self.attention[:, : self.width] = attention
        self.positions = positions
        return logits

    def keep(self, rows: Tensor) -> None:
        """Drop every row not in `rows` (finished ones) from the cache and buffers."""
        self.past.batch_select_indices(rows)
        self.attention, self.positions = self.attention[rows], self.positions[rows]

    def step(self, tokens: Tensor, live: Tensor) -> Tensor:
        self.attention[:, self.width + self.t] = live.long()
        self.t += 1
        out = self.model(input_ids=tokens.unsqueeze(-1), attention_mask=self.attention[:, : self.width + self.t],
                         position_ids=self.positions[:, -1:] + self.t, use_cache=True, **{self.cache_arg: self.past})
        self.past = getattr(out, self.cache_arg)
        return out.logits[:, -1]


@torch.no_grad()
def sample(policy: Policy, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator) -> list[Sample]:
    """Continue each prompt (token ids) until EOS, a stop string, or `max_new_tokens`."""
    if not prompts:
        return []
    model, device = policy.model, policy.device
    was_training = model.training
    model.eval()
    B, n_new = len(prompts), params.max_new_tokens
    width = max(len(p) for p in prompts)
    # read once: each read is a lookup in the HF tokenizer
    pad_id, eos_id = policy.pad_id, policy.eos_id
    # a group's rows share their prompt: prefill each distinct prompt once
    distinct: dict[tuple[int, ...], int] = {}
    prompt_of_row = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    rows = torch.tensor(prompt_of_row, device=device) if len(distinct) < B else None
    input_ids = torch.full((len(distinct), width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros(len(distinct), width, dtype=torch.long, device=device)
    for i, p in enumerate(distinct):
        input_ids[i, width - len(p):] = torch.tensor(p, device=device)
        attention[i, width - len(p):] = 1
    use_fast = params.backend == "fast" or (params.backend == "auto" and fast_decode.supports(model))
    stepper = (fast_decode.FastDecoder(model, B, width + n_new, compiled=params.compile) if use_fast
               else _HFStepper(model, B, width, n_new, device))

    out_ids = torch.full((B, n_new), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros(B, n_new, device=device)
    out_h = torch.zeros(B, n_new, device=device)
    # per step, whether a row was still generating and whether it stopped there (one write each per step;
    # lengths and finish reasons are read off them at the end)
    out_live = torch.zeros(B, n_new, dtype=torch.bool, device=device)
    out_stop = torch.zeros(B, n_new, dtype=torch.bool, device=device)
    texts = [""] * B
    # the stepper's rows: all B at first (a slice: cheaper writes); once most have finished, the finished ones
    # are dropped and `rows_of` becomes the index of the remaining ones
    rows_of: slice | Tensor = slice(None)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    live = ~done
    # a compiled lean decoder fuses the plain draw into its step; its uniforms come from the same generator calls
    fused_draw = use_fast and params.compile and params.temperature > 0 and not (params.top_k or params.top_p < 1)
    drawn = None
    logits = stepper.prefill(input_ids, attention, rows)
    kernels = native.kernels() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    for t in range(n_new):
        token, logprob, entropy = drawn if drawn is not None else _draw_step(logits, params, generator, kernels)
        token = token.masked_fill(done, pad_id)
        out_ids[rows_of, t] = token
        out_lp[rows_of, t] = logprob
        # behaviour entropy costs one more vocab-sized reduction; entropy regulators and diagnostics read it
        out_h[rows_of, t] = entropy
        out_live[rows_of, t] = live
        hit_eos = live & (token == eos_id) if not params.ignore_eos else torch.zeros_like(live)
        if params.stop:
            for i in live.nonzero().flatten().tolist():
                row = i if isinstance(rows_of, slice) else int(rows_of[i])
                texts[row] += policy.decode([int(token[i])])
                if any(s in texts[row] for s in params.stop):
                    hit_eos[i] = True
        out_stop[rows_of, t] = hit_eos
        done |= hit_eos
        live = ~done
        n_live = int(live.sum())
        if t + 1 == n_new or n_live == 0:
            break
        if not params.compile and len(done) >= COMPACT_MIN_ROWS and n_live <= COMPACT_AT * len(done):
            keep = (~done).nonzero().flatten()
            stepper.keep(keep)
            rows_of = keep if isinstance(rows_of, slice) else rows_of[keep]
            done, live, token = done[keep], live[keep], token[keep]
        if fused_draw:
            uniform = torch.rand((len(done), 1), generator=generator, device=device)
            drawn = stepper.step(token, live, draw=(params.temperature, uniform))
        else:
            logits = stepper.step(token, live)
    if was_training:
        model.train()
    samples = []
    ids_rows, lp_rows, h_rows = out_ids.tolist(), out_lp.tolist(), out_h.tolist()
    lengths, stopped = out_live.sum(1).tolist(), out_stop.any(1).tolist()
    decoded = policy.decode_batch([ids_rows[i][:lengths[i]] for i in range(B)])
    for i in range(B):
        n = lengths[i]
        ids, text = ids_rows[i][:n], decoded[i]
        if params.stop:
            cut = min((text.find(s) + len(s) for s in params.stop if s in text), default=len(text))
            text = text[:cut]
        samples.append(Sample(ids=ids, logprobs=lp_rows[i][:n], text=text, entropies=h_rows[i][:n],
                              finish_reason="stop" if stopped[i] else "length"))
    return samples
