"""Log-probabilities of a target continuation given a context, teacher-forced: the one scoring pass every
likelihood reward shares (log-p of a reference [46], RLPR [67], SAR [78]).

``continuation_logprobs(policy, pairs)`` packs each ``context + target`` into one right-padded batch, runs the
policy's scoring forward once per chunk of rows without gradient and returns, per pair, the log-probs
``log π(target_i | context, target_<i)`` of the target tokens only. The policy is the one being trained: the
pass reads its current parameters and never changes them (no second model). A context must hold at least one
token (a BOS or the prompt): the first token of a sequence has no prediction.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from outrider.errors import OutriderError


def continuation_logprobs(policy: Any, pairs: Sequence[tuple[list[int], list[int]]],
                          chunk: int = 64) -> list[list[float]]:
    """Per (context ids, target ids) pair, the target's teacher-forced token log-probs under `policy` at
    temperature 1: ``[log π(t_1 | c), log π(t_2 | c, t_1), …]`` (an empty target gives ``[]``).

    `policy` is anything with ``score(input_ids, attention_mask) -> Scores`` (log-probs shifted right, position
    0 zero) and ``pad_id``: the `Policy`, or a stub in tests. Rows are scored `chunk` at a time, in eval mode
    and without gradient; a sequence longer than the policy's ``max_length`` keeps its last tokens (the
    context's start is cut, never the target)."""
    out: list[list[float]] = []
    limit = int(getattr(policy, "max_length", 1 << 30))
    rows: list[tuple[list[int], int]] = []  # (ids, number of target tokens)
    for context, target in pairs:
        if not context:
            raise OutriderError("continuation_logprobs: a context needs at least one token (a BOS or the prompt) "
                                "to predict the target's first token")
        ids = list(context) + list(target)
        if len(ids) > limit:
            if len(target) >= limit:
                raise OutriderError(f"continuation_logprobs: a target of {len(target)} tokens does not fit the "
                                    f"policy's {limit} positions")
            ids = ids[len(ids) - limit:]
        rows.append((ids, len(target)))
    model = getattr(policy, "model", None)
    was_training = bool(getattr(model, "training", False))
    if model is not None:
        model.eval()
    try:
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            width = max(len(ids) for ids, _ in part)
            input_ids = torch.full((len(part), width), int(policy.pad_id), dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, (ids, _) in enumerate(part):
                input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[i, :len(ids)] = 1
            device = getattr(policy, "device", torch.device("cpu"))
            with torch.no_grad():
                logprobs = policy.score(input_ids.to(device), mask.to(device)).logprobs.float().cpu()
            for i, (ids, n) in enumerate(part):
                out.append(logprobs[i, len(ids) - n:len(ids)].tolist() if n else [])
    finally:
        if model is not None and was_training:
            model.train()
    return out
