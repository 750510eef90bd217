"""PEAR: a phase-entropy reward that penalises thinking-phase entropy and spares the answer phase [142]."""

from __future__ import annotations

from pydantic import Field

from outrider.data import Episode
from outrider.score import SCORE, ComponentConfig


class PEARConfig(ComponentConfig):
    """Options of `pear` (trajectory level; add it to the verifier reward with its own weight)."""

    alpha: float = Field(0.1, ge=0.0, description="α: penalty per nat of mean think-phase entropy.")
    beta: float = Field(0.0, description="β: reward per nat of mean answer-phase entropy (0: answer phase free).")
    delimiter: str = Field("</think>", min_length=1, description="Text that ends the think phase; a response "
                                                                 "without it is all think phase.")
    only_correct: bool = Field(False, description="Give the PEAR term only to correct episodes (episode.success), "
                                                  "0 to the others. Unverified against the original code.")


def think_token_count(episode: Episode, delimiter: str) -> int:
    """Number of leading action tokens (over all turns) that form PEAR's think phase [142].

    Score components have no tokenizer, so the delimiter's character index c in the response is mapped to tokens
    proportionally inside the turn that contains it: ``n = ⌊c_turn·N'/L + ½⌋`` with L the turn's characters and
    N' = min(N, L) of its N tokens. Tokens beyond L (the EOS a decode drops) are trailing, after any delimiter, so
    they are left out of the proportion: this is exact for a character tokenizer such as the tiny model's and an
    approximation (off by the tokens' uneven lengths) for subword tokenizers. The delimiter's own tokens count to
    the answer phase. No delimiter: every token is think phase, as in the original.
    """
    total = sum(len(t.action_ids) for t in episode.turns)
    c = episode.response.find(delimiter)
    if c < 0:
        return total
    before, start = 0, 0
    for turn in episode.turns:
        n_chars, n_tok = len(turn.action), len(turn.action_ids)
        if c < start + n_chars:
            return before + int((c - start) * min(n_tok, n_chars) / n_chars + 0.5)
        before, start = before + n_tok, start + n_chars
    return total


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


@SCORE.register("pear", config=PEARConfig)
def pear(episodes: list[Episode], cfg: PEARConfig) -> list[float]:
    """PEAR phase-entropy reward (PEAR: Phase Entropy Aware Reward for Efficient Reasoning) [142].

    ``R_pear = −α·H̄_think + β·H̄_answer``: H̄ is the mean per-token behaviour entropy (the sampler's, i.e. the
    old policy's) over each phase, split at `delimiter` (see `think_token_count`); an empty phase has H̄ = 0. The
    verifier reward is added by composition (its own component and weight), giving ``R = r_correct − α·H̄_think +
    β·H̄_answer``. The original code was not available (paraphrase only): the coefficients, the correctness gate
    (``only_correct``) and the lack of normalisation are unverified. An episode without per-token entropies
    (a demonstration, a hand-made episode) gets 0.
    """
    out = []
    for e in episodes:
        entropy = [h for t in e.turns for h in t.behaviour_entropy]
        if len(entropy) != e.num_action_tokens or not entropy or (cfg.only_correct and not e.success):
            out.append(0.0)
            continue
        n = think_token_count(e, cfg.delimiter)
        out.append(-cfg.alpha * _mean(entropy[:n]) + cfg.beta * _mean(entropy[n:]))
    return out
