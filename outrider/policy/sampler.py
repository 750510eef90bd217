"""Batched KV-cache sampling for HF causal LMs: one prefill for the whole (left-padded) batch, then one token per
step for every unfinished sequence. Seeded through a `torch.Generator`, so the same seed gives the same tokens.

Behaviour log-probs are those of the temperature-scaled distribution (before top-k/top-p truncation), which is
what the learner recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from outrider.policy.model import Policy


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep generating past EOS (fixed-length benchmarks)


@dataclass
class Sample:
    ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" or "length"


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(policy: Policy, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator) -> list[Sample]:
    """Continue each prompt (token ids) until EOS, a stop string, or `max_new_tokens`."""
    if not prompts:
        return []
    model, device = policy.model, policy.device
    was_training = model.training
    model.eval()
    B = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((B, width), policy.pad_id, dtype=torch.long, device=device)
    attention = torch.zeros(B, width + params.max_new_tokens, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, device=device)
        attention[i, width - len(p):width] = 1
    positions = (attention[:, :width].cumsum(-1) - 1).clamp(min=0)

    out_ids = torch.full((B, params.max_new_tokens), policy.pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros(B, params.max_new_tokens, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    texts = [""] * B
    past = None
    step_input, step_pos = input_ids, positions
    for t in range(params.max_new_tokens):
        out = model(input_ids=step_input, attention_mask=attention[:, : width + t], position_ids=step_pos,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1].float() / max(params.temperature, 1e-6)
        logp = torch.log_softmax(logits, dim=-1)
        if params.temperature <= 0:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(_filter_logits(logits, params.top_k, params.top_p), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, policy.pad_id), token)
        live = ~done
        out_ids[live, t] = token[live]
        out_lp[live, t] = logp[live].gather(-1, token[live].unsqueeze(-1)).squeeze(-1)
        lengths += live.long()
        attention[:, width + t] = live.long()
        hit_eos = live & (token == policy.eos_id) & (not params.ignore_eos)
        if params.stop:
            for i in live.nonzero().flatten().tolist():
                texts[i] += policy.decode([int(token[i])])
                if any(s in texts[i] for s in params.stop):
                    hit_eos[i] = True
        stopped |= hit_eos
        done |= hit_eos
        if bool(done.all()):
            break
        step_input = token.unsqueeze(-1)
        step_pos = positions[:, -1:] + t + 1
    if was_training:
        model.train()
    samples = []
    for i in range(B):
        n = int(lengths[i])
        ids = out_ids[i, :n].tolist()
        text = policy.decode(ids)
        if params.stop:
            cut = min((text.find(s) + len(s) for s in params.stop if s in text), default=len(text))
            text = text[:cut]
        samples.append(Sample(ids=ids, logprobs=out_lp[i, :n].tolist(), text=text,
                              finish_reason="stop" if bool(stopped[i]) else "length"))
    return samples
