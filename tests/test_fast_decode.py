"""The lean Llama-family decoder against the generic HF path: same tokens at temperature 0, the right
distribution at temperature > 0, for Llama (MHA) and Qwen2 (grouped-query attention, q/k/v biases)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_qwen2
from outrider.errors import OutriderError
from outrider.policy import fast_decode
from outrider.policy.model import Policy
from outrider.policy import sampler as sampler_module
from outrider.policy.sampler import SamplingParams, sample


def _scaled(policy: Policy) -> Policy:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in policy.model.named_parameters():
            # norm weights too, away from 1: the lean decoder folds them into the projections that follow
            w.copy_(1 + 0.2 * torch.randn(w.shape, generator=g) if "norm" in name
                    else torch.randn(w.shape, generator=g) * 0.3)
    return policy.eval()


def llama() -> Policy:
    return _scaled(Policy.tiny(hidden=32, layers=2, heads=4, seed=0))


def qwen2_gqa() -> Policy:
    return _scaled(tiny_qwen2())


PROMPTS = [[2, 40, 41], [2, 50, 51, 52, 53, 54, 55], [2, 60], [2, 70, 71, 72, 73]]  # ragged: left padding


# every lean-decoder test runs the packed path where oneDNN is available (tests/test_onednn.py covers the plain one)
pytestmark = pytest.mark.usefixtures("pack_every_weight")


@pytest.mark.parametrize("make", [llama, qwen2_gqa])
def test_supported(make):
    assert fast_decode.supports(make().model)


@pytest.mark.parametrize("make", [llama, qwen2_gqa])
@pytest.mark.parametrize("case", ["ragged prompts", "unpadded prompts (no mask)", "ragged, PyTorch attention",
                                  "unpadded, PyTorch attention", "attention through SDPA",
                                  "prefill one row at a time", "prefill one row at a time, PyTorch attention"])
def test_greedy_equals_the_hf_path_token_for_token(make, case, monkeypatch):
    """Where the C attention kernel builds (`native`), the default cases run it; the PyTorch ones switch it off."""
    prompts = [[2, 40 + i, 41, 42 + i, 43] for i in range(4)] if case.startswith("unpadded") else PROMPTS
    if "PyTorch" in case or "SDPA" in case:
        monkeypatch.setenv("OUTRIDER_NATIVE", "0")
    if case == "attention through SDPA":
        monkeypatch.setattr(fast_decode, "DENSE_ATTENTION_MAX", 0)
    if case.startswith("prefill one row"):  # a block of one row: every prompt prefilled alone
        monkeypatch.setattr(fast_decode, "PREFILL_BLOCK_BYTES", 1)
    policy = make()
    outs = {be: sample(policy, prompts, SamplingParams(temperature=0, max_new_tokens=24, backend=be),
                       torch.Generator().manual_seed(0)) for be in ("hf", "fast")}
    for a, b in zip(outs["hf"], outs["fast"]):
        assert a.ids == b.ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


@pytest.mark.parametrize("make", [llama, qwen2_gqa])
def test_sampled_logprobs_equal_the_scoring_forward(make):
    policy = make()
    out = sample(policy, PROMPTS, SamplingParams(temperature=0.8, max_new_tokens=16, backend="fast"),
                 torch.Generator().manual_seed(1))
    for prompt, s in zip(PROMPTS, out):
        ids = torch.tensor([prompt + s.ids])
        scored = policy.score(ids, torch.ones_like(ids), temperature=0.8).logprobs[0, len(prompt):]
        assert s.logprobs == pytest.approx(scored.tolist(), abs=1e-4)


@pytest.mark.parametrize("kernels", ["native", "PyTorch"])
def test_sampling_distribution_matches_the_model(kernels, monkeypatch):
    """Chi-square goodness of fit of 4000 fast-path draws of the 3rd new token against the model's probabilities,
    with the C kernels (draw and attention) where they build, and without."""
    if kernels == "PyTorch":
        monkeypatch.setenv("OUTRIDER_NATIVE", "0")
    policy = llama()
    prefix = [2, 40, 41]
    first = sample(policy, [prefix], SamplingParams(temperature=0, max_new_tokens=2, backend="hf"),
                   torch.Generator().manual_seed(0))[0].ids
    context = prefix + first
    n = 4000
    draws = sample(policy, [context] * n, SamplingParams(temperature=1.0, max_new_tokens=1, backend="fast"),
                   torch.Generator().manual_seed(2))
    counts = torch.bincount(torch.tensor([d.ids[0] for d in draws]), minlength=len(policy.tokenizer)).double()
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([context])).logits[0, -1].double()
    expected = torch.softmax(logits, -1) * n
    keep = expected >= 5  # pool the rare tokens into one cell
    observed = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    expect = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    chi2 = float(((observed - expect) ** 2 / expect).sum())
    df = int(keep.sum())
    # mean df, sd sqrt(2 df): 6 sd above the mean has p < 1e-6, a wrong sampler lands far beyond
    assert chi2 < df + 6 * (2 * df) ** 0.5, (chi2, df)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6)])
def test_truncated_sampling_distribution_matches_the_renormalised_model(top_k, top_p):
    """The inverse-CDF draw after top-k / top-p: never a truncated token, and the kept ones at their renormalised
    probabilities (chi-square, as above)."""
    policy = llama()
    context = [2, 40, 41]
    n = 3000
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, max_new_tokens=1, backend="fast")
    draws = sample(policy, [context] * n, params, torch.Generator().manual_seed(3))
    counts = torch.bincount(torch.tensor([d.ids[0] for d in draws]), minlength=len(policy.tokenizer)).double()
    with torch.no_grad():
        probs = torch.softmax(policy.model(input_ids=torch.tensor([context])).logits[0, -1].double(), -1)
    order = probs.argsort(descending=True)
    if top_k:
        kept = order[:top_k]
    else:  # the smallest head of the sorted distribution whose mass reaches top_p
        kept = order[: int((probs[order].cumsum(0) < top_p).sum()) + 1]
    assert counts[kept].sum() == n  # nothing outside the kept set
    expected = probs[kept] / probs[kept].sum() * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = len(kept) - 1
    assert chi2 < df + 6 * (2 * df) ** 0.5 + 6, (chi2, df)


@pytest.mark.parametrize("backend", ["hf", "fast"])
@pytest.mark.parametrize("make", [llama, qwen2_gqa])
def test_repeated_prompts_prefilled_once_decode_like_distinct_ones(make, backend):
    """A group's rows share a prompt, which is prefilled once and its cache handed to every row: each row's
    log-probs still equal the scoring forward, and greedy rows equal the prompt decoded alone."""
    policy = make()
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2]]
    out = sample(policy, prompts, SamplingParams(temperature=1.0, max_new_tokens=12, backend=backend),
                 torch.Generator().manual_seed(4))
    assert len({tuple(s.ids) for s in out[1:5]}) > 1  # rows of one prompt sample differently
    for prompt, s in zip(prompts, out):
        ids = torch.tensor([prompt + s.ids])
        scored = policy.score(ids, torch.ones_like(ids)).logprobs[0, len(prompt):]
        assert s.logprobs == pytest.approx(scored.tolist(), abs=1e-4)
    greedy = sample(policy, prompts, SamplingParams(temperature=0, max_new_tokens=12, backend=backend),
                    torch.Generator().manual_seed(0))
    for prompt, s in zip(prompts, greedy):
        alone = sample(policy, [prompt], SamplingParams(temperature=0, max_new_tokens=12, backend=backend),
                       torch.Generator().manual_seed(0))[0]
        assert s.ids == alone.ids


@pytest.mark.slow
def test_compiled_decoding_equals_the_eager_lean_decoder():
    """`policy.compile`: the torch.compile'd step (static buffer, masked) gives the eager step's tokens at
    temperature 0 and its log-probs at temperature 1 (same seed, same draws)."""
    policy = llama()
    for temperature in (0.0, 1.0):
        outs = [sample(policy, PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=20, compile=c),
                       torch.Generator().manual_seed(5)) for c in (False, True)]
        for eager, compiled in zip(*outs):
            assert eager.ids == compiled.ids
            assert eager.logprobs == pytest.approx(compiled.logprobs, abs=1e-4)


def test_a_failing_compile_is_a_one_line_error_naming_the_switch(monkeypatch):
    def broken(fused_draw: bool = False):
        def step(*args, **kwargs):
            raise RuntimeError("InductorError: no C++ compiler\ntraceback lines")
        return step

    monkeypatch.setattr(fast_decode, "_compiled_step", broken)
    with pytest.raises(OutriderError, match=r"policy.compile: torch.compile of the decoding step failed "
                                            r"\(RuntimeError: InductorError: no C\+\+ compiler\); set policy.compile"):
        sample(llama(), PROMPTS, SamplingParams(max_new_tokens=4, compile=True), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_finished_rows_dropped_mid_batch_leave_the_others_unchanged(backend, monkeypatch):
    """Rows that stop early are compacted out of the decoding batch; the rows still running keep their cache:
    log-probs equal the scoring forward and greedy rows equal each prompt decoded alone."""
    policy = llama()
    stepper = fast_decode.FastDecoder if backend == "fast" else sampler_module._HFStepper
    kept = []
    original = stepper.keep
    monkeypatch.setattr(stepper, "keep", lambda self, rows: (kept.append(len(rows)), original(self, rows))[1])
    prompts = [[2, 40 + i, 41 + (i * 7) % 13] for i in range(12)]
    stop = [policy.decode([t]) for t in range(40, 60)]  # any of 20 characters ends a row: lengths vary
    for temperature in (1.0, 0.0):
        params = SamplingParams(temperature=temperature, max_new_tokens=16, stop=stop, backend=backend)
        out = sample(policy, prompts, params, torch.Generator().manual_seed(6))
        for prompt, s in zip(prompts, out):
            ids = torch.tensor([prompt + s.ids])
            scored = policy.score(ids, torch.ones_like(ids), temperature=max(temperature, 1e-6)).logprobs
            if temperature > 0:
                assert s.logprobs == pytest.approx(scored[0, len(prompt):].tolist(), abs=1e-4)
            else:
                assert s.ids == sample(policy, [prompt], params, torch.Generator().manual_seed(0))[0].ids
    assert kept  # compaction happened
    assert len({len(s.ids) for s in out}) > 2


def test_the_kv_storage_is_kept_between_calls_and_never_shared():
    policy = llama()
    first = fast_decode.FastDecoder(policy.model, batch=4, max_len=16)
    ptr = first.k[0].data_ptr()
    second = fast_decode.FastDecoder(policy.model, batch=4, max_len=16)  # the first still holds it
    assert second.k[0].data_ptr() != ptr
    del first, second
    third = fast_decode.FastDecoder(policy.model, batch=2, max_len=8)  # smaller: a view of the kept storage
    assert third.k[0].data_ptr() == ptr
    outs = [sample(policy, PROMPTS, SamplingParams(temperature=0, max_new_tokens=12, backend="fast"),
                   torch.Generator().manual_seed(0)) for _ in range(2)]
    assert [s.ids for s in outs[0]] == [s.ids for s in outs[1]]
