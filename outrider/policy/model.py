"""The agent: an HF causal LM + tokenizer (loaded by path, or the built-in tiny one), with an optional value head.

`Policy.score` is the one forward the learner needs: log-probs, entropies, values and (optionally) hidden states,
all shifted so position ``t`` describes token ``x_t`` given ``x_<t``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from outrider.errors import OutriderError
from outrider.policy import adapters, shared_prefix, unpadded
from outrider.policy.draw import truncation_mask
from outrider.policy.outputs import RowOutputs
from outrider.policy.tokenizer import build_char_tokenizer

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class Scores:
    logprobs: Tensor  # [B, T]; position 0 is 0
    entropy: Tensor | None = None  # [B, T]
    values: Tensor | None = None  # [B, T]
    hidden: Tensor | None = None  # [B, T, H] last-layer hidden state at the position *before* each token
    logits: Tensor | None = None  # [B, T, V] temperature-scaled logits predicting each token (row 0 is zeros)


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, hidden: int, layers: int, heads: int, max_positions: int,
                     seed: int) -> LlamaForCausalLM:
    """A small Llama-style model, randomly initialised from `seed` (nothing is downloaded)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


class Policy(nn.Module):
    """A causal LM, its tokenizer and (when a credit piece needs one) a scalar value head on the last hidden state."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, value_head: bool = False,
                 chat_template: bool = True):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        hidden = model.config.hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.use_chat_template = chat_template  # observations go through the tokenizer's chat template, if any
        self._warned_template = False
        self._encoded: dict[tuple[str, bool, bool], list[int]] = {}
        self.peft = None  # the peft wrapper of `model` once LoRA adapters are in it (`adapters.add_lora`)
        self.checkpointed: list[nn.Module] = []  # layers under gradient checkpointing

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each layer's activations in the backward pass (`adapters.checkpointed_layers`)."""
        self.checkpointed = adapters.checkpointed_layers(self.model)

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, hidden: int = 128, layers: int = 2, heads: int = 4, max_positions: int = 512, seed: int = 0,
             value_head: bool = False, chat_template: bool = True) -> "Policy":
        tokenizer = build_char_tokenizer()
        return cls(build_tiny_model(tokenizer, hidden, layers, heads, max_positions, seed), tokenizer, value_head,
                   chat_template)

    @classmethod
    def load(cls, path: str | os.PathLike, value_head: bool = False, chat_template: bool = True,
             where: str = "policy.model") -> "Policy":
        """Load any HF causal LM + tokenizer saved at `path` (a checkpoint of ours included). Missing or broken
        files are an OutriderError that starts with `where`."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise OutriderError(f"{where}: no model at '{path}' (expected a directory with config.json)"
                                + (", or use 'tiny'" if where == "policy.model" else ""))
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001  (missing or broken weights, config or tokenizer files: one line)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise OutriderError(f"{where}: cannot load the model in '{path}' ({type(e).__name__}: "
                                f"{first[:200]})") from None
        tokenizer.padding_side = "left"
        policy = cls(model, tokenizer, value_head=value_head or (path / VALUE_HEAD_FILE).exists(),
                     chat_template=chat_template)
        if (path / VALUE_HEAD_FILE).exists():
            policy.value_head.load_state_dict(load_file(path / VALUE_HEAD_FILE))
        return policy

    def load_adapter_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """Load a LoRA checkpoint's adapter (and value head) into this policy, built with the same base and
        `policy.lora`: the frozen base weights stay the base's own, not the checkpoint's merged ones."""
        adapters.load_adapter_weights(self, checkpoint)
        if self.value_head is not None and (Path(checkpoint) / VALUE_HEAD_FILE).exists():
            self.value_head.load_state_dict(load_file(Path(checkpoint) / VALUE_HEAD_FILE))

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.peft is not None:  # the merged model, and the adapter alone in path/adapter
            adapters.save_adapted(self, path)
        else:
            self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.value_head is not None:
            save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()}, path / VALUE_HEAD_FILE)
        # safetensors creates its files private (0600); the others follow the umask (0644 by default): give the
        # weights the same mode, so whoever may read the run may read its model
        umask = os.umask(0)
        os.umask(umask)
        for file in path.glob("*.safetensors"):
            file.chmod(0o666 & ~umask)

    # --- tokens ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def max_length(self) -> int:
        """The longest sequence the model takes (its position limit)."""
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    def encode_observation(self, text: str, first: bool) -> list[int]:
        """Token ids of an observation as the policy sees it before acting. Without a chat template (the tiny
        model), or with `use_chat_template` off: the plain text. With one: the user message in the template plus
        the generation prompt (less a leading BOS, which the rollout adds); later turns take the template's delta
        after a finished assistant turn — or, for templates that render the last assistant turn differently
        (Qwen3's think block), after a user turn — so an episode's ids follow the template applied to the whole
        conversation (the action ids, which end with EOS, are the assistant turns; what a template puts after an
        assistant's end token, often a newline, is left out). A template neither delta fits falls back to the
        plain text, with a warning. Encodings are memoised: a group's members see the same observations."""
        key = (text, first, self.use_chat_template)
        if key not in self._encoded:
            if len(self._encoded) >= 4096:
                self._encoded.clear()
            self._encoded[key] = self._encode_observation(text, first)
        return list(self._encoded[key])

    def _encode_observation(self, text: str, first: bool) -> list[int]:
        if not (self.use_chat_template and getattr(self.tokenizer, "chat_template", None)):
            return self.encode(text)
        user = {"role": "user", "content": text}
        if first:
            ids = self._chat([user], generation_prompt=True)
            return ids[1:] if ids and self.bos_id is not None and ids[0] == self.bos_id else ids
        for before in ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                       [{"role": "user", "content": "x"}]):
            try:
                prefix = self._chat(before, generation_prompt=False)
                whole = self._chat(before + [user], generation_prompt=True)
            except Exception:  # noqa: BLE001  (templates may refuse e.g. two user turns in a row)
                continue
            if whole[: len(prefix)] == prefix:
                return whole[len(prefix):]
        if not self._warned_template:
            warnings.warn("the tokenizer's chat template rewrites earlier turns; later observations are encoded as "
                          "plain text (set policy.chat_template: false to use plain text throughout)")
            self._warned_template = True
        return self.encode(text)

    def _chat(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_batch(self, seqs: list[list[int]]) -> list[str]:
        """`decode` of each sequence, straight through a fast tokenizer's Rust backend where the wrapper would
        add nothing (no clean-up of spaces): a quarter of the wrapper's per-call Python cost. One sequence per
        call, not the backend's `decode_batch`, whose thread pool fights PyTorch's busy threads (2 ms for 128
        short sequences in a GRPO step, against 0.1 ms)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return [self.decode(s) for s in seqs]
        return [backend.decode(s, skip_special_tokens=True) for s in seqs]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _forward(self, input_ids: Tensor, attention_mask: Tensor, need_hidden: bool,
                 groups: Tensor | None) -> RowOutputs:
        # HF checkpoints a layer only in training mode (see `adapters.checkpointed_layers`)
        for layer in self.checkpointed:
            layer.training = True
        if groups is not None:
            p = shared_prefix.plan(input_ids.cpu(), attention_mask.cpu(), groups.cpu())
            # a checkpointed layer runs without its KV cache (HF drops it), so no cache layout then
            out = shared_prefix.forward(self.model, p, need_hidden, cache=not self.checkpointed) \
                if p is not None else None
            if out is not None:
                return out
        out = unpadded.rows_forward(self.model, input_ids, attention_mask, need_hidden)
        if out is not None:
            return out
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=need_hidden,
                         use_cache=False)
        return RowOutputs.dense(out.logits, out.hidden_states[-1] if need_hidden else None)

    # --- the scoring forward --------------------------------------------------------------------------------
    def score(self, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0, entropy: bool = False,
              values: bool = False, hidden: bool = False, logits: bool = False,
              groups: Tensor | None = None, top_k: int = 0, top_p: float = 1.0) -> Scores:
        """One forward over right-padded sequences: per-token log π(x_t|x_<t) at `temperature`, and on request
        the entropy of that distribution, value-head predictions and hidden states.

        With ``top_k > 0`` or ``top_p < 1`` the log-probs are those of the truncated, renormalised distribution
        the sampler draws from: ``log q(x_t) = s_{x_t} − log Σ_{j∈K_t ∪ {x_t}} e^{s_j}`` with s the scaled
        logits and K_t the top-k/top-p set (`draw.truncation_mask`) recomputed from these logits, without
        gradient through the choice of K_t. Adding x_t itself is the floor for a token outside the recomputed
        set (a tie or rounding at the nucleus edge, or a policy that moved since sampling): its log-prob stays
        finite, ≥ the untruncated log π(x_t), instead of −inf. Entropy and ``logits`` stay untruncated.

        With `groups` (an id per row, e.g. the GRPO group), rows of a group that start with the same tokens share
        one forward of that prefix (`shared_prefix`); the results are the same up to float rounding. The
        vocab-sized work (log-normaliser, entropy) runs once per position the forward computed (`RowOutputs`),
        and each (sequence, position) then reads its row."""
        if top_k < 0 or not 0.0 < top_p <= 1.0:
            raise OutriderError(f"score: top_k must be >= 0 (got {top_k}) and top_p in (0, 1] (got {top_p})")
        B, T = input_ids.shape
        need_hidden = values or hidden
        out = self._forward(input_ids, attention_mask, need_hidden, groups)
        scaled = out.logits.float()
        if temperature != 1.0:
            scaled = scaled / temperature
        vocab = scaled.shape[-1]
        # position t is predicted by the outputs at t - 1
        before = out.index[:, :-1].reshape(-1)

        def per_token(x: Tensor) -> Tensor:  # [M, ...] rows -> [B, T, ...], shifted right (position 0: zeros)
            return _shift_right(x.index_select(0, before).view(B, T - 1, *x.shape[1:]))

        log_norm = torch.logsumexp(scaled, dim=-1)
        # index_select on flat indices, not advanced indexing: its backward sums in a fixed order on 2+ threads
        picked = scaled.reshape(-1).index_select(0, before * vocab + input_ids[:, 1:].reshape(-1))
        norm = log_norm.index_select(0, before)
        if top_k or top_p < 1.0:
            with torch.no_grad():
                keep = truncation_mask(scaled, top_k, top_p)
            kept_norm = torch.logsumexp(scaled.masked_fill(~keep, float("-inf")), dim=-1).index_select(0, before)
            inside = keep.reshape(-1).index_select(0, before * vocab + input_ids[:, 1:].reshape(-1))
            norm = torch.where(inside, kept_norm, torch.logaddexp(kept_norm, picked))
        token_lp = picked.view(B, T - 1) - norm.view(B, T - 1)
        result = Scores(logprobs=_shift_right(token_lp))
        if entropy:
            result.entropy = per_token(log_norm - (torch.softmax(scaled, dim=-1) * scaled).sum(-1))
        if logits:
            result.logits = per_token(scaled)
        if hidden:
            result.hidden = per_token(out.hidden)
        if values:
            if self.value_head is None:
                raise RuntimeError("values requested from a policy without a value head")
            result.values = per_token(self.value_head(out.hidden).squeeze(-1))
        return result


def _shift_right(x: Tensor) -> Tensor:
    return torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)
