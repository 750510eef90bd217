"""Model merging between checkpoint directories: linear interpolation of parameters, and task arithmetic, TIES and
DARE-TIES on the differences to a base model. ReCUT [108] merges its accuracy- and brevity-trained models this way; any two
fine-tunes of one model can be merged. The result is a model directory `from_pretrained` loads.

- interpolation: ``θ = (1 − w) θ_A + w θ_B``;
- task arithmetic (Ilharco et al. 2023, arXiv:2212.04089) with a base ``θ_0``: task vectors ``τ = θ − θ_0`` and
  ``θ = θ_0 + λ ((1 − w) τ_A + w τ_B)``. With λ = 1 it equals the interpolation (θ_0 cancels); λ = 2, w = ½ adds
  the two task vectors, ``θ_0 + τ_A + τ_B``, the paper's addition;
- TIES (Yadav et al. 2023, arXiv:2306.01708) with a base: each task vector is trimmed to the share ``density`` of
  its largest-magnitude entries (per tensor), weighted (``(1 − w) τ_A``, ``w τ_B``); each entry's sign is elected
  as the sign of their sum, and the entries that agree with it are averaged by their weights (disjoint mean):
  ``θ = θ_0 + λ Σ_i m_i w_i τ_i / Σ_i m_i w_i`` with ``m_i = [sgn τ_i = γ]``, ``γ = sgn Σ_i w_i τ_i``;
- DARE-TIES (Yu et al. 2023, arXiv:2311.03099; what ReCUT [108] merges with): as TIES, but the task vectors are
  sparsified by dropping each entry with probability ``1 − density`` and rescaling the kept ones by
  ``1 / density``, instead of trimming by magnitude.

Both (all three) models must share an architecture (every ``config.json`` field but the bookkeeping ones) and a
tokenizer (the same vocabulary and special tokens); a mismatch is one line naming the first difference.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from outrider.checkpoint import list_checkpoints, newest_intact
from outrider.errors import OutriderError
from outrider.policy.model import Policy

# config.json fields that say how a model was saved, not what it is
BOOKKEEPING = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache"}


def model_dir(path: Path, option: str) -> Path:
    """The model directory `path` names: itself (it holds config.json), or a run directory's newest readable
    checkpoint."""
    if (path / "config.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = list_checkpoints(path)
        if found:
            return newest_intact(found, lambda c: _loadable(c, option), f"{option}: merging")[0]
    raise OutriderError(f"{option}: '{path}' is neither a model directory (config.json) nor a run directory with "
                        "a checkpoint")


def _loadable(checkpoint: Path, option: str) -> Path:
    Policy.load(checkpoint, where=option)  # raises on a truncated or broken checkpoint: the next older one is tried
    return checkpoint


def _config(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k not in BOOKKEEPING}


def check_same_architecture(paths: dict[str, Path]) -> None:
    """One line naming the first config field in which a model differs from the first one."""
    (name0, path0), *others = paths.items()
    first = _config(path0)
    for name, path in others:
        other = _config(path)
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise OutriderError(f"merge: {name0} and {name} have different architectures ({key}: "
                                    f"{first.get(key)!r} vs {other.get(key)!r} in config.json); only fine-tunes "
                                    "of one model can be merged")


def check_same_tokenizer(policies: dict[str, Policy]) -> None:
    """One line naming the first difference between the tokenizers (special tokens, size, a token's id)."""
    (name0, p0), *others = policies.items()
    vocab0 = p0.tokenizer.get_vocab()
    for name, p in others:
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            a, b = getattr(p0.tokenizer, attr), getattr(p.tokenizer, attr)
            if a != b:
                raise OutriderError(f"merge: {name0} and {name} have different tokenizers ({attr}: {a} vs {b})")
        vocab = p.tokenizer.get_vocab()
        if len(vocab) != len(vocab0):
            raise OutriderError(f"merge: {name0} and {name} have different tokenizers (vocabulary of {len(vocab0)} "
                                f"vs {len(vocab)} tokens)")
        for token in sorted(set(vocab0) ^ set(vocab)) or sorted(t for t in vocab0 if vocab0[t] != vocab[t]):
            raise OutriderError(f"merge: {name0} and {name} have different tokenizers (token {token!r}: id "
                                f"{vocab0.get(token)} vs {vocab.get(token)})")


def check_same_keys(states: dict[str, dict[str, torch.Tensor]]) -> None:
    """One line naming the first parameter that a model lacks, has extra, or holds in another shape than A."""
    a = states["A"]
    for name, state in states.items():
        for key in sorted(set(a) ^ set(state)):
            where, other = ("A", name) if key in a else (name, "A")
            raise OutriderError(f"merge: {where} has the parameter {key} and {other} has not; only fine-tunes of "
                                "one model can be merged")
        for key in sorted(a):
            if state[key].shape != a[key].shape:
                raise OutriderError(f"merge: the parameter {key} has shape {tuple(a[key].shape)} in A and "
                                    f"{tuple(state[key].shape)} in {name}; only fine-tunes of one model can be merged")


MergeMethod = Literal["linear", "ties", "dare_ties"]


def trimmed(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the ``ceil(density · n)`` largest-magnitude entries of a task vector, zero the rest."""
    if density >= 1.0:
        return tau
    keep = max(1, math.ceil(density * tau.numel()))
    flat = tau.flatten()
    out = torch.zeros_like(flat)
    top = flat.abs().topk(keep).indices
    out[top] = flat[top]
    return out.view_as(tau)


def dropped(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by ``1 / density``."""
    if density >= 1.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, tau / density, torch.zeros_like(tau))


def sign_consensus(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES' elect + disjoint merge: ``Σ_i m_i w_i τ_i / Σ_i m_i w_i``, ``m_i = [sgn τ_i = sgn Σ_j w_j τ_j]``;
    an entry no task vector moves (all zero) stays 0."""
    weighted = torch.stack([w * t for w, t in zip(weights, taus)])
    elected = weighted.sum(0).sign()
    agree = (weighted.sign() == elected) & (weighted != 0)
    w = torch.tensor(weights, dtype=weighted.dtype).view(-1, *[1] * (weighted.dim() - 1))
    divisor = (agree * w).sum(0)
    return torch.where(divisor > 0, (weighted * agree).sum(0) / divisor.clamp_min(1e-30), torch.zeros_like(elected))


def merged_state(states: dict[str, dict[str, torch.Tensor]], weight: float, scale: float = 1.0,
                 method: MergeMethod = "linear", density: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """``(1 − w) A + w B``, or with a ``base`` state ``base + λ ((1 − w)(A − base) + w (B − base))`` (method
    ``linear``), or TIES / DARE-TIES on the task vectors (module docstring), per tensor in float64 then cast back;
    integer tensors (none in the usual LMs) must be equal and are kept. Weight 0 and 1 return A and B exactly
    (without a base). DARE's drops come from a generator seeded with `seed`, in the order of A's keys."""
    check_same_keys(states)
    if method != "linear" and "base" not in states:
        raise OutriderError(f"--method {method}: merges task vectors, so it needs --base (the model A and B were "
                            "tuned from)")
    generator = torch.Generator().manual_seed(seed)
    a, b, base = states["A"], states["B"], states.get("base")
    out = {}
    for key, ta in a.items():
        tb = b[key]
        if not ta.is_floating_point():
            if any(not torch.equal(ta, s[key]) for s in states.values()):
                raise OutriderError(f"merge: the models differ in the integer tensor {key}; it cannot be "
                                    "interpolated")
            out[key] = ta.clone()
            continue
        if base is None and weight in (0.0, 1.0):
            out[key] = (ta if weight == 0.0 else tb).clone()  # exact, whatever the float rounding
            continue
        x, y = ta.double(), tb.double()
        if base is None:
            m = (1 - weight) * x + weight * y
        elif method == "linear":
            z = base[key].double()
            m = z + scale * ((1 - weight) * (x - z) + weight * (y - z))
        else:
            z = base[key].double()
            sparse = ((lambda t: trimmed(t, density)) if method == "ties" else
                      (lambda t: dropped(t, density, generator)))
            m = z + scale * sign_consensus([sparse(x - z), sparse(y - z)], [1 - weight, weight])
        out[key] = m.to(ta.dtype)
    return out


def merge(a: Path, b: Path, out: Path, weight: float, base: Path | None = None, scale: float = 1.0,
          method: MergeMethod = "linear", density: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Merge models A and B (model or run directories) into the model directory `out`; returns what was merged."""
    from outrider.rundir import save_model_dir

    if not 0.0 <= weight <= 1.0:
        raise OutriderError(f"--weight: must be between 0 and 1 (B's share; A gets 1 − weight), got {weight}")
    if base is None and scale != 1.0:
        raise OutriderError("--scale: scales task vectors, so it needs --base (the model A and B were tuned from)")
    if not scale > 0:
        raise OutriderError(f"--scale: must be > 0, got {scale}")
    if method not in ("linear", "ties", "dare_ties"):
        raise OutriderError(f"--method: must be linear, ties or dare_ties, got {method!r}")
    if method != "linear" and base is None:
        raise OutriderError(f"--method {method}: merges task vectors, so it needs --base (the model A and B were "
                            "tuned from)")
    if not 0.0 < density <= 1.0:
        raise OutriderError(f"--density: the share of each task vector kept, in (0, 1], got {density}")
    if method == "linear" and density != 1.0:
        raise OutriderError("--density: sparsifies task vectors for --method ties or dare_ties, not linear")
    paths = {"A": model_dir(a, "A"), "B": model_dir(b, "B")}
    if base is not None:
        paths["base"] = model_dir(base, "--base")
    check_same_architecture(paths)
    policies = {name: Policy.load(path, where=name) for name, path in paths.items()}
    check_same_tokenizer(policies)
    states = {name: p.model.state_dict() for name, p in policies.items()}
    merged = policies["A"]
    merged.model.load_state_dict(merged_state(states, weight, scale, method, density, seed))
    heads = [p.value_head for p in policies.values()]
    if all(h is not None for h in heads):
        merged.value_head.load_state_dict(merged_state(
            {n: p.value_head.state_dict() for n, p in policies.items()}, weight, scale, method, density, seed))
    elif any(h is not None for h in heads):
        merged.value_head = None
        print("note: only some of the models have a value head; the merged model has none", file=sys.stderr)
    save_model_dir(merged, out)
    return {"A": str(paths["A"]), "B": str(paths["B"]), "base": str(paths.get("base", "")) or None,
            "weight": weight, "scale": scale, "method": method, "density": density, "out": str(out)}
