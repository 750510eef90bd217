"""The KV-cache sampler against the full-sequence scoring forward of the same tiny model."""

from __future__ import annotations

import pytest
import torch

from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams, sample


@pytest.fixture(scope="module")
def policy(scaled_tiny_policy) -> Policy:
    return scaled_tiny_policy


def prompt_ids(policy: Policy, text: str) -> list[int]:
    return [policy.bos_id] + policy.encode(text)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def greedy_by_scoring(policy: Policy, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without a cache: a full forward over the whole sequence for every new token."""
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = policy.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            seq.append(token)
            if token == policy.eos_id:
                break
    return out


def scored_logprobs(policy: Policy, prompt: list[int], ids: list[int], temperature: float, top_k: int = 0,
                    top_p: float = 1.0) -> list[float]:
    seq = torch.tensor([prompt + ids])
    with torch.no_grad():
        lp = policy.score(seq, torch.ones_like(seq), temperature=temperature, top_k=top_k, top_p=top_p).logprobs[0]
    return lp[len(prompt):].tolist()


PROMPTS = ["3 + 4 =", "12 - 7 + 1 =", "9"]


def test_same_seed_same_tokens_and_other_seed_differs(policy):
    prompts = [prompt_ids(policy, p) for p in PROMPTS]
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    a = sample(policy, prompts, params, gen(123))
    b = sample(policy, prompts, params, gen(123))
    c = sample(policy, prompts, params, gen(124))
    assert [s.ids for s in a] == [s.ids for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]
    assert [s.ids for s in a] != [s.ids for s in c]


def test_temperature_zero_is_greedy_under_the_scoring_forward(policy):
    n = 10
    for text in PROMPTS:
        prompt = prompt_ids(policy, text)
        got = sample(policy, [prompt], SamplingParams(temperature=0.0, max_new_tokens=n), gen())[0]
        expected = greedy_by_scoring(policy, prompt, n)
        assert got.ids == expected, text
        assert got.text == policy.decode(expected)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 0.9)])
def test_behaviour_logprobs_equal_scoring_logprobs(policy, temperature, top_k, top_p):
    """Behaviour log-probs are of the temperature-scaled distribution truncated by top-k/top-p and renormalised,
    as `score` computes with the same truncation."""
    prompts = [prompt_ids(policy, p) for p in PROMPTS]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=8)
    for prompt, s in zip(prompts, sample(policy, prompts, params, gen(7))):
        assert len(s.logprobs) == len(s.ids) > 0
        expected = scored_logprobs(policy, prompt, s.ids, temperature, top_k, top_p)
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(expected), atol=1e-4, rtol=0)


def test_max_new_tokens_is_respected_and_reported_as_length(policy):
    prompts = [prompt_ids(policy, p) for p in PROMPTS]
    for n in (1, 5):
        samples = sample(policy, prompts, SamplingParams(temperature=1.0, max_new_tokens=n), gen(3))
        for s in samples:
            assert len(s.ids) <= n
            if policy.eos_id not in s.ids:
                assert len(s.ids) == n and s.finish_reason == "length"


def first_prefix_with(policy: Policy, ids: list[int], stop: str) -> int:
    """The fewest leading tokens of `ids` whose text contains `stop`."""
    return next(m for m in range(1, len(ids) + 1) if stop in policy.decode(ids[:m]))


def test_stop_string_ends_generation_and_cuts_the_text(policy):
    prompt = prompt_ids(policy, PROMPTS[1])
    free = sample(policy, [prompt], SamplingParams(temperature=0.0, max_new_tokens=12), gen())[0]
    assert free.finish_reason == "length" and len(free.ids) == 12
    # a two-character stop string that first appears in the middle of the greedy continuation
    stop = free.text[4:6]
    at = free.text.find(stop)
    assert 0 < at + len(stop) < len(free.text)
    m = first_prefix_with(policy, free.ids, stop)
    assert m < 12
    stopped = sample(policy, [prompt], SamplingParams(temperature=0.0, max_new_tokens=12, stop=[stop]), gen())[0]
    assert stopped.finish_reason == "stop"
    assert stopped.ids == free.ids[:m]  # generation stopped right after the stop string was complete
    assert stopped.text == free.text[: at + len(stop)]  # and the text is cut just after it
    assert stopped.text.endswith(stop)
    assert len(stopped.logprobs) == len(stopped.ids)
    assert stopped.logprobs == free.logprobs[:m]
    # a stop string that never appears changes nothing
    never = sample(policy, [prompt], SamplingParams(temperature=0.0, max_new_tokens=12, stop=["\x7f~~"]), gen())[0]
    assert never.ids == free.ids and never.finish_reason == "length"


def test_stop_string_in_a_batch_only_stops_its_own_row(policy):
    prompts = [prompt_ids(policy, p) for p in PROMPTS]
    free = sample(policy, prompts, SamplingParams(temperature=0.0, max_new_tokens=10), gen())
    stop = free[0].text[3]
    assert any(stop not in f.text for f in free[1:])  # at least one row that must not stop
    stopped = sample(policy, prompts, SamplingParams(temperature=0.0, max_new_tokens=10, stop=[stop]), gen())
    for f, s in zip(free, stopped):
        if stop in f.text:
            m = first_prefix_with(policy, f.ids, stop)
            assert s.ids == f.ids[:m] and s.finish_reason == "stop"
            assert s.text == f.text[: f.text.find(stop) + 1]
        else:
            assert s.ids == f.ids and s.text == f.text and s.finish_reason == f.finish_reason


def test_top_k_one_equals_greedy(policy):
    prompts = [prompt_ids(policy, p) for p in PROMPTS]
    greedy = sample(policy, prompts, SamplingParams(temperature=0.0, max_new_tokens=10), gen(1))
    top1 = sample(policy, prompts, SamplingParams(temperature=1.5, top_k=1, max_new_tokens=10), gen(99))
    assert [s.ids for s in top1] == [s.ids for s in greedy]


def test_left_padded_batch_matches_each_prompt_alone(policy):
    texts = ["7", "1 + 2 + 3 + 4 =", "88 - 9 ="]  # very different lengths: the short ones are left-padded
    prompts = [prompt_ids(policy, t) for t in texts]
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    together = sample(policy, prompts, params, gen())
    for prompt, s in zip(prompts, together):
        alone = sample(policy, [prompt], params, gen())[0]
        assert s.ids == alone.ids
        assert s.finish_reason == alone.finish_reason
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)


def test_sampling_leaves_training_mode_as_it_was(policy):
    policy.model.train()
    sample(policy, [prompt_ids(policy, "1")], SamplingParams(max_new_tokens=2), gen())
    assert policy.model.training
    policy.model.eval()
    sample(policy, [prompt_ids(policy, "1")], SamplingParams(max_new_tokens=2), gen())
    assert not policy.model.training


def test_no_prompts_gives_no_samples(policy):
    assert sample(policy, [], SamplingParams(), gen()) == []


def test_ignore_eos_generates_exactly_max_new_tokens(policy):
    eos_biased = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True)
    with torch.no_grad():
        policy.model.lm_head.weight[policy.eos_id] += 5.0  # make EOS likely, so ignoring it is tested
    try:
        out = sample(policy, [prompt_ids(policy, "ab"), prompt_ids(policy, "xyz")], eos_biased, gen(3))
        plain = sample(policy, [prompt_ids(policy, "ab")], SamplingParams(max_new_tokens=12), gen(3))
    finally:
        with torch.no_grad():
            policy.model.lm_head.weight[policy.eos_id] -= 5.0
    assert [len(s.ids) for s in out] == [12, 12]
    assert all(s.finish_reason == "length" for s in out)
    assert policy.eos_id in out[0].ids + out[1].ids
    assert len(plain[0].ids) < 12 and plain[0].finish_reason == "stop"


def test_decode_batch_equals_decode_one_by_one(policy, monkeypatch):
    """The backend's batch decode (special tokens dropped), and the per-sequence path when the tokenizer cleans up
    spaces, which the backend would not."""
    seqs = [[policy.bos_id] + policy.encode("ab c") + [policy.eos_id, policy.pad_id], [], policy.encode(" x  y ")]
    one_by_one = [policy.decode(s) for s in seqs]
    assert policy.decode_batch(seqs) == one_by_one == ["ab c", "", " x  y "]
    monkeypatch.setattr(policy.tokenizer, "clean_up_tokenization_spaces", True)
    assert policy.decode_batch(seqs) == [policy.decode(s) for s in seqs]
