"""A process reward model (PRM) trained from step labels, and its use as a step scorer.

A response is cut into steps at a delimiter (stepsum's ``,``) exactly as stepsum's step checker cuts it
(`envs.stepsum.split_steps`: ``text.split(delimiter)``, each part but the last with its delimiter, so a response
ending in the delimiter has an empty last step). The PRM is the reward model's network (`score.reward_model`): its
scalar head read at **each step's last token** (the delimiter for every step but the last) gives a logit ``z_k``
and ``p_k = σ(z_k)`` = P(step k is right | prompt, steps ≤ k). Training minimises the per-step cross-entropy

    ℓ = (1/|L|) Σ_{(i,k) ∈ L} BCE(σ(z_ik), y_ik)

over the labelled steps L of a minibatch (PRM800K / Math-Shepherd's step-level objective; a label may be null: that
step is not trained on). A step without tokens (the empty last step, an empty response) has no token to read:
it is neither trained on nor scored. Tokens are the concatenated encodings of the steps, so each step's last token
is known exactly whatever the tokenizer (with the tiny model's character tokenizer this is the response's own
encoding).

Held-out metrics: step accuracy (``z > 0`` against ``y ≥ ½``) and the first-wrong-step AUROC of the implicit-PRM
protocol (`benchmarks/implicit_prm_auroc.py`): per response, the first step labelled wrong is a positive, the
labelled-right steps before it negatives, later steps left out; AUROC = P(a positive has lower p than a negative).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from outrider.errors import OutriderError

STEP_KEYS = ("prompt", "response", "step_labels")
OBJECTIVE = "step_bce"


class StepLabelled(NamedTuple):
    """One response with a label per step (1 right, 0 wrong, None unlabelled), steps as `split_at` cuts them."""

    prompt: str
    response: str
    step_labels: tuple[float | None, ...]


def split_at(text: str, delimiter: str = ",") -> list[str]:
    """The steps of `text`: each part of ``text.split(delimiter)`` with its delimiter, the last without (it may be
    empty); concatenated they give the text back."""
    if not delimiter:
        raise OutriderError("step PRM: delimiter must be a non-empty string")
    parts = text.split(delimiter)
    return [p + delimiter for p in parts[:-1]] + [parts[-1]]


def parse_step_labelled(row: dict[str, Any], where: str, delimiter: str = ",") -> StepLabelled:
    """One line of a step-labels file; a missing or mistyped field, or a label count that is not the response's
    step count, is one error naming the line."""
    from outrider.score.reward_model import check_fields, unit_label

    check_fields(row, where, STEP_KEYS, "step-labelled response")
    labels = row.get("step_labels")
    steps = len(split_at(row["response"], delimiter))
    if not isinstance(labels, list) or len(labels) != steps:
        raise OutriderError(f"{where}: field 'step_labels' must be a list of {steps} labels (one per step of the "
                            f"response cut at {delimiter!r}), got {labels!r}")
    out = [None if y is None else unit_label(y) for y in labels]
    bad = next((y for y, v in zip(labels, out) if y is not None and v is None), None)
    if bad is not None:
        raise OutriderError(f"{where}: field 'step_labels' holds {bad!r}; each label is a number from 0 to 1, a "
                            "boolean or null (not trained on)")
    return StepLabelled(row["prompt"], row["response"], tuple(out))


def step_tokens(policy: Any, prompt: str, response: str, delimiter: str = ",") -> tuple[list[int], list[int | None]]:
    """(token ids of prompt + steps + EOS, the position of each step's last token, None for a step without
    tokens). The prompt is encoded as the policy's first observation, each step on its own."""
    ids = list(policy.encode_observation(prompt, first=True))
    ends: list[int | None] = []
    for step in split_at(response, delimiter):
        toks = policy.encode(step) if step else []
        ids += toks
        ends.append(len(ids) - 1 if toks else None)
    return ids + [policy.eos_id], ends


def step_logits(rm: Any, seqs: list[list[int]], ends: list[list[int | None]]) -> list[Tensor]:
    """The head's logit at each step's last token, per sequence (a step without tokens left out), with gradient;
    one right-padded forward."""
    _, hidden, _ = rm.forward_hidden(seqs)
    z = rm.policy.value_head(hidden).squeeze(-1)
    return [z[i, [e for e in row if e is not None]] for i, row in enumerate(ends)]


def step_loss(logits: Sequence[Tensor], labels: Sequence[Sequence[float | None]]) -> tuple[Tensor, Tensor]:
    """(mean BCE over the labelled steps, per-step correctness ``(z > 0) == (y ≥ ½)``). `logits[i]` holds the
    logits of row i's steps with tokens, `labels[i]` their labels. No labelled step: loss 0 (with a gradient path)."""
    zs, ys = [], []
    for z, y in zip(logits, labels):
        keep = [k for k, v in enumerate(y) if v is not None]
        zs.append(z[keep])
        ys += [y[k] for k in keep]
    z = torch.cat(zs) if zs else torch.zeros(0)
    if not ys:
        return z.sum() * 0.0, torch.zeros(0)
    y = torch.tensor(ys, dtype=z.dtype, device=z.device)
    return F.binary_cross_entropy_with_logits(z, y), ((z > 0) == (y >= 0.5)).float().detach()


def encode_rows(rm: Any, rows: Sequence[StepLabelled], delimiter: str) -> tuple[list, list, list]:
    """(sequences, step ends, the labels of the steps with tokens) of a minibatch."""
    seqs, ends, labels = [], [], []
    for r in rows:
        ids, e = step_tokens(rm.policy, r.prompt, r.response, delimiter)
        seqs.append(ids)
        ends.append(e)
        labels.append([y for y, end in zip(r.step_labels, e) if end is not None])
    return seqs, ends, labels


def step_batch_loss(rm: Any, rows: Sequence[StepLabelled], delimiter: str = ",") -> tuple[Tensor, Tensor]:
    """(loss, per-step correctness) of a minibatch of step-labelled responses."""
    seqs, ends, labels = encode_rows(rm, rows, delimiter)
    return step_loss(step_logits(rm, seqs, ends), labels)


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties ½ (Mann–Whitney U over |P|·|N|); NaN when a side is empty."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    p, n = np.asarray(positive, dtype=float)[:, None], np.asarray(negative, dtype=float)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def first_wrong_split(scores: Sequence[float], labels: Sequence[float | None]) -> tuple[list[float], list[float]]:
    """(the first wrong step's score, the scores of the right steps before it) of one response; a response with
    no wrong step gives all its right steps as negatives. Unlabelled steps are skipped."""
    pos, neg = [], []
    for s, y in zip(scores, labels):
        if y is None:
            continue
        if y < 0.5:
            pos.append(float(s))
            break
        neg.append(float(s))
    return pos, neg


@torch.no_grad()
def evaluate_steps(rm: Any, rows: Sequence[StepLabelled], delimiter: str = ",",
                   batch_size: int = 64) -> dict[str, float]:
    """Held-out loss, step accuracy and first-wrong-step AUROC (a low ``p`` flags the step) over `rows`."""
    if not rows:
        return {}
    was = rm.policy.training
    rm.policy.eval()
    loss_sum, right, pos, neg = 0.0, [], [], []
    for i in range(0, len(rows), batch_size):
        seqs, ends, labels = encode_rows(rm, rows[i:i + batch_size], delimiter)
        logits = step_logits(rm, seqs, ends)
        loss, ok = step_loss(logits, labels)
        loss_sum += float(loss) * len(ok)
        right += ok.tolist()
        for z, y in zip(logits, labels):
            p, n = first_wrong_split((-z).tolist(), y)
            pos += p
            neg += n
    rm.policy.train(was)
    return {"loss": loss_sum / max(len(right), 1), "accuracy": float(np.mean(right)) if right else float("nan"),
            "steps": float(len(right)), "first_wrong_auroc": auroc(pos, neg),
            "first_wrong_steps": float(len(pos)), "right_steps_before": float(len(neg))}


class StepScorer:
    """A trained step PRM as a step scorer: ``p_k = σ(z_k)`` for each step with tokens (`process_reward`'s
    ``prm: learned``). Loaded from a directory saved by ``outrider rm train`` on step labels; its tokenizer must be
    the policy's."""

    def __init__(self, path: str, where: str, policy: Any = None):
        from pathlib import Path

        from outrider.score.reward_model import META_FILE, RewardModel

        if not Path(path).is_dir():
            raise OutriderError(f"{where}: no model directory at '{path}' (train a step PRM with outrider rm train "
                                "on a {prompt, response, step_labels} file)")
        if not (Path(path) / META_FILE).is_file():
            raise OutriderError(f"{where}: '{path}' is not a reward model (no {META_FILE}; train a step PRM with "
                                "outrider rm train on a {prompt, response, step_labels} file)")
        self.rm = RewardModel.load(path, where)
        if self.rm.meta.get("objective") != OBJECTIVE:
            raise OutriderError(f"{where}: '{path}' is a {self.rm.meta.get('objective', 'unknown')} reward model, "
                                f"not a step PRM ({OBJECTIVE}: trained on step_labels)")
        if policy is not None and self.rm.policy.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
            raise OutriderError(f"{where}: '{path}' has another tokenizer than the policy")
        self.rm.policy.eval().requires_grad_(False)
        self.delimiter = self.rm.meta.get("delimiter", ",")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(prompts), batch_size):
            seqs, ends = [], []
            for x, y in zip(prompts[i:i + batch_size], responses[i:i + batch_size]):
                ids, e = step_tokens(self.rm.policy, x, y, self.delimiter)
                seqs.append(ids)
                ends.append(e)
            out += [torch.sigmoid(z).tolist() for z in step_logits(self.rm, seqs, ends)]
        return out
