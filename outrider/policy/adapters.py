"""LoRA adapters through `peft` and gradient checkpointing, for `policy.model: DIR` and the tiny model alike.

LoRA [Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021] replaces each targeted linear map
``W x`` by ``W x + (alpha / r) · B A x`` with ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}`` (``B = 0`` at the start, so
the adapted model starts as the base); only ``A``, ``B`` (and a value head, if any) train.

The adapter layers are injected into the policy's own model (`peft.get_peft_model` edits it in place), so every
forward path of `Policy` (unpadded, shared-prefix, the lean decoder with its folded weights: `effective_weight`)
runs the adapted model. A checkpoint of a LoRA policy holds the merged model (``W + (alpha/r) B A``, loadable by
`from_pretrained` with no peft) and the adapter alone in ``adapter/`` (`peft.PeftModel.from_pretrained(base,
DIR/adapter)`); a resumed run rebuilds the base from the recipe and loads the adapter's weights, so it continues
bit-identically from frozen base weights rather than from merged ones.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import Field
from safetensors.torch import load_file
from torch import Tensor, nn

from outrider.errors import OutriderError
from outrider.registry import Options

if TYPE_CHECKING:
    from outrider.policy.model import Policy

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraConfig(Options):
    r: int = Field(8, ge=1, description="LoRA rank r of A (r×in) and B (out×r).")
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: the update is (alpha / r) · B A.")
    target_modules: list[str] | str | None = Field(
        None, description="Module names (or suffixes) to adapt, e.g. [q_proj, v_proj]; 'all-linear' for every "
                          "linear layer but the LM head; null: peft's default for the architecture (q_proj, v_proj "
                          "for Llama/Qwen2, c_attn for GPT-2).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input (in SFT; the RL learner "
                                                        "scores in eval mode, without dropout).")


def require_peft():
    try:
        import peft
    except ImportError:
        raise OutriderError("policy.lora: needs peft, which is not installed: pip install 'outrider[lora]'") from None
    return peft


def add_lora(policy: "Policy", cfg: LoraConfig, seed: int) -> None:
    """Inject fresh LoRA adapters into `policy.model` (A drawn from `seed`, B = 0) and freeze everything else but
    the value head."""
    peft = require_peft()
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.target_modules,
                             lora_dropout=cfg.dropout, task_type="CAUSAL_LM")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            wrapped = peft.get_peft_model(policy.model, config)
        except ValueError as e:  # target modules not found in the model, or an unsupported layer type
            raise OutriderError(f"policy.lora.target_modules: {str(e).splitlines()[0][:200]}") from None
    policy.peft = wrapped  # the same modules as policy.model, for saving the adapter


def load_adapter_weights(policy: "Policy", checkpoint: str | Path) -> None:
    """Put a checkpoint's adapter weights (``checkpoint/adapter``) into a policy that has LoRA adapters."""
    peft = require_peft()
    path = Path(checkpoint) / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not path.exists():
        raise OutriderError(f"checkpoint: '{checkpoint}' has no LoRA adapter ({path} missing); was policy.lora added "
                            "to the recipe after the run started?")
    result = peft.set_peft_model_state_dict(policy.peft, load_file(path))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise OutriderError(f"checkpoint: the adapter in '{checkpoint}' does not match policy.lora "
                            f"({len(missing)} LoRA weights missing, e.g. {missing[0]})")


def save_adapted(policy: "Policy", path: Path) -> None:
    """The merged model at `path`, the adapter alone at ``path/adapter``."""
    merged = copy.deepcopy(policy.peft).merge_and_unload()
    merged.save_pretrained(path)
    policy.peft.save_pretrained(path / ADAPTER_DIR)


def effective_weight(linear: nn.Module) -> Tensor:
    """The weight a linear layer applies: W, plus (alpha/r) B A for each active, unmerged LoRA adapter on it."""
    weight = linear.weight
    if not hasattr(linear, "lora_A") or getattr(linear, "merged", False) or getattr(linear, "disable_adapters", False):
        return weight
    for name in linear.active_adapters:
        if name in linear.lora_A:
            weight = weight + linear.get_delta_weight(name)
    return weight


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """Enable HF gradient checkpointing (non-reentrant) and return the layers it checkpoints. HF checkpoints a
    layer only while that layer is in training mode; the learner scores in eval mode (no dropout), so `Policy`
    sets these layers' own flag (not their children's, where dropout lives) before each forward. A layer's
    recomputation in the backward pass runs under the attention function its forward ran with
    (`same_attention_on_recompute`), so the unpadded and packed forwards (`unpadded`), which switch the model's
    attention only for the forward's duration, can be checkpointed too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise OutriderError(f"policy.gradient_checkpointing: {type(base).__name__} does not support it")
    kwargs = {"use_reentrant": False, "context_fn": same_attention_on_recompute(base.config)}
    if hasattr(base, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return [m for m in base.modules() if getattr(m, "gradient_checkpointing", False) is True and m is not base]


def same_attention_on_recompute(config: object) -> Callable[[], tuple[contextlib.AbstractContextManager, ...]]:
    """A `torch.utils.checkpoint` ``context_fn``: called when a layer's forward starts, it notes the attention
    implementation the model's config names then, and puts it back for the layer's recomputation (the backward
    pass runs after the forward that chose it has restored the model's own)."""
    def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _attention(config, config._attn_implementation)
    return context_fn


@contextlib.contextmanager
def _attention(config: object, name: str) -> Iterator[None]:
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before
